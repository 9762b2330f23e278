//! Kernel cost of the destination-side programs per tracepoint invocation,
//! from the kernel's own accounting (`kernel.bpf_stats_enabled`: run_time_ns
//! / run_cnt per program), under a bounded loopback connection storm between
//! two network namespaces: to a watched address and to an unwatched one,
//! alternately for several rounds. The machine's other work only ever adds
//! to a round's cost, so the median and the minimum of the rounds are
//! printed per program and target. Needs root.
//!
//!     cargo bench -p observer-agent --bench tracepoint_cost [-- CONNECTIONS [ROUNDS [DRAIN_MS]]]
//!
//! DRAIN_MS is how often the ring buffer is read, by default the agent's own
//! interval.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::sys::{Stats, enable_stats};
use lab_netns::netns::{NetNs, link};
use observer_agent::kernel::{
    Kernel, LoadOptions, conn_events::DRAIN_INTERVAL, tracefs::CONN_TRACEPOINTS,
};

const DEFAULT_CONNECTIONS: usize = 20_000;
const DEFAULT_ROUNDS: usize = 5;
/// Bound on each storm, whatever the connection count.
const STORM_LIMIT: Duration = Duration::from_secs(120);

fn main() -> anyhow::Result<()> {
    // cargo bench passes `--bench`; the numbers are ours.
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let connections = numbers.first().copied().unwrap_or(DEFAULT_CONNECTIONS);
    let rounds = numbers.get(1).copied().unwrap_or(DEFAULT_ROUNDS).max(1);
    let drain = numbers
        .get(2)
        .map_or(DRAIN_INTERVAL, |ms| Duration::from_millis(*ms as u64));
    if !lab_netns::root::is_root() {
        anyhow::bail!("tracepoint_cost needs root (eBPF, network namespaces)");
    }
    let _stats = enable_stats(Stats::RunTime)?;
    lab_netns::netns::reap_stale();
    let server = NetNs::create("bsrv")?;
    let client = NetNs::create("bcli")?;
    let watched: IpAddr = "10.209.0.1".parse()?;
    let unwatched: IpAddr = "10.209.0.3".parse()?;
    link(
        &server,
        "10.209.0.1".parse()?,
        &client,
        "10.209.0.2".parse()?,
        24,
    )?;
    server.ip(&["addr", "add", "10.209.0.3/32", "dev", "lo"])?;

    let mut kernel = Kernel::load(LoadOptions::default())?;
    kernel.watch_ip(watched)?;
    let mut ring = kernel.take_conn_events().expect("ring buffer");
    let draining = AtomicBool::new(true);

    println!(
        "{connections} connections per storm (connect, accept, close both sides), {rounds} rounds, ring read every {drain:?}"
    );
    // (program, target) -> ns per invocation of each round, and invocations.
    let mut costs: BTreeMap<(&str, &str), (Vec<f64>, u64)> = BTreeMap::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| {
            while draining.load(Ordering::Relaxed) {
                while ring.next().is_some() {}
                std::thread::sleep(drain);
            }
        });
        let result = (|| -> anyhow::Result<()> {
            for round in 1..=rounds {
                for (label, ip) in [("watched", watched), ("unwatched", unwatched)] {
                    let before = run_stats(&kernel)?;
                    let made = storm(&server, &client, ip, connections)?;
                    let after = run_stats(&kernel)?;
                    for ((name, b), (_, a)) in before.iter().zip(&after) {
                        let count = a.1 - b.1;
                        if count == 0 {
                            continue;
                        }
                        let ns = (a.0 - b.0).as_nanos() as f64 / count as f64;
                        let entry = costs.entry((name, label)).or_default();
                        entry.0.push(ns);
                        entry.1 += count;
                    }
                    if made < connections {
                        println!("  (storm stopped at its time bound after {made} connections)");
                    }
                }
                eprintln!("round {round}/{rounds} done");
            }
            Ok(())
        })();
        draining.store(false, Ordering::Relaxed);
        result
    })?;
    println!(
        "{:<22} {:>10} {:>12} {:>10} {:>10}  per round",
        "program", "target", "invocations", "median ns", "min ns"
    );
    for ((name, label), (mut ns, count)) in costs {
        ns.sort_by(f64::total_cmp);
        let rounds: Vec<String> = ns.iter().map(|n| format!("{n:.0}")).collect();
        println!(
            "{name:<22} {label:>10} {count:>12} {:>10.1} {:>10.1}  {}",
            ns[ns.len() / 2],
            ns[0],
            rounds.join(" ")
        );
    }
    let stats = kernel.stats()?;
    println!(
        "events emitted {}, lost {}, filtered {}",
        stats.emitted, stats.lost, stats.filtered
    );
    Ok(())
}

/// (run_time, run_count) per connection program.
fn run_stats(kernel: &Kernel) -> anyhow::Result<Vec<(&'static str, (Duration, u64))>> {
    CONN_TRACEPOINTS
        .iter()
        .map(|(_, _, program)| {
            let info = kernel
                .ebpf()
                .program(program)
                .ok_or_else(|| anyhow::anyhow!("no program {program}"))?
                .info()?;
            Ok((*program, (info.run_time(), info.run_count())))
        })
        .collect()
}

/// Short connections from the client namespace to `ip`, accepted and closed
/// in the server namespace. Returns how many were made.
fn storm(server: &NetNs, client: &NetNs, ip: IpAddr, count: usize) -> anyhow::Result<usize> {
    let listener = server.run(move || TcpListener::bind(SocketAddr::new(ip, 0)))??;
    let addr = listener.local_addr()?;
    let deadline = Instant::now() + STORM_LIMIT;
    std::thread::scope(|scope| {
        let acceptor = scope.spawn(|| {
            for stream in listener.incoming().take(count) {
                drop(stream);
            }
        });
        let made = client
            .run(move || {
                let mut made = 0;
                while made < count && Instant::now() < deadline {
                    match TcpStream::connect(addr) {
                        Ok(s) => drop(s),
                        Err(e) => return Err(e),
                    }
                    made += 1;
                }
                // Unblock the acceptor if the storm stopped early.
                for _ in made..count {
                    let _ = TcpStream::connect(addr);
                }
                Ok(made)
            })
            .map_err(anyhow::Error::from)??;
        acceptor.join().expect("acceptor");
        Ok(made)
    })
}
