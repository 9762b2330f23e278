//! The dataplane detectors' memory flags, shared by `run` and `observe`.

use clap::Args;

use crate::dataplane::{Limits, RecvBuffer};

#[derive(Args, Clone, Debug)]
pub struct DataplaneArgs {
    /// Receive buffer of the nf_tables notification socket at start, in
    /// MiB (kernel memory, used only while the detector lags behind a
    /// burst). A full kube-proxy sync of 10 000 endpoints fits in 64.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024), env = "OBSERVER_NFT_RECV_BUFFER_MIB")]
    pub nft_recv_buffer_mib: u32,
    /// Limit, in MiB, up to which the buffer doubles after each overflow
    /// (an overflow costs a re-read of the rulesets and the change's exact
    /// time). Never below the buffer at start.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=2047), env = "OBSERVER_NFT_RECV_BUFFER_MAX_MIB")]
    pub nft_recv_buffer_max_mib: u32,
    /// Largest iptables-legacy nat table, in MiB, that the detector copies
    /// to re-read it (about 1.9 KiB per endpoint; the copy counts against
    /// the agent's memory limit). A larger table is not read and its
    /// changes are not timed (a warning says so).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096), env = "OBSERVER_LEGACY_TABLE_MAX_MIB")]
    pub legacy_table_max_mib: u32,
}

impl DataplaneArgs {
    pub fn limits(&self) -> Limits {
        let mib = |m: u32| i32::try_from(m << 20).unwrap_or(i32::MAX);
        let initial = mib(self.nft_recv_buffer_mib);
        Limits {
            nft_buffer: RecvBuffer {
                initial,
                max: mib(self.nft_recv_buffer_max_mib).max(initial),
            },
            legacy_table_max_bytes: (self.legacy_table_max_mib as usize) << 20,
        }
    }
}
