//! Correlation rules, driven through the correlator's own API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aggregator::config::Settings;
use aggregator::correlate::{
    Correlator, DeletionStart, MAX_TRAFFIC_ROUTERS, OTHER, Registration, ReportOutcome,
    Subscription,
};
use aggregator::metrics::Metrics;
use aggregator::nodes::NodeInfo;
use aggregator::pods::PodSource;
use aggregator::store::Store;
use observer_proto::api::{
    DeletionRecord, Mode, NodeClass, RouterKind, RouterMeasurement, RouterRef,
};
use observer_proto::{
    ClockEstimate, ConnEvent, Detector, NewFlow, Observation, Report, RulesChange, UnixNanos,
};

const S: i64 = 1_000_000_000;
const T0: UnixNanos = UnixNanos::from_nanos(1_700_000_000 * S);
/// The pod every test deletes (its node, a, hosts 10.0.0.0/24).
const POD: &str = "10.0.0.5";
/// A client pod on node b.
const CLIENT: &str = "10.1.0.9";

fn setup(timeout: Duration) -> (Arc<Correlator>, Arc<Store>) {
    setup_with_linger(timeout, Duration::ZERO)
}

fn setup_with_linger(timeout: Duration, linger: Duration) -> (Arc<Correlator>, Arc<Store>) {
    let store = Arc::new(Store::in_memory().unwrap());
    let c = correlator(&store, timeout, linger);
    c.set_node(
        "b".into(),
        NodeInfo {
            addresses: vec![],
            pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        },
    );
    c.set_node(
        "a".into(),
        NodeInfo {
            addresses: vec!["192.168.0.1".parse().unwrap()],
            pod_cidrs: vec!["10.0.0.0/24".parse().unwrap()],
        },
    );
    (c, store)
}

fn correlator(store: &Arc<Store>, timeout: Duration, linger: Duration) -> Arc<Correlator> {
    let settings = Arc::new(Settings {
        completion_timeout: timeout,
        shutdown_linger: linger,
        ..Settings::default()
    });
    Correlator::new(settings, Arc::clone(store), Arc::new(Metrics::new()))
}

/// Registers the agent of `node`; returns the last batch it has durable.
fn register(c: &Correlator, node: &str) -> u64 {
    c.register(
        Registration {
            agent_id: node.into(),
            node_name: node.into(),
            ..Registration::default()
        },
        T0,
    )
    .unwrap()
}

/// Registers and subscribes the agents of `nodes`: subscribed agents are
/// the nodes a deletion starting now expects reports from.
fn subscribed(c: &Arc<Correlator>, nodes: &[&str]) -> Vec<Subscription> {
    nodes
        .iter()
        .map(|node| {
            register(c, node);
            c.subscribe(node).unwrap()
        })
        .collect()
}

fn start(uid: &str, ip: &str) -> DeletionStart {
    DeletionStart {
        pod_uid: uid.into(),
        namespace: "ns".into(),
        pod_name: format!("pod-{uid}"),
        services: vec!["svc".into()],
        ip: ip.parse().unwrap(),
        ports: vec![80],
        host_node: Some("a".into()),
        received_unix_nanos: Some(T0),
        api_start_unix_nanos: Some(T0 - S / 2),
        grace_period_seconds: Some(30),
        terminating_unix_nanos: None,
    }
}

fn at(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 8080)
}

/// A connection event between [`POD`] and `peer` at `t`.
fn conn(peer: &str, t: UnixNanos) -> ConnEvent {
    ConnEvent {
        src: at(peer),
        dst: at(POD),
        time: t,
        close: None,
        reason: None,
    }
}

fn accepted(peer: &str, t: UnixNanos) -> Observation {
    Observation::Accepted(conn(peer, t))
}

fn connected(peer: &str, t: UnixNanos) -> Observation {
    Observation::Connected(conn(peer, t))
}

/// The endpoint sent a RST to `peer` for the kernel's `reason`.
fn reset_sent(reason: &str, peer: &str, t: UnixNanos) -> Observation {
    Observation::ResetSent(ConnEvent {
        reason: Some(reason.into()),
        ..conn(peer, t)
    })
}

/// A new flow from `peer` to [`POD`] at `t`.
fn new_flow(peer: &str, t: UnixNanos) -> Observation {
    Observation::NewFlow(NewFlow {
        src: at(peer),
        dst: at(POD),
        original_dst: at("10.96.0.1"),
        time: t,
    })
}

/// A rules change for `ip` at `t`, timed to within 1 ms.
fn rules(ip: &str, detector: Detector, t: UnixNanos) -> RulesChange {
    RulesChange {
        endpoint: at(ip),
        detector,
        time: t,
        precision_ns: 1_000_000,
    }
}

/// The node stopped routing to [`POD`] at `t`.
fn rules_removed(detector: Detector, t: UnixNanos) -> Observation {
    Observation::RulesRemoved(rules(POD, detector, t))
}

fn batch(agent: &str, seq: u64, observations: Vec<Observation>) -> Report {
    Report {
        agent_id: agent.into(),
        sequence: seq,
        observations,
        counters: Default::default(),
        clock: None,
        sent: T0,
    }
}

/// `agent`'s batch `seq`, received right after its latest observation (at
/// T0 at the earliest), as reports arrive after what they report.
fn report(c: &Correlator, agent: &str, seq: u64, observations: Vec<Observation>) -> ReportOutcome {
    let now = observations
        .iter()
        .map(Observation::time)
        .max()
        .map_or(T0, |t| t.max(T0));
    c.report(batch(agent, seq, observations), now).unwrap()
}

#[test]
fn latency_is_max_of_rules_and_last_connection_per_node() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    // Rules removed at +1 s, then re-added, then removed for good at +2 s;
    // a new flow routed by node a at +2.5 s is later still.
    report(
        &c,
        "a",
        1,
        vec![
            rules_removed(Detector::IptablesNft, T0 + S),
            Observation::RulesAdded(rules(POD, Detector::IptablesNft, T0 + S + S / 2)),
        ],
    );
    report(
        &c,
        "a",
        2,
        vec![
            rules_removed(Detector::IptablesNft, T0 + 2 * S),
            new_flow("10.0.0.9", T0 + 5 * S / 2),
            // Refused connection from a pod on node b, seen by the
            // destination (on node a).
            reset_sent("NO_SOCKET", "10.1.0.3", T0 + 3 * S),
            // Another endpoint: ignored.
            Observation::RulesRemoved(rules("10.0.0.6", Detector::IptablesNft, T0 + 9 * S)),
        ],
    );
    report(
        &c,
        "b",
        1,
        vec![rules_removed(Detector::Nftables, T0 + S / 2)],
    );
    // All reported, but the pod is not gone yet: still pending.
    c.tick(T0 + 3 * S);
    assert_eq!(c.pending(), 1);
    c.pod_gone("u1", T0 + 4 * S);
    assert_eq!(c.pending(), 0);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert!(rec.complete);
    // Node b's pod was refused at +3 s: b still routed to the pod then.
    assert_eq!(rec.propagation_seconds, Some(3.0));
    let a = rec.nodes.iter().find(|n| n.node == "a").unwrap();
    assert_eq!(a.rules_removed_unix_nanos, Some(T0 + 2 * S));
    assert_eq!(a.mode, Some(Mode::Rules(Detector::IptablesNft)));
    assert_eq!(a.detector_precision_seconds, Some(0.001));
    assert_eq!(a.latency_seconds, Some(2.5));
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.latency_seconds, Some(3.0));
    assert_eq!(b.refused_connections, 1);
}

#[test]
fn clock_offset_corrects_agent_times() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a"]);
    c.deletion_started(start("u1", POD), T0);
    let mut b = batch("a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    // The agent's clock is 300 ms behind the aggregator's.
    b.clock = Some(ClockEstimate {
        offset_ns: 300_000_000,
        uncertainty_ns: 2_000_000,
    });
    c.report(b, T0).unwrap();
    c.pod_gone("u1", T0 + 2 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert_eq!(rec.propagation_seconds, Some(1.3));
    assert_eq!(rec.nodes[0].clock_uncertainty_seconds, Some(0.002));
}

#[test]
fn a_node_without_information_at_the_timeout_is_unknown_and_neither_shortens_nor_lengthens() {
    let (c, store) = setup(Duration::from_secs(5));
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    report(&c, "a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    c.pod_gone("u1", T0 + S);
    c.tick(T0 + 4 * S);
    assert_eq!(c.pending(), 1, "finished before the timeout");
    c.tick(T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert!(!rec.complete && !rec.censored, "{rec:#?}");
    assert_eq!(rec.missing_nodes, ["b"]);
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(
        (b.class, b.latency_seconds),
        (Some(NodeClass::Unknown), None)
    );
    assert_eq!(rec.propagation_seconds, Some(1.0));
    assert_eq!(
        (
            rec.coverage.expected,
            rec.coverage.measured,
            rec.coverage.unknown
        ),
        (2, 1, 1)
    );
}

#[test]
fn repeated_starts_and_stored_deletions_are_not_tracked_twice() {
    let (c, _store) = setup(Duration::from_secs(60));
    let subs = subscribed(&c, &["a"]);
    c.deletion_started(start("u1", POD), T0);
    c.deletion_started(start("u1", POD), T0 + S);
    assert_eq!(c.pending(), 1);
    report(&c, "a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    c.pod_gone("u1", T0 + 2 * S);
    // A relist after it finished delivers it again: already stored.
    c.deletion_started(start("u1", POD), T0 + 3 * S);
    assert_eq!(c.pending(), 0);
    // A duplicate batch changes nothing and says so.
    assert!(report(&c, "a", 1, vec![]).duplicate);
    drop(subs);
    assert!(c.report(batch("ghost", 1, vec![]), T0).is_err());
}

#[test]
fn deletion_start_prefers_receipt_time() {
    let mut d = start("u", "10.0.0.1");
    assert_eq!(d.t0(), Some(T0));
    d.received_unix_nanos = None;
    assert_eq!(d.t0(), Some(T0 - S / 2));
}

#[test]
fn deletion_seen_before_any_agent_expects_the_agents_live_at_the_end() {
    // The aggregator just restarted: the relist finds a deletion before the
    // agents have reconnected.
    let (c, store) = setup(Duration::from_secs(60));
    c.deletion_started(start("u1", POD), T0);
    c.pod_gone("u1", T0 + S);
    c.tick(T0 + S);
    assert_eq!(c.pending(), 1, "finished with no agent at all");
    let _subs = subscribed(&c, &["a", "b"]);
    report(&c, "a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    c.tick(T0 + 2 * S);
    assert_eq!(c.pending(), 1, "node b has not reported yet");
    report(
        &c,
        "b",
        1,
        vec![rules_removed(Detector::Nftables, T0 + 2 * S)],
    );
    c.tick(T0 + 3 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert!(rec.complete);
    assert_eq!(rec.propagation_seconds, Some(2.0));
}

#[test]
fn kubelet_probes_from_the_host_node_do_not_count_as_traffic() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a"]);
    // The pod runs on node a (192.168.0.1).
    c.deletion_started(start("u1", POD), T0);
    let kubelet = "192.168.0.1";
    report(
        &c,
        "a",
        1,
        vec![
            rules_removed(Detector::Nftables, T0 + S),
            // Probes until the pod exits, seen both ways.
            accepted(kubelet, T0 + 20 * S),
            new_flow(kubelet, T0 + 20 * S),
            connected(kubelet, T0 + 20 * S),
            // A real client on node b is still counted.
            accepted(CLIENT, T0 + 2 * S),
        ],
    );
    c.pod_gone("u1", T0 + 21 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert_eq!(rec.propagation_seconds, Some(2.0), "{rec:#?}");
    let a = rec.nodes.iter().find(|n| n.node == "a").unwrap();
    assert_eq!((a.latency_seconds, a.late_connections), (Some(1.0), 0));
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.late_connections, 1);
    // Only its connections were seen: no detector, no precision.
    assert_eq!(
        (b.mode, b.detector_precision_seconds),
        (Some(Mode::Traffic), None)
    );
}

#[test]
fn late_connections_come_from_new_flows_and_accepts_without_double_counting() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    // Node b's conntrack: one flow before T0, three after, then its rules go.
    report(
        &c,
        "b",
        1,
        vec![
            new_flow(CLIENT, T0 - S),
            new_flow(CLIENT, T0 + S / 10),
            new_flow(CLIENT, T0 + S / 5),
            new_flow(CLIENT, T0 + S / 2),
            rules_removed(Detector::Nftables, T0 + S),
        ],
    );
    // The pod's node accepted two of those same connections from b after T0.
    report(
        &c,
        "a",
        1,
        vec![
            accepted(CLIENT, T0 + S / 5),
            accepted(CLIENT, T0 + S / 2),
            rules_removed(Detector::Nftables, T0 + S / 3),
        ],
    );
    c.pod_gone("u1", T0 + 2 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.late_connections, 3, "{rec:#?}");
    assert_eq!(b.latency_seconds, Some(1.0));
}

#[test]
fn flows_passing_through_the_pods_node_are_not_its_routing() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    report(
        &c,
        "b",
        1,
        vec![
            new_flow(CLIENT, T0 + 2 * S),
            rules_removed(Detector::Nftables, T0 + 2 * S),
        ],
    );
    // Node a hosts the pod: its conntrack sees b's flow forwarded to the pod.
    report(
        &c,
        "a",
        1,
        vec![
            rules_removed(Detector::Nftables, T0 + S / 2),
            new_flow(CLIENT, T0 + 2 * S),
        ],
    );
    c.pod_gone("u1", T0 + 3 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let a = rec.nodes.iter().find(|n| n.node == "a").unwrap();
    assert_eq!(a.latency_seconds, Some(0.5), "{rec:#?}");
    assert_eq!(a.late_connections, 0);
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!((b.latency_seconds, b.late_connections), (Some(2.0), 1));
}

#[test]
fn requests_on_connections_the_pod_closed_count_as_aborted() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a"]);
    c.deletion_started(start("u1", POD), T0);
    let reset = |reason: &str, t| reset_sent(reason, "10.0.0.9", t);
    report(
        &c,
        "a",
        1,
        vec![
            rules_removed(Detector::Nftables, T0 + S),
            reset("tcp_abort_on_data", T0 + 3 * S),
            reset("tcp_abort_on_data", T0 + 3 * S),
            reset("no_socket", T0 + 4 * S),
            reset("tcp_state", T0 + 4 * S),
        ],
    );
    c.pod_gone("u1", T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let a = rec.nodes.iter().find(|n| n.node == "a").unwrap();
    assert_eq!(
        (a.aborted_connections, a.refused_connections),
        (2, 1),
        "{rec:#?}"
    );
}

#[test]
fn the_pods_own_events_count_once_when_agents_share_its_kernel() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a", "b"]);
    // The pod runs on node a; b's agent runs on the same kernel (the lab)
    // and sees the pod's sockets too.
    c.deletion_started(start("u1", POD), T0);
    let pods_events = || {
        vec![
            accepted(CLIENT, T0 + 2 * S),
            reset_sent("tcp_timewait_socket", CLIENT, T0 + 3 * S),
            reset_sent("no_socket", CLIENT, T0 + 4 * S),
        ]
    };
    for (agent, seq) in [("a", 1), ("b", 1)] {
        let mut obs = pods_events();
        obs.push(rules_removed(Detector::Nftables, T0 + S));
        report(&c, agent, seq, obs);
    }
    c.pod_gone("u1", T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(
        (
            b.late_connections,
            b.aborted_connections,
            b.refused_connections
        ),
        (1, 1, 1),
        "{rec:#?}"
    );
}

#[test]
fn a_direct_connection_counts_for_its_sockets_node_when_agents_share_a_kernel() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    // A socket of node b (CLIENT is in b's pod CIDR) connects straight to
    // the pod at +3 s (socket-level load balancing): both agents run on
    // one kernel (the lab) and both see it.
    for agent in ["a", "b"] {
        report(
            &c,
            agent,
            1,
            vec![
                rules_removed(Detector::Nftables, T0 + S),
                connected(CLIENT, T0 + 3 * S),
            ],
        );
    }
    c.pod_gone("u1", T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let latency = |node: &str| {
        rec.nodes
            .iter()
            .find(|n| n.node == node)
            .and_then(|n| n.latency_seconds)
    };
    assert_eq!(
        (latency("a"), latency("b")),
        (Some(1.0), Some(3.0)),
        "{rec:#?}"
    );
}

#[test]
fn a_deletion_stays_open_after_the_pod_is_gone_to_catch_shutdown_losses() {
    let (c, store) = setup_with_linger(Duration::from_secs(60), Duration::from_secs(3));
    let _subs = subscribed(&c, &["a"]);
    c.deletion_started(start("u1", POD), T0);
    let rules = batch("a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    c.report(rules, T0 + S).unwrap();
    c.pod_gone("u1", T0 + 10 * S);
    c.tick(T0 + 11 * S);
    assert!(
        store.deletion("u1").unwrap().is_none(),
        "finished inside the linger"
    );
    // A request on a keep-alive connection the pod closed, after it exited.
    let reset = reset_sent("TCP_ABORT_ON_DATA", "10.0.0.9", T0 + 12 * S);
    c.report(batch("a", 2, vec![reset]), T0 + 12 * S).unwrap();
    c.tick(T0 + 13 * S);
    let rec = store
        .deletion("u1")
        .unwrap()
        .expect("finished after the linger");
    assert!(rec.complete);
    let a = rec.nodes.iter().find(|n| n.node == "a").unwrap();
    assert_eq!(a.aborted_connections, 1);
}

#[test]
fn reports_that_arrive_before_the_deletion_is_known_are_kept() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a"]);
    // After a restart, an agent resends what it buffered before the
    // aggregator has relisted the pod.
    let rules = batch("a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    c.report(rules, T0 + 2 * S).unwrap();
    c.deletion_started(start("u1", POD), T0 + 3 * S);
    c.pod_gone("u1", T0 + 4 * S);
    let rec = store.deletion("u1").unwrap().expect("finished");
    assert!(rec.complete, "{rec:#?}");
    assert_eq!(rec.propagation_seconds, Some(1.0));
}

#[test]
fn checkpoints_persist_later_changes_and_a_restored_correlator_carries_on() {
    let (c, store) = setup(Duration::from_secs(60));
    let subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    let flow = |t| new_flow(CLIENT, t);
    let rules = |t| rules_removed(Detector::Nftables, t);
    // b's accumulator changes, is checkpointed, changes again, is
    // checkpointed again, changes a third time and is not.
    let ack = |seq, obs| report(&c, "b", seq, obs);
    assert_eq!(ack(1, vec![flow(T0 + S / 10)]).acknowledged_sequence, 0);
    let cp = c.checkpoint(T0 + S).unwrap();
    assert_eq!((cp.node_accumulators, cp.agents), (1, 1));
    assert_eq!(ack(2, vec![flow(T0 + S / 5)]).acknowledged_sequence, 1);
    // Nothing changed since: an empty checkpoint.
    c.checkpoint(T0 + S).unwrap();
    assert_eq!(c.checkpoint(T0 + S).unwrap().node_accumulators, 0);
    assert_eq!(ack(3, vec![flow(T0 + S / 2)]).acknowledged_sequence, 2);
    assert!(ack(3, vec![flow(T0 + S / 2)]).duplicate);

    // The process dies; a new correlator on the same store carries on.
    drop(subs);
    let c = correlator(&store, Duration::from_secs(60), Duration::ZERO);
    let restored = c.restore(T0 + 2 * S).unwrap();
    assert_eq!(
        (
            restored.deletions,
            restored.agents,
            restored.node_accumulators
        ),
        (1, 1, 1)
    );
    assert_eq!(c.pending(), 1);
    register(&c, "a");
    assert_eq!(register(&c, "b"), 2, "durable up to batch 2");
    let _subs = (c.subscribe("a").unwrap(), c.subscribe("b").unwrap());
    // b resends what was not acknowledged (3) and an old one (2).
    assert!(!report(&c, "b", 3, vec![flow(T0 + S / 2)]).duplicate);
    assert!(report(&c, "b", 2, vec![flow(T0 + S / 5)]).duplicate);
    report(&c, "b", 4, vec![rules(T0 + S)]);
    report(&c, "a", 1, vec![rules(T0 + S / 3)]);
    c.pod_gone("u1", T0 + 2 * S);
    let rec = store.deletion("u1").unwrap().expect("finished");
    assert!(rec.complete, "{rec:#?}");
    assert_eq!(rec.deletion_start_unix_nanos, T0);
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.late_connections, 3, "{rec:#?}");
    // Node b's router kept what it routed before the restart too.
    let b = router(&rec, RouterKind::Node, "b");
    assert_eq!(b.late_connections, 3, "{rec:#?}");
    assert_eq!(b.last_connection_unix_nanos, Some(T0 + S / 2));
    assert!(store.in_flight().unwrap().pending.is_empty());
}

#[test]
fn a_restored_rules_removal_keeps_its_detector_and_precision() {
    let (c, store) = setup(Duration::from_secs(60));
    let subs = subscribed(&c, &["a"]);
    c.deletion_started(start("u1", POD), T0);
    report(
        &c,
        "a",
        1,
        vec![rules_removed(Detector::IptablesLegacy, T0 + S)],
    );
    c.checkpoint(T0 + S).unwrap();

    // The process dies; a new correlator finishes the deletion from the store.
    drop(subs);
    let c = correlator(&store, Duration::from_secs(60), Duration::ZERO);
    c.restore(T0 + 2 * S).unwrap();
    c.pod_gone("u1", T0 + 2 * S);
    let rec = store.deletion("u1").unwrap().expect("finished");
    assert!(rec.complete, "{rec:#?}");
    let a = &rec.nodes[0];
    assert_eq!(a.mode, Some(Mode::Rules(Detector::IptablesLegacy)));
    assert_eq!(a.detector_precision_seconds, Some(0.001));
    assert_eq!(a.latency_seconds, Some(1.0));
}

#[test]
fn a_healthy_node_still_routing_at_the_timeout_censors_the_deletion() {
    let (c, store) = setup(Duration::from_secs(5));
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    report(&c, "a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    // Node b's proxy never applies the removal: the pod keeps accepting
    // connections from b's client pod.
    report(
        &c,
        "a",
        2,
        vec![accepted(CLIENT, T0 + 2 * S), accepted(CLIENT, T0 + 4 * S)],
    );
    c.pod_gone("u1", T0 + 4 * S);
    c.tick(T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert!(rec.censored && !rec.complete, "{rec:#?}");
    assert_eq!(rec.censored_after_seconds, Some(5.0));
    assert_eq!(rec.propagation_seconds, None);
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.class, Some(NodeClass::StillRouting));
    assert_eq!(rec.coverage.still_routing, 1);
    // The node still routing is what the pod had to outlive.
    assert_eq!(
        rec.limiting_router
            .as_ref()
            .map(|r| (r.kind, r.name.as_str())),
        Some((RouterKind::Node, "b"))
    );
    assert_eq!(
        router(&rec, RouterKind::Node, "b").class,
        Some(NodeClass::StillRouting)
    );
    // The store hands it to the bound as censored, not as a latency.
    let samples = store.samples(&Default::default(), T0 - 3600 * S).unwrap();
    assert_eq!((samples.latencies.len(), samples.censored), (0, vec![5.0]));
}

/// A deletion (timeout 5 s) in which node a removed the pod at +1 s and
/// node b's client pod was still routed to it at +2 s.
fn b_routed_until_two_seconds() -> (Arc<Correlator>, Arc<Store>, Vec<Subscription>) {
    let (c, store) = setup(Duration::from_secs(5));
    let subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    report(&c, "a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    report(&c, "a", 2, vec![accepted(CLIENT, T0 + 2 * S)]);
    (c, store, subs)
}

#[test]
fn an_agent_restarted_mid_deletion_leaves_its_node_unknown_not_zero() {
    let (c, store, _subs) = b_routed_until_two_seconds();
    // b's agent restarts with a new identity: what it saw is gone.
    c.register(
        Registration {
            agent_id: "b/restarted".into(),
            node_name: "b".into(),
            ..Registration::default()
        },
        T0 + 3 * S,
    )
    .unwrap();
    let _b_again = c.subscribe("b/restarted").unwrap();
    c.pod_gone("u1", T0 + 4 * S);
    c.tick(T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.class, Some(NodeClass::Unknown), "{rec:#?}");
    assert!(!rec.censored);
    // b's evidence still counts: it routed to the pod at +2 s.
    assert_eq!(rec.propagation_seconds, Some(2.0));
    assert_eq!(rec.coverage.unknown, 1);
}

#[test]
fn lost_events_leave_the_node_unknown_for_the_deletions_in_flight() {
    let (c, store, _subs) = b_routed_until_two_seconds();
    let mut lossy = batch("b", 1, vec![]);
    lossy.counters.events_lost = 3;
    c.report(lossy, T0 + 2 * S).unwrap();
    c.tick(T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.class, Some(NodeClass::Unknown), "{rec:#?}");
    assert!(!rec.censored);
}

#[test]
fn implausible_times_are_refused_and_move_nothing() {
    let store = Arc::new(Store::in_memory().unwrap());
    let metrics = Arc::new(Metrics::new());
    let c = Correlator::new(
        Arc::new(Settings {
            shutdown_linger: Duration::ZERO,
            ..Settings::default()
        }),
        Arc::clone(&store),
        Arc::clone(&metrics),
    );
    let _subs = subscribed(&c, &["a"]);
    c.deletion_started(start("u1", POD), T0);
    let metrics_before = metrics.encode();
    // An hour in the future, and long before the deletion (grace 30 s).
    c.report(
        batch(
            "a",
            1,
            vec![
                rules_removed(Detector::Nftables, T0 + 3600 * S),
                accepted(CLIENT, T0 - 120 * S),
            ],
        ),
        T0 + S,
    )
    .unwrap();
    // A clock 10 minutes off.
    let mut off = batch("a", 2, vec![rules_removed(Detector::Nftables, T0 + S)]);
    off.clock = Some(ClockEstimate {
        offset_ns: 600 * S,
        uncertainty_ns: 0,
    });
    c.report(off, T0 + S).unwrap();
    let text = metrics.encode();
    for reason in ["future", "before_deletion", "clock_offset"] {
        let line = format!("prestop_observations_rejected_total{{reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    assert!(!metrics_before.contains("prestop_observations_rejected_total{"));
    // The honest report after them is what counts.
    let mut honest = batch("a", 3, vec![rules_removed(Detector::Nftables, T0 + 2 * S)]);
    honest.clock = Some(ClockEstimate::default());
    c.report(honest, T0 + 2 * S).unwrap();
    c.pod_gone("u1", T0 + 3 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert_eq!(rec.propagation_seconds, Some(2.0), "{rec:#?}");
}

#[test]
fn each_latency_carries_its_error_and_the_bound_uses_the_upper_end() {
    let (c, store) = setup(Duration::from_secs(60));
    let _subs = subscribed(&c, &["a"]);
    // Received at T0; the API's whole-second start is half a second earlier.
    c.deletion_started(start("u1", POD), T0);
    let mut b = batch("a", 1, vec![rules_removed(Detector::Nftables, T0 + S)]);
    b.clock = Some(ClockEstimate {
        offset_ns: 0,
        uncertainty_ns: 2_000_000,
    });
    c.report(b, T0 + S).unwrap();
    c.pod_gone("u1", T0 + 2 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    assert_eq!(rec.t0_lag_bound_seconds, Some(0.5));
    let a = &rec.nodes[0];
    // Clock 2 ms + detector 1 ms + T0 lag 500 ms.
    let error = a.error_seconds.unwrap();
    assert!((error - 0.503).abs() < 1e-9, "{error}");
    let upper = rec.propagation_upper_seconds.unwrap();
    assert!((upper - 1.503).abs() < 1e-9, "{upper}");
    assert_eq!(rec.propagation_seconds, Some(1.0));
    let samples = store.samples(&Default::default(), T0 - 3600 * S).unwrap();
    assert_eq!(samples.latencies.len(), 1);
    assert!((samples.latencies[0] - 1.503).abs() < 1e-9, "{samples:?}");
}

/// The router of `kind` named `name` in a finished deletion.
fn router<'a>(rec: &'a DeletionRecord, kind: RouterKind, name: &str) -> &'a RouterMeasurement {
    rec.routers
        .iter()
        .find(|r| r.router.kind == kind && r.router.name == name)
        .unwrap_or_else(|| panic!("no {kind} router {name} in {rec:#?}"))
}

/// An ingress controller pod on node b: it proxies to pod IPs directly.
const INGRESS: &str = "10.1.0.20";
/// A load balancer outside the cluster.
const EXTERNAL: &str = "203.0.113.7";

/// `c` knows [`INGRESS`] and [`CLIENT`] as pods on node b.
fn index_pods(c: &Correlator) {
    for (ip, uid, workload) in [
        (INGRESS, "ingress-uid", "ingress/nginx"),
        (CLIENT, "client-uid", "shop/client"),
    ] {
        c.set_pod(
            &[ip.parse().unwrap()],
            PodSource {
                uid: uid.into(),
                workload: workload.into(),
                node: Some("b".into()),
            },
        );
    }
}

/// A new flow from `peer` straight to [`POD`]'s address (no DNAT).
fn direct_flow(peer: &str, t: UnixNanos) -> Observation {
    Observation::NewFlow(NewFlow {
        original_dst: at(POD),
        ..match new_flow(peer, t) {
            Observation::NewFlow(f) => f,
            _ => unreachable!(),
        }
    })
}

#[test]
fn connections_are_attributed_to_node_workload_and_external_routers() {
    let (c, store) = setup(Duration::from_secs(60));
    index_pods(&c);
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    // Node b's conntrack: the client went through the ClusterIP (b's
    // DNAT), the ingress straight to the pod IP.
    report(
        &c,
        "b",
        1,
        vec![
            rules_removed(Detector::Nftables, T0 + S / 2),
            new_flow(CLIENT, T0 + S),
            direct_flow(INGRESS, T0 + 2 * S),
        ],
    );
    // The pod's node sees the same connections arrive, the ingress's
    // later ones, a load balancer's refused one (which its conntrack saw
    // forwarded, untranslated) and the kubelet's probe.
    report(
        &c,
        "a",
        1,
        vec![
            rules_removed(Detector::Nftables, T0 + S / 5),
            direct_flow(EXTERNAL, T0 + 4 * S),
            accepted(CLIENT, T0 + S),
            accepted(INGRESS, T0 + 3 * S),
            reset_sent("NO_SOCKET", EXTERNAL, T0 + 4 * S),
            accepted("192.168.0.1", T0 + 5 * S),
            // Before T0: no router of the deletion.
            accepted("198.51.100.1", T0 - S),
        ],
    );
    c.pod_gone("u1", T0 + 6 * S);
    let rec = store.deletion("u1").unwrap().expect("finished");
    let names: Vec<_> = rec
        .routers
        .iter()
        .map(|r| {
            (
                r.router.kind,
                r.router.name.as_str(),
                r.router.node.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            (RouterKind::Node, "a", Some("a")),
            (RouterKind::Node, "b", Some("b")),
            (RouterKind::Workload, "ingress/nginx", Some("b")),
            (RouterKind::External, EXTERNAL, None),
        ]
    );
    let a = router(&rec, RouterKind::Node, "a");
    assert_eq!(a.latency_seconds, Some(0.2), "rules only: {rec:#?}");
    assert_eq!(a.class, Some(NodeClass::Measured));
    // b's own routing ended with the client's flow, not the ingress's.
    let b = router(&rec, RouterKind::Node, "b");
    assert_eq!(b.latency_seconds, Some(1.0), "{rec:#?}");
    assert_eq!(b.late_connections, 1);
    let ingress = router(&rec, RouterKind::Workload, "ingress/nginx");
    assert_eq!(ingress.latency_seconds, Some(3.0), "{rec:#?}");
    assert_eq!(ingress.last_connection_unix_nanos, Some(T0 + 3 * S));
    let external = router(&rec, RouterKind::External, EXTERNAL);
    assert_eq!(external.latency_seconds, Some(4.0));
    assert_eq!(external.refused_connections, 1);
    assert!(external.error_seconds.unwrap() > 0.0, "T0 lag: {rec:#?}");
    assert_eq!(
        rec.limiting_router,
        Some(RouterRef {
            kind: RouterKind::External,
            name: EXTERNAL.into(),
            node: None,
        })
    );
    // The deletion covers every router.
    assert_eq!(rec.propagation_seconds, Some(4.0));
}

#[test]
fn the_slowest_router_limits_and_past_the_cap_routers_are_other() {
    let (c, store) = setup(Duration::from_secs(60));
    index_pods(&c);
    let _subs = subscribed(&c, &["a", "b"]);
    c.deletion_started(start("u1", POD), T0);
    report(&c, "b", 1, vec![direct_flow(INGRESS, T0 + S / 10)]);
    report(&c, "b", 2, vec![rules_removed(Detector::Nftables, T0 + S)]);
    // Many external clients, the last ones beyond the cap; then the ingress
    // keeps sending longest.
    let many: Vec<Observation> = (0..300)
        .map(|i| accepted(&format!("198.51.{}.{}", i / 200, i % 200 + 1), T0 + S))
        .chain([accepted(INGRESS, T0 + 7 * S / 2)])
        .chain([rules_removed(Detector::Nftables, T0 + S / 2)])
        .collect();
    report(&c, "a", 1, many);
    c.pod_gone("u1", T0 + 4 * S);
    let rec = store.deletion("u1").unwrap().expect("finished");
    let limiting = rec.limiting_router.clone().unwrap();
    assert_eq!(
        (limiting.kind, limiting.name.as_str()),
        (RouterKind::Workload, "ingress/nginx"),
        "{rec:#?}"
    );
    let external = rec
        .routers
        .iter()
        .filter(|r| r.router.kind == RouterKind::External)
        .count();
    // The ingress is one of the traffic routers the cap counts.
    let kept = MAX_TRAFFIC_ROUTERS - 1;
    assert_eq!(external, kept + 1, "{external} external routers");
    let other = router(&rec, RouterKind::External, OTHER);
    assert_eq!(other.late_connections, 300 - kept as u64);
}

#[test]
fn a_removal_before_the_agents_start_leaves_the_node_unknown_not_still_routing() {
    // b's agent (started at +3 s, the aggregator not knowing it
    // restarted) found the endpoint gone from its dataplane.
    let (c, store, _subs) = b_routed_until_two_seconds();
    report(
        &c,
        "b",
        1,
        vec![Observation::RemovedBeforeStart(rules(
            POD,
            Detector::Nftables,
            T0 + 3 * S,
        ))],
    );
    c.pod_gone("u1", T0 + 4 * S);
    c.tick(T0 + 5 * S);
    let rec = store.deletion("u1").unwrap().unwrap();
    let b = rec.nodes.iter().find(|n| n.node == "b").unwrap();
    assert_eq!(b.class, Some(NodeClass::Unknown), "{rec:#?}");
    assert_eq!(b.removed_before_agent_start_unix_nanos, Some(T0 + 3 * S));
    assert_eq!(
        b.rules_removed_unix_nanos, None,
        "no removal time is made up"
    );
    assert!(!rec.censored, "{rec:#?}");
    assert_eq!(rec.coverage.unknown, 1);
    // Its traffic evidence still counts.
    assert_eq!(rec.propagation_seconds, Some(2.0));
}
