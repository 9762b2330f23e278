//! Converting kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall
//! clock nanoseconds.
//!
//! Method: read CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_REALTIME back to back
//! and take the monotonic reading against the midpoint of the two realtime
//! readings; the offset's error is at most half the gap between them (a few
//! hundred nanoseconds, plus the wall clock's own error against true time).
//! The wall clock can be stepped (NTP, manual), so the offset is measured
//! again when older than [`WallClock::REFRESH`]; the best (narrowest) of a few
//! samples is kept each time.

use std::{collections::VecDeque, time::Duration};

use nix::time::{ClockId, clock_gettime};
use observer_proto::{ClockEstimate, UnixNanos};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offset {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, nanoseconds.
    pub realtime_minus_monotonic_ns: i128,
    /// Bound on the error of the offset.
    pub error_ns: u64,
    /// CLOCK_MONOTONIC when measured.
    pub measured_at_mono_ns: u64,
}

impl Offset {
    /// Converts a CLOCK_MONOTONIC timestamp into Unix nanoseconds.
    pub fn to_unix_nanos(&self, mono_ns: u64) -> UnixNanos {
        let wall = i128::from(mono_ns) + self.realtime_minus_monotonic_ns;
        UnixNanos::from_nanos(i64::try_from(wall.max(0)).unwrap_or(i64::MAX))
    }

    /// Measures the offset, keeping the narrowest of `samples` brackets.
    pub fn measure(samples: usize) -> Offset {
        (0..samples.max(1))
            .map(|_| {
                let before = read(ClockId::CLOCK_REALTIME);
                let mono = read(ClockId::CLOCK_MONOTONIC);
                let after = read(ClockId::CLOCK_REALTIME);
                Self::from_bracket(before, mono, after)
            })
            .min_by_key(|o| o.error_ns)
            .expect("at least one sample")
    }

    /// The offset from one bracket: realtime before, monotonic, realtime after.
    pub fn from_bracket(before_real: i128, mono: i128, after_real: i128) -> Offset {
        let mid_real = before_real + (after_real - before_real) / 2;
        Offset {
            realtime_minus_monotonic_ns: mid_real - mono,
            error_ns: u64::try_from((after_real - before_real).unsigned_abs() / 2 + 1)
                .unwrap_or(u64::MAX),
            measured_at_mono_ns: u64::try_from(mono.max(0)).unwrap_or(0),
        }
    }
}

fn read(clock: ClockId) -> i128 {
    let ts = clock_gettime(clock).expect("CLOCK_REALTIME and CLOCK_MONOTONIC always exist");
    i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
}

/// Current CLOCK_MONOTONIC in nanoseconds (the eBPF programs' time base).
pub fn monotonic_now_ns() -> u64 {
    u64::try_from(read(ClockId::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// An offset that refreshes itself when it gets old.
#[derive(Debug)]
pub struct WallClock {
    offset: Offset,
}

impl WallClock {
    pub const REFRESH: Duration = Duration::from_secs(1);
    const SAMPLES: usize = 5;

    pub fn new() -> Self {
        WallClock {
            offset: Offset::measure(Self::SAMPLES),
        }
    }

    /// Converts, re-measuring first if the offset is older than [`Self::REFRESH`].
    pub fn to_unix_nanos(&mut self, mono_ns: u64) -> UnixNanos {
        let now = monotonic_now_ns();
        if now.saturating_sub(self.offset.measured_at_mono_ns) > Self::REFRESH.as_nanos() as u64 {
            self.offset = Offset::measure(Self::SAMPLES);
        }
        self.offset.to_unix_nanos(mono_ns)
    }

    pub fn offset(&self) -> Offset {
        self.offset
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// This agent's clock offset to the aggregator from its recent exchanges:
/// the one with the narrowest round trip, its uncertainty widened by how
/// far the two clocks may have drifted apart since (NTP's minimum filter).
/// One exchange delayed on a loaded node, whose asymmetric round trip puts
/// its offset off by up to half of it, no longer moves every timestamp.
#[derive(Debug, Default)]
pub struct ExchangeFilter {
    recent: VecDeque<(UnixNanos, ClockEstimate)>,
    /// The wait before the next quick burst while the estimate is coarse.
    retry: Duration,
}

impl ExchangeFilter {
    /// Exchanges in one burst: back to back, so that at least one usually
    /// finds the aggregator's low-priority runtime awake on a loaded machine
    /// (a reply that waited for a thread biases the offset by half the wait).
    pub const BURST: usize = 4;
    /// Exchanges kept (eight bursts: at the aggregator's 30 s interval,
    /// four minutes).
    const KEPT: usize = 8 * Self::BURST;
    /// Drift allowed between two computer clocks, parts per million.
    const DRIFT_PPM: u64 = 100;
    /// An estimate coarser than this is refined by another burst soon.
    const NARROW_NS: u64 = 1_000_000;
    /// The first quick burst's wait; each further one waits twice as long.
    const FIRST_RETRY: Duration = Duration::from_secs(1);

    /// How long until the next burst, `best` being the estimate after the
    /// last one: `interval` when it is narrow. While it is not, sooner:
    /// the first bursts meet a machine busy starting every agent, and their
    /// coarse offset would otherwise shift every time reported for a whole
    /// interval (within its stated uncertainty, but by milliseconds). The
    /// wait starts at a second and doubles up to `interval`.
    pub fn next_burst(&mut self, best: ClockEstimate, interval: Duration) -> Duration {
        if best.uncertainty_ns <= Self::NARROW_NS {
            self.retry = Self::FIRST_RETRY;
            return interval;
        }
        let wait = self.retry.max(Self::FIRST_RETRY).min(interval);
        self.retry = wait * 2;
        wait
    }

    /// Adds the exchange finished at `at` (agent clock); returns the best
    /// estimate now.
    pub fn add(&mut self, at: UnixNanos, e: ClockEstimate) -> ClockEstimate {
        if self.recent.len() == Self::KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((at, e));
        self.recent
            .iter()
            .map(|&(t, e)| ClockEstimate {
                offset_ns: e.offset_ns,
                uncertainty_ns: e.uncertainty_ns.saturating_add(
                    (at - t).unsigned_abs().saturating_mul(Self::DRIFT_PPM) / 1_000_000,
                ),
            })
            .min_by_key(|e| e.uncertainty_ns)
            .unwrap_or(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bracket_midpoint_and_error() {
        let o = Offset::from_bracket(1_000_000, 400, 1_000_200);
        assert_eq!(o.realtime_minus_monotonic_ns, 1_000_100 - 400);
        assert_eq!(o.error_ns, 101);
        assert_eq!(o.to_unix_nanos(500), UnixNanos::from_nanos(1_000_200));
    }

    #[test]
    fn converted_monotonic_now_matches_system_time() {
        let offset = Offset::measure(5);
        let converted = offset.to_unix_nanos(monotonic_now_ns());
        let diff = (converted - UnixNanos::now()).unsigned_abs();
        // Two clock reads apart; far below the millisecond the project measures in.
        assert!(diff < 1_000_000, "conversion off by {diff} ns");
        assert!(
            offset.error_ns < 1_000_000,
            "bracket too wide: {}",
            offset.error_ns
        );
    }

    #[test]
    fn negative_results_clamp_to_zero() {
        let o = Offset::from_bracket(0, 1_000, 0);
        assert_eq!(o.to_unix_nanos(0), UnixNanos::from_nanos(0));
    }

    fn estimate(offset_ns: i64, uncertainty_ns: u64) -> ClockEstimate {
        ClockEstimate {
            offset_ns,
            uncertainty_ns,
        }
    }

    #[test]
    fn a_delayed_exchange_does_not_replace_a_narrow_one() {
        let mut f = ExchangeFilter::default();
        let t = UnixNanos::from_seconds(1_000);
        assert_eq!(f.add(t, estimate(10_000, 50_000)), estimate(10_000, 50_000));
        // 30 s later a loaded node's exchange: 600 ms round trip, offset
        // off by 300 ms. The narrow one stands, widened by 30 s of drift.
        let best = f.add(t + 30_000_000_000, estimate(300_000_000, 300_000_000));
        assert_eq!(best, estimate(10_000, 50_000 + 3_000_000));
    }

    #[test]
    fn a_coarse_estimate_is_refined_sooner_backing_off_to_the_interval() {
        let mut f = ExchangeFilter::default();
        let interval = Duration::from_secs(30);
        let coarse = estimate(13_000_000, 14_000_000);
        let waits: Vec<u64> = (0..7)
            .map(|_| f.next_burst(coarse, interval).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(f.next_burst(estimate(0, 400_000), interval), interval);
        assert_eq!(
            f.next_burst(coarse, interval),
            Duration::from_secs(1),
            "coarse again: quick again"
        );
    }

    #[test]
    fn drift_lets_a_fresh_exchange_win_and_old_ones_leave() {
        let mut f = ExchangeFilter::default();
        let t = UnixNanos::from_seconds(1_000);
        f.add(t, estimate(0, 1_000_000));
        // Four minutes on, drift (24 ms) makes the old one wider than a
        // fresh 5 ms exchange.
        let best = f.add(t + 240_000_000_000, estimate(7, 5_000_000));
        assert_eq!(best, estimate(7, 5_000_000));
        // Only the last `KEPT` are kept: the narrow first one is gone.
        let mut f = ExchangeFilter::default();
        f.add(t, estimate(1, 1));
        for i in 1..=ExchangeFilter::KEPT as i64 {
            f.add(t + i * 1_000, estimate(2, 900_000));
        }
        assert_eq!(f.add(t + 9_000, estimate(3, 950_000)).offset_ns, 2);
    }
}
