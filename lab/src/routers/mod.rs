//! Routers other than kube-proxy: everything that sends new connections to
//! pod IPs on its own schedule. Each keeps its own backend list, drops a
//! deleted pod from it late (an ingress controller's reconcile, a
//! client-side balancer's refresh, a cloud load balancer's deregistration),
//! and records when it did: the ground truth the aggregator's per-router
//! measurement is compared with. Each runs its own client traffic through
//! itself during a rollout.

pub mod client_side;
pub mod external;
mod follow;
pub mod ingress;
pub mod report;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use observer_proto::{
    UnixNanos,
    api::{RouterKind, RouterRef},
};
use serde::Serialize;
use thiserror::Error;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    api::POD_PORT,
    client::{Client, ClientConfig, ClientKind, ClientReport, Target},
    delay::DelayDistribution,
    http_client::HttpClientError,
    kube::{ApiServer, KubeError},
    kubeproxy::Backend,
    netns::NetnsError,
    nginx::NginxError,
    scenario::Lab,
    topology::TopologyError,
};

/// The routers `--routers` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Choice {
    /// Every node's kube-proxy rules, used by a client on each node
    /// sending to the Service VIP.
    KubeProxy,
    /// Real nginx in a pod, proxying to pod IPs from an `upstream` block.
    Ingress,
    /// A pod that lists the EndpointSlices on an interval and connects to
    /// pod IPs itself.
    ClientSide,
    /// A load balancer outside the cluster (no node, no agent) sending to
    /// pod IPs.
    External,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Choice::KubeProxy => "kube-proxy",
            Choice::Ingress => "ingress",
            Choice::ClientSide => "client-side",
            Choice::External => "external",
        })
    }
}

impl Choice {
    pub const ALL: [Choice; 4] = [
        Choice::KubeProxy,
        Choice::Ingress,
        Choice::ClientSide,
        Choice::External,
    ];
}

/// The routers besides kube-proxy and how slow each is.
#[derive(Debug, Clone)]
pub struct RoutersConfig {
    pub ingress: Option<DelayDistribution>,
    /// The client-side balancer's refresh interval.
    pub client_side: Option<Duration>,
    pub external: Option<DelayDistribution>,
    /// Requests per second of each router's client.
    pub rate: f64,
    pub seed: u64,
}

#[derive(Debug, Error)]
pub enum RouterError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Nginx(#[from] NginxError),
    #[error("registering the router's pod: {0}")]
    Kube(#[from] KubeError),
    #[error("client-side balancer listing EndpointSlices: {0}")]
    List(#[from] HttpClientError),
    #[error("{router} had not dropped {ip} {waited:?} after the deletion")]
    NotDropped {
        router: String,
        ip: Ipv4Addr,
        waited: Duration,
    },
}

/// When one router stopped sending new connections to a deleted pod.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterDrop {
    pub router: String,
    pub ip: Ipv4Addr,
    /// The delay drawn for it; None where the drop follows the router's own
    /// schedule (the client-side balancer's next refresh).
    pub drawn_delay_ms: Option<f64>,
    /// When the router's new list took effect.
    pub dropped_unix_nano: UnixNanos,
}

/// A router's drops so far, shared with the task that makes them.
#[derive(Debug, Clone, Default)]
pub struct Drops(Arc<Mutex<Vec<RouterDrop>>>);

impl Drops {
    fn push(&self, drop: RouterDrop) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(drop);
    }

    fn find(&self, ip: Ipv4Addr) -> Option<RouterDrop> {
        let drops = self.0.lock().unwrap_or_else(|p| p.into_inner());
        drops.iter().rev().find(|d| d.ip == ip).cloned()
    }
}

/// A task aborted when its owner goes.
#[derive(Debug)]
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a router's client sends from and to.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub netns: PathBuf,
    pub target: Target,
}

/// One running router: its name, its truth, its traffic; its processes,
/// namespaces and tasks go when it is dropped.
pub struct Router {
    pub info: RouterRef,
    pub choice: Choice,
    drops: Drops,
    traffic: Traffic,
    /// The longest a drop may take after the deletion.
    max_lag: Duration,
    _owned: Box<dyn Send + Sync>,
}

impl Router {
    /// The client sending through this router during a rollout.
    pub fn start_client(&self, rate: f64) -> Client {
        Client::start(
            Some(self.traffic.netns.clone()),
            ClientConfig {
                target: self.traffic.target.clone(),
                kind: ClientKind::NewConnection,
                rate,
                // Bounded; the rollout stops the clients when it ends.
                duration: Duration::from_secs(600),
                concurrency: 16,
                timeout: Duration::from_secs(2),
            },
        )
    }

    pub fn drop_of(&self, ip: Ipv4Addr) -> Option<RouterDrop> {
        self.drops.find(ip)
    }
}

/// The routers of a lab besides kube-proxy, and whether kube-proxy's VIP
/// clients run.
#[derive(Default)]
pub struct Routers {
    pub kube_proxy: bool,
    pub routers: Vec<Router>,
    pub rate: f64,
}

/// How long past its largest lag a router may take to drop a pod.
const DROP_SLACK: Duration = Duration::from_secs(5);

impl Routers {
    /// Starts the configured routers in `lab`: the ingress on the first
    /// node with its client on the second, the client-side balancer on the
    /// third, the external balancer on the underlay (nodes are reused on a
    /// smaller lab). Their pods are registered in `api`.
    pub async fn start(
        lab: &Lab,
        api: &ApiServer,
        config: &RoutersConfig,
        kube_proxy: bool,
        dir: &Path,
    ) -> Result<Self, RouterError> {
        let nodes = lab.cluster.nodes.len();
        let mut routers = Vec::new();
        if let Some(delay) = config.ingress {
            routers.push(ingress::start(lab, api, (0, 1 % nodes), delay, config, dir).await?);
        }
        if let Some(refresh) = config.client_side {
            routers.push(client_side::start(lab, api, 2 % nodes, refresh).await?);
        }
        if let Some(delay) = config.external {
            routers.push(external::start(lab, delay, config)?);
        }
        Ok(Routers {
            kube_proxy,
            routers,
            rate: config.rate,
        })
    }

    /// Kube-proxy's VIP clients only (the lab without other routers).
    pub fn kube_proxy_only() -> Self {
        Routers {
            kube_proxy: true,
            routers: Vec::new(),
            rate: 0.0,
        }
    }

    /// Waits until every router has dropped `ip`; their drops.
    pub async fn wait_dropped(&self, ip: Ipv4Addr) -> Result<Vec<RouterDrop>, RouterError> {
        let mut drops = Vec::new();
        for router in &self.routers {
            let waited = router.max_lag + DROP_SLACK;
            let deadline = tokio::time::Instant::now() + waited;
            loop {
                if let Some(d) = router.drop_of(ip) {
                    drops.push(d);
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(RouterError::NotDropped {
                        router: router.info.name.clone(),
                        ip,
                        waited,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(drops)
    }

    /// One client per router, named by router.
    pub fn start_clients(&self) -> Vec<(String, Client)> {
        self.routers
            .iter()
            .map(|r| (r.info.name.clone(), r.start_client(self.rate)))
            .collect()
    }

    pub fn infos(&self) -> Vec<RouterRef> {
        self.routers.iter().map(|r| r.info.clone()).collect()
    }
}

/// Failed requests per router of one rollout.
pub type ByRouter = BTreeMap<String, ClientReport>;

/// The pod port of every backend, as routers address them.
fn addresses(backends: &[Backend]) -> Vec<SocketAddrV4> {
    backends
        .iter()
        .map(|b| SocketAddrV4::new(b.ip, POD_PORT))
        .collect()
}

/// A backend list published to the router's client.
fn backend_list() -> (
    watch::Sender<Vec<SocketAddrV4>>,
    watch::Receiver<Vec<SocketAddrV4>>,
) {
    watch::channel(Vec::new())
}

/// A workload router's name as the aggregator gives it: `namespace/owner`.
fn workload(namespace: &str, owner: &str, node: &str) -> RouterRef {
    RouterRef {
        kind: RouterKind::Workload,
        name: format!("{namespace}/{owner}"),
        node: Some(node.to_owned()),
    }
}
