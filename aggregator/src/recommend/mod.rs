//! Turns stored latencies into a preStop recommendation ([`recommend`]);
//! [`service`] answers the API's questions with it, [`cache`] reuses its
//! answers.

pub mod cache;
pub mod service;

use observer_proto::api::{
    Coverage, KeepAlive, Lifecycle, PreStop, Recommendation, RouterKindSummary, RouterRef,
    ScopeView, Sleep,
};

use crate::stats::{self, CensoredBound};
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
    /// Below this measured share of node-deletions, low-confidence.
    pub min_coverage: f64,
}

pub fn recommend(req: &Request, samples: &Samples) -> Recommendation {
    let s = &samples.latencies;
    let n = s.len() + samples.censored.len();
    let needed_total = stats::min_samples(req.quantile, req.confidence);
    let q_pct = format_pct(req.quantile);
    let c_pct = format_pct(req.confidence);
    let (base, at_least, mut low_confidence, mut reason) = bound(req, samples, &q_pct, &c_pct);
    if let Some(why) = low_coverage(req, &samples.coverage) {
        low_confidence = true;
        reason.push(' ');
        reason.push_str(&why);
    }
    if req.scope.exclude_external {
        reason.push_str(" External routers (no node, no pod) excluded.");
    }
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
        samples: count(n),
        samples_needed: count(needed_total.saturating_sub(n)),
        window_seconds: req.window_seconds,
        observed_p50_seconds: stats::nearest_rank(s, 0.5),
        observed_p99_seconds: stats::nearest_rank(s, 0.99),
        observed_max_seconds: s.last().copied(),
        low_confidence,
        at_least,
        censored: count(samples.censored.len()),
        coverage: samples.coverage,
        max_error_seconds: samples.max_error_seconds,
        reason,
        limiting_router: limiting_router(req, samples, at_least),
        by_router_kind: samples
            .by_router_kind
            .iter()
            .map(|(kind, v)| RouterKindSummary {
                kind: *kind,
                samples: count(v.len()),
                observed_p50_seconds: stats::nearest_rank(v, 0.5),
                observed_p99_seconds: stats::nearest_rank(v, 0.99),
                observed_max_seconds: v.last().copied(),
            })
            .collect(),
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

/// The latency the delay must cover before the margin, whether it is only
/// a lower bound ("at least"), whether it is low-confidence, and why.
/// Censored deletions rank above every measured one: they can make the
/// answer "at least", never smaller.
fn bound(
    req: &Request,
    samples: &Samples,
    q_pct: &str,
    c_pct: &str,
) -> (Option<f64>, bool, bool, String) {
    let (s, censored) = (&samples.latencies, &samples.censored);
    let n = s.len() + censored.len();
    let needed_total = stats::min_samples(req.quantile, req.confidence);
    // What censored deletions prove: propagation took longer than this.
    let beyond = censored
        .last()
        .copied()
        .map(|c| s.last().map_or(c, |m| m.max(c)));
    match stats::upper_bound_censored(s, censored.len(), req.quantile, req.confidence) {
        CensoredBound::Value(b) => (
            Some(b),
            false,
            false,
            format!(
                "{n} deletions ({} still routing at the timeout): with {c_pct}% confidence, p{q_pct} full-propagation latency, errors included, is at most {b:.3}s; {:.3}s margin added and rounded up.",
                censored.len(),
                req.margin_seconds
            ),
        ),
        CensoredBound::Censored | CensoredBound::TooFew if beyond.is_some() => {
            let t = beyond.unwrap_or_default();
            (
                Some(t),
                true,
                true,
                format!(
                    "{} of {n} deletions had a node still routing to the pod when they finished, {t:.3}s after their start: p{q_pct} full-propagation latency is not bounded by what was measured, and the delay must be at least {t:.3}s plus the margin. Find the nodes that did not stop routing (prestop_nodes_still_routing_total, /v1/deletions).",
                    censored.len()
                ),
            )
        }
        CensoredBound::Censored | CensoredBound::TooFew => match s.last() {
            Some(&m) => (
                Some(m),
                false,
                true,
                format!(
                    "Only {n} deletions, {} more needed to bound p{q_pct} with {c_pct}% confidence; using the largest observed latency, errors included, {m:.3}s plus {:.3}s margin.",
                    needed_total - n,
                    req.margin_seconds
                ),
            ),
            None => (
                None,
                false,
                true,
                format!(
                    "No deletions measured in this scope yet; {needed_total} are needed to bound p{q_pct} with {c_pct}% confidence."
                ),
            ),
        },
    }
}

/// The router of the deletion whose latency set the value: the censored
/// one that proves "at least", the order statistic's, or the largest.
fn limiting_router(req: &Request, samples: &Samples, at_least: bool) -> Option<RouterRef> {
    let (s, censored) = (&samples.latencies, &samples.censored);
    let of = |routers: &[Option<RouterRef>], i: usize| routers.get(i).cloned().flatten();
    let last_measured = || of(&samples.limiting_routers, s.len().checked_sub(1)?);
    if at_least {
        let c = censored.len().checked_sub(1)?;
        return if s.last().is_some_and(|m| *m > censored[c]) {
            last_measured()
        } else {
            of(&samples.censored_limiting_routers, c)
        };
    }
    match stats::upper_bound_censored(s, censored.len(), req.quantile, req.confidence) {
        CensoredBound::Value(b) => {
            let i = s.iter().position(|v| *v == b)?;
            of(&samples.limiting_routers, i)
        }
        CensoredBound::Censored | CensoredBound::TooFew => last_measured(),
    }
}

/// Why the measured share of expected node-deletions is too low to trust.
fn low_coverage(req: &Request, c: &Coverage) -> Option<String> {
    let ratio = c.ratio?;
    (ratio < req.min_coverage).then(|| {
        format!(
            "Coverage is low: {} of {} expected node-deletions measured ({:.0}%, below {:.0}%); {} unknown (agent absent, restarted or losing events): the bound may miss slow nodes.",
            c.measured,
            c.expected,
            ratio * 100.0,
            req.min_coverage * 100.0,
            c.unknown
        )
    })
}

/// A count for the answer (saturating; counts never get near).
fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// 0.99 -> "99", 0.999 -> "99.9".
fn format_pct(p: f64) -> String {
    let s = format!("{:.4}", p * 100.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use observer_proto::api::RouterKind;

    use super::*;

    fn req() -> Request {
        Request {
            cluster: "c".into(),
            scope: Scope::default(),
            quantile: 0.99,
            confidence: 0.95,
            margin_seconds: 1.0,
            window_seconds: 60,
            min_coverage: 0.9,
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
            ..Samples::default()
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
            ..Samples::default()
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

    fn named(kind: RouterKind, name: &str) -> Option<RouterRef> {
        Some(RouterRef {
            kind,
            name: name.into(),
            node: None,
        })
    }

    #[test]
    fn the_limiting_router_is_the_one_of_the_deletion_that_set_the_value() {
        // 300 samples: p90 at 95% is an order statistic below the largest,
        // set by node-x; the largest (an external router's) does not count.
        let p90 = Request {
            quantile: 0.9,
            ..req()
        };
        let k = stats::upper_bound_rank(300, 0.9, 0.95).unwrap();
        assert!(k < 300);
        let latencies: Vec<f64> = (1..=300).map(|i| f64::from(i) / 100.0).collect();
        let mut limiting_routers = vec![named(RouterKind::Node, "node-a"); 300];
        limiting_routers[k - 1] = named(RouterKind::Node, "node-x");
        limiting_routers[299] = named(RouterKind::External, "203.0.113.7");
        let s = Samples {
            latencies,
            limiting_routers,
            by_router_kind: vec![
                (RouterKind::Node, vec![0.5, 1.0, 2.99]),
                (RouterKind::Workload, vec![3.0]),
            ],
            ..Samples::default()
        };
        let r = recommend(&p90, &s);
        assert_eq!(r.limiting_router, named(RouterKind::Node, "node-x"));
        let kinds: Vec<_> = r
            .by_router_kind
            .iter()
            .map(|k| {
                (
                    k.kind,
                    k.samples,
                    k.observed_p50_seconds,
                    k.observed_max_seconds,
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (RouterKind::Node, 3, Some(1.0), Some(2.99)),
                (RouterKind::Workload, 1, Some(3.0), Some(3.0))
            ]
        );
        // Too few samples: the largest sets the value, so does its router.
        let few = Samples {
            latencies: vec![0.5, 2.0],
            limiting_routers: vec![None, named(RouterKind::Workload, "ingress/nginx")],
            ..Samples::default()
        };
        let r = recommend(&req(), &few);
        assert_eq!(
            r.limiting_router,
            named(RouterKind::Workload, "ingress/nginx")
        );
    }

    #[test]
    fn a_censored_deletion_names_the_router_still_routing() {
        let s = Samples {
            latencies: vec![0.5, 1.0],
            limiting_routers: vec![None, named(RouterKind::Node, "node-a")],
            censored: vec![30.0],
            censored_limiting_routers: vec![named(RouterKind::Node, "node-stuck")],
            ..Samples::default()
        };
        let r = recommend(&req(), &s);
        assert!(r.at_least);
        assert_eq!(r.limiting_router, named(RouterKind::Node, "node-stuck"));
        let excluded = Request {
            scope: Scope {
                exclude_external: true,
                ..Scope::default()
            },
            ..req()
        };
        assert!(
            recommend(&excluded, &s)
                .reason
                .contains("External routers (no node, no pod) excluded"),
        );
    }

    #[test]
    fn percent_formatting() {
        assert_eq!(format_pct(0.99), "99");
        assert_eq!(format_pct(0.999), "99.9");
        assert_eq!(format_pct(0.5), "50");
    }
}
