//! What finished startup windows count, for the dashboard's startup row and
//! the alert on new pods refusing connections after ready. Labels stay
//! bounded: namespace and node only (the API names workloads and pods).

use observer_proto::api::startup::StartupRecord;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceRefused {
    pub namespace: String,
    /// `true` when the new pod refused connections after ready.
    pub refused: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Namespace {
    pub namespace: String,
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
    pods: Family<NamespaceRefused, Counter>,
    refused: Family<Namespace, Counter>,
    addition: Histograms<Node>,
    not_added: Family<Node, Counter>,
    not_watched: Counter,
}

impl Default for StartupMetrics {
    fn default() -> Self {
        Self {
            pods: Family::default(),
            refused: Family::default(),
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
            "New pods whose startup window ended (refused: whether they refused connections after being marked ready)",
            self.pods.clone(),
        );
        registry.register(
            "prestop_startup_refused_connections",
            "Connections new pods refused (no socket listened) within the startup window after being marked ready",
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
        self.pods
            .get_or_create(&NamespaceRefused {
                namespace: r.namespace.clone(),
                refused: refused.to_string(),
            })
            .inc();
        if refused {
            self.refused
                .get_or_create(&Namespace {
                    namespace: r.namespace.clone(),
                })
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
