//! Kernel-time stamps of netlink datagrams, written by the socket filters
//! on the agent's nf_tables notification and conntrack event sockets.
//!
//! A socket filter runs in the sender's context just before the kernel
//! queues the datagram on the socket: inside the writer's commit for
//! nf_tables, where the flow is confirmed for conntrack. The stamp carries
//! the datagram's length and first bytes (netlink header, nfgenmsg and the
//! first attributes: the generation id and table for nf_tables, the
//! original tuple for conntrack), which is how user space finds the stamp
//! of each datagram it reads. Position in the ring is not relied on:
//! conntrack events of different CPUs can reach the ring and the queue in
//! different orders, and a datagram dropped on a full socket buffer has
//! been stamped already.

/// Bytes of each datagram copied into its stamp: the nlmsghdr (16), the
/// nfgenmsg (4) and a conntrack event's whole original tuple for IPv6 (76).
pub const STAMP_PREFIX: usize = 96;

/// The shorter copies for shorter datagrams (the eBPF helper needs a
/// constant length); every netlink datagram has at least a header.
pub const STAMP_PREFIX_TIERS: [usize; 4] = [STAMP_PREFIX, 64, 32, 16];

/// Ring buffer sizes: the nf_tables one holds the stamps of a full resync
/// of a large cluster (tens of thousands of notifications in datagrams of
/// up to a page), the conntrack one a burst of new flows to watched pods.
pub const NFT_STAMPS_BYTES: u32 = 4 << 20;
pub const CT_STAMPS_BYTES: u32 = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgStamp {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) when the datagram was queued.
    pub ktime_ns: u64,
    /// The datagram's length.
    pub len: u32,
    /// How many bytes of `prefix` were copied.
    pub prefix_len: u32,
    pub prefix: [u8; STAMP_PREFIX],
}

impl MsgStamp {
    /// Whether this is the stamp of `datagram`.
    pub fn matches(&self, datagram: &[u8]) -> bool {
        let copied = self.prefix_len as usize;
        self.len as usize == datagram.len()
            && copied <= STAMP_PREFIX
            && datagram.get(..copied) == self.prefix.get(..copied)
    }
}
