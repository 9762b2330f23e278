//! Kernel cost of the destination-side programs per tracepoint invocation,
//! from the kernel's own accounting (`kernel.bpf_stats_enabled`: run_time_ns
//! / run_cnt per program), under a bounded loopback connection storm between
//! two network namespaces: to a watched address and to an unwatched one,
//! alternately for several rounds. The machine's other work only ever adds
//! to a round's cost, so the median and the minimum of the rounds are
//! printed per program and target. Needs root.
//!
//!     cargo bench -p observer-agent --bench tracepoint_cost [-- CONNECTIONS [ROUNDS [DRAIN_MS]]] [unbatched]
//!
//! DRAIN_MS is how often the ring buffer is read (after flushing the CPUs'
//! event batches), by default the agent's own interval. `unbatched` makes
//! the programs write every event to the ring on its own, for comparison.

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
/// The row of every invocation of every program together.
const ALL_PROGRAMS: &str = "(all three programs)";
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
    let unbatched = std::env::args().any(|a| a == "unbatched");
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

    let mut kernel = Kernel::load(LoadOptions {
        unbatched,
        ..LoadOptions::default()
    })?;
    kernel.watch_ip(watched)?;
    let mut ring = kernel.take_conn_events().expect("ring buffer");
    let draining = AtomicBool::new(true);

    println!(
        "{connections} connections per storm (connect, accept, close both sides), {rounds} rounds, ring read every {drain:?}, events {}",
        if kernel.delivery().batched {
            "batched per CPU"
        } else {
            "written one by one"
        }
    );
    // (program, target) -> ns per invocation of each round, and invocations.
    let mut costs: BTreeMap<(&str, &str), (Vec<f64>, u64)> = BTreeMap::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| {
            while draining.load(Ordering::Relaxed) {
                if let Err(e) = ring.flush_batches() {
                    eprintln!("flush failed: {e}");
                }
                while ring.next_record().is_some() {}
                std::thread::sleep(drain);
            }
        });
        let result = (|| -> anyhow::Result<()> {
            for round in 1..=rounds {
                for (label, ip, refused) in [
                    ("watched", watched, false),
                    ("unwatched", unwatched, false),
                    ("watched refused", watched, true),
                    ("unwatched refused", unwatched, true),
                ] {
                    let before = run_stats(&kernel)?;
                    let made = if refused {
                        refused_storm(&client, ip, connections / 4)?
                    } else {
                        storm(&server, &client, ip, connections)?
                    };
                    let after = run_stats(&kernel)?;
                    let (mut all_time, mut all_count) = (Duration::ZERO, 0);
                    for ((name, b), (_, a)) in before.iter().zip(&after) {
                        let count = a.1 - b.1;
                        if count == 0 {
                            continue;
                        }
                        all_time += a.0 - b.0;
                        all_count += count;
                        let ns = (a.0 - b.0).as_nanos() as f64 / count as f64;
                        let entry = costs.entry((name, label)).or_default();
                        entry.0.push(ns);
                        entry.1 += count;
                    }
                    let entry = costs.entry((ALL_PROGRAMS, label)).or_default();
                    entry
                        .0
                        .push(all_time.as_nanos() as f64 / all_count.max(1) as f64);
                    entry.1 += all_count;
                    let wanted = if refused {
                        connections / 4
                    } else {
                        connections
                    };
                    if made < wanted {
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
        "{:<22} {:>17} {:>12} {:>10} {:>10}  per round",
        "program", "target", "invocations", "median ns", "min ns"
    );
    for ((name, label), (mut ns, count)) in costs {
        ns.sort_by(f64::total_cmp);
        let rounds: Vec<String> = ns.iter().map(|n| format!("{n:.0}")).collect();
        println!(
            "{name:<22} {label:>17} {count:>12} {:>10.1} {:>10.1}  {}",
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

/// Connections from the client namespace to a port of `ip` where nothing
/// listens: the server's kernel answers each SYN with a RST (the reset
/// tracepoints fire once per connection). Returns how many were refused.
fn refused_storm(client: &NetNs, ip: IpAddr, count: usize) -> anyhow::Result<usize> {
    let closed = SocketAddr::new(ip, 9);
    let deadline = Instant::now() + STORM_LIMIT;
    client
        .run(move || {
            let mut refused = 0;
            while refused < count && Instant::now() < deadline {
                match TcpStream::connect(closed) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(e) => return Err(e),
                    Ok(_) => {
                        return Err(std::io::Error::other(format!(
                            "{closed} accepted a connection"
                        )));
                    }
                }
            }
            Ok(refused)
        })
        .map_err(anyhow::Error::from)?
        .map_err(anyhow::Error::from)
}
