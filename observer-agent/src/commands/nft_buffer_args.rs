//! The nf_tables notification buffer's flags, shared by `run` and `observe`.

use clap::Args;

use crate::dataplane::RecvBuffer;

#[derive(Args, Clone, Debug)]
pub struct NftBufferArgs {
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
}

impl NftBufferArgs {
    pub fn buffer(&self) -> RecvBuffer {
        let mib = |m: u32| i32::try_from(m << 20).unwrap_or(i32::MAX);
        let initial = mib(self.nft_recv_buffer_mib);
        RecvBuffer {
            initial,
            max: mib(self.nft_recv_buffer_max_mib).max(initial),
        }
    }
}
