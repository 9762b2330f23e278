//! Detector for Cilium's kube-proxy replacement: no netfilter rule changes
//! there; Cilium's agent rewrites its pinned service maps, and socket-level
//! balancing picks a backend at connect() from slot `(random % count) + 1`
//! of the frontend. The cutover for a backend moved to the inactive tail
//! is the write of the frontend's master (slot 0), which Cilium makes after
//! the slots, one `BPF_MAP_UPDATE_ELEM` per entry.
//!
//! - The maps are opened read-only ([`sys`]) and checked against the layout
//!   observer-common knows ([`maps`]); an unknown layout is refused by name.
//! - [`model`] finds each watched endpoint's backend ids and the frontends
//!   whose slots hold them, and re-reads only those after a write.
//! - [`tracepoint`]: the writer's bpf() syscalls that write a watched
//!   master, matched in the kernel, timed at the syscall's exit with its
//!   duration as precision.
//! - Where the tracepoint cannot attach, the watched masters are polled
//!   (at most every [`MIN_POLL`]); with the tracepoint, a slow poll
//!   ([`SAFETY_POLL`]) still catches writes the programs could not read.
//!
//! Maglev frontends (whose cutover is the outer map's update) and batch
//! writes are timed by that poll only.

pub mod maps;
mod model;
pub mod sys;
pub mod tracepoint;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use observer_common::cilium::{
    BPF_MAP_DELETE_ELEM, BPF_MAP_UPDATE_ELEM, MasterKey, MasterWrite, ServiceKey, ServiceValue,
    WriterFilter,
};
use observer_proto::{Detector, UnixNanos};
use tracing::{debug, info, warn};

pub use maps::{CiliumMaps, OpenError};
pub use tracepoint::{TracepointError, WriteEvents};

use self::{maps::ReadError, model::Model};
use super::{Change, Shared};
use crate::{clock::WallClock, locks::lock};

/// The shortest poll interval accepted: the poll re-reads every watched
/// master and its slots, a few syscalls each.
pub const MIN_POLL: Duration = Duration::from_millis(10);
/// With the tracepoint attached: how often the watched masters are still
/// re-read, for writes the programs could not follow.
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
    model: Model,
    clock: WallClock,
    poll: Duration,
    /// Masters the programs match, by their key bytes.
    by_key: HashMap<MasterKey, ServiceKey>,
}

impl CiliumDetector {
    /// Opens the maps and, unless told to poll, attaches the tracepoint.
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
        let status = CiliumStatus {
            pin_dir: maps.dir.clone(),
            maps: maps.found.clone(),
            timing,
        };
        let detector = CiliumDetector {
            maps,
            events,
            model: Model::default(),
            clock: WallClock::new(),
            poll,
            by_key: HashMap::new(),
        };
        Ok((detector, status))
    }

    /// Follows the watched endpoints until the watch stops.
    pub(crate) fn run(mut self, shared: &Shared) {
        let mut last_refresh = Instant::now();
        while !shared.stop.is_stopped() {
            self.sync_watched(shared);
            let refresh_every = match &self.events {
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
            if last_refresh.elapsed() >= refresh_every {
                let precision = last_refresh.elapsed();
                last_refresh = Instant::now();
                match self.model.refresh(&self.maps) {
                    Ok(flips) => {
                        report(shared, flips, UnixNanos::now(), precision.as_nanos() as u64)
                    }
                    Err(e) => warn!(error = %e, "re-reading Cilium's watched frontends failed"),
                }
            }
        }
        if let Some(events) = &self.events
            && let Ok(stats) = events.stats()
        {
            info!(?stats, "Cilium bpf() tracepoint counters at stop");
        }
    }

    /// Starts and stops following endpoints as the watch set changes.
    fn sync_watched(&mut self, shared: &Shared) {
        let watched: HashSet<_> = lock(&shared.rules, "dataplane rules").watched.clone();
        let gone: Vec<_> = self
            .model
            .watched()
            .filter(|e| !watched.contains(e))
            .copied()
            .collect();
        let new: Vec<_> = watched
            .iter()
            .filter(|e| !self.model.is_watched(e))
            .copied()
            .collect();
        if gone.is_empty() && new.is_empty() {
            return;
        }
        for endpoint in &gone {
            self.model.unwatch(endpoint);
        }
        match self.model.watch_all(&self.maps, &new) {
            Ok(found) => {
                for (endpoint, selected) in found {
                    debug!(%endpoint, selected, "Cilium: following endpoint");
                }
            }
            Err(e) => {
                warn!(endpoints = new.len(), error = %e, "Cilium: reading the endpoints' frontends failed")
            }
        }
        let masters = self.model.masters();
        self.by_key = masters
            .iter()
            .map(|m| (tracepoint::master_key(m), *m))
            .collect();
        if let Some(events) = &mut self.events
            && let Err(e) = events.set_masters(&masters)
        {
            warn!(error = %e, "Cilium: the tracepoint's watched masters are not up to date; the poll covers them");
        }
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
            if let Err(e) = self.on_write(shared, &write) {
                warn!(error = %e, "Cilium: re-reading a written frontend failed");
            }
        }
    }

    fn on_write(&mut self, shared: &Shared, write: &MasterWrite) -> Result<(), ReadError> {
        if write.ret != 0 {
            debug!(
                ret = write.ret,
                "Cilium: a failed master write changes nothing"
            );
            return Ok(());
        }
        let Some(master) = self.by_key.get(&write.key).copied() else {
            return Ok(());
        };
        let value = match write.cmd {
            BPF_MAP_UPDATE_ELEM => Some(ServiceValue {
                count: write.count,
                qcount: write.qcount,
                ..ServiceValue::default()
            }),
            BPF_MAP_DELETE_ELEM => None,
            _ => return Ok(()),
        };
        let flips = self.model.on_master(&self.maps, &master, value)?;
        // The new master is visible to lookups from some instant inside the
        // syscall: its exit is the latest, its duration the error.
        let time = self.clock.to_unix_nanos(write.exit_ns);
        report(
            shared,
            flips,
            time,
            write.exit_ns.saturating_sub(write.enter_ns),
        );
        Ok(())
    }
}

fn report(
    shared: &Shared,
    flips: Vec<(std::net::SocketAddr, bool)>,
    time: UnixNanos,
    precision_ns: u64,
) {
    let changes = flips
        .into_iter()
        .map(|(endpoint, added)| Change {
            endpoint,
            added,
            detector: Detector::Cilium,
        })
        .collect();
    shared.report(changes, time, precision_ns);
}
