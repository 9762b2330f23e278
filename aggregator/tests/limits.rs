//! Attacks on the agent protocol, against the real aggregator over real
//! gRPC with a Node list from the API server double: each is refused (or
//! slowed) and records nothing.

mod common;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use aggregator::app::Running;
use aggregator::config::Settings;
use aggregator::limits::Limits;
use apiserver_double::ApiServerDouble;
use apiserver_double::objects::endpoint_slice;
use common::lab::*;
use common::{get, get_json};
use k8s_openapi::api::core::v1::Pod;
use observer_proto::UnixNanos;
use observer_proto::v1 as pb;
use tonic::Code;

const IP: &str = "10.244.0.5";
const S: u64 = 1_000_000_000;

fn rate(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

async fn start(settings: Settings, double: &ApiServerDouble, dir: &tempfile::TempDir) -> Running {
    // Ready once the Node list (among others) was listed.
    start_aggregator(settings, &dir.path().join("s.db"), Some(double)).await
}

/// A client holding node-a's agent token when the aggregator is secured:
/// an attacker who took over one node.
async fn attacker(agg: &Running) -> Client {
    client(
        agg.grpc_addr,
        agent_token(agg.grpc_addr, "node-a").as_deref(),
    )
    .await
}

fn registration(id: &str, node: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        agent_id: id.into(),
        node_name: node.into(),
        ..Default::default()
    }
}

/// Deletes web-1 and waits until `agent` was told to watch it; returns T0.
async fn delete_web1(double: &ApiServerDouble, web1: &Pod, agent: &mut Agent) -> u64 {
    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    double
        .update(&endpoint_slice("shop", "web", &[(web1, false, true)]))
        .unwrap();
    agent.next_add().await.deletion_start_unix_nanos
}

/// The detail of the only stored deletion, once there is one.
async fn only_deletion(agg: &Running) -> serde_json::Value {
    let http = agg.http_addr;
    wait_until("deletion stored", || async move {
        get_json(http, "/v1/deletions").await.1["items"]
            .as_array()
            .is_some_and(|i| !i.is_empty())
    })
    .await;
    let list = get_json(http, "/v1/deletions").await.1;
    let uid = list["items"][0]["podUid"].as_str().expect("podUid");
    get_json(http, &format!("/v1/deletions/{uid}")).await.1
}

#[tokio::test]
async fn oversized_names_and_registrations_are_refused_and_never_reach_metrics() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start(Settings::default(), &double, &dir).await;
    let mut c = attacker(&agg).await;

    let huge_node = "a".repeat(1 << 20);
    let err = c
        .register(registration("attacker/1", &huge_node))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("is not a Kubernetes node name"),
        "{err:?}"
    );
    assert!(err.message().len() < 400, "the name is not echoed whole");

    // 100 registrations of 3 MiB each (under the 4 MiB message limit).
    for i in 0..100 {
        let err = c
            .register(pb::RegisterRequest {
                kernel_release: "k".repeat(3 << 20),
                ..registration(&format!("attacker/{i}"), &format!("fake-{i}"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("at most 16384"), "{err:?}");
        assert_eq!(agg.correlator.registration(&format!("attacker/{i}")), None);
    }
    // Larger than the message limit: refused before it is decoded.
    let err = c
        .register(pb::RegisterRequest {
            kernel_release: "k".repeat(5 << 20),
            ..registration("attacker/big", "node-a")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(agg.correlator.registration("attacker/big"), None);

    // An honest agent still registers and counts.
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    a.report(vec![]).await;
    let (_, m) = get(agg.http_addr, "/metrics").await;
    assert!(m.len() < 64 * 1024, "/metrics is {} bytes", m.len());
    assert!(!m.contains("aaaaaaaa") && !m.contains("fake-"), "{m}");
    agg.shutdown().await;
}

#[tokio::test]
async fn a_made_up_node_cannot_report_nor_hold_back_deletions() {
    let Cluster { double, web1 } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    // Without authentication (with it, a made-up node gets no token at
    // all: tests/auth.rs): the Node list alone keeps it out.
    let agg =
        start_as_configured(Settings::default(), &dir.path().join("s.db"), Some(&double)).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    // A valid name that is not in the Node list: it may register and
    // subscribe, but it is never expected and its reports are refused.
    let mut ghost = Agent::connect(agg.grpc_addr, "node-ghost").await;
    let t0 = delete_web1(&double, &web1, &mut a).await;
    b.next_add().await;
    ghost.next_add().await;

    ghost.seq += 1;
    let err = ghost
        .client
        .report(pb::ReportRequest {
            agent_id: ghost.id.clone(),
            sequence: ghost.seq,
            observations: vec![rules_removed(IP, t0 + 3600 * S)],
            sent_unix_nanos: now_on_the_wire(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not in the Node list"), "{err:?}");

    a.report(vec![rules_removed(IP, t0 + S)]).await;
    b.report(vec![rules_removed(IP, t0 + 2 * S)]).await;
    double.finish_deletion::<Pod>("shop", "web-1").unwrap();
    let d = &only_deletion(&agg).await;
    assert_eq!(d["complete"], true, "{d}");
    assert_eq!(d["coverage"]["expected"], 2, "{d}");
    assert_eq!(d["propagationSeconds"], 2.0, "{d}");
    let nodes: Vec<&str> = d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b"]);
    let (_, m) = get(agg.http_addr, "/metrics").await;
    assert!(!m.contains("node-ghost"), "{m}");
    agg.shutdown().await;
}

#[tokio::test]
async fn a_report_storm_is_refused_beyond_the_agent_rate_and_records_nothing() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        checkpoint_interval: Duration::from_secs(3600),
        limits: Limits {
            agent_reports_per_second: rate(1),
            ..Limits::DEFAULT
        },
        ..Settings::default()
    };
    let agg = start(settings, &double, &dir).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut accepted = Vec::new();
    for seq in 1..=50u64 {
        let r = a
            .client
            .report(pb::ReportRequest {
                agent_id: a.id.clone(),
                sequence: seq,
                observations: vec![rules_removed(IP, now_on_the_wire())],
                sent_unix_nanos: now_on_the_wire(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => accepted.push(seq),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("--agent-reports-per-second"), "{e:?}");
            }
        }
    }
    // A burst of ten, then one a second.
    assert!((10..=15).contains(&accepted.len()), "{accepted:?}");
    assert_eq!(accepted[..10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // The refused batches were not applied: the last one applied is the
    // last accepted one.
    agg.correlator.checkpoint(UnixNanos::now()).unwrap();
    let r = a
        .client
        .register(registration(&a.id, "node-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Some(&r.acknowledged_sequence), accepted.last());
    agg.shutdown().await;
}

#[tokio::test]
async fn a_report_stream_over_the_agent_rate_is_slowed_not_broken() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        limits: Limits {
            agent_reports_per_second: rate(10),
            ..Limits::DEFAULT
        },
        ..Settings::default()
    };
    let agg = start(settings, &double, &dir).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    // A burst of 100, then ten a second: 120 take at least two seconds.
    let batches: Vec<_> = (1..=120u64)
        .map(|seq| pb::ReportRequest {
            agent_id: a.id.clone(),
            sequence: seq,
            sent_unix_nanos: now_on_the_wire(),
            ..Default::default()
        })
        .collect();
    let t = Instant::now();
    let mut acks = a
        .client
        .report_stream(futures::stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(r) = acks.message().await.unwrap() {
        assert!(!r.duplicate);
        n += 1;
    }
    assert_eq!(n, 120);
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn registrations_are_rate_limited_and_counted() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        limits: Limits {
            registrations_per_second: rate(5),
            max_agents: 3,
            ..Limits::DEFAULT
        },
        ..Settings::default()
    };
    // Thirty nodes' registrations: without authentication, as one token
    // speaks for one node only (tests/auth.rs); the limits hold alone.
    let agg = start_as_configured(settings, &dir.path().join("s.db"), Some(&double)).await;
    let mut c = attacker(&agg).await;
    let mut refused = Vec::new();
    for i in 0..30 {
        let id = format!("n{i}/1");
        match c.register(registration(&id, &format!("n{i}"))).await {
            Ok(_) => {}
            Err(e) => {
                refused.push(e.code());
                assert_eq!(agg.correlator.registration(&id), None);
            }
        }
    }
    // Three fit (--max-agents), the burst of ten bounds the rest.
    let exhausted = refused
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!(exhausted, 27, "{refused:?}");
    let held = (0..30)
        .filter(|i| agg.correlator.registration(&format!("n{i}/1")).is_some())
        .count();
    assert_eq!(held, 3);
    agg.shutdown().await;
}

#[tokio::test]
async fn a_newer_agent_of_a_node_replaces_the_old_one_for_good() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start(Settings::default(), &double, &dir).await;
    let mut old = Agent::connect_as(agg.grpc_addr, "node-a", "node-a/old").await;
    let mut new = Agent::connect_as(agg.grpc_addr, "node-a", "node-a/new").await;
    // The old agent's subscription ends (after its snapshot), and it may
    // not take the node back.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match old.watch.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("old subscription still open");
    let end = end.unwrap_err();
    assert_eq!(end.code(), Code::Aborted, "{end:?}");
    assert!(end.message().contains("replaced"), "{end:?}");
    assert_eq!(agg.correlator.registration("node-a/old"), None);
    let err = old
        .client
        .register(registration("node-a/old", "node-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("replaced"), "{err:?}");
    // The new agent reconnects (same id) as often as it needs.
    for _ in 0..3 {
        new.client
            .register(registration("node-a/new", "node-a"))
            .await
            .unwrap();
    }
    new.report(vec![]).await;
    agg.shutdown().await;
}
