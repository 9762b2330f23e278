//! Field offsets of the tracepoint records, read by the agent from tracefs
//! (`events/<group>/<name>/format`) on the running kernel and handed to the
//! eBPF programs as a read-only global before load. Tracepoint layouts change
//! between kernel versions (tcp_send_reset gained `reason` and sockaddr
//! fields in 6.x) and Rust eBPF gets no CO-RE relocations, so the offsets
//! must come from the kernel the agent runs on.

/// How `tcp_send_reset` stores its addresses on this kernel.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpSendResetAddrs {
    /// `__u8 saddr[28]`/`daddr[28]`: a `sockaddr_in` or `sockaddr_in6` each
    /// (kernels that also report the reset reason).
    Sockaddr = 0,
    /// `saddr_v6[16]`/`daddr_v6[16]` with IPv4-mapped IPv4 and `sport`/`dport`.
    V6Fields = 1,
}

/// Largest tracepoint record the programs copy; longer records are rejected
/// by the agent at start-up.
pub const RECORD_MAX: u16 = 128;

pub const DIRECT_SET_STATE: u8 = 1;
pub const DIRECT_SEND_RESET: u8 = 2;
pub const DIRECT_RECV_RESET: u8 = 4;

/// Offset value meaning "field not present on this kernel".
pub const ABSENT: u16 = u16::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointLayout {
    // sock/inet_sock_set_state
    pub set_state_oldstate: u16,
    pub set_state_newstate: u16,
    pub set_state_sport: u16,
    pub set_state_dport: u16,
    pub set_state_protocol: u16,
    pub set_state_saddr_v6: u16,
    pub set_state_daddr_v6: u16,
    // tcp/tcp_send_reset
    pub send_reset_state: u16,
    pub send_reset_reason: u16,
    pub send_reset_saddr: u16,
    pub send_reset_daddr: u16,
    pub send_reset_sport: u16,
    pub send_reset_dport: u16,
    // tcp/tcp_receive_reset
    pub recv_reset_sport: u16,
    pub recv_reset_dport: u16,
    pub recv_reset_saddr_v6: u16,
    pub recv_reset_daddr_v6: u16,
    /// Record sizes: each program copies its record to the stack with one
    /// helper call, then reads fields from there.
    pub set_state_size: u16,
    pub send_reset_size: u16,
    pub recv_reset_size: u16,
    /// [`DIRECT_SET_STATE`] | [`DIRECT_SEND_RESET`] | [`DIRECT_RECV_RESET`]:
    /// the tracepoint's layout on this kernel is [`TracepointLayout::DEFAULT`]'s,
    /// so the program reads the context directly at compile-time offsets
    /// instead of copying the record with a helper call (about 100 ns less
    /// per invocation on the reference machine).
    pub direct: u8,
    /// A [`TcpSendResetAddrs`].
    pub send_reset_addrs: u8,
    /// Non-zero: emit an aya-log debug line per event (off by default: the
    /// log ring is not on the hot path).
    pub log_events: u8,
}

impl TracepointLayout {
    /// The layout of kernel 6.10 and later, as read on this project's
    /// reference kernel. The agent overwrites it with what tracefs says.
    pub const DEFAULT: TracepointLayout = TracepointLayout {
        set_state_oldstate: 16,
        set_state_newstate: 20,
        set_state_sport: 24,
        set_state_dport: 26,
        set_state_protocol: 30,
        set_state_saddr_v6: 40,
        set_state_daddr_v6: 56,
        send_reset_state: 24,
        send_reset_reason: 28,
        send_reset_saddr: 32,
        send_reset_daddr: 60,
        send_reset_sport: ABSENT,
        send_reset_dport: ABSENT,
        recv_reset_sport: 16,
        recv_reset_dport: 18,
        recv_reset_saddr_v6: 30,
        recv_reset_daddr_v6: 46,
        set_state_size: 72,
        send_reset_size: 88,
        recv_reset_size: 72,
        direct: 0,
        send_reset_addrs: TcpSendResetAddrs::Sockaddr as u8,
        log_events: 0,
    };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for TracepointLayout {}
