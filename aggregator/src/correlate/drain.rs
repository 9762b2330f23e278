//! What a pod's adaptive drain waits for, read from its deletion in flight:
//! every expected node reported the removal, and every router that sent
//! the pod new connections since T0 has been quiet for as long as its own
//! measured rate says a router still routing could not stay quiet.
//!
//! The quiet period of a router that sent `n` new connections between T0
//! and its last one (`span` later) is the time in which a router still
//! sending at that rate (`n / span`, arrivals taken as Poisson) would have
//! sent at least one more with probability `1 - miss`:
//! `ln(1/miss) * span / n`, clamped to `[min, max]`. It runs from the
//! router's last connection plus its clock uncertainty. A busy router
//! (40 connections/s) is quiet after `min`; one that sent one connection
//! in 3 s must stay quiet about 21 s at `miss = 0.001`. `min` also covers
//! the agents' report batching, so the last connection reached the
//! aggregator before its absence is believed.

use std::time::Duration;

use observer_proto::UnixNanos;
use observer_proto::api::{RouterKind, RouterRef};

use super::state::{Pending, State};
use crate::model::RouterAccumulator;

/// Missing nodes named in a view at most (the rest are counted).
pub const MAX_MISSING_NAMED: usize = 20;

/// How the quiet period follows from a router's rate (module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuietRule {
    /// The probability that a router still routing at its measured rate
    /// sent nothing for the whole quiet period, in (0, 1).
    pub miss_probability: f64,
    pub min: Duration,
    pub max: Duration,
}

impl QuietRule {
    /// The quiet period of a router that sent `connections` (at least one)
    /// in `span` after T0.
    pub fn period(&self, connections: u64, span: Duration) -> Duration {
        let per_connection = span.as_secs_f64() / connections.max(1) as f64;
        let secs = (1.0 / self.miss_probability).ln() * per_connection;
        Duration::from_secs_f64(secs.clamp(self.min.as_secs_f64(), self.max.as_secs_f64()))
    }
}

/// Which pod a drain asks about: the token's pod UID when there is one
/// (a replaced pod of the same name is another deletion), else its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// A deletion in flight as its drain sees it at `now`.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainView {
    pub t0: UnixNanos,
    pub nodes_expected: usize,
    pub nodes_removed: usize,
    /// Sorted; at most [`MAX_MISSING_NAMED`].
    pub missing_nodes: Vec<String>,
    /// The longest quiet period any router needs ([`QuietRule::min`] when
    /// none sent a connection).
    pub quiet: Duration,
    pub last_connection: Option<UnixNanos>,
    /// Every condition holds.
    pub drained: bool,
    /// Drained: the condition met last (the router quiet last, or the node
    /// that reported last). Not drained: one still unmet.
    pub limiting: Option<RouterRef>,
}

/// One router's quiet period and when it ends.
struct Quiet {
    router: RouterRef,
    period: Duration,
    until: UnixNanos,
}

fn node_ref(node: &str) -> RouterRef {
    RouterRef {
        kind: RouterKind::Node,
        name: node.to_owned(),
        node: Some(node.to_owned()),
    }
}

fn quiet_of(acc: &RouterAccumulator, t0: UnixNanos, rule: &QuietRule) -> Option<Quiet> {
    let last = acc.last_connection.filter(|l| *l >= t0)?;
    let connections = acc.late_flows.max(acc.late_accepted) + acc.refused;
    let span = Duration::from_nanos(u64::try_from(last - t0).unwrap_or(0));
    let period = rule.period(connections, span);
    Some(Quiet {
        router: acc.router.clone(),
        period,
        until: last + period + Duration::from_nanos(acc.clock_uncertainty_ns),
    })
}

impl State {
    /// The deletion in flight of `pod`, if any.
    fn pending_of(&self, pod: &PodRef) -> Option<&Pending> {
        match &pod.uid {
            Some(uid) => self
                .pending
                .get(uid)
                .filter(|p| p.start.namespace == pod.namespace && p.start.pod_name == pod.name),
            None => self
                .pending
                .values()
                .filter(|p| p.start.namespace == pod.namespace && p.start.pod_name == pod.name)
                .max_by_key(|p| p.t0),
        }
    }

    /// The drain view of `pod`'s deletion in flight at `now`; `None` when
    /// no deletion of it is tracked.
    pub(super) fn drain_view(
        &mut self,
        pod: &PodRef,
        rule: &QuietRule,
        now: UnixNanos,
    ) -> Option<DrainView> {
        let live = self.live_nodes();
        let p = self.pending_of(pod)?;
        let expected = p.expected_nodes(&live);
        let removal = |n: &String| p.nodes.get(n).and_then(|a| a.rules_removed).map(|r| r.time);
        let missing: Vec<&String> = expected.iter().filter(|n| removal(n).is_none()).collect();
        let quiet: Vec<Quiet> = p
            .routers
            .values()
            .filter_map(|acc| quiet_of(acc, p.t0, rule))
            .collect();
        let floor = p.t0 + rule.min;
        let loudest = quiet
            .iter()
            .filter(|q| q.until > now)
            .max_by_key(|q| q.until);
        let drained =
            !expected.is_empty() && missing.is_empty() && loudest.is_none() && now >= floor;
        let limiting = if drained {
            let last_quiet = quiet.iter().max_by_key(|q| q.until);
            let last_removal = expected.iter().filter_map(|n| Some((removal(n)?, n))).max();
            match (last_quiet, last_removal) {
                (Some(q), Some((t, _))) if q.until >= t => Some(q.router.clone()),
                (_, Some((_, n))) => Some(node_ref(n)),
                (q, None) => q.map(|q| q.router.clone()),
            }
        } else {
            missing
                .first()
                .map(|n| node_ref(n))
                .or_else(|| loudest.map(|q| q.router.clone()))
        };
        Some(DrainView {
            t0: p.t0,
            nodes_expected: expected.len(),
            nodes_removed: expected.len() - missing.len(),
            missing_nodes: missing
                .iter()
                .take(MAX_MISSING_NAMED)
                .map(|n| (*n).clone())
                .collect(),
            quiet: quiet.iter().map(|q| q.period).max().unwrap_or(rule.min),
            last_connection: p.routers.values().filter_map(|a| a.last_connection).max(),
            drained,
            limiting,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: QuietRule = QuietRule {
        miss_probability: 0.001,
        min: Duration::from_secs(1),
        max: Duration::from_secs(30),
    };

    #[test]
    fn the_quiet_period_follows_the_rate_within_its_bounds() {
        // 40 connections in 1 s: 0.17 s, raised to the minimum.
        assert_eq!(RULE.period(40, Duration::from_secs(1)), RULE.min);
        // One connection 3 s after T0: ln(1000) * 3 s = 20.7 s.
        let sparse = RULE.period(1, Duration::from_secs(3)).as_secs_f64();
        assert!((sparse - 1000f64.ln() * 3.0).abs() < 1e-6, "{sparse}");
        // One in a minute: capped.
        assert_eq!(RULE.period(1, Duration::from_secs(60)), RULE.max);
        // At T0 itself: nothing to go by but the minimum.
        assert_eq!(RULE.period(3, Duration::ZERO), RULE.min);
    }
}
