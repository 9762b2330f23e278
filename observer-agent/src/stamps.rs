//! Kernel-time stamps of the agent's netlink datagrams (observer-common
//! `stamp.rs`): a socket filter stamps each datagram as the sender queues
//! it (inside the writer's nf_tables commit; where a flow is confirmed for
//! conntrack), so a change is timed by the kernel, not by when the reader
//! thread gets a core.
//!
//! Joining: each stamp carries the datagram's length and first bytes, and
//! the reader takes, for each datagram it receives, the oldest pending
//! stamp with the same length and bytes. What this relies on:
//! - the filter runs, and its stamp is in the ring, before the datagram is
//!   queued (`do_one_broadcast`: `sk_filter`, then delivery), so the stamp of
//!   a received datagram is always readable;
//! - not on positions: conntrack events of two CPUs can be stamped in one
//!   order and queued in the other, and a datagram dropped on a full socket
//!   buffer (ENOBUFS) was stamped all the same. Such orphan stamps stay
//!   pending until a matched stamp is [`ORPHAN_AGE_NS`] younger;
//! - two datagrams with equal length and first bytes are the same
//!   notification of one commit (same sequence, port id and generation) or
//!   events of the same tuple: taking the wrong one of two moves the time
//!   by the gap between them.
//!
//! A datagram without a stamp (the ring was full, or it was queued before
//! the filter was attached) is timed at its receipt, with that method's
//! precision.

use std::{collections::VecDeque, fmt, os::fd::AsFd};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{ProgramError, SocketFilter},
};
use observer_common::stamp::MsgStamp;
use observer_proto::UnixNanos;
use thiserror::Error;

use crate::{
    clock::WallClock,
    kernel::{self, Kernel, MissingInObject},
    netlink::{NETLINK_NETFILTER, Socket},
};

/// The socket filter of the nf_tables notification socket.
pub const NFT_PROGRAM: &str = "nft_notify_stamp";

/// Precision of a rules change timed by its kernel stamp, before the
/// per-notification part ([`rules_precision_ns`]): the stamp is taken when
/// the commit's first notification datagram is queued, after the new
/// generation went live; the wall-clock conversion adds well under a
/// microsecond.
pub const STAMP_BASE_PRECISION_NS: u64 = 50_000;

/// Upper bound of the kernel's work per notification between the
/// generation switch and the first datagram's queueing (nf_tables builds
/// every notification of the commit first, then sends them).
/// docs/benchmarks.md measures the sending side of it. Work, not time: a
/// writer switched out in between (a busy node; its allocations may
/// sleep) stamps later by that time, which no user-space reading can see.
/// The stamp is then later than the commit, never earlier, so the times
/// stay upper bounds; only the claimed precision is too narrow.
pub const STAMP_PER_NOTIFICATION_NS: u64 = 2_000;

/// Precision of a rules change timed by the kernel stamp of a commit of
/// `notifications` messages.
pub fn rules_precision_ns(notifications: u64) -> u64 {
    STAMP_BASE_PRECISION_NS.saturating_add(notifications.saturating_mul(STAMP_PER_NOTIFICATION_NS))
}

/// A pending stamp this much older than one just matched belongs to a
/// datagram that was dropped: a queued datagram is stamped microseconds
/// before it is queued, and the queue is FIFO.
pub const ORPHAN_AGE_NS: u64 = 1_000_000_000;

/// Pending stamps kept at most (a datagram of each, unread, is a full
/// socket buffer several times over).
const MAX_PENDING: usize = 1 << 16;

/// Which socket's stamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampKind {
    /// nf_tables notifications (`nft_notify_stamp`).
    Nftables,
    /// Conntrack new-flow events kept by `ct_new_filter`.
    Conntrack,
}

impl StampKind {
    pub const ALL: [StampKind; 2] = [StampKind::Nftables, StampKind::Conntrack];

    /// The socket filter that stamps.
    pub const fn program(self) -> &'static str {
        match self {
            StampKind::Nftables => NFT_PROGRAM,
            StampKind::Conntrack => crate::flows::PROGRAM,
        }
    }

    /// The ring buffer map the filter writes to.
    pub const fn ring(self) -> &'static str {
        match self {
            StampKind::Nftables => "NFT_STAMPS",
            StampKind::Conntrack => "CT_STAMPS",
        }
    }
}

impl fmt::Display for StampKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StampKind::Nftables => "nf_tables notifications",
            StampKind::Conntrack => "conntrack new flows",
        })
    }
}

#[derive(Debug, Error)]
pub enum StampError {
    #[error(transparent)]
    Missing(#[from] MissingInObject),
    #[error("stamp ring {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading or attaching {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// How a socket's datagrams are timed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Timing {
    /// By the kernel stamp of each datagram.
    KernelStamp,
    /// At the reader's receipt, and why.
    Receipt(String),
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timing::KernelStamp => f.write_str("kernel time, stamped by a socket filter as queued"),
            Timing::Receipt(why) => write!(f, "receipt by the agent's thread ({why})"),
        }
    }
}

/// The stamp rings of a loaded object, each handed out once.
pub struct StampRings {
    nft: Result<RingBuf<MapData>, String>,
    ct: Result<RingBuf<MapData>, String>,
}

impl StampRings {
    /// Takes both rings out of `ebpf`.
    pub fn take_from(ebpf: &mut Ebpf) -> Self {
        let mut take = |kind: StampKind| -> Result<RingBuf<MapData>, String> {
            let map = kernel::take_map(ebpf, kind.ring()).map_err(|e| e.to_string())?;
            RingBuf::try_from(map).map_err(|e| format!("stamp ring {}: {e}", kind.ring()))
        };
        StampRings {
            nft: take(StampKind::Nftables),
            ct: take(StampKind::Conntrack),
        }
    }

    /// No stamps, for `why`.
    pub fn off(why: &str) -> Self {
        StampRings {
            nft: Err(why.to_owned()),
            ct: Err(why.to_owned()),
        }
    }

    /// Whether the ring of `kind` is still here to be taken, or why not.
    pub fn available(&self, kind: StampKind) -> Result<(), String> {
        self.slot(kind).as_ref().map(drop).map_err(Clone::clone)
    }

    fn slot(&self, kind: StampKind) -> &Result<RingBuf<MapData>, String> {
        match kind {
            StampKind::Nftables => &self.nft,
            StampKind::Conntrack => &self.ct,
        }
    }

    /// The stamps of `kind` for one reader, or receipt timing and why.
    pub fn take(&mut self, kind: StampKind) -> Stamps {
        let slot = match kind {
            StampKind::Nftables => &mut self.nft,
            StampKind::Conntrack => &mut self.ct,
        };
        match std::mem::replace(slot, Err("its stamps are read by another socket".into())) {
            Ok(ring) => Stamps::Kernel(Box::new(StampJoin::new(ring))),
            Err(why) => {
                *slot = Err(why.clone());
                Stamps::Receipt(why)
            }
        }
    }
}

/// A socket reader's stamps, or why it has none.
pub enum Stamps {
    Kernel(Box<StampJoin>),
    Receipt(String),
}

impl Stamps {
    pub fn timing(&self) -> Timing {
        match self {
            Stamps::Kernel(_) => Timing::KernelStamp,
            Stamps::Receipt(why) => Timing::Receipt(why.clone()),
        }
    }

    /// The kernel time of `datagram`, when its stamp is found.
    pub fn time_of(&mut self, datagram: &[u8]) -> Option<UnixNanos> {
        match self {
            Stamps::Kernel(join) => join.time_of(datagram),
            Stamps::Receipt(_) => None,
        }
    }
}

impl fmt::Debug for Stamps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.timing(), f)
    }
}

/// Loads the filter of `kind` if needed and attaches it to `sock`.
pub fn attach_filter(ebpf: &mut Ebpf, kind: StampKind, sock: &impl AsFd) -> Result<(), StampError> {
    let name = kind.program();
    let failed = |source| StampError::Program {
        program: name,
        source,
    };
    let program: &mut SocketFilter = kernel::program_mut(ebpf, name)?
        .try_into()
        .map_err(failed)?;
    if program.fd().is_err() {
        program.load().map_err(failed)?;
    }
    program.attach(sock).map_err(failed)?;
    Ok(())
}

/// How datagrams of `kind` would be timed with this kernel: by their
/// stamps if the ring is there and the filter loads and attaches to a
/// netlink socket (opened for the probe and closed again).
pub fn probe(kernel: &mut Kernel, kind: StampKind) -> Timing {
    let attached = kernel.stamps_available(kind).and_then(|()| {
        let sock = Socket::open(NETLINK_NETFILTER).map_err(|e| format!("netlink socket: {e}"))?;
        attach_filter(kernel.ebpf_mut(), kind, &sock).map_err(|e| e.to_string())
    });
    match attached {
        Ok(()) => Timing::KernelStamp,
        Err(why) => Timing::Receipt(why),
    }
}

/// Joins one socket's datagrams with their stamps.
pub struct StampJoin {
    ring: RingBuf<MapData>,
    pending: Pending,
    clock: WallClock,
}

impl StampJoin {
    fn new(ring: RingBuf<MapData>) -> Self {
        StampJoin {
            ring,
            pending: Pending::default(),
            clock: WallClock::new(),
        }
    }

    /// The wall-clock time the kernel queued `datagram`, just received.
    pub fn time_of(&mut self, datagram: &[u8]) -> Option<UnixNanos> {
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<MsgStamp>() {
                // SAFETY: at least size_of::<MsgStamp>() bytes, written by
                // the filter as a MsgStamp (plain integers and bytes).
                self.pending
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        let ktime = self.pending.take_match(datagram)?;
        Some(self.clock.to_unix_nanos(ktime))
    }
}

/// Stamps read from the ring and not yet matched, oldest first.
#[derive(Debug, Default)]
struct Pending {
    stamps: VecDeque<MsgStamp>,
}

impl Pending {
    fn push(&mut self, stamp: MsgStamp) {
        if self.stamps.len() == MAX_PENDING {
            self.stamps.pop_front();
        }
        self.stamps.push_back(stamp);
    }

    /// The kernel time of the oldest stamp of `datagram`; forgets it and
    /// the orphans it proves.
    fn take_match(&mut self, datagram: &[u8]) -> Option<u64> {
        let at = self.stamps.iter().position(|s| s.matches(datagram))?;
        let ktime = self.stamps.remove(at)?.ktime_ns;
        let horizon = ktime.saturating_sub(ORPHAN_AGE_NS);
        self.stamps.retain(|s| s.ktime_ns >= horizon);
        Some(ktime)
    }
}

#[cfg(test)]
mod tests {
    use observer_common::stamp::STAMP_PREFIX;

    use super::*;

    fn stamp(ktime_ns: u64, datagram: &[u8]) -> MsgStamp {
        let copied = datagram.len().min(STAMP_PREFIX);
        let mut prefix = [0; STAMP_PREFIX];
        prefix[..copied].copy_from_slice(&datagram[..copied]);
        MsgStamp {
            ktime_ns,
            len: datagram.len() as u32,
            prefix_len: copied as u32,
            prefix,
        }
    }

    #[test]
    fn stamps_join_by_content_whatever_their_order() {
        let (a, b) = (vec![1u8; 40], vec![2u8; 40]);
        let mut p = Pending::default();
        // Stamped a then b on two CPUs, queued b then a.
        p.push(stamp(10, &a));
        p.push(stamp(11, &b));
        assert_eq!(p.take_match(&b), Some(11));
        assert_eq!(p.take_match(&a), Some(10));
        assert_eq!(p.take_match(&a), None, "each stamp is used once");
    }

    #[test]
    fn a_dropped_datagrams_stamp_is_skipped_and_forgotten() {
        let dropped = vec![3u8; 200];
        let next = {
            let mut d = vec![3u8; 200];
            d[199] = 4;
            d
        };
        let mut p = Pending::default();
        p.push(stamp(5, &dropped));
        p.push(stamp(ORPHAN_AGE_NS + 6, &next));
        // Same length and first 96 bytes: the older stamp is taken (the
        // datagram it stamped may be unread).
        assert_eq!(p.take_match(&next), Some(5));
        let mut p = Pending::default();
        p.push(stamp(5, &[9u8; 32]));
        p.push(stamp(ORPHAN_AGE_NS + 6, &next));
        assert_eq!(p.take_match(&next), Some(ORPHAN_AGE_NS + 6));
        assert!(p.stamps.is_empty(), "the orphan is forgotten");
    }

    #[test]
    fn a_datagram_without_a_stamp_has_no_time_and_pending_is_bounded() {
        let mut p = Pending::default();
        assert_eq!(p.take_match(&[1u8; 16]), None);
        for i in 0..MAX_PENDING as u64 + 5 {
            p.push(stamp(i, &[7u8; 16]));
        }
        assert_eq!(p.stamps.len(), MAX_PENDING);
        assert_eq!(p.take_match(&[7u8; 16]), Some(5));
    }

    #[test]
    fn rings_are_handed_out_once_and_off_says_why() {
        let mut rings = StampRings::off("turned off");
        assert_eq!(
            rings.available(StampKind::Conntrack),
            Err("turned off".into())
        );
        assert_eq!(
            rings.take(StampKind::Nftables).timing(),
            Timing::Receipt("turned off".into())
        );
        assert_eq!(
            rings.available(StampKind::Nftables),
            Err("turned off".into())
        );
    }

    #[test]
    fn precision_grows_with_the_commit() {
        assert_eq!(rules_precision_ns(0), STAMP_BASE_PRECISION_NS);
        assert_eq!(
            rules_precision_ns(10),
            STAMP_BASE_PRECISION_NS + 10 * STAMP_PER_NOTIFICATION_NS
        );
    }
}
