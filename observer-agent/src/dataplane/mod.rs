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

pub mod commit_probe;
mod ipt_entries;
mod iptables_legacy;
mod mirror;
pub(crate) mod netlink;
mod nft_msg;
mod nftables;
mod xtables;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use thiserror::Error;
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

pub use commit_probe::{CommitProbe, CommitProbeSetup, ProbeStatus};
pub use mirror::Mirror;
pub use netlink::DecodeError;
pub use nft_msg::{NftEvent, RuleSummary, TableId, decode as decode_nft_message};
pub use xtables::dnat_destination;

use crate::observation::{Detector, Observation, RulesChange};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("malformed netlink message: {0}")]
    Decode(#[from] DecodeError),
    #[error("iptables-legacy: {0}")]
    Legacy(std::io::Error),
    #[error("starting a detector thread: {0}")]
    Thread(std::io::Error),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// One endpoint's transition, found by a detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    endpoint: SocketAddr,
    added: bool,
    detector: Detector,
}

/// Removals are remembered this long for endpoints not (yet) watched: the
/// node's kube-proxy may act before the agent learns the pod is terminating.
const RECENT_REMOVALS: Duration = Duration::from_secs(15 * 60);

/// State shared by the watch handle and the detector threads.
#[derive(Debug)]
pub(crate) struct Shared {
    watched: RwLock<HashSet<SocketAddr>>,
    /// Endpoints no longer selected, with their removal.
    recent_removals: Mutex<HashMap<SocketAddr, RulesChange>>,
    commit_probe: Mutex<Option<CommitProbe>>,
    stop: AtomicBool,
    tx: Sender<Observation>,
}

impl Shared {
    /// Sends without ever blocking a stop: waits while the channel is full,
    /// gives up when the watch is dropped or the receiver is gone.
    fn send(&self, obs: Observation) {
        send_until_stopped(&self.tx, &self.stop, obs);
    }

    /// The change time and its precision: the commit's kernel time when the
    /// probe saw it, else the time the detector learnt of it.
    fn change_time(&self, slot: u32, received: u64, fallback_precision_ns: u64) -> (u64, u64) {
        let probed = self
            .commit_probe
            .lock()
            .ok()
            .and_then(|mut p| p.as_mut().and_then(|p| p.commit_time(slot, received)));
        match probed {
            Some(t) => (t, received - t),
            None => (received, fallback_precision_ns),
        }
    }

    /// Records every change and reports those of watched endpoints.
    fn report(&self, changes: Vec<Change>, time_unix_nano: u64, precision_ns: u64) {
        if changes.is_empty() {
            return;
        }
        let watched = self.watched.read().map(|w| w.clone()).unwrap_or_default();
        let mut reports = Vec::new();
        if let Ok(mut recent) = self.recent_removals.lock() {
            let horizon = time_unix_nano.saturating_sub(RECENT_REMOVALS.as_nanos() as u64);
            recent.retain(|_, c| c.time_unix_nano >= horizon);
            for change in changes {
                let rules = RulesChange {
                    endpoint: change.endpoint,
                    detector: change.detector,
                    time_unix_nano,
                    precision_ns,
                };
                if change.added {
                    recent.remove(&change.endpoint);
                } else {
                    recent.insert(change.endpoint, rules.clone());
                }
                if watched.contains(&change.endpoint) {
                    info!(endpoint = %change.endpoint, detector = ?change.detector, added = change.added, "dataplane change");
                    reports.push(if change.added {
                        Observation::RulesAdded(rules)
                    } else {
                        Observation::RulesRemoved(rules)
                    });
                }
            }
        }
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
    layouts: Layouts,
    threads: Vec<JoinHandle<()>>,
}

impl DataplaneWatch {
    /// Reports rule changes for `endpoint` from now on; if this node's rules
    /// already stopped selecting it (in the last 15 minutes), reports that
    /// removal, with its original time, right away.
    pub fn watch(&self, endpoint: SocketAddr) {
        if let Ok(mut w) = self.shared.watched.write() {
            w.insert(endpoint);
        }
        let earlier = self
            .shared
            .recent_removals
            .lock()
            .ok()
            .and_then(|r| r.get(&endpoint).cloned());
        if let Some(change) = earlier
            && self
                .shared
                .tx
                .try_send(Observation::RulesRemoved(change))
                .is_err()
        {
            warn!(%endpoint, "observation channel full: earlier rules removal not reported");
        }
    }

    pub fn unwatch(&self, endpoint: SocketAddr) {
        if let Ok(mut w) = self.shared.watched.write() {
            w.remove(&endpoint);
        }
    }

    /// Times changes by the kernel's commit (see [`commit_probe::load`]).
    pub fn use_commit_probe(&self, probe: CommitProbe) {
        if let Ok(mut slot) = self.shared.commit_probe.lock() {
            *slot = Some(probe);
        }
    }

    pub fn layouts(&self) -> Layouts {
        self.layouts
    }
}

impl Drop for DataplaneWatch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Starts the detectors in the current network namespace. The nf_tables
/// detector always runs (kube-proxy may create its tables later); the
/// iptables-legacy one runs when legacy tables exist or appear.
pub fn spawn(tx: Sender<Observation>) -> Result<DataplaneWatch, DataplaneError> {
    let shared = Arc::new(Shared {
        watched: RwLock::new(HashSet::new()),
        recent_removals: Mutex::new(HashMap::new()),
        commit_probe: Mutex::new(None),
        stop: AtomicBool::new(false),
        tx,
    });
    // Subscribe before the dump so no change between the two is lost.
    let sock = nftables::subscribe()?;
    let mut mirror = Mirror::new();
    nftables::load(&mut mirror)?;
    let mut targets = nftables::Targets::default();
    targets.update(&mirror, None);
    let layouts = Layouts {
        nftables: mirror
            .tables()
            .any(|t| t.family == 2 && t.name == "kube-proxy"),
        iptables_nft: mirror.tables().any(|t| t.family == 2 && t.name == "nat"),
        iptables_legacy: iptables_legacy::tables_present(),
    };
    let legacy = iptables_legacy::Watcher::open()?;
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
            .spawn(move || nftables::run(&s, sock, mirror, targets))
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
        layouts,
        threads,
    })
}

pub(crate) fn send_until_stopped(
    tx: &Sender<Observation>,
    stop: &AtomicBool,
    mut obs: Observation,
) {
    use tokio::sync::mpsc::error::TrySendError;
    while !stop.load(Ordering::Relaxed) {
        match tx.try_send(obs) {
            Ok(()) => return,
            Err(TrySendError::Full(back)) => {
                obs = back;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(TrySendError::Closed(_)) => {
                stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
