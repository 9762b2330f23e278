//! Root-only: `observer-agent run` in a namespace with kube-proxy-shaped
//! rules, told by the real aggregator (fed by the Kubernetes API double) that
//! a pod is terminating, keeps that endpoint's record live and serves it on
//! its health server's `GET /endpoints`: first seen in rules (the endpoint
//! already was a target when the agent started), late flows and their
//! source, the rules removal, and the finished record once the aggregator
//! ends the watch. A flow to another port of the pod's address is counted as
//! not watched.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aggregator::{app, config::Settings, store::Store};
use apiserver_double::{ApiServerDouble, objects};
use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use lab::{netns::NetNs, root::root_or_skip};
use serde_json::Value;

mod fixture;

use fixture::{TwoBackendNode, VIP, backend, service, two_backend_node};

const POD_IP: &str = "10.180.0.2";
const ENDPOINT: &str = "10.180.0.2:8080";

fn pod() -> Pod {
    objects::pod("shop", "web-2", POD_IP, "node-a")
}

fn slice(pod: &Pod, terminating: bool) -> EndpointSlice {
    objects::endpoint_slice("shop", "web", &[(pod, !terminating, terminating)])
}

/// `GET /endpoints` of the agent, from inside its namespace.
fn endpoints(ns: &NetNs, health: SocketAddr) -> Option<Value> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&health, Duration::from_secs(1)).ok()?;
        s.write_all(b"GET /endpoints HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        serde_json::from_str(body).ok()
    })
    .unwrap()
}

/// Polls `GET /endpoints` until `done` holds for it.
fn wait_endpoints(
    ns: &NetNs,
    health: SocketAddr,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(v) = endpoints(ns, health) {
            if done(&v) {
                return v;
            }
            last = Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within 10 s; last /endpoints: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_live_endpoint_records() {
    if !root_or_skip("run_serves_live_endpoint_records") {
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
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("store.db")).unwrap());
    let agg = app::start(
        Settings::default(),
        store,
        tokio::net::TcpListener::from_std(grpc).unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Some(double.client().unwrap()),
    )
    .unwrap();

    let before_start = unix_nanos();
    let agent = Command::new(env!("CARGO_BIN_EXE_observer-agent"))
        .arg("--netns")
        .arg(ns.path())
        .args([
            "run",
            "--aggregator",
            &format!("http://{grpc_addr}"),
            "--node-name",
            "node-a",
            "--health-addr",
            &health.to_string(),
        ])
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
    let nothing = endpoints(&ns, health).expect("/endpoints answers");
    assert_eq!(nothing["watched"], serde_json::json!([]));

    double.delete::<Pod>("shop", "web-2", 30).unwrap();
    double.update(&slice(&web2, true)).unwrap();
    let v = wait_endpoints(&ns, health, "record of the terminating endpoint", |v| {
        v["watched"][0]["endpoint"] == ENDPOINT
    });
    let record = &v["watched"][0];
    let first_seen = record["first_seen_in_rules_unix_nano"]
        .as_u64()
        .expect("first seen in rules: a target when the agent started");
    assert!(first_seen >= before_start, "{record}");
    assert_eq!(record["in_rules_at_agent_start"], true, "{record}");
    assert_eq!(record["rules_removed_unix_nano"], Value::Null);
    let t0 = record["deletion_started_unix_nano"].as_u64().unwrap();
    assert!(t0 > 0);

    // Late flows: through the VIP (to the watched endpoint) and directly to
    // another port of the pod's address (not watched).
    let connect = |to: SocketAddr| {
        ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connects to {to}: {e}"))
    };
    connect(SocketAddr::from((VIP, 80)));
    connect("10.180.0.2:9090".parse().unwrap());
    let v = wait_endpoints(&ns, health, "late flow and unwatched flow", |v| {
        v["watched"][0]["late_flows"] == 1 && v["flows_not_watched"] == 1
    });
    let record = &v["watched"][0];
    assert!(record["last_new_flow_unix_nano"].as_u64().unwrap() >= t0);
    assert!(record["last_new_flow_src"].is_string(), "{record}");
    assert_eq!(record["late_sources"].as_object().unwrap().len(), 1);

    let applied = rules.sync(&[(service(), vec![b1])]).unwrap();
    let v = wait_endpoints(&ns, health, "rules removal", |v| {
        v["watched"][0]["rules_removed_unix_nano"].is_u64()
    });
    let record = &v["watched"][0];
    let removed =
        observer_proto::UnixNanos::from_wire(record["rules_removed_unix_nano"].as_u64().unwrap())
            .unwrap();
    assert!(
        removed >= applied.started_unix_nano && removed <= applied.finished_unix_nano + 5_000_000,
        "{record}"
    );
    assert_eq!(record["rules_removed_detector"], "nftables");
    assert_eq!(
        record["first_seen_in_rules_unix_nano"], first_seen,
        "kept through the removal"
    );

    // The deletion completes: the aggregator ends the watch, the record is
    // kept among the finished ones.
    double.finish_deletion::<Pod>("shop", "web-2").unwrap();
    let v = wait_endpoints(&ns, health, "finished record", |v| {
        v["watched"] == serde_json::json!([]) && v["finished"][0]["endpoint"] == ENDPOINT
    });
    assert_eq!(
        v["finished"][0]["rules_removed_unix_nano"],
        removed.as_nanos()
    );
    assert_eq!(v["finished"][0]["late_flows"], 1);

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

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
