//! Rulesets of large clusters (root):
//! `cargo bench -p observer-agent --bench large_ruleset`.
//!
//! SERVICES Services (default 5000) of ENDPOINTS endpoints each (default
//! 50: 250 000 endpoints), written by the lab's kube-proxy
//! (`lab::kubeproxy`) in each nf_tables layout (MODES, default
//! `nftables,iptables-nft`; also `iptables-legacy`, whose detector
//! re-reads the whole table and gets no notifications), then watched by
//! the real detector (`dataplane::spawn`) in that namespace:
//! - memory: the live heap the detector holds once started on that ruleset
//!   (dump, mirror and what it selects; a counting global allocator), and
//!   the peak while it starts;
//! - PARTIAL partial syncs (default 20; kube-proxy's normal case), each
//!   removing or re-adding one endpoint of one Service, a second apart (so
//!   the stale chain of the previous one is deleted in its own transaction
//!   first, as kube-proxy does): the detector thread's CPU time for it (its
//!   `schedstat`, from before the write until the change was reported and
//!   the thread went quiet), the notifications it carried;
//! - FULL full resyncs (default 2; kube-proxy's start and hourly sync),
//!   each removing or re-adding one endpoint: the same CPU time, the
//!   notifications lost (ENOBUFS, after which the detector re-reads the
//!   rulesets) and where the change's time falls in the writer's run.
//!
//! Prints Markdown for docs/benchmarks.md.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lab::{
    cost::{thread_cpu_ns, thread_named},
    kubeproxy::{Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::is_root,
    witness::nftables_listener,
};
use observer_agent::dataplane::{self, DataplaneWatch, Limits};
use observer_proto::{Observation, RulesChange, UnixNanos};

/// Live heap bytes of the process, and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn service(i: usize) -> ServicePort {
    ServicePort {
        namespace: "bench".into(),
        name: format!("svc-{i}"),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::new(172, 30, (i / 250) as u8, (i % 250) as u8 + 1),
        port: 80,
    }
}

/// Endpoint `j` of Service `i`: a distinct pod IP for each.
fn backend(i: usize, j: usize, per_service: usize) -> Backend {
    let n = (i * per_service + j) as u32;
    Backend {
        ip: Ipv4Addr::from(0x0a00_0000 + (1 << 16) + n),
        port: 8080,
    }
}

fn addr(b: Backend) -> SocketAddr {
    SocketAddr::from((b.ip, b.port))
}

/// Waits until thread `tid` has not run for 300 ms (it finished what the
/// write gave it); returns its CPU time then.
fn quiet_cpu(tid: u32) -> u64 {
    let mut last = thread_cpu_ns(tid);
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = thread_cpu_ns(tid);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("detector thread never went quiet");
}

/// Notifications of one write, counted by a listener of its own.
struct Counter(std::os::fd::OwnedFd);

impl Counter {
    fn start(ns: &NetNs) -> Self {
        let fd = ns
            .run(|| nftables_listener(Some(256 << 20), Duration::from_millis(300)))
            .unwrap()
            .expect("nf_tables listener");
        Counter(fd)
    }

    /// Messages and bytes received until the socket stays quiet for the
    /// receive timeout.
    fn count(self) -> (usize, usize) {
        let mut buf = vec![0u8; 1 << 20];
        let (mut messages, mut bytes) = (0, 0);
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return (messages, bytes);
            }
            let mut data = &buf[..n as usize];
            bytes += data.len();
            while data.len() >= 16 {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if len < 16 || len > data.len() {
                    break;
                }
                messages += 1;
                data = &data[((len + 3) & !3).min(data.len())..];
            }
        }
    }
}

/// The detector in a namespace and the rules changes it reports.
struct Watch {
    watch: DataplaneWatch,
    rx: tokio::sync::mpsc::Receiver<Observation>,
    tid: u32,
}

impl Watch {
    fn next(&mut self, limit: Duration) -> RulesChange {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.rx.try_recv() {
                Ok(Observation::RulesRemoved(c) | Observation::RulesAdded(c)) => return c,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        panic!("no rules change within {limit:?}");
    }
}

/// p50 / max in ms of CPU times in ns.
fn p50_max(values: &mut [u64]) -> String {
    values.sort_unstable();
    format!(
        "{:.2} / {:.2}",
        values[values.len() / 2] as f64 / 1e6,
        *values.last().unwrap() as f64 / 1e6
    )
}

struct Rows {
    start: String,
    partial: String,
    full: Vec<String>,
}

fn run(mode: Mode, services_n: usize, per_service: usize, partials: usize, fulls: usize) -> Rows {
    let ns = NetNs::create("bigrules").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    let mut services: Vec<(ServicePort, Vec<Backend>)> = (0..services_n)
        .map(|i| {
            (
                service(i),
                (0..per_service)
                    .map(|j| backend(i, j, per_service))
                    .collect(),
            )
        })
        .collect();
    let endpoints = services_n * per_service;
    let started = Instant::now();
    rules.sync(&services).unwrap();
    let initial_sync = started.elapsed();
    eprintln!("{mode}: initial sync of {endpoints} endpoints took {initial_sync:?}");

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let spawn_started = Instant::now();
    let watch = ns
        // Measures the legacy re-read at any size: no copy limit.
        .run(move || {
            dataplane::spawn_with(
                tx,
                Limits {
                    legacy_table_max_bytes: usize::MAX,
                    ..Limits::default()
                },
            )
        })
        .unwrap()
        .expect("dataplane watch starts");
    let spawn_time = spawn_started.elapsed();
    let held = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let tid = thread_named(match mode {
        Mode::IptablesLegacy => "dataplane-legacy",
        _ => "dataplane-nft",
    });
    let mut w = Watch { watch, rx, tid };
    let start = format!(
        "| {mode} | {services_n} x {per_service} = {endpoints} | {:.1} | {:.1} | {} | {} | {:.0} |",
        initial_sync.as_secs_f64(),
        spawn_time.as_secs_f64(),
        mib(held),
        mib(peak),
        held as f64 / endpoints as f64,
    );
    eprintln!("{start}");

    // Partial syncs: one endpoint of a different Service each time.
    let (mut cpu, mut messages, mut bytes) = (vec![], vec![], vec![]);
    for round in 0..partials {
        let s = (round / 2 * 97) % services_n;
        let target = backend(s, per_service / 2, per_service);
        if round % 2 == 0 {
            w.watch.watch(addr(target));
            services[s].1.retain(|b| *b != target);
        } else {
            services[s].1.insert(per_service / 2, target);
        }
        std::thread::sleep(Duration::from_millis(1100));
        let counter = Counter::start(&ns);
        let cpu_before = thread_cpu_ns(w.tid);
        let changed = HashSet::from([&services[s].0]);
        rules.partial_sync(&services, &changed).unwrap();
        let change = w.next(Duration::from_secs(60));
        assert_eq!(change.endpoint, addr(target));
        cpu.push(quiet_cpu(w.tid) - cpu_before);
        let (m, b) = counter.count();
        messages.push(m as u64);
        bytes.push(b as u64);
        if round % 2 == 1 {
            w.watch.unwatch(addr(target));
        }
    }
    let partial = if partials == 0 {
        String::new()
    } else {
        messages.sort_unstable();
        bytes.sort_unstable();
        format!(
            "| {mode} | {endpoints} | {partials} | {} | {} | {:.0} | {} |",
            messages[messages.len() / 2],
            bytes[bytes.len() / 2] / 1024,
            LIVE.load(Ordering::Relaxed).saturating_sub(before) as f64 / (1024.0 * 1024.0),
            p50_max(&mut cpu),
        )
    };
    eprintln!("{partial}");

    // Full resyncs, each removing or re-adding one endpoint.
    let mut full = vec![];
    let s = services_n / 2;
    let target = backend(s, 1, per_service);
    w.watch.watch(addr(target));
    for round in 0..fulls {
        if round % 2 == 0 {
            services[s].1.retain(|b| *b != target);
        } else {
            services[s].1.insert(1, target);
        }
        std::thread::sleep(Duration::from_millis(1100));
        let overflows = w.watch.overflows();
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let live = LIVE.load(Ordering::Relaxed);
        let cpu_before = thread_cpu_ns(w.tid);
        let window = rules.sync(&services).unwrap();
        let change = w.next(Duration::from_secs(600));
        assert_eq!(change.endpoint, addr(target));
        let cpu = quiet_cpu(w.tid) - cpu_before;
        let lost = w.watch.overflows() - overflows;
        let at = |t: UnixNanos| (t - window.started_unix_nano) as f64 / 1e9;
        full.push(format!(
            "| {mode} | {endpoints} | {} | {:.1} | {:.2} | {lost} | {:.3} s (precision {:.3} s) | {} |",
            if round % 2 == 0 { "removal" } else { "re-addition" },
            at(window.finished_unix_nano),
            cpu as f64 / 1e9,
            at(change.time),
            change.precision_ns as f64 / 1e9,
            mib(PEAK.load(Ordering::Relaxed).saturating_sub(live)),
        ));
        eprintln!("{}", full.last().unwrap());
    }
    drop(w);
    rules.cleanup().unwrap();
    Rows {
        start,
        partial,
        full,
    }
}

fn main() {
    if !is_root() {
        eprintln!("the large-ruleset bench needs root (network namespaces, netfilter)");
        return;
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let services = env("SERVICES", 5000);
    let per_service = env("ENDPOINTS", 50);
    let partials = env("PARTIAL", 20);
    let fulls = env("FULL", 2);
    let modes: Vec<Mode> = std::env::var("MODES")
        .unwrap_or_else(|_| "nftables,iptables-nft".into())
        .split(',')
        .map(|m| {
            m.parse()
                .expect("MODES: nftables, iptables-nft and/or iptables-legacy")
        })
        .collect();
    let rows: Vec<Rows> = modes
        .iter()
        .map(|m| run(*m, services, per_service, partials, fulls))
        .collect();
    println!("Detector start on the ruleset (after kube-proxy's initial sync):\n");
    println!(
        "| mode | Services x endpoints | initial sync (s) | detector start: dump + mirror (s) | detector live heap (MiB) | peak while starting (MiB) | bytes per endpoint |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.start);
    }
    println!(
        "\nPartial syncs, each removing or re-adding one endpoint of one Service (detector thread CPU, ms, p50 / max):\n"
    );
    println!(
        "| mode | endpoints | partial syncs | notifications per sync (p50) | KiB per sync (p50) | detector live heap after (MiB) | detector CPU per sync |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.partial);
    }
    println!(
        "\nFull resyncs, each removing or re-adding one endpoint (times from the writer's start):\n"
    );
    println!(
        "| mode | endpoints | change | writer done (s) | detector CPU (s) | overflows (ENOBUFS) | change's time | heap growth while processing (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        for row in &r.full {
            println!("{row}");
        }
    }
}
