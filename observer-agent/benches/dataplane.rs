//! Dataplane detection numbers (root): `cargo bench -p observer-agent --bench dataplane`.
//!
//! The reference for "the rules changed" is an independent witness of the
//! kernel commit (`lab::commit_clock`): lab's NFNLGRP_NFTABLES listener for
//! nftables and iptables-nft, a 200 us poller of the legacy nat table for
//! iptables-legacy, both under SCHED_FIFO. Not the writer process's exit,
//! which comes milliseconds after its commit.
//!
//! 1. Detection delay per kube-proxy mode over many endpoint removals and
//!    re-additions of a small Service: commit -> event received by a
//!    consumer thread (the agent's side of the channel), and the error of
//!    the event's own timestamp (`time_unix_nano` - commit). Once with the
//!    detector and consumer threads at normal priority (as the agent runs
//!    today), once under SCHED_FIFO.
//! 2. Scale: 1000 Services x 5 endpoints (5k endpoints) per mode. The rule
//!    count is measured (a mirror built from the notifications of the
//!    initial sync, `Mirror::counts`; the legacy nat table's entry count).
//!    Memory: live heap of that mirror (a counting global allocator, before
//!    and after building it) and of starting the whole detector. Processing
//!    of one full kube-proxy resync that removes or re-adds one endpoint: the
//!    detector's own time from its first notification to the event reaching
//!    the consumer, and a replay of the same notifications through the
//!    detector's decode -> mirror -> reachability code.
//!
//! 3. New flows: the flow's time against the client's connect() call, timed
//!    at receipt and by the kernel stamp of its conntrack event.
//!
//! Parts 1 and 2 run each nf_tables mode with the detector timing changes
//! at receipt and by the kernel stamps of their notifications
//! (`observer_agent::stamps`), and check each event time against a second,
//! kernel-time reference (`lab::commit_clock::SyscallClock`): the writer's
//! sendmsg of its batch, inside which the kernel commits. An event time
//! inside that call bounds its error by `event time - syscall entry`.
//!
//! Prints Markdown for docs/benchmarks.md. Environment: CHANGES (default
//! 200; 0 skips part 1), RESYNCS (default 6; 0 skips part 2), FLOWS
//! (default 1000; 0 skips part 3), BUSY (spinning threads per CPU for the
//! whole run, default 0), MODES (kube-proxy modes of parts 1 and 2,
//! comma-separated, default all three).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lab::{
    busy::BusyCores,
    commit_clock::{self, CommitClock, RULESET_WRITERS, SyscallClock, Window},
    kubeproxy::{Backend, Mode, Rules, ServicePort},
    netns::{self, NetNs},
    root::is_root,
    witness::{contains_newgen, nftables_listener},
};
use observer_agent::{
    clock::WallClock,
    dataplane::{self, DataplaneWatch, Mirror, NftEvent, decode_nft_message},
    flows,
    kernel::{Kernel, LoadOptions},
    realtime::DEFAULT_TIMING_PRIORITY,
    stamps::{StampKind, Timing},
};
use observer_proto::{Observation, RulesChange, UnixNanos};

/// Live heap bytes of the process.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// CPU time of the calling thread (ns): what a computation costs, whatever
/// else the machine runs meanwhile.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

fn addr(b: Backend) -> SocketAddr {
    SocketAddr::from((b.ip, b.port))
}

/// Nearest-rank percentile of a sorted slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// A time difference as a sample for the statistics.
fn nanos(difference: i64) -> f64 {
    difference as f64
}

fn ms(ns: f64) -> String {
    format!("{:.2}", ns / 1e6)
}

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / (1024.0 * 1024.0))
}

/// "p50 / p99 / max" in ms.
fn summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{} / {} / {}",
        ms(percentile(values, 0.5)),
        ms(percentile(values, 0.99)),
        ms(*values.last().unwrap())
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Priority {
    Normal,
    Fifo,
}

impl Priority {
    fn label(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Fifo => "SCHED_FIFO",
        }
    }

    fn apply(self) {
        if self == Priority::Fifo {
            commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
        }
    }
}

/// The detectors in a namespace, and a consumer thread that stamps each
/// rules change as it comes out of the channel.
struct Detector {
    watch: DataplaneWatch,
    events: std::sync::mpsc::Receiver<(RulesChange, UnixNanos)>,
    consumer: Option<JoinHandle<()>>,
    /// The stamp filter's object, while it is attached.
    _kernel: Option<Kernel>,
}

/// How the detector times a change: at its receipt, or by the kernel
/// stamp of its first notification (`observer_agent::stamps`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stamping {
    Receipt,
    Kernel,
}

impl Stamping {
    fn label(self) -> &'static str {
        match self {
            Stamping::Receipt => "receipt",
            Stamping::Kernel => "kernel stamp",
        }
    }

    /// The timings that apply to `mode` (legacy sends no notifications).
    fn of(mode: Mode) -> &'static [Stamping] {
        match mode {
            Mode::IptablesLegacy => &[Stamping::Receipt],
            _ => &[Stamping::Receipt, Stamping::Kernel],
        }
    }
}

impl Detector {
    fn start(ns: &NetNs, priority: Priority, stamping: Stamping) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let watch = ns
            .run(move || {
                commit_clock::pin(None).unwrap();
                priority.apply();
                dataplane::spawn(tx)
            })
            .unwrap()
            .expect("dataplane watch starts");
        let kernel = (stamping == Stamping::Kernel).then(|| {
            let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
            let stamps = kernel.take_stamps(StampKind::Nftables);
            let timing = watch.use_kernel_stamps(kernel.ebpf_mut(), stamps);
            assert_eq!(timing, Timing::KernelStamp);
            kernel
        });
        let (events_tx, events) = std::sync::mpsc::channel();
        let consumer = std::thread::spawn(move || {
            commit_clock::pin(None).unwrap();
            priority.apply();
            while let Some(obs) = rx.blocking_recv() {
                let arrived = UnixNanos::now();
                if let Observation::RulesRemoved(c) | Observation::RulesAdded(c) = obs {
                    let _ = events_tx.send((c, arrived));
                }
            }
        });
        Detector {
            watch,
            events,
            consumer: Some(consumer),
            _kernel: kernel,
        }
    }

    fn next(&self, limit: Duration) -> (RulesChange, UnixNanos) {
        self.events
            .recv_timeout(limit)
            .expect("no rules change in time")
    }

    fn stop(mut self) {
        drop(self.watch);
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
    }
}

/// Event times against the writer's batch syscall: how many lay inside
/// the sendmsg in which the kernel committed, and for those, event time -
/// the call's entry (a bound of the time's error: the commit is in
/// between).
#[derive(Default)]
struct InsideSend {
    bounds: Vec<f64>,
    /// The writer's time off its CPU inside that syscall.
    off_cpu: Vec<f64>,
    inside: usize,
    total: usize,
}

impl InsideSend {
    /// Checks the time `at` of a change written from `started` on.
    fn record(&mut self, sends: &mut Option<SyscallClock>, at: UnixNanos, started: UnixNanos) {
        let Some(sends) = sends else {
            return;
        };
        self.total += 1;
        if let Some(send) = sends.send_around(at).filter(|s| s.entered >= started) {
            self.inside += 1;
            self.bounds.push(nanos(at - send.entered));
            self.off_cpu.push(send.off_cpu_ns as f64);
        }
    }

    /// "bound | off CPU | inside/total" cells (p50 / p99 / max).
    fn cells(&mut self) -> String {
        if self.total == 0 {
            return "- | - | -".into();
        }
        if self.bounds.is_empty() {
            return format!("- | - | 0/{}", self.total);
        }
        format!(
            "{} | {} | {}/{}",
            summary(&mut self.bounds),
            summary(&mut self.off_cpu),
            self.inside,
            self.total
        )
    }
}

/// The commit behind a change reported at `reported` for a write that
/// started at `from`: the nearest witnessed commit (nf_tables: the
/// witness's receipt; legacy: the latest the replacement can have been,
/// with the witness interval's width, ns). None when the witness saw no
/// commit then: the change is counted as unwitnessed, not timed.
fn commit_of(
    clock: &CommitClock,
    from: UnixNanos,
    reported: UnixNanos,
) -> Option<(UnixNanos, i64)> {
    clock
        .commit_between(from, reported + commit_clock::NFT_BOUND_NS)
        .map(|c| (c.latest, c.latest - c.earliest))
}

fn delay(
    mode: Mode,
    priority: Priority,
    stamping: Stamping,
    changes: usize,
    sends: &mut Option<SyscallClock>,
) -> String {
    let ns = NetNs::create("bench").unwrap();
    let clock = CommitClock::start(&ns.path(), mode).expect("commit witness");
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    let svc = service(0);
    let (b1, b2) = (backend(0, 0), backend(0, 1));
    rules.sync(&[(svc.clone(), vec![b1, b2])]).unwrap();
    let detector = Detector::start(&ns, priority, stamping);
    detector.watch.watch(addr(b2));
    let (mut to_consumer, mut stamp_error, mut writer, mut width, mut precision) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut within_5ms, mut unwitnessed, mut covered) = (0, 0, 0);
    let mut inside = InsideSend::default();
    for i in 0..changes {
        let backends = if i % 2 == 0 { vec![b1] } else { vec![b1, b2] };
        let window: Window = rules.sync(&[(svc.clone(), backends)]).unwrap().into();
        let (change, arrived) = detector.next(Duration::from_secs(5));
        let Some((commit, w)) = commit_of(&clock, window.started, change.time) else {
            unwitnessed += 1;
            continue;
        };
        if mode != Mode::IptablesLegacy {
            inside.record(sends, change.time, window.started);
        }
        to_consumer.push(nanos(arrived - commit));
        let error = change.time - commit;
        if error.abs() <= commit_clock::NFT_BOUND_NS {
            within_5ms += 1;
        }
        stamp_error.push(nanos(error));
        // The claimed interval [time - precision, time] can hold the
        // commit: it starts no later than the latest the commit can be.
        if change.time - i64::try_from(change.precision_ns).unwrap_or(i64::MAX) <= commit {
            covered += 1;
        }
        precision.push(change.precision_ns as f64);
        writer.push(nanos(window.finished - window.started));
        width.push(nanos(w));
    }
    detector.stop();
    let mut abs_error: Vec<f64> = stamp_error.iter().map(|e| e.abs()).collect();
    width.sort_by(f64::total_cmp);
    precision.sort_by(f64::total_cmp);
    let timed = changes - unwitnessed;
    format!(
        "| {mode} | {} | {} | {timed}/{changes} | {} | {} | {} | {} | {covered}/{timed} | {within_5ms}/{timed} | {} | {} | {} |",
        priority.label(),
        stamping.label(),
        summary(&mut to_consumer),
        summary(&mut stamp_error),
        summary(&mut abs_error),
        ms(percentile(&precision, 0.5)),
        summary(&mut writer),
        match mode {
            Mode::IptablesLegacy => ms(percentile(&width, 0.5)),
            _ => "-".into(),
        },
        inside.cells(),
    )
}

/// A netlink datagram and when it was received.
type Datagram = (UnixNanos, Vec<u8>);

/// Every NFNLGRP_NFTABLES datagram of a namespace with its receipt time,
/// into a large buffer (a full resync is megabytes). The thread waits for a
/// commit under SCHED_FIFO, above the detector's priority, so the first
/// datagram of each commit is stamped as it arrives; it then drains the
/// rest at nice 10 and goes back to SCHED_FIFO after the commit's NEWGEN.
/// While the writer sends a commit's notifications (20-30 ms for a full
/// resync) it keeps its core (the kernel here is PREEMPT_NONE), so the
/// readers share the other one: a capture that read everything under
/// SCHED_FIFO would delay the detector it times, and one at the detector's
/// priority would lose the race for the core to it and stamp ~20 ms late.
struct Capture {
    datagrams: Arc<Mutex<Vec<Datagram>>>,
    /// Inside a commit: its first datagram was read, its NEWGEN not yet.
    in_commit: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    fn start(ns: &NetNs) -> Self {
        let datagrams = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicBool::new(false));
        let in_commit = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let thread = {
            let (datagrams, lost, stop) = (datagrams.clone(), lost.clone(), stop.clone());
            let in_commit = in_commit.clone();
            std::thread::spawn(move || {
                netns::enter(&path).unwrap();
                commit_clock::pin_witness_thread().unwrap();
                commit_clock::realtime_witness().expect("SCHED_FIFO (root)");
                let sock = nftables_listener(Some(512 << 20), Duration::from_millis(100))
                    .expect("nf_tables notifications");
                ready_tx.send(()).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: buf is valid for its length.
                    let n = unsafe {
                        libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    let at = UnixNanos::now();
                    if n > 0 {
                        let data = buf[..n as usize].to_vec();
                        let ends = contains_newgen(&data);
                        datagrams.lock().unwrap().push((at, data));
                        if ends {
                            in_commit.store(false, Ordering::Relaxed);
                            commit_clock::realtime_witness().expect("SCHED_FIFO (root)");
                        } else if !in_commit.swap(true, Ordering::Relaxed) {
                            drain_priority();
                        }
                    } else if n < 0
                        && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS)
                    {
                        lost.store(true, Ordering::Relaxed);
                    }
                }
            })
        };
        ready_rx.recv().unwrap();
        Capture {
            datagrams,
            in_commit,
            lost,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until the last commit was read to its NEWGEN.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            if !self.in_commit.load(Ordering::Relaxed) || Instant::now() > deadline {
                return;
            }
        }
    }

    /// Takes the datagrams received so far.
    fn take(&self) -> Vec<Datagram> {
        assert!(
            !self.lost.load(Ordering::Relaxed),
            "the capture lost notifications (ENOBUFS)"
        );
        std::mem::take(&mut *self.datagrams.lock().unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// SCHED_OTHER at nice 10 for the calling thread.
fn drain_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; param is valid.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// Replays datagrams into `mirror` the way the nf_tables detector does
/// (decode, apply; at each commit the changed targets). Returns the
/// messages replayed, and the targets changed by the last commit.
fn replay(mirror: &mut Mirror, datagrams: &[Datagram]) -> (usize, usize) {
    let (mut messages, mut targets) = (0, 0);
    for (_, data) in datagrams {
        let mut rest = &data[..];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            assert!((16..=rest.len()).contains(&len), "malformed datagram");
            let event = decode_nft_message(kind, &rest[16..len]).expect("decodes");
            messages += 1;
            if let NftEvent::NewGen { .. } = event {
                targets = mirror.commit().len();
            } else {
                mirror.apply(event);
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
    (messages, targets)
}

/// Groups datagrams into commits: each batch ends with the datagram that
/// holds its NEWGEN (nf_tables sends it last).
fn batches(datagrams: Vec<Datagram>) -> Vec<Vec<Datagram>> {
    let mut out = vec![];
    let mut current = vec![];
    for (at, data) in datagrams {
        let ends = contains_newgen(&data);
        current.push((at, data));
        if ends {
            out.push(std::mem::take(&mut current));
        }
    }
    assert!(current.is_empty(), "a batch without its NEWGEN");
    out
}

struct Resync {
    /// Detector: event timestamp -> consumer.
    processing: f64,
    /// Commit -> event timestamp, and commit -> consumer.
    stamp: f64,
    to_consumer: f64,
    /// Legacy: the witness interval's width (the commit is up to this much
    /// before the time used).
    width: f64,
    /// Replay of the resync's notifications (nf_tables modes).
    replay: Option<f64>,
    messages: usize,
    bytes: usize,
    writer: f64,
}

fn scale(mode: Mode, resyncs: usize, sends: &mut Option<SyscallClock>) -> (String, Vec<String>) {
    let ns = NetNs::create("benchbig").unwrap();
    let nft = mode != Mode::IptablesLegacy;
    let capture = nft.then(|| Capture::start(&ns));
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    let mut services: Vec<(ServicePort, Vec<Backend>)> = (0..1000)
        .map(|i| (service(i), (0..5).map(|j| backend(i, j)).collect()))
        .collect();
    let started = Instant::now();
    rules.sync(&services).unwrap();
    let initial_sync = started.elapsed();

    // The ruleset as the detector mirrors it, measured.
    let (size, mirror_bytes, mut mirror) = match &capture {
        Some(capture) => {
            capture.settle();
            let datagrams = capture.take();
            let before = live_bytes();
            let mut mirror = Mirror::new();
            let (_, _) = replay(&mut mirror, &datagrams);
            let bytes = live_bytes() - before;
            let (rules_n, chains, elems) = mirror.counts();
            let targets: usize = mirror
                .tables()
                .map(|t| mirror.reachable_dnat(t).len())
                .sum();
            assert_eq!(targets, 5000, "{mode}: mirror built from the notifications");
            (
                format!("{rules_n} rules, {chains} chains, {elems} map elements"),
                mib(bytes as f64),
                Some(mirror),
            )
        }
        None => {
            let (entries, bytes) = ns
                .run(commit_clock::legacy_nat_size)
                .unwrap()
                .expect("legacy nat table");
            (
                format!("{entries} nat entries ({} KiB table)", bytes / 1024),
                "- (no mirror; re-reads the table)".into(),
                None,
            )
        }
    };

    let mut rows = vec![];
    let mut start_row = String::new();
    let target = services[500].1[2];
    let runs = [Priority::Normal, Priority::Fifo]
        .into_iter()
        .flat_map(|p| Stamping::of(mode).iter().map(move |s| (p, *s)));
    for (priority, stamping) in runs {
        let before = live_bytes();
        let load_started = Instant::now();
        let detector = Detector::start(&ns, priority, stamping);
        let load = load_started.elapsed();
        std::thread::sleep(Duration::from_millis(200));
        let detector_bytes = live_bytes().saturating_sub(before);
        if priority == Priority::Normal && stamping == Stamping::Receipt {
            start_row = format!(
                "| {mode} | {size} | {:.0} | {:.0} | {mirror_bytes} | {} |",
                initial_sync.as_secs_f64() * 1e3,
                load.as_secs_f64() * 1e3,
                mib(detector_bytes as f64),
            );
        }
        detector.watch.watch(addr(target));
        let mut results = vec![];
        let mut inside = InsideSend::default();
        for i in 0..resyncs {
            if i % 2 == 0 {
                services[500].1.retain(|b| *b != target);
            } else {
                services[500].1.insert(2, target);
            }
            if let Some(c) = &capture {
                c.take();
            }
            let clock = (!nft).then(|| CommitClock::start(&ns.path(), mode).unwrap());
            let window: Window = rules.sync(&services).unwrap().into();
            let (change, arrived) = detector.next(Duration::from_secs(60));
            assert_eq!(change.endpoint, addr(target));
            if nft {
                inside.record(sends, change.time, window.started);
            }
            let (commit, width, replay_ns, messages, bytes) = match (&capture, &mut mirror) {
                (Some(c), Some(mirror)) => {
                    c.settle();
                    let all = batches(c.take());
                    let (mut messages, mut bytes, mut replay_ns) = (0, 0, 0.0);
                    // Earlier batches (stale chain deletions) first, untimed.
                    // The commit that removed or added the endpoint is the
                    // resync's last (iptables-nft commits filter, then
                    // nat): its first notification's receipt.
                    let mut commit = UnixNanos::default();
                    for batch in all {
                        if batch[0].0 < window.started {
                            replay(mirror, &batch);
                            continue;
                        }
                        commit = batch[0].0;
                        bytes += batch.iter().map(|(_, d)| d.len()).sum::<usize>();
                        let cpu = thread_cpu_ns();
                        let (n, _) = replay(mirror, &batch);
                        replay_ns += (thread_cpu_ns() - cpu) as f64;
                        messages += n;
                    }
                    (commit, 0, Some(replay_ns), messages, bytes)
                }
                _ => {
                    let clock = clock.as_ref().unwrap();
                    let (commit, width) = commit_of(clock, window.started, change.time)
                        .expect("the legacy witness saw the resync's replacement");
                    (commit, width, None, 0, 0)
                }
            };
            results.push(Resync {
                processing: nanos(arrived - change.time),
                stamp: nanos(change.time - commit),
                to_consumer: nanos(arrived - commit),
                width: nanos(width),
                replay: replay_ns,
                messages,
                bytes,
                writer: nanos(window.finished - window.started),
            });
        }
        detector.stop();
        let col = |f: &dyn Fn(&Resync) -> f64| {
            let mut v: Vec<f64> = results.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            format!("{} / {}", ms(percentile(&v, 0.5)), ms(*v.last().unwrap()))
        };
        rows.push(format!(
            "| {mode} | {} | {} | {resyncs} | {} | {} | {} | {} | {} | {} | {} | {} |",
            priority.label(),
            stamping.label(),
            col(&|r| r.writer),
            if nft {
                format!(
                    "{} msgs, {} MiB",
                    results[0].messages,
                    mib(results[0].bytes as f64)
                )
            } else {
                "-".into()
            },
            if nft {
                col(&|r| r.replay.unwrap_or(0.0))
            } else {
                "-".into()
            },
            col(&|r| r.processing),
            col(&|r| r.stamp),
            col(&|r| r.to_consumer),
            if nft { "-".into() } else { col(&|r| r.width) },
            inside.cells(),
        ));
    }
    (start_row, rows)
}

/// New flows timed against the client's connect(): `connections`
/// connections to a one-endpoint Service (nftables mode) from inside its
/// namespace, 2 ms apart, the flow thread at normal priority. Returns the
/// table row.
fn new_flows(stamping: Stamping, connections: usize) -> String {
    let ns = NetNs::create("benchflow").unwrap();
    let b = backend(0, 0);
    ns.ip(&["addr", "add", &format!("{}/32", b.ip), "dev", "lo"])
        .unwrap();
    ns.ip(&["route", "add", "172.30.0.0/16", "dev", "lo"])
        .unwrap();
    let svc = service(0);
    let vip = SocketAddr::from((svc.cluster_ip, svc.port));
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    rules.sync(&[(svc, vec![b])]).unwrap();
    let listener = ns
        .run(move || TcpListener::bind(addr(b)).expect("listener binds"))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let mut kernel = Kernel::load(LoadOptions {
        receipt_timing: stamping == Stamping::Receipt,
        ..LoadOptions::default()
    })
    .expect("eBPF loads");
    kernel.watch_ip(b.ip.into()).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(connections + 16);
    let stamps = kernel.take_stamps(StampKind::Conntrack);
    let ebpf = kernel.ebpf_mut();
    let watch = ns
        .run(move || {
            commit_clock::pin(None).unwrap();
            flows::spawn(ebpf, tx, stamps)
        })
        .unwrap()
        .expect("flow watch starts");
    let conns: Vec<(UnixNanos, SocketAddr)> = ns
        .run(move || {
            commit_clock::pin(None).unwrap();
            (0..connections)
                .map(|_| {
                    let called = UnixNanos::now();
                    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
                        .expect("connects through the Service");
                    std::thread::sleep(Duration::from_millis(2));
                    (called, s.local_addr().unwrap())
                })
                .collect()
        })
        .unwrap();
    let mut flow_at = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while flow_at.len() < conns.len() && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(Observation::NewFlow(f)) => {
                flow_at.insert(f.src, f.time);
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    drop(watch);
    stop.store(true, Ordering::Relaxed);
    acceptor.join().unwrap();
    let mut after_connect: Vec<f64> = conns
        .iter()
        .filter_map(|(called, local)| flow_at.get(local).map(|t| nanos(*t - *called)))
        .collect();
    let missing = conns.len() - after_connect.len();
    format!(
        "| {} | {connections} | {} | {missing} |",
        stamping.label(),
        summary_us(&mut after_connect)
    )
}

/// "p50 / p99 / max" in microseconds.
fn summary_us(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{:.0} / {:.0} / {:.0}",
        percentile(values, 0.5) / 1e3,
        percentile(values, 0.99) / 1e3,
        values.last().unwrap() / 1e3
    )
}

fn main() {
    if !is_root() {
        eprintln!("the dataplane bench needs root (network namespaces, netfilter, SCHED_FIFO)");
        return;
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let changes = env("CHANGES", 200);
    let resyncs = env("RESYNCS", 6);
    let flows = env("FLOWS", 1000);
    // MODES: the kube-proxy modes to run (default all), comma-separated.
    let modes: Vec<Mode> = std::env::var("MODES").map_or(Mode::KUBE_PROXY.to_vec(), |m| {
        m.split(',')
            .map(|m| {
                m.parse()
                    .expect("MODES: nftables, iptables-nft, iptables-legacy")
            })
            .collect()
    });
    // BUSY=n: n spinning threads per CPU for the whole run.
    let busy = match env("BUSY", 0) {
        0 => None,
        n => Some(BusyCores::start(n, Duration::from_secs(3600))),
    };
    if let Some(b) = &busy {
        println!(
            "Every core busy: {} spinning threads at normal priority.\n",
            b.threads()
        );
    }
    // Writers (started from this thread) on CPU 0, witnesses on the last
    // CPU, the detector and its consumer anywhere (see commit_clock).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        commit_clock::pin(Some(0)).unwrap();
        commit_clock::pin_witnesses(cpus - 1);
    }
    // The kernel-time reference of nf_tables commits, converted to the
    // wall clock as the agent converts its stamps.
    let mut wall = WallClock::new();
    let mut sends = SyscallClock::start(&RULESET_WRITERS, move |k| wall.to_unix_nanos(k))
        .inspect_err(|e| println!("No syscall reference ({e}): its columns stay empty.\n"))
        .ok();
    if flows > 0 {
        println!(
            "New flows, {flows} connections 2 ms apart to a one-endpoint Service (nftables mode), flow thread at normal priority (us, p50 / p99 / max):\n"
        );
        println!(
            "| timing | connections | flow time - client's connect() call | flows not reported |"
        );
        println!("|---|---|---|---|");
        for stamping in [Stamping::Receipt, Stamping::Kernel] {
            println!("{}", new_flows(stamping, flows));
        }
        println!();
    }
    println!(
        "Detection delay, {changes} alternating removals/additions of one endpoint of a 2-endpoint Service (ms, p50 / p99 / max; commit = independent witness):\n"
    );
    println!(
        "| mode | detector threads | timing | changes timed / made (untimed: no witnessed commit) | commit -> event received by consumer | event timestamp - commit | abs(event timestamp - commit) | claimed precision (p50) | claimed interval [time - precision, time] reaches the commit | timestamps within 5 ms | writer process duration | witness interval (legacy, p50) | event timestamp - writer's syscall entry (bound) | writer off CPU inside that syscall | event timestamp inside the writer's syscall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &mode in &modes {
        if changes == 0 {
            break;
        }
        for priority in [Priority::Normal, Priority::Fifo] {
            for stamping in Stamping::of(mode) {
                println!("{}", delay(mode, priority, *stamping, changes, &mut sends));
            }
        }
    }
    if resyncs == 0 {
        return;
    }
    let mut start_rows = vec![];
    let mut resync_rows = vec![];
    for &mode in &modes {
        let (start, rows) = scale(mode, resyncs, &mut sends);
        start_rows.push(start);
        resync_rows.extend(rows);
    }
    println!("\nScale, 1000 Services x 5 endpoints (5000 endpoints): ruleset and memory\n");
    println!(
        "| mode | ruleset (measured) | initial sync (ms) | detector start: dump + mirror (ms) | mirror live heap (MiB) | detector start live heap (MiB) |"
    );
    println!("|---|---|---|---|---|---|");
    for row in start_rows {
        println!("{row}");
    }
    println!(
        "\nScale: one full kube-proxy resync removing or re-adding one endpoint, {resyncs} per mode and priority (ms, p50 / max)\n"
    );
    println!(
        "| mode | detector threads | timing | resyncs | writer process duration | notifications per resync | replay CPU time: decode + mirror + reachability | detector: event timestamp -> consumer | event timestamp - commit | commit -> consumer | witness interval (legacy) | event timestamp - writer's syscall entry (bound; p50 / p99 / max) | writer off CPU inside that syscall (p50 / p99 / max) | event timestamp inside the writer's syscall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in resync_rows {
        println!("{row}");
    }
}
