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
    conn::{RESET_REASON_UNKNOWN, tcp_state},
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

/// Which side of a transition can be a watched endpoint: (local, remote).
/// Decided from the states alone, before any address is read or looked up.
#[inline(always)]
fn sides(old: i32, new: i32) -> (bool, bool) {
    match (old, new) {
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) => (true, false),
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) => (false, true),
        (
            tcp_state::ESTABLISHED,
            tcp_state::FIN_WAIT1 | tcp_state::CLOSE_WAIT | tcp_state::CLOSE,
        ) => (true, true),
        _ => (false, false),
    }
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(filter) = watch_filter() else {
        return Ok(());
    };
    let relevant = |protocol: u16, old: i32, new: i32| {
        let (local, remote) = sides(old, new);
        protocol == IPPROTO_TCP && (local || remote)
    };
    let rec = record::set_state(ctx.as_ptr(), relevant)?;
    let (old, new) = (rec.old, rec.new);
    if !relevant(rec.protocol, old, new) {
        return Ok(());
    }
    let (check_local, check_remote) = sides(old, new);

    let local_is_endpoint = if check_local && is_watched(filter, rec.local) {
        true
    } else if check_remote && is_watched(filter, rec.remote) {
        false
    } else {
        count(Stat::Filtered);
        return Ok(());
    };

    let (kind, close_how) = match new {
        tcp_state::ESTABLISHED if old == tcp_state::SYN_RECV => {
            (ConnEventKind::Accepted, CloseHow::None)
        }
        tcp_state::ESTABLISHED => (ConnEventKind::Connected, CloseHow::None),
        tcp_state::CLOSE => (ConnEventKind::Closed, CloseHow::Reset),
        // FIN_WAIT1: this socket closed first; CLOSE_WAIT: its peer did.
        tcp_state::FIN_WAIT1 if local_is_endpoint => (ConnEventKind::Closed, CloseHow::EndpointFin),
        tcp_state::FIN_WAIT1 => (ConnEventKind::Closed, CloseHow::PeerFin),
        _ if local_is_endpoint => (ConnEventKind::Closed, CloseHow::PeerFin),
        _ => (ConnEventKind::Closed, CloseHow::EndpointFin),
    };

    let (endpoint_addr, endpoint_port, peer_addr, peer_port) = if local_is_endpoint {
        (rec.local, rec.local_port, rec.remote, rec.remote_port)
    } else {
        (rec.remote, rec.remote_port, rec.local, rec.local_port)
    };
    let (endpoint_addr, peer_addr) = (
        WatchKey::from_words(endpoint_addr).addr,
        WatchKey::from_words(peer_addr).addr,
    );
    emit(
        ctx,
        filter,
        ConnEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            endpoint_addr,
            peer_addr,
            endpoint_port,
            peer_port,
            kind: kind as u8,
            close_how: close_how as u8,
            old_state: old as u8,
            new_state: new as u8,
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
