//! kprobes on the ruleset commit paths: the exact kernel time a new
//! nf_tables generation or legacy xtables table is installed. Kernels
//! without kprobes load these programs (they pass the verifier) but cannot
//! attach them; the agent then times changes by their netlink notification
//! or lock release alone.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{kprobe, map},
    maps::Array,
    programs::ProbeContext,
};
use observer_common::ruleset::{COMMIT_KINDS, COMMIT_NFTABLES, COMMIT_XTABLES};

#[map]
pub static RULESET_COMMITS: Array<u64> = Array::with_max_entries(COMMIT_KINDS, 0);

#[inline(always)]
fn record(kind: u32) {
    if let Some(slot) = RULESET_COMMITS.get_ptr_mut(kind) {
        // SAFETY: the slot points into the map's value area; a plain store.
        unsafe { *slot = bpf_ktime_get_ns() };
    }
}

/// On `nf_tables_commit` (nf_tables module).
#[kprobe]
pub fn ruleset_nft_commit(_ctx: ProbeContext) -> u32 {
    record(COMMIT_NFTABLES);
    0
}

/// On `xt_replace_table` (x_tables): iptables-legacy restores and rule edits.
#[kprobe]
pub fn ruleset_xt_replace(_ctx: ProbeContext) -> u32 {
    record(COMMIT_XTABLES);
    0
}
