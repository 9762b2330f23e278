//! The real `prestop-drain` binary against the real aggregator (secured
//! by the API double's TokenReview, agents over gRPC) and against broken
//! ones over real sockets: it returns early only when the aggregator says
//! drained, and otherwise never before its fallback.

#[path = "../../aggregator/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use aggregator::config::Settings;
use apiserver_double::ApiServerDouble;
use apiserver_double::objects::endpoint_slice;
use common::lab::*;
use k8s_openapi::api::core::v1::Pod;

const IP: &str = "10.244.0.5";

/// A token bound to pod shop/`pod` for the aggregator's audience, in a file
/// under `dir`, as the pod's projected volume holds it.
fn token_file(double: &ApiServerDouble, pod: &str, dir: &Path) -> std::path::PathBuf {
    let token = lab::identity::pod_token(double, "shop", pod).unwrap();
    let file = dir.join(format!("token-{pod}"));
    std::fs::write(&file, token).unwrap();
    file
}

/// Runs the hook as pod shop/web-1 against `aggregator`: its output and
/// how long it took.
async fn hook(aggregator: &str, token: &Path, fallback: &str, max: &str) -> (Output, f64) {
    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_prestop-drain"))
        .env("POD_NAMESPACE", "shop")
        .env("POD_NAME", "web-1")
        .env("PRESTOP_DRAIN_AGGREGATOR", aggregator)
        .env("PRESTOP_DRAIN_TOKEN_FILE", token)
        .args(["--fallback", fallback, "--max", max])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (out, started.elapsed().as_secs_f64())
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn drained_returns_long_before_the_fallback() {
    let Cluster { double, web1 } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(Settings::default(), &dir.path().join("s.db"), Some(&double)).await;
    let mut a = Agent::connect(agg.grpc_addr, "node-a").await;
    let mut b = Agent::connect(agg.grpc_addr, "node-b").await;
    let token = token_file(&double, "web-1", dir.path());
    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    double
        .update(&endpoint_slice("shop", "web", &[(&web1, false, true)]))
        .unwrap();
    let t0 = a.next_add().await.deletion_start_unix_nanos;
    b.next_add().await;
    a.report(vec![rules_removed(IP, t0 + 100_000_000)]).await;
    b.report(vec![rules_removed(IP, t0 + 200_000_000)]).await;

    let url = format!("http://{}", agg.http_addr);
    let (out, took) = hook(&url, &token, "30s", "20s").await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("drained after"), "{}", text(&out));
    assert!(
        took < 5.0,
        "took {took} s of a 30 s fallback: {}",
        text(&out)
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn a_timeout_answer_sleeps_the_rest_of_the_fallback() {
    let Cluster { double, .. } = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(Settings::default(), &dir.path().join("s.db"), Some(&double)).await;
    let token = token_file(&double, "web-1", dir.path());
    // web-1 is not being deleted: the aggregator answers timeout at max.
    let url = format!("http://{}", agg.http_addr);
    let (out, took) = hook(&url, &token, "2500ms", "1s").await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not drained"), "{}", text(&out));
    assert!((2.5..4.0).contains(&took), "took {took} s: {}", text(&out));
    agg.shutdown().await;
}

#[tokio::test]
async fn a_refused_token_falls_back() {
    let Cluster { double, .. } = cluster().await;
    add_web2(&double);
    let dir = tempfile::tempdir().unwrap();
    let agg = start_aggregator(Settings::default(), &dir.path().join("s.db"), Some(&double)).await;
    let url = format!("http://{}", agg.http_addr);
    let other = token_file(&double, "web-2", dir.path());
    let made_up = dir.path().join("made-up");
    std::fs::write(&made_up, "not-a-token\n").unwrap();
    let missing = dir.path().join("missing");
    for (token, says) in [
        (&other, "answered 403"),
        (&made_up, "answered 401"),
        (&missing, "reading the token"),
    ] {
        let (out, took) = hook(&url, token, "1500ms", "20s").await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(says), "{}", text(&out));
        assert!((1.5..3.0).contains(&took), "took {took} s: {}", text(&out));
    }
    agg.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_aggregator_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    // A port nothing listens on any more: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (out, took) = hook(&format!("http://127.0.0.1:{port}"), &token, "1500ms", "20s").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("connecting to 127.0.0.1"),
        "{}",
        text(&out)
    );
    assert!((1.5..3.0).contains(&took), "took {took} s: {}", text(&out));
}

#[tokio::test]
async fn an_aggregator_that_never_answers_is_given_up_after_max() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    // Accepts and reads, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    // max 1 s plus the 5 s slack for the answer; the fallback passed by then.
    let (out, took) = hook(&format!("http://{addr}"), &token, "2s", "1s").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no complete answer by the deadline"),
        "{}",
        text(&out)
    );
    assert!((6.0..8.0).contains(&took), "took {took} s: {}", text(&out));
    silent.abort();
}

#[test]
fn bad_flags_exit_2_without_waiting() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prestop-drain"))
        .env_remove("POD_NAME")
        .args(["--namespace", "shop", "--fallback", "10s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pod"));
}

#[test]
fn copy_to_installs_a_runnable_copy() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("prestop-drain");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prestop-drain"))
        .arg("--copy-to")
        .arg(&to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let copy = std::process::Command::new(&to)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&copy.stdout).trim(),
        format!("prestop-drain {}", env!("CARGO_PKG_VERSION"))
    );
    // --copy-to does nothing else.
    let both = std::process::Command::new(env!("CARGO_BIN_EXE_prestop-drain"))
        .arg("--copy-to")
        .arg(&to)
        .args(["--fallback", "1s"])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2), "{}", text(&both));
}
