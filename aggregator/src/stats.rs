//! Distribution-free statistics for the recommendation: an upper confidence
//! bound on a quantile from order statistics, and plain empirical quantiles.
//!
//! For n independent samples of a continuous distribution, the k-th smallest
//! sample X(k) is at least the true q-quantile with probability
//! P(Binomial(n, q) <= k - 1). The bound is X(k) for the smallest k where
//! that probability reaches the confidence level; no distribution is assumed.

/// The rank k (1-based) of the order statistic that bounds the `quantile`
/// from above with probability `confidence`, or `None` when `n` samples are
/// too few for any order statistic to do so.
pub fn upper_bound_rank(n: usize, quantile: f64, confidence: f64) -> Option<usize> {
    let mut cdf = 0.0;
    for (i, p) in binomial_pmf(n, quantile).enumerate() {
        cdf += p;
        // P(Bin <= i) >= confidence  =>  k - 1 = i.
        if cdf >= confidence {
            let k = i + 1;
            return (k <= n).then_some(k);
        }
    }
    None
}

/// The smallest sample count for which [`upper_bound_rank`] exists: even the
/// largest sample bounds the quantile only when 1 - q^n >= confidence.
pub fn min_samples(quantile: f64, confidence: f64) -> usize {
    let mut n = ((1.0 - confidence).ln() / quantile.ln()).ceil().max(1.0) as usize;
    // Correct the float estimate against the exact criterion both ways.
    while n > 1 && upper_bound_rank(n - 1, quantile, confidence).is_some() {
        n -= 1;
    }
    while upper_bound_rank(n, quantile, confidence).is_none() {
        n += 1;
    }
    n
}

/// The upper confidence bound itself: the k-th smallest of `sorted`
/// (ascending), or `None` when there are too few samples.
pub fn upper_bound(sorted: &[f64], quantile: f64, confidence: f64) -> Option<f64> {
    upper_bound_rank(sorted.len(), quantile, confidence).map(|k| sorted[k - 1])
}

/// The upper confidence bound when `censored` more samples are known only
/// to exceed every value in `sorted` (right-censored: ranked as +infinity).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CensoredBound {
    /// The bounding order statistic is a measured value.
    Value(f64),
    /// It falls among the censored samples: the quantile is not bounded by
    /// anything measured.
    Censored,
    /// Too few samples for any order statistic to bound the quantile.
    TooFew,
}

pub fn upper_bound_censored(
    sorted: &[f64],
    censored: usize,
    quantile: f64,
    confidence: f64,
) -> CensoredBound {
    match upper_bound_rank(sorted.len() + censored, quantile, confidence) {
        None => CensoredBound::TooFew,
        Some(k) if k <= sorted.len() => CensoredBound::Value(sorted[k - 1]),
        Some(_) => CensoredBound::Censored,
    }
}

/// Empirical quantile by nearest rank (the smallest sample with at least a
/// fraction `p` of the samples at or below it). `sorted` must be ascending.
pub fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// Probabilities P(Binomial(n, q) = i) for i = 0..=n, computed in log space
/// so large n neither underflows nor overflows.
fn binomial_pmf(n: usize, q: f64) -> impl Iterator<Item = f64> {
    let ln_q = q.ln();
    let ln_not_q = (1.0 - q).ln();
    let mut ln_coeff = 0.0_f64; // ln C(n, i)
    (0..=n).map(move |i| {
        if i > 0 {
            ln_coeff += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        (ln_coeff + i as f64 * ln_q + (n - i) as f64 * ln_not_q).exp()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Exact binomial CDF by direct summation with f64 binomial coefficients
    /// (fine for the small n the property tests use).
    fn brute_cdf(n: usize, q: f64, k: usize) -> f64 {
        let mut total = 0.0;
        for i in 0..=k.min(n) {
            let mut c = 1.0_f64;
            for j in 0..i {
                c = c * (n - j) as f64 / (j + 1) as f64;
            }
            total += c * q.powi(i as i32) * (1.0 - q).powi((n - i) as i32);
        }
        total
    }

    #[test]
    fn p99_at_95_percent_needs_299_samples() {
        // 1 - 0.99^299 = 0.9504..., 1 - 0.99^298 = 0.9499...
        assert_eq!(min_samples(0.99, 0.95), 299);
        assert_eq!(upper_bound_rank(298, 0.99, 0.95), None);
        assert_eq!(upper_bound_rank(299, 0.99, 0.95), Some(299));
    }

    #[test]
    fn median_bound_matches_textbook_value() {
        // n = 20, q = 0.5, 95%: P(Bin(20, .5) <= 13) = 0.9423, <= 14 = 0.9793.
        assert_eq!(upper_bound_rank(20, 0.5, 0.95), Some(15));
    }

    #[test]
    fn nearest_rank_quantiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&s, 0.5), Some(50.0));
        assert_eq!(nearest_rank(&s, 0.99), Some(99.0));
        assert_eq!(nearest_rank(&s, 1.0), Some(100.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn bound_covers_true_quantile_at_stated_rate() {
        // Uniform(0,1) samples: the true q-quantile is q. Deterministic LCG so
        // the test is reproducible.
        let (q, conf, n, trials) = (0.9, 0.95, 60, 2000);
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut covered = 0;
        for _ in 0..trials {
            let mut s: Vec<f64> = (0..n).map(|_| next()).collect();
            s.sort_by(f64::total_cmp);
            if upper_bound(&s, q, conf).unwrap() >= q {
                covered += 1;
            }
        }
        let rate = f64::from(covered) / f64::from(trials);
        assert!(rate >= conf - 0.02, "coverage {rate} below {conf}");
    }

    proptest! {
        #[test]
        fn rank_is_the_smallest_k_meeting_confidence(
            n in 1usize..150,
            q in 0.05f64..0.995,
            conf in 0.5f64..0.995,
        ) {
            let k = upper_bound_rank(n, q, conf);
            // Find it by brute force: smallest k in 1..=n with CDF(k-1) >= conf.
            let brute = (1..=n).find(|&k| brute_cdf(n, q, k - 1) >= conf);
            // Skip the knife-edge where the two summation orders may round
            // to different sides of the threshold.
            let edge = (0..=n).any(|i| (brute_cdf(n, q, i) - conf).abs() < 1e-9);
            prop_assume!(!edge);
            prop_assert_eq!(k, brute);
        }

        #[test]
        fn bound_is_a_sample_at_or_above_the_empirical_quantile(
            mut samples in proptest::collection::vec(0.0f64..100.0, 1..400),
            q in 0.5f64..0.995,
            conf in 0.5f64..0.99,
        ) {
            samples.sort_by(f64::total_cmp);
            if let Some(b) = upper_bound(&samples, q, conf) {
                prop_assert!(samples.contains(&b));
                prop_assert!(b >= nearest_rank(&samples, q).unwrap());
            } else {
                prop_assert!(samples.len() < min_samples(q, conf));
            }
        }

        #[test]
        fn min_samples_is_exact(q in 0.5f64..0.995, conf in 0.5f64..0.99) {
            let n = min_samples(q, conf);
            prop_assert!(upper_bound_rank(n, q, conf).is_some());
            prop_assert!(n == 1 || upper_bound_rank(n - 1, q, conf).is_none());
        }
    }

    proptest! {
        /// Against brute force: the censored samples as +infinity among the
        /// measured ones, then the plain order statistic.
        #[test]
        fn censored_samples_rank_above_every_measured_one(
            mut measured in proptest::collection::vec(0.0f64..100.0, 0..400),
            censored in 0usize..40,
            quantile in prop_oneof![Just(0.5), Just(0.9), Just(0.99)],
            confidence in prop_oneof![Just(0.5), Just(0.9), Just(0.95)],
        ) {
            measured.sort_by(f64::total_cmp);
            let mut all = measured.clone();
            all.extend(std::iter::repeat_n(f64::INFINITY, censored));
            let brute = upper_bound(&all, quantile, confidence);
            let got = upper_bound_censored(&measured, censored, quantile, confidence);
            match brute {
                None => prop_assert_eq!(got, CensoredBound::TooFew),
                Some(v) if v.is_infinite() => prop_assert_eq!(got, CensoredBound::Censored),
                Some(v) => prop_assert_eq!(got, CensoredBound::Value(v)),
            }
            // Censoring never lowers the bound.
            if let (CensoredBound::Value(with), Some(without)) =
                (got, upper_bound(&measured, quantile, confidence))
            {
                prop_assert!(with >= without);
            }
        }
    }
}
