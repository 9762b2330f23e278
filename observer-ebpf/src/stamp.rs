//! Kernel-time stamps of the datagrams queued on the agent's netlink
//! sockets (observer-common `stamp.rs`): the time the sender queued each
//! one, whenever the agent's reader gets to run.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{map, socket_filter},
    maps::RingBuf,
    programs::SkBuffContext,
};
use observer_common::stamp::{
    CT_STAMPS_BYTES, MsgStamp, NFT_STAMPS_BYTES, STAMP_PREFIX, STAMP_PREFIX_TIERS,
};

/// Stamps of the nf_tables notification socket's datagrams.
#[map]
pub static NFT_STAMPS: RingBuf = RingBuf::with_byte_size(NFT_STAMPS_BYTES, 0);

/// Stamps of the conntrack event socket's datagrams that `ct_new_filter` keeps.
#[map]
pub static CT_STAMPS: RingBuf = RingBuf::with_byte_size(CT_STAMPS_BYTES, 0);

/// On the nf_tables notification socket: keeps every datagram and stamps it.
#[socket_filter]
pub fn nft_notify_stamp(ctx: SkBuffContext) -> i64 {
    stamp(&ctx, &NFT_STAMPS);
    i64::from(ctx.len())
}

/// Writes the stamp of the datagram in `ctx` to `ring`. A full ring loses
/// the stamp: user space then finds none and times the datagram at its
/// receipt, reported with that method's precision.
#[inline(always)]
pub fn stamp(ctx: &SkBuffContext, ring: &RingBuf) {
    let mut s = MsgStamp {
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        len: ctx.len(),
        prefix_len: 0,
        prefix: [0; STAMP_PREFIX],
    };
    // The longest constant-length copy the datagram holds.
    for tier in STAMP_PREFIX_TIERS {
        if s.len as usize >= tier {
            // SAFETY: the destination is `tier` (<= STAMP_PREFIX) bytes of
            // the stack copy; the helper checks the packet bounds.
            let ret = unsafe {
                bpf_skb_load_bytes(
                    ctx.skb.skb.cast(),
                    0,
                    s.prefix.as_mut_ptr().cast(),
                    tier as u32,
                )
            };
            if ret == 0 {
                s.prefix_len = tier as u32;
            }
            break;
        }
    }
    let _ = ring.output::<MsgStamp>(&s, 0);
}
