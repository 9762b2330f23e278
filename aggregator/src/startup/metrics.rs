//! What finished startup windows count, for the dashboard's startup row and
//! the alert on new pods refusing connections after ready. Labels stay
//! bounded: namespace, node and workload (its owner's name, for at most
//! [`MAX_WORKLOAD_LABELS`] workloads, then `other`); the API names pods.

use observer_proto::api::startup::StartupRecord;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[cfg(doc)]
use crate::metrics::MAX_WORKLOAD_LABELS;
use crate::metrics::WorkloadLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadRefused {
    pub namespace: String,
    pub workload: String,
    /// `true` when the new pod refused connections after ready.
    pub refused: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Workload {
    pub namespace: String,
    pub workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Node {
    pub node: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 5 ms .. ~82 s, doubling, as the deletion latencies.
fn addition_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

pub struct StartupMetrics {
    pods: Family<WorkloadRefused, Counter>,
    refused: Family<Workload, Counter>,
    workloads: WorkloadLabels,
    addition: Histograms<Node>,
    not_added: Family<Node, Counter>,
    not_watched: Counter,
}

impl Default for StartupMetrics {
    fn default() -> Self {
        Self {
            pods: Family::default(),
            refused: Family::default(),
            workloads: WorkloadLabels::default(),
            addition: Family::new_with_constructor(addition_histogram),
            not_added: Family::default(),
            not_watched: Counter::default(),
        }
    }
}

impl StartupMetrics {
    /// prometheus-client appends _total to counters.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "prestop_startup_pods",
            "New pods whose startup window ended, per namespace and workload (refused: whether they refused connections after being marked ready)",
            self.pods.clone(),
        );
        registry.register(
            "prestop_startup_refused_connections",
            "Connections new pods refused (no socket listened) within the startup window after being marked ready, per namespace and workload",
            self.refused.clone(),
        );
        registry.register(
            "prestop_startup_addition_latency_seconds",
            "Per node, from the aggregator seeing an endpoint ready until the node's dataplane selected it (T_added - T_ready; earlier additions count as 0)",
            self.addition.clone(),
        );
        registry.register(
            "prestop_startup_nodes_not_added",
            "Times a node's dataplane had not selected a new endpoint by the end of its startup window",
            self.not_added.clone(),
        );
        registry.register(
            "prestop_startup_not_watched",
            "New pods not watched because --startup-max-watched windows were open",
            self.not_watched.clone(),
        );
    }

    pub fn not_watched(&self) {
        self.not_watched.inc();
    }

    pub fn finished(&self, r: &StartupRecord) {
        let refused = r.refused_connections > 0;
        // The record names it `namespace/owner`; the namespace has its label.
        let owner = if self.workloads.admits(&r.workload) {
            r.workload
                .strip_prefix(&format!("{}/", r.namespace))
                .unwrap_or(&r.workload)
        } else {
            "other"
        };
        let workload = Workload {
            namespace: r.namespace.clone(),
            workload: owner.to_owned(),
        };
        self.pods
            .get_or_create(&WorkloadRefused {
                namespace: workload.namespace.clone(),
                workload: workload.workload.clone(),
                refused: refused.to_string(),
            })
            .inc();
        if refused {
            self.refused
                .get_or_create(&workload)
                .inc_by(r.refused_connections);
        }
        for n in &r.nodes {
            let node = Node {
                node: n.node.clone(),
            };
            if let Some(s) = n.propagation_seconds {
                self.addition.get_or_create(&node).observe(s.max(0.0));
            } else if n.not_added {
                self.not_added.get_or_create(&node).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::metrics::{MAX_WORKLOAD_LABELS, Metrics};

    use super::*;

    fn record(namespace: &str, owner: &str, refused: u64) -> StartupRecord {
        StartupRecord {
            namespace: namespace.into(),
            workload: format!("{namespace}/{owner}"),
            refused_connections: refused,
            ..StartupRecord::default()
        }
    }

    #[test]
    fn pods_and_refusals_are_counted_per_workload_up_to_the_cap() {
        let metrics = Metrics::new();
        let m = &metrics.startup;
        m.finished(&record("shop", "web", 3));
        m.finished(&record("shop", "web", 0));
        for i in 1..MAX_WORKLOAD_LABELS {
            m.finished(&record("batch", &format!("job-{i}"), 0));
        }
        // Past the cap: counted, under `other`.
        m.finished(&record("shop", "late", 2));
        m.finished(&record("shop", "web", 1));
        let text = metrics.encode();
        for series in [
            r#"prestop_startup_pods_total{namespace="shop",workload="web",refused="true"} 2"#,
            r#"prestop_startup_pods_total{namespace="shop",workload="web",refused="false"} 1"#,
            r#"prestop_startup_refused_connections_total{namespace="shop",workload="web"} 4"#,
            r#"prestop_startup_refused_connections_total{namespace="shop",workload="other"} 2"#,
            r#"prestop_startup_pods_total{namespace="batch",workload="job-1",refused="false"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        assert!(!text.contains("late"), "{text}");
    }
}
