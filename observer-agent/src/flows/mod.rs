//! New connections routed to watched endpoints (T_last): conntrack
//! new-flow events (ctnetlink, NFNLGRP_CONNTRACK_NEW) whose reply source,
//! the destination after NAT, is a watched address. The eBPF socket filter
//! `ct_new_filter` on the ctnetlink socket drops every other event in the
//! kernel, so the cost is per flow to a watched address, not per flow of the
//! node. The filter knows addresses, not ports: this watch reports every
//! flow to a watched address, and its consumers (`run`, `observe`) keep
//! only those to a watched endpoint, IP and port
//! ([`crate::watched::WatchedSet::passes`]).
//!
//! Time of a flow: conntrack's own start timestamp when the event carries it
//! (net.netfilter.nf_conntrack_timestamp=1; today's kernels put it in
//! destroy events only), else the kernel stamp `ct_new_filter` took as the
//! event was queued, when the flow's first packet was confirmed
//! ([`crate::stamps`]), else the event's arrival in this thread.

mod ct_msg;

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use aya::{
    Ebpf,
    programs::{ProgramError, SocketFilter},
};
use observer_proto::{NewFlow, Observation, UnixNanos};
use thiserror::Error;
use tokio::sync::mpsc::Sender;
use tracing::{debug, info, warn};

pub use ct_msg::{CtNew, Tuple, decode as decode_ct_new};

use crate::{
    dataplane::send_until_stopped,
    kernel::{self, MissingInObject},
    netlink::{self, NETLINK_NETFILTER, Socket},
    receipt::{Next, TimedReader},
    stamps::{Stamps, Timing},
    stop::StopSignal,
};

/// Name of the socket filter program in the eBPF object.
pub const PROGRAM: &str = "ct_new_filter";
const NFNLGRP_CONNTRACK_NEW: u32 = 1;

#[derive(Debug, Error)]
pub enum FlowsError {
    #[error(transparent)]
    Missing(#[from] MissingInObject),
    #[error("loading or attaching {PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    #[error("ctnetlink socket: {0}")]
    Socket(io::Error),
    #[error("starting the flow thread: {0}")]
    Thread(io::Error),
    #[error("the flow thread's stop signal (eventfd): {0}")]
    StopSignal(io::Error),
}

/// The running flow watch; dropping it stops the thread and closes the socket.
#[derive(Debug)]
pub struct FlowWatch {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
    overflows: Arc<AtomicU64>,
    timing: Timing,
}

impl FlowWatch {
    /// Times the socket overflowed (ENOBUFS): conntrack events were lost,
    /// so new flows of that moment are missing.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// How new flows are timed.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }
}

impl Drop for FlowWatch {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens a ctnetlink socket in the current network namespace, attaches the
/// filter (loading it if needed; it reads the watched-address maps of `ebpf`) and
/// reports each new flow to a watched address, whatever its port, timed by
/// `stamps` where it has them.
pub fn spawn(
    ebpf: &mut Ebpf,
    tx: Sender<Observation>,
    mut stamps: Stamps,
) -> Result<FlowWatch, FlowsError> {
    let program: &mut SocketFilter = kernel::program_mut(ebpf, PROGRAM)?.try_into()?;
    if program.fd().is_err() {
        program.load()?;
    }
    let sock = Socket::open(NETLINK_NETFILTER).map_err(FlowsError::Socket)?;
    // Filter first, then subscribe: no unfiltered event is ever queued.
    program.attach(&sock)?;
    let subscribed = UnixNanos::now();
    sock.join_group(NFNLGRP_CONNTRACK_NEW)
        .map_err(FlowsError::Socket)?;
    if let Err(e) = sock.set_recv_buffer(RECV_BUFFER) {
        warn!(error = %e, "could not grow the conntrack event buffer");
    }
    let timing = stamps.timing();
    if let Timing::Receipt(why) = &timing {
        warn!(reason = %why, "new flows are timed when this thread reads them, not by the kernel");
    }
    let stop = Arc::new(StopSignal::new().map_err(FlowsError::StopSignal)?);
    let overflows = Arc::new(AtomicU64::new(0));
    let (flag, lost) = (stop.clone(), overflows.clone());
    let thread = std::thread::Builder::new()
        .name("flows".into())
        .spawn(move || run(&sock, &flag, &lost, &tx, &mut stamps, subscribed))
        .map_err(FlowsError::Thread)?;
    Ok(FlowWatch {
        stop,
        thread: Some(thread),
        overflows,
        timing,
    })
}

/// The conntrack socket's receive buffer at start (only watched addresses'
/// events reach it), and the limit it doubles up to after each overflow.
const RECV_BUFFER: i32 = 8 << 20;
const MAX_RECV_BUFFER: i32 = 256 << 20;

fn run(
    sock: &Socket,
    stop: &StopSignal,
    overflows: &AtomicU64,
    tx: &Sender<Observation>,
    stamps: &mut Stamps,
    subscribed: UnixNanos,
) {
    let mut buf = vec![0u8; 64 << 10];
    // A new flow carries no precision: measuring each wake-up would only
    // cost a few microseconds per event of a connection storm.
    let mut reader = TimedReader::unmeasured(subscribed);
    loop {
        let received = match reader.next(sock, stop, &mut buf) {
            Ok(Next::Datagram(received)) => received,
            Ok(Next::Stopped) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                let n = overflows.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(
                    overflows = n,
                    "conntrack events were lost (socket buffer overflow): reported as lost events"
                );
                // A storm of this size may come again.
                match sock.grow_recv_buffer(MAX_RECV_BUFFER) {
                    Ok(Some(bytes)) => info!(bytes, "conntrack event buffer doubled"),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "could not grow the conntrack event buffer"),
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "ctnetlink socket failed; flow watch stops");
                return;
            }
        };
        let n = received.len;
        // One event per datagram (ctnetlink_conntrack_event).
        let queued = stamps.time_of(&buf[..n]);
        for msg in netlink::messages(&buf[..n]) {
            let Ok(msg) = msg else { break };
            if msg.kind != ct_msg::CT_NEW {
                continue;
            }
            let ct = match ct_msg::decode(msg.payload) {
                Ok(ct) => ct,
                Err(e) => {
                    debug!(error = %e, "undecodable conntrack event skipped");
                    continue;
                }
            };
            let flow = NewFlow {
                src: ct.original.src,
                dst: ct.reply.src,
                original_dst: ct.original.dst,
                time: ct.start.or(queued).unwrap_or(received.time),
            };
            send_until_stopped(tx, stop, Observation::NewFlow(flow));
        }
    }
}
