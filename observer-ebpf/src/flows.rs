//! Socket filter for the agent's ctnetlink socket (NFNLGRP_CONNTRACK_NEW):
//! keeps only new-conntrack events whose reply tuple's source, the
//! destination after NAT, is a watched address, so user space never sees
//! the node's other flows.
//!
//! ctnetlink_conntrack_event writes, after nlmsghdr and nfgenmsg, the
//! original tuple and then the reply tuple, each a nest whose first member is
//! CTA_TUPLE_IP with the source address first.
//!
//! Each event it keeps is stamped (`stamp.rs`, ring `CT_STAMPS`): the
//! kernel time the flow was confirmed.

use aya_ebpf::{macros::socket_filter, programs::SkBuffContext};
use observer_common::WatchKey;

use crate::{
    maps::{is_watched, watch_filter},
    stamp::{CT_STAMPS, stamp},
};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW.
const CT_NEW: u16 = 1 << 8;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
/// Top-level attributes before the reply tuple (only the original tuple in
/// today's kernels; a little room for change).
const MAX_ATTRS_BEFORE_REPLY: usize = 4;

#[socket_filter]
pub fn ct_new_filter(ctx: SkBuffContext) -> i64 {
    match reply_source_watched(&ctx) {
        Ok(true) => {
            stamp(&ctx, &CT_STAMPS);
            i64::from(ctx.len())
        }
        _ => 0,
    }
}

fn attr_type(ctx: &SkBuffContext, off: usize) -> Result<u16, i64> {
    ctx.load::<u16>(off + 2).map(|t| t & NLA_TYPE_MASK)
}

fn reply_source_watched(ctx: &SkBuffContext) -> Result<bool, i64> {
    let Some(filter) = watch_filter() else {
        return Ok(false);
    };
    let kind: u16 = ctx.load(4)?;
    if kind != CT_NEW {
        return Ok(false);
    }
    let mut off = NLMSG_HDRLEN + NFGENMSG_LEN;
    for _ in 0..MAX_ATTRS_BEFORE_REPLY {
        let len = usize::from(ctx.load::<u16>(off)?);
        if len < NLA_HDRLEN {
            return Ok(false);
        }
        if attr_type(ctx, off)? == CTA_TUPLE_REPLY {
            let ip_nest = off + NLA_HDRLEN;
            if attr_type(ctx, ip_nest)? != CTA_TUPLE_IP {
                return Ok(false);
            }
            let src = ip_nest + NLA_HDRLEN;
            let value = src + NLA_HDRLEN;
            let key = match attr_type(ctx, src)? {
                CTA_IP_V4_SRC => WatchKey::from_v4(ctx.load::<[u8; 4]>(value)?),
                CTA_IP_V6_SRC => WatchKey::from_v6(ctx.load::<[u8; 16]>(value)?),
                _ => return Ok(false),
            };
            return Ok(is_watched(filter, key.words()));
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}
