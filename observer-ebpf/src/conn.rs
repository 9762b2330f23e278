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

    let (endpoint_addr, endpoint_port, peer_addr, peer_port) = if local_is_endpoint {
        (rec.local, rec.local_port, rec.remote, rec.remote_port)
    } else {
        (rec.remote, rec.remote_port, rec.local, rec.local_port)
    };
    emit(
        ctx,
        filter,
        ConnEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            endpoint_addr: WatchKey::from_words(endpoint_addr).addr,
            peer_addr: WatchKey::from_words(peer_addr).addr,
            endpoint_port,
            peer_port,
            kind: t.kind(),
            close_how: t.close_how(local_is_endpoint),
            old_state: rec.old as u8,
            new_state: rec.new as u8,
            reason: RESET_REASON_UNKNOWN,
            _pad: 0,
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
        ConnEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            endpoint_addr: WatchKey::from_words(rec.sender).addr,
            peer_addr: WatchKey::from_words(rec.receiver).addr,
            endpoint_port: rec.sender_port,
            peer_port: rec.receiver_port,
            kind: ConnEventKind::ResetSent as u8,
            close_how: CloseHow::None as u8,
            old_state: rec.state as u8,
            new_state: rec.state as u8,
            reason: rec.reason,
            _pad: 0,
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
        ConnEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            endpoint_addr: WatchKey::from_words(rec.remote).addr,
            peer_addr: WatchKey::from_words(rec.local).addr,
            endpoint_port: rec.remote_port,
            peer_port: rec.local_port,
            kind: ConnEventKind::ResetReceived as u8,
            close_how: CloseHow::None as u8,
            old_state: 0,
            new_state: 0,
            reason: RESET_REASON_UNKNOWN,
            _pad: 0,
        },
    );
    Ok(())
}

#[inline(always)]
fn emit(ctx: &TracePointContext, filter: &WatchFilter, event: ConnEvent) {
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
