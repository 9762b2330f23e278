//! Dataplane detection numbers (root): `cargo bench -p observer-agent --bench dataplane`.
//!
//! 1. Detection delay per kube-proxy mode over many endpoint removals and
//!    re-additions: the event's timestamp and its arrival at a consumer,
//!    relative to the transaction that changed the rules (`Applied`, wall
//!    clock around the `nft`/`iptables-restore` process, which includes its
//!    start-up; the kernel commit is near its end). Negative = before the
//!    writer process had returned.
//! 2. Scale: 1000 Services x 5 endpoints (5k endpoints, ~11k rules) per mode:
//!    mirror memory (RSS growth of loading the rulesets) and the time from
//!    the end of one full kube-proxy sync to the event it causes.
//!
//! Prints Markdown for docs/benchmarks.md.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lab::{
    kubeproxy::{Applied, Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::is_root,
};
use observer_agent::{
    dataplane,
    observation::{Observation, RulesChange},
    output::now_unix_nanos,
};
use tokio::sync::mpsc::{Receiver, channel};

const CHANGES: usize = 200;

fn service(i: usize) -> ServicePort {
    ServicePort {
        namespace: "bench".into(),
        name: format!("svc-{i}"),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::new(172, 30, (i / 250) as u8, (i % 250) as u8 + 1),
        port: 80,
    }
}

fn backend(i: usize, j: usize) -> Backend {
    let n = i * 5 + j;
    Backend {
        ip: Ipv4Addr::new(
            10,
            180 + (n / 62_500) as u8,
            ((n / 250) % 250) as u8,
            (n % 250) as u8 + 1,
        ),
        port: 8080,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(ns: f64) -> String {
    format!("{:.2}", ns / 1e6)
}

/// Waits for the next rules change, returning it with the time it arrived.
fn next(rx: &mut Receiver<Observation>, limit: Duration) -> (RulesChange, u64) {
    let deadline = Instant::now() + limit;
    loop {
        match rx.try_recv() {
            Ok(Observation::RulesRemoved(c) | Observation::RulesAdded(c)) => {
                return (c, now_unix_nanos());
            }
            Ok(_) => {}
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(50)),
            Err(_) => panic!("no event within {limit:?}"),
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn delay(mode: Mode) -> String {
    let ns = NetNs::create("bench").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    let svc = service(0);
    let (b1, b2) = (backend(0, 0), backend(0, 1));
    rules.sync(&[(svc.clone(), vec![b1, b2])]).unwrap();
    let (tx, mut rx) = channel(1024);
    let watch = ns.run(move || dataplane::spawn(tx)).unwrap().unwrap();
    watch.watch(SocketAddr::from((b2.ip, b2.port)));
    let (mut stamp_vs_end, mut after_finish, mut stamp_in_window, mut txn) =
        (vec![], vec![], 0, vec![]);
    for i in 0..CHANGES {
        let backends = if i % 2 == 0 { vec![b1] } else { vec![b1, b2] };
        let applied: Applied = rules.sync(&[(svc.clone(), backends)]).unwrap();
        let (change, arrived) = next(&mut rx, Duration::from_secs(5));
        stamp_vs_end.push(change.time_unix_nano as f64 - applied.finished_unix_nano as f64);
        after_finish.push(arrived as f64 - applied.finished_unix_nano as f64);
        txn.push((applied.finished_unix_nano - applied.started_unix_nano) as f64);
        if change.time_unix_nano >= applied.started_unix_nano
            && change.time_unix_nano <= applied.finished_unix_nano
        {
            stamp_in_window += 1;
        }
    }
    drop(watch);
    for v in [&mut stamp_vs_end, &mut after_finish, &mut txn] {
        v.sort_by(f64::total_cmp);
    }
    format!(
        "| {mode} | {CHANGES} | {} / {} | {} / {} | {} / {} | {stamp_in_window}/{CHANGES} |",
        ms(percentile(&stamp_vs_end, 0.5)),
        ms(percentile(&stamp_vs_end, 0.99)),
        ms(percentile(&after_finish, 0.5)),
        ms(percentile(&after_finish, 0.99)),
        ms(percentile(&txn, 0.5)),
        ms(percentile(&txn, 0.99)),
    )
}

fn scale(mode: Mode) -> String {
    let ns = NetNs::create("benchbig").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    let mut services: Vec<(ServicePort, Vec<Backend>)> = (0..1000)
        .map(|i| (service(i), (0..5).map(|j| backend(i, j)).collect()))
        .collect();
    let started = Instant::now();
    rules.sync(&services).unwrap();
    let initial_sync = started.elapsed();
    let (tx, mut rx) = channel(1024);
    let before = rss_kib();
    let load_started = Instant::now();
    let watch = ns.run(move || dataplane::spawn(tx)).unwrap().unwrap();
    let load = load_started.elapsed();
    let mirror_kib = rss_kib().saturating_sub(before);
    let target = services[500].1[2];
    watch.watch(SocketAddr::from((target.ip, target.port)));
    services[500].1.remove(2);
    let applied = rules.sync(&services).unwrap();
    let (change, arrived) = next(&mut rx, Duration::from_secs(30));
    assert_eq!(change.endpoint, SocketAddr::from((target.ip, target.port)));
    drop(watch);
    format!(
        "| {mode} | {:.0} | {:.0} | {mirror_kib} | {} | {} | {} |",
        initial_sync.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3,
        ms((applied.finished_unix_nano - applied.started_unix_nano) as f64),
        ms(change.time_unix_nano as f64 - applied.finished_unix_nano as f64),
        ms(arrived as f64 - applied.finished_unix_nano as f64),
    )
}

fn main() {
    if !is_root() {
        eprintln!("the dataplane bench needs root (network namespaces, netfilter)");
        return;
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    println!(
        "Detection delay, {CHANGES} alternating removals/additions of one endpoint (ms, p50 / p99):\n"
    );
    println!(
        "| mode | changes | event timestamp - transaction end | event received by consumer - transaction end | transaction (process) duration | event timestamp inside transaction |"
    );
    println!("|---|---|---|---|---|---|");
    for mode in Mode::ALL {
        println!("{}", delay(mode));
    }
    println!("\nScale, 1000 Services x 5 endpoints (5000 endpoints):\n");
    println!(
        "| mode | initial sync (ms) | detector start: dump + mirror (ms) | mirror RSS growth (KiB) | full resync removing one endpoint (ms) | event timestamp - resync end (ms) | event received - resync end (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mode in Mode::ALL {
        println!("{}", scale(mode));
    }
}
