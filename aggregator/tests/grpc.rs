//! The agent protocol's edges (against a secured aggregator): validation,
//! unknown agents, health, clock.

mod common;

use std::time::Duration;

use aggregator::config::Settings;
use common::lab::*;
use observer_proto::UnixNanos;
use observer_proto::v1 as pb;
use tonic::Code;

/// Checkpoints only when a test asks (`checkpoint`), so acknowledgements
/// are deterministic.
fn manual_checkpoints() -> Settings {
    Settings {
        checkpoint_interval: Duration::from_secs(3600),
        ..Settings::default()
    }
}

fn checkpoint(agg: &aggregator::app::Running) {
    agg.correlator.checkpoint(UnixNanos::now()).unwrap();
}

/// A secured aggregator with node-a and node-b in the Node list (the
/// double must live as long as the test).
async fn secured_aggregator(dir: &tempfile::TempDir) -> (Cluster, aggregator::app::Running) {
    let c = cluster().await;
    let agg = start_aggregator(
        manual_checkpoints(),
        &dir.path().join("s.db"),
        Some(&c.double),
    )
    .await;
    (c, agg)
}

#[tokio::test]
async fn malformed_reports_get_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, agg) = secured_aggregator(&dir).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let base = pb::ReportRequest {
        agent_id: a.id.clone(),
        sequence: 1,
        sent_unix_nanos: now_on_the_wire(),
        ..Default::default()
    };
    let cases: Vec<(pb::ReportRequest, &str)> = vec![
        (
            pb::ReportRequest {
                agent_id: String::new(),
                ..base.clone()
            },
            "agent_id",
        ),
        (
            pb::ReportRequest {
                sequence: 0,
                ..base.clone()
            },
            "sequence",
        ),
        (
            pb::ReportRequest {
                agent_id: "a".repeat(254),
                ..base.clone()
            },
            "longer than 253",
        ),
        (
            pb::ReportRequest {
                sent_unix_nanos: 0,
                ..base.clone()
            },
            "sent_unix_nanos 0 is not a time",
        ),
        (
            pb::ReportRequest {
                observations: vec![pb::Observation { kind: None }],
                ..base.clone()
            },
            "observations[0]: kind",
        ),
        (
            pb::ReportRequest {
                observations: vec![rules_removed("not-an-ip", 1)],
                ..base.clone()
            },
            "not an IP",
        ),
        (
            pb::ReportRequest {
                observations: vec![rules_removed("10.0.0.1", 0)],
                ..base.clone()
            },
            "time_unix_nanos",
        ),
        (
            pb::ReportRequest {
                observations: vec![rules_removed("10.0.0.1", 1); 10_001],
                ..base.clone()
            },
            "10001 observations; at most 10000",
        ),
    ];
    for (req, msg) in cases {
        let err = a.client.report(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(msg),
            "{msg:?} not in {:?}",
            err.message()
        );
    }
    // A rejected batch did not consume its sequence number.
    let (req, ok) = a.report(vec![rules_removed("10.0.0.1", 1)]).await;
    assert!(!ok.duplicate);
    assert_eq!(
        ok.acknowledged_sequence, 0,
        "acknowledged before a checkpoint"
    );
    checkpoint(&agg);
    let again = a.client.report(req).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.acknowledged_sequence, 1);

    let unknown = pb::ReportRequest {
        agent_id: "nobody".into(),
        ..base
    };
    assert_eq!(
        a.client.report(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn health_clock_and_reregistration() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, agg) = secured_aggregator(&dir).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(agg.grpc_addr).await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "prestop.observer.v1.Observer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let t1 = now_on_the_wire();
    let c = a
        .client
        .sync_clock(pb::ClockSyncRequest {
            agent_id: a.id.clone(),
            t1_unix_nanos: t1,
        })
        .await
        .unwrap()
        .into_inner();
    let t4 = now_on_the_wire();
    assert!(t1 <= c.t2_unix_nanos && c.t2_unix_nanos <= c.t3_unix_nanos && c.t3_unix_nanos <= t4);

    let reg = agg.correlator.registration(&a.id).unwrap();
    assert_eq!(reg.kernel_release, "6.18.0");
    assert_eq!(reg.agent_version, "test");
    assert_eq!(
        reg.capabilities,
        [("tracepoint".to_string(), true, String::new())]
    );

    a.report(vec![]).await;
    // Cumulative kernel counters become per-node counter increments.
    let mut req = pb::ReportRequest {
        agent_id: a.id.clone(),
        sequence: 2,
        counters: Some(pb::AgentCounters {
            events_lost: 7,
            observations_dropped: 3,
        }),
        sent_unix_nanos: now_on_the_wire(),
        ..Default::default()
    };
    a.client.report(req.clone()).await.unwrap();
    a.seq = 2;
    req.sequence = 3;
    req.counters = Some(pb::AgentCounters {
        events_lost: 9,
        observations_dropped: 5,
    });
    a.client.report(req).await.unwrap();
    let m = agg.http.metrics.encode();
    assert!(
        m.contains(r#"prestop_agent_events_lost_total{node="node-a"} 9"#),
        "{m}"
    );
    assert!(
        m.contains(r#"prestop_agent_observations_dropped_total{node="node-a"} 5"#),
        "{m}"
    );
    // Re-registering (after a reconnect) tells the agent what was durably
    // received: nothing before a checkpoint, everything after.
    let reregister = pb::RegisterRequest {
        agent_id: a.id.clone(),
        node_name: "node-a".into(),
        ..Default::default()
    };
    let r = a.client.register(reregister.clone()).await.unwrap();
    assert_eq!(r.into_inner().acknowledged_sequence, 0);
    checkpoint(&agg);
    let r = a.client.register(reregister).await.unwrap().into_inner();
    assert_eq!(r.acknowledged_sequence, 3);
    assert!(r.max_observations_per_report > 0);

    // Shutdown ends open endpoint streams instead of hanging on them.
    tokio::time::timeout(Duration::from_secs(5), agg.shutdown())
        .await
        .expect("shutdown hung");
}

#[tokio::test]
async fn report_stream_acknowledges_in_order_and_stops_at_a_bad_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, agg) = secured_aggregator(&dir).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let req = |seq: u64, obs: Vec<pb::Observation>| pb::ReportRequest {
        agent_id: a.id.clone(),
        sequence: seq,
        observations: obs,
        sent_unix_nanos: now_on_the_wire(),
        ..Default::default()
    };
    let batches = vec![
        req(1, vec![rules_removed("10.0.0.1", 1)]),
        req(2, vec![]),
        req(1, vec![]),
        req(3, vec![rules_removed("bad", 1)]),
        req(4, vec![]),
    ];
    let mut responses = a
        .client
        .report_stream(futures::stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let err = loop {
        match responses.message().await {
            Ok(Some(r)) => got.push((r.acknowledged_sequence, r.duplicate)),
            Ok(None) => panic!("stream ended without the error"),
            Err(e) => break e,
        }
    };
    // Applied (the resent 1 is a duplicate) but not yet acknowledged: no
    // checkpoint ran.
    assert_eq!(got, [(0, false), (0, false), (0, true)]);
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("observations[0]"), "{err:?}");
    // Batch 4 came after the bad one and was not applied.
    checkpoint(&agg);
    let r = a
        .client
        .register(pb::RegisterRequest {
            agent_id: a.id.clone(),
            node_name: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.acknowledged_sequence, 2);
    agg.shutdown().await;
}
