//! A kernel-time reference for nf_tables commits without kprobes: the entry
//! and exit of each `sendmsg` by the ruleset writers (lab-commit-clock-ebpf,
//! tracepoints `syscalls/sys_enter_sendmsg` and `sys_exit_sendmsg`, and
//! `sched/sched_switch` for the time the writer waited inside the call).
//!
//! `nft -f` and `iptables-nft-restore` send their batch with one sendmsg
//! and the kernel commits it inside that call, then queues the commit's
//! notifications, in the same call. A notification stamped by the agent at
//! `stamp` therefore has its commit in [entry, stamp]: `stamp - entry`
//! bounds |stamp - commit| per change, in kernel time, whatever thread
//! reads what when. Unlike the [`super::CommitClock`] witness, a thread
//! woken after the commit, this reference can show errors below 100 us.
//! The bound includes the kernel's work on the batch before the commit
//! (validating and preparing each of its messages), so it is loose for
//! large batches.

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, RingBuf},
    programs::{ProgramError, TracePoint},
};
use observer_proto::UnixNanos;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/commit_clock"));

/// kube-proxy's writers as the lab runs them (`lab::kubeproxy`); their
/// `comm` is the executable's name cut to 15 bytes.
pub const RULESET_WRITERS: [&str; 2] = ["nft", "iptables-nft-restore"];

/// Allowed disagreement between the agent's conversion of a stamp to the
/// wall clock and this clock's conversion of the syscall times: each is
/// within half its CLOCK_REALTIME bracket (well under 1 us), measured up to
/// a second apart; a wall clock slewed by NTP moves by at most 500 ppm
/// (0.5 us per ms) meanwhile. 10 us covers a 20 ms-old offset at full slew.
pub const CONVERSION_SLACK_NS: i64 = 10_000;

/// Records older than this (against the newest) are dropped: the bench's
/// and tests' queries look at the write that just returned.
const KEEP_NS: i64 = 120_000_000_000;

const PROGRAMS: [(&str, &str, &str); 3] = [
    ("writer_sendmsg_enter", "syscalls", "sys_enter_sendmsg"),
    ("writer_sendmsg_exit", "syscalls", "sys_exit_sendmsg"),
    ("writer_sched_switch", "sched", "sched_switch"),
];

#[derive(Debug, thiserror::Error)]
pub enum SyscallClockError {
    #[error("loading the writers' sendmsg programs: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("{program} on tracepoint {tracepoint}: {source}")]
    Attach {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("writer {name:?} into map WRITERS: {source}")]
    Writer {
        name: String,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// One sendmsg by a writer, its kernel times converted to the wall clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterSend {
    pub entered: UnixNanos,
    pub exited: UnixNanos,
    /// Bytes sent, or -errno.
    pub ret: i64,
    pub tgid: u32,
    /// Time the writer's thread spent off its CPU inside the call (waiting
    /// for a core, or blocked).
    pub off_cpu_ns: u64,
}

/// Records the writers' sendmsg calls from [`SyscallClock::start`] until
/// dropped (the programs detach with it).
pub struct SyscallClock {
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    to_wall: Box<dyn FnMut(u64) -> UnixNanos + Send>,
    sends: Vec<WriterSend>,
}

impl SyscallClock {
    /// Records the sendmsg calls of the processes named `writers`, their
    /// kernel times (CLOCK_MONOTONIC) converted by `to_wall` (the agent's
    /// conversion, so that they compare with its stamps).
    pub fn start(
        writers: &[&str],
        to_wall: impl FnMut(u64) -> UnixNanos + Send + 'static,
    ) -> Result<Self, SyscallClockError> {
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| SyscallClockError::Load(Box::new(e)))?;
        let mut names: HashMap<_, [u8; 16], u8> = ebpf
            .map_mut("WRITERS")
            .expect("the object has its writers map")
            .try_into()
            .map_err(|e| SyscallClockError::Map {
                name: "WRITERS",
                source: Box::new(e),
            })?;
        for name in writers {
            let mut comm = [0u8; 16];
            let cut = &name.as_bytes()[..name.len().min(15)];
            comm[..cut.len()].copy_from_slice(cut);
            names
                .insert(comm, 1, 0)
                .map_err(|e| SyscallClockError::Writer {
                    name: (*name).to_owned(),
                    source: Box::new(e),
                })?;
        }
        for (program, category, name) in PROGRAMS {
            let failed = |e| SyscallClockError::Attach {
                program,
                tracepoint: name,
                source: Box::new(e),
            };
            let prog: &mut TracePoint = ebpf
                .program_mut(program)
                .expect("the object has its programs")
                .try_into()
                .map_err(failed)?;
            prog.load().map_err(failed)?;
            prog.attach(category, name).map_err(failed)?;
        }
        let ring = ebpf
            .take_map("SENDS")
            .expect("the object has its ring")
            .try_into()
            .map_err(|e| SyscallClockError::Map {
                name: "SENDS",
                source: Box::new(e),
            })?;
        Ok(SyscallClock {
            _ebpf: ebpf,
            ring,
            to_wall: Box::new(to_wall),
            sends: Vec::new(),
        })
    }

    /// The writer's send whose [entered, exited] holds `at` (within
    /// [`CONVERSION_SLACK_NS`]); of several (writers of other namespaces
    /// at the same moment), the one entered first: the loosest bound.
    /// Call it after the write returned: a send is recorded at its exit.
    pub fn send_around(&mut self, at: UnixNanos) -> Option<WriterSend> {
        self.read();
        around(&self.sends, at)
    }

    fn read(&mut self) {
        while let Some(item) = self.ring.next() {
            let Some(words) = item.get(..40) else {
                continue;
            };
            let word =
                |i: usize| u64::from_ne_bytes(words[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            self.sends.push(WriterSend {
                entered: (self.to_wall)(word(0)),
                exited: (self.to_wall)(word(1)),
                ret: word(2) as i64,
                tgid: (word(3) >> 32) as u32,
                off_cpu_ns: word(4),
            });
        }
        if let Some(newest) = self.sends.last().map(|s| s.exited) {
            self.sends.retain(|s| newest - s.exited <= KEEP_NS);
        }
    }
}

/// Of `sends`, the one whose call holds `at` (with the conversion slack),
/// entered first.
fn around(sends: &[WriterSend], at: UnixNanos) -> Option<WriterSend> {
    sends
        .iter()
        .filter(|s| s.entered - CONVERSION_SLACK_NS <= at && at <= s.exited + CONVERSION_SLACK_NS)
        .min_by_key(|s| s.entered)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(entered: i64, exited: i64) -> WriterSend {
        WriterSend {
            entered: UnixNanos::from_nanos(entered),
            exited: UnixNanos::from_nanos(exited),
            ret: 100,
            tgid: 1,
            off_cpu_ns: 0,
        }
    }

    #[test]
    fn a_time_is_around_the_call_that_holds_it_within_the_slack_and_the_loosest_wins() {
        let at = |ns| UnixNanos::from_nanos(ns);
        let sends = [send(1_000_000, 2_000_000), send(1_500_000, 1_600_000)];
        assert_eq!(around(&sends, at(1_200_000)), Some(sends[0]));
        // Held by both: the one entered first, the larger bound.
        assert_eq!(around(&sends, at(1_550_000)), Some(sends[0]));
        assert_eq!(
            around(&sends, at(2_000_000 + CONVERSION_SLACK_NS)),
            Some(sends[0])
        );
        assert_eq!(around(&sends, at(2_000_001 + CONVERSION_SLACK_NS)), None);
        assert_eq!(around(&sends, at(999_999 - CONVERSION_SLACK_NS)), None);
        assert_eq!(around(&[], at(1_200_000)), None);
    }
}
