//! Destination-side connection tracepoints: per connection state change, not
//! per packet, and filtered in the kernel by the `WATCHED` map so that only
//! connections of terminating endpoints reach user space.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::debug;
use observer_common::{
    CloseHow, ConnEvent, ConnEventKind, Stat, TcpSendResetAddrs,
    conn::{RESET_REASON_UNKNOWN, tcp_state},
    layout::ABSENT,
};

use crate::{
    maps::{CONN_EVENTS, count, is_watched, layout},
    record::Record,
};

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

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

fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let rec = Record::load(ctx, layout!(set_state_size))?;
    let protocol: u16 = rec.get(layout!(set_state_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let old: i32 = rec.get(layout!(set_state_oldstate))?;
    let new: i32 = rec.get(layout!(set_state_newstate))?;

    // Decide from the states alone (cheap) whether this transition can matter,
    // before any map lookup.
    let (check_local, check_remote) = match (old, new) {
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) => (true, false),
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) => (false, true),
        (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1 | tcp_state::CLOSE_WAIT | tcp_state::CLOSE) => {
            (true, true)
        }
        _ => return Ok(()),
    };

    let local: [u8; 16] = rec.get(layout!(set_state_saddr_v6))?;
    let remote: [u8; 16] = rec.get(layout!(set_state_daddr_v6))?;
    let local_port: u16 = rec.get(layout!(set_state_sport))?;
    let remote_port: u16 = rec.get(layout!(set_state_dport))?;

    let local_is_endpoint = if check_local && is_watched(&local) {
        true
    } else if check_remote && is_watched(&remote) {
        false
    } else {
        count(Stat::Filtered);
        return Ok(());
    };

    let (kind, close_how) = match new {
        tcp_state::ESTABLISHED if old == tcp_state::SYN_RECV => (ConnEventKind::Accepted, CloseHow::None),
        tcp_state::ESTABLISHED => (ConnEventKind::Connected, CloseHow::None),
        tcp_state::CLOSE => (ConnEventKind::Closed, CloseHow::Reset),
        // FIN_WAIT1: this socket closed first; CLOSE_WAIT: its peer did.
        tcp_state::FIN_WAIT1 if local_is_endpoint => (ConnEventKind::Closed, CloseHow::EndpointFin),
        tcp_state::FIN_WAIT1 => (ConnEventKind::Closed, CloseHow::PeerFin),
        _ if local_is_endpoint => (ConnEventKind::Closed, CloseHow::PeerFin),
        _ => (ConnEventKind::Closed, CloseHow::EndpointFin),
    };

    let (endpoint_addr, endpoint_port, peer_addr, peer_port) = if local_is_endpoint {
        (local, local_port, remote, remote_port)
    } else {
        (remote, remote_port, local, local_port)
    };
    emit(
        ctx,
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

/// Reads an address and port stored as `sockaddr_in`/`sockaddr_in6`, and
/// returns the address in IPv4-mapped form.
#[inline(always)]
fn read_sockaddr(rec: &Record, offset: u16) -> Result<([u8; 16], u16), i64> {
    let family: u16 = rec.get(offset)?;
    let port = u16::from_be(rec.get::<u16>(offset + 2)?);
    let addr = match family {
        AF_INET => {
            let v4: [u8; 4] = rec.get(offset + 4)?;
            observer_common::WatchKey::from_v4(v4).addr
        }
        AF_INET6 => rec.get(offset + 8)?,
        _ => return Err(0),
    };
    Ok((addr, port))
}

fn try_send_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let rec = Record::load(ctx, layout!(send_reset_size))?;
    // The RST's sender is the tracepoint's `saddr`: for a reset sent without a
    // socket (nothing listening: "connection refused") the kernel fills it
    // from the offending packet's destination.
    let ((sender, sender_port), (receiver, receiver_port)) =
        if layout!(send_reset_addrs) == TcpSendResetAddrs::Sockaddr as u8 {
            (
                read_sockaddr(&rec, layout!(send_reset_saddr))?,
                read_sockaddr(&rec, layout!(send_reset_daddr))?,
            )
        } else {
            (
                (
                    rec.get::<[u8; 16]>(layout!(send_reset_saddr))?,
                    rec.get::<u16>(layout!(send_reset_sport))?,
                ),
                (
                    rec.get::<[u8; 16]>(layout!(send_reset_daddr))?,
                    rec.get::<u16>(layout!(send_reset_dport))?,
                ),
            )
        };
    if !is_watched(&sender) {
        count(Stat::Filtered);
        return Ok(());
    }
    let state: i32 = rec.get(layout!(send_reset_state))?;
    let reason_offset = layout!(send_reset_reason);
    let reason = if reason_offset == ABSENT {
        RESET_REASON_UNKNOWN
    } else {
        rec.get::<u32>(reason_offset)?
    };
    emit(
        ctx,
        ConnEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            endpoint_addr: sender,
            peer_addr: receiver,
            endpoint_port: sender_port,
            peer_port: receiver_port,
            kind: ConnEventKind::ResetSent as u8,
            close_how: CloseHow::None as u8,
            old_state: state as u8,
            new_state: state as u8,
            reason,
            _pad: 0,
        },
    );
    Ok(())
}

fn try_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let rec = Record::load(ctx, layout!(recv_reset_size))?;
    let remote: [u8; 16] = rec.get(layout!(recv_reset_daddr_v6))?;
    if !is_watched(&remote) {
        count(Stat::Filtered);
        return Ok(());
    }
    let local: [u8; 16] = rec.get(layout!(recv_reset_saddr_v6))?;
    let local_port: u16 = rec.get(layout!(recv_reset_sport))?;
    let remote_port: u16 = rec.get(layout!(recv_reset_dport))?;
    emit(
        ctx,
        ConnEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            endpoint_addr: remote,
            peer_addr: local,
            endpoint_port: remote_port,
            peer_port: local_port,
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
fn emit(ctx: &TracePointContext, event: ConnEvent) {
    if layout!(log_events) != 0 {
        debug!(
            ctx,
            "conn event kind={} endpoint_port={} peer_port={}",
            event.kind,
            event.endpoint_port,
            event.peer_port
        );
    }
    match CONN_EVENTS.reserve::<ConnEvent>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(0);
            count(Stat::Emitted);
        }
        None => count(Stat::Lost),
    }
}
