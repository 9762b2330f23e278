//! Independent clocks of a ruleset commit: the reference the dataplane
//! detectors are timed against, instead of the exit of the writing process
//! (`nft -f`, `iptables-restore`), which keeps running for milliseconds
//! after its commit.
//!
//! - nf_tables (nftables mode, iptables-nft): the [`CommitWitness`], a
//!   netlink listener of its own on NFNLGRP_NFTABLES that records when the
//!   first notification of each commit (ended by its NEWGEN) reaches it.
//!   Netlink datagrams carry no kernel
//!   timestamp, so that is a receipt time: the witness thread runs under
//!   SCHED_FIFO, above the threads it times, so it is woken as the kernel
//!   queues the notification, not when a busy machine gets round to it. The
//!   commit lies at most its wake-up latency (microseconds) before the
//!   recorded time.
//! - iptables-legacy (no notifications): [`LegacyWitness`] re-reads the
//!   legacy `nat` table (IPT_SO_GET_ENTRIES, counters zeroed; only the
//!   header of tables over 256 KiB) every 200 us, also under SCHED_FIFO; a
//!   replacement lies between the start of the last read that still saw the
//!   old table and the end of the first read that saw the new one (about
//!   0.3 ms wide).
//!
//! - nf_tables in kernel time: the [`SyscallClock`] (`syscall`), the entry
//!   and exit of the writer's sendmsg of its batch, inside which the kernel
//!   commits; it bounds a kernel stamp's error without a thread's wake-up.
//!
//! Used by observer-agent's dataplane tests and its `dataplane` bench.

mod syscall;

pub use syscall::{
    CONVERSION_SLACK_NS, RULESET_WRITERS, SyscallClock, SyscallClockError, WriterSend,
};

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    time::Duration,
};

use observer_proto::UnixNanos;

use crate::{
    kubeproxy::{Applied, Mode},
    witness::{self, CommitWitness, Recorder},
};

/// Wall clock around a write: `started` before it, `finished` after the
/// writer returned. The commit lies in between.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub started: UnixNanos,
    pub finished: UnixNanos,
}

impl From<Applied> for Window {
    fn from(a: Applied) -> Self {
        Window {
            started: a.started_unix_nano,
            finished: a.finished_unix_nano,
        }
    }
}

/// Runs `write` and returns its result with its window.
pub fn timed<T>(write: impl FnOnce() -> T) -> (T, Window) {
    let started = UnixNanos::now();
    let out = write();
    (
        out,
        Window {
            started,
            finished: UnixNanos::now(),
        },
    )
}

/// Puts the calling thread under SCHED_FIFO at `priority` (what is timed:
/// detector threads, traffic; the agent's own default for its timing
/// threads); threads it spawns inherit the policy (glibc's default
/// PTHREAD_INHERIT_SCHED).
pub fn realtime(priority: u8) -> io::Result<()> {
    witness::set_fifo(priority)
}

/// [`realtime`] at the witnesses' priority, above what they time.
pub fn realtime_witness() -> io::Result<()> {
    witness::set_fifo(witness::WITNESS_PRIORITY)
}

/// The CPU the witnesses are pinned to, if any (-1: none).
static WITNESS_CPU: AtomicI32 = AtomicI32::new(-1);

/// Pins the calling thread to `cpu`, or lets it run anywhere (None).
/// Threads and processes it starts inherit the mask.
pub fn pin(cpu: Option<usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(c) => libc::CPU_SET(c, &mut set),
            None => (0..libc::CPU_SETSIZE as usize).for_each(|c| libc::CPU_SET(c, &mut set)),
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins witnesses started from now on to `cpu`. The kernel here is
/// PREEMPT_NONE: a writer sending a large commit's notifications keeps its
/// core for tens of milliseconds, and a SCHED_FIFO witness woken onto that
/// core waits for it. With the writers kept on another core (the bench pins
/// the thread that starts them), the witness's core is always free for it.
pub fn pin_witnesses(cpu: usize) {
    WITNESS_CPU.store(cpu as i32, Ordering::Relaxed);
}

/// Applies [`pin_witnesses`] to the calling thread.
pub fn pin_witness_thread() -> io::Result<()> {
    match WITNESS_CPU.load(Ordering::Relaxed) {
        -1 => Ok(()),
        cpu => pin(Some(cpu as usize)),
    }
}

/// Starts `start` on a short-lived SCHED_FIFO thread so that the threads it
/// spawns run under SCHED_FIFO, at the witnesses' priority.
fn spawn_realtime<T: Send>(start: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_witness_thread()?;
            realtime_witness()?;
            start()
        })
        .join()
        .expect("witness start panicked")
    })
}

/// Where a commit happened: `earliest <= commit <= latest`.
#[derive(Clone, Copy, Debug)]
pub struct Commit {
    pub earliest: UnixNanos,
    pub latest: UnixNanos,
}

pub enum CommitClock {
    Nft(CommitWitness),
    Legacy(LegacyWitness),
}

impl CommitClock {
    /// Starts the witness of `mode`'s commits in the namespace at `netns`.
    pub fn start(netns: &Path, mode: Mode) -> io::Result<Self> {
        let path = netns.to_owned();
        match mode {
            Mode::Nftables | Mode::IptablesNft => {
                spawn_realtime(|| CommitWitness::start(&path)).map(CommitClock::Nft)
            }
            Mode::IptablesLegacy => {
                spawn_realtime(|| LegacyWitness::start(&path)).map(CommitClock::Legacy)
            }
            Mode::Cilium => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the cilium mode commits no netfilter rules; its cutover is the master's write",
            )),
        }
    }

    /// The last commit that was seen at or after `from` and at the latest
    /// at `until`, waiting up to a second (from now) for it to be recorded.
    /// nf_tables: `earliest` is `latest`, the witness's receipt, an upper
    /// bound that is microseconds late.
    pub fn commit_between(&self, from: UnixNanos, until: UnixNanos) -> Option<Commit> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            let found = match self {
                CommitClock::Nft(w) => w.last_commit_between(from, until).map(|t| Commit {
                    earliest: t,
                    latest: t,
                }),
                CommitClock::Legacy(w) => w.last_change_between(from, until),
            };
            // Recorded only once the witness read it: give it until `until`
            // has passed (plus its wake-up), then answer.
            let settled = UnixNanos::now() > until + 20_000_000;
            if settled || std::time::Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The bound for the nf_tables detectors: a change is reported
/// within 5 ms of its commit.
pub const NFT_BOUND_NS: i64 = 5_000_000;
/// iptables-legacy: the change is timed when the writer releases the xtables
/// lock, after its commit (the writer's remaining work, its exit, the
/// detector's inotify wake-up). docs/benchmarks.md measured at most 3.7 ms
/// with the detector under SCHED_FIFO and every core busy (8.9 ms at normal
/// priority); the writer itself runs at normal priority, so the bound leaves
/// room for it being preempted between its commit and its exit.
pub const LEGACY_BOUND_NS: i64 = 10_000_000;

impl CommitClock {
    /// Checks the time a detector gave to a change made by a write that
    /// started at `from`: never before the write started, within the mode's
    /// bound of the witnessed commit, and with a claimed precision (the
    /// change happened in [reported - precision, reported]) that covers the
    /// witnessed commit. Returns reported - commit (ns; for legacy, against
    /// the latest the commit can have been).
    pub fn check(
        &self,
        what: &str,
        reported: UnixNanos,
        precision_ns: u64,
        from: UnixNanos,
    ) -> i64 {
        assert!(
            reported >= from,
            "{what}: reported at {reported}, {} ms before the write started",
            from.seconds_since(reported) * 1e3
        );
        let delta = self.check_bound(what, reported, from);
        assert!(
            delta <= i64::try_from(precision_ns).unwrap_or(i64::MAX),
            "{what}: reported {} ms after the witnessed commit, claimed precision {} ms",
            delta as f64 / 1e6,
            precision_ns as f64 / 1e6
        );
        delta
    }

    fn check_bound(&self, what: &str, reported: UnixNanos, from: UnixNanos) -> i64 {
        match self {
            CommitClock::Nft(_) => {
                let commit = self
                    .commit_between(from, reported + NFT_BOUND_NS)
                    .unwrap_or_else(|| panic!("{what}: no commit witnessed after the write started and before {reported} + 5 ms"));
                let delta = reported - commit.latest;
                assert!(
                    delta.abs() <= NFT_BOUND_NS,
                    "{what}: reported {} ms from the witnessed commit (bound 5 ms)",
                    delta as f64 / 1e6
                );
                delta
            }
            CommitClock::Legacy(_) => {
                let commit = self.commit_between(from, reported).unwrap_or_else(|| {
                    panic!("{what}: reported at {reported}, before any witnessed change of the nat table after the write started")
                });
                let delta = reported - commit.latest;
                assert!(
                    delta <= LEGACY_BOUND_NS,
                    "{what}: reported {} ms after the witnessed commit (legacy bound {} ms)",
                    delta as f64 / 1e6,
                    LEGACY_BOUND_NS / 1_000_000
                );
                delta
            }
        }
    }
}

const IPT_SO_GET_INFO: i32 = 64;
const IPT_SO_GET_ENTRIES: i32 = 65;
/// sizeof(struct ipt_getinfo) and of the ipt_get_entries header.
const GETINFO_LEN: usize = 84;
const GET_ENTRIES_HEADER: usize = 40;
/// struct ipt_entry: next_offset at 94 (u16), counters (2 x u64) at 104.
const NEXT_OFFSET_AT: usize = 94;
const COUNTERS_AT: usize = 104;
const POLL: Duration = Duration::from_micros(200);
const LARGE_TABLE: usize = 256 << 10;

/// Records every replacement of the legacy `nat` table in one namespace.
pub struct LegacyWitness {
    changes: Arc<Mutex<Vec<Commit>>>,
    _recorder: Recorder,
}

fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); ownership taken right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn getsockopt(sock: &OwnedFd, name: i32, buf: &mut [u8]) -> io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes; the kernel writes at most len.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The legacy nat table's entries with their counters zeroed (traffic
/// changes counters, not rules); None while the table does not exist (a
/// read would create it).
fn read_nat(sock: &OwnedFd) -> Option<Vec<u8>> {
    let names = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").ok()?;
    if !names.lines().any(|l| l == "nat") {
        return None;
    }
    // The size can change between the two calls (EAGAIN): retry.
    for _ in 0..10 {
        let mut info = [0u8; GETINFO_LEN];
        info[..3].copy_from_slice(b"nat");
        getsockopt(sock, IPT_SO_GET_INFO, &mut info).ok()?;
        let size = u32::from_ne_bytes(info[80..84].try_into().ok()?) as usize;
        let mut entries = vec![0u8; GET_ENTRIES_HEADER + size];
        entries[..3].copy_from_slice(b"nat");
        entries[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
        if getsockopt(sock, IPT_SO_GET_ENTRIES, &mut entries).is_err() {
            continue;
        }
        // Large tables (the bench's 5k endpoints): the header only, or the
        // poller would keep a core busy copying megabytes and delay what it
        // times. Entry count, size and hook offsets change with every
        // endpoint added or removed; a same-size rewrite would go unseen.
        if size > LARGE_TABLE {
            return Some(info[32..84].to_vec());
        }
        let mut at = GET_ENTRIES_HEADER;
        while at + COUNTERS_AT + 16 <= entries.len() {
            let next = u16::from_ne_bytes([
                entries[at + NEXT_OFFSET_AT],
                entries[at + NEXT_OFFSET_AT + 1],
            ]) as usize;
            entries[at + COUNTERS_AT..at + COUNTERS_AT + 16].fill(0);
            if next == 0 {
                break;
            }
            at += next;
        }
        // Keep the hook offsets too: they move when chains are inserted.
        let mut table = info[32..84].to_vec();
        table.extend_from_slice(&entries[GET_ENTRIES_HEADER..]);
        return Some(table);
    }
    None
}

/// Entries and bytes of the legacy nat table of the calling thread's
/// network namespace (None when it does not exist).
pub fn legacy_nat_size() -> Option<(u32, u32)> {
    let names = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").ok()?;
    if !names.lines().any(|l| l == "nat") {
        return None;
    }
    let sock = raw_socket().ok()?;
    let mut info = [0u8; GETINFO_LEN];
    info[..3].copy_from_slice(b"nat");
    getsockopt(&sock, IPT_SO_GET_INFO, &mut info).ok()?;
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    Some((word(76), word(80)))
}

impl LegacyWitness {
    pub fn start(netns: &Path) -> io::Result<Self> {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let recorded = changes.clone();
        let record = move |sock: OwnedFd, stop: &AtomicBool| {
            let mut previous_start = UnixNanos::now();
            let mut previous = read_nat(&sock);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(POLL);
                let start = UnixNanos::now();
                let table = read_nat(&sock);
                let end = UnixNanos::now();
                if table != previous {
                    recorded.lock().expect("changes lock").push(Commit {
                        earliest: previous_start,
                        latest: end,
                    });
                    previous = table;
                }
                previous_start = start;
            }
        };
        Ok(LegacyWitness {
            changes,
            _recorder: Recorder::start(netns, "legacy witness", raw_socket, record)?,
        })
    }

    /// The last replacement that may have happened in [from, until].
    pub fn last_change_between(&self, from: UnixNanos, until: UnixNanos) -> Option<Commit> {
        self.changes
            .lock()
            .expect("changes lock")
            .iter()
            .rev()
            .find(|c| c.latest >= from && c.earliest <= until)
            .copied()
    }
}
