//! The injected per-node programming delay: the ground truth the observer
//! must find. A spec reads `MIN..MAX[,outliers=P@MIN..MAX]`, for example
//! `20ms..400ms,outliers=0.1@2s..4s`: uniform in the base range, and with
//! probability P uniform in the outlier range instead (the slow node or
//! the kube-proxy stuck behind a big sync).

use std::{fmt, str::FromStr, time::Duration};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "bad delay spec `{spec}`: {reason} (expected MIN..MAX[,outliers=P@MIN..MAX], e.g. 20ms..400ms,outliers=0.1@2s..4s)"
)]
pub struct DelaySpecError {
    spec: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayDistribution {
    pub base: (Duration, Duration),
    /// Probability and range of a slow outlier.
    pub outliers: Option<(f64, (Duration, Duration))>,
}

impl DelayDistribution {
    /// The largest delay it can produce.
    pub fn max(&self) -> Duration {
        self.outliers
            .map_or(self.base.1, |(_, (_, hi))| hi.max(self.base.1))
    }

    pub fn sample(&self, rng: &mut Rng) -> Duration {
        let range = match self.outliers {
            Some((p, range)) if rng.unit() < p => range,
            _ => self.base,
        };
        let (lo, hi) = (range.0.as_nanos() as f64, range.1.as_nanos() as f64);
        Duration::from_nanos((lo + (hi - lo) * rng.unit()) as u64)
    }
}

impl Default for DelayDistribution {
    fn default() -> Self {
        "20ms..400ms,outliers=0.15@1s..2s"
            .parse()
            .expect("valid default")
    }
}

/// A duration flag: `250ms`, `1.5s`.
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .ok_or_else(|| format!("bad duration `{s}`: use a number with ms or s, e.g. 250ms, 1.5s"))
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .filter(|v| *v >= 0.0)
            .map(|v| Duration::from_secs_f64(v / 1000.0));
    }
    s.strip_suffix('s')?
        .parse::<f64>()
        .ok()
        .filter(|v| *v >= 0.0)
        .map(Duration::from_secs_f64)
}

fn parse_range(s: &str) -> Option<(Duration, Duration)> {
    let (lo, hi) = s.split_once("..")?;
    let (lo, hi) = (parse_duration(lo)?, parse_duration(hi)?);
    (lo <= hi).then_some((lo, hi))
}

impl FromStr for DelayDistribution {
    type Err = DelaySpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason| DelaySpecError {
            spec: spec.to_owned(),
            reason,
        };
        let (base, rest) = match spec.split_once(',') {
            Some((b, r)) => (b, Some(r)),
            None => (spec, None),
        };
        let base = parse_range(base).ok_or_else(|| err("base range"))?;
        let outliers = match rest {
            None => None,
            Some(rest) => {
                let (p, range) = rest
                    .trim()
                    .strip_prefix("outliers=")
                    .and_then(|r| r.split_once('@'))
                    .ok_or_else(|| err("outliers"))?;
                let p: f64 = p.parse().map_err(|_| err("outlier probability"))?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(err("outlier probability must be in 0..=1"));
                }
                Some((p, parse_range(range).ok_or_else(|| err("outlier range"))?))
            }
        };
        Ok(DelayDistribution { base, outliers })
    }
}

impl fmt::Display for DelayDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(f, "{}ms..{}ms", ms(self.base.0), ms(self.base.1))?;
        if let Some((p, (lo, hi))) = self.outliers {
            write!(f, ",outliers={p}@{}ms..{}ms", ms(lo), ms(hi))?;
        }
        Ok(())
    }
}

/// SplitMix64: small, seedable, so a lab run can be repeated exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let d: DelayDistribution = "20ms..400ms,outliers=0.1@2s..4s".parse().unwrap();
        assert_eq!(
            d.base,
            (Duration::from_millis(20), Duration::from_millis(400))
        );
        assert_eq!(
            d.outliers,
            Some((0.1, (Duration::from_secs(2), Duration::from_secs(4))))
        );
        assert_eq!(d.max(), Duration::from_secs(4));
        assert_eq!(d.to_string().parse::<DelayDistribution>().unwrap(), d);
        let plain: DelayDistribution = "5ms..5ms".parse().unwrap();
        assert_eq!(plain.outliers, None);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "5ms",
            "5..6",
            "9ms..1ms",
            "1ms..2ms,outliers=2@1s..2s",
            "1ms..2ms,x=1",
            "-1ms..2ms",
        ] {
            assert!(bad.parse::<DelayDistribution>().is_err(), "{bad}");
        }
    }

    #[test]
    fn samples_stay_in_range_and_outliers_occur_at_their_rate() {
        let d: DelayDistribution = "10ms..20ms,outliers=0.25@1s..2s".parse().unwrap();
        let mut rng = Rng::new(7);
        let samples: Vec<Duration> = (0..4000).map(|_| d.sample(&mut rng)).collect();
        let slow = samples
            .iter()
            .filter(|s| **s >= Duration::from_secs(1))
            .count();
        assert!(samples.iter().all(|s| {
            (Duration::from_millis(10)..=Duration::from_millis(20)).contains(s)
                || (Duration::from_secs(1)..=Duration::from_secs(2)).contains(s)
        }));
        assert!(
            (800..1200).contains(&slow),
            "{slow} outliers of 4000 at p=0.25"
        );
    }
}
