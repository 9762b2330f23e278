//! iptables-legacy: the kernel sends no notifications for legacy xtables
//! tables, so the `nat` table is re-read (IPT_SO_GET_ENTRIES) when a writer
//! releases the xtables lock (`/run/xtables.lock`, taken by every
//! iptables-legacy command and by kube-proxy's iptables-restore), watched
//! with inotify, and once a second for writers that skip the lock.
//!
//! Precision: a change is timed at the lock's release; it happened while the
//! writer held the lock, so `precision_ns` is the time from the lock's
//! opening to its release (typically a few ms for iptables-restore). Changes
//! found by the periodic re-read carry the time since the previous read as
//! precision. Where the `xt_replace_table` kprobe is attached, its kernel
//! time is used instead. Re-reads are spaced by their cost ([`Pace`]): on
//! a large table, changes are found later and with a coarser precision
//! rather than the detector falling behind.

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use observer_common::ruleset::COMMIT_XTABLES;
use observer_proto::{Detector, UnixNanos};
use tracing::{info, warn};

use super::{
    Change, DataplaneError, Shared,
    ipt_entries::{self, NF_INET_NUMHOOKS},
};
use crate::stop::{StopSignal, Wait};

const IPT_SO_GET_INFO: i32 = 64;
const IPT_SO_GET_ENTRIES: i32 = 65;
const TABLE: &str = "nat";
/// sizeof(struct ipt_getinfo) and of the ipt_get_entries header.
const GETINFO_LEN: usize = 84;
const GET_ENTRIES_HEADER: usize = 40;
const PERIOD: Duration = Duration::from_secs(1);

fn lock_path() -> String {
    std::env::var("XTABLES_LOCKFILE").unwrap_or_else(|_| "/run/xtables.lock".to_owned())
}

/// Whether legacy tables exist in this thread's network namespace. Reading a table
/// that does not exist would make the kernel create it, so the detector only
/// reads `nat` once this lists it.
pub fn tables_present() -> bool {
    nat_present()
}

fn nat_present() -> bool {
    std::fs::read_to_string("/proc/thread-self/net/ip_tables_names")
        .map(|names| names.lines().any(|l| l == TABLE))
        .unwrap_or(false)
}

pub struct Watcher {
    sock: OwnedFd,
    inotify: Option<OwnedFd>,
    targets: HashSet<SocketAddrV4>,
    /// Largest table copied for a read (`Limits::legacy_table_max_bytes`).
    max_table: usize,
}

impl Watcher {
    /// Opens the socket (in the current network namespace) and the lock
    /// watch; tables over `max_table` bytes are not read.
    pub fn open(max_table: usize) -> Result<Self, DataplaneError> {
        // SAFETY: plain socket(2); ownership taken right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(DataplaneError::Legacy(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let inotify = match watch_lock() {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(error = %e, path = lock_path(), "cannot watch the xtables lock; iptables-legacy changes are found by a re-read every second only");
                None
            }
        };
        let mut watcher = Watcher {
            sock,
            inotify,
            targets: HashSet::new(),
            max_table,
        };
        watcher.targets = match watcher.read() {
            Ok(targets) => targets,
            Err(e) => {
                warn!(error = %e, "the legacy nat table was not read at start");
                HashSet::new()
            }
        };
        Ok(watcher)
    }

    /// What the first read found selected, as additions.
    pub fn selected(&self) -> impl Iterator<Item = Change> + '_ {
        self.targets.iter().map(|ep| Change {
            endpoint: SocketAddr::V4(*ep),
            added: true,
            detector: Detector::IptablesLegacy,
        })
    }

    /// Reachable DNAT targets of the legacy nat table (empty when it does not exist).
    fn read(&self) -> Result<HashSet<SocketAddrV4>, DataplaneError> {
        if !nat_present() {
            return Ok(HashSet::new());
        }
        let mut info = [0u8; GETINFO_LEN];
        info[..TABLE.len()].copy_from_slice(TABLE.as_bytes());
        self.getsockopt(IPT_SO_GET_INFO, &mut info)?;
        let word = |i: usize| {
            u32::from_ne_bytes(info[32 + i * 4..36 + i * 4].try_into().unwrap_or_default())
        };
        let valid_hooks = word(0);
        let hook_entry: [u32; NF_INET_NUMHOOKS] = std::array::from_fn(|h| word(1 + h));
        let underflow: [u32; NF_INET_NUMHOOKS] = std::array::from_fn(|h| word(6 + h));
        let size = word(12) as usize;
        if size > self.max_table {
            return Err(DataplaneError::LegacyTableTooLarge {
                bytes: size,
                max: self.max_table,
            });
        }
        let mut entries = vec![0u8; GET_ENTRIES_HEADER + size];
        entries[..TABLE.len()].copy_from_slice(TABLE.as_bytes());
        entries[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
        self.getsockopt(IPT_SO_GET_ENTRIES, &mut entries)?;
        Ok(ipt_entries::reachable_dnat(
            &entries[GET_ENTRIES_HEADER..],
            valid_hooks,
            &hook_entry,
            &underflow,
        )?)
    }

    fn getsockopt(&self, name: i32, buf: &mut [u8]) -> Result<(), DataplaneError> {
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is valid for len bytes; the kernel writes at most len.
        let ret = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::IPPROTO_IP,
                name,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if ret < 0 {
            return Err(DataplaneError::Legacy(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for lock activity (or the stop); returns the
    /// open->close window when a writer released the lock.
    fn wait_lock(
        &self,
        stop: &StopSignal,
        timeout: Duration,
        opened: &mut Option<Instant>,
    ) -> Option<Duration> {
        let Some(inotify) = &self.inotify else {
            let _ = stop.sleep(timeout);
            return None;
        };
        let waited_from = Instant::now();
        if stop.wait(inotify, Some(timeout)).ok() != Some(Wait::Ready) {
            return None;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let read = usize::try_from(n).map_or(&buf[..0], |n| &buf[..n]);
        lock_hold(read, opened, waited_from, Instant::now())
    }

    pub fn run(mut self, shared: &Shared) {
        let mut last_read = Instant::now();
        let mut pace = Pace::default();
        let mut opened = None;
        // Lock releases not read yet: when the first writer took the lock,
        // and when and at what wall-clock time the last one released it.
        let mut pending: Option<(Instant, Instant, UnixNanos)> = None;
        let mut nat_seen = nat_present();
        // The kind of the last read's failure, said once until it changes
        // (a refused table's size changes with every sync).
        let mut failing = None;
        if nat_seen {
            info!("iptables-legacy nat table present; watching it");
        }
        while !shared.stop.is_stopped() {
            let next_read = match pending {
                Some(_) => pace.gap(),
                None => pace.period(),
            };
            let timeout = next_read.saturating_sub(last_read.elapsed());
            if let Some(held) = self.wait_lock(&shared.stop, timeout, &mut opened) {
                let released = Instant::now();
                let first = pending.map_or(
                    released.checked_sub(held).unwrap_or(released),
                    |(first, _, _)| first,
                );
                pending = Some((first, released, UnixNanos::now()));
            }
            // The locks' hold is when the commit happened; a periodic
            // re-read knows no such window, only the previous read.
            let (fallback_precision, commit_window, received) = match pending {
                Some((first, released, at)) if last_read.elapsed() >= pace.gap() => {
                    let window = (released - first).as_nanos() as u64;
                    (window, window, at)
                }
                None if last_read.elapsed() >= pace.period() => {
                    (last_read.elapsed().as_nanos() as u64, 0, UnixNanos::now())
                }
                _ => continue,
            };
            pending = None;
            last_read = Instant::now();
            let read = self.read();
            pace.cost = last_read.elapsed();
            let now = match read {
                Ok(t) => t,
                Err(e) => {
                    let kind = std::mem::discriminant(&e);
                    if failing != Some(kind) {
                        warn!(error = %e, "reading the legacy nat table failed; its changes are not timed until a read succeeds");
                    }
                    failing = Some(kind);
                    shared.legacy_failed_reads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            if failing.take().is_some() {
                info!("the legacy nat table is read again");
            }
            if !nat_seen && nat_present() {
                nat_seen = true;
                info!("iptables-legacy nat table appeared; watching it");
            }
            if now == self.targets {
                continue;
            }
            let (time, precision) =
                shared.change_time(COMMIT_XTABLES, received, fallback_precision, commit_window);
            let changes = self
                .targets
                .symmetric_difference(&now)
                .map(|ep| Change {
                    endpoint: SocketAddr::V4(*ep),
                    added: now.contains(ep),
                    detector: Detector::IptablesLegacy,
                })
                .collect();
            shared.report(changes, time, precision);
            self.targets = now;
        }
    }
}

/// The lock hold that the inotify records in `read` (read at `now`) end,
/// if a writer released the lock. inotify records carry no time: an open
/// read in an earlier pass is taken as opened then; an open read together
/// with its release (the reader ran late: a busy node, normal priority)
/// happened at some point since the reader began waiting (`waited_from`),
/// so the hold is that long, not the zero between the two reads
/// (docs/benchmarks.md: a claimed precision of 0 at normal priority with
/// every core busy).
fn lock_hold(
    read: &[u8],
    opened: &mut Option<Instant>,
    waited_from: Instant,
    now: Instant,
) -> Option<Duration> {
    let mut released = None;
    let mut opened_in_read = false;
    let mut at = 0usize;
    while at + 16 <= read.len() {
        let word =
            |i: usize| u32::from_ne_bytes(read[at + i..at + i + 4].try_into().unwrap_or_default());
        let (mask, name_len) = (word(4), word(12) as usize);
        if mask & libc::IN_OPEN != 0 && opened.is_none() {
            *opened = Some(now);
            opened_in_read = true;
        }
        if mask & (libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE) != 0 {
            // An open never seen (before the watch began) is as unknown.
            let from = match opened.take() {
                Some(t) if !opened_in_read => t,
                _ => waited_from,
            };
            released = Some(now.saturating_duration_since(from));
            opened_in_read = false;
        }
        at += 16 + name_len;
    }
    released
}

/// How often the nat table may be re-read. A re-read costs in proportion
/// to the table (docs/benchmarks.md: tens of milliseconds at 5 000
/// endpoints, about a second at 250 000), so re-reads are spaced by their
/// last cost: those a writer's lock release triggers take at most a tenth
/// of a core, and the periodic one (for writers that skip the lock) at
/// most a hundredth. A change then waits for its re-read, and its
/// precision widens to every lock hold since the previous read, rather
/// than the detector falling behind the writers.
#[derive(Debug, Default)]
struct Pace {
    cost: Duration,
}

impl Pace {
    /// Least time from one lock-triggered re-read to the next.
    fn gap(&self) -> Duration {
        self.cost * 10
    }

    /// Time between periodic re-reads.
    fn period(&self) -> Duration {
        PERIOD.max(self.cost * 100)
    }
}

fn watch_lock() -> io::Result<OwnedFd> {
    let path = lock_path();
    // iptables itself creates the lock file this way (O_CREAT, 0600).
    let cpath =
        CString::new(path.clone()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: cpath is a valid C string.
    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_CREAT | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours; closed at once (an open of our own would be an event).
    unsafe { libc::close(fd) };
    // SAFETY: plain inotify_init1.
    let ino = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if ino < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let ino = unsafe { OwnedFd::from_raw_fd(ino) };
    // SAFETY: valid fd and C string.
    let wd = unsafe {
        libc::inotify_add_watch(
            ino.as_raw_fd(),
            cpath.as_ptr(),
            libc::IN_OPEN | libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE,
        )
    };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One inotify record (no name) with `mask`.
    fn record(mask: u32) -> Vec<u8> {
        let mut r = vec![0u8; 16];
        r[4..8].copy_from_slice(&mask.to_ne_bytes());
        r
    }

    #[test]
    fn a_hold_read_in_one_pass_spans_the_whole_wait() {
        let now = Instant::now();
        let waited_from = now - Duration::from_millis(40);
        let read = [record(libc::IN_OPEN), record(libc::IN_CLOSE_NOWRITE)].concat();
        let mut opened = None;
        assert_eq!(
            lock_hold(&read, &mut opened, waited_from, now),
            Some(Duration::from_millis(40))
        );
        assert_eq!(opened, None);
    }

    #[test]
    fn a_hold_seen_opening_runs_from_that_pass() {
        let start = Instant::now();
        let mut opened = None;
        let open = record(libc::IN_OPEN);
        assert_eq!(lock_hold(&open, &mut opened, start, start), None);
        assert_eq!(opened, Some(start));
        let later = start + Duration::from_millis(7);
        let close = record(libc::IN_CLOSE_WRITE);
        assert_eq!(
            lock_hold(&close, &mut opened, later - Duration::from_millis(3), later),
            Some(Duration::from_millis(7))
        );
    }

    #[test]
    fn re_reads_are_spaced_by_their_cost() {
        let small = Pace {
            cost: Duration::from_millis(2),
        };
        assert_eq!(small.gap(), Duration::from_millis(20));
        assert_eq!(small.period(), PERIOD);
        // A 250 000-endpoint table: at most a tenth of a core when writers
        // come back to back, a hundredth for the periodic re-read.
        let large = Pace {
            cost: Duration::from_millis(800),
        };
        assert_eq!(large.gap(), Duration::from_secs(8));
        assert_eq!(large.period(), Duration::from_secs(80));
    }
}
