//! The kprobes on the ruleset commit paths (observer-ebpf `ruleset.rs`):
//! loaded here (so the verifier checks them on every kernel), attached where
//! [`select`] says the kernel can run them. When attached, a detector times
//! a change by the commit's kernel time instead of the notification's
//! arrival (nf_tables) or the xtables lock's release (iptables-legacy).
//!
//! Why kprobes and not fentry (docs/deploy.md, "Kernel hooks"): the probes
//! only record when the function is entered, which a kprobe and an fentry
//! program see alike; commits are a few per second, so fentry's cheaper
//! entry buys nothing; and on distribution kernels both functions live in
//! modules (nf_tables, x_tables), which aya 0.14's `FEntry` cannot target
//! (it resolves the function in vmlinux's BTF only and passes no module BTF
//! object). Kprobes also attach on kernels without BTF trampolines.

use std::{collections::HashSet, path::Path};

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{KProbe, ProgramType},
    sys::is_program_supported,
};
use observer_common::ruleset::{COMMIT_NFTABLES, COMMIT_XTABLES};
use tracing::{info, warn};

use super::DataplaneError;
use observer_proto::UnixNanos;

use crate::{clock::WallClock, kernel};

/// One commit probe: its program, the kernel function, the module that
/// holds the function on modular kernels, its RULESET_COMMITS slot.
struct Probe {
    program: &'static str,
    function: &'static str,
    module: &'static str,
    slot: u32,
}

const PROBES: [Probe; 2] = [
    Probe {
        program: "ruleset_nft_commit",
        function: "nf_tables_commit",
        module: "nf_tables",
        slot: COMMIT_NFTABLES,
    },
    Probe {
        program: "ruleset_xt_replace",
        function: "xt_replace_table",
        module: "x_tables",
        slot: COMMIT_XTABLES,
    },
];

/// A commit this old before the notification is another one (the slots are
/// shared by every network namespace).
const MAX_AGE_NS: i64 = 100_000_000;

/// Where the probe finds the perf kprobe PMU: without it kprobes cannot
/// attach even if the program type loads (the case on this project's
/// reference kernel).
pub const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";
const KALLSYMS: &str = "/proc/kallsyms";

/// What the kernel offers the commit probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitHooks {
    /// The kernel loads kprobe programs.
    pub kprobe_programs: bool,
    /// The perf kprobe PMU exists.
    pub kprobe_pmu: bool,
    /// Which of the probed functions the kernel has now (a module's
    /// functions once the module is loaded).
    pub functions: HashSet<String>,
}

impl CommitHooks {
    /// Reads this kernel's answer.
    pub fn probe() -> Self {
        CommitHooks {
            kprobe_programs: is_program_supported(ProgramType::KProbe).unwrap_or(false),
            kprobe_pmu: Path::new(KPROBE_PMU).exists(),
            functions: std::fs::read_to_string(KALLSYMS)
                .map(|syms| kallsyms_functions(&syms))
                .unwrap_or_default(),
        }
    }
}

/// The probed functions among `/proc/kallsyms` lines (`addr type name [module]`).
fn kallsyms_functions(syms: &str) -> HashSet<String> {
    syms.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|name| PROBES.iter().any(|p| p.function == *name))
        .map(str::to_owned)
        .collect()
}

/// How one kind of ruleset commit is timed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitTiming {
    /// By the kernel's commit: the kprobe on the function is attached.
    Kprobe,
    /// By the detector: when the nf_tables notification reached it, or when
    /// the xtables lock was released; with why no kprobe is used.
    Detector(String),
}

/// Chooses the timing of commits made through `function` (held by `module`
/// on modular kernels) from what the kernel offers; attaching may still
/// fail, which [`load`] reports the same way.
pub fn select(hooks: &CommitHooks, function: &str, module: &str) -> CommitTiming {
    if !hooks.kprobe_programs {
        CommitTiming::Detector("the kernel refuses kprobe programs".into())
    } else if !hooks.kprobe_pmu {
        CommitTiming::Detector(format!(
            "no kprobe PMU ({KPROBE_PMU}): kprobes cannot attach"
        ))
    } else if !hooks.functions.contains(function) {
        CommitTiming::Detector(format!(
            "{function} is not in {KALLSYMS}: module {module} is not loaded (the probe attaches when the agent starts after it is)"
        ))
    } else {
        CommitTiming::Kprobe
    }
}

/// How one probe's kind of commit is timed on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KprobeStatus {
    pub program: &'static str,
    pub function: &'static str,
    pub timing: CommitTiming,
}

impl KprobeStatus {
    pub fn attached(&self) -> bool {
        self.timing == CommitTiming::Kprobe
    }
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

/// Loads both probes (a verifier rejection is an error) and attaches those
/// [`select`] chooses on this kernel (an attach failure is reported in the
/// statuses, not an error: the detector's timing stays).
pub fn load(ebpf: &mut Ebpf) -> Result<CommitKprobeSetup, DataplaneError> {
    let hooks = CommitHooks::probe();
    let mut statuses = Vec::new();
    let mut attached = [false; 2];
    for probe in &PROBES {
        let Probe {
            program,
            function,
            module,
            slot,
        } = *probe;
        let prog: &mut KProbe = kernel::program_mut(ebpf, program)?.try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let timing = match select(&hooks, function, module) {
            CommitTiming::Kprobe => match prog.attach(function, 0) {
                Ok(_) => CommitTiming::Kprobe,
                Err(e) => CommitTiming::Detector(format!("attaching kprobe/{function}: {e}")),
            },
            detector => detector,
        };
        match &timing {
            CommitTiming::Kprobe => {
                attached[slot as usize] = true;
                info!(
                    program,
                    function, "ruleset commits timed by the kernel (kprobe)"
                );
            }
            CommitTiming::Detector(why) => {
                warn!(
                    program,
                    function, why, "ruleset commits timed by their notification or re-read"
                );
            }
        }
        statuses.push(KprobeStatus {
            program,
            function,
            timing,
        });
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
    /// The wall-clock time of the latest commit of `slot` seen by its
    /// attached probe (None: no probe, or no commit yet).
    pub fn latest(&mut self, slot: u32) -> Option<UnixNanos> {
        if !self.attached.get(slot as usize).copied().unwrap_or(false) {
            return None;
        }
        let ktime = self.commits.get(&slot, 0).ok().filter(|t| *t != 0)?;
        Some(self.clock.to_unix_nanos(ktime))
    }

    /// [`Self::latest`] if it lies before `received` (when the detector
    /// learnt of the change) by at most [`MAX_AGE_NS`] or `commit_window_ns`,
    /// whichever is wider: the detector may know how long before `received`
    /// the commit happened (iptables-legacy: while the xtables lock was
    /// held), which on a slow machine exceeds the fixed age.
    pub fn commit_time(
        &mut self,
        slot: u32,
        received: UnixNanos,
        commit_window_ns: u64,
    ) -> Option<UnixNanos> {
        let max_age = MAX_AGE_NS.max(i64::try_from(commit_window_ns).unwrap_or(i64::MAX));
        self.latest(slot)
            .filter(|t| *t <= received && received - *t <= max_age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(programs: bool, pmu: bool, functions: &[&str]) -> CommitHooks {
        CommitHooks {
            kprobe_programs: programs,
            kprobe_pmu: pmu,
            functions: functions.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    fn why(timing: CommitTiming) -> String {
        match timing {
            CommitTiming::Detector(why) => why,
            CommitTiming::Kprobe => panic!("kprobe selected"),
        }
    }

    /// Each missing piece keeps the detector's timing and is named; only a
    /// kernel with all of them gets the kprobe, per function.
    #[test]
    fn the_kprobe_is_chosen_only_when_the_kernel_can_run_it() {
        let both = ["nf_tables_commit", "xt_replace_table"];
        // Debian 12's 6.1 with nf_tables and x_tables loaded.
        let full = hooks(true, true, &both);
        assert_eq!(
            select(&full, "nf_tables_commit", "nf_tables"),
            CommitTiming::Kprobe
        );
        assert_eq!(
            select(&full, "xt_replace_table", "x_tables"),
            CommitTiming::Kprobe
        );
        // This project's 6.18: the program type loads, no PMU to attach it.
        let no_pmu = why(select(
            &hooks(true, false, &both),
            "nf_tables_commit",
            "nf_tables",
        ));
        assert!(no_pmu.contains(KPROBE_PMU), "{no_pmu}");
        let refused = why(select(
            &hooks(false, true, &both),
            "nf_tables_commit",
            "nf_tables",
        ));
        assert!(refused.contains("refuses kprobe programs"), "{refused}");
        // x_tables not loaded (no iptables user yet): nf_tables still probed.
        let partial = hooks(true, true, &["nf_tables_commit"]);
        assert_eq!(
            select(&partial, "nf_tables_commit", "nf_tables"),
            CommitTiming::Kprobe
        );
        let unloaded = why(select(&partial, "xt_replace_table", "x_tables"));
        assert!(
            unloaded.contains("module x_tables is not loaded"),
            "{unloaded}"
        );
    }

    #[test]
    fn kallsyms_lines_give_the_probed_functions_module_or_not() {
        let syms = "ffffffffc0a01230 t nf_tables_commit\t[nf_tables]\n\
                    0000000000000000 T xt_replace_table\n\
                    ffffffff81000000 T nf_tables_commit_audit\n\
                    ffffffff81000010 T _stext\n";
        let found = kallsyms_functions(syms);
        assert_eq!(
            found,
            HashSet::from(["nf_tables_commit".to_owned(), "xt_replace_table".to_owned()])
        );
    }
}
