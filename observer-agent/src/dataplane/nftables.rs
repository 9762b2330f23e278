//! Detector for every layout carried by nf_tables: kube-proxy's nftables
//! mode (table `ip kube-proxy`) and iptables-nft (tables `ip nat`, ...).
//!
//! It dumps the rulesets once, then follows NFNLGRP_NFTABLES notifications
//! into a [`Mirror`]. Each notification batch ends with NEWGEN (one
//! committed transaction); only then are the touched tables re-evaluated,
//! so the intermediate states inside a kube-proxy sync (flush chain, re-add
//! rules) are never reported. The time of a change is the commit's kernel
//! time when the commit kprobe is attached, else the kernel stamp of the
//! batch's first notification datagram ([`crate::stamps`]), else the wall
//! clock when that datagram reached user space.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use observer_common::ruleset::COMMIT_NFTABLES;
use observer_proto::{Detector, UnixNanos};
use tracing::{debug, info, warn};

use super::{
    Change, DataplaneError, RecvBuffer, Shared,
    mirror::Mirror,
    nft_msg::{self, NftEvent, TableId},
};
use crate::{
    locks::lock,
    netlink::{self, NETLINK_NETFILTER, NLM_F_DUMP, NLM_F_REQUEST, Request, Socket},
    receipt::{Next, TimedReader},
    stamps,
};

/// Tables iptables-nft creates; everything else is native nftables.
fn detector_for(table: &TableId) -> Detector {
    const NFPROTO_IPV4: u8 = 2;
    let xtables = ["nat", "filter", "mangle", "raw", "security"];
    if table.family == NFPROTO_IPV4 && xtables.contains(&table.name.as_str()) {
        Detector::IptablesNft
    } else {
        Detector::Nftables
    }
}

fn msg_type(msg: u16) -> u16 {
    (nft_msg::NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Reads whole dump replies of one request into the mirror.
fn dump(
    sock: &Socket,
    seq: &mut u32,
    request: Request,
    mirror: &mut Mirror,
) -> Result<usize, DataplaneError> {
    sock.send(&request.finish())
        .map_err(DataplaneError::Netlink)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut objects = 0;
    loop {
        let n = sock.recv(&mut buf).map_err(DataplaneError::Netlink)?;
        for msg in netlink::messages(&buf[..n]) {
            let msg = msg?;
            match msg.kind {
                netlink::NLMSG_DONE => {
                    *seq += 1;
                    return Ok(objects);
                }
                netlink::NLMSG_ERROR => {
                    let errno = netlink::error_code(msg.payload)?;
                    if errno == 0 {
                        continue;
                    }
                    // ENOENT: nothing of that kind exists (for example a set
                    // deleted since it was listed).
                    if errno == libc::ENOENT {
                        *seq += 1;
                        return Ok(objects);
                    }
                    return Err(DataplaneError::Netlink(io::Error::from_raw_os_error(errno)));
                }
                kind => {
                    let event = nft_msg::decode(kind, msg.payload)?;
                    objects += match &event {
                        NftEvent::NewElems { elems, .. } => elems.len(),
                        _ => 1,
                    };
                    mirror.apply(event);
                }
            }
        }
    }
}

/// Loads the current rulesets of every family into `mirror`; returns how
/// many objects (tables, chains, sets, rules, set elements) they hold,
/// each one notification when a full sync rewrites it. Rules are
/// dumped chain by chain: the kernel resumes a whole-table rule dump by
/// walking every rule before the resume point again, which at 500 000
/// rules took minutes (docs/benchmarks.md), while a dump filtered to one
/// chain finds it by its hash.
pub fn load(mirror: &mut Mirror) -> Result<usize, DataplaneError> {
    let sock = Socket::open(NETLINK_NETFILTER).map_err(DataplaneError::Netlink)?;
    let mut seq = 1;
    let mut objects = 0;
    mirror.clear();
    for msg in [
        nft_msg::NFT_MSG_GETTABLE,
        nft_msg::NFT_MSG_GETCHAIN,
        nft_msg::NFT_MSG_GETSET,
    ] {
        let req = Request::new(msg_type(msg), NLM_F_REQUEST | NLM_F_DUMP, seq).nfgenmsg(0);
        objects += dump(&sock, &mut seq, req, mirror)?;
    }
    let tables: Vec<TableId> = mirror.tables().cloned().collect();
    for table in tables {
        for chain in mirror.chains(&table) {
            let req = Request::new(
                msg_type(nft_msg::NFT_MSG_GETRULE),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            )
            .nfgenmsg(table.family)
            .attr_str(nft_msg::NFTA_RULE_TABLE, &table.name)
            .attr_str(nft_msg::NFTA_RULE_CHAIN, &chain);
            objects += dump(&sock, &mut seq, req, mirror)?;
        }
        for set in mirror.sets(&table) {
            let req = Request::new(
                msg_type(nft_msg::NFT_MSG_GETSETELEM),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            )
            .nfgenmsg(table.family)
            .attr_str(nft_msg::NFTA_SET_ELEM_LIST_TABLE, &table.name)
            .attr_str(nft_msg::NFTA_SET_ELEM_LIST_SET, &set);
            objects += dump(&sock, &mut seq, req, mirror)?;
        }
    }
    Ok(objects)
}

/// Subscribes to nf_tables notifications in the current network namespace.
pub fn subscribe(buffer: RecvBuffer) -> Result<Socket, DataplaneError> {
    let sock = Socket::open(NETLINK_NETFILTER).map_err(DataplaneError::Netlink)?;
    sock.join_group(nft_msg::NFNLGRP_NFTABLES)
        .map_err(DataplaneError::Netlink)?;
    if let Err(e) = sock.set_recv_buffer(buffer.initial) {
        warn!(error = %e, bytes = buffer.initial, "could not grow the nf_tables notification buffer");
    }
    Ok(sock)
}

/// The mirror's changes since its last commit, as the detectors report them.
pub fn changes(mirror: &mut Mirror) -> Vec<Change> {
    mirror
        .commit()
        .into_iter()
        .map(|c| Change {
            endpoint: c.endpoint,
            added: c.added,
            detector: detector_for(&c.table),
        })
        .collect()
}

/// Re-reads the rulesets into `mirror` after lost notifications; returns
/// what changed against what the mirror selected at its last commit (not
/// against the part of a transaction read before the loss: a removal in
/// that part would be lost).
fn reload(mirror: &mut Mirror) -> Result<Vec<Change>, DataplaneError> {
    let before: HashMap<SocketAddr, Detector> = mirror
        .selected()
        .map(|(ep, table)| (ep, detector_for(table)))
        .collect();
    load(mirror)?;
    let mut changes: Vec<Change> = changes(mirror)
        .into_iter()
        .filter(|c| !before.contains_key(&c.endpoint))
        .collect();
    let now = mirror.targets();
    changes.extend(before.into_iter().filter(|(ep, _)| !now.contains(ep)).map(
        |(endpoint, detector)| Change {
            endpoint,
            added: false,
            detector,
        },
    ));
    Ok(changes)
}

/// When a datagram of notifications was queued: its kernel stamp, or its
/// receipt with the reader's measured bound (`crate::receipt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arrival {
    Stamped(UnixNanos),
    Received { time: UnixNanos, precision_ns: u64 },
}

impl Arrival {
    /// The time of a commit whose first of `messages` notifications
    /// arrived so, with its precision.
    fn claim(self, messages: u64) -> (UnixNanos, u64) {
        match self {
            Arrival::Stamped(time) => (time, stamps::rules_precision_ns(messages)),
            Arrival::Received { time, precision_ns } => (time, precision_ns),
        }
    }
}

/// The notifications of the commit being read: when the first of them
/// arrived, and how many there were.
#[derive(Debug, Default, PartialEq, Eq)]
struct Batch {
    started: Option<Arrival>,
    messages: u64,
}

impl Batch {
    /// A message of the batch (anything but NEWGEN), in a datagram that
    /// arrived at `arrival`. A commit queues all its notifications at once:
    /// the first one is the closest to the commit, however long the batch
    /// takes to read.
    fn message(&mut self, arrival: Arrival) {
        self.started.get_or_insert(arrival);
        self.messages += 1;
    }

    /// NEWGEN: the batch is complete. Hands over the batch's time with its
    /// precision; the next message starts a new batch.
    fn commit(&mut self) -> Option<(UnixNanos, u64)> {
        let messages = std::mem::take(&mut self.messages);
        self.started.take().map(|a| a.claim(messages))
    }

    /// Notifications were lost: the batch being read never completes, and
    /// its time must not be given to the next change.
    fn lost(&mut self) {
        self.started = None;
        self.messages = 0;
    }
}

/// The detector loop; returns when the watch is dropped or the receiver is
/// gone. `subscribed`: before the socket joined its group.
pub fn run(
    shared: &Shared,
    sock: Arc<Socket>,
    mut mirror: Mirror,
    buffer: RecvBuffer,
    subscribed: UnixNanos,
) {
    let mut buf = vec![0u8; 1 << 20];
    let mut batch = Batch::default();
    // The earliest the last commit read in full can have happened: commits
    // queue their notifications in commit order, so every commit whose
    // notifications are lost came after it.
    let mut last_commit = subscribed;
    let mut reader = TimedReader::new(subscribed);
    loop {
        let received = match reader.next(&sock, &shared.stop, &mut buf) {
            Ok(Next::Datagram(received)) => received,
            Ok(Next::Stopped) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Notifications were lost: rebuild from a dump. The change
                // happened after the last commit read in full.
                warn!("nf_tables notifications overflowed; re-reading the rulesets");
                shared.overflows.fetch_add(1, Ordering::Relaxed);
                batch.lost();
                let now = UnixNanos::now();
                let precision = u64::try_from(now - last_commit).unwrap_or(0);
                match reload(&mut mirror) {
                    Ok(changes) => shared.report(changes, now, precision),
                    Err(e) => warn!(error = %e, "re-reading the rulesets failed"),
                }
                // A burst of this size comes again (kube-proxy's full
                // resync): the next one should fit.
                match sock.grow_recv_buffer(buffer.max) {
                    Ok(Some(bytes)) => {
                        info!(
                            bytes,
                            "nf_tables notification buffer doubled after the overflow"
                        );
                    }
                    Ok(None) => warn!(
                        bytes = buffer.max,
                        "nf_tables notification buffer at its limit (--nft-recv-buffer-max-mib)"
                    ),
                    Err(e) => warn!(error = %e, "could not grow the nf_tables notification buffer"),
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "nf_tables notification socket failed; detector stops");
                return;
            }
        };
        let datagram = &buf[..received.len];
        let arrival = match lock(&shared.stamps, "nf_tables stamps").time_of(datagram) {
            Some(time) => Arrival::Stamped(time),
            None => Arrival::Received {
                time: received.time,
                precision_ns: received.precision_ns,
            },
        };
        for msg in netlink::messages(datagram) {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "malformed netlink datagram skipped");
                    break;
                }
            };
            let event = match nft_msg::decode(msg.kind, msg.payload) {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(error = %e, kind = msg.kind, "undecodable nf_tables message skipped");
                    continue;
                }
            };
            if let NftEvent::NewGen { id, process } = &event {
                let messages = batch.messages;
                let (first, precision) = batch.commit().unwrap_or_else(|| arrival.claim(0));
                last_commit = first - Duration::from_nanos(precision);
                debug!(
                    generation = id,
                    process = process.as_deref().unwrap_or("?"),
                    messages,
                    "commit"
                );
                let changes = changes(&mut mirror);
                if !changes.is_empty() {
                    let (time, precision) =
                        shared.change_time(COMMIT_NFTABLES, first, precision, 0);
                    shared.report(changes, time, precision);
                }
                continue;
            }
            batch.message(arrival);
            mirror.apply(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(nanos: i64) -> UnixNanos {
        UnixNanos::from_nanos(nanos)
    }

    /// Read at `nanos`, queued at most `nanos` ns before.
    fn read_at(nanos: i64) -> Arrival {
        Arrival::Received {
            time: t(nanos),
            precision_ns: nanos as u64,
        }
    }

    #[test]
    fn a_batch_is_timed_by_its_first_message() {
        let mut batch = Batch::default();
        batch.message(read_at(10));
        batch.message(read_at(12));
        batch.message(read_at(15));
        assert_eq!(batch.commit(), Some((t(10), 10)));
        assert_eq!(batch, Batch::default());
        batch.message(read_at(40));
        assert_eq!(batch.commit(), Some((t(40), 40)));
    }

    #[test]
    fn a_kernel_stamped_batch_has_the_stamps_precision_for_its_size() {
        let mut batch = Batch::default();
        batch.message(Arrival::Stamped(t(7)));
        // Later datagrams of the batch were not stamped (a full ring): the
        // batch keeps the first one's time and method.
        batch.message(read_at(30));
        batch.message(read_at(31));
        assert_eq!(batch.commit(), Some((t(7), stamps::rules_precision_ns(3))));
    }

    #[test]
    fn lost_notifications_do_not_leave_a_stale_batch_time() {
        let mut batch = Batch::default();
        // A batch starts, then the socket overflows before its NEWGEN.
        batch.message(read_at(10));
        batch.lost();
        // The next commit after the re-read is timed by its own messages.
        batch.message(read_at(500));
        assert_eq!(batch.commit(), Some((t(500), 500)));
    }
}
