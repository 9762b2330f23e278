//! The NTP-style offset estimate from one exchange with the aggregator.

/// `offset` is added to agent time to get aggregator time; the true offset
/// lies within +- `uncertainty` (half the network round trip, the part of
/// the exchange whose asymmetry cannot be known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub offset_ns: i64,
    pub uncertainty_ns: u64,
}

/// t1: agent sends, t2: aggregator receives, t3: aggregator replies, t4:
/// agent receives (t1, t4 agent clock; t2, t3 aggregator clock).
pub fn estimate(t1: u64, t2: u64, t3: u64, t4: u64) -> Estimate {
    let (t1, t2, t3, t4) = (
        i128::from(t1),
        i128::from(t2),
        i128::from(t3),
        i128::from(t4),
    );
    let offset = ((t2 - t1) + (t3 - t4)) / 2;
    let round_trip = ((t4 - t1) - (t3 - t2)).max(0);
    Estimate {
        offset_ns: offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
        uncertainty_ns: (round_trip / 2) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_exchange() {
        // Aggregator 1 s ahead; 10 ms each way; 1 ms processing.
        let s = 1_000_000_000u64;
        let e = estimate(
            100 * s,
            101 * s + 10_000_000,
            101 * s + 11_000_000,
            100 * s + 21_000_000,
        );
        assert_eq!(e.offset_ns, 1_000_000_000);
        assert_eq!(e.uncertainty_ns, 10_000_000);
    }

    #[test]
    fn agent_ahead_gives_negative_offset() {
        let e = estimate(2_000, 1_000, 1_000, 2_000);
        assert_eq!(e.offset_ns, -1_000);
        assert_eq!(e.uncertainty_ns, 0);
    }
}
