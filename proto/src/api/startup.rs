//! `GET /v1/startup`: what new pods did in their first seconds after
//! becoming ready (docs/api.md). Written by the aggregator, read by the
//! lab and prestop-check; every struct defaults its missing fields, as the
//! other answers do.

use serde::{Deserialize, Serialize};

use super::{RouterKind, RouterRef};
use crate::UnixNanos;

/// `GET /v1/startup`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartupReport {
    pub cluster: String,
    pub namespace: Option<String>,
    pub service: Option<String>,
    /// `namespace/owner`, as routers name workloads.
    pub workload: Option<String>,
    /// How long after T_ready refused connections count.
    pub window_seconds: f64,
    /// Startups whose window ended, in scope, over the kept history.
    pub new_pods: u64,
    /// One per workload that meets the thresholds.
    pub findings: Vec<StartupFinding>,
    /// One per workload whose rollout deleted old pods while nodes had not
    /// started routing to their replacements.
    pub rollout_findings: Vec<RolloutFinding>,
    pub workloads: Vec<WorkloadStartup>,
    /// Addition propagation (T_added(n) - T_ready) per node.
    pub by_node: Vec<PropagationSummary>,
    /// Time from T_ready to each router's first new connection, per kind.
    pub by_router_kind: Vec<PropagationSummary>,
    /// The newest startups in scope, newest first (at most `limit`).
    pub pods: Vec<StartupRecord>,
}

/// New pods of a workload that refused connections after being marked
/// ready: the readiness probe passes before the server listens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartupFinding {
    pub namespace: String,
    pub workload: String,
    pub services: Vec<String>,
    pub new_pods: u64,
    pub pods_refusing: u64,
    pub refused_connections: u64,
    /// The latest refusal after T_ready, seconds.
    pub refusing_for_seconds: f64,
    /// The routers that sent the refused connections.
    pub routers: Vec<RouterRef>,
    pub message: String,
}

/// A rollout that deleted old pods of a workload before every node routed
/// to their replacements: for a while fewer pods served than the rollout
/// assumed (the addition's propagation exceeded the time from the new
/// pod's ready to the old pod's deletion).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RolloutFinding {
    pub namespace: String,
    pub workload: String,
    /// New pods followed by an old pod's deletion within their window.
    pub new_pods: u64,
    /// Of them, those some node was not routing to yet at that deletion.
    pub pods_affected: u64,
    /// The most nodes not routing to one replacement at the deletion.
    pub max_nodes_affected: u64,
    pub message: String,
}

/// One workload's startups.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadStartup {
    pub namespace: String,
    pub workload: String,
    pub services: Vec<String>,
    pub new_pods: u64,
    pub pods_refusing: u64,
    pub refused_connections: u64,
    pub reset_connections: u64,
    pub addition_p50_seconds: Option<f64>,
    pub addition_p99_seconds: Option<f64>,
    /// From T_ready to the first connection the pod accepted.
    pub ready_to_first_accepted_p50_seconds: Option<f64>,
    pub ready_to_first_accepted_p99_seconds: Option<f64>,
}

/// Quantiles of one group of latencies (a node, a router kind).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PropagationSummary {
    /// The node's name for `byNode`.
    pub node: Option<String>,
    /// The router kind for `byRouterKind`.
    pub kind: Option<RouterKind>,
    pub samples: u64,
    /// Startups in which the node had not started routing by the window's
    /// end (its latency exceeds the window).
    pub not_added: u64,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

/// One new pod's startup window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartupRecord {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    /// `namespace/owner`; the pod's own name when it has no owner.
    pub workload: String,
    pub services: Vec<String>,
    pub pod_ip: String,
    pub host_node: Option<String>,
    /// T_ready: the aggregator's receipt of the EndpointSlice change that
    /// showed the endpoint ready.
    pub ready_unix_nanos: UnixNanos,
    /// The pod's Ready condition (`lastTransitionTime`, whole seconds), when
    /// the aggregator saw it.
    pub pod_ready_condition_unix_nanos: Option<UnixNanos>,
    pub window_seconds: f64,
    pub nodes: Vec<NodeAddition>,
    pub routers: Vec<RouterStartup>,
    /// New connections the pod refused (no socket listened) in the window.
    pub refused_connections: u64,
    /// Resets the pod sent for another reason in the window.
    pub reset_connections: u64,
    pub first_accepted_unix_nanos: Option<UnixNanos>,
    pub ready_to_first_accepted_seconds: Option<f64>,
    /// The latest refusal after T_ready, seconds.
    pub last_refusal_seconds: Option<f64>,
    /// The first deletion of an old pod of the same workload after T_ready
    /// (a rollout's next step), seconds after T_ready.
    pub old_pod_deleted_seconds: Option<f64>,
    /// Expected nodes not routing to this pod yet at that deletion.
    pub nodes_not_routing_at_old_deletion: u64,
}

/// When one node started routing to a new pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeAddition {
    pub node: String,
    /// When the node's dataplane started selecting the endpoint, aggregator
    /// clock; `None` when it had not by the window's end, or no agent
    /// reported for the node.
    pub rules_added_unix_nanos: Option<UnixNanos>,
    /// T_added(n) - T_ready.
    pub propagation_seconds: Option<f64>,
    /// The error of the propagation on either side: clock uncertainty and
    /// detector precision.
    pub error_seconds: Option<f64>,
    /// The clock-uncertainty part of `error_seconds`: how far the reporting
    /// agent's clock offset to the aggregator may be off.
    pub clock_uncertainty_seconds: Option<f64>,
    /// A live agent reported nothing for the node within the window: its
    /// dataplane had not started routing (or it has none for the service).
    pub not_added: bool,
}

/// What one router sent a new pod in its window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterStartup {
    #[serde(flatten)]
    pub router: RouterRef,
    pub first_connection_unix_nanos: Option<UnixNanos>,
    /// First new connection - T_ready.
    pub first_connection_seconds: Option<f64>,
    pub connections: u64,
    pub refused_connections: u64,
}
