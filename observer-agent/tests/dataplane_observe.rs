//! Root-only: the standalone binary, `observer-agent --netns PATH observe
//! --watch-endpoint IP:PORT --output json`, prints new_flow, rules_removed and
//! rules_added for kube-proxy's rules in that namespace: the raw
//! observations, filtered to the watched endpoint.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lab::{commit_clock::Window, root::root_or_skip};
use observer_proto::UnixNanos;
use serde_json::Value;

mod common;

use common::{TwoBackendNode, VIP, backend, service, two_backend_node};

/// A line's `time_unix_nano`.
fn time(line: &Value) -> UnixNanos {
    serde_json::from_value(line["time_unix_nano"].clone())
        .unwrap_or_else(|e| panic!("time_unix_nano of {line}: {e}"))
}

/// The JSON lines of the child, and every line read so far.
struct Lines {
    rx: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Lines {
    /// The next line of `kind`, skipping others, within `limit`.
    fn next_of(&mut self, kind: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {kind} line in time; seen: {:?}", self.seen));
            self.seen.push(line.clone());
            if line["kind"] == kind {
                return line;
            }
        }
    }
}

/// Also: new flows to another port of the watched endpoint's address and to
/// a `--watch-ip` address are not printed (the kernel filter passes them: it
/// knows addresses only), and SIGTERM ends the output with `stopped`.
#[test]
fn observe_prints_rules_and_flow_events_for_watched_endpoints() {
    if !root_or_skip("observe_prints_rules_and_flow_events_for_watched_endpoints") {
        return;
    }
    let (b1, b2) = (backend(1), backend(2));
    let TwoBackendNode {
        ns,
        mut rules,
        listeners,
    } = two_backend_node("dpcli");

    let mut child = Command::new(env!("CARGO_BIN_EXE_observer-agent"))
        .arg("--netns")
        .arg(ns.path())
        .args([
            "observe",
            "--watch-endpoint",
            "10.180.0.2:8080",
            "--watch-ip",
            "10.180.0.1",
            "--output",
            "json",
            "--duration",
            "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    let mut lines = Lines {
        rx,
        seen: Vec::new(),
    };
    lines.next_of("started", Duration::from_secs(10));

    let connect = |to: SocketAddr| {
        ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connects to {to}: {e}"))
    };
    // Through the kernel filter, dropped in user space: another port of the
    // watched endpoint's address, and an address watched for connections only.
    connect("10.180.0.2:9090".parse().unwrap());
    connect("10.180.0.1:8080".parse().unwrap());
    let connect_started = UnixNanos::now();
    connect(SocketAddr::from((VIP, 80)));
    let connect_returned = UnixNanos::now();
    // The flows come in order: the first printed is the one through the VIP.
    let flow = lines.next_of("new_flow", Duration::from_secs(3));
    assert_eq!(flow["dst"], "10.180.0.2:8080");
    assert_eq!(flow["original_dst"], "172.30.0.10:80");
    let flow_at = time(&flow);
    assert!(
        flow_at >= connect_started,
        "new_flow timed before its connect() started"
    );
    eprintln!(
        "new_flow time - connect() start: {} us, connect() took {} us",
        (flow_at - connect_started) / 1_000,
        (connect_returned - connect_started) / 1_000
    );

    let applied = Window::from(rules.sync(&[(service(), vec![b1])]).unwrap());
    let removed = lines.next_of("rules_removed", Duration::from_secs(3));
    assert_eq!(removed["endpoint"], "10.180.0.2:8080");
    assert_eq!(removed["detector"], "nftables");
    assert_eq!(removed["precision_ns"].as_u64().map(|p| p > 0), Some(true));
    let t = time(&removed);
    assert!(t >= applied.started && t <= applied.finished + 5_000_000);

    rules.sync(&[(service(), vec![b1, b2])]).unwrap();
    let added = lines.next_of("rules_added", Duration::from_secs(3));
    assert_eq!(added["endpoint"], "10.180.0.2:8080");

    let applied = Window::from(rules.sync(&[(service(), vec![b1])]).unwrap());
    let removed = lines.next_of("rules_removed", Duration::from_secs(3));
    let removed_at = time(&removed);
    assert!(removed_at >= applied.started && removed_at <= applied.finished + 5_000_000);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    lines.next_of("stopped", Duration::from_secs(5));
    assert!(child.wait().unwrap().success());

    let flows: Vec<&Value> = lines
        .seen
        .iter()
        .filter(|l| l["kind"] == "new_flow")
        .collect();
    assert_eq!(
        flows,
        [&flow],
        "one flow printed, the one to the watched endpoint"
    );
    // Connection events are watched by address (both addresses here).
    let connection = [
        "accepted",
        "connected",
        "closed",
        "reset_sent",
        "reset_received",
    ];
    let kinds: Vec<&str> = lines
        .seen
        .iter()
        .filter_map(|l| l["kind"].as_str())
        .filter(|k| !connection.contains(k))
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "new_flow",
            "rules_removed",
            "rules_added",
            "rules_removed",
            "stopped"
        ],
        "rules and flow observations only, between started and stopped"
    );
    drop(listeners);
}
