//! Source-side dataplane detection (T_rules): when this node's dataplane
//! stops (or starts) selecting a watched endpoint for new connections.
//!
//! One module per detector, all feeding [`Observation::RulesRemoved`] /
//! [`Observation::RulesAdded`]:
//! - [`nftables`]: nf_tables netlink notifications into a mirror of the
//!   rulesets; covers kube-proxy's nftables mode and iptables-nft.
//! - [`iptables_legacy`]: change-triggered re-read of the legacy xtables
//!   tables, which send no notifications.
//!
//! "Selected" means reachable from a base chain through jumps, gotos and
//! verdict maps down to a DNAT to the endpoint: kube-proxy unlinks an
//! endpoint's chain from the service dispatch first and deletes it later.
//! Another dataplane (IPVS, Cilium) is one more module with the same output.
//!
//! nf_tables changes are timed by the kernel stamps of their notifications
//! where the socket filter attaches ([`DataplaneWatch::use_kernel_stamps`],
//! [`crate::stamps`]), else at their receipt.
//!
//! The detectors remember recent removals of endpoints not (yet) watched:
//! [`DataplaneWatch::watch`] reports such a removal with its original time;
//! and recent additions, which [`DataplaneWatch::watch_added`] reports for
//! a new endpoint (the node's kube-proxy may select it before the agent
//! learns it became ready).
//! They also know what the dataplane selects since they first read it: an
//! endpoint whose deletion started before that read and that was no longer
//! selected then was removed before the agent started
//! ([`DataplaneWatch::watch_deleted`]).

pub mod cilium;
pub mod commit_kprobe;
mod ipt_entries;
mod iptables_legacy;
mod mirror;
mod nft_msg;
mod nftables;
mod xtables;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use observer_proto::{Detector, Observation, RulesChange, UnixNanos};
use thiserror::Error;
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

pub use commit_kprobe::{CommitKprobe, CommitKprobeSetup, CommitTiming, KprobeStatus};
pub use mirror::Mirror;
use mirror::Target;
pub use nft_msg::{NFNLGRP_NFTABLES, NftEvent, RuleSummary, TableId, decode as decode_nft_message};
pub use xtables::dnat_destination;

use crate::{
    kernel::MissingInObject,
    locks::lock,
    netlink::{NetlinkDecodeError, Socket},
    stamps::{self, StampKind, Stamps, Timing},
    stop::StopSignal,
};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("malformed netlink message: {0}")]
    Decode(#[from] NetlinkDecodeError),
    #[error("iptables-legacy: {0}")]
    Legacy(std::io::Error),
    #[error(
        "iptables-legacy: the nat table is {bytes} bytes, above the {max} bytes the detector may copy (--legacy-table-max-mib): its changes are not timed"
    )]
    LegacyTableTooLarge { bytes: usize, max: usize },
    #[error("starting a detector thread: {0}")]
    Thread(std::io::Error),
    #[error("the detectors' stop signal (eventfd): {0}")]
    StopSignal(std::io::Error),
    #[error(transparent)]
    Missing(#[from] MissingInObject),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("Cilium's service maps: {0}")]
    Cilium(#[from] cilium::OpenError),
}

/// One endpoint's transition, found by a detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    endpoint: SocketAddr,
    added: bool,
    detector: Detector,
}

/// Removals and additions are remembered this long for endpoints not (yet)
/// watched: the node's kube-proxy may act before the agent learns the pod
/// is terminating, or ready.
const RECENT_REMOVALS_NS: i64 = 15 * 60 * 1_000_000_000;

/// Watched endpoints and the recent removals of every endpoint, under one
/// lock: a watch and a report are ordered, so a change is either in what
/// the watch reads or reported to it, never neither.
#[derive(Debug, Default)]
struct RulesState {
    watched: HashSet<SocketAddr>,
    /// Endpoints no longer selected, with their removal.
    recent_removals: HashMap<SocketAddr, RulesChange>,
    /// Endpoints selected since the detectors started, with their addition.
    recent_additions: HashMap<SocketAddr, RulesChange>,
    /// Endpoints selected now, per (endpoint, seen by the legacy
    /// detector): nf_tables and iptables-legacy select apart.
    /// Keyed by the mirror's compact address (one entry per endpoint of
    /// the node's rules: 250 000 in a large cluster).
    selected: HashMap<(Target, bool), Detector>,
    /// When the detectors first read the dataplane.
    read_at: Option<UnixNanos>,
}

impl RulesState {
    /// Forgets removals before `horizon`.
    fn forget_before(&mut self, horizon: UnixNanos) {
        self.recent_removals.retain(|_, c| c.time >= horizon);
        self.recent_additions.retain(|_, c| c.time >= horizon);
    }

    fn apply(&mut self, change: &Change, rules: &RulesChange) {
        self.select(change);
        let (recent, gone) = if change.added {
            (&mut self.recent_additions, &mut self.recent_removals)
        } else {
            (&mut self.recent_removals, &mut self.recent_additions)
        };
        gone.remove(&change.endpoint);
        // The first addition since the last removal: a later one (another
        // detector, a resync) does not move when routing began.
        if !change.added || !recent.contains_key(&change.endpoint) {
            recent.insert(change.endpoint, rules.clone());
        }
    }

    fn select(&mut self, change: &Change) {
        let key = (
            Target::from(change.endpoint),
            change.detector == Detector::IptablesLegacy,
        );
        if change.added {
            self.selected.insert(key, change.detector);
        } else {
            self.selected.remove(&key);
        }
    }

    /// The endpoint was removed before the dataplane was first read: its
    /// deletion started before that read, it was not selected then nor
    /// since, and no removal of it was seen. `None` too while the
    /// dataplane selects nothing at all (no service rules to read here).
    fn removed_before_start(
        &self,
        endpoint: SocketAddr,
        deletion_start: UnixNanos,
    ) -> Option<RulesChange> {
        let read_at = self.read_at.filter(|r| deletion_start < *r)?;
        let selected = |legacy| {
            self.selected
                .contains_key(&(Target::from(endpoint), legacy))
        };
        if selected(false) || selected(true) || self.recent_removals.contains_key(&endpoint) {
            return None;
        }
        let detector = *self.selected.values().next()?;
        Some(RulesChange {
            endpoint,
            detector,
            time: read_at,
            precision_ns: 0,
        })
    }
}

/// State shared by the watch handle and the detector threads.
#[derive(Debug)]
pub(crate) struct Shared {
    rules: Mutex<RulesState>,
    commit_kprobe: Mutex<Option<CommitKprobe>>,
    /// The kernel stamps of the nf_tables notifications, or why not.
    stamps: Mutex<Stamps>,
    /// Times nf_tables notifications overflowed the socket (ENOBUFS) and
    /// the rulesets were re-read.
    overflows: AtomicU64,
    /// Re-reads of the legacy nat table that failed or were refused.
    legacy_failed_reads: AtomicU64,
    stop: StopSignal,
    tx: Sender<Observation>,
}

impl Shared {
    fn new(tx: Sender<Observation>) -> Result<Self, DataplaneError> {
        Ok(Shared {
            rules: Mutex::new(RulesState::default()),
            commit_kprobe: Mutex::new(None),
            stamps: Mutex::new(Stamps::Receipt(
                "no stamps were handed to the detector".into(),
            )),
            overflows: AtomicU64::new(0),
            legacy_failed_reads: AtomicU64::new(0),
            stop: StopSignal::new().map_err(DataplaneError::StopSignal)?,
            tx,
        })
    }

    /// Sends without ever blocking a stop: waits while the channel is full,
    /// gives up when the watch is dropped or the receiver is gone.
    fn send(&self, obs: Observation) {
        send_until_stopped(&self.tx, &self.stop, obs);
    }

    /// The change time and its precision: the commit's kernel time when the
    /// probe saw it, else the time the detector learnt of it.
    /// `commit_window_ns`: how long before `received` the detector knows
    /// the commit happened (the xtables lock held; 0 when it does not know).
    fn change_time(
        &self,
        slot: u32,
        received: UnixNanos,
        fallback_precision_ns: u64,
        commit_window_ns: u64,
    ) -> (UnixNanos, u64) {
        let probed = lock(&self.commit_kprobe, "dataplane commit kprobe")
            .as_mut()
            .and_then(|p| p.commit_time(slot, received, commit_window_ns));
        match probed {
            Some(t) => (t, (received - t).unsigned_abs()),
            None => (received, fallback_precision_ns),
        }
    }

    /// What a detector found selected at its first read (`at`): the state
    /// the dataplane started in, no change to report. The earliest read of
    /// all detectors is kept.
    fn read_first(&self, selected: Vec<Change>, at: UnixNanos) {
        let mut state = lock(&self.rules, "dataplane rules");
        for change in &selected {
            state.select(change);
        }
        state.read_at.get_or_insert(at);
    }

    /// The endpoints watched now.
    fn watched(&self) -> HashSet<SocketAddr> {
        lock(&self.rules, "dataplane rules").watched.clone()
    }

    /// Records every change and reports those of watched endpoints.
    fn report(&self, changes: Vec<Change>, time: UnixNanos, precision_ns: u64) {
        if changes.is_empty() {
            return;
        }
        let mut reports = Vec::new();
        {
            let mut state = lock(&self.rules, "dataplane rules");
            state.forget_before(time - RECENT_REMOVALS_NS);
            for change in changes {
                let rules = RulesChange {
                    endpoint: change.endpoint,
                    detector: change.detector,
                    time,
                    precision_ns,
                };
                state.apply(&change, &rules);
                if state.watched.contains(&change.endpoint) {
                    info!(endpoint = %change.endpoint, detector = ?change.detector, added = change.added, "dataplane change");
                    reports.push(if change.added {
                        Observation::RulesAdded(rules)
                    } else {
                        Observation::RulesRemoved(rules)
                    });
                }
            }
        }
        // Outside the lock: a full channel must not block a watch (the
        // channel's reader is the one that watches).
        for obs in reports {
            self.send(obs);
        }
    }
}

/// Which dataplane layouts were found at start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layouts {
    /// Table `ip kube-proxy` (kube-proxy nftables mode).
    pub nftables: bool,
    /// Tables written by iptables-nft.
    pub iptables_nft: bool,
    /// Legacy xtables tables (`ip_tables_names` of this network namespace).
    pub iptables_legacy: bool,
}

/// The running detectors of this agent, in the network namespace that was
/// current when [`spawn`] ran. Dropping it stops them.
#[derive(Debug)]
pub struct DataplaneWatch {
    shared: Arc<Shared>,
    /// The nf_tables notification socket, for the stamp filter.
    nft_socket: Option<Arc<Socket>>,
    layouts: Layouts,
    /// How each kind of commit is timed, once [`Self::time_commits_by_kernel`] ran.
    commit_timing: Vec<KprobeStatus>,
    threads: Vec<JoinHandle<()>>,
}

impl DataplaneWatch {
    /// Reports rule changes for `endpoint` from now on; if this node's rules
    /// already stopped selecting it (in the last 15 minutes), reports that
    /// removal, with its original time, right away.
    pub fn watch(&self, endpoint: SocketAddr) {
        self.watch_from(endpoint, None);
    }

    /// [`Self::watch`] for an endpoint whose deletion started at
    /// `deletion_start`: when that was before the detectors first read the
    /// dataplane (this agent started after it) and the endpoint was no
    /// longer selected then, reports
    /// [`Observation::RemovedBeforeStart`]: removed, at an unknown time.
    pub fn watch_deleted(&self, endpoint: SocketAddr, deletion_start: UnixNanos) {
        self.watch_from(endpoint, Some(deletion_start));
    }

    /// Reports rule changes for a new `endpoint` from now on; if this
    /// node's rules started selecting it since the detectors started (in
    /// the last 15 minutes), reports that addition, with its original
    /// time, right away.
    pub fn watch_added(&self, endpoint: SocketAddr) {
        let mut state = lock(&self.shared.rules, "dataplane rules");
        state.watched.insert(endpoint);
        let earlier = state.recent_additions.get(&endpoint).cloned();
        // Sent under the lock, so before any later change of the endpoint.
        if let Some(change) = earlier
            && self
                .shared
                .tx
                .try_send(Observation::RulesAdded(change))
                .is_err()
        {
            warn!(%endpoint, "observation channel full: earlier rules addition not reported");
        }
    }

    fn watch_from(&self, endpoint: SocketAddr, deletion_start: Option<UnixNanos>) {
        let mut state = lock(&self.shared.rules, "dataplane rules");
        state.watched.insert(endpoint);
        let earlier = match state.recent_removals.get(&endpoint) {
            Some(change) => Some(Observation::RulesRemoved(change.clone())),
            None => deletion_start
                .and_then(|t0| state.removed_before_start(endpoint, t0))
                .map(Observation::RemovedBeforeStart),
        };
        // Sent under the lock, so before any later change of the endpoint.
        if let Some(obs) = earlier
            && self.shared.tx.try_send(obs).is_err()
        {
            warn!(%endpoint, "observation channel full: earlier rules removal not reported");
        }
    }

    pub fn unwatch(&self, endpoint: SocketAddr) {
        lock(&self.shared.rules, "dataplane rules")
            .watched
            .remove(&endpoint);
    }

    /// Times changes by the kernel's commit where [`commit_kprobe::load`]
    /// attaches its probes; returns how each kind of commit is timed. Call
    /// it after [`spawn`]: the detector's ruleset dump loads nf_tables,
    /// whose function the probe needs.
    pub fn time_commits_by_kernel(
        &mut self,
        ebpf: &mut aya::Ebpf,
    ) -> Result<&[KprobeStatus], DataplaneError> {
        let setup = commit_kprobe::load(ebpf)?;
        *lock(&self.shared.commit_kprobe, "dataplane commit kprobe") = setup.kprobe;
        self.commit_timing = setup.statuses;
        Ok(&self.commit_timing)
    }

    /// How each kind of commit is timed (empty before
    /// [`Self::time_commits_by_kernel`]: all by the detectors).
    pub fn commit_timing(&self) -> &[KprobeStatus] {
        &self.commit_timing
    }

    /// Times nf_tables changes by the kernel stamps of their notifications
    /// (attaching their filter to the notification socket); where that
    /// fails, they stay timed at receipt. Returns the timing in force.
    pub fn use_kernel_stamps(&self, ebpf: &mut aya::Ebpf, stamps: Stamps) -> Timing {
        let stamps = match (stamps, &self.nft_socket) {
            (Stamps::Kernel(join), Some(sock)) => {
                match stamps::attach_filter(ebpf, StampKind::Nftables, &**sock) {
                    Ok(()) => Stamps::Kernel(join),
                    Err(e) => Stamps::Receipt(e.to_string()),
                }
            }
            (Stamps::Kernel(_), None) => Stamps::Receipt("no notification socket".into()),
            (receipt, _) => receipt,
        };
        let timing = stamps.timing();
        match &timing {
            Timing::KernelStamp => info!("nf_tables changes are timed by the kernel"),
            Timing::Receipt(why) => {
                warn!(reason = %why, "nf_tables changes are timed when the detector reads them, not by the kernel")
            }
        }
        *lock(&self.shared.stamps, "nf_tables stamps") = stamps;
        timing
    }

    /// How nf_tables changes are timed.
    pub fn timing(&self) -> Timing {
        lock(&self.shared.stamps, "nf_tables stamps").timing()
    }

    pub fn layouts(&self) -> Layouts {
        self.layouts
    }

    /// How often nf_tables notifications were lost (the socket's buffer
    /// overflowed) and the rulesets re-read instead.
    pub fn overflows(&self) -> u64 {
        self.shared.overflows.load(Ordering::Relaxed)
    }

    /// Re-reads of the legacy nat table that failed or were refused (a
    /// table over `Limits::legacy_table_max_bytes`).
    pub fn legacy_failed_reads(&self) -> u64 {
        self.shared.legacy_failed_reads.load(Ordering::Relaxed)
    }

    /// The nf_tables notification socket's receive buffer as the kernel
    /// accounts it (twice the size set), when the socket is open.
    pub fn recv_buffer_bytes(&self) -> Option<i32> {
        self.nft_socket.as_ref()?.recv_buffer().ok()
    }

    /// Starts the Cilium detector on the maps pinned under
    /// `options.pin_dir`, timed by the writer's bpf() syscalls where `ebpf`
    /// is given and the tracepoint attaches, else by a read-only poll.
    pub fn follow_cilium(
        &mut self,
        ebpf: Option<&mut aya::Ebpf>,
        options: &cilium::CiliumOptions,
    ) -> Result<cilium::CiliumStatus, DataplaneError> {
        let (detector, status) = cilium::CiliumDetector::open(ebpf, options)?;
        let s = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("dataplane-cilium".into())
            .spawn(move || detector.run(&s))
            .map_err(DataplaneError::Thread)?;
        self.threads.push(thread);
        Ok(status)
    }
}

impl Drop for DataplaneWatch {
    fn drop(&mut self) {
        self.shared.stop.stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The nf_tables notification socket's receive buffer, in bytes as set
/// (the kernel accounts twice that): its size at start and the limit it
/// doubles up to after each overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvBuffer {
    pub initial: i32,
    pub max: i32,
}

impl RecvBuffer {
    /// Buffer (as set) per object of the ruleset: a full sync deletes and
    /// re-adds each, two notifications of up to about 1 KiB of kernel
    /// memory each, and the kernel accounts twice the size set.
    const PER_OBJECT: i32 = 1 << 10;

    /// What a full sync of a ruleset of `objects` needs while the detector
    /// lags, within `initial..=max`.
    pub fn for_ruleset(&self, objects: usize) -> i32 {
        i32::try_from(objects)
            .unwrap_or(i32::MAX)
            .saturating_mul(Self::PER_OBJECT)
            .clamp(self.initial, self.max.max(self.initial))
    }
}

impl Default for RecvBuffer {
    /// A 10k-endpoint full sync is a few MiB of messages; a 250k one
    /// overflowed 64 MiB (docs/benchmarks.md).
    fn default() -> Self {
        RecvBuffer {
            initial: 64 << 20,
            max: 1 << 30,
        }
    }
}

/// Starts the detectors in the current network namespace with the default
/// receive buffer ([`spawn_with`]).
pub fn spawn(tx: Sender<Observation>) -> Result<DataplaneWatch, DataplaneError> {
    spawn_with(tx, Limits::default())
}

/// What the detectors may hold of the kernel's memory and their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub nft_buffer: RecvBuffer,
    /// Largest legacy `nat` table the detector copies to re-read it (the
    /// copy is the table's whole size: 1.9 KiB per endpoint, about 470 MiB
    /// at 250 000, docs/benchmarks.md). A larger one is not read, and its
    /// changes are not timed, rather than the agent outgrowing its memory
    /// limit.
    pub legacy_table_max_bytes: usize,
}

impl Default for Limits {
    /// 128 MiB of legacy table: about 65 000 endpoints, within the
    /// DaemonSet's 256 MiB memory limit.
    fn default() -> Self {
        Limits {
            nft_buffer: RecvBuffer::default(),
            legacy_table_max_bytes: 128 << 20,
        }
    }
}

/// Starts the detectors in the current network namespace. The nf_tables
/// detector always runs (kube-proxy may create its tables later); the
/// iptables-legacy one runs when legacy tables exist or appear.
pub fn spawn_with(
    tx: Sender<Observation>,
    limits: Limits,
) -> Result<DataplaneWatch, DataplaneError> {
    let buffer = limits.nft_buffer;
    let shared = Arc::new(Shared::new(tx)?);
    // Subscribe before the dump so no change between the two is lost.
    let subscribed = UnixNanos::now();
    let sock = Arc::new(nftables::subscribe(buffer)?);
    let nft_socket = Some(sock.clone());
    let mut mirror = Mirror::new();
    let objects = nftables::load(&mut mirror)?;
    // kube-proxy's next full sync rewrites all of it in one commit.
    let wanted = buffer.for_ruleset(objects);
    if wanted > buffer.initial {
        match sock.set_recv_buffer(wanted) {
            Ok(()) => info!(
                objects,
                bytes = wanted,
                "nf_tables notification buffer sized to the ruleset"
            ),
            Err(e) => {
                warn!(error = %e, bytes = wanted, "could not size the nf_tables notification buffer to the ruleset")
            }
        }
    }
    // Every target of the dump comes back as added: already selected at
    // start, which is no change.
    let mut selected = nftables::changes(&mut mirror);
    let layouts = Layouts {
        nftables: mirror
            .tables()
            .any(|t| t.family == 2 && t.name == "kube-proxy"),
        iptables_nft: mirror.tables().any(|t| t.family == 2 && t.name == "nat"),
        iptables_legacy: iptables_legacy::tables_present(),
    };
    let legacy = iptables_legacy::Watcher::open(limits.legacy_table_max_bytes)?;
    selected.extend(legacy.selected());
    shared.read_first(selected, UnixNanos::now());
    info!(
        nftables = layouts.nftables,
        iptables_nft = layouts.iptables_nft,
        iptables_legacy = layouts.iptables_legacy,
        "dataplane layouts found; nf_tables notifications and iptables-legacy re-reads active"
    );

    let mut threads = Vec::new();
    let s = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("dataplane-nft".into())
            .spawn(move || nftables::run(&s, sock, mirror, buffer, subscribed))
            .map_err(DataplaneError::Thread)?,
    );
    let s = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("dataplane-legacy".into())
            .spawn(move || legacy.run(&s))
            .map_err(DataplaneError::Thread)?,
    );
    Ok(DataplaneWatch {
        shared,
        nft_socket,
        layouts,
        commit_timing: Vec::new(),
        threads,
    })
}

pub(crate) fn send_until_stopped(
    tx: &Sender<Observation>,
    stop: &StopSignal,
    mut obs: Observation,
) {
    use tokio::sync::mpsc::error::TrySendError;
    while !stop.is_stopped() {
        match tx.try_send(obs) {
            Ok(()) => return,
            Err(TrySendError::Full(back)) => {
                obs = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TrySendError::Closed(_)) => {
                stop.stop();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::{Receiver, channel};

    use super::*;

    fn ep(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 180, 0, last], 8080))
    }

    #[test]
    fn the_buffer_holds_a_full_sync_of_the_ruleset_within_its_bounds() {
        let b = RecvBuffer::default();
        assert_eq!(b.for_ruleset(0), b.initial);
        assert_eq!(
            b.for_ruleset(40_000),
            b.initial,
            "10k endpoints fit at start"
        );
        assert_eq!(b.for_ruleset(300_000), 300_000 << 10);
        assert_eq!(b.for_ruleset(5_000_000), b.max);
        let odd = RecvBuffer {
            initial: 8 << 20,
            max: 1 << 20,
        };
        assert_eq!(odd.for_ruleset(1_000_000), 8 << 20, "never below the start");
    }

    fn watch() -> (DataplaneWatch, Receiver<Observation>) {
        let (tx, rx) = channel(16);
        let watch = DataplaneWatch {
            shared: Arc::new(Shared::new(tx).unwrap()),
            nft_socket: None,
            layouts: Layouts::default(),
            commit_timing: Vec::new(),
            threads: Vec::new(),
        };
        (watch, rx)
    }

    fn change(last: u8, added: bool) -> Change {
        Change {
            endpoint: ep(last),
            added,
            detector: Detector::Nftables,
        }
    }

    fn t(nanos: i64) -> UnixNanos {
        UnixNanos::from_nanos(nanos)
    }

    #[test]
    fn only_changes_of_watched_endpoints_are_reported() {
        let (watch, mut rx) = watch();
        watch.shared.report(vec![change(1, true)], t(100), 1);
        assert!(rx.try_recv().is_err(), "unwatched: nothing reported");
        watch.watch(ep(1));
        assert!(rx.try_recv().is_err(), "selected: no removal to report");
        watch.shared.report(vec![change(1, false)], t(200), 1);
        assert!(matches!(
            rx.try_recv(),
            Ok(Observation::RulesRemoved(c)) if c.endpoint == ep(1) && c.time == t(200)
        ));
        watch.unwatch(ep(1));
        watch.shared.report(vec![change(1, true)], t(300), 1);
        assert!(rx.try_recv().is_err(), "unwatched again: nothing reported");
    }

    #[test]
    fn a_removal_before_the_watch_is_reported_at_the_watch() {
        let (watch, mut rx) = watch();
        watch.shared.report(vec![change(1, true)], t(100), 1);
        watch.shared.report(vec![change(1, false)], t(150), 1);
        watch.shared.report(vec![change(1, true)], t(160), 1);
        watch.watch(ep(1));
        assert!(
            rx.try_recv().is_err(),
            "selected again: no removal to report"
        );

        watch.shared.report(vec![change(2, true)], t(300), 1);
        watch.shared.report(vec![change(2, false)], t(400), 1);
        watch.watch(ep(2));
        assert!(matches!(
            rx.try_recv(),
            Ok(Observation::RulesRemoved(c)) if c.endpoint == ep(2) && c.time == t(400)
        ));
    }

    #[test]
    fn an_endpoint_gone_before_the_first_read_was_removed_before_the_start() {
        let (watch, mut rx) = watch();
        // The agent (re)started at 1000 and found only endpoint 1 selected.
        watch.shared.read_first(vec![change(1, true)], t(1000));
        watch.watch_deleted(ep(2), t(500));
        match rx.try_recv() {
            Ok(Observation::RemovedBeforeStart(c)) => {
                assert_eq!((c.endpoint, c.time), (ep(2), t(1000)));
                assert_eq!(c.detector, Detector::Nftables);
            }
            other => panic!("expected removed_before_start, got {other:?}"),
        }
        watch.watch_deleted(ep(1), t(500));
        assert!(rx.try_recv().is_err(), "still selected: nothing to report");
        watch.watch_deleted(ep(3), t(2000));
        assert!(
            rx.try_recv().is_err(),
            "deleted after the read: its removal will be seen"
        );
        watch.watch(ep(4));
        assert!(rx.try_recv().is_err(), "no deletion start: nothing known");
        // A removal seen since the start is reported as such, with its time.
        watch.shared.report(vec![change(1, false)], t(1500), 1);
        watch.watch_deleted(ep(1), t(500));
        assert!(matches!(
            rx.try_recv(),
            Ok(Observation::RulesRemoved(c)) if c.time == t(1500)
        ));
    }

    #[test]
    fn where_the_dataplane_selects_nothing_no_removal_is_inferred() {
        let (watch, mut rx) = watch();
        watch.shared.read_first(Vec::new(), t(1000));
        watch.watch_deleted(ep(2), t(500));
        assert!(rx.try_recv().is_err(), "no service rules here to read");
    }

    #[test]
    fn an_addition_before_a_new_endpoints_watch_is_reported_at_the_watch() {
        let (watch, mut rx) = watch();
        watch.shared.read_first(vec![change(3, true)], t(50));
        watch.shared.report(vec![change(1, true)], t(100), 7);
        watch.shared.report(vec![change(1, true)], t(120), 7);
        watch.watch(ep(1));
        assert!(rx.try_recv().is_err(), "a deletion's watch: no addition");
        watch.unwatch(ep(1));
        watch.watch_added(ep(1));
        match rx.try_recv() {
            Ok(Observation::RulesAdded(c)) => {
                assert_eq!((c.endpoint, c.time, c.precision_ns), (ep(1), t(100), 7));
            }
            other => panic!("expected the first addition, got {other:?}"),
        }
        watch.shared.report(vec![change(2, true)], t(200), 1);
        watch.shared.report(vec![change(2, false)], t(210), 1);
        watch.watch_added(ep(2));
        assert!(rx.try_recv().is_err(), "removed again: nothing selects it");
        watch.watch_added(ep(3));
        assert!(
            rx.try_recv().is_err(),
            "selected at the first read: when is unknown"
        );
        watch.watch_added(ep(4));
        watch.shared.report(vec![change(4, true)], t(300), 1);
        assert!(matches!(
            rx.try_recv(),
            Ok(Observation::RulesAdded(c)) if c.endpoint == ep(4) && c.time == t(300)
        ));
    }

    #[test]
    fn removals_are_forgotten_after_the_horizon() {
        let (watch, mut rx) = watch();
        watch.shared.report(vec![change(1, false)], t(200), 1);
        watch.shared.report(vec![change(2, false)], t(300), 1);
        watch
            .shared
            .report(vec![change(3, true)], t(200 + RECENT_REMOVALS_NS + 1), 1);
        watch.watch(ep(1));
        assert!(rx.try_recv().is_err(), "beyond the horizon: forgotten");
        watch.watch(ep(2));
        assert!(matches!(
            rx.try_recv(),
            Ok(Observation::RulesRemoved(c)) if c.endpoint == ep(2)
        ));
    }
}
