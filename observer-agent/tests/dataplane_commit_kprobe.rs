//! Root-only: how ruleset commits are timed on the kernel the tests run on.
//! Where the kernel has kprobes (Debian's 6.1 in `cargo xtask test`'s
//! guest, which says so through `EXPECT_KPROBES_ENV`) the commit kprobes
//! must be chosen and attached; where it has none (this project's 6.18) the
//! detectors' own timing must be chosen, with the reason.
//!
//! With kprobes, each commit's kernel time is checked against the write
//! that made it and against the netlink notification of it. The claims are
//! orderings: the write's start <= the kernel's commit <= the write's end,
//! and the commit <= the notification's receipt by a witness. The bounds
//! (`NOTIFY_BOUND_NS`, `CLOCK_TOLERANCE_NS`) are not timing claims: they
//! only catch a stale or foreign commit; the guest's emulated CPUs are
//! about 20 times slower than the host's. The printed deltas are the
//! measurements.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lab::{
    commit_clock::{self, CommitClock, Window, timed},
    kubeproxy::{Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::{expect_kprobes, root_or_skip},
    witness::contains_newgen,
};
use observer_agent::{
    dataplane::{
        self, CommitKprobe, CommitTiming, DataplaneWatch, NFNLGRP_NFTABLES, commit_kprobe,
    },
    kernel::{Kernel, LoadOptions},
    netlink::{NETLINK_NETFILTER, Socket},
    realtime::DEFAULT_TIMING_PRIORITY,
    receipt::WAKE_SLACK_NS,
    stamps::{self, StampKind},
};
use observer_common::ruleset::{COMMIT_NFTABLES, COMMIT_XTABLES};
use observer_proto::{Observation, RulesChange, UnixNanos};
use tokio::sync::mpsc::{Receiver, channel};

/// Error of the kernel-to-wall-clock conversion (measured ~0.1 ms, see
/// observer-agent/src/clock.rs), with room for the guest.
const CLOCK_TOLERANCE_NS: i64 = 1_000_000;
/// Longest wait from a commit to the witness's receipt of its notification
/// accepted as the same commit (not a timing claim, see the module doc).
const NOTIFY_BOUND_NS: i64 = 500_000_000;

/// Loads nf_tables and x_tables (modules on Debian's kernels: their
/// functions exist once a dataplane used them), as kube-proxy's first
/// listing does, in a namespace of the test's own.
fn load_netfilter_modules() {
    let ns = NetNs::create("commitmods").expect("netns");
    ns.sh("nft list tables && iptables-legacy -w -t nat -S >/dev/null")
        .expect("nft and iptables-legacy list their rulesets");
}

/// The eBPF object with the commit probes loaded and, where chosen, attached.
fn kernel_with_probes() -> (Kernel, commit_kprobe::CommitKprobeSetup) {
    load_netfilter_modules();
    let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
    let setup = commit_kprobe::load(kernel.ebpf_mut()).expect("probes pass the verifier");
    (kernel, setup)
}

#[test]
fn commit_timing_is_chosen_by_the_kernel() {
    if !root_or_skip("commit_timing_is_chosen_by_the_kernel") {
        return;
    }
    let (_kernel, setup) = kernel_with_probes();
    let functions: Vec<&str> = setup.statuses.iter().map(|s| s.function).collect();
    assert_eq!(functions, ["nf_tables_commit", "xt_replace_table"]);
    let kprobes = expect_kprobes();
    for status in &setup.statuses {
        eprintln!("{}: {:?}", status.function, status.timing);
        match &status.timing {
            CommitTiming::Kprobe => assert!(kprobes, "kprobe chosen without kprobes: {status:?}"),
            CommitTiming::Detector(why) => {
                assert!(!kprobes, "kprobes expected: {status:?}");
                assert!(!why.is_empty());
            }
        }
    }
    assert_eq!(setup.kprobe.is_some(), kprobes);
}

/// What a commit test needs: the loaded object (it owns the probes), the
/// attached probe and a namespace of its own; None when not root or (after
/// saying why) on a kernel without kprobes.
fn attached_probe(test: &str) -> Option<(Kernel, CommitKprobe, NetNs)> {
    if !root_or_skip(test) {
        return None;
    }
    if !expect_kprobes() {
        eprintln!(
            "{test}: no kprobes on this kernel; commit_timing_is_chosen_by_the_kernel checks the detectors' timing is chosen"
        );
        return None;
    }
    let (kernel, setup) = kernel_with_probes();
    let probe = setup.kprobe.expect("kprobes expected and attached");
    Some((kernel, probe, NetNs::create("commit").expect("netns")))
}

/// Runs `write` in `ns`; returns the kernel time of the commit it made (a
/// new one, within the write) and the write's window, and prints both.
fn commit_of(probe: &mut CommitKprobe, slot: u32, ns: &NetNs, write: &str) -> (UnixNanos, Window) {
    let before = probe.latest(slot);
    let (out, window) = timed(|| ns.sh(write));
    out.unwrap_or_else(|e| panic!("{write}: {e}"));
    let commit = probe
        .latest(slot)
        .unwrap_or_else(|| panic!("{write}: no commit recorded"));
    assert!(
        before.is_none_or(|b| commit > b),
        "{write}: no new commit (latest {commit}, before the write {before:?})"
    );
    assert_within(write, commit, window);
    eprintln!(
        "{write}: commit {:.3} ms into a {:.3} ms write",
        (commit - window.started) as f64 / 1e6,
        (window.finished - window.started) as f64 / 1e6
    );
    (commit, window)
}

/// `t` lies within the write's window (up to the clock conversion's error).
fn assert_within(what: &str, t: UnixNanos, window: Window) {
    assert!(
        t >= window.started - CLOCK_TOLERANCE_NS && t <= window.finished + CLOCK_TOLERANCE_NS,
        "{what}: commit at {t}, outside the write [{}, {}]",
        window.started,
        window.finished
    );
}

#[test]
fn nft_commits_are_timed_by_the_kernel_before_their_notification() {
    let Some((_kernel, mut probe, ns)) =
        attached_probe("nft_commits_are_timed_by_the_kernel_before_their_notification")
    else {
        return;
    };
    let witness = CommitClock::start(&ns.path(), Mode::Nftables).expect("commit witness starts");
    for write in [
        "nft add table ip obs",
        "nft add chain ip obs out '{ type nat hook output priority -100; }'",
        "nft add rule ip obs out ip daddr 172.30.0.10 tcp dport 80 dnat to 10.180.0.1:8080",
        "nft flush chain ip obs out",
        "nft delete table ip obs",
    ] {
        let (commit, window) = commit_of(&mut probe, COMMIT_NFTABLES, &ns, write);
        let notified = witness
            .commit_between(window.started, window.finished + NOTIFY_BOUND_NS)
            .unwrap_or_else(|| panic!("{write}: no notification witnessed"))
            .latest;
        assert!(
            commit <= notified + CLOCK_TOLERANCE_NS,
            "{write}: kernel commit at {commit}, after its notification at {notified}"
        );
        assert!(
            notified - commit <= NOTIFY_BOUND_NS,
            "{write}: notification {} ms after the commit",
            (notified - commit) as f64 / 1e6
        );
        eprintln!(
            "{write}: notified {:.3} ms after the commit",
            (notified - commit) as f64 / 1e6
        );
    }
}

/// The two kernel times of an nf_tables commit, side by side: the commit
/// kprobe's (at `nf_tables_commit`) and the socket filter's stamp of the
/// commit's first notification (`observer_agent::stamps`, the method used
/// where kprobes do not exist). The filter runs when the commit queues its
/// notifications, so its stamp follows the kprobe's time; the printed gap
/// is what the filter adds to a change's time on this kernel.
#[test]
fn the_notification_stamp_follows_the_commit_kprobe() {
    let Some((mut kernel, mut probe, ns)) =
        attached_probe("the_notification_stamp_follows_the_commit_kprobe")
    else {
        return;
    };
    let mut stamps = kernel.take_stamps(StampKind::Nftables);
    let sock = ns
        .run(|| {
            let sock = Socket::open(NETLINK_NETFILTER)?;
            sock.join_group(NFNLGRP_NFTABLES)?;
            sock.set_recv_timeout(Duration::from_secs(5))?;
            Ok::<_, std::io::Error>(sock)
        })
        .expect("enters the namespace")
        .expect("nf_tables notification socket");
    stamps::attach_filter(kernel.ebpf_mut(), StampKind::Nftables, &sock)
        .expect("the stamp filter attaches");
    let mut buf = vec![0u8; 1 << 20];
    for write in [
        "nft add table ip obs",
        "nft add chain ip obs out '{ type nat hook output priority -100; }'",
        "nft add rule ip obs out ip daddr 172.30.0.10 tcp dport 80 dnat to 10.180.0.1:8080",
        "nft delete table ip obs",
    ] {
        let (commit, _) = commit_of(&mut probe, COMMIT_NFTABLES, &ns, write);
        // The commit's datagrams, up to its NEWGEN; the first is stamped.
        let mut stamped = None;
        loop {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{write}: no notification: {e}"));
            stamped = stamped.or_else(|| stamps.time_of(&buf[..n]));
            if contains_newgen(&buf[..n]) {
                break;
            }
        }
        let stamped = stamped.unwrap_or_else(|| panic!("{write}: notification not stamped"));
        assert!(
            commit <= stamped + CLOCK_TOLERANCE_NS,
            "{write}: filter stamp {stamped} before the kprobe's commit time {commit}"
        );
        assert!(
            stamped - commit <= NOTIFY_BOUND_NS,
            "{write}: filter stamp {} ms after the commit",
            (stamped - commit) as f64 / 1e6
        );
        eprintln!(
            "{write}: filter stamp {:.3} ms after the kprobe's commit time",
            (stamped - commit) as f64 / 1e6
        );
    }
}

/// iptables-legacy sends no notification: the write's window is the reference.
#[test]
fn xtables_replacements_are_timed_by_the_kernel_within_the_write() {
    let Some((_kernel, mut probe, ns)) =
        attached_probe("xtables_replacements_are_timed_by_the_kernel_within_the_write")
    else {
        return;
    };
    for write in [
        "iptables-legacy -w -t nat -A OUTPUT -d 172.30.0.10/32 -j ACCEPT",
        "iptables-legacy -w -t nat -A OUTPUT -d 172.30.0.11/32 -j ACCEPT",
        "iptables-legacy -w -t nat -D OUTPUT -d 172.30.0.10/32 -j ACCEPT",
        "iptables-legacy -w -t nat -F OUTPUT",
    ] {
        commit_of(&mut probe, COMMIT_XTABLES, &ns, write);
    }
}

fn backend(last: u8) -> Backend {
    Backend {
        ip: Ipv4Addr::new(10, 180, 0, last),
        port: 8080,
    }
}

/// Starts the detectors in `ns` under SCHED_FIFO, as the agent does, then
/// the commit kprobes as the agent's start-up does (after the detectors'
/// dump loaded nf_tables).
fn start_agent_path(ns: &NetNs, kernel: &mut Kernel) -> (DataplaneWatch, Receiver<Observation>) {
    let (tx, rx) = channel(64);
    let mut watch = ns
        .run(move || {
            commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
            dataplane::spawn(tx)
        })
        .expect("enter netns")
        .expect("dataplane watch starts");
    let statuses = watch
        .time_commits_by_kernel(kernel.ebpf_mut())
        .expect("probes pass the verifier");
    let nft = statuses
        .iter()
        .find(|s| s.function == "nf_tables_commit")
        .expect("nf_tables_commit status");
    assert_eq!(nft.attached(), expect_kprobes(), "{nft:?}");
    (watch, rx)
}

async fn next_removal(rx: &mut Receiver<Observation>, what: &str) -> RulesChange {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Observation::RulesRemoved(change))) => change,
        other => panic!("{what}: expected rules_removed, got {other:?}"),
    }
}

/// The agent's own path: a removal found by a detector carries the kernel's
/// commit time where the kprobe is attached (so it lies within the write,
/// even on the slow guest), else the detector's time and precision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_times_rule_removals_by_the_chosen_source() {
    if !root_or_skip("the_agent_times_rule_removals_by_the_chosen_source") {
        return;
    }
    load_netfilter_modules();
    let svc = ServicePort {
        namespace: "ns1".into(),
        name: "web".into(),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::new(172, 30, 0, 10),
        port: 80,
    };
    let (kept, gone) = (backend(1), backend(2));
    for mode in [Mode::Nftables, Mode::IptablesLegacy] {
        let ns = NetNs::create("commitagent").expect("netns");
        let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
        rules.sync(&[(svc.clone(), vec![kept, gone])]).unwrap();
        // One object per mode: the probes' map has one owner.
        let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
        let (watch, mut rx) = start_agent_path(&ns, &mut kernel);
        watch.watch(SocketAddr::from((gone.ip, gone.port)));
        let window: Window = rules.sync(&[(svc.clone(), vec![kept])]).unwrap().into();
        let what = format!("{mode} removal");
        let change = next_removal(&mut rx, &what).await;
        eprintln!(
            "{what}: reported {:.3} ms into a {:.3} ms write, precision {:.3} ms",
            (change.time - window.started) as f64 / 1e6,
            (window.finished - window.started) as f64 / 1e6,
            change.precision_ns as f64 / 1e6
        );
        if expect_kprobes() {
            assert_within(&what, change.time, window);
        } else {
            assert!(change.time >= window.started, "{what}: {change:?}");
            if mode == Mode::Nftables {
                assert!(change.precision_ns >= WAKE_SLACK_NS, "{what}: {change:?}");
            }
        }
    }
}
