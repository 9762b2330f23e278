//! The kprobes on the ruleset commit paths (observer-ebpf `ruleset.rs`):
//! loaded here (so the verifier checks them on every kernel), attached where
//! the kernel has kprobes. When attached, a detector times a change by the
//! commit's kernel time instead of the notification's arrival.

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::KProbe,
};
use observer_common::ruleset::{COMMIT_NFTABLES, COMMIT_XTABLES};
use tracing::{info, warn};

use super::DataplaneError;
use observer_proto::UnixNanos;

use crate::{clock::WallClock, kernel};

/// (program, kernel function, RULESET_COMMITS slot).
const PROBES: [(&str, &str, u32); 2] = [
    ("ruleset_nft_commit", "nf_tables_commit", COMMIT_NFTABLES),
    ("ruleset_xt_replace", "xt_replace_table", COMMIT_XTABLES),
];

/// A commit this old before the notification is another one (the slots are
/// shared by every network namespace).
const MAX_AGE_NS: i64 = 100_000_000;

/// Whether one probe attached, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KprobeStatus {
    pub program: &'static str,
    pub function: &'static str,
    pub attached: bool,
    pub detail: String,
}

pub struct CommitKprobeSetup {
    pub statuses: Vec<KprobeStatus>,
    /// Present when at least one probe is attached.
    pub kprobe: Option<CommitKprobe>,
}

/// Reads the latest commit times written by the attached probes.
pub struct CommitKprobe {
    commits: Array<MapData, u64>,
    attached: [bool; 2],
    clock: WallClock,
}

impl std::fmt::Debug for CommitKprobe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitKprobe")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

/// Loads both probes (a verifier rejection is an error) and tries to attach
/// them (a failure is reported in the statuses, not an error).
pub fn load(ebpf: &mut Ebpf) -> Result<CommitKprobeSetup, DataplaneError> {
    let mut statuses = Vec::new();
    let mut attached = [false; 2];
    for (program, function, slot) in PROBES {
        let prog: &mut KProbe = kernel::program_mut(ebpf, program)?.try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let status = match prog.attach(function, 0) {
            Ok(_) => {
                attached[slot as usize] = true;
                info!(program, function, "ruleset commit probe attached");
                KprobeStatus {
                    program,
                    function,
                    attached: true,
                    detail: format!("kprobe/{function}"),
                }
            }
            Err(e) => {
                warn!(program, function, error = %e, "ruleset commit probe unavailable; changes are timed by their notification");
                KprobeStatus {
                    program,
                    function,
                    attached: false,
                    detail: e.to_string(),
                }
            }
        };
        statuses.push(status);
    }
    let kprobe = if attached.iter().any(|a| *a) {
        let map = kernel::take_map(ebpf, "RULESET_COMMITS")?;
        Some(CommitKprobe {
            commits: Array::try_from(map)?,
            attached,
            clock: WallClock::new(),
        })
    } else {
        None
    };
    Ok(CommitKprobeSetup { statuses, kprobe })
}

impl CommitKprobe {
    /// The wall-clock time of the latest commit of `slot` if it lies within
    /// the [`MAX_AGE_NS`] before `received` (when the detector learnt of it).
    pub fn commit_time(&mut self, slot: u32, received: UnixNanos) -> Option<UnixNanos> {
        if !self.attached.get(slot as usize).copied().unwrap_or(false) {
            return None;
        }
        let ktime = self.commits.get(&slot, 0).ok().filter(|t| *t != 0)?;
        let t = self.clock.to_unix_nanos(ktime);
        (t <= received && received - t <= MAX_AGE_NS).then_some(t)
    }
}
