//! Destination-side connection tracepoints: per connection state change, not
//! per packet, and filtered in the kernel by the `WATCHED` map so that only
//! connections of terminating endpoints reach user space.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_ktime_get_ns,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;
use observer_common::{
    CloseHow, ConnEvent, ConnEventKind, Stat, WatchFilter, WatchKey,
    conn::{self, RESET_REASON_UNKNOWN, TCP_STATES, Transition},
    watch::AddrWords,
};

use crate::{
    delivery,
    maps::{count, is_watched, layout, watch_filter},
    record,
};

const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_send_reset(&ctx);
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = try_receive_reset(&ctx);
    0
}

/// Looked up, not computed: see [`Transition`].
static TRANSITIONS: [Transition; TCP_STATES * TCP_STATES] = conn::TRANSITIONS;
const _: () = assert!(TCP_STATES * TCP_STATES == 256);

#[inline(always)]
fn transition(old: i32, new: i32) -> Transition {
    let (old, new) = (old as u32 as u64, new as u32 as u64);
    if old >= TCP_STATES as u64 || new >= TCP_STATES as u64 {
        return Transition::IGNORED;
    }
    let mut index = old * TCP_STATES as u64 + new;
    // LLVM tests the bounds above on other copies of these registers than
    // the one it indexes with, and the verifier then sees an unbounded
    // index; a mask written as an instruction keeps it visibly in range.
    unsafe {
        core::arch::asm!(
            "{index} &= 255",
            index = inout(reg) index,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    TRANSITIONS
        .get(index as usize)
        .copied()
        .unwrap_or(Transition::IGNORED)
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(filter) = watch_filter() else {
        return Ok(());
    };
    let classify = |protocol: u16, old: i32, new: i32| {
        if protocol == IPPROTO_TCP {
            transition(old, new)
        } else {
            Transition::IGNORED
        }
    };
    let rec = record::set_state(ctx.as_ptr(), classify)?;
    let t = rec.transition;
    if !t.matters() {
        return Ok(());
    }

    let local_is_endpoint = if t.local_may_be_endpoint() && is_watched(filter, rec.local) {
        true
    } else if t.remote_may_be_endpoint() && is_watched(filter, rec.remote) {
        false
    } else {
        count(Stat::Filtered);
        return Ok(());
    };

    let (local, remote) = ((rec.local, rec.local_port), (rec.remote, rec.remote_port));
    let (endpoint, peer) = if local_is_endpoint {
        (local, remote)
    } else {
        (remote, local)
    };
    emit(
        ctx,
        filter,
        endpoint,
        peer,
        Says {
            kind: t.kind(),
            close_how: t.close_how(local_is_endpoint),
            old_state: rec.old as u8,
            new_state: rec.new as u8,
            reason: RESET_REASON_UNKNOWN,
        },
    );
    Ok(())
}

fn try_send_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(filter) = watch_filter() else {
        return Ok(());
    };
    // The RST's sender is the tracepoint's `saddr`: for a reset sent without a
    // socket (nothing listening: "connection refused") the kernel fills it
    // from the offending packet's destination.
    let rec = record::send_reset(ctx.as_ptr())?;
    if !is_watched(filter, rec.sender) {
        count(Stat::Filtered);
        return Ok(());
    }
    emit(
        ctx,
        filter,
        (rec.sender, rec.sender_port),
        (rec.receiver, rec.receiver_port),
        Says {
            kind: ConnEventKind::ResetSent as u8,
            close_how: CloseHow::None as u8,
            old_state: rec.state as u8,
            new_state: rec.state as u8,
            reason: rec.reason,
        },
    );
    Ok(())
}

fn try_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(filter) = watch_filter() else {
        return Ok(());
    };
    let rec = record::receive_reset(ctx.as_ptr())?;
    if !is_watched(filter, rec.remote) {
        count(Stat::Filtered);
        return Ok(());
    }
    emit(
        ctx,
        filter,
        (rec.remote, rec.remote_port),
        (rec.local, rec.local_port),
        Says {
            kind: ConnEventKind::ResetReceived as u8,
            close_how: CloseHow::None as u8,
            old_state: 0,
            new_state: 0,
            reason: RESET_REASON_UNKNOWN,
        },
    );
    Ok(())
}

/// What an event says besides its two ends (see [`ConnEvent`]).
struct Says {
    kind: u8,
    close_how: u8,
    old_state: u8,
    new_state: u8,
    reason: u32,
}

/// Timestamps and sends an event between the watched `endpoint` and its
/// `peer` (address words and port each).
#[inline(always)]
fn emit(
    ctx: &TracePointContext,
    filter: &WatchFilter,
    endpoint: (AddrWords, u16),
    peer: (AddrWords, u16),
    says: Says,
) {
    let event = ConnEvent {
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        endpoint_addr: WatchKey::from_words(endpoint.0).addr,
        peer_addr: WatchKey::from_words(peer.0).addr,
        endpoint_port: endpoint.1,
        peer_port: peer.1,
        kind: says.kind,
        close_how: says.close_how,
        old_state: says.old_state,
        new_state: says.new_state,
        reason: says.reason,
        _pad: 0,
    };
    if layout!(log_events) != 0 {
        debug!(
            ctx,
            "conn event kind={} endpoint_port={} peer_port={}",
            event.kind,
            event.endpoint_port,
            event.peer_port
        );
    }
    delivery::send(filter, &event);
}

/// Never attached: the agent runs it on a CPU (`BPF_PROG_TEST_RUN`) to hand
/// that CPU's queued events to the ring buffer before it reads the ring.
#[raw_tracepoint]
pub fn flush_conn_batch(_ctx: RawTracePointContext) -> i32 {
    delivery::flush();
    0
}
