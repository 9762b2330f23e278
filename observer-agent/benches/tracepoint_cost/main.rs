//! Kernel cost of the destination-side programs per tracepoint invocation,
//! from the kernel's own accounting (`kernel.bpf_stats_enabled`: run_time_ns
//! / run_cnt per program), under a bounded loopback connection storm between
//! two network namespaces: to a watched address and to an unwatched one,
//! alternately for several rounds. The machine's other work only ever adds
//! to a round's cost, so the median and the minimum of the rounds are
//! printed per program and target. Needs root.
//!
//!     cargo bench -p observer-agent --bench tracepoint_cost [-- CONNECTIONS [ROUNDS [DRAIN_MS]]] [unbatched]
//!     cargo bench -p observer-agent --bench tracepoint_cost -- agent [CONNECTIONS [ROUNDS]]
//!
//! `agent` runs the agent-off / agent-on comparison instead (`agent_cost.rs`).
//!
//! DRAIN_MS is how often the ring buffer is read (after flushing the CPUs'
//! event batches), by default the agent's own interval. `unbatched` makes
//! the programs write every event to the ring on its own, for comparison.
//!
//! Beside each real program, on the same tracepoint, run an empty program
//! and one that only reads the clock (`reference`): the "above floor"
//! column is a program's cost minus the empty program's in the same round.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

mod agent_cost;
mod reference;

use aya::sys::{Stats, enable_stats};
use lab_netns::netns::{NetNs, link};
use observer_agent::kernel::{
    Kernel, LoadOptions,
    conn_events::DRAIN_INTERVAL,
    tracefs::{CONN_TRACEPOINTS, Tracefs},
};
use reference::{Kind, Reference};

const DEFAULT_CONNECTIONS: usize = 20_000;
const DEFAULT_ROUNDS: usize = 5;
/// The row of every invocation of every program together.
const ALL_PROGRAMS: &str = "(all three programs)";
/// Bound on each storm, whatever the connection count.
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// The kernel caps it at `net.core.somaxconn` (4096 by default).
const ACCEPT_BACKLOG: i32 = 4096;

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
    if std::env::args().any(|a| a == "agent") {
        return agent_cost::run(&server, &client, watched, connections, rounds);
    }

    let mut kernel = Kernel::load(LoadOptions {
        unbatched,
        ..LoadOptions::default()
    })?;
    kernel.watch_ip(watched)?;
    let tracefs = Tracefs::find_or_mount()?;
    let mut references = Vec::new();
    for tp in CONN_TRACEPOINTS {
        for kind in Kind::ALL {
            references.push(Reference::attach(&tracefs, kind, tp)?);
        }
    }
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
    let mut costs: BTreeMap<(String, &str), Cost> = BTreeMap::new();
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
                    let before = run_stats(&kernel, &references)?;
                    let made = if refused {
                        refused_storm(&client, ip, connections / 4)?
                    } else {
                        storm(&server, &client, ip, connections)?
                    };
                    let after = run_stats(&kernel, &references)?;
                    let round = Round::between(&before, &after);
                    for (row, ns, count, floor) in round.rows {
                        costs.entry((row, label)).or_default().add(ns, count, floor);
                    }
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
        "{:<38} {:>17} {:>12} {:>10} {:>10} {:>12}  per round",
        "program", "target", "invocations", "median ns", "min ns", "above floor"
    );
    for ((row, label), cost) in costs {
        let (median, min, above, rounds) = cost.summary();
        println!(
            "{row:<38} {label:>17} {:>12} {median:>10.1} {min:>10.1} {above:>12}  {rounds}",
            cost.count
        );
    }
    let stats = kernel.stats()?;
    println!(
        "events emitted {}, lost {}, filtered {}",
        stats.emitted, stats.lost, stats.filtered
    );
    Ok(())
}

/// Run time and count of one program so far.
type Stat = (Duration, u64);

/// Every program's stats at one moment: the real programs, then the
/// references, each with the real program whose tracepoint it shares.
struct Snapshot {
    programs: Vec<(&'static str, Stat)>,
    references: Vec<(&'static str, Kind, Stat)>,
}

fn run_stats(kernel: &Kernel, references: &[Reference]) -> anyhow::Result<Snapshot> {
    let programs = CONN_TRACEPOINTS
        .iter()
        .map(|tp| {
            let info = kernel
                .ebpf()
                .program(tp.program)
                .ok_or_else(|| anyhow::anyhow!("no program {}", tp.program))?
                .info()?;
            Ok((tp.program, (info.run_time(), info.run_count())))
        })
        .collect::<anyhow::Result<_>>()?;
    let references = references
        .iter()
        .map(|r| Ok((r.program, r.kind, r.stats()?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Snapshot {
        programs,
        references,
    })
}

/// What each program cost during one storm: (row, ns per invocation,
/// invocations, the empty program's ns on the same tracepoints), for the
/// programs that ran.
struct Round {
    rows: Vec<(String, f64, u64, Option<f64>)>,
}

impl Round {
    fn between(before: &Snapshot, after: &Snapshot) -> Round {
        let delta = |b: &Stat, a: &Stat| (a.0 - b.0, a.1 - b.1);
        let ns = |(time, count): Stat| time.as_nanos() as f64 / count as f64;
        let floors: Vec<(&str, Stat)> = before
            .references
            .iter()
            .zip(&after.references)
            .filter(|((_, kind, _), _)| *kind == Kind::Floor)
            .map(|((program, _, b), (_, _, a))| (*program, delta(b, a)))
            .filter(|(_, stat)| stat.1 != 0)
            .collect();
        let floor_of = |program: &str| {
            floors
                .iter()
                .find(|(p, _)| *p == program)
                .map(|(_, stat)| *stat)
        };
        let mut rows = Vec::new();
        let mut push = |row: String, stat: Stat, floor: Option<Stat>| {
            if stat.1 != 0 {
                rows.push((row, ns(stat), stat.1, floor.map(ns)));
            }
        };
        let (mut all, mut all_floor) = ((Duration::ZERO, 0), (Duration::ZERO, 0));
        for ((program, b), (_, a)) in before.programs.iter().zip(&after.programs) {
            let stat = delta(b, a);
            let floor = floor_of(program);
            if let Some(floor) = floor {
                all_floor = (all_floor.0 + floor.0, all_floor.1 + floor.1);
            }
            all = (all.0 + stat.0, all.1 + stat.1);
            push(program.to_string(), stat, floor);
        }
        push(
            ALL_PROGRAMS.to_string(),
            all,
            (all_floor.1 != 0).then_some(all_floor),
        );
        for ((program, kind, b), (_, _, a)) in before.references.iter().zip(&after.references) {
            push(
                format!("{program} {}", kind.label()),
                delta(b, a),
                floor_of(program),
            );
        }
        Round { rows }
    }
}

/// One row's cost over the rounds.
#[derive(Default)]
struct Cost {
    ns: Vec<f64>,
    above_floor: Vec<f64>,
    count: u64,
}

impl Cost {
    fn add(&mut self, ns: f64, count: u64, floor: Option<f64>) {
        self.ns.push(ns);
        self.count += count;
        if let Some(floor) = floor {
            self.above_floor.push(ns - floor);
        }
    }

    /// Median, minimum, median above the floor, and every round's ns.
    fn summary(&self) -> (f64, f64, String, String) {
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v
        };
        let ns = sorted(&self.ns);
        let above = sorted(&self.above_floor);
        let rounds: Vec<String> = ns.iter().map(|n| format!("{n:.0}")).collect();
        (
            ns[ns.len() / 2],
            ns[0],
            above
                .get(above.len() / 2)
                .map_or("-".into(), |a| format!("{a:.1}")),
            rounds.join(" "),
        )
    }
}

/// Short connections from the client namespace to `ip`, accepted and closed
/// in the server namespace. Returns how many were made.
fn storm(server: &NetNs, client: &NetNs, ip: IpAddr, count: usize) -> anyhow::Result<usize> {
    let listener = server.run(move || TcpListener::bind(SocketAddr::new(ip, 0)))??;
    // std listens with a backlog of 128. When the client connects faster
    // than the acceptor accepts, a full queue drops SYNs: the storm stalls
    // for each one's 1 s retry, and the listener answers the late segments
    // with resets the storm is not about.
    if unsafe { libc::listen(listener.as_raw_fd(), ACCEPT_BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
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
