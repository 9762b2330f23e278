//! Attacks on the agent protocol and the HTTP API, against the real
//! aggregator over real gRPC with TLS, the double's TokenReview and
//! SubjectAccessReview: each is refused with its status and leaves nothing
//! behind.

mod common;

use std::time::Duration;

use aggregator::config::Settings;
use apiserver_double::objects::endpoint_slice;
use common::get;
use common::lab::*;
use k8s_openapi::api::core::v1::Pod;
use lab::identity::{self, AUDIENCE};
use observer_proto::v1 as pb;
use tonic::Code;

const S: u64 = 1_000_000_000;
const IP: &str = "10.244.0.5";

fn settings() -> Settings {
    Settings {
        completion_timeout: Duration::from_secs(30),
        ..Settings::default()
    }
}

/// Registering as `node` with `token` is refused with `code`, and the
/// agent id is unknown afterwards.
async fn refused(agg: &aggregator::app::Running, node: &str, token: Option<&str>, code: Code) {
    let id = format!("{node}/attacker");
    let err = match Agent::try_connect(agg.grpc_addr, node, &id, token).await {
        Ok(_) => panic!("registration as {node} accepted"),
        Err(e) => e,
    };
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(agg.correlator.registration(&id), None, "recorded: {id}");
}

fn refusals(agg: &aggregator::app::Running, reason: &str) -> u64 {
    let m = agg.http.metrics.encode();
    let series = format!("prestop_auth_refusals_total{{reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn callers_without_a_valid_token_of_the_agents_account_are_refused() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;

    refused(&agg, "node-a", None, Code::Unauthenticated).await;
    refused(&agg, "node-a", Some("made-up"), Code::Unauthenticated).await;
    let expired = identity::expired_agent_token(&double, "node-a").unwrap();
    refused(&agg, "node-a", Some(&expired), Code::Unauthenticated).await;
    // A real token of the agent's pod, but for the API server's audience.
    let wrong_audience =
        identity::agent_token(&double, "node-a", "https://kubernetes.default.svc").unwrap();
    refused(&agg, "node-a", Some(&wrong_audience), Code::Unauthenticated).await;
    // A valid token of another ServiceAccount (the CI reader).
    let reader = credentials(agg.grpc_addr).unwrap().reader.clone();
    refused(&agg, "node-a", Some(&reader), Code::PermissionDenied).await;
    assert_eq!(refusals(&agg, "unauthenticated"), 4);
    assert_eq!(refusals(&agg, "forbidden"), 1);

    // Every call checks the token, not only Register.
    let mut anonymous = client(agg.grpc_addr, None).await;
    let clock = anonymous
        .sync_clock(pb::ClockSyncRequest {
            agent_id: "node-a/x".into(),
            t1_unix_nanos: now_on_the_wire(),
        })
        .await
        .unwrap_err();
    assert_eq!(clock.code(), Code::Unauthenticated);

    // Plaintext to the TLS port never reaches the service.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", agg.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut plain = pb::observer_client::ObserverClient::new(plain);
    let token = agent_token(agg.grpc_addr, "node-a").unwrap();
    let mut req = tonic::Request::new(registration("node-a/plain", "node-a"));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert!(plain.register(req).await.is_err());
    assert_eq!(agg.correlator.registration("node-a/plain"), None);
    agg.shutdown().await;
}

#[tokio::test]
async fn a_token_speaks_only_for_its_own_node_and_a_node_in_the_node_list() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let b_token = agent_token(agg.grpc_addr, "node-b").unwrap();
    refused(&agg, "node-a", Some(&b_token), Code::PermissionDenied).await;
    refused(&agg, "ghost", Some(&b_token), Code::PermissionDenied).await;

    // An agent pod on a node the Node list does not have (a forged or
    // deleted node) gets a real token, and is still refused.
    let ghost = identity::agent_token(&double, "ghost", AUDIENCE).unwrap();
    refused(&agg, "ghost", Some(&ghost), Code::PermissionDenied).await;

    // The honest agent of node-b registers.
    let b = Agent::connect(agg.grpc_addr, "node-b").await;
    assert_eq!(agg.correlator.agent_node(&b.id).as_deref(), Some("node-b"));
    agg.shutdown().await;
}

/// The attack of issue 15: a client registered as an existing node reports
/// "rules removed" 1 ms after T0 to lower the recommendation. With node-b's
/// token it can neither register as node-a nor report under node-a's agent
/// id, and node-a's latency is the honest one.
#[tokio::test]
async fn another_nodes_agent_cannot_report_rules_removed_for_it() {
    let Cluster { double, web1 } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    double
        .update(&endpoint_slice("shop", "web", &[(&web1, false, true)]))
        .unwrap();
    let ep = a.next_add().await;
    b.next_add().await;
    let t0 = ep.deletion_start_unix_nanos;

    let b_token = agent_token(agg.grpc_addr, "node-b").unwrap();
    refused(&agg, "node-a", Some(&b_token), Code::PermissionDenied).await;
    let forged = pb::ReportRequest {
        agent_id: a.id.clone(),
        sequence: 1_000,
        observations: vec![rules_removed(IP, t0 + 1_000_000)],
        sent_unix_nanos: now_on_the_wire(),
        ..Default::default()
    };
    let mut attacker = client(agg.grpc_addr, Some(&b_token)).await;
    let unary = attacker.report(forged.clone()).await.unwrap_err();
    assert_eq!(unary.code(), Code::PermissionDenied, "{unary:?}");
    let mut stream = attacker
        .report_stream(futures::stream::iter(vec![forged]))
        .await
        .unwrap()
        .into_inner();
    let streamed = stream.message().await.unwrap_err();
    assert_eq!(streamed.code(), Code::PermissionDenied, "{streamed:?}");
    let watch = attacker
        .watch_endpoints(pb::WatchEndpointsRequest {
            agent_id: a.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::PermissionDenied);
    // The stolen agent id still belongs to node-a.
    assert_eq!(agg.correlator.agent_node(&a.id).as_deref(), Some("node-a"));

    // The honest agents report removals 0.5 s and 0.4 s after T0.
    a.report(vec![rules_removed(IP, t0 + S / 2)]).await;
    b.report(vec![rules_removed(IP, t0 + 4 * S / 10)]).await;
    double.finish_deletion::<Pod>("shop", "web-1").unwrap();
    wait_until("deletion stored", || async {
        get(agg.http_addr, "/v1/deletions")
            .await
            .1
            .contains("web-1")
    })
    .await;
    let (_, body) = get(agg.http_addr, "/v1/deletions").await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let uid = list["items"][0]["podUid"].as_str().unwrap();
    let (_, body) = get(agg.http_addr, &format!("/v1/deletions/{uid}")).await;
    let detail: serde_json::Value = serde_json::from_str(&body).unwrap();
    let nodes = detail["nodes"].as_array().unwrap();
    let a_latency = nodes.iter().find(|n| n["node"] == "node-a").unwrap()["latencySeconds"]
        .as_f64()
        .unwrap();
    assert!(
        a_latency >= 0.49,
        "node-a's latency {a_latency} s is the forged one"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn a_token_review_outage_refuses_everyone_and_reviews_are_cached() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let a = Agent::connect(agg.grpc_addr, "node-a").await;
    let before = double.token_reviews();
    let mut c = a.client.clone();
    for _ in 0..3 {
        c.sync_clock(pb::ClockSyncRequest {
            agent_id: a.id.clone(),
            t1_unix_nanos: now_on_the_wire(),
        })
        .await
        .unwrap();
    }
    assert_eq!(double.token_reviews(), before, "answered from the cache");

    // A token the aggregator has not reviewed yet, while reviews fail.
    let fresh = identity::agent_token(&double, "node-b", AUDIENCE).unwrap();
    double.set_reviews_unavailable(true);
    refused(&agg, "node-b", Some(&fresh), Code::Unavailable).await;
    assert_eq!(refusals(&agg, "review_unavailable"), 1);
    let m = agg.http.metrics.encode();
    assert!(
        m.contains("prestop_token_reviews_total{reason=\"unavailable\"} 1"),
        "{m}"
    );
    // The outage was not cached: the same token works once reviews do.
    double.set_reviews_unavailable(false);
    // Before the watchers have listed (a restart), an agent of a node not
    // known yet is told to retry, not refused as speaking for an unknown
    // node; a known node's agent gets in at once.
    // (The token first: its agent pod is an API event, which the watchers
    // take as being in sync.)
    let ghost = identity::agent_token(&double, "ghost", AUDIENCE).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    agg.http.ready.set(false);
    refused(&agg, "ghost", Some(&ghost), Code::Unavailable).await;
    assert_eq!(refusals(&agg, "starting"), 1);
    Agent::try_connect(agg.grpc_addr, "node-a", "node-a/early", None)
        .await
        .map(drop)
        .unwrap_err();
    let early = agent_token(agg.grpc_addr, "node-a").unwrap();
    Agent::try_connect(agg.grpc_addr, "node-a", "node-a/early", Some(&early))
        .await
        .unwrap();
    agg.http.ready.set(true);
    Agent::try_connect(agg.grpc_addr, "node-b", "node-b/test", Some(&fresh))
        .await
        .unwrap();
    agg.shutdown().await;
}

#[tokio::test]
async fn deletions_need_a_reader_allowed_by_rbac_recommendations_stay_open() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let url = |path: &str| format!("http://{}{path}", agg.http_addr);
    let anonymous = lab::http_client::HttpClient::default();
    let r = anonymous.get(&url("/v1/deletions")).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = anonymous.get(&url("/v1/recommendations")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // An agent's token is valid but RBAC grants it nothing here.
    let agent = agent_token(agg.grpc_addr, "node-a").unwrap();
    let r = anonymous
        .clone()
        .with_bearer(&agent)
        .get(&url("/v1/deletions"))
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let (status, _) = get(agg.http_addr, "/v1/deletions").await;
    assert_eq!(status, 200, "the reader is allowed");

    double.set_reviews_unavailable(true);
    let fresh = identity::reader_token(&double, "observer.prestop.dev", &["deletions"]).unwrap();
    let r = anonymous
        .with_bearer(&fresh)
        .get(&url("/v1/deletions"))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    agg.shutdown().await;
}
