//! Root-only: the standalone binary, `observer-agent --netns PATH observe
//! --watch-endpoint IP:PORT --output json`, prints new_flow, rules_removed and
//! rules_added for kube-proxy's rules in that namespace.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lab::{
    kubeproxy::{Mode, Rules},
    netns::NetNs,
    root::root_or_skip,
};
use serde_json::Value;

mod fixture;

use fixture::{VIP, backend, service};

/// The next JSON line of `kind`, skipping others, within `limit`.
fn next_of(lines: &mpsc::Receiver<Value>, kind: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} line in time"));
        if line["kind"] == kind {
            return line;
        }
    }
}

#[test]
fn observe_prints_rules_and_flow_events_for_watched_endpoints() {
    if !root_or_skip("observe_prints_rules_and_flow_events_for_watched_endpoints") {
        return;
    }
    let ns = NetNs::create("dpcli").unwrap();
    let (b1, b2) = (backend(1), backend(2));
    for b in [b1, b2] {
        ns.ip(&["addr", "add", &format!("{}/32", b.ip), "dev", "lo"])
            .unwrap();
    }
    ns.ip(&["route", "add", "172.30.0.0/16", "dev", "lo"])
        .unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    rules.sync(&[(service(), vec![b2])]).unwrap();
    let listener = ns
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .unwrap()
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_observer-agent"))
        .arg("--netns")
        .arg(ns.path())
        .args([
            "observe",
            "--watch-endpoint",
            "10.180.0.2:8080",
            "--output",
            "json",
            "--duration",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    next_of(&lines, "started", Duration::from_secs(10));

    ns.run(|| TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(1)))
        .unwrap()
        .expect("connects through the VIP");
    let flow = next_of(&lines, "new_flow", Duration::from_secs(3));
    assert_eq!(flow["dst"], "10.180.0.2:8080");
    assert_eq!(flow["original_dst"], "172.30.0.10:80");

    let applied = rules.sync(&[(service(), vec![b1])]).unwrap();
    let removed = next_of(&lines, "rules_removed", Duration::from_secs(3));
    assert_eq!(removed["endpoint"], "10.180.0.2:8080");
    assert_eq!(removed["detector"], "nftables");
    let t = removed["time_unix_nano"].as_u64().unwrap();
    assert!(t >= applied.started_unix_nano && t <= applied.finished_unix_nano + 5_000_000);

    rules.sync(&[(service(), vec![b1, b2])]).unwrap();
    let added = next_of(&lines, "rules_added", Duration::from_secs(3));
    assert_eq!(added["endpoint"], "10.180.0.2:8080");

    let _ = child.kill();
    let _ = child.wait();
    drop(listener);
}
