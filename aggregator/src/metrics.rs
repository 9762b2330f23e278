//! Prometheus metrics. Names and labels are a contract with the dashboards
//! and alerts in deploy/; labels stay bounded (node, namespace, service,
//! mode, router kind, and at most [`MAX_WORKLOAD_LABELS`] workload names),
//! never pod names or addresses.

use observer_proto::AgentCounters;

use crate::correlate::Implausible;
use observer_proto::api::{DeletionRecord, NodeClass, RouterKind, RouterRef};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeNamespaceMode {
    pub node: String,
    pub namespace: String,
    pub mode: String,
}

/// A router as a label: its kind and a bounded name (see
/// [`Metrics::router_label`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouterLabel {
    pub kind: String,
    pub router: String,
}

/// Distinct workload names used as labels of one metric; later ones are
/// counted as `other`.
pub const MAX_WORKLOAD_LABELS: usize = 50;

/// Workload names in use as the labels of one metric: the first
/// [`MAX_WORKLOAD_LABELS`] keep their name, later ones are `other`.
#[derive(Debug, Default)]
pub struct WorkloadLabels {
    used: Mutex<HashSet<String>>,
}

impl WorkloadLabels {
    /// Whether the workload `name` (`namespace/owner`) has a label of its
    /// own: it has one already, or fewer than the cap are in use.
    pub fn admits(&self, name: &str) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.contains(name) || used.len() < MAX_WORKLOAD_LABELS {
            used.insert(name.to_owned());
            true
        } else {
            false
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeNamespace {
    pub node: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceService {
    pub namespace: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceOutcome {
    pub namespace: String,
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 5 ms .. ~82 s, doubling: propagation ranges from sub-second (small
/// clusters) to tens of seconds (large ones, slow proxies).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// 1 ms .. ~16 s: report lag is normally the batching interval.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    pub registry: Registry,
    pub propagation_latency: HistogramFamily<NodeNamespaceMode>,
    pub control_plane_latency: HistogramFamily<NamespaceLabel>,
    pub late_connections: Family<NodeNamespace, Counter>,
    pub refused_connections: Family<NodeNamespace, Counter>,
    pub keepalive_aborted: Family<NodeNamespace, Counter>,
    pub agents_connected: Gauge,
    pub agent_events_lost: Family<NodeLabel, Counter>,
    pub agent_observations_dropped: Family<NodeLabel, Counter>,
    pub report_lag: Histogram,
    pub store_deletions: Gauge,
    pub recommendation_seconds: Family<NamespaceService, Gauge<f64, AtomicU64>>,
    pub recommendation_samples: Family<NamespaceService, Gauge>,
    pub deletions: Family<NamespaceOutcome, Counter>,
    pub nodes_missing: Family<NodeLabel, Counter>,
    pub nodes_still_routing: Family<NodeLabel, Counter>,
    pub observations_rejected: Family<ReasonLabel, Counter>,
    pub router_latency: RouterLatency,
    pub token_reviews: Family<ReasonLabel, Counter>,
    pub auth_refusals: Family<ReasonLabel, Counter>,
    pub startup: crate::startup::metrics::StartupMetrics,
    pub drains: Family<OutcomeLabel, Counter>,
    pub drain_wait: HistogramFamily<OutcomeLabel>,
}

/// Latency per router, labelled by kind and a bounded name.
pub struct RouterLatency {
    family: HistogramFamily<RouterLabel>,
    workloads: WorkloadLabels,
}

impl RouterLatency {
    pub fn observe(&self, router: &RouterRef, seconds: f64) {
        self.family
            .get_or_create(&self.label(router))
            .observe(seconds);
    }

    /// The label of a router: a node by name, a workload by name while
    /// fewer than [`MAX_WORKLOAD_LABELS`] are in use (else `other`), every
    /// external router as `external` (addresses are unbounded).
    fn label(&self, r: &RouterRef) -> RouterLabel {
        let router = match r.kind {
            RouterKind::Node => r.name.clone(),
            RouterKind::External => "external".to_owned(),
            RouterKind::Workload if self.workloads.admits(&r.name) => r.name.clone(),
            RouterKind::Workload => "other".to_owned(),
        };
        RouterLabel {
            kind: r.kind.as_str().to_owned(),
            router,
        }
    }
}

impl Default for RouterLatency {
    fn default() -> Self {
        Self {
            family: Family::new_with_constructor(latency_histogram),
            workloads: WorkloadLabels::default(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            propagation_latency: Family::new_with_constructor(latency_histogram),
            control_plane_latency: Family::new_with_constructor(latency_histogram),
            late_connections: Family::default(),
            refused_connections: Family::default(),
            keepalive_aborted: Family::default(),
            agents_connected: Gauge::default(),
            agent_events_lost: Family::default(),
            agent_observations_dropped: Family::default(),
            report_lag: lag_histogram(),
            store_deletions: Gauge::default(),
            recommendation_seconds: Family::default(),
            recommendation_samples: Family::default(),
            deletions: Family::default(),
            nodes_missing: Family::default(),
            nodes_still_routing: Family::default(),
            observations_rejected: Family::default(),
            router_latency: RouterLatency::default(),
            token_reviews: Family::default(),
            auth_refusals: Family::default(),
            startup: crate::startup::metrics::StartupMetrics::default(),
            drains: Family::default(),
            drain_wait: Family::new_with_constructor(latency_histogram),
            registry: Registry::default(),
        };
        m.register_deletion_metrics(&mut registry);
        m.register_service_metrics(&mut registry);
        m.register_auth_metrics(&mut registry);
        m.startup.register(&mut registry);
        m.register_drain_metrics(&mut registry);
        Self { registry, ..m }
    }

    /// What finished deletions measure. prometheus-client appends _total
    /// to counters.
    fn register_deletion_metrics(&self, registry: &mut Registry) {
        registry.register(
            "prestop_propagation_latency_seconds",
            "Per-node endpoint propagation latency of a pod deletion: max(T_rules, T_last) - T0",
            self.propagation_latency.clone(),
        );
        registry.register(
            "prestop_router_latency_seconds",
            "Latency of each router of a pod deletion (kind: node, workload, external; router: the node, namespace/owner of a workload or other past the cap, external for every external router)",
            self.router_latency.family.clone(),
        );
        registry.register(
            "prestop_control_plane_latency_seconds",
            "From deletion start until the EndpointSlice showed the endpoint terminating",
            self.control_plane_latency.clone(),
        );
        registry.register(
            "prestop_late_connections",
            "New connections routed to an endpoint after its deletion started",
            self.late_connections.clone(),
        );
        registry.register(
            "prestop_refused_connections",
            "Connections refused or reset because the deleted endpoint no longer listened",
            self.refused_connections.clone(),
        );
        registry.register(
            "prestop_keepalive_aborted_connections",
            "Established connections reset by a deleted endpoint at shutdown",
            self.keepalive_aborted.clone(),
        );
        registry.register(
            "prestop_deletions",
            "Finished deletions by outcome (censored: some node still routed to the pod at the completion timeout; incomplete: some node's routing is unknown)",
            self.deletions.clone(),
        );
        registry.register(
            "prestop_nodes_missing",
            "Times a node's routing to a deleted pod was unknown at the end (agent absent, restarted or losing events)",
            self.nodes_missing.clone(),
        );
        registry.register(
            "prestop_nodes_still_routing",
            "Times a node, its agent healthy, still routed to a deleted pod at the completion timeout",
            self.nodes_still_routing.clone(),
        );
        registry.register(
            "prestop_observations_rejected",
            "Observations refused as implausible (reason: future, before_deletion, clock_offset)",
            self.observations_rejected.clone(),
        );
    }

    /// Token reviews and refused callers (agents and HTTP readers).
    fn register_auth_metrics(&self, registry: &mut Registry) {
        registry.register(
            "prestop_token_reviews",
            "TokenReviews asked of the API server (reason: authenticated, rejected, unavailable)",
            self.token_reviews.clone(),
        );
        registry.register(
            "prestop_auth_refusals",
            "Calls refused (reason: unauthenticated, forbidden, review_unavailable, starting)",
            self.auth_refusals.clone(),
        );
    }

    /// The adaptive drain's answers (`/v1/drain`).
    fn register_drain_metrics(&self, registry: &mut Registry) {
        registry.register(
            "prestop_drains",
            "Drain requests by outcome (drained, timeout; refused: bad token or another pod; busy: --max-drain-waits reached)",
            self.drains.clone(),
        );
        registry.register(
            "prestop_drain_wait_seconds",
            "How long drain requests waited, by outcome",
            self.drain_wait.clone(),
        );
    }

    /// One answered drain request. No namespace label: a refused caller
    /// could name any.
    pub fn drain_answered(&self, outcome: &str, waited: std::time::Duration) {
        let labels = OutcomeLabel {
            outcome: outcome.into(),
        };
        self.drains.get_or_create(&labels).inc();
        self.drain_wait
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
    }

    /// The agents, the reports, the store and the recommendations.
    fn register_service_metrics(&self, registry: &mut Registry) {
        registry.register(
            "prestop_agents_connected",
            "Agents with an open endpoint subscription",
            self.agents_connected.clone(),
        );
        registry.register(
            "prestop_agent_events_lost",
            "Kernel events agents reported lost (ring buffer full)",
            self.agent_events_lost.clone(),
        );
        registry.register(
            "prestop_agent_observations_dropped",
            "Observations agents dropped while the aggregator was away (buffer full)",
            self.agent_observations_dropped.clone(),
        );
        registry.register(
            "prestop_report_lag_seconds",
            "From an agent sending a report until the aggregator processed it (clock-corrected)",
            self.report_lag.clone(),
        );
        registry.register(
            "prestop_store_deletions",
            "Deletions held in the store",
            self.store_deletions.clone(),
        );
        registry.register(
            "prestop_recommendation_seconds",
            "Current recommended preStop delay (namespace=\"\", service=\"\" is cluster-wide)",
            self.recommendation_seconds.clone(),
        );
        registry.register(
            "prestop_recommendation_samples",
            "Complete deletions behind the current recommendation",
            self.recommendation_samples.clone(),
        );
    }

    /// What a node's agent counted since its last report: the counters are
    /// cumulative per agent process, so only the growth is added.
    pub fn agent_counters(&self, node: &str, before: AgentCounters, now: AgentCounters) {
        let node = NodeLabel { node: node.into() };
        for (family, before, now) in [
            (&self.agent_events_lost, before.events_lost, now.events_lost),
            (
                &self.agent_observations_dropped,
                before.observations_dropped,
                now.observations_dropped,
            ),
        ] {
            let grown = now.saturating_sub(before);
            if grown > 0 {
                family.get_or_create(&node).inc_by(grown);
            }
        }
    }

    /// Everything a finished deletion counts: per-node latencies and
    /// connection losses, the control plane's latency, the outcome and the
    /// nodes that never reported.
    pub fn deletion_finished(&self, rec: &DeletionRecord) {
        let ns = &rec.namespace;
        for n in &rec.nodes {
            if let Some(l) = n.latency_seconds {
                self.propagation_latency
                    .get_or_create(&NodeNamespaceMode {
                        node: n.node.clone(),
                        namespace: ns.clone(),
                        mode: n.mode.map_or("unknown", |m| m.as_str()).into(),
                    })
                    .observe(l);
            }
            let nn = NodeNamespace {
                node: n.node.clone(),
                namespace: ns.clone(),
            };
            for (family, v) in [
                (&self.late_connections, n.late_connections),
                (&self.refused_connections, n.refused_connections),
                (&self.keepalive_aborted, n.aborted_connections),
            ] {
                if v > 0 {
                    family.get_or_create(&nn).inc_by(v);
                }
            }
        }
        for r in &rec.routers {
            if let Some(l) = r.latency_seconds {
                self.router_latency.observe(&r.router, l);
            }
        }
        if let Some(c) = rec.control_plane_seconds {
            self.control_plane_latency
                .get_or_create(&NamespaceLabel {
                    namespace: ns.clone(),
                })
                .observe(c);
        }
        let outcome = if rec.censored {
            "censored"
        } else if rec.complete {
            "complete"
        } else {
            "incomplete"
        };
        self.deletions
            .get_or_create(&NamespaceOutcome {
                namespace: ns.clone(),
                outcome: outcome.into(),
            })
            .inc();
        for n in &rec.nodes {
            let family = match n.class {
                Some(NodeClass::StillRouting) => &self.nodes_still_routing,
                Some(NodeClass::Unknown) => &self.nodes_missing,
                Some(NodeClass::Measured) | None => continue,
            };
            family
                .get_or_create(&NodeLabel {
                    node: n.node.clone(),
                })
                .inc();
        }
    }

    /// Observations refused as implausible, by reason.
    pub fn rejected(&self, reason: Implausible) {
        self.observations_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}
