//! Root-only: the standalone binary, `observer-agent --netns PATH observe
//! --watch-endpoint IP:PORT --output json`, prints new_flow, rules_removed and
//! rules_added for kube-proxy's rules in that namespace, and the endpoint's
//! record when it stops.

use observer_proto::UnixNanos;
use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lab::root::root_or_skip;
use serde_json::Value;

mod fixture;

use fixture::{TwoBackendNode, VIP, backend, service, two_backend_node};

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
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
/// knows addresses only), and on SIGTERM an `endpoint_record` line carries
/// what the agent kept: first seen in rules (the endpoint already was a
/// target at start-up), the last removal, the late flow and its source.
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

    let before_start = unix_nanos();
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
    let started = lines.next_of("started", Duration::from_secs(10));
    let started_at = started["time_unix_nano"].as_u64().unwrap();

    let connect = |to: SocketAddr| {
        ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connects to {to}: {e}"))
    };
    // Through the kernel filter, dropped in user space: another port of the
    // watched endpoint's address, and an address watched for connections only.
    connect("10.180.0.2:9090".parse().unwrap());
    connect("10.180.0.1:8080".parse().unwrap());
    let connect_started = unix_nanos();
    connect(SocketAddr::from((VIP, 80)));
    let connect_returned = unix_nanos();
    // The flows come in order: the first printed is the one through the VIP.
    let flow = lines.next_of("new_flow", Duration::from_secs(3));
    assert_eq!(flow["dst"], "10.180.0.2:8080");
    assert_eq!(flow["original_dst"], "172.30.0.10:80");
    let flow_at = flow["time_unix_nano"].as_u64().unwrap();
    assert!(
        flow_at >= connect_started,
        "new_flow timed before its connect() started"
    );
    eprintln!(
        "new_flow time - connect() start: {} us, connect() took {} us",
        (flow_at - connect_started) / 1_000,
        (connect_returned - connect_started) / 1_000
    );

    let applied = rules.sync(&[(service(), vec![b1])]).unwrap();
    let removed = lines.next_of("rules_removed", Duration::from_secs(3));
    assert_eq!(removed["endpoint"], "10.180.0.2:8080");
    assert_eq!(removed["detector"], "nftables");
    let t = time(&removed);
    assert!(t >= applied.started_unix_nano && t <= applied.finished_unix_nano + 5_000_000);

    rules.sync(&[(service(), vec![b1, b2])]).unwrap();
    let added = lines.next_of("rules_added", Duration::from_secs(3));
    assert_eq!(added["endpoint"], "10.180.0.2:8080");

    let applied = rules.sync(&[(service(), vec![b1])]).unwrap();
    let removed = lines.next_of("rules_removed", Duration::from_secs(3));
    let removed_at = time(&removed);
    assert!(
        removed_at >= applied.started_unix_nano
            && removed_at <= applied.finished_unix_nano + 5_000_000
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let record = lines.next_of("endpoint_record", Duration::from_secs(5));
    assert_eq!(record["endpoint"], "10.180.0.2:8080");
    let first_seen = record["first_seen_in_rules_unix_nano"].as_u64().unwrap();
    assert!(
        first_seen >= before_start && first_seen <= started_at,
        "already a target when observe started: first seen at its start-up"
    );
    assert_eq!(record["in_rules_at_agent_start"], true);
    assert_eq!(record["rules_removed_unix_nano"], removed_at.as_nanos());
    assert_eq!(record["rules_removed_detector"], "nftables");
    assert_eq!(record["late_flows"], 1);
    assert_eq!(record["last_new_flow_unix_nano"], flow_at);
    assert_eq!(record["last_new_flow_src"], flow["src"]);
    assert_eq!(
        record["late_sources"].as_object().unwrap().len(),
        1,
        "{record}"
    );
    lines.next_of("stopped", Duration::from_secs(5));
    assert!(child.wait().unwrap().success());

    let other_flows: Vec<&Value> = lines
        .seen
        .iter()
        .filter(|l| l["kind"] == "new_flow" && l["dst"] != "10.180.0.2:8080")
        .collect();
    assert!(
        other_flows.is_empty(),
        "flows to no watched endpoint printed: {other_flows:?}"
    );
    let records = lines
        .seen
        .iter()
        .filter(|l| l["kind"] == "endpoint_record")
        .count();
    assert_eq!(
        records, 1,
        "one record per --watch-endpoint, none for --watch-ip"
    );
    drop(listeners);
}

/// An observation's time, from its JSON line.
fn time(observation: &serde_json::Value) -> UnixNanos {
    UnixNanos::from_nanos(observation["time_unix_nano"].as_i64().unwrap())
}
