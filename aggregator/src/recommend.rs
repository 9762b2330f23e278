//! Turns stored latencies into a preStop recommendation.

use serde::Serialize;

use crate::stats;
use crate::store::{Samples, Scope};

/// Parameters of one recommendation.
#[derive(Clone, Debug)]
pub struct Request {
    pub cluster: String,
    pub scope: Scope,
    pub quantile: f64,
    pub confidence: f64,
    pub margin_seconds: f64,
    pub window_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub scope: ScopeView,
    /// None when there are no samples at all.
    pub pre_stop_seconds: Option<u64>,
    pub quantile: f64,
    pub confidence: f64,
    pub margin_seconds: f64,
    pub samples: usize,
    /// More complete deletions needed for a full-confidence bound; 0 when enough.
    pub samples_needed: usize,
    pub window_seconds: u64,
    pub observed_p50_seconds: Option<f64>,
    pub observed_p99_seconds: Option<f64>,
    pub observed_max_seconds: Option<f64>,
    pub low_confidence: bool,
    pub reason: String,
    pub lifecycle: Option<Lifecycle>,
    pub keep_alive: KeepAlive,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScopeView {
    pub cluster: String,
    pub namespace: Option<String>,
    pub service: Option<String>,
}

/// `{"preStop":{"sleep":{"seconds":N}}}`, ready to paste under a container.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub pre_stop: PreStop,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreStop {
    pub sleep: Sleep,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sleep {
    pub seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeepAlive {
    pub aborted_connections: u64,
    pub finding: Option<String>,
}

pub fn recommend(req: &Request, samples: &Samples) -> Recommendation {
    let s = &samples.latencies;
    let n = s.len();
    let needed_total = stats::min_samples(req.quantile, req.confidence);
    let bound = stats::upper_bound(s, req.quantile, req.confidence);
    let max = s.last().copied();
    let q_pct = format_pct(req.quantile);
    let c_pct = format_pct(req.confidence);
    let (base, low_confidence, reason) = match (bound, max) {
        (Some(b), _) => (
            Some(b),
            false,
            format!(
                "{n} complete deletions: with {c_pct}% confidence, p{q_pct} full-propagation latency is at most {b:.3}s; {:.3}s margin added and rounded up.",
                req.margin_seconds
            ),
        ),
        (None, Some(m)) => (
            Some(m),
            true,
            format!(
                "Only {n} complete deletions, {} more needed to bound p{q_pct} with {c_pct}% confidence; using the largest observed latency {m:.3}s plus {:.3}s margin.",
                needed_total - n,
                req.margin_seconds
            ),
        ),
        (None, None) => (
            None,
            true,
            format!(
                "No complete deletions measured in this scope yet; {needed_total} are needed to bound p{q_pct} with {c_pct}% confidence."
            ),
        ),
    };
    let pre_stop_seconds = base.map(|b| (b + req.margin_seconds).max(0.0).ceil() as u64);
    let aborted = samples.aborted_connections;
    Recommendation {
        scope: ScopeView {
            cluster: req.cluster.clone(),
            namespace: req.scope.namespace.clone(),
            service: req.scope.service.clone(),
        },
        pre_stop_seconds,
        quantile: req.quantile,
        confidence: req.confidence,
        margin_seconds: req.margin_seconds,
        samples: n,
        samples_needed: needed_total.saturating_sub(n),
        window_seconds: req.window_seconds,
        observed_p50_seconds: stats::nearest_rank(s, 0.5),
        observed_p99_seconds: stats::nearest_rank(s, 0.99),
        observed_max_seconds: max,
        low_confidence,
        reason,
        lifecycle: pre_stop_seconds.map(|seconds| Lifecycle {
            pre_stop: PreStop {
                sleep: Sleep { seconds },
            },
        }),
        keep_alive: KeepAlive {
            aborted_connections: aborted,
            finding: (aborted > 0).then(|| {
                format!(
                    "{aborted} established connections were reset when pods shut down: the server closes keep-alive connections abruptly; close idle connections gracefully (Connection: close / GOAWAY) during the preStop delay."
                )
            }),
        },
    }
}

/// 0.99 -> "99", 0.999 -> "99.9".
fn format_pct(p: f64) -> String {
    let s = format!("{:.4}", p * 100.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Request {
        Request {
            cluster: "c".into(),
            scope: Scope::default(),
            quantile: 0.99,
            confidence: 0.95,
            margin_seconds: 1.0,
            window_seconds: 60,
        }
    }

    #[test]
    fn no_samples_gives_no_number() {
        let r = recommend(&req(), &Samples::default());
        assert_eq!(r.pre_stop_seconds, None);
        assert_eq!(r.lifecycle, None);
        assert!(r.low_confidence);
        assert_eq!(r.samples_needed, 299);
    }

    #[test]
    fn few_samples_use_max_plus_margin() {
        let s = Samples {
            latencies: vec![0.5, 1.2, 2.3],
            aborted_connections: 0,
        };
        let r = recommend(&req(), &s);
        assert_eq!(r.pre_stop_seconds, Some(4)); // ceil(2.3 + 1)
        assert!(r.low_confidence);
        assert_eq!(r.samples_needed, 296);
        assert_eq!(r.observed_max_seconds, Some(2.3));
        assert_eq!(r.keep_alive.finding, None);
    }

    #[test]
    fn enough_samples_use_the_order_statistic() {
        // 0.01 .. 3.00: n = 300, k = 299 for p99 at 95%.
        let latencies: Vec<f64> = (1..=300).map(|i| f64::from(i) / 100.0).collect();
        let s = Samples {
            latencies,
            aborted_connections: 3,
        };
        let r = recommend(&req(), &s);
        assert!(!r.low_confidence);
        assert_eq!(r.samples_needed, 0);
        assert_eq!(r.pre_stop_seconds, Some(4)); // ceil(2.99 + 1)
        assert_eq!(r.observed_p50_seconds, Some(1.5));
        assert!(r.keep_alive.finding.is_some());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["lifecycle"]["preStop"]["sleep"]["seconds"], 4);
        assert_eq!(json["keepAlive"]["abortedConnections"], 3);
    }

    #[test]
    fn percent_formatting() {
        assert_eq!(format_pct(0.99), "99");
        assert_eq!(format_pct(0.999), "99.9");
        assert_eq!(format_pct(0.5), "50");
    }
}
