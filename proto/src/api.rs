//! The aggregator's HTTP answers (docs/api.md): what `GET
//! /v1/recommendations` and `GET /v1/deletions` return, serialized by the
//! aggregator and read by the lab and CI tools. Every struct defaults its
//! missing fields so a reader copes with an aggregator a version ahead or
//! behind; `null` is written for an absent value, as the API always has.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{Detector, UnixNanos, UnknownDetector};

pub mod startup;

/// `GET /v1/recommendations`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Recommendation {
    pub scope: ScopeView,
    /// `None` when there are no samples at all.
    pub pre_stop_seconds: Option<u64>,
    pub quantile: f64,
    pub confidence: f64,
    pub margin_seconds: f64,
    pub samples: u64,
    /// More complete deletions needed for a full-confidence bound; 0 when enough.
    pub samples_needed: u64,
    pub window_seconds: u64,
    pub observed_p50_seconds: Option<f64>,
    pub observed_p99_seconds: Option<f64>,
    pub observed_max_seconds: Option<f64>,
    pub low_confidence: bool,
    /// The bound lies beyond what was measured: deletions still being
    /// routed at the completion timeout rank above every measured one, and
    /// `preStopSeconds` is only what the delay must be at least.
    pub at_least: bool,
    /// Deletions in the window with a node still routing at the timeout
    /// (right-censored; counted in `samples`).
    pub censored: u64,
    /// Of the node-deletions expected in the window: how many were
    /// measured, still routing at the timeout, or unknown (agent absent,
    /// restarted, or losing events), and the measured share.
    pub coverage: Coverage,
    /// The largest error (clock offset, detector precision, T0 receipt lag)
    /// added to a sample's latency before the bound, seconds.
    pub max_error_seconds: Option<f64>,
    pub reason: String,
    /// The router whose latency set the value (the pod must outlive every
    /// router that sent it new connections); `None` without samples.
    pub limiting_router: Option<RouterRef>,
    /// The measured latencies per router kind, over the same window.
    pub by_router_kind: Vec<RouterKindSummary>,
    pub lifecycle: Option<Lifecycle>,
    pub keep_alive: KeepAlive,
}

/// What sent new connections to a pod.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum RouterKind {
    /// A node's dataplane (kube-proxy or its replacement): the source is
    /// the node or a pod on it, translated by the node's DNAT.
    #[default]
    Node,
    /// A pod that connects to pod IPs itself: an ingress controller, a
    /// client-side balancer. Named by namespace and owner.
    Workload,
    /// Neither a node nor a pod: a cloud load balancer, a client outside
    /// the cluster.
    External,
}

impl RouterKind {
    pub const ALL: [Self; 3] = [Self::Node, Self::Workload, Self::External];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Workload => "workload",
            Self::External => "external",
        }
    }
}

impl fmt::Display for RouterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One router, as the API names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterRef {
    pub kind: RouterKind,
    /// The node's name; `namespace/owner` for a workload; the source
    /// address for an external router.
    pub name: String,
    /// The node the router runs on, when it runs on one.
    pub node: Option<String>,
}

/// What one router contributed to a deletion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterMeasurement {
    #[serde(flatten)]
    pub router: RouterRef,
    /// The last new connection (accepted, refused or reset) it sent to the
    /// pod after T0.
    pub last_connection_unix_nanos: Option<UnixNanos>,
    /// For a node: max(T_rules, T_last) - T0; for other routers: T_last - T0.
    pub latency_seconds: Option<f64>,
    /// The latency's error on the safe side.
    pub error_seconds: Option<f64>,
    pub class: Option<NodeClass>,
    pub late_connections: u64,
    pub refused_connections: u64,
}

/// Measured latencies of one router kind over a recommendation's window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterKindSummary {
    pub kind: RouterKind,
    /// Deletions in which a router of this kind was measured.
    pub samples: u64,
    pub observed_p50_seconds: Option<f64>,
    pub observed_p99_seconds: Option<f64>,
    pub observed_max_seconds: Option<f64>,
}

/// Node-deletions by class, and the measured share of those expected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Coverage {
    pub expected: u64,
    pub measured: u64,
    pub still_routing: u64,
    pub unknown: u64,
    /// `measured / expected`; `None` when nothing was expected.
    pub ratio: Option<f64>,
}

impl Coverage {
    /// Counts `class` once.
    pub fn add(&mut self, class: NodeClass) {
        self.expected += 1;
        match class {
            NodeClass::Measured => self.measured += 1,
            NodeClass::StillRouting => self.still_routing += 1,
            NodeClass::Unknown => self.unknown += 1,
        }
        self.ratio = Some(self.measured as f64 / self.expected as f64);
    }

    /// The sum of two counts.
    pub fn merge(&mut self, other: &Coverage) {
        self.expected += other.expected;
        self.measured += other.measured;
        self.still_routing += other.still_routing;
        self.unknown += other.unknown;
        self.ratio = (self.expected > 0).then(|| self.measured as f64 / self.expected as f64);
    }
}

/// What is known of one expected node's routing at a deletion's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeClass {
    /// Its dataplane's removal was seen: the latency is known.
    Measured,
    /// Its agent was connected and lost nothing, and the endpoint was
    /// still a target at the completion timeout: the latency exceeds it
    /// (right-censored).
    StillRouting,
    /// No information: the agent was absent, restarted, or lost events.
    Unknown,
}

impl NodeClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Measured => "measured",
            Self::StillRouting => "stillRouting",
            Self::Unknown => "unknown",
        }
    }
}

/// The scope a recommendation answers for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScopeView {
    pub cluster: String,
    pub namespace: Option<String>,
    pub service: Option<String>,
}

/// `{"preStop":{"sleep":{"seconds":N}}}`, ready to paste under a container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Lifecycle {
    pub pre_stop: PreStop,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreStop {
    pub sleep: Sleep,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sleep {
    pub seconds: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KeepAlive {
    pub aborted_connections: u64,
    pub finding: Option<String>,
}

/// `GET /v1/deletions`: one page of summaries, newest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletionList {
    pub items: Vec<DeletionSummary>,
    /// Opaque token for the next (older) page; absent on the last page.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

/// One deletion in a list: its size does not grow with the cluster's nodes
/// (`GET /v1/deletions/{podUid}` has the per-node and per-router detail).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeletionSummary {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub services: Vec<String>,
    pub host_node: Option<String>,
    /// T0, as in [`DeletionRecord`].
    pub deletion_start_unix_nanos: UnixNanos,
    pub finished_unix_nanos: UnixNanos,
    pub complete: bool,
    pub censored: bool,
    pub propagation_seconds: Option<f64>,
    pub propagation_upper_seconds: Option<f64>,
    /// The expected node with the largest latency (upper end), when any
    /// was measured.
    pub limiting_node: Option<String>,
    pub limiting_router: Option<RouterRef>,
    /// The expected nodes counted by class.
    pub coverage: Coverage,
}

impl From<&DeletionRecord> for DeletionSummary {
    fn from(d: &DeletionRecord) -> Self {
        let limiting_node = d
            .nodes
            .iter()
            .filter(|n| n.class.is_some())
            .filter_map(|n| n.upper_seconds().map(|u| (u, n)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n.node.clone());
        DeletionSummary {
            pod_uid: d.pod_uid.clone(),
            namespace: d.namespace.clone(),
            pod_name: d.pod_name.clone(),
            services: d.services.clone(),
            host_node: d.host_node.clone(),
            deletion_start_unix_nanos: d.deletion_start_unix_nanos,
            finished_unix_nanos: d.finished_unix_nanos,
            complete: d.complete,
            censored: d.censored,
            propagation_seconds: d.propagation_seconds,
            propagation_upper_seconds: d.propagation_upper_seconds,
            limiting_node,
            limiting_router: d.limiting_router.clone(),
            coverage: d.coverage,
        }
    }
}

/// One finished (complete or timed-out) pod deletion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
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
    /// `propagationSeconds` plus the largest per-node error: the value the
    /// recommendation's bound uses. Set whenever no node is still routing,
    /// over the measured nodes.
    pub propagation_upper_seconds: Option<f64>,
    /// Some node was still routing at the completion timeout: the
    /// propagation exceeds `censoredAfterSeconds` (timeout from T0).
    pub censored: bool,
    pub censored_after_seconds: Option<f64>,
    /// Upper bound of how late the aggregator received the deletion: its
    /// receipt minus the API's whole-second request time (the request
    /// happened within the second after it). Part of every node's error.
    pub t0_lag_bound_seconds: Option<f64>,
    /// The expected nodes by class.
    pub coverage: Coverage,
    pub finished_unix_nanos: UnixNanos,
    pub nodes: Vec<NodeMeasurement>,
    /// Every router that sent the pod new connections after T0, and every
    /// expected node.
    pub routers: Vec<RouterMeasurement>,
    /// The router with the largest latency (upper end), when any was measured.
    pub limiting_router: Option<RouterRef>,
    /// Nodes that were registered at T0 and had not reported at the timeout.
    pub missing_nodes: Vec<String>,
}

/// What one node contributed to a deletion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeMeasurement {
    pub node: String,
    /// T_rules: when this node's dataplane stopped selecting the endpoint.
    pub rules_removed_unix_nanos: Option<UnixNanos>,
    /// T_last: the last new connection this node routed to the endpoint.
    pub last_connection_unix_nanos: Option<UnixNanos>,
    /// max(T_rules, T_last) - T0.
    pub latency_seconds: Option<f64>,
    /// What set T_rules, or that only connections were seen.
    pub mode: Option<Mode>,
    /// Upper bound of the error of T_rules as the node's detector timed it.
    pub detector_precision_seconds: Option<f64>,
    /// Clock uncertainty of this node's agent (half its round trip).
    pub clock_uncertainty_seconds: Option<f64>,
    /// Its agent started after the deletion and found the endpoint no
    /// longer selected, at this time: removed before it, when is unknown
    /// (the node is unknown, neither missing nor zero).
    pub removed_before_agent_start_unix_nanos: Option<UnixNanos>,
    /// What is known of this node at the end: `None` for a source that was
    /// not an expected node (an unattributed address).
    pub class: Option<NodeClass>,
    /// The latency's error on the safe side: clock uncertainty, detector
    /// precision and the T0 lag bound; `latencySeconds + errorSeconds` is
    /// what the bound uses.
    pub error_seconds: Option<f64>,
    /// New connections routed to the endpoint after T0.
    pub late_connections: u64,
    /// Connections refused or reset because the endpoint no longer listened.
    pub refused_connections: u64,
    /// Established connections the endpoint reset at shutdown.
    pub aborted_connections: u64,
}

/// A latency plus its error on the safe side (no error known: none added).
fn upper_seconds(latency: Option<f64>, error: Option<f64>) -> Option<f64> {
    latency.map(|l| l + error.unwrap_or(0.0))
}

impl NodeMeasurement {
    /// `latencySeconds + errorSeconds`: what the bound uses.
    pub fn upper_seconds(&self) -> Option<f64> {
        upper_seconds(self.latency_seconds, self.error_seconds)
    }
}

impl RouterMeasurement {
    /// `latencySeconds + errorSeconds`: what the bound uses.
    pub fn upper_seconds(&self) -> Option<f64> {
        upper_seconds(self.latency_seconds, self.error_seconds)
    }
}

/// What a node's latency rests on: the rules removal its detector saw, or
/// (`traffic`) only the connections it routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Mode {
    Rules(Detector),
    Traffic,
}

impl Mode {
    /// The name in JSON and metric labels: the detector's, or `traffic`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Rules(d) => d.as_str(),
            Self::Traffic => "traffic",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Mode> for &'static str {
    fn from(m: Mode) -> Self {
        m.as_str()
    }
}

impl FromStr for Mode {
    type Err = UnknownDetector;

    fn from_str(s: &str) -> Result<Self, UnknownDetector> {
        match s {
            "traffic" => Ok(Self::Traffic),
            _ => s.parse().map(Self::Rules),
        }
    }
}

impl TryFrom<String> for Mode {
    type Error = UnknownDetector;

    fn try_from(s: String) -> Result<Self, UnknownDetector> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_the_names_the_dashboards_use() {
        let names: Vec<_> = Detector::ALL
            .map(Mode::Rules)
            .into_iter()
            .chain([Mode::Traffic])
            .map(|m| serde_json::to_value(m).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "nftables",
                "iptables_nft",
                "iptables_legacy",
                "cilium",
                "traffic"
            ]
        );
        for m in Detector::ALL
            .map(Mode::Rules)
            .into_iter()
            .chain([Mode::Traffic])
        {
            assert_eq!(
                serde_json::from_value::<Mode>(m.as_str().into()).unwrap(),
                m
            );
        }
        assert!(serde_json::from_str::<Mode>(r#""ipvs""#).is_err());
    }

    #[test]
    fn an_answer_missing_fields_still_reads() {
        let r: Recommendation =
            serde_json::from_str(r#"{"preStopSeconds":4,"scope":{"cluster":"c"}}"#).unwrap();
        assert_eq!(r.pre_stop_seconds, Some(4));
        assert_eq!(r.scope.cluster, "c");
        assert_eq!(r.keep_alive, KeepAlive::default());
        let d: DeletionRecord =
            serde_json::from_str(r#"{"podUid":"u","nodes":[{"node":"a","mode":"traffic"}]}"#)
                .unwrap();
        assert_eq!(d.nodes[0].mode, Some(Mode::Traffic));
        assert_eq!(d.nodes[0].detector_precision_seconds, None);
        let page: DeletionList = serde_json::from_str(r#"{"items":[{"podUid":"u"}]}"#).unwrap();
        assert_eq!(page.items[0].pod_uid, "u");
        assert_eq!(page.continue_token, None);
    }

    /// The limiting node is the expected node with the largest upper end
    /// (latency plus error); an unattributed source never is.
    #[test]
    fn a_summary_names_the_limiting_node() {
        let node =
            |name: &str, latency: f64, error: f64, class: Option<NodeClass>| NodeMeasurement {
                node: name.into(),
                latency_seconds: Some(latency),
                error_seconds: Some(error),
                class,
                ..NodeMeasurement::default()
            };
        let d = DeletionRecord {
            pod_uid: "u".into(),
            nodes: vec![
                node("a", 2.0, 0.5, Some(NodeClass::Measured)),
                node("b", 2.2, 0.1, Some(NodeClass::Measured)),
                node("10.0.0.9", 9.0, 0.0, None),
                NodeMeasurement {
                    node: "c".into(),
                    class: Some(NodeClass::Unknown),
                    ..NodeMeasurement::default()
                },
            ],
            ..DeletionRecord::default()
        };
        let s = DeletionSummary::from(&d);
        assert_eq!(s.limiting_node.as_deref(), Some("a"));
        let v = serde_json::to_value(DeletionList {
            items: vec![s],
            continue_token: Some("t".into()),
        })
        .unwrap();
        assert_eq!(v["continue"], "t");
        assert!(v["items"][0].get("nodes").is_none());
    }

    #[test]
    fn routers_flatten_their_name_into_the_measurement() {
        let m = RouterMeasurement {
            router: RouterRef {
                kind: RouterKind::Workload,
                name: "ingress/nginx".into(),
                node: Some("node-1".into()),
            },
            latency_seconds: Some(2.5),
            ..RouterMeasurement::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["kind"], "workload");
        assert_eq!(v["name"], "ingress/nginx");
        assert_eq!(v["node"], "node-1");
        assert_eq!(serde_json::from_value::<RouterMeasurement>(v).unwrap(), m);
        let kinds: Vec<_> = RouterKind::ALL
            .iter()
            .map(|k| serde_json::to_value(k).unwrap())
            .collect();
        assert_eq!(kinds, ["node", "workload", "external"]);
        for k in RouterKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    fn class() -> impl proptest::strategy::Strategy<Value = NodeClass> {
        proptest::prop_oneof![
            proptest::strategy::Just(NodeClass::Measured),
            proptest::strategy::Just(NodeClass::StillRouting),
            proptest::strategy::Just(NodeClass::Unknown),
        ]
    }

    proptest::proptest! {
        /// Counting node-deletions one by one, or per deletion and then
        /// merging the deletions' counts, gives the same coverage; every
        /// node-deletion is in exactly one class and the ratio is the
        /// measured share.
        #[test]
        fn coverage_adds_up_however_it_is_counted(
            deletions in proptest::collection::vec(proptest::collection::vec(class(), 0..8), 0..20),
        ) {
            let mut one_by_one = Coverage::default();
            let mut merged = Coverage::default();
            for classes in &deletions {
                let mut per_deletion = Coverage::default();
                for c in classes {
                    one_by_one.add(*c);
                    per_deletion.add(*c);
                }
                merged.merge(&per_deletion);
            }
            let all: Vec<NodeClass> = deletions.concat();
            let of = |k| all.iter().filter(|c| **c == k).count() as u64;
            let expected = Coverage {
                expected: all.len() as u64,
                measured: of(NodeClass::Measured),
                still_routing: of(NodeClass::StillRouting),
                unknown: of(NodeClass::Unknown),
                ratio: (!all.is_empty())
                    .then(|| of(NodeClass::Measured) as f64 / all.len() as f64),
            };
            proptest::prop_assert_eq!(one_by_one, expected);
            proptest::prop_assert_eq!(merged, expected);
        }
    }

    #[test]
    fn absent_values_are_written_as_null() {
        let v = serde_json::to_value(NodeMeasurement::default()).unwrap();
        assert!(v["mode"].is_null());
        assert!(v["detectorPrecisionSeconds"].is_null());
        let v = serde_json::to_value(Recommendation::default()).unwrap();
        assert!(v["preStopSeconds"].is_null());
        assert!(v["lifecycle"].is_null());
    }
}

/// How much longer than its `max` a preStop hook (`prestop-drain`) waits
/// for the `GET /v1/drain` answer: the aggregator answers at `max`, the
/// network and its poll add a little. A grace period that holds such a hook
/// holds `max` plus this.
pub const DRAIN_ANSWER_SLACK_SECONDS: u64 = 5;

/// How a `GET /v1/drain` long-poll ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DrainOutcome {
    /// Every expected node reported the pod's removal and no router sent
    /// it a new connection for the quiet period.
    Drained,
    /// `max` passed first (or the deletion was finished incomplete).
    #[default]
    Timeout,
}

/// `GET /v1/drain`: what the aggregator knew when it answered a pod's
/// preStop hook.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DrainAnswer {
    pub outcome: DrainOutcome,
    /// How long the request waited.
    pub waited_seconds: f64,
    /// From the deletion's start (T0) to the answer; `None` when the
    /// aggregator never saw the deletion.
    pub since_deletion_seconds: Option<f64>,
    /// Nodes expected to report the pod's removal, and how many did.
    pub nodes_expected: u64,
    pub nodes_removed: u64,
    /// Expected nodes whose removal was not reported (at most 20 named).
    pub missing_nodes: Vec<String>,
    /// The quiet period the answer required: the longest over the routers
    /// that sent the pod connections since T0 (see docs/api.md).
    pub quiet_seconds: f64,
    /// Since the last new connection any router sent the pod after T0.
    pub last_connection_seconds_ago: Option<f64>,
    /// The router whose quiet period or missing removal was the last
    /// condition to be met (drained) or still unmet (timeout).
    pub limiting_router: Option<RouterRef>,
    pub reason: String,
}
