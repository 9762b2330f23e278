//! Root-only: `observer-agent run` in a namespace with kube-proxy-shaped
//! rules, told by the real aggregator (fed by the Kubernetes API double) that
//! a pod is terminating, reports the raw observations of that endpoint: the
//! aggregator's record of the deletion holds this node's rules removal (its
//! detector and time) and the late connection through the Service. A flow
//! to another port of the pod's address is dropped by the agent's watched
//! set and counted on its `/metrics`. The agent runs as deployed: TLS to
//! the aggregator, its pod's token in a file.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aggregator::{app, config::Settings, store::Store};
use apiserver_double::{ApiServerDouble, objects};
use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use lab::{commit_clock::Window, http_client::HttpClient, netns::NetNs, root::root_or_skip};
use serde_json::Value;

mod common;

use common::secured::{Files, secured};
use common::{TwoBackendNode, VIP, backend, service, two_backend_node};

const POD_IP: &str = "10.180.0.2";

fn pod() -> Pod {
    objects::pod("shop", "web-2", POD_IP, "node-a")
}

fn slice(pod: &Pod, terminating: bool) -> EndpointSlice {
    objects::endpoint_slice("shop", "web", &[(pod, !terminating, terminating)])
}

/// Polls the agent's `/metrics` (from inside its namespace) until every
/// line of `want` is in it.
async fn wait_metrics(ns: &NetNs, health: SocketAddr, want: &[&str]) -> String {
    let client = HttpClient::in_netns(&ns.path());
    let url = format!("http://{health}/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(response) = client.get_ok(&url).await {
            let body = response.text();
            if want.iter().all(|line| body.lines().any(|l| l == *line)) {
                return body;
            }
            last = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{want:?}: not within 10 s; last /metrics: {last:?}");
}

/// The aggregator's record of the deletion of `uid`, once stored, in its
/// JSON form (as `GET /v1/deletions` serves it).
async fn wait_deletion(store: &Store, uid: &str) -> Value {
    for _ in 0..500 {
        if let Some(d) = store.deletion(uid).unwrap() {
            return serde_json::to_value(d).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("deletion {uid} never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_the_raw_observations_of_watched_endpoints() {
    if !root_or_skip("run_reports_the_raw_observations_of_watched_endpoints") {
        return;
    }
    let b1 = backend(1);
    let TwoBackendNode {
        ns,
        mut rules,
        listeners,
    } = two_backend_node("dprun");

    // The aggregator's gRPC socket lives in the node's namespace, where the
    // agent works; its HTTP API stays on the host.
    let double = ApiServerDouble::start().await.unwrap();
    // Only nodes in the Node list report.
    double
        .create(&objects::node("node-a", "192.168.0.1", "10.244.0.0/24"))
        .unwrap();
    let web2 = double.create(&pod()).unwrap();
    double.create(&slice(&web2, false)).unwrap();
    let (grpc, health) = ns
        .run(|| {
            let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
            grpc.set_nonblocking(true).unwrap();
            let health = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            (grpc, health)
        })
        .unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let files = Files::new();
    files.node_a_token(&double).await;
    let store = Arc::new(Store::open(files.store()).unwrap());
    let agg = app::start(
        secured(Settings::default(), &files),
        store.clone(),
        tokio::net::TcpListener::from_std(grpc).unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Some(double.kube_config()),
    )
    .unwrap();

    let agent = Command::new(env!("CARGO_BIN_EXE_observer-agent"))
        .arg("--netns")
        .arg(ns.path())
        .args([
            "run",
            "--aggregator",
            &format!("https://{grpc_addr}"),
            "--node-name",
            "node-a",
            "--health-addr",
            &health.to_string(),
        ])
        .arg("--token-file")
        .arg(files.token())
        .arg("--ca-file")
        .arg(&files.tls.ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = KillOnDrop(agent);
    for _ in 0..500 {
        if agg.http.metrics.agents_connected.get() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        agg.http.metrics.agents_connected.get(),
        1,
        "agent connected"
    );
    wait_metrics(&ns, health, &["prestop_agent_watched_endpoints 0"]).await;

    double.delete::<Pod>("shop", "web-2", 30).unwrap();
    double.update(&slice(&web2, true)).unwrap();
    wait_metrics(&ns, health, &["prestop_agent_watched_endpoints 1"]).await;

    // Late flows: through the VIP (to the watched endpoint) and directly to
    // another port of the pod's address (not watched: dropped by the agent).
    let connect = |to: SocketAddr| {
        ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connects to {to}: {e}"))
    };
    connect(SocketAddr::from((VIP, 80)));
    connect("10.180.0.2:9090".parse().unwrap());
    wait_metrics(
        &ns,
        health,
        &[
            "prestop_agent_observations_total{kind=\"new_flow\"} 1",
            "prestop_agent_flows_not_watched_total 1",
        ],
    )
    .await;

    let applied = Window::from(rules.sync(&[(service(), vec![b1])]).unwrap());
    wait_metrics(
        &ns,
        health,
        &["prestop_agent_observations_total{kind=\"rules_removed\"} 1"],
    )
    .await;

    // The deletion completes: the aggregator folds what the agent reported.
    double.finish_deletion::<Pod>("shop", "web-2").unwrap();
    let uid = web2.metadata.uid.clone().unwrap();
    let d = wait_deletion(&store, &uid).await;
    let time = |v: &Value| {
        v.as_i64()
            .unwrap_or_else(|| panic!("a time, not {v}, in {d}"))
    };
    // This node's measurement (the connections' accepting side, attributed
    // by source address, is another entry).
    let node = d["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == "node-a")
        .unwrap_or_else(|| panic!("no measurement of node-a in {d}"));
    assert_eq!(node["mode"], "nftables", "{d}");
    // Corrected by the agent's clock offset (same host: within its uncertainty).
    let removed = time(&node["rulesRemovedUnixNanos"]);
    let slack = 5_000_000;
    let (started, finished) = (
        applied.started.as_nanos() - slack,
        applied.finished.as_nanos() + slack,
    );
    assert!(
        (started..=finished).contains(&removed),
        "removal at {removed} outside the write [{started}, {finished}]: {d}"
    );
    let last = time(&node["lastConnectionUnixNanos"]);
    assert!(last >= time(&d["deletionStartUnixNanos"]), "{d}");
    assert!(node["lateConnections"].as_u64() >= Some(1), "{d}");
    wait_metrics(&ns, health, &["prestop_agent_watched_endpoints 0"]).await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut status = None;
    for _ in 0..200 {
        status = agent.0.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("agent stops within 10 s of SIGTERM");
    assert!(status.success(), "agent exit: {status}");
    agg.shutdown().await;
    drop(listeners);
}

/// The agent process, killed if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
