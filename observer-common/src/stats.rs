//! Indices of the per-CPU counters in the `STATS` array.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Events written to the ring buffer.
    Emitted = 0,
    /// Events dropped because the ring buffer was full.
    Lost = 1,
    /// Relevant transitions whose addresses were not watched.
    Filtered = 2,
}

impl Stat {
    pub const ALL: [Stat; 3] = [Stat::Emitted, Stat::Lost, Stat::Filtered];
}

pub const STATS_LEN: u32 = 3;
