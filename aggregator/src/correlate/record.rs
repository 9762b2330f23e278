//! A finished deletion's accumulators turned into the
//! [`DeletionRecord`] the store keeps and the API shows.

use observer_proto::UnixNanos;
use observer_proto::api::{DeletionRecord, Mode, NodeMeasurement};

use super::state::Pending;
use crate::model::NodeAccumulator;

const NANOS_PER_SECOND: f64 = 1e9;

/// Completeness against the nodes expected (set by the caller), each node's
/// latency from T0, and the full propagation when every node reported.
pub(super) fn record(p: Pending, now: UnixNanos) -> DeletionRecord {
    let complete = p.all_reported(&p.expected);
    let missing_nodes: Vec<String> = p
        .expected
        .iter()
        .filter(|n| p.nodes.get(*n).is_none_or(|a| a.rules_removed.is_none()))
        .cloned()
        .collect();
    let t0 = p.t0;
    let nodes: Vec<NodeMeasurement> = p
        .nodes
        .into_iter()
        .map(|(node, a)| measurement(node, &a, t0))
        .collect();
    let propagation_seconds = complete
        .then(|| {
            nodes
                .iter()
                .filter_map(|n| n.latency_seconds)
                .reduce(f64::max)
        })
        .flatten();
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
        complete,
        propagation_seconds,
        finished_unix_nanos: now,
        nodes,
        missing_nodes,
    }
}

fn measurement(node: String, a: &NodeAccumulator, t0: UnixNanos) -> NodeMeasurement {
    let rules = a.rules_removed;
    let latest = rules.map(|r| r.time).max(a.last_connection);
    let seconds = |ns: u64| ns as f64 / NANOS_PER_SECOND;
    NodeMeasurement {
        node,
        rules_removed_unix_nanos: rules.map(|r| r.time),
        last_connection_unix_nanos: a.last_connection,
        latency_seconds: latest.map(|t| t.seconds_since(t0)),
        mode: match rules {
            Some(r) => Some(Mode::Rules(r.detector)),
            None => a.last_connection.map(|_| Mode::Traffic),
        },
        detector_precision_seconds: rules.and_then(|r| r.precision_ns).map(seconds),
        clock_uncertainty_seconds: a.clock_uncertainty_ns.map(seconds),
        // The same connection can be seen from both ends (the source
        // node's conntrack, the pod's accept): take the larger view.
        late_connections: a.late_flows.max(a.late_accepted),
        refused_connections: a.refused,
        aborted_connections: a.aborted,
    }
}
