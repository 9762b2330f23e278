//! Routers: everything that sent a deleted pod new connections after T0,
//! each named and timed on its own, so the recommendation can say which
//! one the pod had to outlive.
//!
//! Every new connection (a new flow, a socket connect, a connection the pod
//! accepted or refused) is attributed to one router by its source address
//! and by whether a node's DNAT chose the pod:
//! - A new flow that node N's conntrack saw translated (the client asked
//!   for another address, the Service's): **node N** (its kube-proxy or
//!   replacement).
//! - A connection to the pod IP itself, without DNAT (a new flow whose
//!   original destination is the pod IP, or a socket connect to it) from
//!   a pod: that pod's **workload** (`namespace/owner`); the pod is
//!   remembered as connecting directly. From a node's address or pod range
//!   (a host-network client, which cannot be told from the node): node N.
//!   From anything else: **external** (node N only forwarded it).
//! - A connection the pod accepted or refused, from source S: a node's own
//!   address: that node; a pod remembered as connecting directly: its
//!   workload; another pod, or an address in a node's pod CIDR: that
//!   pod's node (its DNAT sent it); anything else: **external**, named by
//!   the address.
//!
//! The pod's view of a connection is attributed as the source node's
//! conntrack has shown that source so far: a workload's first connections
//! count for its node until its first direct flow is reported (one report
//! interval), and a pod on a node without an agent always counts for its
//! node. A node's latency is max(T_rules, T_last) over the connections
//! attributed to it; other routers have no rules, only T_last.

use std::collections::HashMap;
use std::net::IpAddr;

use observer_proto::api::{NodeClass, NodeMeasurement, RouterKind, RouterMeasurement, RouterRef};
use observer_proto::{Observation, ResetCause, UnixNanos};

use super::fold::UNATTRIBUTED;
use super::record::{nanos, seconds};
use crate::model::RouterAccumulator;
use crate::nodes::NodeIndex;
use crate::pods::{PodIndex, PodSource};

/// Workload and external routers kept per deletion at most; more are
/// counted under the name [`OTHER`] of their kind (node routers are
/// bounded by the cluster's nodes).
pub const MAX_TRAFFIC_ROUTERS: usize = 256;
/// The name of the routers past [`MAX_TRAFFIC_ROUTERS`].
pub const OTHER: &str = "other";

/// What a connection event says of its router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// A new flow in the source node's conntrack.
    Flow,
    /// A socket on the source node connected.
    Connected,
    /// The pod accepted it.
    Accepted,
    /// The pod refused it (no socket listened).
    Refused,
}

/// One connection event's router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Attributed {
    pub router: RouterRef,
    pub evidence: Evidence,
}

/// The router of `obs`, reported by `node`'s agent; `None` for what is no
/// new connection, and for a flow `node` only forwarded (its source lives
/// on `peer_node`, whose agent reports it).
pub(super) fn attribute(
    pods: &mut PodIndex,
    nodes: &NodeIndex,
    node: &str,
    peer_node: Option<&str>,
    obs: &Observation,
) -> Option<Attributed> {
    let (router, evidence) = match obs {
        Observation::NewFlow(_) if peer_node.is_some_and(|p| p != node) => return None,
        Observation::NewFlow(f) if f.original_dst.ip() != f.dst.ip() => {
            (node_router(node), Evidence::Flow)
        }
        Observation::NewFlow(f) => (direct(pods, nodes, node, f.src.ip()), Evidence::Flow),
        Observation::Connected(c) => (direct(pods, nodes, node, c.src.ip()), Evidence::Connected),
        Observation::Accepted(c) => (arriving(pods, nodes, c.src.ip()), Evidence::Accepted),
        Observation::ResetSent(c) if c.reset_cause() == ResetCause::Refused => {
            (arriving(pods, nodes, c.src.ip()), Evidence::Refused)
        }
        _ => return None,
    };
    Some(Attributed { router, evidence })
}

fn node_router(node: &str) -> RouterRef {
    RouterRef {
        kind: RouterKind::Node,
        name: node.to_owned(),
        node: Some(node.to_owned()),
    }
}

fn workload(pod: &PodSource) -> RouterRef {
    RouterRef {
        kind: RouterKind::Workload,
        name: pod.workload.clone(),
        node: pod.node.clone(),
    }
}

/// A connection to the pod IP itself, seen by `node`: from a pod, its
/// workload; from a node's address or pod range, `node`; from anywhere
/// else, an external router whose packets `node` only forwarded to its pod
/// (they must not stretch the node's own routing).
fn direct(pods: &mut PodIndex, nodes: &NodeIndex, node: &str, src: IpAddr) -> RouterRef {
    if let Some(pod) = pods.mark_direct(src) {
        return workload(pod);
    }
    if nodes.node_with_address(src).is_some() || nodes.node_of(src).is_some() {
        return node_router(node);
    }
    external(src)
}

fn external(src: IpAddr) -> RouterRef {
    RouterRef {
        kind: RouterKind::External,
        name: src.to_string(),
        node: None,
    }
}

/// A connection as the pod saw it arrive from `src`.
fn arriving(pods: &PodIndex, nodes: &NodeIndex, src: IpAddr) -> RouterRef {
    if let Some(n) = nodes.node_with_address(src) {
        return node_router(n);
    }
    if let Some(pod) = pods.direct(src) {
        return workload(pod);
    }
    let node = pods
        .get(src)
        .and_then(|p| p.node.as_deref())
        .or_else(|| nodes.node_of(src));
    node.map_or_else(|| external(src), node_router)
}

/// Folds one attributed connection at `t` into a deletion's routers; one
/// before T0 says nothing of routing after the deletion began.
pub(super) fn apply(
    routers: &mut HashMap<RouterRef, RouterAccumulator>,
    a: &Attributed,
    t: UnixNanos,
    t0: UnixNanos,
    uncertainty_ns: u64,
) -> bool {
    if t < t0 {
        return false;
    }
    let acc = accumulator(routers, &a.router);
    acc.last_connection = acc.last_connection.max(Some(t));
    acc.clock_uncertainty_ns = acc.clock_uncertainty_ns.max(uncertainty_ns);
    match a.evidence {
        Evidence::Flow => acc.late_flows += 1,
        Evidence::Accepted => acc.late_accepted += 1,
        Evidence::Refused => acc.refused += 1,
        Evidence::Connected => {}
    }
    true
}

/// The router's accumulator; past the cap a new workload or external
/// router is counted under [`OTHER`].
fn accumulator<'a>(
    routers: &'a mut HashMap<RouterRef, RouterAccumulator>,
    router: &RouterRef,
) -> &'a mut RouterAccumulator {
    let full = router.kind != RouterKind::Node
        && !routers.contains_key(router)
        && routers
            .keys()
            .filter(|r| r.kind != RouterKind::Node)
            .count()
            >= MAX_TRAFFIC_ROUTERS;
    let key = if full {
        RouterRef {
            kind: router.kind,
            name: OTHER.to_owned(),
            node: None,
        }
    } else {
        router.clone()
    };
    routers
        .entry(key.clone())
        .or_insert_with(|| RouterAccumulator {
            router: key,
            ..RouterAccumulator::default()
        })
}

/// The deletion's routers at its end: one per node measured or expected
/// (`nodes`, with its T_rules and class) and one per workload and
/// external router; sorted by kind, then name.
pub(super) fn measurements(
    routers: &HashMap<RouterRef, RouterAccumulator>,
    nodes: &[NodeMeasurement],
    t0: UnixNanos,
    lag_ns: i64,
) -> Vec<RouterMeasurement> {
    let empty = RouterAccumulator::default();
    let mut out: Vec<RouterMeasurement> = nodes
        .iter()
        .filter(|n| n.node != UNATTRIBUTED)
        .map(|n| {
            node_measurement(
                n,
                routers.get(&node_router(&n.node)).unwrap_or(&empty),
                t0,
                lag_ns,
            )
        })
        .collect();
    for acc in routers.values() {
        let r = &acc.router;
        if r.kind == RouterKind::Node && nodes.iter().any(|n| n.node == r.name) {
            continue;
        }
        out.push(traffic_measurement(acc, t0, lag_ns));
    }
    out.sort_by(|a, b| (a.router.kind, &a.router.name).cmp(&(b.router.kind, &b.router.name)));
    out
}

/// A node as a router: its rules removal and the connections it routed.
fn node_measurement(
    n: &NodeMeasurement,
    acc: &RouterAccumulator,
    t0: UnixNanos,
    lag_ns: i64,
) -> RouterMeasurement {
    let rules = n.rules_removed_unix_nanos;
    let latest = rules.max(acc.last_connection);
    let precision = n
        .detector_precision_seconds
        .filter(|_| rules.is_some() && rules == latest)
        .unwrap_or(0.0);
    let clock = n
        .clock_uncertainty_seconds
        .unwrap_or(0.0)
        .max(seconds(nanos(acc.clock_uncertainty_ns)));
    RouterMeasurement {
        router: node_router(&n.node),
        last_connection_unix_nanos: acc.last_connection,
        latency_seconds: latest.map(|t| t.seconds_since(t0)),
        error_seconds: latest.map(|_| clock + precision + seconds(lag_ns)),
        class: n.class,
        late_connections: acc.late_flows.max(acc.late_accepted),
        refused_connections: acc.refused,
    }
}

/// A router known by its connections only: measured by its last one.
fn traffic_measurement(acc: &RouterAccumulator, t0: UnixNanos, lag_ns: i64) -> RouterMeasurement {
    let last = acc.last_connection;
    RouterMeasurement {
        router: acc.router.clone(),
        last_connection_unix_nanos: last,
        latency_seconds: last.map(|t| t.seconds_since(t0)),
        error_seconds: last.map(|_| seconds(nanos(acc.clock_uncertainty_ns) + lag_ns)),
        class: last.map(|_| NodeClass::Measured),
        late_connections: acc.late_flows.max(acc.late_accepted),
        refused_connections: acc.refused,
    }
}

/// The router the pod had to outlive: one still routing at the timeout
/// when the deletion is censored, else the largest upper end.
pub(super) fn limiting(routers: &[RouterMeasurement], censored: bool) -> Option<RouterRef> {
    if censored {
        return routers
            .iter()
            .find(|r| r.class == Some(NodeClass::StillRouting))
            .map(|r| r.router.clone());
    }
    routers
        .iter()
        .filter_map(|r| Some((r.upper_seconds()?, r)))
        .reduce(|a, b| if b.0 > a.0 { b } else { a })
        .map(|(_, r)| r.router.clone())
}
