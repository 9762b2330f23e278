//! A finished deletion's accumulators turned into the [`DeletionRecord`]
//! the store keeps and the API shows: every expected node classified
//! (measured, still routing, unknown), each latency with its error on the
//! safe side, and the deletion right-censored when a node still routed;
//! every router with its latency, and the one that set the deletion's.

use std::collections::BTreeSet;

use observer_proto::UnixNanos;
use observer_proto::api::{Coverage, DeletionRecord, Mode, NodeClass, NodeMeasurement};

use super::routers;
use super::state::Pending;
use crate::model::{DeletionStart, NodeAccumulator};

const NANOS_PER_SECOND: f64 = 1e9;

/// `live`: the nodes whose agents are connected now.
pub(super) fn record(p: Pending, now: UnixNanos, live: &BTreeSet<String>) -> DeletionRecord {
    let t0 = p.t0;
    let lag_ns = t0_lag_bound_ns(&p.start);
    let empty = NodeAccumulator::default();
    let names: BTreeSet<&String> = p.nodes.keys().chain(p.expected.iter()).collect();
    let mut coverage = Coverage::default();
    let mut nodes = Vec::with_capacity(names.len());
    for name in names {
        let acc = p.nodes.get(name).unwrap_or(&empty);
        let class = p
            .expected
            .contains(name)
            .then(|| classify(name, acc, t0, &p.disrupted, live));
        if let Some(c) = class {
            coverage.add(c);
        }
        nodes.push(measurement(name.clone(), acc, t0, lag_ns, class));
    }
    let censored = coverage.still_routing > 0;
    let missing_nodes = nodes
        .iter()
        .filter(|n| n.class.is_some_and(|c| c != NodeClass::Measured))
        .map(|n| n.node.clone())
        .collect();
    let latest = |f: fn(&NodeMeasurement) -> Option<f64>| {
        (!censored)
            .then(|| nodes.iter().filter_map(f).reduce(f64::max))
            .flatten()
    };
    let propagation_seconds = latest(|n| n.latency_seconds);
    let propagation_upper_seconds = latest(NodeMeasurement::upper_seconds);
    let routers = routers::measurements(&p.routers, &nodes, t0, lag_ns.unwrap_or(0));
    let limiting_router = routers::limiting(&routers, censored);
    let start = p.start;
    DeletionRecord {
        pod_uid: start.pod_uid,
        namespace: start.namespace,
        pod_name: start.pod_name,
        services: start.services,
        pod_ip: start.ip.to_string(),
        host_node: start.host_node,
        deletion_start_unix_nanos: t0,
        api_deletion_start_unix_nanos: start.api_start_unix_nanos,
        grace_period_seconds: start.grace_period_seconds,
        control_plane_seconds: p.terminating.map(|t| t.seconds_since(t0)),
        complete: coverage.expected > 0 && coverage.measured == coverage.expected,
        propagation_seconds,
        propagation_upper_seconds,
        censored,
        censored_after_seconds: censored.then(|| now.seconds_since(t0)),
        t0_lag_bound_seconds: lag_ns.map(seconds),
        coverage,
        finished_unix_nanos: now,
        nodes,
        routers,
        limiting_router,
        missing_nodes,
    }
}

/// What is known of an expected node at the end. Still routing needs
/// evidence: a new connection it routed to the pod after T0 with no
/// removal since, from an agent that was connected and lost nothing.
/// Without that evidence nothing says the pod was still its target. A
/// removal before the agent's start is no timing: unknown.
fn classify(
    node: &str,
    a: &NodeAccumulator,
    t0: UnixNanos,
    disrupted: &BTreeSet<String>,
    live: &BTreeSet<String>,
) -> NodeClass {
    if a.rules_removed.is_some() {
        NodeClass::Measured
    } else if !live.contains(node) || disrupted.contains(node) || a.removed_before_start.is_some() {
        NodeClass::Unknown
    } else if a.last_connection.is_some_and(|t| t >= t0) {
        NodeClass::StillRouting
    } else {
        NodeClass::Unknown
    }
}

/// How late the aggregator can have received the deletion: the request
/// happened within the second after the API's whole-second start, so the
/// receipt minus that start bounds the lag from above. `None` when T0 is
/// the API's start itself (latencies from it are already long, never short).
fn t0_lag_bound_ns(start: &DeletionStart) -> Option<i64> {
    let (received, api) = (start.received_unix_nanos?, start.api_start_unix_nanos?);
    Some((received - api).max(0))
}

pub(super) fn seconds(ns: i64) -> f64 {
    ns as f64 / NANOS_PER_SECOND
}

/// A count of nanoseconds as a signed time difference (saturating).
pub(super) fn nanos(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn measurement(
    node: String,
    a: &NodeAccumulator,
    t0: UnixNanos,
    lag_ns: Option<i64>,
    class: Option<NodeClass>,
) -> NodeMeasurement {
    let rules = a.rules_removed;
    let latest = rules.map(|r| r.time).max(a.last_connection);
    let ns = nanos;
    // The detector's precision counts when the removal set the latency.
    let precision = rules
        .filter(|r| Some(r.time) == latest)
        .and_then(|r| r.precision_ns)
        .map_or(0, ns);
    let error_ns =
        latest.map(|_| a.clock_uncertainty_ns.map_or(0, ns) + precision + lag_ns.unwrap_or(0));
    NodeMeasurement {
        node,
        rules_removed_unix_nanos: rules.map(|r| r.time),
        last_connection_unix_nanos: a.last_connection,
        latency_seconds: latest.map(|t| t.seconds_since(t0)),
        mode: match rules {
            Some(r) => Some(Mode::Rules(r.detector)),
            None => a.last_connection.map(|_| Mode::Traffic),
        },
        detector_precision_seconds: rules.and_then(|r| r.precision_ns).map(|p| seconds(ns(p))),
        clock_uncertainty_seconds: a.clock_uncertainty_ns.map(|u| seconds(ns(u))),
        removed_before_agent_start_unix_nanos: a.removed_before_start,
        class,
        error_seconds: error_ns.map(seconds),
        // The same connection can be seen from both ends (the source
        // node's conntrack, the pod's accept): take the larger view.
        late_connections: a.late_flows.max(a.late_accepted),
        refused_connections: a.refused,
        aborted_connections: a.aborted,
    }
}
