//! `GET /v1/drain` against the real aggregator on real sockets, secured as
//! deployed (the double's TokenReview), with agents reporting over gRPC:
//! it answers as soon as every node removed the pod and no router sent it
//! a connection for its quiet period, at `max` otherwise, only to the pod
//! itself, and within its bounds.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aggregator::config::Settings;
use aggregator::drain::DrainSettings;
use aggregator::limits::Limits;
use apiserver_double::ApiServerDouble;
use apiserver_double::objects::endpoint_slice;
use common::lab::*;
use k8s_openapi::api::core::v1::Pod;
use lab::http_client::HttpClient;
use lab::identity;
use observer_proto::api::{DrainAnswer, DrainOutcome, RouterKind};

const S: u64 = 1_000_000_000;
const IP: &str = "10.244.0.5";
/// A client pod on node-b (its pod CIDR): node-b's kube-proxy routed it.
const FROM_B: &str = "10.244.1.7";
/// Outside every node and pod range: an external load balancer.
const EXTERNAL: &str = "203.0.113.9";

fn settings() -> Settings {
    Settings {
        completion_timeout: Duration::from_secs(60),
        drain: DrainSettings {
            drain_min_quiet: Duration::from_millis(500),
            ..DrainSettings::DEFAULT
        },
        ..Settings::default()
    }
}

/// The secured aggregator with `limits`, its store in `dir`.
async fn start_limited(
    double: &ApiServerDouble,
    dir: &std::path::Path,
    limits: Limits,
) -> aggregator::app::Running {
    let settings = Settings {
        limits,
        ..settings()
    };
    start_aggregator(settings, &dir.join("s.db"), Some(double)).await
}

/// A token bound to pod `namespace/pod`: what its projected volume holds.
fn pod_token(double: &ApiServerDouble, namespace: &str, pod: &str) -> String {
    identity::pod_token(double, namespace, pod).unwrap()
}

/// `GET /v1/drain` with `token`: (status, body, seconds it took).
async fn ask(http: SocketAddr, token: Option<&str>, query: &str) -> (u16, String, f64) {
    let client = match token {
        Some(t) => HttpClient::default().with_bearer(t),
        None => HttpClient::default(),
    };
    let started = Instant::now();
    let r = client
        .get(&format!("http://{http}/v1/drain?{query}"))
        .await
        .unwrap();
    (r.status, r.text(), started.elapsed().as_secs_f64())
}

async fn drained(http: SocketAddr, token: &str, query: &str) -> (DrainAnswer, f64) {
    let (status, body, took) = ask(http, Some(token), query).await;
    assert_eq!(status, 200, "{body}");
    (serde_json::from_str(&body).unwrap(), took)
}

/// Deletes web-1 and waits until both agents were told to watch it;
/// returns T0 as the agents got it.
async fn delete_web1(double: &ApiServerDouble, web1: &Pod, a: &mut Agent, b: &mut Agent) -> u64 {
    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    double
        .update(&endpoint_slice("shop", "web", &[(web1, false, true)]))
        .unwrap();
    let ep = a.next_add().await;
    b.next_add().await;
    ep.deletion_start_unix_nanos
}

#[tokio::test]
async fn drained_once_every_node_removed_the_pod_and_its_routers_are_quiet() {
    let Cluster { double, web1 } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    let token = pod_token(&double, "shop", "web-1");
    let t0 = delete_web1(&double, &web1, &mut a, &mut b).await;

    let http = agg.http_addr;
    let answer = tokio::spawn({
        let token = token.clone();
        async move { drained(http, &token, "namespace=shop&pod=web-1&max=20").await }
    });
    // node-b's clients keep connecting to the pod for a while, the
    // external balancer once; both nodes remove it.
    let now = || common::lab::now_on_the_wire();
    a.report(vec![rules_removed(IP, t0 + S / 10)]).await;
    for _ in 0..10 {
        a.report(vec![accepted(FROM_B, IP, now())]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.report(vec![accepted(EXTERNAL, IP, now())]).await;
    let last_connection = Instant::now();
    b.report(vec![rules_removed(IP, now())]).await;
    let removed = Instant::now();

    let (answer, took) = answer.await.unwrap();
    assert_eq!(answer.outcome, DrainOutcome::Drained, "{answer:?}");
    assert_eq!((answer.nodes_expected, answer.nodes_removed), (2, 2));
    assert!(answer.missing_nodes.is_empty());
    // The external router sent one connection about a second after T0:
    // ln(1000) connection intervals, about 7 s, before it counts as gone.
    let external = answer.limiting_router.clone().unwrap();
    assert_eq!(external.kind, RouterKind::External, "{answer:?}");
    assert!(answer.quiet_seconds > 3.0, "{answer:?}");
    let quiet_since = last_connection.elapsed().as_secs_f64();
    assert!(
        quiet_since + 0.3 >= answer.quiet_seconds,
        "answered {quiet_since} s after the last connection, quiet period {} s",
        answer.quiet_seconds
    );
    assert!(removed.elapsed().as_secs_f64() >= answer.quiet_seconds - 0.3);
    assert!(took < 20.0, "waited for max: {answer:?}");
    assert!(
        (answer.waited_seconds - took).abs() < 0.5,
        "{answer:?} {took}"
    );
    assert!(
        answer.reason.contains("all 2 expected nodes"),
        "{}",
        answer.reason
    );

    let m = agg.http.metrics.encode();
    assert!(
        m.contains("prestop_drains_total{outcome=\"drained\"} 1"),
        "{m}"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn a_node_that_never_reports_holds_the_drain_until_max() {
    let Cluster { double, web1 } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    let token = pod_token(&double, "shop", "web-1");
    let t0 = delete_web1(&double, &web1, &mut a, &mut b).await;
    a.report(vec![rules_removed(IP, t0 + S / 10)]).await;

    let (answer, took) = drained(agg.http_addr, &token, "namespace=shop&pod=web-1&max=1.5").await;
    assert_eq!(answer.outcome, DrainOutcome::Timeout, "{answer:?}");
    assert!((1.5..3.0).contains(&took), "{took}");
    assert_eq!(answer.missing_nodes, ["node-b"]);
    assert_eq!((answer.nodes_expected, answer.nodes_removed), (2, 1));
    assert_eq!(answer.limiting_router.unwrap().name, "node-b");
    assert!(answer.reason.contains("1 of 2"), "{}", answer.reason);

    // Its removal ends the next drain at once (the quiet minimum passed).
    b.report(vec![rules_removed(IP, now_on_the_wire())]).await;
    let (answer, took) = drained(agg.http_addr, &token, "namespace=shop&pod=web-1&max=10").await;
    assert_eq!(answer.outcome, DrainOutcome::Drained, "{answer:?}");
    assert!(took < 1.0, "{took}");
    agg.shutdown().await;
}

#[tokio::test]
async fn an_unknown_deletion_times_out_and_max_is_clamped() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_drain_seconds: 1,
        ..Limits::DEFAULT
    };
    let agg = start_limited(&double, dir.path(), limits).await;
    let token = pod_token(&double, "shop", "web-1");
    // Nobody deleted web-1: nothing to wait for, and max=100 is cut to 1 s.
    let (answer, took) = drained(agg.http_addr, &token, "namespace=shop&pod=web-1&max=100").await;
    assert_eq!(answer.outcome, DrainOutcome::Timeout);
    assert!((1.0..2.0).contains(&took), "{took}");
    assert_eq!(answer.since_deletion_seconds, None);
    assert!(answer.reason.contains("no deletion"), "{}", answer.reason);
    agg.shutdown().await;
}

#[tokio::test]
async fn only_the_pod_itself_may_ask_and_bad_parameters_are_refused() {
    let Cluster { double, .. } = cluster().await;
    add_web2(&double);
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(settings(), &dir.path().join("s.db"), Some(&double)).await;
    let http = agg.http_addr;
    let q = "namespace=shop&pod=web-1&max=1";
    let other_pod = pod_token(&double, "shop", "web-2");
    let agent = agent_token(agg.grpc_addr, "node-a").unwrap();
    let reader = credentials(http).unwrap().reader.clone();
    for (token, status, says) in [
        (None, 401, "no bearer token"),
        (Some("made-up"), 401, "refused by TokenReview"),
        (
            Some(other_pod.as_str()),
            403,
            "shop/web-2 may only ask about that pod",
        ),
        // The agent's token is bound to a pod too: its own.
        (Some(agent.as_str()), 403, "may only ask about that pod"),
        (Some(reader.as_str()), 403, "no pod's ServiceAccount token"),
    ] {
        let (got, body, _) = ask(http, token, q).await;
        assert_eq!(got, status, "{token:?}: {body}");
        assert!(body.contains(says), "{token:?}: {body}");
    }
    let token = pod_token(&double, "shop", "web-1");
    for (query, says) in [
        ("namespace=shop&pod=web-1", "max is required"),
        ("namespace=shop&pod=web-1&max=0", "above 0"),
        ("namespace=shop&pod=web-1&max=soon", "max must be a number"),
        ("pod=web-1&max=1", "namespace is required"),
        ("namespace=shop&pod=web-1&max=1&node=a", "unknown parameter"),
    ] {
        let (got, body, _) = ask(http, Some(&token), query).await;
        assert_eq!(got, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let m = agg.http.metrics.encode();
    assert!(
        m.contains("prestop_drains_total{outcome=\"refused\"} 5"),
        "{m}"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn waiting_drains_are_bounded() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_drain_waits: 1,
        ..Limits::DEFAULT
    };
    let agg = start_limited(&double, dir.path(), limits).await;
    let http = agg.http_addr;
    let token = pod_token(&double, "shop", "web-1");
    let first = tokio::spawn({
        let token = token.clone();
        async move { drained(http, &token, "namespace=shop&pod=web-1&max=2").await }
    });
    wait_until("the first drain waits", || async {
        agg.http
            .metrics
            .encode()
            .contains("prestop_token_reviews_total{reason=\"authenticated\"}")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body, took) = ask(http, Some(&token), "namespace=shop&pod=web-1&max=2").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("--max-drain-waits"), "{body}");
    assert!(took < 1.0, "a refused drain does not wait: {took}");
    assert_eq!(first.await.unwrap().0.outcome, DrainOutcome::Timeout);
    // The slot is free again.
    let (status, _, _) = ask(http, Some(&token), "namespace=shop&pod=web-1&max=0.2").await;
    assert_eq!(status, 200);
    agg.shutdown().await;
}
