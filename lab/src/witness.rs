//! The kernel's own account of when a node's nftables ruleset changed:
//! every nf_tables commit (nft, iptables-nft) multicasts a NEWGEN message
//! on NFNLGRP_NFTABLES as it commits. The lab uses it as the ground truth
//! of a rule change, because the writing process (`nft -f`,
//! `iptables-nft-restore`) keeps running for several milliseconds after its
//! commit, which makes its exit time a loose bound. iptables-legacy commits
//! send nothing; there the transaction's end is the truth.
//!
//! Netlink sockets carry no kernel receive timestamp (SO_TIMESTAMPNS gives
//! no control message on them; checked on 6.18), so a commit's time is
//! when this thread reads the first datagram of its notifications (the
//! kernel queues them all at once, after the new generation went live,
//! and NEWGEN last): a commit of a few hundred rules (iptables-nft at a
//! hundred endpoints) takes this thread many reads to reach its NEWGEN,
//! and timing it there made a prompt observer look tens of milliseconds
//! early. The thread runs under SCHED_FIFO so
//! that read follows the commit within its wake-up latency even on a
//! loaded machine; at normal priority it was seen tens of milliseconds
//! late, which made a prompt observer look early.

use observer_proto::UnixNanos;
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use crate::netns;

const NETLINK_NETFILTER: i32 = 12;
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
/// Wall-clock times are kept this long (commits of a long lab run).
const MAX_COMMITS: usize = 100_000;

/// Records the time of every nf_tables commit in one network namespace.
pub struct CommitWitness {
    commits: Arc<Mutex<Vec<UnixNanos>>>,
    /// The listening socket (a duplicate), to see whether anything is unread.
    socket: Arc<OnceLock<OwnedFd>>,
    /// A datagram was read and its commit's NEWGEN is not recorded yet.
    reading: Arc<AtomicBool>,
    _recorder: Recorder,
}

/// A thread that opens its source inside a network namespace and records
/// from it until dropped: the witnesses' common shape.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Runs `open` in a new thread inside the namespace at `netns`, then
    /// `record` with what it opened until the recorder is dropped (the flag
    /// it gets turns true). Returns once the source is open, or with the
    /// error that kept it from opening.
    pub fn start<S>(
        netns: &Path,
        what: &'static str,
        open: impl FnOnce() -> io::Result<S> + Send + 'static,
        record: impl FnOnce(S, &AtomicBool) + Send + 'static,
    ) -> io::Result<Self> {
        let netns = netns.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        // Named, so the lab's cost counts the witnesses apart.
        let thread = std::thread::Builder::new()
            .name(crate::cost::WITNESS_THREAD.into())
            .spawn(move || match netns::enter(&netns).and_then(|_| open()) {
                Ok(source) => {
                    let _ = ready_tx.send(Ok(()));
                    record(source, &flag);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other(format!("{what} thread ended")))??;
        Ok(Recorder {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A NETLINK_NETFILTER socket subscribed to nftables events, asking for
/// kernel receive timestamps (used where the kernel gives them), with a
/// receive timeout (to notice a stop) and, if given, a receive buffer of
/// that many bytes (past `net.core.rmem_max`: needs CAP_NET_ADMIN).
pub fn nftables_listener(
    receive_buffer: Option<i32>,
    timeout: std::time::Duration,
) -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls with valid, correctly sized arguments.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = 1 << (NFNLGRP_NFTABLES - 1);
        check(libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        ))?;
        let on: i32 = 1;
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const i32).cast(),
            size_of::<i32>() as u32,
        ))?;
        if let Some(size) = receive_buffer {
            check(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const i32).cast(),
                size_of::<i32>() as u32,
            ))?;
        }
        let timeout = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        ))?;
        Ok(fd)
    }
}

/// What one receive brought.
enum Received {
    /// A datagram: the kernel's timestamp where the socket has one (netlink
    /// has none so far: then the time of the read), and whether it holds a
    /// NEWGEN message.
    Datagram(UnixNanos, bool),
    /// Nothing before the timeout.
    Nothing,
    /// The socket overflowed (ENOBUFS): notifications were lost.
    Lost,
}

/// Receives one datagram.
fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr points at live buffers of the stated lengths.
    let (len, msg) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>();
        let len = libc::recvmsg(fd.as_raw_fd(), &mut msg, 0);
        (len, msg)
    };
    if len < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(Received::Nothing)
            }
            // Events were lost (ENOBUFS): keep listening, a gap is visible
            // in the results as a missing commit.
            _ if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::Lost),
            _ => Err(e),
        };
    }
    let mut stamp = UnixNanos::now();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SO_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                stamp = UnixNanos::from_seconds(ts.tv_sec) + ts.tv_nsec;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received::Datagram(
        stamp,
        contains_newgen(&buf[..len as usize]),
    ))
}

/// SCHED_FIFO priority of the witnesses: above the agents' own timing
/// threads (observer-agent's `--timing-priority`, 10 by default), so that
/// when a commit wakes both and a single core is free (the writer keeps its
/// own while the kernel sends the notifications), the witness stamps first
/// and goes back to sleep within microseconds instead of waiting behind the
/// detector for the rest of the commit's notifications. It only wakes for
/// commits.
pub const WITNESS_PRIORITY: u8 = 20;

/// Puts the calling thread under SCHED_FIFO at `priority`.
pub fn set_fifo(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: pthread_self is always valid; param is a valid sched_param.
    let ret =
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Whether a netlink datagram carries an nftables NEWGEN message.
pub fn contains_newgen(mut data: &[u8]) -> bool {
    const HEADER: usize = 16;
    while data.len() >= HEADER {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
            return true;
        }
        if len < HEADER || len > data.len() {
            return false;
        }
        data = &data[(len + 3) & !3..];
    }
    false
}

impl CommitWitness {
    /// Starts listening inside the namespace at `netns`.
    pub fn start(netns: &Path) -> io::Result<Self> {
        let commits = Arc::new(Mutex::new(Vec::new()));
        let recorded = commits.clone();
        let socket = Arc::new(OnceLock::new());
        let shared_socket = Arc::clone(&socket);
        let reading = Arc::new(AtomicBool::new(false));
        let is_reading = Arc::clone(&reading);
        let open = || {
            if let Err(e) = set_fifo(WITNESS_PRIORITY) {
                eprintln!(
                    "lab: the nftables commit witness runs without real-time priority ({e}); \
                     its commit times may lag under load"
                );
            }
            nftables_listener(None, std::time::Duration::from_millis(200))
        };
        let record = move |socket: OwnedFd, stop: &AtomicBool| {
            if let Ok(dup) = socket.try_clone() {
                let _ = shared_socket.set(dup);
            }
            let mut buf = vec![0u8; 64 * 1024];
            // The receipt of the first datagram of the commit being read.
            let mut batch: Option<UnixNanos> = None;
            while !stop.load(Ordering::Relaxed) {
                match receive(&socket, &mut buf) {
                    Ok(Received::Datagram(stamp, newgen)) => {
                        is_reading.store(true, Ordering::SeqCst);
                        let first = *batch.get_or_insert(stamp);
                        if newgen {
                            batch = None;
                            let mut commits = recorded.lock().expect("commits lock");
                            if commits.len() < MAX_COMMITS {
                                commits.push(first);
                            }
                            is_reading.store(false, Ordering::SeqCst);
                        }
                    }
                    Ok(Received::Nothing) => {}
                    // The commit being read lost its NEWGEN or its start:
                    // no time is given to it.
                    Ok(Received::Lost) => {
                        batch = None;
                        is_reading.store(false, Ordering::SeqCst);
                    }
                    Err(_) => return,
                }
            }
        };
        Ok(CommitWitness {
            commits,
            socket,
            reading,
            _recorder: Recorder::start(netns, "commit witness", open, record)?,
        })
    }

    /// Whether every notification queued so far was read and its commit
    /// recorded: nothing unread on the socket, no commit half-read. (A
    /// datagram just taken off the socket and not yet marked is caught by
    /// asking twice, a moment apart.)
    pub fn settled(&self) -> bool {
        if self.reading.load(Ordering::SeqCst) {
            return false;
        }
        let Some(fd) = self.socket.get() else {
            return false;
        };
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a live buffer; nothing is consumed.
        let peeked = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        peeked < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// The commits seen between `from` and `to` (Unix ns), oldest first.
    pub fn commits_between(&self, from: UnixNanos, to: UnixNanos) -> Vec<UnixNanos> {
        self.commits
            .lock()
            .expect("commits lock")
            .iter()
            .filter(|t| (from..=to).contains(*t))
            .copied()
            .collect()
    }

    /// The last commit seen between `from` and `to` (Unix ns).
    pub fn last_commit_between(&self, from: UnixNanos, to: UnixNanos) -> Option<UnixNanos> {
        self.commits
            .lock()
            .expect("commits lock")
            .iter()
            .rev()
            .find(|t| (from..=to).contains(*t))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn finds_newgen_among_other_messages_and_survives_garbage() {
        let newgen = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN;
        let other = (NFNL_SUBSYS_NFTABLES << 8) | 6;
        assert!(contains_newgen(
            &[message(other, 5), message(newgen, 8)].concat()
        ));
        assert!(!contains_newgen(&message(other, 0)));
        assert!(!contains_newgen(&[0xff; 40]));
        assert!(!contains_newgen(&[1, 2, 3]));
    }
}
