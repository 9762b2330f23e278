//! A pod deletion as it starts (from the Kubernetes watcher) and its
//! measurement as the correlator finishes it, the store keeps it and
//! `GET /v1/deletions` shows it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch, by the aggregator's clock.
pub type UnixNanos = i64;

/// A pod deletion as the Kubernetes watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletionStart {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub services: Vec<String>,
    pub ip: IpAddr,
    pub ports: Vec<u16>,
    pub host_node: Option<String>,
    /// When the aggregator received the watch event that showed the deletion;
    /// `None` when the deletion was already under way when the aggregator
    /// (re)listed, so the receipt time says nothing about the start.
    pub received_unix_nanos: Option<UnixNanos>,
    /// deletionTimestamp - deletionGracePeriodSeconds (whole seconds).
    pub api_start_unix_nanos: Option<UnixNanos>,
    pub grace_period_seconds: Option<i64>,
    /// When an EndpointSlice first showed the endpoint terminating (as
    /// stored for a deletion in flight: the latest known).
    pub terminating_unix_nanos: Option<UnixNanos>,
}

impl DeletionStart {
    /// The sharper receipt time when there is one, else the API's
    /// whole-second start.
    pub fn t0(&self) -> Option<UnixNanos> {
        self.received_unix_nanos.or(self.api_start_unix_nanos)
    }
}

/// One finished (complete or timed-out) pod deletion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletionRecord {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    /// Services whose EndpointSlices listed the pod.
    pub services: Vec<String>,
    pub pod_ip: String,
    /// Node that hosted the pod, when known.
    pub host_node: Option<String>,
    /// T0: when the aggregator received the watch event that showed the
    /// deletion (sharp; the latencies are measured from it).
    pub deletion_start_unix_nanos: UnixNanos,
    /// T0 as the API says: deletionTimestamp - deletionGracePeriodSeconds
    /// (whole seconds).
    pub api_deletion_start_unix_nanos: Option<UnixNanos>,
    pub grace_period_seconds: Option<i64>,
    /// When the endpoint first showed as terminating / not ready in an
    /// EndpointSlice, minus T0.
    pub control_plane_seconds: Option<f64>,
    /// Every node expected at T0 reported.
    pub complete: bool,
    /// Full-propagation latency: the largest per-node latency. Only set when
    /// complete; a missing node is never counted as zero.
    pub propagation_seconds: Option<f64>,
    pub finished_unix_nanos: UnixNanos,
    pub nodes: Vec<NodeMeasurement>,
    /// Nodes that were registered at T0 and had not reported at the timeout.
    pub missing_nodes: Vec<String>,
}

/// What one node contributed to a deletion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMeasurement {
    pub node: String,
    /// T_rules: when this node's dataplane stopped selecting the endpoint.
    pub rules_removed_unix_nanos: Option<UnixNanos>,
    /// T_last: the last new connection this node routed to the endpoint.
    pub last_connection_unix_nanos: Option<UnixNanos>,
    /// max(T_rules, T_last) - T0.
    pub latency_seconds: Option<f64>,
    /// Dataplane mode that produced T_rules (nftables, iptables_nft,
    /// iptables_legacy), or "traffic" when only connections were seen.
    pub mode: Option<String>,
    /// Clock uncertainty of this node's agent (half its round trip).
    pub clock_uncertainty_seconds: Option<f64>,
    /// New connections routed to the endpoint after T0.
    pub late_connections: u64,
    /// Connections refused or reset because the endpoint no longer listened.
    pub refused_connections: u64,
    /// Established connections the endpoint reset at shutdown.
    pub aborted_connections: u64,
}
