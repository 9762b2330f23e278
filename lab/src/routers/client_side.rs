//! The client-side balancer: a pod that lists the Service's EndpointSlices
//! from the Kubernetes API on an interval (as a registry client does:
//! Eureka's default is 30 s) and connects to the ready pod IPs itself, in
//! turn. It drops a deleted pod at its first refresh after the endpoint
//! turned not ready, up to one interval late.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use k8s_openapi::{List, api::discovery::v1::EndpointSlice};
use observer_proto::UnixNanos;

use super::{
    Choice, Drops, Router, RouterDrop, RouterError, Target, Task, Traffic, backend_list, workload,
};
use crate::{
    api::{NAMESPACE as SERVICE_NAMESPACE, POD_PORT, SERVICE},
    http_client::HttpClient,
    kube::{ApiServer, KubeError, workload_pod_object},
    scenario::Lab,
};

pub const NAMESPACE: &str = "shop";
pub const OWNER: &str = "checkout";

/// The ready addresses the Service's slices list.
fn ready(slices: &List<EndpointSlice>) -> BTreeSet<Ipv4Addr> {
    slices
        .items
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse().ok())
        .collect()
}

fn addresses(ips: &BTreeSet<Ipv4Addr>) -> Vec<SocketAddrV4> {
    ips.iter()
        .map(|ip| SocketAddrV4::new(*ip, POD_PORT))
        .collect()
}

/// Starts the balancer in a new pod on node `node`, registered in the API
/// as `shop/checkout`, refreshing every `refresh`. It lists from the API
/// double on the control plane's loopback (where the double listens); its
/// traffic leaves from its pod.
pub async fn start(
    lab: &Lab,
    api: &ApiServer,
    node: usize,
    refresh: Duration,
) -> Result<Router, RouterError> {
    let net = lab.cluster.add_pod(node, "balancer")?;
    let info = lab.nodes()[node].clone();
    api.double()
        .apply(&workload_pod_object(NAMESPACE, OWNER, &info, net.ip))
        .map_err(KubeError::from)?;
    let router = workload(NAMESPACE, OWNER, &info.name);
    let http = HttpClient::in_netns(&lab.cluster.control_plane.path());
    let url = format!(
        "{}/apis/discovery.k8s.io/v1/namespaces/{SERVICE_NAMESPACE}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{SERVICE}",
        api.double().url()
    );
    let first: List<EndpointSlice> = http.get_json(&url).await?;
    let (targets, list) = backend_list();
    let mut known = ready(&first);
    targets.send_replace(
        known
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, POD_PORT))
            .collect(),
    );
    let drops = Drops::default();
    let name = router.name.clone();
    let recorded = drops.clone();
    let task = Task(tokio::spawn(async move {
        let mut every = tokio::time::interval(refresh);
        every.tick().await;
        loop {
            every.tick().await;
            let slices: List<EndpointSlice> = match http.get_json(&url).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("lab: {name}: listing EndpointSlices: {e}");
                    continue;
                }
            };
            let now_ready = ready(&slices);
            targets.send_replace(addresses(&now_ready));
            let at = UnixNanos::now();
            for gone in known.difference(&now_ready) {
                recorded.push(RouterDrop {
                    router: name.clone(),
                    ip: *gone,
                    drawn_delay_ms: None,
                    dropped_unix_nano: at,
                });
            }
            known = now_ready;
        }
    }));
    Ok(Router {
        info: router,
        choice: Choice::ClientSide,
        drops,
        traffic: Traffic {
            netns: net.ns.path(),
            target: Target::RoundRobin(list),
        },
        max_lag: refresh,
        _owned: Box::new((task, net)),
    })
}
