//! The startup side of the lab: pod servers that are marked ready before
//! they can serve (`--server slow-start=DURATION`: ready at once,
//! listening only after DURATION; `--server warm-up=DURATION`: listening at
//! once, answering slowly for DURATION), and the report of each new pod's
//! startup window against the injected truth (when each node's proxy
//! really added it).

use std::{fmt, str::FromStr, time::Duration};

use observer_proto::UnixNanos;
use observer_proto::api::startup::{RolloutFinding, StartupFinding, StartupRecord, StartupReport};
use serde::Serialize;

use crate::{
    api,
    delay::parse_duration_arg,
    observer::{Observer, ObserverError},
    proxy::RuleChange,
    server::ShutdownMode,
};

/// How long past the aggregator's window (10 s, plus 2 s for reports in
/// flight, by default) the lab waits for a new pod's record.
const WINDOW_WAIT: Duration = Duration::from_secs(20);

/// When a pod's server serves, relative to being marked ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StartBehaviour {
    /// Listening and serving before it is marked ready.
    #[default]
    Immediate,
    /// Marked ready at once, listening only after this long: the readiness
    /// probe passes before the server listens.
    SlowStart(Duration),
    /// Listening at once, answering slowly for this long.
    WarmUp(Duration),
}

/// `--server`: a shutdown mode (`graceful`, `ignore-sigterm`, `nginx`), or
/// a start behaviour with the graceful shutdown (`slow-start=DURATION`,
/// `warm-up=DURATION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    pub shutdown: ShutdownMode,
    pub start: StartBehaviour,
}

impl From<ShutdownMode> for ServerSpec {
    fn from(shutdown: ShutdownMode) -> Self {
        Self {
            shutdown,
            start: StartBehaviour::Immediate,
        }
    }
}

impl FromStr for ServerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let graceful = |start| ServerSpec {
            shutdown: ShutdownMode::Graceful,
            start,
        };
        if let Some(d) = s.strip_prefix("slow-start=") {
            return Ok(graceful(StartBehaviour::SlowStart(parse_duration_arg(d)?)));
        }
        if let Some(d) = s.strip_prefix("warm-up=") {
            return Ok(graceful(StartBehaviour::WarmUp(parse_duration_arg(d)?)));
        }
        <ShutdownMode as clap::ValueEnum>::from_str(s, false)
            .map(ServerSpec::from)
            .map_err(|_| {
                format!(
                    "server {s:?}: expected graceful, ignore-sigterm, nginx, slow-start=DURATION or warm-up=DURATION"
                )
            })
    }
}

impl fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.start {
            StartBehaviour::SlowStart(d) => write!(f, "slow-start={}ms", d.as_millis()),
            StartBehaviour::WarmUp(d) => write!(f, "warm-up={}ms", d.as_millis()),
            StartBehaviour::Immediate => {
                let v = clap::ValueEnum::to_possible_value(&self.shutdown);
                f.write_str(v.as_ref().map_or("?", |v| v.get_name()))
            }
        }
    }
}

/// A pod a rollout started, and when each node's proxy really added it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewPodTruth {
    pub pod: String,
    pub uid: String,
    pub host_node: String,
    /// The rule addition on each node (ground truth), in node order.
    pub additions: Vec<RuleChange>,
}

/// One new pod: the aggregator's startup window against the truth.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewPodReport {
    pub run: String,
    pub pod: String,
    pub host_node: String,
    /// The aggregator closed a startup window for the pod.
    pub measured: bool,
    pub per_node: Vec<AdditionPerNode>,
    /// Connections the pod refused after it was marked ready.
    pub refused_after_ready: u64,
    /// Routers (kind/name) that sent the refused connections.
    pub refused_by: Vec<String>,
    pub ready_to_first_accepted_ms: Option<f64>,
}

/// One node's addition of a new pod, ms from the aggregator's T_ready.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdditionPerNode {
    pub node: String,
    pub mode: String,
    pub measured_ms: Option<f64>,
    /// When the node's rules really changed (the kernel's commit where the
    /// mode announces it, else the end of the transaction).
    pub injected_ms: f64,
    /// When the transaction started: the kernel committed in between.
    pub injected_started_ms: f64,
    pub drawn_delay_ms: f64,
    pub error_ms: Option<f64>,
    /// The clock-uncertainty part of the aggregator's stated error (see
    /// [`crate::report::PerNode::clock_uncertainty_ms`]).
    pub clock_uncertainty_ms: Option<f64>,
}

/// Joins a new pod's truth with the aggregator's record (by pod UID).
pub fn new_pod_report(
    run: &str,
    truth: &NewPodTruth,
    measured: Option<&StartupRecord>,
) -> NewPodReport {
    let ready = measured.map_or(UnixNanos::default(), |m| m.ready_unix_nanos);
    let since_ready = |t: UnixNanos| (t - ready) as f64 / 1e6;
    let per_node = truth
        .additions
        .iter()
        .map(|a| {
            let node = measured.and_then(|m| m.nodes.iter().find(|n| n.node == a.node));
            let measured_ms = node.and_then(|n| n.rules_added_unix_nanos).map(since_ready);
            let injected_ms = since_ready(a.truth_unix_nano());
            AdditionPerNode {
                node: a.node.clone(),
                mode: a.mode.clone(),
                measured_ms,
                injected_ms,
                injected_started_ms: since_ready(a.applied_started_unix_nano),
                drawn_delay_ms: a.injected_delay_ms,
                error_ms: measured_ms.map(|m| m - injected_ms),
                clock_uncertainty_ms: node
                    .and_then(|n| n.clock_uncertainty_seconds)
                    .map(|s| s * 1000.0),
            }
        })
        .collect();
    NewPodReport {
        run: run.to_owned(),
        pod: truth.pod.clone(),
        host_node: truth.host_node.clone(),
        measured: measured.is_some(),
        per_node,
        refused_after_ready: measured.map_or(0, |m| m.refused_connections),
        refused_by: measured
            .into_iter()
            .flat_map(|m| &m.routers)
            .filter(|r| r.refused_connections > 0)
            .map(|r| format!("{}/{}", r.router.kind, r.router.name))
            .collect(),
        ready_to_first_accepted_ms: measured
            .and_then(|m| m.ready_to_first_accepted_seconds)
            .map(|s| s * 1000.0),
    }
}

/// Waits until the aggregator closed the startup window of every one of
/// `new_pods`; its report for the lab's Service.
pub async fn wait_measured(
    observer: &Observer,
    new_pods: &[NewPodTruth],
) -> Result<StartupReport, ObserverError> {
    let deadline = tokio::time::Instant::now() + WINDOW_WAIT;
    let path = format!(
        "/v1/startup?namespace={}&service={}&limit=1000",
        api::NAMESPACE,
        api::SERVICE
    );
    loop {
        let report: StartupReport = observer.aggregator.get_json(&path).await?;
        let found = new_pods
            .iter()
            .filter(|t| report.pods.iter().any(|p| p.pod_uid == t.uid))
            .count();
        if found == new_pods.len() {
            return Ok(report);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ObserverError::Timeout(format!(
                "the aggregator closed {found} of {} startup windows within {WINDOW_WAIT:?}",
                new_pods.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The startup part of `report.json`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupSection {
    pub new_pods: Vec<NewPodReport>,
    pub findings: Vec<StartupFinding>,
    pub rollout_findings: Vec<RolloutFinding>,
}

impl StartupSection {
    pub fn new(runs: &[(String, Vec<NewPodTruth>)], measured: &StartupReport) -> Self {
        let new_pods = runs
            .iter()
            .flat_map(|(run, truths)| {
                truths.iter().map(move |t| {
                    let m = measured.pods.iter().find(|p| p.pod_uid == t.uid);
                    new_pod_report(run, t, m)
                })
            })
            .collect();
        Self {
            new_pods,
            findings: measured.findings.clone(),
            rollout_findings: measured.rollout_findings.clone(),
        }
    }

    /// The printed summary.
    pub fn write(&self, out: &mut String) {
        use fmt::Write as _;
        let _ = writeln!(
            out,
            "\nPer new pod and node (ms from T_ready, the aggregator seeing it ready):"
        );
        for p in &self.new_pods {
            let _ = writeln!(
                out,
                "  {} {} on {}: {} connections refused after ready{}",
                p.run,
                p.pod,
                p.host_node,
                p.refused_after_ready,
                if p.refused_by.is_empty() {
                    String::new()
                } else {
                    format!(" (from {})", p.refused_by.join(", "))
                }
            );
            for n in &p.per_node {
                let measured = n
                    .measured_ms
                    .map_or_else(|| "missing".to_owned(), |v| format!("{v:.1}"));
                let clock = n
                    .clock_uncertainty_ms
                    .map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    out,
                    "    {:<8} {:<16} added measured {measured:>8} injected {:>8.1} (clock +-{clock})",
                    n.node, n.mode, n.injected_ms
                );
            }
        }
        if self.findings.is_empty() {
            let _ = writeln!(out, "Startup findings: none");
        }
        for f in &self.findings {
            let _ = writeln!(out, "Startup finding: {}", f.message);
        }
        for f in &self.rollout_findings {
            let _ = writeln!(out, "Rollout finding: {}", f.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_specs_parse_and_print_back() {
        for (s, spec) in [
            ("graceful", ServerSpec::from(ShutdownMode::Graceful)),
            (
                "ignore-sigterm",
                ServerSpec::from(ShutdownMode::IgnoreSigterm),
            ),
            ("nginx", ServerSpec::from(ShutdownMode::Nginx)),
            (
                "slow-start=2000ms",
                ServerSpec {
                    shutdown: ShutdownMode::Graceful,
                    start: StartBehaviour::SlowStart(Duration::from_secs(2)),
                },
            ),
            (
                "warm-up=500ms",
                ServerSpec {
                    shutdown: ShutdownMode::Graceful,
                    start: StartBehaviour::WarmUp(Duration::from_millis(500)),
                },
            ),
        ] {
            assert_eq!(s.parse::<ServerSpec>(), Ok(spec));
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "slow-start=2s".parse::<ServerSpec>().map(|s| s.start),
            Ok(StartBehaviour::SlowStart(Duration::from_secs(2)))
        );
        let err = "slow".parse::<ServerSpec>().unwrap_err();
        assert!(err.contains("slow-start=DURATION"), "{err}");
        assert!("slow-start=soon".parse::<ServerSpec>().is_err());
    }
}
