//! The Cilium detector on maps with Cilium's layout in a private bpffs,
//! written by the lab's writer (a thread named like the writer followed):
//! the kernel cost of the `sys_enter_bpf`/`sys_exit_bpf` programs per
//! bpf() syscall (`kernel.bpf_stats_enabled`) while the writer rewrites
//! frontends, while the writer writes a map of its own that is not a
//! service map, and while an unrelated thread hammers bpf(); the
//! detection delay of each master write, the memory of the detector's
//! mirror of FRONTENDS frontends, and the CPU of the polling fallback on
//! the same maps. Needs root.
//!
//!     cargo bench -p observer-agent --bench cilium
//!     FRONTENDS=5000 WRITES=400 HAMMER=200000 cargo bench -p observer-agent --bench cilium

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::sys::{Stats, enable_stats};
use lab::{
    cilium::{
        Bpffs, ServiceMapsWriter,
        writer::{MasterWritten, create_pinned, typed},
    },
    cost::{thread_cpu_ns, thread_named},
};
use observer_agent::{
    dataplane::{
        self,
        cilium::{
            CiliumOptions,
            maps::{CiliumMaps, ServiceMaps},
        },
    },
    kernel::{Kernel, LoadOptions},
};
use observer_common::cilium::{
    Backend, BackendState, Family, Frontend, MapShape, Scope, WriterFilter,
};
use observer_proto::{Observation, UnixNanos};
use tokio::sync::mpsc::{Receiver, channel};

const WRITER: &str = "lab-cilium";
const PROGRAMS: [&str; 2] = ["cilium_bpf_enter", "cilium_bpf_exit"];
/// The program on every close(2) of the machine.
const CLOSE: [&str; 1] = ["cilium_close"];
/// The polling fallback's phase: endpoints watched, and how long its CPU
/// is counted.
const POLLED_WATCHED: usize = 10;
const POLLED_FOR: Duration = Duration::from_secs(10);
/// Whole reads of the maps timed.
const FULL_READS: u32 = 10;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vip(i: usize) -> Frontend {
    Frontend {
        ip: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
        port: 80,
        proto: 6,
        scope: Scope::External,
    }
}

fn pod(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 200, (i >> 8) as u8, i as u8], 8080))
}

fn backend(ep: SocketAddr) -> Backend {
    Backend::tcp(ep, BackendState::Active)
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

/// (run time, run count) of the bpf() programs together.
fn run_stats(kernel: &Kernel) -> anyhow::Result<(Duration, u64)> {
    programs_stats(kernel, &PROGRAMS)
}

/// (run time, run count) of `programs` together.
fn programs_stats(kernel: &Kernel, programs: &[&str]) -> anyhow::Result<(Duration, u64)> {
    let mut total = (Duration::ZERO, 0);
    for &name in programs {
        let info = kernel
            .ebpf()
            .program(name)
            .ok_or_else(|| anyhow::anyhow!("no program {name}"))?
            .info()?;
        total.0 += info.run_time();
        total.1 += info.run_count();
    }
    Ok(total)
}

fn per_call(before: (Duration, u64), after: (Duration, u64)) -> (f64, u64) {
    let runs = after.1 - before.1;
    let ns = (after.0 - before.0).as_nanos() as f64 / runs.max(1) as f64;
    (ns, runs)
}

type Step = Box<dyn FnOnce(&mut ServiceMapsWriter) -> Option<MasterWritten> + Send>;

fn percentile(sorted: &[i64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e3
}

fn wait_for(
    rx: &mut Receiver<Observation>,
    ep: SocketAddr,
    removed: bool,
) -> Option<(UnixNanos, i64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(Observation::RulesRemoved(c)) if removed && c.endpoint == ep => {
                return Some((UnixNanos::now(), c.time.as_nanos(), c.precision_ns));
            }
            Ok(Observation::RulesAdded(c)) if !removed && c.endpoint == ep => {
                return Some((UnixNanos::now(), c.time.as_nanos(), c.precision_ns));
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    None
}

fn main() -> anyhow::Result<()> {
    if !lab_netns::root::is_root() {
        anyhow::bail!("the cilium bench needs root (eBPF, bpffs)");
    }
    let frontends = env_or("FRONTENDS", 5000).clamp(1, 8000);
    let writes = env_or("WRITES", 400);
    let hammer = env_or("HAMMER", 200_000);
    let _stats = enable_stats(Stats::RunTime)?;
    let fs = Bpffs::mount("cilium-bench")?;

    // The writer thread: every map write of the bench's Cilium goes through it.
    let (step_tx, step_rx) = mpsc::channel::<Step>();
    let (done_tx, done_rx) = mpsc::channel();
    let dir = fs.path().to_owned();
    let writer =
        std::thread::Builder::new()
            .name(WRITER.into())
            .spawn(move || -> std::io::Result<()> {
                let mut w = ServiceMapsWriter::create(&dir, Family::V4)?;
                let common = frontends as u32 + 1;
                w.upsert_backend(common, &backend(SocketAddr::from(([10, 201, 0, 1], 8080))))?;
                for i in 0..frontends {
                    w.upsert_backend(i as u32 + 1, &backend(pod(i)))?;
                    w.write_frontend(vip(i), i as u16 + 1, &[i as u32 + 1, common], &[])?;
                }
                let _ = done_tx.send(None);
                for step in step_rx {
                    let _ = done_tx.send(step(&mut w));
                }
                Ok(())
            })?;
    done_rx.recv()?;
    let write = |step: Step| -> anyhow::Result<Option<MasterWritten>> {
        step_tx
            .send(step)
            .map_err(|_| anyhow::anyhow!("the writer thread is gone"))?;
        Ok(done_rx.recv()?)
    };

    let rss_before = rss_kib();
    let mut kernel = Kernel::load(LoadOptions::default())?;
    let (tx, mut rx) = channel(4096);
    let mut watch = dataplane::spawn(tx)?;
    let rss_loaded = rss_kib();
    let mut comm = [0u8; 16];
    comm[..WRITER.len()].copy_from_slice(WRITER.as_bytes());
    let status = watch.follow_cilium(
        Some(kernel.ebpf_mut()),
        &CiliumOptions {
            pin_dir: fs.path().to_owned(),
            writer: WriterFilter::comm(comm, WRITER.len() as u32),
            ..CiliumOptions::default()
        },
    )?;
    println!("timing: {:?}", status.timing);
    let watch_start = Instant::now();
    for i in 0..frontends {
        watch.watch(pod(i));
    }
    // Ready when a write of the last frontend is reported.
    let last = frontends - 1;
    let common = frontends as u32 + 1;
    let ready = loop {
        write(Box::new(move |w| {
            w.write_frontend(vip(last), last as u16 + 1, &[common], &[last as u32 + 1])
                .ok()
        }))?;
        if wait_for(&mut rx, pod(last), true).is_some() {
            break watch_start.elapsed();
        }
        write(Box::new(move |w| {
            w.write_frontend(vip(last), last as u16 + 1, &[last as u32 + 1, common], &[])
                .ok()
        }))?;
        anyhow::ensure!(
            watch_start.elapsed() < Duration::from_secs(120),
            "the detector never followed the frontends"
        );
    };
    write(Box::new(move |w| {
        w.write_frontend(vip(last), last as u16 + 1, &[last as u32 + 1, common], &[])
            .ok()
    }))?;
    let _ = wait_for(&mut rx, pod(last), false);
    let rss_mirror = rss_kib();

    let before = run_stats(&kernel)?;
    let mut delays = Vec::new();
    let mut inside = 0;
    let mut precisions = Vec::new();
    for k in 0..writes {
        let j = k % frontends;
        let removed = (k / frontends).is_multiple_of(2);
        let (active, inactive) = if removed {
            (vec![common], vec![j as u32 + 1])
        } else {
            (vec![j as u32 + 1, common], vec![])
        };
        let m = write(Box::new(move |w| {
            w.write_frontend(vip(j), j as u16 + 1, &active, &inactive)
                .ok()
        }))?
        .ok_or_else(|| anyhow::anyhow!("write failed"))?;
        let (received, time, precision) = wait_for(&mut rx, pod(j), removed)
            .ok_or_else(|| anyhow::anyhow!("write {k} not reported"))?;
        delays.push(received.as_nanos() - m.after.as_nanos());
        if time >= m.before.as_nanos() - 1_000_000 && time <= m.after.as_nanos() + 1_000_000 {
            inside += 1;
        }
        precisions.push(precision as i64);
    }
    let during_writes = per_call(before, run_stats(&kernel)?);

    // The writer's writes to a map of its own that is no service map, as
    // Cilium writes its policy and ipcache maps: the agent classifies the
    // descriptor as another map after its first misses, then the program
    // drops its writes after one lookup.
    let other_dir = fs.path().to_owned();
    let before = run_stats(&kernel)?;
    let started = Instant::now();
    write(Box::new(move |_| {
        let map = create_pinned(
            &other_dir,
            "writer_other",
            MapShape {
                map_type: 1,
                key_size: 4,
                value_size: 8,
            },
        )
        .ok()?;
        let mut other = typed::<u32, [u8; 8]>(map).ok()?;
        for i in 0..hammer as u32 {
            let _ = other.insert(i % 1024, [0u8; 8], 0);
        }
        None
    }))?;
    let writer_other_time = started.elapsed();
    let during_writer_other = per_call(before, run_stats(&kernel)?);

    // An unrelated thread: element updates on a map of its own (the command
    // passes the first check, the name fails the second).
    let mut own = typed::<u32, [u8; 8]>(create_pinned(
        fs.path(),
        "hammer_map",
        MapShape {
            map_type: 1,
            key_size: 4,
            value_size: 8,
        },
    )?)?;
    let before = run_stats(&kernel)?;
    let started = Instant::now();
    std::thread::Builder::new()
        .name("hammer".into())
        .spawn(move || {
            for i in 0..hammer as u32 {
                let _ = own.insert(i % 1024, [0u8; 8], 0);
            }
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("hammer panicked"))?;
    let hammer_time = started.elapsed();
    let during_hammer = per_call(before, run_stats(&kernel)?);

    // close(2) runs `cilium_close` everywhere: an unrelated thread, and the
    // writer closing descriptors the programs never saw written.
    let closes = |name: &str| -> anyhow::Result<(Duration, (f64, u64))> {
        let before = programs_stats(&kernel, &CLOSE)?;
        let started = Instant::now();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for _ in 0..hammer {
                    // SAFETY: a descriptor of our own, closed at once.
                    unsafe { libc::close(libc::dup(0)) };
                }
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("close hammer panicked"))?;
        Ok((
            started.elapsed(),
            per_call(before, programs_stats(&kernel, &CLOSE)?),
        ))
    };
    let (unrelated_close_time, unrelated_close) = closes("hammer")?;
    let (writer_close_time, writer_close) = closes(WRITER)?;

    delays.sort();
    precisions.sort();
    println!("frontends: {frontends}, every endpoint watched; ready after {ready:?}");
    println!(
        "RSS: {} KiB before the eBPF object, {} KiB loaded, {} KiB with the Cilium detector ({} KiB for its mirror)",
        rss_before,
        rss_loaded,
        rss_mirror,
        rss_mirror.saturating_sub(rss_loaded)
    );
    if let Ok(out) = Command::new("bpftool")
        .args(["map", "show", "name", "CILIUM_FDS"])
        .output()
    {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!(
        "detection delay (receipt - end of the master's syscall) over {} writes: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        percentile(&delays, 1.0)
    );
    println!(
        "stamp inside the writer's syscall: {inside}/{}; precision p50 {:.1} us, p99 {:.1} us",
        writes,
        percentile(&precisions, 0.5),
        percentile(&precisions, 0.99)
    );
    println!(
        "cost per program run while the writer writes: {:.0} ns over {} runs (enter+exit)",
        during_writes.0, during_writes.1
    );
    println!(
        "cost per program run while the writer does {hammer} updates of another map ({:?}): {:.0} ns over {} runs",
        writer_other_time, during_writer_other.0, during_writer_other.1
    );
    println!(
        "cost per program run while an unrelated thread does {hammer} updates ({:?}): {:.0} ns over {} runs",
        hammer_time, during_hammer.0, during_hammer.1
    );
    println!(
        "cost per close(2) run of cilium_close, an unrelated thread, {hammer} closes ({:?}): {:.0} ns over {} runs",
        unrelated_close_time, unrelated_close.0, unrelated_close.1
    );
    println!(
        "cost per close(2) run of cilium_close, the writer closing descriptors never written, {hammer} closes ({:?}): {:.0} ns over {} runs",
        writer_close_time, writer_close.0, writer_close.1
    );
    // A whole read of both maps (what every poll did before polls looked
    // up only the watched frontends; now one full read a second at most).
    let maps = CiliumMaps::open(fs.path())?;
    let started = Instant::now();
    for _ in 0..FULL_READS {
        maps.services(Family::V4)?;
        maps.backends(Family::V4)?;
    }
    let full_read = started.elapsed() / FULL_READS;
    println!("a whole read of both maps ({frontends} frontends): {full_read:?}");

    // The polling fallback (no tracepoint) on the same maps, a few
    // endpoints watched: its thread's CPU over a quiet stretch.
    drop(watch);
    let (tx, _rx) = channel(4096);
    let mut polling = dataplane::spawn(tx)?;
    let poll = CiliumOptions::default().poll_interval;
    polling.follow_cilium(
        None,
        &CiliumOptions {
            pin_dir: fs.path().to_owned(),
            force_polling: true,
            ..CiliumOptions::default()
        },
    )?;
    for i in 0..POLLED_WATCHED.min(frontends) {
        polling.watch(pod(i));
    }
    let tid = thread_named("dataplane-cilium");
    std::thread::sleep(Duration::from_secs(2));
    let (cpu_before, started) = (thread_cpu_ns(tid), Instant::now());
    std::thread::sleep(POLLED_FOR);
    let per_second = (thread_cpu_ns(tid) - cpu_before) as f64 / started.elapsed().as_secs_f64();
    println!(
        "polling fallback ({poll:?} interval), {frontends} frontends, {} watched: detector thread CPU {:.2} ms per second over {POLLED_FOR:?}",
        POLLED_WATCHED.min(frontends),
        per_second / 1e6
    );
    drop(polling);
    drop(step_tx);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok(())
}
