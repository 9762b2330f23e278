//! The one wall-clock time type of agents and the aggregator.

use std::{
    fmt,
    ops::{Add, Sub},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch, wall clock. Signed so that differences
/// and clock offsets need no casts; `u64` on the wire (times before 1970
/// are refused there).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixNanos(i64);

const NANOS_PER_SECOND: f64 = 1e9;

impl UnixNanos {
    pub const fn from_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// The wall clock now (the epoch if the clock is before it).
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Whole seconds since the epoch (as the Kubernetes API writes times).
    pub const fn from_seconds(seconds: i64) -> Self {
        Self(seconds.saturating_mul(1_000_000_000))
    }

    /// `self - earlier` in seconds (negative when `self` is earlier).
    pub fn seconds_since(self, earlier: Self) -> f64 {
        (self - earlier) as f64 / NANOS_PER_SECOND
    }

    /// The wire form: `None` for times before the epoch.
    pub fn to_wire(self) -> Option<u64> {
        u64::try_from(self.0).ok()
    }

    /// From the wire form: `None` beyond `i64::MAX` nanoseconds (year 2262).
    pub fn from_wire(nanos: u64) -> Option<Self> {
        i64::try_from(nanos).ok().map(Self)
    }
}

impl From<SystemTime> for UnixNanos {
    fn from(t: SystemTime) -> Self {
        let nanos = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Self(nanos)
    }
}

impl From<UnixNanos> for SystemTime {
    fn from(t: UnixNanos) -> Self {
        match u64::try_from(t.0) {
            Ok(n) => SystemTime::UNIX_EPOCH + Duration::from_nanos(n),
            Err(_) => SystemTime::UNIX_EPOCH - Duration::from_nanos(t.0.unsigned_abs()),
        }
    }
}

/// Shifting by a signed number of nanoseconds (a clock offset, a window).
impl Add<i64> for UnixNanos {
    type Output = Self;

    fn add(self, nanos: i64) -> Self {
        Self(self.0.saturating_add(nanos))
    }
}

impl Sub<i64> for UnixNanos {
    type Output = Self;

    fn sub(self, nanos: i64) -> Self {
        Self(self.0.saturating_sub(nanos))
    }
}

/// Later by a duration (a timeout, a window), saturating.
impl Add<Duration> for UnixNanos {
    type Output = Self;

    fn add(self, d: Duration) -> Self {
        self + i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
    }
}

/// Earlier by a duration (the start of a retention window), saturating.
impl Sub<Duration> for UnixNanos {
    type Output = Self;

    fn sub(self, d: Duration) -> Self {
        self - i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
    }
}

/// The signed distance between two times, in nanoseconds.
impl Sub for UnixNanos {
    type Output = i64;

    fn sub(self, earlier: Self) -> i64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for UnixNanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_is_signed() {
        let t = UnixNanos::from_nanos(1_000);
        assert_eq!(t + 500, UnixNanos::from_nanos(1_500));
        assert_eq!(t - 2_000, UnixNanos::from_nanos(-1_000));
        assert_eq!(UnixNanos::from_nanos(400) - t, -600);
        assert_eq!(
            UnixNanos::from_nanos(i64::MAX) + 1,
            UnixNanos::from_nanos(i64::MAX)
        );
        assert_eq!(
            UnixNanos::from_seconds(3).seconds_since(UnixNanos::from_seconds(1)),
            2.0
        );
        assert_eq!(t + Duration::from_micros(1), UnixNanos::from_nanos(2_000));
        assert_eq!(t - Duration::from_micros(2), UnixNanos::from_nanos(-1_000));
        assert_eq!(t - Duration::MAX, UnixNanos::from_nanos(1_000 - i64::MAX));
    }

    #[test]
    fn the_wire_form_refuses_what_does_not_fit() {
        assert_eq!(UnixNanos::from_nanos(-1).to_wire(), None);
        assert_eq!(UnixNanos::from_wire(u64::MAX), None);
        assert_eq!(
            UnixNanos::from_wire(7).and_then(UnixNanos::to_wire),
            Some(7)
        );
    }

    #[test]
    fn system_time_round_trips() {
        let now = UnixNanos::now();
        assert!(now > UnixNanos::from_seconds(1_600_000_000));
        assert_eq!(UnixNanos::from(SystemTime::from(now)), now);
        assert_eq!(serde_json::to_string(&now).unwrap(), now.to_string());
    }
}
