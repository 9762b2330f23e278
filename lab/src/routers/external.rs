//! The external router: a load balancer outside the cluster (a namespace
//! on the underlay that is no node: no proxy, no agent) sending straight to
//! pod IPs, as AWS target-type ip or GKE NEG load balancers do. It drops a
//! pod an injected deregistration delay after its endpoint turned not
//! ready.

use std::net::Ipv4Addr;

use observer_proto::{
    UnixNanos,
    api::{RouterKind, RouterRef},
};
use tokio::sync::watch;

use super::{
    Choice, Router, RouterError, RoutersConfig, Traffic, addresses, backend_list,
    follow::{self, Apply},
};
use crate::{delay::DelayDistribution, kubeproxy::Backend, scenario::Lab};

/// Its address on the underlay, outside every node's pod CIDR.
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 250);

/// The balancer's targets, read by its client at each request.
struct Targets(watch::Sender<Vec<std::net::SocketAddrV4>>);

impl Apply for Targets {
    async fn apply(&mut self, backends: &[Backend]) -> Result<UnixNanos, String> {
        self.0.send_replace(addresses(backends));
        Ok(UnixNanos::now())
    }
}

pub fn start(
    lab: &Lab,
    delay: DelayDistribution,
    config: &RoutersConfig,
) -> Result<Router, RouterError> {
    let ns = lab.cluster.add_outside("ext", IP)?;
    let router = RouterRef {
        kind: RouterKind::External,
        name: IP.to_string(),
        node: None,
    };
    let (targets, list) = backend_list();
    let services = lab.subscribe();
    // Listed before its client can start, not when the task first runs.
    targets.send_replace(addresses(&follow::ready(&services.borrow())));
    let (task, drops) = follow::spawn(
        &router.name,
        services,
        delay,
        config.seed.wrapping_mul(7919).wrapping_add(3),
        Targets(targets),
    );
    Ok(Router {
        info: router,
        choice: Choice::External,
        drops,
        traffic: Traffic {
            netns: ns.path(),
            target: super::Target::RoundRobin(list),
        },
        max_lag: delay.max(),
        _owned: Box::new((task, ns)),
    })
}
