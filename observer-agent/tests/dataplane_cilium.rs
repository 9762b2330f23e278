//! Root-only: the Cilium detector on maps with Cilium's layout, pinned in a
//! bpffs of the test's own and written by the lab's writer in Cilium's
//! order from a thread named like a writer the detector follows.
//!
//! The claims: a backend moved to the inactive tail is reported removed at
//! the master's write, inside the writer's syscall (tracepoint) or within
//! one poll interval after it (polling); moved back, added; a write to an
//! unrelated frontend, nothing; a removal or an addition before the watch
//! starts, at the watch with the master write's time; descriptors the agent opens refuse writes;
//! an unknown layout is refused by name, in `probe` too, and the other
//! detectors keep running.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use lab::{
    cilium::{
        Bpffs, ServiceMapsWriter,
        writer::{MasterWritten, create_pinned, io_error, typed},
    },
    root::root_or_skip,
};
use observer_agent::{
    dataplane::{
        self, DataplaneWatch,
        cilium::{CiliumOptions, CiliumTiming, OpenError, maps::CiliumMaps, sys::ReadOnlyMap},
    },
    kernel::{Kernel, LoadOptions, capabilities},
};
use observer_common::cilium::{
    self, Backend, BackendState, Family, Frontend, MapShape, Scope, ServiceKey, ServiceValue,
    WriterFilter,
};
use observer_proto::{Detector, Observation, RulesChange};
use tokio::sync::mpsc::{Receiver, channel};

/// Each test's writer thread has a name of its own (at most 15 bytes):
/// the tests share one process, and a detector that followed another
/// test's writer would take its writes (the same keys and values) for
/// writes to its own maps.
const WRITER_MASTER: &str = "lab-cil-master";
const WRITER_POLL: &str = "lab-cil-poll";
const WRITER_EARLIER: &str = "lab-cil-earlier";
const WRITER_BATCH: &str = "lab-cil-batch";
const WRITER_REUSE: &str = "lab-cil-reuse";
const WRITER_MAGLEV: &str = "lab-cil-maglev";
const WRITER_LONG: &str = "lab-cil-long";
/// Error of the kernel-to-wall-clock conversion (observer-agent/src/clock.rs).
const CLOCK_TOLERANCE_NS: i64 = 1_000_000;
const POLL: Duration = Duration::from_millis(20);

fn frontend(last: u8) -> Frontend {
    Frontend {
        ip: IpAddr::from([10, 96, 0, last]),
        port: 80,
        proto: 6,
        scope: Scope::External,
    }
}

fn pod(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 244, 1, last], 8080))
}

fn backend(ep: SocketAddr) -> Backend {
    Backend::tcp(ep, BackendState::Active)
}

fn options(dir: &Path, writer: &str, force_polling: bool) -> CiliumOptions {
    let mut comm = [0u8; 16];
    comm[..writer.len()].copy_from_slice(writer.as_bytes());
    CiliumOptions {
        pin_dir: dir.to_owned(),
        poll_interval: POLL,
        writer: WriterFilter::comm(comm, writer.len() as u32),
        force_polling,
    }
}

/// Two frontends: the watched one with pods 1 and 2, another with pod 3.
fn populated(dir: &Path) -> ServiceMapsWriter {
    let mut w = ServiceMapsWriter::create(dir, Family::V4).expect("maps created and pinned");
    for (id, last) in [(1, 1), (2, 2), (3, 3)] {
        w.upsert_backend(id, &backend(pod(last))).unwrap();
    }
    w.write_frontend(frontend(10), 1, &[1, 2], &[]).unwrap();
    w.write_frontend(frontend(11), 2, &[3], &[]).unwrap();
    w
}

/// The writer's steps run on a thread named `name`, one per request.
type Step = Box<dyn FnOnce(&mut ServiceMapsWriter) -> Option<MasterWritten> + Send>;

fn writer_thread(
    mut w: ServiceMapsWriter,
    name: &str,
) -> (
    mpsc::Sender<Step>,
    mpsc::Receiver<Option<MasterWritten>>,
    std::thread::JoinHandle<()>,
) {
    let (step_tx, step_rx) = mpsc::channel::<Step>();
    let (done_tx, done_rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for step in step_rx {
                let _ = done_tx.send(step(&mut w));
            }
        })
        .unwrap();
    (step_tx, done_rx, handle)
}

fn next_rules(rx: &mut Receiver<Observation>, within: Duration) -> Option<(bool, RulesChange)> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(Observation::RulesRemoved(c)) if c.detector == Detector::Cilium => {
                return Some((false, c));
            }
            Ok(Observation::RulesAdded(c)) if c.detector == Detector::Cilium => {
                return Some((true, c));
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    None
}

/// Whether `change` is timed by the master write `m`: inside its syscall
/// (tracepoint) or within a few poll intervals after it (polling).
fn check(change: &RulesChange, m: MasterWritten, force_polling: bool) {
    let slack = if force_polling {
        POLL.as_nanos() as i64 * 3
    } else {
        0
    };
    let t = change.time.as_nanos();
    assert!(
        t >= m.before.as_nanos() - CLOCK_TOLERANCE_NS
            && t <= m.after.as_nanos() + CLOCK_TOLERANCE_NS + slack,
        "{change:?} outside the master write {m:?} (+{slack} ns)"
    );
    let precision = change.precision_ns as i64;
    if force_polling {
        assert!(precision >= POLL.as_nanos() as i64 / 2, "{change:?}");
    } else {
        assert!(
            precision <= m.after.as_nanos() - m.before.as_nanos() + CLOCK_TOLERANCE_NS,
            "precision {precision} ns wider than the syscall {m:?}"
        );
    }
    println!(
        "{} at {} ns after the master's syscall began, precision {} ns",
        if force_polling { "poll" } else { "tracepoint" },
        t - m.before.as_nanos(),
        change.precision_ns
    );
}

/// Loads the eBPF object and starts the dataplane detectors with the
/// Cilium one on the maps under `dir`.
fn start(
    dir: &Path,
    writer: &str,
    force_polling: bool,
) -> (Kernel, DataplaneWatch, Receiver<Observation>) {
    let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
    let (tx, rx) = channel(64);
    let mut watch: DataplaneWatch = dataplane::spawn(tx).expect("detectors start");
    let status = watch
        .follow_cilium(
            Some(kernel.ebpf_mut()),
            &options(dir, writer, force_polling),
        )
        .expect("the Cilium detector starts");
    if force_polling {
        assert!(matches!(status.timing, CiliumTiming::Polling { .. }));
    } else {
        assert_eq!(
            status.timing,
            CiliumTiming::Syscall,
            "the tracepoint attaches here"
        );
    }
    let names: Vec<&str> = status.maps.iter().map(|(name, _)| *name).collect();
    assert!(
        names.contains(&cilium::SERVICES4.name) && names.contains(&cilium::BACKENDS4.name),
        "{status:?}"
    );
    (kernel, watch, rx)
}

/// Moves pod 1 to the tail and back, writes the other frontend, then moves
/// pod 1 out and deletes it; checks every report against the master writes.
fn follow_the_writer(writer: &str, force_polling: bool) {
    let fs = Bpffs::mount("cilium-detector").expect("a private bpffs mounts");
    let w = populated(fs.path());
    let (_kernel, watch, mut rx) = start(fs.path(), writer, force_polling);
    watch.watch(pod(1));
    // The detector picks the watch up within its wait.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        next_rules(&mut rx, Duration::ZERO).is_none(),
        "selected at the watch: nothing to report"
    );

    let (steps, done, handle) = writer_thread(w, writer);
    let write = |step: Step| {
        steps.send(step).unwrap();
        done.recv().unwrap()
    };
    let check = |change: &RulesChange, m: MasterWritten| check(change, m, force_polling);

    let m = write(Box::new(|w| {
        w.write_frontend(frontend(10), 1, &[2], &[1]).ok()
    }))
    .unwrap();
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("removal reported");
    assert!(!added);
    assert_eq!(change.endpoint, pod(1));
    check(&change, m);

    let m = write(Box::new(|w| {
        w.write_frontend(frontend(10), 1, &[1, 2], &[]).ok()
    }))
    .unwrap();
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("addition reported");
    assert!(added);
    check(&change, m);

    write(Box::new(|w| {
        w.write_frontend(frontend(11), 2, &[], &[3]).ok()
    }))
    .unwrap();
    assert!(
        next_rules(&mut rx, Duration::from_millis(300)).is_none(),
        "a write to an unrelated frontend reports nothing"
    );

    let m = write(Box::new(|w| {
        w.write_frontend(frontend(10), 1, &[2], &[1]).ok()
    }))
    .unwrap();
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("removal reported");
    assert!(!added);
    check(&change, m);
    // The backend leaves the EndpointSlice: deleted, then its tail slot.
    write(Box::new(|w| {
        w.delete_backend(1).unwrap();
        w.write_frontend(frontend(10), 1, &[2], &[]).ok()
    }))
    .unwrap();
    assert!(
        next_rules(&mut rx, Duration::from_millis(300)).is_none(),
        "already removed: nothing more"
    );
    drop(steps);
    handle.join().unwrap();
}

#[test]
fn the_master_write_is_the_removal_timed_by_the_writers_syscall() {
    if !root_or_skip("the_master_write_is_the_removal_timed_by_the_writers_syscall") {
        return;
    }
    follow_the_writer(WRITER_MASTER, false);
}

#[test]
fn without_the_tracepoint_a_poll_finds_the_same_changes() {
    if !root_or_skip("without_the_tracepoint_a_poll_finds_the_same_changes") {
        return;
    }
    follow_the_writer(WRITER_POLL, true);
}

/// The cutover happens before the agent learns the pod is terminating, and
/// a new backend is routed to before the agent learns it is ready: the
/// watches that start later get both with the master writes' kernel times.
#[test]
fn changes_before_the_watch_are_reported_at_the_watch_with_their_time() {
    if !root_or_skip("changes_before_the_watch_are_reported_at_the_watch_with_their_time") {
        return;
    }
    let fs = Bpffs::mount("cilium-earlier").expect("a private bpffs mounts");
    let w = populated(fs.path());
    let (_kernel, watch, mut rx) = start(fs.path(), WRITER_EARLIER, false);
    // The detector's first read of the maps.
    std::thread::sleep(Duration::from_millis(200));
    let (steps, done, handle) = writer_thread(w, WRITER_EARLIER);
    let write = |step: Step| {
        steps.send(step).unwrap();
        done.recv().unwrap()
    };

    let removed = write(Box::new(|w| {
        w.write_frontend(frontend(10), 1, &[2], &[1]).ok()
    }))
    .unwrap();
    let added = write(Box::new(|w| {
        w.upsert_backend(4, &backend(pod(4))).unwrap();
        w.write_frontend(frontend(10), 1, &[2, 4], &[1]).ok()
    }))
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        next_rules(&mut rx, Duration::ZERO).is_none(),
        "nothing watched: nothing reported"
    );

    watch.watch(pod(1));
    let (was_added, change) =
        next_rules(&mut rx, Duration::from_secs(1)).expect("the earlier removal reported");
    assert!(!was_added);
    assert_eq!(change.endpoint, pod(1));
    check(&change, removed, false);

    watch.watch_added(pod(4));
    let (was_added, change) =
        next_rules(&mut rx, Duration::from_secs(1)).expect("the earlier addition reported");
    assert!(was_added);
    assert_eq!(change.endpoint, pod(4));
    check(&change, added, false);

    watch.watch(pod(2));
    assert!(
        next_rules(&mut rx, Duration::from_millis(100)).is_none(),
        "selected all along: nothing to report"
    );
    drop(steps);
    handle.join().unwrap();
}

#[test]
fn the_agents_descriptors_refuse_writes() {
    if !root_or_skip("the_agents_descriptors_refuse_writes") {
        return;
    }
    let fs = Bpffs::mount("cilium-rdonly").unwrap();
    let _w = populated(fs.path());
    let map = ReadOnlyMap::open(&fs.path().join(cilium::SERVICES4.name)).unwrap();
    let master = ServiceKey::master(frontend(10)).encode();
    let before = map
        .lookup(master.as_slice())
        .unwrap()
        .expect("the master is there");
    // SAFETY: the map's descriptor, open for this whole block.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(map.raw_fd()) };
    let mut through_it = typed::<[u8; 12], [u8; 12]>(
        aya::maps::MapData::from_fd(fd.try_clone_to_owned().unwrap()).unwrap(),
    )
    .unwrap();
    let key: [u8; 12] = master.as_slice().try_into().unwrap();
    let err = io_error(
        through_it
            .insert(key, [0u8; 12], 0)
            .expect_err("a read-only fd refuses updates"),
    );
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(map.lookup(master.as_slice()).unwrap(), Some(before));
    let maps = CiliumMaps::open(fs.path()).unwrap();
    assert!(maps.v4.is_some() && maps.v6.is_none());
}

#[test]
fn an_unknown_layout_is_refused_by_name_and_the_rest_runs() {
    if !root_or_skip("an_unknown_layout_is_refused_by_name_and_the_rest_runs") {
        return;
    }
    let fs = Bpffs::mount("cilium-layout").unwrap();
    // A services map whose value lost qcount (8 bytes), next to a right backends map.
    let odd = MapShape {
        value_size: 8,
        ..cilium::SERVICES4.shape
    };
    let _s = create_pinned(fs.path(), cilium::SERVICES4.name, odd).unwrap();
    let _b = create_pinned(fs.path(), cilium::BACKENDS4.name, cilium::BACKENDS4.shape).unwrap();
    match CiliumMaps::open(fs.path()) {
        Err(OpenError::Layout { source, .. }) => {
            assert!(
                source.to_string().contains("cilium_lb4_services_v2"),
                "{source}"
            )
        }
        other => panic!("expected a layout error, got {other:?}"),
    }

    let agent = env!("CARGO_BIN_EXE_observer-agent");
    let out = Command::new(agent)
        .args(["probe", "--output", "json", "--cilium-pin-dir"])
        .arg(fs.path())
        .output()
        .unwrap();
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe prints JSON");
    let rows = table.as_array().unwrap();
    let cilium_row = rows
        .iter()
        .find(|r| r["name"] == capabilities::CILIUM_MAPS)
        .expect("a Cilium row");
    assert_eq!(cilium_row["available"], false);
    let detail = cilium_row["detail"].as_str().unwrap();
    assert!(
        detail.contains("cilium_lb4_services_v2") && detail.contains("value 8 bytes"),
        "{detail}"
    );
    assert!(
        rows.iter()
            .any(|r| r["name"] == "tracepoint/sock/inet_sock_set_state" && r["available"] == true),
        "the other rows are probed: {table}"
    );

    // `observe` with the same maps: the Cilium detector is refused, the
    // other detectors and the connection events run.
    let out = Command::new(agent)
        .args([
            "observe",
            "--watch-endpoint",
            "10.244.1.1:8080",
            "--duration",
            "1",
            "--output",
            "json",
            "--cilium-pin-dir",
        ])
        .arg(fs.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "observe failed: {stderr}");
    assert!(
        stderr.contains("Cilium detector unavailable") && stderr.contains("cilium_lb4_services_v2"),
        "{stderr}"
    );
    assert!(!out.stdout.is_empty(), "observe reported its start");
}

/// A frontend rewritten in batches (`BPF_MAP_UPDATE_BATCH` of the slots
/// and the master, `BPF_MAP_DELETE_BATCH` of the tail). To a descriptor
/// the agent has not classified yet the batch is counted and found by a
/// re-read, after the syscall; once an element write has classified the
/// services map, each batch's removal or addition is stamped inside its
/// syscall.
#[test]
fn a_batch_write_is_timed_by_its_syscall_once_the_map_is_known() {
    if !root_or_skip("a_batch_write_is_timed_by_its_syscall_once_the_map_is_known") {
        return;
    }
    let fs = Bpffs::mount("cilium-batch").expect("a private bpffs mounts");
    let w = populated(fs.path());
    let (_kernel, watch, mut rx) = start(fs.path(), WRITER_BATCH, false);
    watch.watch(pod(1));
    std::thread::sleep(Duration::from_millis(200));
    let (steps, done, handle) = writer_thread(w, WRITER_BATCH);
    let write = |step: Step| {
        steps.send(step).unwrap();
        done.recv().unwrap()
    };

    let m = write(Box::new(|w| {
        Some(w.write_frontend_batch(frontend(10), 1, &[2], &[1]).unwrap())
    }))
    .unwrap();
    let (added, change) =
        next_rules(&mut rx, Duration::from_secs(3)).expect("removal found by a re-read");
    assert!(!added);
    assert_eq!(change.endpoint, pod(1));
    assert!(
        change.time.as_nanos() > m.after.as_nanos() + CLOCK_TOLERANCE_NS,
        "an unclassified map's batch is not stamped by its syscall: {change:?} {m:?}"
    );

    // An element write names the services map, as Cilium's writes do.
    write(Box::new(|w| {
        w.write_frontend(frontend(11), 2, &[3], &[]).ok()
    }))
    .unwrap();
    assert!(next_rules(&mut rx, Duration::from_millis(300)).is_none());

    let m = write(Box::new(|w| {
        Some(
            w.write_frontend_batch(frontend(10), 1, &[1, 2], &[])
                .unwrap(),
        )
    }))
    .unwrap();
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("addition reported");
    assert!(added);
    check(&change, m, false);

    let m = write(Box::new(|w| {
        Some(w.write_frontend_batch(frontend(10), 1, &[2], &[1]).unwrap())
    }))
    .unwrap();
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("removal reported");
    assert!(!added);
    assert_eq!(change.endpoint, pod(1));
    check(&change, m, false);

    // The backend leaves: deleted, and its tail slot by a batch delete.
    write(Box::new(|w| {
        w.delete_backend(1).unwrap();
        Some(w.write_frontend_batch(frontend(10), 1, &[2], &[]).unwrap())
    }))
    .unwrap();
    assert!(
        next_rules(&mut rx, Duration::from_millis(300)).is_none(),
        "already removed: nothing more"
    );
    drop(steps);
    handle.join().unwrap();
}

/// Cilium creates and closes Maglev inner maps all the time, so the number
/// of a descriptor it closed comes back for the next map it opens. A
/// writer writes a watched frontend's master through its own descriptor of
/// the services map (classified by that write), closes it, and opens
/// another map of the same shape at the same number: the master key
/// written there is not the services map's, and reports nothing.
#[test]
fn a_closed_services_descriptor_reused_for_another_map_is_not_decoded_as_services() {
    if !root_or_skip(
        "a_closed_services_descriptor_reused_for_another_map_is_not_decoded_as_services",
    ) {
        return;
    }
    let fs = Bpffs::mount("cilium-reuse").expect("a private bpffs mounts");
    let _w = populated(fs.path());
    let (_kernel, watch, mut rx) = start(fs.path(), WRITER_REUSE, false);
    watch.watch(pod(2));
    std::thread::sleep(Duration::from_millis(200));

    let dir = fs.path().to_owned();
    let key: [u8; 12] = ServiceKey::master(frontend(10))
        .encode()
        .as_slice()
        .try_into()
        .unwrap();
    let master = |count| {
        ServiceValue {
            count,
            rev_nat_index: 1,
            ..Default::default()
        }
        .encode()
    };
    let (written_tx, written_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(WRITER_REUSE.into())
        .spawn(move || {
            use aya::maps::IterableMap as _;
            use std::os::fd::{AsFd as _, AsRawFd as _};
            let services = aya::maps::MapData::from_pin(dir.join(cilium::SERVICES4.name)).unwrap();
            let mut services = typed::<[u8; 12], [u8; 12]>(services).unwrap();
            let fd = services.map().fd().as_fd().as_raw_fd();
            let before = observer_proto::UnixNanos::now();
            // Pod 2 (slot 2) out of the count.
            services.insert(key, master(1), 0).unwrap();
            let after = observer_proto::UnixNanos::now();
            written_tx.send(MasterWritten { before, after }).unwrap();
            go_rx.recv().unwrap();
            drop(services);
            let other = create_pinned(&dir, "lab_other", cilium::SERVICES4.shape).unwrap();
            let mut other = typed::<[u8; 12], [u8; 12]>(other).unwrap();
            let reused = other.map().fd().as_fd().as_raw_fd();
            // As if pod 2 were counted again, in the other map.
            for _ in 0..3 {
                other.insert(key, master(2), 0).unwrap();
            }
            (fd, reused)
        })
        .unwrap();
    let m = written_rx.recv().unwrap();
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("removal reported");
    assert!(!added);
    assert_eq!(change.endpoint, pod(2));
    check(&change, m, false);
    go_tx.send(()).unwrap();
    let (fd, reused) = thread.join().unwrap();
    assert_eq!(
        fd, reused,
        "the other map got the closed descriptor's number (the lowest free one)"
    );
    let got = next_rules(&mut rx, Duration::from_millis(500));
    assert!(
        got.is_none(),
        "a write to another map at a reused descriptor was taken for the services map: {got:?}"
    );
}

/// A Maglev frontend: socket-LB cuts over at the master's write, the TC
/// path at the outer map's (its lookup table). Written in Cilium's order
/// (slots, table, master), the removal and the addition are the master's
/// write, the later; a master written without a new table waits for the
/// table's write, and is timed by that syscall.
#[test]
fn a_maglev_frontend_changes_at_the_later_of_its_table_and_master_writes() {
    if !root_or_skip("a_maglev_frontend_changes_at_the_later_of_its_table_and_master_writes") {
        return;
    }
    let fs = Bpffs::mount("cilium-maglev").expect("a private bpffs mounts");
    let mut w = populated(fs.path());
    w.add_maglev(fs.path())
        .expect("the Maglev outer map is created");
    w.write_maglev_table(1, &[1, 2]).unwrap();
    let found: Vec<&str> = CiliumMaps::open(fs.path())
        .unwrap()
        .found
        .iter()
        .map(|(name, _)| *name)
        .collect();
    assert!(found.contains(&cilium::MAGLEV4.name), "{found:?}");
    let (_kernel, watch, mut rx) = start(fs.path(), WRITER_MAGLEV, false);
    watch.watch(pod(1));
    std::thread::sleep(Duration::from_millis(200));
    let (steps, done, handle) = writer_thread(w, WRITER_MAGLEV);
    type Both = Box<dyn FnOnce(&mut ServiceMapsWriter) -> (MasterWritten, MasterWritten) + Send>;
    let (both_tx, both_rx) = mpsc::channel::<(MasterWritten, MasterWritten)>();
    let both = |step: Both| {
        let tx = both_tx.clone();
        steps
            .send(Box::new(move |w| {
                tx.send(step(w)).unwrap();
                None
            }))
            .unwrap();
        done.recv().unwrap();
        both_rx.recv().unwrap()
    };

    let (table, master) = both(Box::new(|w| {
        w.write_frontend_maglev(frontend(10), 1, &[2], &[1])
            .unwrap()
    }));
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("removal reported");
    assert!(!added);
    assert_eq!(change.endpoint, pod(1));
    assert!(table.after.as_nanos() <= master.before.as_nanos());
    check(&change, master, false);

    let (_, master) = both(Box::new(|w| {
        w.write_frontend_maglev(frontend(10), 1, &[1, 2], &[])
            .unwrap()
    }));
    let (added, change) = next_rules(&mut rx, Duration::from_secs(2)).expect("addition reported");
    assert!(added);
    check(&change, master, false);

    // The master alone: socket-LB no longer picks pod 1, the TC path's
    // table still holds it.
    steps
        .send(Box::new(|w| {
            w.write_frontend(frontend(10), 1, &[2], &[1]).ok()
        }))
        .unwrap();
    done.recv().unwrap();
    assert!(
        next_rules(&mut rx, Duration::from_millis(300)).is_none(),
        "the old table still selects pod 1"
    );
    let (table, _) = both(Box::new(|w| {
        let t = w.write_maglev_table(1, &[2]).unwrap();
        (t, t)
    }));
    let (added, change) =
        next_rules(&mut rx, Duration::from_secs(2)).expect("removal at the table's write");
    assert!(!added);
    assert_eq!(change.endpoint, pod(1));
    check(&change, table, false);
    drop(steps);
    handle.join().unwrap();
}

/// A batch of more elements than the program sends (64) to a classified
/// map: the first are sent, the loss is counted, and the master at the
/// batch's end is found by the re-read that follows, after the syscall.
#[test]
fn a_batch_longer_than_the_program_sends_is_found_by_a_re_read() {
    if !root_or_skip("a_batch_longer_than_the_program_sends_is_found_by_a_re_read") {
        return;
    }
    let fs = Bpffs::mount("cilium-long").expect("a private bpffs mounts");
    let mut w = populated(fs.path());
    // 70 more backends, ids 100.., for a frontend of 71 slots.
    let many: Vec<u32> = (100..170).collect();
    for id in &many {
        w.upsert_backend(
            *id,
            &backend(SocketAddr::from(([10, 244, 2, (*id - 100) as u8], 8080))),
        )
        .unwrap();
    }
    let (_kernel, watch, mut rx) = start(fs.path(), WRITER_LONG, false);
    watch.watch(pod(1));
    std::thread::sleep(Duration::from_millis(200));
    let (steps, done, handle) = writer_thread(w, WRITER_LONG);
    // An element write names the services map.
    steps
        .send(Box::new(|w| {
            w.write_frontend(frontend(11), 2, &[3], &[]).ok()
        }))
        .unwrap();
    done.recv().unwrap();
    assert!(next_rules(&mut rx, Duration::from_millis(300)).is_none());

    steps
        .send(Box::new(move |w| {
            let mut active = vec![2];
            active.extend(&many);
            Some(
                w.write_frontend_batch(frontend(10), 1, &active, &[1])
                    .unwrap(),
            )
        }))
        .unwrap();
    let m = done.recv().unwrap().unwrap();
    let (added, change) =
        next_rules(&mut rx, Duration::from_secs(3)).expect("removal found by a re-read");
    assert!(!added);
    assert_eq!(change.endpoint, pod(1));
    assert!(
        change.time.as_nanos() > m.after.as_nanos() + CLOCK_TOLERANCE_NS,
        "the master is past the elements sent: {change:?} {m:?}"
    );
    drop(steps);
    handle.join().unwrap();
}
