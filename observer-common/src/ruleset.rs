//! Slots of the `RULESET_COMMITS` array: the kernel time (bpf_ktime_get_ns)
//! of the latest ruleset commit seen by the kprobes, per kind.

/// nf_tables_commit: nftables and iptables-nft transactions.
pub const COMMIT_NFTABLES: u32 = 0;
/// xt_replace_table: legacy xtables table replacement.
pub const COMMIT_XTABLES: u32 = 1;
pub const COMMIT_KINDS: u32 = 2;
