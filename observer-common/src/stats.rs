//! Indices of the per-CPU counters in the `STATS` array.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Events sent towards user space: written to the ring buffer or queued
    /// in a CPU's batch for it.
    Emitted = 0,
    /// Emitted events dropped because the ring buffer was full.
    Lost = 1,
    /// Relevant transitions whose addresses were not watched.
    Filtered = 2,
}

impl Stat {
    pub const ALL: [Stat; 3] = [Stat::Emitted, Stat::Lost, Stat::Filtered];
}

pub const STATS_LEN: u32 = 3;
