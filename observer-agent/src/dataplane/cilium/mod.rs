//! Detector for Cilium's kube-proxy replacement: no netfilter rule changes
//! there; Cilium's agent rewrites its pinned service maps, and socket-level
//! balancing picks a backend at connect() from slot `(random % count) + 1`
//! of the frontend. The cutover for a backend moved to the inactive tail
//! is the write of the frontend's master (slot 0), which Cilium makes after
//! the slots, one `BPF_MAP_UPDATE_ELEM` per entry.
//!
//! - The maps are opened read-only ([`sys`]) and checked against the layout
//!   observer-common knows ([`maps`]); an unknown layout is refused by name.
//! - [`mirror`]: a copy of both maps, read whole at the start and kept by
//!   the writer's writes, and the endpoints they select. Every endpoint is
//!   followed, watched or not, into the dataplane's recent changes: a
//!   cutover before the agent learns of the deletion is reported with its
//!   own time when the watch starts.
//! - [`tracepoint`]: the writer's element writes, with the kernel times of
//!   the syscall's entry and exit (its duration is the precision);
//!   [`descriptors`] tells which of the writer's maps they go to, and
//!   forgets a descriptor the writer closes, and a writer's that exits.
//! - Batch writes to a classified map are sent element by element with
//!   the batch syscall's times.
//! - Writes the programs could not send (ring full, key unreadable, a
//!   batch to a map not classified yet or longer than
//!   `MAX_BATCH_ELEMENTS`; checked every [`SAFETY_POLL`]) make the mirror
//!   re-read.
//!   Where the tracepoint cannot attach, every poll interval (at least
//!   [`MIN_POLL`]) re-reads the masters and slots of the frontends that
//!   hold a watched endpoint (a lookup per entry), and the whole mirror is
//!   re-read at a pace set by its cost ([`full_read_every`]): a watched
//!   endpoint's cutover is found within a poll, the rest (other endpoints,
//!   a watched endpoint in a new frontend) within a full read.
//!
//! Maglev frontends: where Cilium runs Maglev its outer maps
//! (`cilium_lb{4,6}_maglev`) are opened read-only too, their writes
//! recognised ([`descriptors`]) and a Maglev frontend's change decided at
//! the later of its outer-map and master writes ([`mirror`]), as
//! socket-LB cuts over at the master and the TC/XDP path at the outer
//! map. The lookup table itself is not read (CAP_SYS_ADMIN): the agent
//! infers it holds the active backends, as Cilium builds it.

mod descriptors;
pub mod maps;
mod mirror;
pub mod sys;
pub mod tracepoint;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use observer_common::cilium::{
    CiliumStat, MapWrite, ServiceKey, WRITER_CLOSED, WRITER_EXITED, WriterFilter,
};
use observer_proto::{Detector, UnixNanos};
use tracing::{debug, info, warn};

pub use maps::{CiliumMaps, OpenError};
pub use tracepoint::{TracepointError, WriteEvents};

use self::{
    descriptors::{Descriptors, FdKind, Learnt, Op},
    mirror::Mirror,
};
use super::{Change, Shared};
use crate::clock::WallClock;

/// The shortest poll interval accepted: a poll looks up the entries of the
/// frontends holding a watched endpoint, one syscall each.
pub const MIN_POLL: Duration = Duration::from_millis(10);
/// Polling: the whole maps are re-read at most this often...
const FULL_READ_MIN: Duration = Duration::from_secs(1);
/// ...and at most this share of a core (one syscall per 1024 entries,
/// `sys::ReadOnlyMap::entries`, then a rebuilt mirror).
const FULL_READ_SHARE: u32 = 20;

/// How long after a full re-read that took `cost` the next one is due.
fn full_read_every(poll: Duration, cost: Duration) -> Duration {
    (poll * 10).max(FULL_READ_MIN).max(cost * FULL_READ_SHARE)
}
/// With the tracepoint attached: how often the programs' loss counters are
/// checked (a loss makes the mirror re-read).
pub const SAFETY_POLL: Duration = Duration::from_secs(1);
/// How long the loop waits for a write before it looks at the watched set.
const WAIT: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct CiliumOptions {
    /// Where Cilium pins its maps (`/sys/fs/bpf/tc/globals`).
    pub pin_dir: PathBuf,
    /// Interval of the polling fallback.
    pub poll_interval: Duration,
    /// Whose bpf() writes the tracepoint follows.
    pub writer: WriterFilter,
    /// Poll even where the tracepoint attaches (tests, comparisons).
    pub force_polling: bool,
}

impl Default for CiliumOptions {
    fn default() -> Self {
        CiliumOptions {
            pin_dir: PathBuf::from(observer_common::cilium::PIN_DIR),
            poll_interval: Duration::from_millis(100),
            writer: WriterFilter::CILIUM_AGENT,
            force_polling: false,
        }
    }
}

/// How the Cilium detector times changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CiliumTiming {
    /// By the writer's bpf() syscall (the tracepoint is attached).
    Syscall,
    /// By a read-only poll at `interval`, and why not by the syscall.
    Polling { interval: Duration, why: String },
}

/// What the detector found at its start.
#[derive(Clone, Debug)]
pub struct CiliumStatus {
    pub pin_dir: PathBuf,
    /// Each map opened, with its id and shape.
    pub maps: Vec<(&'static str, sys::MapInfo)>,
    pub timing: CiliumTiming,
}

/// The detector's state, owned by its thread.
pub struct CiliumDetector {
    maps: CiliumMaps,
    events: Option<WriteEvents>,
    mirror: Mirror,
    descriptors: Descriptors,
    clock: WallClock,
    poll: Duration,
    /// The programs' loss counters at the last check.
    losses: u64,
    /// Since when the mirror may have missed writes: a re-read is due.
    stale_since: Option<UnixNanos>,
    /// Polling: the last full re-read, when it began and what it cost.
    full_read: (Instant, UnixNanos, Duration),
    /// Polling: the watched endpoints at the last poll, and the frontends
    /// holding them (None: to find again).
    watched: HashSet<SocketAddr>,
    watched_frontends: Option<HashSet<ServiceKey>>,
}

impl CiliumDetector {
    /// Opens the maps, unless told to poll attaches the tracepoint, then
    /// reads the maps (after the attach: no write falls in between).
    pub fn open(
        ebpf: Option<&mut aya::Ebpf>,
        options: &CiliumOptions,
    ) -> Result<(CiliumDetector, CiliumStatus), OpenError> {
        let maps = CiliumMaps::open(&options.pin_dir)?;
        let poll = options.poll_interval.max(MIN_POLL);
        let polling = |why: String| CiliumTiming::Polling {
            interval: poll,
            why,
        };
        let (events, timing) = match ebpf {
            _ if options.force_polling => (None, polling("polling was asked for".into())),
            None => (None, polling("no eBPF object loaded".into())),
            Some(ebpf) => match WriteEvents::attach(ebpf, options.writer) {
                Ok(events) => (Some(events), CiliumTiming::Syscall),
                Err(e) => (None, polling(e.to_string())),
            },
        };
        let mirror = Mirror::read(&maps)?;
        let status = CiliumStatus {
            pin_dir: maps.dir.clone(),
            maps: maps.found.clone(),
            timing,
        };
        let detector = CiliumDetector {
            maps,
            events,
            mirror,
            descriptors: Descriptors::default(),
            clock: WallClock::new(),
            poll,
            losses: 0,
            stale_since: None,
            full_read: (Instant::now(), UnixNanos::now(), Duration::ZERO),
            watched: HashSet::new(),
            watched_frontends: None,
        };
        Ok((detector, status))
    }

    /// Follows the writer until the detectors stop.
    pub(crate) fn run(mut self, shared: &Shared) {
        let selected = self.mirror.selected().map(|e| change(*e, true)).collect();
        shared.read_first(selected, UnixNanos::now());
        let mut last_check = Instant::now();
        let mut last_check_at = UnixNanos::now();
        while !shared.stop.is_stopped() {
            let check_every = match &self.events {
                Some(events) => {
                    events.wait(WAIT);
                    self.drain(shared);
                    SAFETY_POLL
                }
                None => {
                    // Stopped or not, the loop's condition decides.
                    let _ = shared.stop.sleep(self.poll.min(WAIT));
                    self.poll
                }
            };
            if last_check.elapsed() >= check_every {
                if self.events.is_some() {
                    if self.lost_writes() {
                        self.stale_since.get_or_insert(last_check_at);
                    }
                } else {
                    let (at, began, cost) = self.full_read;
                    if at.elapsed() >= full_read_every(self.poll, cost) {
                        self.stale_since.get_or_insert(began);
                    } else {
                        self.poll_watched(shared, last_check_at);
                    }
                }
                last_check = Instant::now();
                last_check_at = UnixNanos::now();
            }
            if let Some(since) = self.stale_since.take() {
                self.resync(shared, since);
            }
        }
        if let Some(events) = &self.events
            && let Ok(stats) = events.stats()
        {
            info!(?stats, "Cilium bpf() tracepoint counters at stop");
        }
    }

    /// Whether the programs lost writes since the last check.
    fn lost_writes(&mut self) -> bool {
        let Some(events) = &self.events else {
            return false;
        };
        match events.stats() {
            Ok(stats) => {
                let losses = stats
                    .iter()
                    .filter(|(stat, _)| CiliumStat::is_loss(*stat))
                    .map(|(_, n)| n)
                    .sum();
                let lost = losses != self.losses;
                self.losses = losses;
                lost
            }
            Err(e) => {
                warn!(error = %e, "Cilium: the tracepoint's counters cannot be read; re-reading the maps");
                true
            }
        }
    }

    /// Re-reads the maps: what changed since `since` is reported now, with
    /// the time since as precision.
    fn resync(&mut self, shared: &Shared, since: UnixNanos) {
        let now = UnixNanos::now();
        let began = Instant::now();
        match self.mirror.resync(&self.maps) {
            Ok(flips) => {
                self.full_read = (began, now, began.elapsed());
                self.watched_frontends = None;
                report(shared, flips, now, (now - since).unsigned_abs());
            }
            Err(e) => {
                warn!(error = %e, "re-reading Cilium's service maps failed");
                self.stale_since = Some(since);
            }
        }
    }

    /// Polling: re-reads the frontends holding a watched endpoint; what
    /// changed since `since` (the last poll) is reported now.
    fn poll_watched(&mut self, shared: &Shared, since: UnixNanos) {
        let watched = shared.watched();
        if watched != self.watched {
            self.watched = watched;
            self.watched_frontends = None;
        }
        let frontends = match self.watched_frontends.take() {
            Some(f) => f,
            None => self.mirror.frontends_holding(&self.watched),
        };
        let now = UnixNanos::now();
        let mut flips = Vec::new();
        for master in &frontends {
            match self.mirror.refresh(&self.maps, *master) {
                Ok(f) => flips.extend(f),
                Err(e) => {
                    warn!(error = %e, "re-reading a watched Cilium frontend failed; re-reading the maps");
                    self.stale_since.get_or_insert(since);
                    return;
                }
            }
        }
        self.watched_frontends = Some(frontends);
        report(shared, flips, now, (now - since).unsigned_abs());
    }

    fn drain(&mut self, shared: &Shared) {
        let Some(events) = &mut self.events else {
            return;
        };
        let mut writes = Vec::new();
        while let Some(write) = events.next_write() {
            writes.push(write);
        }
        for write in writes {
            self.on_write(shared, &write);
        }
    }

    /// The mirror may have missed writes since kernel time `kernel_ns`.
    fn stale(&mut self, kernel_ns: u64) {
        let at = self.clock.to_unix_nanos(kernel_ns);
        self.stale_since = Some(self.stale_since.map_or(at, |s| s.min(at)));
    }

    /// The kind of map `write` went to, classifying its descriptor.
    fn kind(&mut self, write: &MapWrite) -> Option<FdKind> {
        let learnt = match self.descriptors.learn(&self.maps, write) {
            Ok(learnt) => learnt,
            Err(e) => {
                warn!(error = %e, "Cilium: looking up a written entry failed");
                self.stale(write.enter_ns);
                return None;
            }
        };
        match learnt {
            Learnt::Known(FdKind::Other) => {
                // The kernel's LRU entry was evicted: mark it again.
                self.tell_kernel(write, FdKind::Other);
                Some(FdKind::Other)
            }
            Learnt::Known(kind) => Some(kind),
            Learnt::Unknown => None,
            Learnt::New { kind, missed_since } => {
                info!(
                    tgid = write.tgid,
                    fd = write.map_fd,
                    ?kind,
                    "Cilium: writer's map descriptor classified"
                );
                self.tell_kernel(write, kind);
                if let Some(first) = missed_since {
                    self.stale(first);
                }
                Some(kind)
            }
        }
    }

    /// Tells the programs the kind of the descriptor `write` went to.
    fn tell_kernel(&mut self, write: &MapWrite, kind: FdKind) {
        if let Some(events) = &mut self.events
            && let Err(e) = events.classify(write.tgid, write.map_fd, kind.code())
        {
            warn!(error = %e, "Cilium: the tracepoint does not know the descriptor's kind");
        }
    }

    /// The writer closed a descriptor or exited.
    fn on_gone(&mut self, write: &MapWrite) {
        let fds = if write.cmd == WRITER_CLOSED {
            self.descriptors.forget(write.tgid, write.map_fd);
            vec![write.map_fd]
        } else {
            self.descriptors.forget_process(write.tgid)
        };
        debug!(tgid = write.tgid, ?fds, "Cilium: writer's descriptors gone");
        // The programs dropped a closed descriptor's entry already; this
        // also drops one the agent marked again since (see `classify`).
        if let Some(events) = &mut self.events {
            for fd in fds {
                if let Err(e) = events.forget(write.tgid, fd) {
                    warn!(error = %e, "Cilium: the tracepoint keeps a closed descriptor's kind");
                }
            }
        }
    }

    fn on_write(&mut self, shared: &Shared, write: &MapWrite) {
        if write.cmd == WRITER_CLOSED || write.cmd == WRITER_EXITED {
            self.on_gone(write);
            return;
        }
        let Some(kind) = self.kind(write) else {
            return;
        };
        if kind == FdKind::Other || write.ret != 0 {
            return;
        }
        let op = match kind.decode(write) {
            Ok(op) => op,
            Err(e) => {
                warn!(error = %e, ?kind, "Cilium: a written entry does not decode; re-reading the maps");
                self.stale(write.enter_ns);
                return;
            }
        };
        debug!(?op, "Cilium: map write");
        let flips = match op {
            Op::UpdateService(key, value) => self.mirror.update_service(key, value),
            Op::DeleteService(key) => self.mirror.delete_service(key),
            Op::UpdateBackend(family, id, backend) => {
                self.mirror.update_backend(family, id, backend);
                Vec::new()
            }
            Op::DeleteBackend(family, id) => {
                self.mirror.delete_backend(family, id);
                Vec::new()
            }
            Op::UpdateMaglev(family, key) => self.mirror.write_maglev(family, key, true),
            Op::DeleteMaglev(family, key) => self.mirror.write_maglev(family, key, false),
        };
        // The new entry is visible to lookups from some instant inside the
        // syscall: its exit is the latest, its duration the error.
        let time = self.clock.to_unix_nanos(write.exit_ns);
        report(
            shared,
            flips,
            time,
            write.exit_ns.saturating_sub(write.enter_ns),
        );
    }
}

fn change(endpoint: SocketAddr, added: bool) -> Change {
    Change {
        endpoint,
        added,
        detector: Detector::Cilium,
    }
}

fn report(shared: &Shared, flips: Vec<mirror::Flip>, time: UnixNanos, precision_ns: u64) {
    let changes = flips
        .into_iter()
        .map(|(endpoint, added)| change(endpoint, added))
        .collect();
    shared.report(changes, time, precision_ns);
}
