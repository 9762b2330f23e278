//! One new pod's startup window, from T_ready to T_ready + window: which
//! node started routing to it when (rules added), each router's first new
//! connection, and the connections the pod refused or reset while its app
//! may not have served yet. Observations are on the aggregator's clock and
//! already attributed to a router (`correlate::routers`) when they get here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use observer_proto::api::RouterRef;
use observer_proto::api::startup::{NodeAddition, RouterStartup, StartupRecord};
use observer_proto::{NewEndpoint, Observation, ResetCause, UnixNanos};

use crate::correlate::Evidence;
use crate::nodes::from_pod_kernel;
use crate::pods::PodSource;

/// A new pod as the Kubernetes watcher and the pod index know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPod {
    pub endpoint: NewEndpoint,
    /// `namespace/owner`, as routers name workloads; the pod's own name
    /// until the pod index knows it.
    pub workload: String,
    pub host_node: Option<String>,
    /// The pod's Ready condition, when the watcher saw it.
    pub ready_condition: Option<UnixNanos>,
    /// Workload and host node come from the pod index (the Pod's watch
    /// event may follow its slice's).
    pub identified: bool,
}

impl NewPod {
    /// Takes the workload and node of `pod` when it is this pod and they
    /// were not known yet.
    pub fn identify(&mut self, pod: &PodSource) {
        if !self.identified && pod.uid == self.endpoint.pod_uid {
            self.workload = pod.workload.clone();
            self.host_node = pod.node.clone();
            self.identified = true;
        }
    }
}

/// One observation as a window sees it.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    pub obs: &'a Observation,
    /// On the aggregator's clock.
    pub time: UnixNanos,
    /// The node whose agent reported it.
    pub node: &'a str,
    pub router: Option<(&'a RouterRef, Evidence)>,
    /// The node whose own address the other side has (the kubelet's probes
    /// come from the pod's node address).
    pub peer_host: Option<&'a str>,
    pub uncertainty_ns: u64,
}

/// When a node's dataplane started selecting the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Added {
    time: UnixNanos,
    error_ns: u64,
    /// The reporting agent's clock uncertainty, a part of `error_ns`.
    clock_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RouterWindow {
    first: Option<UnixNanos>,
    flows: u64,
    /// Accepted and refused: the pod's view of the same connections.
    arrived: u64,
    refused: u64,
}

/// A startup window in flight.
#[derive(Clone, Debug)]
pub struct Window {
    pub pod: NewPod,
    /// Nodes with a live agent at T_ready: each should start routing.
    expected: Arc<BTreeSet<String>>,
    length: Duration,
    /// How far before T_ready a rules addition may lie (the node's
    /// kube-proxy may see the EndpointSlice before the aggregator does).
    early_ns: i64,
    added: BTreeMap<String, Added>,
    routers: HashMap<RouterRef, RouterWindow>,
    refused: u64,
    reset: u64,
    first_accepted: Option<UnixNanos>,
    last_refusal: Option<UnixNanos>,
    /// The first deletion start (T0) of an old pod of the workload at or
    /// after T_ready.
    old_deleted: Option<UnixNanos>,
}

impl Window {
    pub fn new(
        pod: NewPod,
        expected: Arc<BTreeSet<String>>,
        length: Duration,
        early: Duration,
    ) -> Self {
        Self {
            pod,
            expected,
            length,
            early_ns: i64::try_from(early.as_nanos()).unwrap_or(i64::MAX),
            added: BTreeMap::new(),
            routers: HashMap::new(),
            refused: 0,
            reset: 0,
            first_accepted: None,
            last_refusal: None,
            old_deleted: None,
        }
    }

    /// A pod of `workload` began its deletion at `t0`: the first one from
    /// T_ready (less the settling allowance: the deletion's and the slice's
    /// watch events race) to the window's end is the rollout's next step.
    pub fn old_pod_deleted(&mut self, workload: &str, t0: UnixNanos) {
        let within = t0 >= self.ready() - self.early_ns && t0 <= self.end();
        if within && self.pod.workload == workload {
            self.old_deleted = self.old_deleted.min(Some(t0)).or(Some(t0));
        }
    }

    pub fn ready(&self) -> UnixNanos {
        self.pod.endpoint.ready
    }

    /// T_ready + the window's length.
    pub fn end(&self) -> UnixNanos {
        self.ready() + self.length
    }

    /// Folds one observation in; returns whether it counted.
    pub fn apply(&mut self, s: &Seen<'_>) -> bool {
        let (ready, end) = (self.ready(), self.end());
        if s.time > end {
            return false;
        }
        if let Observation::RulesAdded(r) = s.obs {
            if s.time < ready - self.early_ns {
                return false;
            }
            let added = Added {
                time: s.time,
                error_ns: s.uncertainty_ns.saturating_add(r.precision_ns),
                clock_ns: s.uncertainty_ns,
            };
            let first = self.added.entry(s.node.to_owned()).or_insert(added);
            if s.time < first.time {
                *first = added;
            }
            return true;
        }
        if s.time < ready || !from_pod_kernel(s.obs, s.node, self.pod.host_node.as_deref()) {
            return false;
        }
        // The kubelet's probes come from the pod's own node address: they
        // are no routed traffic, and a failing probe is not a refusal after
        // ready.
        if s.peer_host.is_some() && s.peer_host == self.pod.host_node.as_deref() {
            return false;
        }
        match s.obs {
            Observation::Accepted(_) => {
                self.first_accepted = self.first_accepted.min(Some(s.time)).or(Some(s.time));
            }
            Observation::ResetSent(c) => match c.reset_cause() {
                ResetCause::Refused => {
                    self.refused += 1;
                    self.last_refusal = self.last_refusal.max(Some(s.time));
                }
                ResetCause::DataAfterClose | ResetCause::Other => self.reset += 1,
            },
            _ => {}
        }
        if let Some((router, evidence)) = s.router {
            let w = self.routers.entry(router.clone()).or_default();
            w.first = w.first.min(Some(s.time)).or(Some(s.time));
            match evidence {
                Evidence::Flow | Evidence::Connected => w.flows += 1,
                Evidence::Accepted => w.arrived += 1,
                Evidence::Refused => {
                    w.arrived += 1;
                    w.refused += 1;
                }
            }
        }
        true
    }

    /// The finished window.
    pub fn record(self) -> StartupRecord {
        let ready = self.ready();
        let since = |t: UnixNanos| t.seconds_since(ready);
        let names: BTreeSet<&String> = self.added.keys().chain(self.expected.iter()).collect();
        let nodes = names
            .into_iter()
            .map(|node| {
                let added = self.added.get(node);
                NodeAddition {
                    node: node.clone(),
                    rules_added_unix_nanos: added.map(|a| a.time),
                    propagation_seconds: added.map(|a| since(a.time)),
                    error_seconds: added.map(|a| a.error_ns as f64 / 1e9),
                    clock_uncertainty_seconds: added.map(|a| a.clock_ns as f64 / 1e9),
                    not_added: added.is_none() && self.expected.contains(node),
                }
            })
            .collect();
        let mut routers: Vec<RouterStartup> = self
            .routers
            .into_iter()
            .map(|(router, w)| RouterStartup {
                router,
                first_connection_unix_nanos: w.first,
                first_connection_seconds: w.first.map(since),
                // A connection a node routed shows as its flow and as the
                // pod's accept or refusal: counted once.
                connections: w.flows.max(w.arrived),
                refused_connections: w.refused,
            })
            .collect();
        routers
            .sort_by(|a, b| (a.router.kind, &a.router.name).cmp(&(b.router.kind, &b.router.name)));
        // Nodes that had not added the endpoint when the old pod's deletion
        // began (never, or later).
        let not_routing = self.old_deleted.map_or(0, |t0| {
            self.expected
                .iter()
                .filter(|n| self.added.get(*n).is_none_or(|a| a.time > t0))
                .count() as u64
        });
        let e = self.pod.endpoint;
        StartupRecord {
            pod_uid: e.pod_uid,
            namespace: e.namespace,
            pod_name: e.pod_name,
            workload: self.pod.workload,
            services: e.services,
            pod_ip: e.ip.to_string(),
            host_node: self.pod.host_node,
            ready_unix_nanos: ready,
            pod_ready_condition_unix_nanos: self.pod.ready_condition,
            window_seconds: self.length.as_secs_f64(),
            nodes,
            routers,
            refused_connections: self.refused,
            reset_connections: self.reset,
            first_accepted_unix_nanos: self.first_accepted,
            ready_to_first_accepted_seconds: self.first_accepted.map(since),
            last_refusal_seconds: self.last_refusal.map(since),
            old_pod_deleted_seconds: self.old_deleted.map(since),
            nodes_not_routing_at_old_deletion: not_routing,
        }
    }
}

#[cfg(test)]
mod tests {
    use observer_proto::api::RouterKind;
    use observer_proto::{ConnEvent, Detector, RulesChange};

    use super::*;

    const READY: i64 = 1_700_000_000_000_000_000;
    const SECOND: i64 = 1_000_000_000;

    fn window() -> Window {
        let pod = NewPod {
            endpoint: NewEndpoint {
                pod_uid: "u1".into(),
                namespace: "shop".into(),
                pod_name: "web-2".into(),
                services: vec!["web".into()],
                ip: "10.244.1.9".parse().unwrap(),
                ports: vec![8080],
                ready: UnixNanos::from_nanos(READY),
            },
            workload: "shop/web".into(),
            host_node: Some("node-b".into()),
            ready_condition: Some(UnixNanos::from_seconds(READY / SECOND)),
            identified: true,
        };
        let expected = Arc::new(BTreeSet::from(["node-a".to_owned(), "node-b".to_owned()]));
        Window::new(
            pod,
            expected,
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
    }

    fn at(offset_ms: i64) -> UnixNanos {
        UnixNanos::from_nanos(READY + offset_ms * 1_000_000)
    }

    fn refused() -> Observation {
        Observation::ResetSent(ConnEvent {
            src: "10.244.0.5:40000".parse().unwrap(),
            dst: "10.244.1.9:8080".parse().unwrap(),
            time: at(0),
            close: None,
            reason: Some("NO_SOCKET".into()),
        })
    }

    fn added() -> Observation {
        Observation::RulesAdded(RulesChange {
            endpoint: "10.244.1.9:8080".parse().unwrap(),
            detector: Detector::Nftables,
            time: at(0),
            precision_ns: 1_000,
        })
    }

    fn node_a() -> RouterRef {
        RouterRef {
            kind: RouterKind::Node,
            name: "node-a".into(),
            node: Some("node-a".into()),
        }
    }

    fn seen<'a>(obs: &'a Observation, ms: i64, router: Option<&'a RouterRef>) -> Seen<'a> {
        let evidence = match obs {
            Observation::ResetSent(_) => Evidence::Refused,
            Observation::Accepted(_) => Evidence::Accepted,
            _ => Evidence::Flow,
        };
        Seen {
            obs,
            time: at(ms),
            node: "node-b",
            router: router.map(|r| (r, evidence)),
            peer_host: None,
            uncertainty_ns: 500,
        }
    }

    #[test]
    fn refusals_count_inside_the_window_only() {
        let mut w = window();
        let (obs, router) = (refused(), node_a());
        assert!(!w.apply(&seen(&obs, -1, Some(&router))), "before T_ready");
        assert!(w.apply(&seen(&obs, 0, Some(&router))), "at T_ready");
        assert!(w.apply(&seen(&obs, 2_500, Some(&router))));
        assert!(
            w.apply(&seen(&obs, 10_000, Some(&router))),
            "the window's end"
        );
        assert!(!w.apply(&seen(&obs, 10_001, Some(&router))), "after it");
        let r = w.record();
        assert_eq!(r.refused_connections, 3);
        assert_eq!(r.last_refusal_seconds, Some(10.0));
        assert_eq!(r.routers.len(), 1);
        assert_eq!(r.routers[0].router, node_a());
        assert_eq!(r.routers[0].refused_connections, 3);
        assert_eq!(r.routers[0].first_connection_seconds, Some(0.0));
    }

    #[test]
    fn a_node_adding_before_the_aggregator_saw_ready_counts_negative() {
        let mut w = window();
        let obs = added();
        let early = Seen {
            node: "node-a",
            ..seen(&obs, -1_500, None)
        };
        assert!(w.apply(&early));
        let later = Seen {
            node: "node-a",
            ..seen(&obs, 300, None)
        };
        assert!(w.apply(&later), "a later re-add counts, the first stays");
        let too_early = seen(&obs, -2_001, None);
        assert!(!w.apply(&too_early), "before the allowance");
        let r = w.record();
        let a = r.nodes.iter().find(|n| n.node == "node-a").unwrap();
        assert_eq!(a.propagation_seconds, Some(-1.5));
        assert_eq!(a.error_seconds, Some(1_500e-9));
        assert_eq!(
            a.clock_uncertainty_seconds,
            Some(500e-9),
            "the clock's part"
        );
        assert!(!a.not_added);
        let b = r.nodes.iter().find(|n| n.node == "node-b").unwrap();
        assert!(b.not_added, "expected, never added: {b:?}");
        assert_eq!(b.propagation_seconds, None);
    }

    #[test]
    fn the_kubelets_probes_from_the_pods_node_are_no_refusals() {
        let mut w = window();
        let obs = refused();
        let probe = Seen {
            peer_host: Some("node-b"),
            ..seen(&obs, 100, None)
        };
        assert!(!w.apply(&probe));
        let routed = Seen {
            peer_host: Some("node-a"),
            ..seen(&obs, 100, None)
        };
        assert!(w.apply(&routed));
        assert_eq!(w.record().refused_connections, 1);
    }

    #[test]
    fn an_old_pod_deleted_before_every_node_routes_counts_those_nodes() {
        let mut w = window();
        let obs = added();
        // node-a adds at 300 ms; node-b never: both expected.
        assert!(w.apply(&Seen {
            node: "node-a",
            ..seen(&obs, 300, None)
        }));
        w.old_pod_deleted("shop/web", at(-2_001));
        w.old_pod_deleted("shop/web", at(10_001));
        w.old_pod_deleted("shop/other", at(100));
        assert_eq!(
            w.old_deleted, None,
            "outside the window, or another workload"
        );
        w.old_pod_deleted("shop/web", at(900));
        w.old_pod_deleted("shop/web", at(-5));
        let r = w.record();
        assert_eq!(r.old_pod_deleted_seconds, Some(-0.005), "the first");
        assert_eq!(r.nodes_not_routing_at_old_deletion, 2);

        let mut w = window();
        for node in ["node-a", "node-b"] {
            assert!(w.apply(&Seen {
                node,
                ..seen(&obs, 300, None)
            }));
        }
        w.old_pod_deleted("shop/web", at(400));
        assert_eq!(w.record().nodes_not_routing_at_old_deletion, 0);
    }

    #[test]
    fn a_pod_known_only_after_its_slice_is_identified_once() {
        let mut w = window();
        w.pod.identified = false;
        w.pod.workload = "shop/web-2".into();
        w.pod.host_node = None;
        let pod = |uid: &str, workload: &str| PodSource {
            uid: uid.into(),
            workload: workload.into(),
            node: Some("node-b".into()),
        };
        w.pod.identify(&pod("other-uid", "shop/other"));
        assert_eq!(w.pod.workload, "shop/web-2", "another pod at the address");
        w.pod.identify(&pod("u1", "shop/web"));
        assert_eq!(w.pod.workload, "shop/web");
        assert_eq!(w.pod.host_node.as_deref(), Some("node-b"));
        w.pod.identify(&pod("u1", "shop/renamed"));
        assert_eq!(w.record().workload, "shop/web");
    }

    #[test]
    fn a_routed_connection_counts_once_and_the_first_accept_is_kept() {
        let mut w = window();
        let router = node_a();
        let flow = Observation::NewFlow(observer_proto::NewFlow {
            src: "10.244.0.5:40000".parse().unwrap(),
            dst: "10.244.1.9:8080".parse().unwrap(),
            original_dst: "10.96.0.10:80".parse().unwrap(),
            time: at(0),
        });
        let accepted = Observation::Accepted(ConnEvent {
            src: "10.244.0.5:40000".parse().unwrap(),
            dst: "10.244.1.9:8080".parse().unwrap(),
            time: at(0),
            close: None,
            reason: None,
        });
        assert!(w.apply(&seen(&flow, 700, Some(&router))));
        assert!(w.apply(&seen(&accepted, 701, Some(&router))));
        assert!(w.apply(&seen(&accepted, 400, Some(&router))));
        let r = w.record();
        assert_eq!(r.routers[0].connections, 2, "{:?}", r.routers);
        assert_eq!(r.routers[0].first_connection_seconds, Some(0.4));
        assert_eq!(r.ready_to_first_accepted_seconds, Some(0.4));
        assert_eq!(r.refused_connections, 0);
    }
}
