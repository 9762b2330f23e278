//! Kernel cost of the destination-side programs per tracepoint invocation,
//! from the kernel's own accounting (`kernel.bpf_stats_enabled`: run_time_ns
//! / run_cnt per program), under a bounded loopback connection storm between
//! two network namespaces: once to a watched address, once to an unwatched
//! one. Needs root.
//!
//!     cargo bench -p observer-agent --bench tracepoint_cost [-- CONNECTIONS]

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::sys::{Stats, enable_stats};
use lab_netns::netns::{NetNs, link};
use observer_agent::kernel::{Kernel, LoadOptions, tracefs::CONN_TRACEPOINTS};

const DEFAULT_CONNECTIONS: usize = 20_000;
/// Bound on each storm, whatever the connection count.
const STORM_LIMIT: Duration = Duration::from_secs(120);

fn main() -> anyhow::Result<()> {
    let connections = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(DEFAULT_CONNECTIONS);
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

    println!("{connections} connections per storm (connect, accept, close both sides)");
    println!(
        "{:<22} {:>10} {:>14} {:>12}",
        "program", "target", "invocations", "ns/invocation"
    );
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // Keep the ring buffer empty so emitting stays on its normal path.
        scope.spawn(|| {
            while draining.load(Ordering::Relaxed) {
                while ring.next().is_some() {}
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        for (label, ip) in [("watched", watched), ("unwatched", unwatched)] {
            let before = run_stats(&kernel)?;
            let made = storm(&server, &client, ip, connections)?;
            let after = run_stats(&kernel)?;
            for ((name, b), (_, a)) in before.iter().zip(&after) {
                let count = a.1 - b.1;
                let ns = (a.0 - b.0).as_nanos() as f64 / count.max(1) as f64;
                println!("{name:<22} {label:>10} {count:>14} {ns:>12.1}");
            }
            if made < connections {
                println!("  (storm stopped at its time bound after {made} connections)");
            }
        }
        draining.store(false, Ordering::Relaxed);
        Ok(())
    })?;
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
