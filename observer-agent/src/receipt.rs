//! Reading a netlink socket with, for each datagram, a measured bound of
//! how long before its receipt it was queued: the timing of a datagram that
//! carries no kernel stamp.
//!
//! A datagram is queued after the socket was last found empty, and, when
//! the reader slept for it, just before the reader was woken. The wake-up
//! is not seen directly, but the thread's scheduler statistics
//! (`/proc/thread-self/schedstat`: time spent runnable and waiting for a
//! core) say how long it waited between the wake-up and running, which on
//! a busy node is nearly all of its lateness, and under SCHED_FIFO is still
//! not zero (a PREEMPT_NONE kernel lets a writer keep its core). So a
//! datagram's precision is measured per wake-up instead of assumed.
//!
//! Without scheduler statistics (a kernel without CONFIG_SCHED_INFO) the
//! bound is the moment the socket was last found empty: honest, but as wide
//! as the reader's sleep before it.

use std::{fs::File, io, os::unix::fs::FileExt, time::Duration};

use observer_proto::UnixNanos;
use thiserror::Error;

use crate::{
    netlink::Socket,
    stop::{StopSignal, Wait},
};

/// What the scheduler statistics do not cover between a datagram's
/// queueing and its receipt: the wake-up's path before the thread is
/// runnable (an idle core leaving its sleep state, an inter-processor
/// interrupt to a virtual CPU its hypervisor has not running) and the
/// reader's own few system calls around its sleep. 0.2 ms was exceeded
/// by 0.1 ms in a loaded CI run on a VM (docs/benchmarks.md); a
/// hypervisor that keeps a virtual CPU off longer is not covered.
pub const WAKE_SLACK_NS: u64 = 1_000_000;

/// The calling thread's scheduler statistics.
#[derive(Debug)]
pub struct SchedStat(File);

#[derive(Debug, Error)]
pub enum SchedStatError {
    #[error("reading {PATH}: {0}")]
    Read(#[source] io::Error),
    #[error("{PATH} reads {text:?}, not run time, run delay and timeslices")]
    Format { text: String },
    #[error("{PATH} is all zero: this kernel keeps no scheduler statistics (CONFIG_SCHED_INFO)")]
    Off,
}

const PATH: &str = "/proc/thread-self/schedstat";

impl SchedStat {
    /// Opens the statistics of the calling thread (and only of it: the
    /// file stays the opener's when read from elsewhere).
    pub fn open() -> Result<Self, SchedStatError> {
        let stat = SchedStat(File::open(PATH).map_err(SchedStatError::Read)?);
        let (_, timeslices) = stat.read()?;
        // The caller is running, so it ran at least once.
        if timeslices == 0 {
            return Err(SchedStatError::Off);
        }
        Ok(stat)
    }

    /// Nanoseconds the thread has spent runnable without a core, in all.
    pub fn run_delay_ns(&self) -> Result<u64, SchedStatError> {
        self.read().map(|(delay, _)| delay)
    }

    /// (run delay, timeslices).
    fn read(&self) -> Result<(u64, u64), SchedStatError> {
        let mut buf = [0u8; 96];
        // A read at offset 0 makes procfs generate the line afresh.
        let n = self.0.read_at(&mut buf, 0).map_err(SchedStatError::Read)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        let fields: Vec<u64> = text
            .split_ascii_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| SchedStatError::Format {
                text: text.to_string(),
            })?;
        match fields[..] {
            [_, delay, timeslices, ..] => Ok((delay, timeslices)),
            _ => Err(SchedStatError::Format {
                text: text.to_string(),
            }),
        }
    }
}

/// A datagram read into the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    /// When it was read.
    pub time: UnixNanos,
    /// It was queued in `[time - precision_ns, time]`.
    pub precision_ns: u64,
}

/// What [`TimedReader::next`] ended with.
#[derive(Debug)]
pub enum Next {
    Datagram(Received),
    Stopped,
}

/// Reads a socket until it is empty, then sleeps until it is readable or
/// the stop is given, keeping the earliest a datagram read now can have
/// been queued. Must be created on the thread that reads.
#[derive(Debug)]
pub struct TimedReader {
    sched: Option<SchedStat>,
    earliest: UnixNanos,
}

impl TimedReader {
    /// A reader that measures its wake-ups (about 3 us of system calls per
    /// wake-up). `since`: a time before the socket could queue its first
    /// datagram (before it joined its groups).
    pub fn new(since: UnixNanos) -> Self {
        let sched = match SchedStat::open() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "datagrams without a kernel stamp are timed only by when their socket was last found empty");
                None
            }
        };
        TimedReader {
            sched,
            earliest: since,
        }
    }

    /// A reader whose precision is only the time since its socket was last
    /// empty, for datagrams whose precision nobody reads.
    pub fn unmeasured(since: UnixNanos) -> Self {
        TimedReader {
            sched: None,
            earliest: since,
        }
    }

    /// The next datagram, or the stop. Errors of the socket (ENOBUFS among
    /// them) are the caller's; the next call reads on.
    pub fn next(&mut self, sock: &Socket, stop: &StopSignal, buf: &mut [u8]) -> io::Result<Next> {
        loop {
            if stop.is_stopped() {
                return Ok(Next::Stopped);
            }
            let before = UnixNanos::now();
            if let Some(len) = recv_nowait(sock, buf)? {
                return Ok(Next::Datagram(self.received(len)));
            }
            // Empty at `before`: what comes next is queued after it.
            self.earliest = self.earliest.max(before);
            let delay_before = self.run_delay();
            // Read once more so that what poll finds came after the run
            // delay above was read, and its waits are all counted below.
            if delay_before.is_some()
                && let Some(len) = recv_nowait(sock, buf)?
            {
                return Ok(Next::Datagram(self.received(len)));
            }
            match stop.wait(sock, None)? {
                Wait::Stopped => return Ok(Next::Stopped),
                Wait::Ready | Wait::TimedOut => {}
            }
            let woke = UnixNanos::now();
            if let (Some(a), Some(b)) = (delay_before, self.run_delay()) {
                let waited = b.saturating_sub(a).saturating_add(WAKE_SLACK_NS);
                self.earliest = self.earliest.max(woke - Duration::from_nanos(waited));
            }
        }
    }

    fn received(&self, len: usize) -> Received {
        let time = UnixNanos::now();
        Received {
            len,
            time,
            precision_ns: u64::try_from(time - self.earliest).unwrap_or(0),
        }
    }

    fn run_delay(&self) -> Option<u64> {
        self.sched.as_ref()?.run_delay_ns().ok()
    }
}

/// `Ok(None)` when the socket has nothing to read.
fn recv_nowait(sock: &Socket, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match sock.recv_nowait(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Instant};

    use lab::{busy::BusyCores, commit_clock::pin};

    use super::*;
    use crate::netlink::{NLM_F_REQUEST, Request};

    const NETLINK_ROUTE: i32 = 0;
    const RTM_GETLINK: u16 = 18;

    #[test]
    fn the_run_delay_grows_while_the_thread_shares_its_core() {
        let Ok(stat) = SchedStat::open() else {
            eprintln!("skipped: this kernel keeps no scheduler statistics");
            return;
        };
        // This thread and a spinner on one core: each waits for the other.
        pin(Some(0)).unwrap();
        let spinner = std::thread::spawn(|| {
            pin(Some(0)).unwrap();
            let began = Instant::now();
            while began.elapsed() < Duration::from_millis(300) {
                std::hint::spin_loop();
            }
        });
        let before = stat.run_delay_ns().unwrap();
        let began = Instant::now();
        while began.elapsed() < Duration::from_millis(200) {
            std::hint::spin_loop();
        }
        let waited = stat.run_delay_ns().unwrap() - before;
        spinner.join().unwrap();
        pin(None).unwrap();
        assert!(
            waited >= 20_000_000,
            "sharing a core for 200 ms, the thread waited only {waited} ns for it"
        );
    }

    const ROUNDS: usize = 10;
    const SLEEP: Duration = Duration::from_millis(100);

    /// One reply per round, each sent after the reader slept `SLEEP`, on a
    /// machine whose cores are all busy: (the reply as read, before the
    /// send, after the send). The kernel queues the reply inside `send`.
    fn replies(reader: fn(UnixNanos) -> TimedReader) -> Vec<(Received, UnixNanos, UnixNanos)> {
        let _busy = BusyCores::start(2, Duration::from_secs(10));
        let sock = Arc::new(Socket::open(NETLINK_ROUTE).unwrap());
        let stop = Arc::new(StopSignal::new().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reader = reader(UnixNanos::now());
                tx.send(None).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                while let Next::Datagram(d) = reader.next(&sock, &stop, &mut buf).unwrap() {
                    tx.send(Some(d)).unwrap();
                }
            })
        };
        // The reader's start, before the first sleep.
        let ready = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(ready, Ok(None), "the reader starts");
        // Malformed on purpose: answered with exactly one error message.
        let request = Request::new(RTM_GETLINK, NLM_F_REQUEST, 1)
            .nfgenmsg(0)
            .finish();
        let out = (0..ROUNDS)
            .map(|round| {
                std::thread::sleep(SLEEP);
                let sent = UnixNanos::now();
                sock.send(&request).unwrap();
                let queued_by = UnixNanos::now();
                let d = rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("the reply is read")
                    .expect("a reply");
                eprintln!(
                    "round {round}: read {:.3} ms after the send returned, claimed {:.3} ms",
                    (d.time - queued_by) as f64 / 1e6,
                    d.precision_ns as f64 / 1e6
                );
                assert!(d.time >= sent, "round {round}: read before it was sent");
                let earliest = d.time - i64::try_from(d.precision_ns).unwrap();
                assert!(
                    earliest <= queued_by,
                    "round {round}: claimed queued after {earliest}, but it was queued by {queued_by}"
                );
                (d, sent, queued_by)
            })
            .collect();
        stop.stop();
        thread.join().unwrap();
        out
    }

    /// Each reply lies within the interval the reader claims, and that
    /// interval is its wake-up, not its sleep before.
    #[test]
    fn a_measuring_reader_claims_its_wake_up() {
        let measured = SchedStat::open().is_ok();
        for (d, ..) in replies(TimedReader::new) {
            if measured {
                assert!(
                    d.precision_ns < SLEEP.as_nanos() as u64,
                    "the claim ({} ns) spans the reader's sleep",
                    d.precision_ns
                );
            }
        }
    }

    /// Without its wake-ups measured, a reader claims its sleep (which
    /// starts when it found the socket empty, a little after the previous
    /// round's reply: on busy cores, possibly a few ms into the sender's
    /// sleep, hence half).
    #[test]
    fn an_unmeasured_reader_claims_everything_since_its_socket_was_empty() {
        for (d, sent, _) in replies(TimedReader::unmeasured) {
            let read_after = u64::try_from(d.time - sent).unwrap();
            assert!(
                d.precision_ns >= read_after + SLEEP.as_nanos() as u64 / 2,
                "claimed {} ns after a sleep of {SLEEP:?}",
                d.precision_ns
            );
        }
    }
}
