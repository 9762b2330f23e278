//! Connection events sent from the tracepoint programs to user space
//! through the `CONN_EVENTS` ring buffer.
//!
//! Addresses are normalised to the watched endpoint's point of view:
//! `endpoint` is always the watched address, `peer` the other side, whichever
//! socket (the pod's or a local client's) the kernel reported.

/// What happened to a connection of a watched endpoint.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnEventKind {
    /// The endpoint accepted a new inbound connection (SYN_RECV -> ESTABLISHED).
    Accepted = 1,
    /// A socket on this host connected to the endpoint (SYN_SENT -> ESTABLISHED).
    Connected = 2,
    /// An established connection of the endpoint left ESTABLISHED; see [`CloseHow`].
    Closed = 3,
    /// The endpoint sent a RST (connection refused, aborted close, ...).
    ResetSent = 4,
    /// A socket on this host received a RST from the endpoint.
    ResetReceived = 5,
}

impl ConnEventKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Accepted),
            2 => Some(Self::Connected),
            3 => Some(Self::Closed),
            4 => Some(Self::ResetSent),
            5 => Some(Self::ResetReceived),
            _ => None,
        }
    }
}

/// How an established connection ended, seen from the socket that changed state.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseHow {
    /// Not a close event.
    None = 0,
    /// The endpoint sent FIN first (graceful close by the server).
    EndpointFin = 1,
    /// The peer sent FIN first (graceful close by the client).
    PeerFin = 2,
    /// ESTABLISHED -> CLOSE directly: a RST was sent or received.
    Reset = 3,
}

impl CloseHow {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::EndpointFin),
            2 => Some(Self::PeerFin),
            3 => Some(Self::Reset),
            _ => None,
        }
    }
}

/// Linux TCP states as the tracepoints report them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
}

/// What a TCP state change can say about a watched endpoint, packed in a
/// byte: which of the changing socket's two addresses can be the endpoint,
/// the event's kind, and how a close happened for either choice. The
/// program finds it with one load from [`TRANSITIONS`]; branching on the
/// states instead let LLVM thread the program into a copy per state.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition(u8);

impl Transition {
    const LOCAL: u8 = 1;
    const REMOTE: u8 = 2;
    /// Every transition no event comes from.
    pub const IGNORED: Transition = Transition(0);

    pub const fn of(old: i32, new: i32) -> Transition {
        use tcp_state::*;
        const BOTH: u8 = Transition::LOCAL | Transition::REMOTE;
        let (sides, kind, how_if_local, how_if_remote) = match (old, new) {
            (SYN_RECV, ESTABLISHED) => (
                Self::LOCAL,
                ConnEventKind::Accepted,
                CloseHow::None,
                CloseHow::None,
            ),
            (SYN_SENT, ESTABLISHED) => (
                Self::REMOTE,
                ConnEventKind::Connected,
                CloseHow::None,
                CloseHow::None,
            ),
            // This socket sent FIN first.
            (ESTABLISHED, FIN_WAIT1) => (
                BOTH,
                ConnEventKind::Closed,
                CloseHow::EndpointFin,
                CloseHow::PeerFin,
            ),
            // Its peer did.
            (ESTABLISHED, CLOSE_WAIT) => (
                BOTH,
                ConnEventKind::Closed,
                CloseHow::PeerFin,
                CloseHow::EndpointFin,
            ),
            (ESTABLISHED, CLOSE) => (
                BOTH,
                ConnEventKind::Closed,
                CloseHow::Reset,
                CloseHow::Reset,
            ),
            _ => return Self::IGNORED,
        };
        Transition(
            sides | (kind as u8) << 2 | (how_if_local as u8) << 4 | (how_if_remote as u8) << 6,
        )
    }

    pub const fn matters(self) -> bool {
        self.0 & (Self::LOCAL | Self::REMOTE) != 0
    }

    /// The changing socket's own address can be the endpoint.
    pub const fn local_may_be_endpoint(self) -> bool {
        self.0 & Self::LOCAL != 0
    }

    /// Its peer's address can be the endpoint.
    pub const fn remote_may_be_endpoint(self) -> bool {
        self.0 & Self::REMOTE != 0
    }

    /// A [`ConnEventKind`].
    pub const fn kind(self) -> u8 {
        (self.0 >> 2) & 3
    }

    /// A [`CloseHow`], given which address turned out to be the endpoint.
    pub const fn close_how(self, local_is_endpoint: bool) -> u8 {
        if local_is_endpoint {
            (self.0 >> 4) & 3
        } else {
            self.0 >> 6
        }
    }
}

/// TCP states are below this (include/net/tcp_states.h has 13).
pub const TCP_STATES: usize = 16;

/// [`Transition::of`] every pair of states, at `old * TCP_STATES + new`.
pub const TRANSITIONS: [Transition; TCP_STATES * TCP_STATES] = {
    let mut table = [Transition::IGNORED; TCP_STATES * TCP_STATES];
    let mut i = 0;
    while i < table.len() {
        table[i] = Transition::of((i / TCP_STATES) as i32, (i % TCP_STATES) as i32);
        i += 1;
    }
    table
};

/// `sk_rst_reason` value meaning the tracepoint format has no reason field.
pub const RESET_REASON_UNKNOWN: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ktime_ns: u64,
    /// The watched address (IPv4-mapped for IPv4).
    pub endpoint_addr: [u8; 16],
    /// The other side of the connection.
    pub peer_addr: [u8; 16],
    /// Host byte order.
    pub endpoint_port: u16,
    /// Host byte order.
    pub peer_port: u16,
    /// A [`ConnEventKind`].
    pub kind: u8,
    /// A [`CloseHow`], for [`ConnEventKind::Closed`].
    pub close_how: u8,
    /// TCP state before the transition (or the socket state for resets; 0 if none).
    pub old_state: u8,
    /// TCP state after the transition.
    pub new_state: u8,
    /// `enum sk_rst_reason` for [`ConnEventKind::ResetSent`], else
    /// [`RESET_REASON_UNKNOWN`].
    pub reason: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnEvent {}

/// Events a CPU queues before it hands them to the ring buffer as one
/// record: a ring buffer reservation costs more than the rest of a program
/// that emits, so a batch pays it once. A record of the ring is therefore 1
/// to `CONN_BATCH_LEN` [`ConnEvent`]s back to back. 64 rather than 16 took
/// a further 15-35 ns off each emitting invocation (docs/benchmarks.md).
pub const CONN_BATCH_LEN: usize = 64;

/// The connection event ring's size in the object; the agent makes it
/// larger on machines with many CPUs (`conn_ring_bytes`).
pub const CONN_EVENTS_MIN_BYTES: u32 = 256 * 1024;

/// Unread bytes in the ring that make the programs wake the agent before
/// its timer.
pub const CONN_EVENTS_WAKEUP_BYTES: u32 = CONN_EVENTS_MIN_BYTES / 4;

/// The ring's size for `cpus` possible CPUs: every CPU's full batch four
/// times over, so that the agent's flush of all of them at once leaves room
/// for what the programs write meanwhile, and at least the object's size.
/// A power of two, as the kernel requires.
#[cfg(feature = "user")]
pub fn conn_ring_bytes(cpus: usize) -> u32 {
    let batches = cpus.max(1) * 4 * CONN_BATCH_LEN * core::mem::size_of::<ConnEvent>();
    let bytes = u32::try_from(batches.next_power_of_two()).unwrap_or(1 << 31);
    bytes.max(CONN_EVENTS_MIN_BYTES)
}

/// Per-CPU state of the batch of queued events (`CONN_BATCH_STATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnBatchState {
    /// Nonzero while a program of this CPU is changing the batch. Programs
    /// on one CPU only nest (an interrupt runs to its end before the
    /// interrupted program goes on), so a program that finds it set knows
    /// the batch is in use below it and leaves the batch alone.
    pub busy: u32,
    /// Events queued in the batch.
    pub len: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnBatchState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_name_the_possible_endpoint_the_kind_and_how_it_closed() {
        use tcp_state::*;
        let at = |old: i32, new: i32| TRANSITIONS[old as usize * TCP_STATES + new as usize];
        let t = at(SYN_RECV, ESTABLISHED);
        assert!(t.local_may_be_endpoint() && !t.remote_may_be_endpoint());
        assert_eq!(t.kind(), ConnEventKind::Accepted as u8);
        assert_eq!(t.close_how(true), CloseHow::None as u8);
        let t = at(SYN_SENT, ESTABLISHED);
        assert!(!t.local_may_be_endpoint() && t.remote_may_be_endpoint());
        assert_eq!(t.kind(), ConnEventKind::Connected as u8);
        for (new, if_local, if_remote) in [
            (FIN_WAIT1, CloseHow::EndpointFin, CloseHow::PeerFin),
            (CLOSE_WAIT, CloseHow::PeerFin, CloseHow::EndpointFin),
            (CLOSE, CloseHow::Reset, CloseHow::Reset),
        ] {
            let t = at(ESTABLISHED, new);
            assert!(t.local_may_be_endpoint() && t.remote_may_be_endpoint());
            assert_eq!(t.kind(), ConnEventKind::Closed as u8);
            assert_eq!(t.close_how(true), if_local as u8, "to {new}, local");
            assert_eq!(t.close_how(false), if_remote as u8, "to {new}, remote");
        }
        let matter = TRANSITIONS.iter().filter(|t| t.matters()).count();
        assert_eq!(matter, 5, "only the five transitions above make events");
        assert!(!at(SYN_SENT, CLOSE).matters());
        assert!(!at(FIN_WAIT1, CLOSE).matters());
    }

    #[cfg(feature = "user")]
    #[test]
    fn the_ring_holds_every_cpus_full_batch_four_times() {
        let batch = (CONN_BATCH_LEN * core::mem::size_of::<ConnEvent>()) as u32;
        assert_eq!(conn_ring_bytes(0), CONN_EVENTS_MIN_BYTES);
        assert_eq!(conn_ring_bytes(2), CONN_EVENTS_MIN_BYTES);
        for cpus in [64, 96, 200, 1024] {
            let bytes = conn_ring_bytes(cpus);
            assert!(bytes.is_power_of_two(), "{cpus} CPUs: {bytes}");
            assert!(bytes >= 4 * batch * cpus as u32, "{cpus} CPUs: {bytes}");
            assert!(bytes < 8 * batch * cpus as u32, "{cpus} CPUs: {bytes}");
        }
    }
}
