//! End to end inside the process: API server double + real aggregator +
//! agents simulated over real gRPC sockets.

mod common;

use std::time::Duration;

use aggregator::config::Settings;
use apiserver_double::ApiServerDouble;
use apiserver_double::objects::{endpoint_slice, node, pod};
use common::lab::*;
use common::{get, get_json};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use observer_proto::v1 as pb;

const S: u64 = 1_000_000_000;

fn settings() -> Settings {
    Settings {
        cluster_name: "lab".into(),
        completion_timeout: Duration::from_secs(30),
        ..Settings::default()
    }
}

/// Deletes web-1 as Kubernetes does: the pod gets its deletionTimestamp and
/// the EndpointSlice controller marks the endpoint terminating.
fn start_deletion(c: &Cluster) {
    c.double.delete::<Pod>("shop", "web-1", 30).unwrap();
    c.double
        .update(&endpoint_slice("shop", "web", &[(&c.web1, false, true)]))
        .unwrap();
}

/// The kubelet is done: the pod object goes.
fn finish_deletion(c: &Cluster) {
    c.double.finish_deletion::<Pod>("shop", "web-1").unwrap();
}

/// Agents on node-a and node-b, both announced web-1's deletion.
async fn two_agents_see_the_deletion(
    c: &Cluster,
    agg: &aggregator::app::Running,
) -> (Agent, Agent, pb::WatchedEndpoint) {
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    start_deletion(c);
    let ep = a.next_add().await;
    assert_eq!(ep, b.next_add().await);
    (a, b, ep)
}

/// The detail (`/v1/deletions/{podUid}`) of the one finished deletion
/// `list` (`/v1/deletions` and a query) shows, once stored.
async fn finished(http: std::net::SocketAddr, list: &str) -> serde_json::Value {
    wait_until("deletion stored", || async move {
        get_json(http, list).await.1["items"]
            .as_array()
            .is_some_and(|i| !i.is_empty())
    })
    .await;
    let (_, d) = get_json(http, list).await;
    assert_eq!(d["items"].as_array().unwrap().len(), 1, "{d}");
    let uid = d["items"][0]["podUid"].as_str().expect("podUid");
    let (status, detail) = get_json(http, &format!("/v1/deletions/{uid}")).await;
    assert_eq!(status, 200, "{detail}");
    detail
}

fn node_of<'a>(d: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("no {node} in {d}"))
}

const IP: &str = "10.244.0.5";

#[tokio::test]
async fn deletion_flows_to_recommendation_and_survives_restart() {
    let c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let agg = start_aggregator(settings(), &store, Some(&c.double)).await;
    let (mut a, mut b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    assert_eq!(ep.pod_uid, c.web1.metadata.uid.clone().unwrap());
    assert_eq!(
        (ep.namespace.as_str(), ep.pod_name.as_str(), ep.ip.as_str()),
        ("shop", "web-1", "10.244.0.5")
    );
    assert_eq!(ep.services, ["web"]);
    assert_eq!(ep.ports, [8080]);
    assert_eq!(ep.grace_period_seconds, Some(30));
    let t0 = ep.deletion_start_unix_nanos;

    // node-a (hosts the pod): its rules go at +0.4 s; it accepted a
    // connection from a pod on node-b at +0.1 s and reset a keep-alive
    // connection from node-b at shutdown.
    let (_, r) = a
        .report(vec![
            accepted("10.244.1.7", "10.244.0.5", t0 + S / 10),
            rules_removed("10.244.0.5", t0 + 4 * S / 10),
            closed_reset("10.244.1.8", "10.244.0.5", t0 + 2 * S),
        ])
        .await;
    assert!(!r.duplicate);
    // node-b: routed a new flow at +0.9 s, rules gone at +1.2 s. Its batch
    // is delivered twice (a retry after a lost ack).
    let (req, r) = b
        .report(vec![
            new_flow("10.244.1.7", "10.244.0.5", t0 + 9 * S / 10),
            rules_removed("10.244.0.5", t0 + 12 * S / 10),
        ])
        .await;
    assert!(!r.duplicate);
    let again = b.client.report(req.clone()).await.unwrap().into_inner();
    assert!(again.duplicate);
    // Acknowledged once the periodic checkpoint (1 s) made it durable.
    let client = b.client.clone();
    wait_until("batch acknowledged", || {
        let (mut client, req) = (client.clone(), req.clone());
        async move {
            let r = client.report(req).await.unwrap().into_inner();
            assert!(r.duplicate);
            r.acknowledged_sequence == 1
        }
    })
    .await;

    // The kubelet finishes: the pod object goes, the deletion completes.
    finish_deletion(&c);
    assert!(
        matches!(a.next_event().await, pb::watch_event::Event::Remove(e) if e.pod_uid == ep.pod_uid)
    );

    let http = agg.http_addr;
    let d = &finished(http, "/v1/deletions?namespace=shop&service=web").await;
    assert_eq!(d["complete"], true, "{d}");
    assert_eq!(d["missingNodes"].as_array().unwrap().len(), 0);
    assert!(
        (d["propagationSeconds"].as_f64().unwrap() - 1.2).abs() < 1e-6,
        "{d}"
    );
    assert_eq!(d["hostNode"], "node-a");
    assert!(d["controlPlaneSeconds"].as_f64().is_some(), "{d}");
    let node_b = node_of(d, "node-b");
    assert_eq!(
        node_b["lateConnections"], 1,
        "duplicate batch counted twice? {d}"
    );
    assert_eq!(node_b["abortedConnections"], 1);
    assert_eq!(node_b["mode"], "nftables");
    // The detector's precision (1 µs in the test agent's reports).
    assert_eq!(node_b["detectorPrecisionSeconds"], 1e-6, "{d}");
    assert!((node_b["latencySeconds"].as_f64().unwrap() - 1.2).abs() < 1e-6);

    // The bound uses the upper end: the latency plus the node's clock
    // uncertainty, its detector's precision and how late T0 can be (the
    // receipt minus the API's whole-second start).
    let lag = d["t0LagBoundSeconds"].as_f64().unwrap();
    assert!((0.0..1.5).contains(&lag), "{d}");
    let error = node_b["errorSeconds"].as_f64().unwrap();
    let clock = node_b["clockUncertaintySeconds"].as_f64().unwrap();
    assert!((error - (lag + 1e-6 + clock)).abs() < 1e-6, "{d}");
    let upper = d["propagationUpperSeconds"].as_f64().unwrap();
    assert!((upper - (1.2 + error)).abs() < 1e-6, "{d}");
    let expected = (upper + 1.0).ceil(); // 1 s margin

    let (status, r) = get_json(http, "/v1/recommendations?namespace=shop&service=web").await;
    assert_eq!(status, 200);
    assert_eq!(r["samples"], 1);
    assert_eq!(r["preStopSeconds"], expected, "{r}");
    assert_eq!(r["coverage"]["measured"], 2, "{r}");
    assert_eq!(r["lowConfidence"], true);
    assert_eq!(r["keepAlive"]["abortedConnections"], 1);
    assert!(r["keepAlive"]["finding"].is_string());

    let (_, m) = get(http, "/metrics").await;
    for line in [
        r#"prestop_propagation_latency_seconds_count{node="node-b",namespace="shop",mode="nftables"} 1"#,
        r#"prestop_deletions_total{namespace="shop",outcome="complete"} 1"#,
        r#"prestop_late_connections_total{node="node-b",namespace="shop"} 1"#,
        r#"prestop_keepalive_aborted_connections_total{node="node-b",namespace="shop"} 1"#,
        r#"prestop_control_plane_latency_seconds_count{namespace="shop"} 1"#,
        "prestop_agents_connected 2",
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
    assert!(!m.contains("web-1"), "pod names must not be labels");

    // Restart on the same store file: the history is still there.
    drop((a, b));
    agg.shutdown().await;
    let agg = start_aggregator(settings(), &store, Some(&c.double)).await;
    let (_, r) = get_json(
        agg.http_addr,
        "/v1/recommendations?namespace=shop&service=web",
    )
    .await;
    assert_eq!(r["samples"], 1);
    assert_eq!(r["preStopSeconds"], expected);
    let (_, d) = get_json(agg.http_addr, "/v1/deletions").await;
    assert_eq!(d["items"].as_array().unwrap().len(), 1);
    agg.shutdown().await;
}

#[tokio::test]
async fn agent_that_disconnects_mid_deletion_leaves_its_node_unknown() {
    let c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let s = Settings {
        completion_timeout: Duration::from_secs(1),
        ..settings()
    };
    let agg = start_aggregator(s, &dir.path().join("store.db"), Some(&c.double)).await;
    let (mut a, b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    drop(b); // node-b's agent goes away before reporting
    a.report(vec![rules_removed(
        IP,
        ep.deletion_start_unix_nanos + S / 2,
    )])
    .await;
    finish_deletion(&c);

    let http = agg.http_addr;
    let d = &finished(http, "/v1/deletions?outcome=incomplete").await;
    assert_eq!(d["complete"], false);
    assert_eq!(d["missingNodes"], serde_json::json!(["node-b"]));
    let node_b = node_of(d, "node-b");
    assert_eq!(node_b["class"], "unknown", "{d}");
    assert_eq!(
        node_b["latencySeconds"],
        serde_json::Value::Null,
        "an unknown node is never zero latency"
    );
    // It neither shortens nor lengthens the deletion: node-a's latency
    // stands, and the coverage says what is missing.
    assert!(
        (d["propagationSeconds"].as_f64().unwrap() - 0.5).abs() < 1e-6,
        "{d}"
    );
    assert_eq!(d["censored"], false);
    let (_, r) = get_json(http, "/v1/recommendations").await;
    assert_eq!(r["samples"], 1);
    assert_eq!(r["coverage"]["unknown"], 1, "{r}");
    assert_eq!(r["coverage"]["ratio"], 0.5, "{r}");
    assert_eq!(r["lowConfidence"], true);
    assert!(
        r["reason"].as_str().unwrap().contains("Coverage is low"),
        "{r}"
    );
    let (_, m) = get(http, "/metrics").await;
    assert!(
        m.contains(r#"prestop_nodes_missing_total{node="node-b"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"prestop_deletions_total{namespace="shop",outcome="incomplete"} 1"#));
    agg.shutdown().await;
}

#[tokio::test]
async fn watch_relist_410_bookmarks_and_reconnects_neither_lose_nor_duplicate() {
    let double = ApiServerDouble::start().await.unwrap();
    double
        .create(&node("node-a", "192.168.0.1", "10.244.0.0/24"))
        .unwrap();
    let pods: Vec<Pod> = (1..=4)
        .map(|i| {
            double
                .create(&pod(
                    "shop",
                    &format!("web-{i}"),
                    &format!("10.244.0.{i}"),
                    "node-a",
                ))
                .unwrap()
        })
        .collect();
    let all = |state: &dyn Fn(usize) -> (bool, bool)| {
        let eps: Vec<(&Pod, bool, bool)> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p, state(i).0, state(i).1))
            .collect();
        endpoint_slice("shop", "web", &eps)
    };
    double.create(&all(&|_| (true, false))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("store.db"), Some(&double)).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let watches = double.watch_requests();

    // web-1: live.
    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    assert_eq!(a.next_add().await.pod_name, "web-1");

    // The watch cache expires every watcher (410): they relist, which
    // delivers web-1 again (must not be re-added) and web-2, deleted
    // meanwhile.
    double.expire_watches();
    double.delete::<Pod>("shop", "web-2", 30).unwrap();
    assert_eq!(a.next_add().await.pod_name, "web-2");

    // A dropped connection, then a bookmark: resume from the last version.
    double.disconnect_watches();
    double.bookmark();
    double.delete::<Pod>("shop", "web-3", 30).unwrap();
    assert_eq!(a.next_add().await.pod_name, "web-3");

    // web-1 finishes while the watch is expired again: the relist no longer
    // has it, which must count as gone (the deletion completes).
    a.report(vec![rules_removed("10.244.0.1", now_on_the_wire())])
        .await;
    double.expire_watches();
    double.finish_deletion::<Pod>("shop", "web-1").unwrap();
    match a.next_event().await {
        pb::watch_event::Event::Remove(e) => assert_eq!(e.pod_name, "web-1"),
        e => panic!("expected web-1 removed, got {e:?}"),
    }
    double.delete::<Pod>("shop", "web-4", 30).unwrap();
    assert_eq!(a.next_add().await.pod_name, "web-4");

    // Nothing else arrives: no duplicate adds from the relists.
    let extra = tokio::time::timeout(Duration::from_millis(700), a.next_event()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
    assert!(
        double.watch_requests() >= watches + 3,
        "watchers did not reconnect"
    );
    let (_, d) = get_json(agg.http_addr, "/v1/deletions").await;
    assert_eq!(d["items"][0]["podName"], "web-1");
    assert_eq!(d["items"][0]["complete"], true);
    assert_eq!(agg.correlator.pending(), 3);
    agg.shutdown().await;
}

/// Checkpoints only when a test asks (or at a clean shutdown), so what is
/// durable at a crash is known; no linger, so deletions finish at once.
fn manual_checkpoints() -> Settings {
    Settings {
        checkpoint_interval: Duration::from_secs(3600),
        shutdown_linger: Duration::ZERO,
        ..settings()
    }
}

fn checkpoint(agg: &aggregator::app::Running) {
    agg.correlator
        .checkpoint(observer_proto::UnixNanos::now())
        .unwrap();
}

/// A cluster and an aggregator store file that outlives the aggregator's
/// restarts; checkpoints only when a test asks.
struct Restartable {
    c: Cluster,
    _dir: tempfile::TempDir,
    store: std::path::PathBuf,
}

impl Restartable {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Restartable {
            c: cluster().await,
            store: dir.path().join("store.db"),
            _dir: dir,
        }
    }

    async fn start(&self) -> aggregator::app::Running {
        start_aggregator(manual_checkpoints(), &self.store, Some(&self.c.double)).await
    }
}

#[tokio::test]
async fn restart_mid_deletion_keeps_t0_and_what_agents_reported() {
    let lab = Restartable::new().await;
    let agg = lab.start().await;
    let (mut a, mut b, ep) = two_agents_see_the_deletion(&lab.c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;
    assert_ne!(
        t0 % S,
        0,
        "T0 is the receipt time, not the API's whole second"
    );

    // node-a (hosts the pod): accepted a connection from a pod on node-b at
    // +0.1 s, rules gone at +0.4 s, reset a keep-alive connection from
    // node-b. node-b: routed a new flow at +0.9 s, rules not gone yet.
    let (_, r) = a
        .report(vec![
            accepted("10.244.1.7", IP, t0 + S / 10),
            rules_removed(IP, t0 + 4 * S / 10),
            closed_reset("10.244.1.8", IP, t0 + 2 * S),
        ])
        .await;
    assert_eq!(r.acknowledged_sequence, 0, "no checkpoint yet");
    b.report(vec![new_flow("10.244.1.7", IP, t0 + 9 * S / 10)])
        .await;

    // A clean restart (its final checkpoint) on the same store file.
    drop((a, b));
    agg.shutdown().await;
    let agg = lab.start().await;
    assert_eq!(agg.correlator.pending(), 1, "the deletion is still pending");
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    assert_eq!((a.acknowledged, b.acknowledged), (1, 1));
    (a.seq, b.seq) = (a.acknowledged, b.acknowledged);
    let again = a.next_add().await;
    assert_eq!(again.deletion_start_unix_nanos, t0, "T0 changed");
    assert_eq!(again, ep);

    b.report(vec![rules_removed(IP, t0 + 12 * S / 10)]).await;
    finish_deletion(&lab.c);
    let d = finished(agg.http_addr, "/v1/deletions").await;
    assert_eq!(d["deletionStartUnixNanos"], t0, "{d}");
    assert_eq!(d["complete"], true, "{d}");
    assert!(
        (d["propagationSeconds"].as_f64().unwrap() - 1.2).abs() < 1e-6,
        "{d}"
    );
    // Known only from before the restart.
    assert_eq!(
        node_of(&d, "node-a")["rulesRemovedUnixNanos"],
        t0 + 4 * S / 10,
        "{d}"
    );
    let nb = node_of(&d, "node-b");
    assert_eq!(nb["lateConnections"], 1, "{d}");
    assert_eq!(nb["abortedConnections"], 1, "{d}");
    assert_eq!(nb["lastConnectionUnixNanos"], t0 + 9 * S / 10, "{d}");
    agg.shutdown().await;
}

#[tokio::test]
async fn batch_checkpointed_before_a_crash_and_resent_after_counts_once() {
    let lab = Restartable::new().await;
    let agg = lab.start().await;
    let (a, mut b, ep) = two_agents_see_the_deletion(&lab.c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;

    let (flow, r) = b
        .report(vec![new_flow("10.244.1.7", IP, t0 + 9 * S / 10)])
        .await;
    assert_eq!(r.acknowledged_sequence, 0);
    checkpoint(&agg);
    // The aggregator dies (no final checkpoint) before the agent got an ack.
    drop((a, b));
    agg.abort();

    let agg = lab.start().await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    assert_eq!(b.acknowledged, 1, "the checkpointed batch is acknowledged");
    // Resent anyway (as after a lost ack): recognised.
    let again = b.client.report(flow).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.acknowledged_sequence, 1);
    (a.seq, b.seq) = (a.acknowledged, b.acknowledged);

    a.report(vec![rules_removed(IP, t0 + 4 * S / 10)]).await;
    b.report(vec![rules_removed(IP, t0 + 12 * S / 10)]).await;
    finish_deletion(&lab.c);
    let d = finished(agg.http_addr, "/v1/deletions").await;
    assert_eq!(d["complete"], true, "{d}");
    assert_eq!(node_of(&d, "node-b")["lateConnections"], 1, "doubled? {d}");
    agg.shutdown().await;
}

#[tokio::test]
async fn batch_applied_but_not_checkpointed_at_a_crash_is_resent_and_counts_once() {
    let lab = Restartable::new().await;
    let agg = lab.start().await;
    let (mut a, mut b, ep) = two_agents_see_the_deletion(&lab.c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;

    // Batch 1 (a late flow at +0.9 s) is checkpointed; batch 2 (another at
    // +1.0 s) is applied, but the aggregator dies before a checkpoint.
    b.report(vec![new_flow("10.244.1.7", IP, t0 + 9 * S / 10)])
        .await;
    a.report(vec![rules_removed(IP, t0 + 4 * S / 10)]).await;
    checkpoint(&agg);
    let (second, r) = b.report(vec![new_flow("10.244.1.9", IP, t0 + S)]).await;
    assert!(!r.duplicate);
    assert_eq!(r.acknowledged_sequence, 1, "batch 2 is not durable");
    drop((a, b));
    agg.abort();

    let agg = lab.start().await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    let _a = Agent::connect(agg.grpc_addr, "node-a").await;
    assert_eq!(b.acknowledged, 1);
    // The agent resends what was not acknowledged: applied once.
    let r = b.client.report(second.clone()).await.unwrap().into_inner();
    assert!(!r.duplicate, "batch 2 was lost with the crash: must apply");
    let r = b.client.report(second).await.unwrap().into_inner();
    assert!(r.duplicate);
    b.seq = 2;
    b.report(vec![rules_removed(IP, t0 + 12 * S / 10)]).await;
    finish_deletion(&lab.c);
    let d = finished(agg.http_addr, "/v1/deletions").await;
    assert_eq!(d["complete"], true, "{d}");
    let nb = node_of(&d, "node-b");
    assert_eq!(nb["lateConnections"], 2, "batch 1 once, batch 2 once: {d}");
    assert_eq!(nb["lastConnectionUnixNanos"], t0 + S, "{d}");
    assert_eq!(
        node_of(&d, "node-a")["rulesRemovedUnixNanos"],
        t0 + 4 * S / 10
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn deletion_whose_pod_went_while_the_aggregator_was_down_finishes_after_restart() {
    let lab = Restartable::new().await;
    let agg = lab.start().await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    start_deletion(&lab.c);
    let t0 = a.next_add().await.deletion_start_unix_nanos;
    a.report(vec![rules_removed(IP, t0 + 3 * S / 10)]).await;
    drop(a);
    agg.shutdown().await;

    // The kubelet finishes while the aggregator is down: the relist no
    // longer has the pod, which must count as gone.
    finish_deletion(&lab.c);
    let agg = lab.start().await;
    let _a = Agent::connect(agg.grpc_addr, "node-a").await;
    let d = finished(agg.http_addr, "/v1/deletions").await;
    assert_eq!(d["complete"], true, "{d}");
    assert_eq!(d["deletionStartUnixNanos"], t0, "{d}");
    assert!(
        (d["propagationSeconds"].as_f64().unwrap() - 0.3).abs() < 1e-6,
        "{d}"
    );
    assert_eq!(agg.correlator.pending(), 0);
    agg.shutdown().await;
}

/// Settings for tests whose agents report times ahead of the real clock
/// (a test cannot wait for every second it simulates).
fn simulated_seconds(completion_timeout: Duration) -> Settings {
    Settings {
        completion_timeout,
        clock_tolerance: Duration::from_secs(30),
        shutdown_linger: Duration::ZERO,
        ..settings()
    }
}

/// The aggregator with [`simulated_seconds`] settings on a fresh store
/// (kept while the directory lives).
async fn simulated_aggregator(
    c: &Cluster,
    completion_timeout: Duration,
) -> (aggregator::app::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(
        simulated_seconds(completion_timeout),
        &dir.path().join("store.db"),
        Some(&c.double),
    )
    .await;
    (agg, dir)
}

/// The aggregator with [`simulated_seconds`] settings, once its Pod watch
/// indexed `source` (created in the double): connections from it are
/// attributed to its workload.
async fn aggregator_knowing(
    c: &Cluster,
    source: &Pod,
) -> (aggregator::app::Running, tempfile::TempDir) {
    let source = c.double.create(source).unwrap();
    let (agg, dir) = simulated_aggregator(c, Duration::from_secs(30)).await;
    let ip: std::net::IpAddr = source.status.unwrap().pod_ip.unwrap().parse().unwrap();
    wait_until("the source pod indexed from the Pod watch", || {
        let pods = agg.correlator.indexed_pods();
        async move { pods.iter().any(|(i, _)| *i == ip) }
    })
    .await;
    (agg, dir)
}

/// The router of `kind` named `name` in a deletion.
fn router_of<'a>(d: &'a serde_json::Value, kind: &str, name: &str) -> &'a serde_json::Value {
    d["routers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == kind && r["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} router {name} in {d}"))
}

/// A pod on node-b that sends to web-1 directly (a client-side balancer).
const BALANCER: &str = "10.244.1.9";

#[tokio::test]
async fn a_node_still_routing_at_the_timeout_makes_the_answer_at_least_never_smaller() {
    let c = cluster().await;
    let (agg, _dir) = simulated_aggregator(&c, Duration::from_secs(2)).await;
    let (mut a, _b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;
    // node-a stops routing at once; node-b's proxy never applies the
    // removal: the pod keeps accepting its connections.
    a.report(vec![
        rules_removed(IP, t0 + S / 10),
        accepted(BALANCER, IP, t0 + S / 2),
        accepted(BALANCER, IP, t0 + 3 * S / 2),
    ])
    .await;
    let http = agg.http_addr;
    let d = &finished(http, "/v1/deletions").await;
    assert_eq!(d["censored"], true, "{d}");
    assert_eq!(node_of(d, "node-b")["class"], "stillRouting", "{d}");
    assert_eq!(node_of(d, "node-a")["class"], "measured", "{d}");
    let after = d["censoredAfterSeconds"].as_f64().unwrap();
    assert!(after >= 2.0, "{d}");
    let (_, r) = get_json(http, "/v1/recommendations?namespace=shop&service=web").await;
    assert_eq!(r["atLeast"], true, "{r}");
    assert_eq!(r["lowConfidence"], true, "{r}");
    assert_eq!(r["censored"], 1, "{r}");
    // Never below what the censored deletion proves (plus the margin).
    assert!(
        r["preStopSeconds"].as_f64().unwrap() >= (after + 1.0).ceil(),
        "{r}"
    );
    assert!(
        r["reason"].as_str().unwrap().contains("still routing"),
        "{r}"
    );
    let (_, m) = get(http, "/metrics").await;
    for line in [
        r#"prestop_nodes_still_routing_total{node="node-b"} 1"#,
        r#"prestop_deletions_total{namespace="shop",outcome="censored"} 1"#,
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
    agg.shutdown().await;
}

#[tokio::test]
async fn refusals_alone_show_a_client_side_balancer_still_routing() {
    let c = cluster().await;
    let balancer = pod("shop", "balancer-0", BALANCER, "node-b");
    let (agg, _dir) = aggregator_knowing(&c, &balancer).await;
    let (mut a, mut b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;
    // preStop 0: both proxies stop at once and the app is gone, but the
    // balancer refreshes its list only after 3 s: refused until then. Its
    // node's conntrack saw its first attempt go to the pod IP directly;
    // everything after is refusals the pod's node saw.
    b.report(vec![
        rules_removed(IP, t0 + S / 5),
        direct_flow(BALANCER, IP, t0 + S / 10),
    ])
    .await;
    a.report(vec![
        rules_removed(IP, t0 + S / 5),
        refused(BALANCER, IP, t0 + S),
        refused(BALANCER, IP, t0 + 2 * S),
        refused(BALANCER, IP, t0 + 3 * S),
        refused(EXTERNAL, IP, t0 + 3 * S),
    ])
    .await;
    finish_deletion(&c);
    let d = &finished(agg.http_addr, "/v1/deletions").await;
    let p = d["propagationSeconds"].as_f64().unwrap();
    assert!(p >= 3.0, "refusals are routing evidence: {d}");
    let node_b = node_of(d, "node-b");
    assert_eq!(node_b["refusedConnections"], 3, "{d}");
    assert!((node_b["latencySeconds"].as_f64().unwrap() - 3.0).abs() < 1e-6);
    // The refusals are the balancer's, not node-b's proxy's.
    let balancer = router_of(d, "workload", "shop/balancer-0");
    assert_eq!(balancer["refusedConnections"], 3, "{d}");
    assert!((balancer["latencySeconds"].as_f64().unwrap() - 3.0).abs() < 1e-6);
    let external = router_of(d, "external", EXTERNAL);
    assert!((external["latencySeconds"].as_f64().unwrap() - 3.0).abs() < 1e-6);
    let b_router = router_of(d, "node", "node-b");
    assert!(
        b_router["latencySeconds"].as_f64().unwrap() < 1.0,
        "node-b's proxy stopped at once: {d}"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn a_forged_time_outside_the_plausible_window_is_refused() {
    let c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("store.db"), Some(&c.double)).await;
    let (mut a, mut b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;
    // An hour after now: it would make the bound an hour long.
    b.report(vec![rules_removed(IP, now_on_the_wire() + 3600 * S)])
        .await;
    a.report(vec![rules_removed(IP, t0 + S / 10)]).await;
    b.report(vec![rules_removed(IP, t0 + S / 5)]).await;
    finish_deletion(&c);
    let d = &finished(agg.http_addr, "/v1/deletions").await;
    let p = d["propagationSeconds"].as_f64().unwrap();
    assert!(p < 1.0, "the forged removal counted: {d}");
    let (_, m) = get(agg.http_addr, "/metrics").await;
    assert!(
        m.contains(r#"prestop_observations_rejected_total{reason="future"} 1"#),
        "{m}"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn an_agent_restarted_mid_deletion_leaves_its_node_unknown() {
    let c = cluster().await;
    let (agg, _dir) = simulated_aggregator(&c, Duration::from_secs(2)).await;
    let (mut a, b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;
    a.report(vec![
        rules_removed(IP, t0 + S / 10),
        accepted(BALANCER, IP, t0 + S / 2),
    ])
    .await;
    // node-b's agent is killed and comes back as a new process: what it
    // had seen is gone.
    drop(b);
    let mut b_again = Agent::connect_as(agg.grpc_addr, "node-b", "node-b/restarted").await;
    // It learns the watched set again and finds the endpoint gone from
    // its dataplane: removed before its start, when is unknown.
    assert_eq!(b_again.next_add().await, ep);
    let started = now_on_the_wire();
    b_again
        .report(vec![removed_before_start(IP, started)])
        .await;
    let d = &finished(agg.http_addr, "/v1/deletions").await;
    let node_b = node_of(d, "node-b");
    assert_eq!(node_b["class"], "unknown", "{d}");
    assert_eq!(
        node_b["removedBeforeAgentStartUnixNanos"].as_u64(),
        Some(started),
        "{d}"
    );
    assert!(node_b["rulesRemovedUnixNanos"].is_null(), "{d}");
    assert_eq!(d["censored"], false, "{d}");
    assert_eq!(d["coverage"]["unknown"], 1, "{d}");
    agg.shutdown().await;
}

/// An ingress controller's pod on node-b, as a Deployment's ReplicaSet
/// names it.
const INGRESS: &str = "10.244.1.20";
/// A load balancer outside the cluster.
const EXTERNAL: &str = "203.0.113.7";

fn ingress_pod() -> Pod {
    let mut p = pod("ingress", "nginx-7d9f8-x2x4q", INGRESS, "node-b");
    p.metadata.labels = Some([("pod-template-hash".into(), "7d9f8".into())].into());
    p.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: "nginx-7d9f8".into(),
        uid: "rs-uid".into(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    p
}

#[tokio::test]
async fn routers_are_named_and_external_ones_can_be_left_out() {
    let c = cluster().await;
    let (agg, _dir) = aggregator_knowing(&c, &ingress_pod()).await;
    let (mut a, mut b, ep) = two_agents_see_the_deletion(&c, &agg).await;
    let t0 = ep.deletion_start_unix_nanos;
    // Both proxies stop at once; the ingress goes on with its upstream
    // list for 2 s, a cloud load balancer outside the cluster for 5 s.
    b.report(vec![
        rules_removed(IP, t0 + S / 5),
        direct_flow(INGRESS, IP, t0 + S / 2),
    ])
    .await;
    a.report(vec![
        rules_removed(IP, t0 + S / 10),
        accepted(INGRESS, IP, t0 + 2 * S),
        refused(EXTERNAL, IP, t0 + 5 * S),
    ])
    .await;
    finish_deletion(&c);
    let http = agg.http_addr;
    let d = &finished(http, "/v1/deletions").await;
    let routers: Vec<(&str, &str)> = d["routers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        routers,
        [
            ("node", "node-a"),
            ("node", "node-b"),
            ("workload", "ingress/nginx"),
            ("external", EXTERNAL)
        ],
        "{d}"
    );
    assert_eq!(d["limitingRouter"]["kind"], "external", "{d}");
    let ingress = router_of(d, "workload", "ingress/nginx");
    assert_eq!(ingress["node"], "node-b", "{d}");
    assert!((ingress["latencySeconds"].as_f64().unwrap() - 2.0).abs() < 1e-6);

    let all = "/v1/recommendations?namespace=shop&service=web";
    let (_, r) = get_json(http, all).await;
    assert_eq!(r["limitingRouter"]["name"], EXTERNAL, "{r}");
    let kinds: Vec<&str> = r["byRouterKind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["node", "workload", "external"], "{r}");
    let (status, without) = get_json(http, &format!("{all}&excludeExternal=true")).await;
    assert_eq!(status, 200, "{without}");
    assert_eq!(
        without["limitingRouter"]["name"], "ingress/nginx",
        "{without}"
    );
    assert!(
        without["preStopSeconds"].as_u64() < r["preStopSeconds"].as_u64(),
        "{without} vs {r}"
    );
    let (_, m) = get(http, "/metrics").await;
    for line in [
        r#"prestop_router_latency_seconds_count{kind="workload",router="ingress/nginx"} 1"#,
        r#"prestop_router_latency_seconds_count{kind="external",router="external"} 1"#,
        r#"prestop_router_latency_seconds_count{kind="node",router="node-b"} 1"#,
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
    agg.shutdown().await;
}

#[tokio::test]
async fn finished_startup_windows_are_served_after_a_restart() {
    let lab = Restartable::new().await;
    // Windows that close 1.2 s after T_ready.
    let mut settings = manual_checkpoints();
    settings.startup.window = Duration::from_secs(1);
    settings.startup.settle = Duration::from_millis(200);
    let agg = start_aggregator(settings.clone(), &lab.store, Some(&lab.c.double)).await;
    let web2 = add_web2(&lab.c.double);
    lab.c
        .double
        .update(&endpoint_slice(
            "shop",
            "web",
            &[(&lab.c.web1, true, false), (&web2, true, false)],
        ))
        .unwrap();
    let path = "/v1/startup?namespace=shop&service=web";
    wait_until("startup window closed", || async move {
        get_json(agg.http_addr, path).await.1["newPods"] == 1
    })
    .await;
    let before = get_json(agg.http_addr, path).await.1;
    assert_eq!(before["pods"][0]["podName"], "web-2", "{before}");
    agg.shutdown().await;

    let agg = start_aggregator(settings, &lab.store, Some(&lab.c.double)).await;
    let (status, after) = get_json(agg.http_addr, path).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["newPods"], 1, "{after}");
    assert_eq!(after["pods"], before["pods"]);
    agg.shutdown().await;
}
