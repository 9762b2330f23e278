//! The lab's results: measured against injected propagation per deletion
//! and node, the recommendation, and the rollouts' request counts; as
//! `report.json` and as text.

use observer_proto::UnixNanos;
use std::{collections::BTreeMap, fmt::Write as _};

use observer_proto::api::{DeletionRecord, Recommendation};
use serde::Serialize;

use crate::{
    client::ClientReport,
    routers::{
        ByRouter, Choice,
        report::{self as routers, PerRouter, RouterAccuracy, RouterInfo},
    },
    scenario::{DeletionTruth, NodeInfo, RolloutResult},
};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub nodes: Vec<NodeInfo>,
    /// Every router that sent to the Service's pods.
    pub routers: Vec<RouterInfo>,
    pub deletions: Vec<DeletionReport>,
    pub recommendation: Option<Recommendation>,
    pub runs: Vec<RunReport>,
    /// T_rules against the rule commit, per dataplane mode.
    pub accuracy: Vec<ModeAccuracy>,
    /// Each router's latency against when it really let go, per router type.
    pub router_accuracy: Vec<RouterAccuracy>,
    /// The folklore preStop against the measurements, per router type.
    pub folklore: Vec<routers::FolkloreVerdict>,
    pub folklore_seconds: u64,
    /// Pods per rollout (what a wasted second per pod is multiplied by).
    pub rollout_pods: usize,
    pub agent_cost: AgentCost,
    /// What each part of the lab cost over the rollouts.
    pub lab_cost: crate::cost::LabCost,
    /// Each new pod's startup window against the truth, and the findings.
    pub startup: crate::startup::StartupSection,
}

/// What the agents cost during the lab's traffic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCost {
    /// Build profile of the agent binary (`debug` or `release`).
    pub build_profile: String,
    /// CPU seconds (user + system) of each node's agent while the rollouts
    /// ran, summed over the rollouts: every second of client traffic is in
    /// it; the agents' start-up and the pauses between rollouts are not.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// Wall-clock seconds the rollouts (and so the traffic) lasted.
    pub traffic_seconds: f64,
    /// TCP connections the lab's clients opened to the Service during them.
    pub connections: u64,
    /// Agent CPU summed over the nodes per 10k of those connections.
    pub cpu_ms_per_10k_connections: Option<f64>,
    /// The same, less the idle floor over the traffic's duration: what the
    /// connections themselves cost.
    pub cpu_ms_per_10k_connections_above_idle: Option<f64>,
    /// The same agents with no traffic (measured before the first rollout):
    /// CPU milliseconds per second, summed over the nodes. This floor is
    /// part of the per-connection figure at the lab's modest rates.
    pub idle_cpu_ms_per_second: Option<f64>,
}

/// CPU seconds of each agent at one moment (None: the process is gone).
pub type CpuSample = Vec<(String, Option<f64>)>;

/// Adds `after - before` per agent to `total` (agents present in both).
pub fn add_cpu_delta(total: &mut BTreeMap<String, f64>, before: &CpuSample, after: &CpuSample) {
    for ((node, b), (_, a)) in before.iter().zip(after) {
        if let (Some(b), Some(a)) = (b, a) {
            *total.entry(node.clone()).or_default() += (a - b).max(0.0);
        }
    }
}

impl AgentCost {
    pub fn new(
        build_profile: &str,
        cpu_seconds: BTreeMap<String, f64>,
        traffic_seconds: f64,
        connections: u64,
        idle_cpu_ms_per_second: Option<f64>,
    ) -> Self {
        let total_ms = cpu_seconds.values().sum::<f64>() * 1000.0;
        let per_10k = |ms: f64| (connections > 0).then(|| ms * 10_000.0 / connections as f64);
        AgentCost {
            build_profile: build_profile.to_owned(),
            cpu_ms_per_10k_connections: per_10k(total_ms),
            cpu_ms_per_10k_connections_above_idle: idle_cpu_ms_per_second
                .and_then(|idle| per_10k((total_ms - idle * traffic_seconds).max(0.0))),
            cpu_seconds,
            traffic_seconds,
            connections,
            idle_cpu_ms_per_second,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletionReport {
    pub run: String,
    pub pod: String,
    pub host_node: String,
    /// The aggregator finished the deletion with every node reporting.
    pub complete: bool,
    pub missing_nodes: Vec<String>,
    pub per_node: Vec<PerNode>,
    pub per_router: Vec<PerRouter>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerNode {
    pub node: String,
    pub mode: String,
    /// The aggregator's propagation latency for this node (from its T0):
    /// max(T_rules, T_last).
    pub measured_ms: Option<f64>,
    /// The aggregator's T_rules for this node alone (from its T0).
    pub measured_rules_ms: Option<f64>,
    /// When the node's rules really changed (the kernel's commit where the
    /// mode announces it, else the end of the transaction), from the same T0.
    pub injected_ms: f64,
    /// When the transaction started: the kernel committed in between.
    pub injected_started_ms: f64,
    /// The delay drawn for the change (the rules changed this long after
    /// the proxy saw the endpoint turn terminating).
    pub drawn_delay_ms: f64,
    pub error_ms: Option<f64>,
    /// measuredRulesMs - injectedMs: the rules detector's error alone (a
    /// node's latency also counts other routers' connections it forwards).
    pub rules_error_ms: Option<f64>,
    /// How far the agent's clock offset to the aggregator may be off, as
    /// the aggregator states it: the lab's truth is on the agent's clock,
    /// the measurement on the aggregator's.
    pub clock_uncertainty_ms: Option<f64>,
    /// The detector's stated precision of the removal's time: it happened
    /// at most this long before the measured time.
    pub detector_precision_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub name: String,
    /// The fixed preStop sleep, or the adaptive drain's fallback.
    pub pre_stop_seconds: f64,
    /// Pods ran `prestop-drain` instead of the fixed sleep.
    pub adaptive_drain: bool,
    /// How long the deleted pods' preStop hooks actually ran.
    pub pre_stop_time: PreStopTime,
    pub server_mode: String,
    pub requests: u64,
    pub failed: u64,
    pub new_connection: ClientReport,
    pub keep_alive: ClientReport,
    /// Requests by router (a node's name: its VIP clients).
    pub by_router: ByRouter,
    /// Failed requests by router type.
    pub failed_by_type: BTreeMap<Choice, u64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModeAccuracy {
    pub mode: String,
    pub samples: usize,
    pub missing: usize,
    pub p50_abs_error_ms: f64,
    pub p99_abs_error_ms: f64,
    pub max_abs_error_ms: f64,
}

/// The preStop time a rollout's deleted pods spent, as the kubelet timed
/// it (hook start to SIGTERM).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreStopTime {
    pub total_seconds: f64,
    pub max_seconds: f64,
    /// Pod name -> seconds.
    pub per_pod: BTreeMap<String, f64>,
}

impl PreStopTime {
    fn of(run: &RolloutResult) -> Self {
        let per_pod: BTreeMap<String, f64> = run
            .deletions
            .iter()
            .filter_map(|d| Some((d.pod.clone(), d.pre_stop_seconds?)))
            .collect();
        PreStopTime {
            total_seconds: per_pod.values().sum(),
            max_seconds: per_pod.values().copied().fold(0.0, f64::max),
            per_pod,
        }
    }
}

impl RunReport {
    pub fn new(name: &str, run: &RolloutResult, routers: &[RouterInfo]) -> Self {
        RunReport {
            name: name.to_owned(),
            pre_stop_seconds: run.pre_stop_seconds,
            adaptive_drain: run.adaptive_drain,
            pre_stop_time: PreStopTime::of(run),
            server_mode: format!("{:?}", run.server_mode),
            requests: run.requests(),
            failed: run.failed(),
            new_connection: run.new_connection.clone(),
            keep_alive: run.keep_alive.clone(),
            by_router: run.by_router.clone(),
            failed_by_type: routers::failed_by_type(routers, &run.by_router),
            seconds: run.seconds,
        }
    }
}

/// Joins a deletion's ground truth with the aggregator's record of it
/// (matched by pod UID; None when the aggregator has none), per node and
/// per router of `routers`.
pub fn deletion_report(
    run: &str,
    truth: &DeletionTruth,
    measured: Option<&DeletionRecord>,
    routers: &[RouterInfo],
) -> DeletionReport {
    // Both sides on the aggregator's T0 when there is one, so the error is
    // the error of the per-node measurement alone.
    let t0 = measured.map_or(truth.requested_unix_nano, |m| m.deletion_start_unix_nanos);
    let ms_since_t0 = |t: UnixNanos| (t - t0) as f64 / 1e6;
    let per_node = truth
        .removals
        .iter()
        .map(|r| {
            let node = measured.and_then(|m| m.nodes.iter().find(|n| n.node == r.node));
            let measured_ms = node.and_then(|n| n.latency_seconds).map(|s| s * 1000.0);
            let measured_rules_ms = node
                .and_then(|n| n.rules_removed_unix_nanos)
                .map(ms_since_t0);
            let injected_ms = ms_since_t0(r.truth_unix_nano());
            PerNode {
                node: r.node.clone(),
                mode: r.mode.clone(),
                measured_ms,
                measured_rules_ms,
                injected_ms,
                injected_started_ms: ms_since_t0(r.applied_started_unix_nano),
                drawn_delay_ms: r.injected_delay_ms,
                error_ms: measured_ms.map(|m| m - injected_ms),
                rules_error_ms: measured_rules_ms.map(|m| m - injected_ms),
                clock_uncertainty_ms: node
                    .and_then(|n| n.clock_uncertainty_seconds)
                    .map(|s| s * 1000.0),
                detector_precision_ms: node
                    .and_then(|n| n.detector_precision_seconds)
                    .map(|s| s * 1000.0),
            }
        })
        .collect();
    DeletionReport {
        run: run.to_owned(),
        pod: truth.pod.clone(),
        host_node: truth.host_node.clone(),
        complete: measured.is_some_and(|m| m.complete),
        missing_nodes: measured
            .map(|m| m.missing_nodes.clone())
            .unwrap_or_default(),
        per_node,
        per_router: routers::per_router(routers, truth, measured, t0),
    }
}

/// The nearest-rank quantile of `sorted`; None when it is empty.
pub fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    Some(quantile(sorted, q)).filter(|v| !v.is_nan())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// |T_rules - rule commit| per dataplane mode.
pub fn accuracy(deletions: &[DeletionReport]) -> Vec<ModeAccuracy> {
    let mut by_mode: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
    for n in deletions.iter().flat_map(|d| &d.per_node) {
        let entry = by_mode.entry(&n.mode).or_default();
        match n.rules_error_ms {
            Some(e) => entry.0.push(e.abs()),
            None => entry.1 += 1,
        }
    }
    by_mode
        .into_iter()
        .map(|(mode, (mut errors, missing))| {
            errors.sort_by(f64::total_cmp);
            ModeAccuracy {
                mode: mode.to_owned(),
                samples: errors.len(),
                missing,
                p50_abs_error_ms: quantile(&errors, 0.5),
                p99_abs_error_ms: quantile(&errors, 0.99),
                max_abs_error_ms: errors.last().copied().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "missing".to_owned(), |v| format!("{v:.1}"))
}

impl Report {
    /// The human-readable summary `cargo xtask lab` prints.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write_deletions(&mut out);
        self.write_accuracy(&mut out);
        routers::write_accuracy(&mut out, &self.router_accuracy);
        routers::write_folklore(
            &mut out,
            &self.folklore,
            self.folklore_seconds,
            self.rollout_pods,
        );
        self.write_recommended_against_folklore(&mut out);
        self.write_recommendation(&mut out);
        self.write_agent_cost(&mut out);
        self.lab_cost.write_text(&mut out);
        self.startup.write(&mut out);
        self.write_runs(&mut out);
        out
    }

    /// Per deletion and node: measured against injected.
    fn write_deletions(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nPer deletion and node (ms from the deletion's start, T0):"
        );
        let _ = writeln!(
            out,
            "  {:<11} {:<8} {:<8} {:<16} {:>10} {:>10} {:>9}",
            "run", "pod", "node", "mode", "measured", "injected", "error"
        );
        for d in &self.deletions {
            for n in &d.per_node {
                let _ = writeln!(
                    out,
                    "  {:<11} {:<8} {:<8} {:<16} {:>10} {:>10.1} {:>9}",
                    d.run,
                    d.pod,
                    n.node,
                    n.mode,
                    ms(n.measured_ms),
                    n.injected_ms,
                    ms(n.error_ms)
                );
            }
        }
    }

    /// Accuracy per dataplane mode.
    fn write_accuracy(&self, out: &mut String) {
        let _ = writeln!(out, "\nAccuracy of T_rules |measured - injected| by mode:");
        for a in &self.accuracy {
            let _ = writeln!(
                out,
                "  {:<16} samples {:>3} (missing {}), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                a.mode,
                a.samples,
                a.missing,
                a.p50_abs_error_ms,
                a.p99_abs_error_ms,
                a.max_abs_error_ms
            );
        }
    }

    /// The aggregator's recommendation and its keep-alive finding.
    fn write_recommendation(&self, out: &mut String) {
        match &self.recommendation {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "\nRecommendation (aggregator, p{} at {}% confidence): preStop {} s from {} samples{}; observed max {}",
                    r.quantile * 100.0,
                    r.confidence * 100.0,
                    r.pre_stop_seconds
                        .map_or_else(|| "none".into(), |s| s.to_string()),
                    r.samples,
                    if r.low_confidence {
                        " (LOW CONFIDENCE: too few samples)"
                    } else {
                        ""
                    },
                    r.observed_max_seconds
                        .map_or_else(|| "-".into(), |s| format!("{s:.3} s")),
                );
                if let Some(f) = &r.keep_alive.finding {
                    let _ = writeln!(out, "  keep-alive: {f}");
                }
            }
            None => {
                let _ = writeln!(out, "\nRecommendation: none");
            }
        }
    }

    /// The recommendation's cost or saving against the folklore delay, and
    /// what each rollout lost.
    fn write_recommended_against_folklore(&self, out: &mut String) {
        let Some(recommended) = self
            .recommendation
            .as_ref()
            .and_then(|r| r.pre_stop_seconds)
        else {
            return;
        };
        let per_pod = recommended as i64 - self.folklore_seconds as i64;
        // The folklore ran as the baseline when some router could exceed
        // it; the recommendation ran last.
        let folklore = self
            .runs
            .iter()
            .find(|r| r.name == "baseline" && r.pre_stop_seconds == self.folklore_seconds as f64);
        let _ = writeln!(
            out,
            "  recommended {recommended} s: {per_pod:+} s per pod against the folklore, {:+} s over a rollout of {} pods; lost requests: folklore {}, recommended {}",
            per_pod * self.rollout_pods as i64,
            self.rollout_pods,
            folklore.map_or_else(|| "(not run)".into(), |r| r.failed.to_string()),
            self.runs
                .last()
                .map_or_else(|| "-".into(), |r| r.failed.to_string()),
        );
    }

    /// The agents' CPU over the rollouts' traffic.
    fn write_agent_cost(&self, out: &mut String) {
        let cost = &self.agent_cost;
        if let Some(ms) = cost.cpu_ms_per_10k_connections {
            let _ = writeln!(
                out,
                "\nAgents ({} build), during the rollouts' traffic ({:.0} s): {:.2} s CPU in all for {} connections: {ms:.0} ms per 10k connections{}",
                cost.build_profile,
                cost.traffic_seconds,
                cost.cpu_seconds.values().sum::<f64>(),
                cost.connections,
                match (
                    cost.idle_cpu_ms_per_second,
                    cost.cpu_ms_per_10k_connections_above_idle
                ) {
                    (Some(idle), Some(above)) => format!(
                        " ({above:.0} ms above the idle floor of {idle:.1} ms CPU per second)"
                    ),
                    _ => String::new(),
                }
            );
        }
    }

    /// Requests and failures per rollout.
    fn write_runs(&self, out: &mut String) {
        let _ = writeln!(out, "\nRollouts:");
        for r in &self.runs {
            let causes: Vec<String> = {
                let mut all = r.new_connection.clone();
                all.merge(&r.keep_alive);
                all.failed
                    .iter()
                    .map(|(c, n)| format!("{c:?} {n}"))
                    .collect()
            };
            let by_type: Vec<String> = r
                .failed_by_type
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect();
            let hook = if r.adaptive_drain {
                format!("drain (fallback {:.0} s)", r.pre_stop_seconds)
            } else {
                format!("preStop {:>4.1} s", r.pre_stop_seconds)
            };
            let t = &r.pre_stop_time;
            let _ = writeln!(
                out,
                "  {:<12} {hook}: preStop time {:.1} s total over {} pods (max {:.1} s), {:>6} requests, {:>5} failed {}{}",
                r.name,
                t.total_seconds,
                t.per_pod.len(),
                t.max_seconds,
                r.requests,
                r.failed,
                if causes.is_empty() {
                    String::new()
                } else {
                    format!("({}) ", causes.join(", "))
                },
                if by_type.is_empty() {
                    String::new()
                } else {
                    format!("by router: {}", by_type.join(", "))
                }
            );
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_uses_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
