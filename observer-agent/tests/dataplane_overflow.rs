//! Root-only: nf_tables notifications that overflow the detector's socket
//! (ENOBUFS) are not lost in silence. The detector re-reads the rulesets and
//! reports the change it missed, counts the overflow, and doubles its
//! receive buffer so that the next burst of that size (kube-proxy's next
//! full sync) fits; started on a ruleset, it sizes the buffer for a full
//! sync of it. A removal read just before its own commit's notifications
//! overflow is not lost with the part of the commit read.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lab::{
    commit_clock,
    kubeproxy::{Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::root_or_skip,
};
use observer_agent::{
    dataplane::{self, DataplaneWatch, Limits, RecvBuffer},
    realtime::DEFAULT_TIMING_PRIORITY,
};
use observer_proto::{Observation, UnixNanos};
use tokio::sync::mpsc::{Receiver, channel};

/// Full syncs at most until one fits: 16 KiB doubled twelve times is
/// 64 MiB.
const ROUNDS: usize = 14;
const SERVICES: u16 = 300;
const ENDPOINTS: u16 = 10;
const WATCHED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 180, 0, 1)), 8080);

fn services(with_watched: bool) -> Vec<(ServicePort, Vec<Backend>)> {
    (0..SERVICES)
        .map(|s| {
            let port = ServicePort {
                namespace: "ns1".into(),
                name: format!("svc{s}"),
                port_name: "http".into(),
                cluster_ip: Ipv4Addr::new(172, 30, (s >> 8) as u8, s as u8),
                port: 80,
            };
            let backends = (0..ENDPOINTS)
                .filter(|e| with_watched || s != 0 || *e != 0)
                .map(|e| Backend {
                    ip: Ipv4Addr::new(10, 180, (s >> 4) as u8, ((s & 15) << 4) as u8 + e as u8 + 1),
                    port: 8080,
                })
                .collect();
            (port, backends)
        })
        .collect()
}

/// The detector in `ns` with `buffer`, watching the endpoint, on `cpu`
/// (CPU 0: where [`write`] runs the rule writers ahead of it).
fn start(ns: &NetNs, buffer: RecvBuffer, cpu: usize) -> (DataplaneWatch, Receiver<Observation>) {
    commit_clock::pin(Some(cpu)).expect("pin the detector");
    let (tx, rx) = channel(64);
    let watch = ns
        .run(move || {
            dataplane::spawn_with(
                tx,
                Limits {
                    nft_buffer: buffer,
                    ..Limits::default()
                },
            )
        })
        .expect("enter netns")
        .expect("dataplane watch starts");
    watch.watch(WATCHED);
    (watch, rx)
}

/// A full sync by a writer under SCHED_FIFO on the detector's CPU: the
/// detector reads nothing of the commit's notifications before the writer
/// is done, so the buffer alone must hold the burst, however fast the
/// detector would otherwise keep up on an idle machine.
fn write(rules: &mut Rules, present: bool) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                commit_clock::pin(Some(0)).expect("pin to CPU 0");
                commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
                rules.sync(&services(present)).unwrap();
            })
            .join()
            .expect("writer thread")
    });
}

/// Runs a full sync in which the watched endpoint is `present` and checks
/// that its change, and nothing else, is reported; whether it overflowed.
async fn full_sync(
    round: usize,
    rules: &mut Rules,
    watch: &DataplaneWatch,
    rx: &mut Receiver<Observation>,
    present: bool,
) -> bool {
    let before = watch.overflows();
    write(rules, present);
    let change = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("round {round}: the change was not reported"))
        .expect("channel open");
    match (&change, present) {
        (Observation::RulesAdded(c), true) | (Observation::RulesRemoved(c), false) => {
            assert_eq!(c.endpoint, WATCHED, "round {round}");
        }
        _ => panic!(
            "round {round}: expected the watched endpoint's change (present: {present}), got {change:?}"
        ),
    }
    // A re-read after a second overflow in the same commit repeats
    // nothing.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("round {round}: extra change {extra:?}");
    }
    watch.overflows() > before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_full_syncs_are_re_read_and_the_buffer_grows_until_one_fits() {
    if !root_or_skip("overflowing_full_syncs_are_re_read_and_the_buffer_grows_until_one_fits") {
        return;
    }
    let ns = NetNs::create("dpovf").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    // Started on an empty ruleset: the buffer stays at 16 KiB.
    let (watch, mut rx) = start(
        &ns,
        RecvBuffer {
            initial: 16 << 10,
            max: 64 << 20,
        },
        0,
    );
    let mut sizes = vec![watch.recv_buffer_bytes().expect("socket open")];
    let mut overflowed = Vec::new();
    for round in 0..ROUNDS {
        // Each full sync writes every chain: thousands of notifications in
        // one commit. The watched endpoint comes and goes in turn.
        overflowed.push(full_sync(round, &mut rules, &watch, &mut rx, round % 2 == 0).await);
        sizes.push(watch.recv_buffer_bytes().expect("socket open"));
        eprintln!(
            "round {round}: overflowed {}, buffer {} KiB",
            overflowed[round],
            sizes[round + 1] >> 10
        );
        if !overflowed[round] {
            break;
        }
    }
    rules.cleanup().unwrap();
    assert!(
        overflowed[0],
        "a 16 KiB buffer held a full sync of {} endpoints: the test proves nothing",
        SERVICES * ENDPOINTS
    );
    assert!(
        overflowed.last() == Some(&false),
        "still overflowing after {ROUNDS} full syncs; buffer sizes {sizes:?}"
    );
    for (i, grew) in overflowed.iter().enumerate() {
        assert_eq!(
            sizes[i + 1] > sizes[i],
            *grew,
            "round {i}: the buffer grows exactly after an overflow: {sizes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_sized_to_the_ruleset_at_start_holds_the_first_full_sync() {
    if !root_or_skip("a_buffer_sized_to_the_ruleset_at_start_holds_the_first_full_sync") {
        return;
    }
    let ns = NetNs::create("dpsized").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    rules.sync(&services(true)).unwrap();
    let initial = 16 << 10;
    let (watch, mut rx) = start(
        &ns,
        RecvBuffer {
            initial,
            max: 64 << 20,
        },
        0,
    );
    let size = watch.recv_buffer_bytes().expect("socket open");
    assert!(
        size > 2 * initial,
        "the buffer was not sized to the ruleset: {size} bytes"
    );
    let overflowed = full_sync(0, &mut rules, &watch, &mut rx, false).await;
    rules.cleanup().unwrap();
    assert!(
        !overflowed,
        "the first full sync overflowed a buffer sized to the ruleset ({} KiB)",
        size >> 10
    );
}

/// Elements of the flood that follows the removal in one commit: far more
/// notifications than the buffer below holds.
const FLOOD: u32 = 100_000;

/// Notifications lost in the middle of a commit the detector was already
/// reading: the commit first removes the watched endpoint's DNAT rule,
/// which the detector reads, then floods the socket until it overflows.
/// The re-read compares the rulesets with the last commit, not with the
/// part of this one read before the loss, so the removal is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_read_just_before_its_commit_overflows_is_reported() {
    if !root_or_skip("a_removal_read_just_before_its_commit_overflows_is_reported") {
        return;
    }
    let ns = NetNs::create("dpovfmid").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    let all = services(true);
    rules.sync(&all).unwrap();
    // The detector on CPU 1, reading as the writer on CPU 0 queues: it
    // wakes at the commit's first datagram, long before the flood fills
    // the buffer.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        let _ = lab::root::skip(
            "a_removal_read_just_before_its_commit_overflows_is_reported",
            "needs two CPUs (the detector reads while the writer writes)",
        );
        return;
    }
    let buffer = 1 << 20;
    let (watch, mut rx) = start(
        &ns,
        RecvBuffer {
            initial: buffer,
            max: buffer,
        },
        1,
    );

    let (svc, first) = &all[0];
    let chain = lab::kubeproxy::nft_endpoint_chain(svc, &first[0]);
    let flood: Vec<String> = (0..FLOOD)
        .map(|i| Ipv4Addr::from(0x0b00_0000 + i).to_string())
        .collect();
    let script = format!(
        "flush chain ip kube-proxy {chain}\nadd set ip kube-proxy flood {{ type ipv4_addr; }}\nadd element ip kube-proxy flood {{ {} }}\n",
        flood.join(", ")
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    let before = watch.overflows();
    let path = file.path().to_owned();
    let started = UnixNanos::now();
    let status = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                commit_clock::pin(Some(0)).expect("pin to CPU 0");
                commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
                ns.command("nft")
                    .arg("-f")
                    .arg(&path)
                    .status()
                    .expect("nft runs")
            })
            .join()
            .expect("writer thread")
    });
    let finished = UnixNanos::now();
    assert!(status.success(), "nft -f: {status}");
    let change = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    let overflowed = watch.overflows() > before;
    rules.cleanup().unwrap();
    assert!(
        overflowed,
        "{FLOOD} elements fit a {} KiB buffer: the test proves nothing",
        buffer >> 10
    );
    match change {
        Ok(Some(Observation::RulesRemoved(c))) => {
            assert_eq!(c.endpoint, WATCHED);
            // The claimed interval can hold the commit, inside the write.
            let earliest = c.time - Duration::from_nanos(c.precision_ns);
            assert!(
                c.time >= started && earliest <= finished,
                "claimed [{earliest:?}, {:?}] outside the write [{started:?}, {finished:?}]",
                c.time
            );
        }
        other => panic!("expected the watched endpoint's removal, got {other:?}"),
    }
}
