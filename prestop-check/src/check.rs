//! Compares each routed container's preStop delay and grace period with the
//! recommendation, producing findings and the changes that would fix them.

use k8s_openapi::api::core::v1::Container;
use serde::Serialize;

use crate::hook::{Hook, fmt_secs};
use crate::recommendation::{self, QueryError, Recommendation, Resolver};
use crate::workload::{Inventory, RoutingService, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LowConfidence {
    /// Treat low-confidence recommendations like any other.
    Ignore,
    /// Report shortfalls against them as warnings (exit 0).
    Warn,
    /// Fail with exit code 5 whenever one is used or no samples exist.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HookStyle {
    /// `lifecycle.preStop.sleep.seconds` (Kubernetes 1.30 and later).
    Sleep,
    /// `exec: command: ["sleep", "N"]` for older clusters; needs a `sleep`
    /// binary in the image.
    Exec,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub drain_seconds: f64,
    pub low_confidence: LowConfidence,
    pub fail_on_unknown: bool,
    pub hook_style: HookStyle,
    /// A routed container without a readinessProbe, and new pods measured
    /// refusing connections after ready, are errors (else warnings).
    pub fail_on_startup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Problem {
    PreStopBelowRecommendation,
    GracePeriodTooShort,
    UnknownPreStop,
    LowConfidence,
    NoMeasurements,
    KeepAlive,
    /// A container a Service routes to has no readinessProbe.
    NoReadinessProbe,
    /// The aggregator measured the workload's new pods refusing
    /// connections after being marked ready.
    RefusedAfterReady,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub severity: Severity,
    pub problem: Problem,
    /// Index into the input files.
    #[serde(skip)]
    pub file_index: usize,
    pub file: String,
    pub line: usize,
    pub object: String,
    pub container: Option<String>,
    pub message: String,
    pub has: Option<String>,
    pub recommended: Option<String>,
    pub why: Option<String>,
    pub patch: Option<String>,
    pub fixed: bool,
}

/// What `--fix` would change in one workload.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub workload: usize,
    /// Container name and the preStop seconds it needs.
    pub pre_stop: Vec<(String, u64)>,
    pub grace_seconds: Option<i64>,
}

/// One routed container as checked, for the JSON report and metrics file.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Checked {
    pub file: String,
    pub line: usize,
    pub namespace: String,
    pub kind: String,
    pub workload: String,
    pub container: String,
    pub services: Vec<String>,
    pub pre_stop_seconds: Option<f64>,
    pub pre_stop: String,
    pub termination_grace_period_seconds: i64,
    pub recommendation: Option<Recommendation>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub findings: Vec<Finding>,
    pub checked: Vec<Checked>,
    pub changes: Vec<Change>,
}

/// `resolver` is `None` when the aggregator is unreachable and
/// `--offline-ok` allows local checks only.
pub fn run(
    inventory: &Inventory,
    files: &[String],
    mut resolver: Option<&mut Resolver<'_>>,
    opts: &Options,
) -> Result<Outcome, QueryError> {
    let mut out = Outcome::default();
    for (index, w) in inventory.workloads.iter().enumerate() {
        let services = inventory.services_for(w);
        let one = workload(w, &services, &files[w.file], resolver.as_deref_mut(), opts)?;
        out.findings.extend(one.findings);
        out.checked.extend(one.checked);
        out.changes.extend(one.change.map(|change| Change {
            workload: index,
            ..change
        }));
    }
    Ok(out)
}

/// What checking one workload found.
#[derive(Debug, Default)]
pub struct WorkloadOutcome {
    pub findings: Vec<Finding>,
    pub checked: Vec<Checked>,
    /// `None` when nothing needs to change.
    pub change: Option<Change>,
}

/// Checks one workload against the Services that route to it (`file`
/// names where it was read): the one evaluation behind the CLI and the
/// admission webhook. A workload no Service routes to has nothing to check.
pub fn workload(
    w: &Workload,
    services: &[&RoutingService],
    file: &String,
    mut resolver: Option<&mut Resolver<'_>>,
    opts: &Options,
) -> Result<WorkloadOutcome, QueryError> {
    let mut out = WorkloadOutcome::default();
    if services.is_empty() {
        return Ok(out);
    }
    let mut recs = Vec::new();
    // Keep-alive advice is about the connections of the scope it was
    // measured in: only a Service's own answer carries it here.
    let mut keep_alive = Vec::new();
    if let Some(resolver) = resolver.as_deref_mut() {
        for svc in services {
            recs.extend(resolver.resolve(&svc.namespace, &svc.name)?);
            keep_alive.extend(
                resolver
                    .own(&svc.namespace, &svc.name)?
                    .filter(|r| r.keep_alive.finding.is_some()),
            );
        }
    }
    // Several Services may route to one workload; the longest
    // recommendation binds.
    let binding = recs.iter().max_by_key(|r| r.pre_stop_seconds).cloned();
    let mut containers: Vec<&Container> = Vec::new();
    for c in services
        .iter()
        .flat_map(|s| s.serving_containers(&w.pod_spec))
    {
        if !containers.iter().any(|seen| seen.name == c.name) {
            containers.push(c);
        }
    }
    let service_names: Vec<String> = services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    let eval = Evaluation {
        w,
        file,
        rec: binding.as_ref(),
        opts,
    };
    eval.workload_findings(resolver.is_some(), &keep_alive, &mut out.findings);
    eval.readiness_findings(&containers, &mut out.findings);
    if let Some(resolver) = resolver.as_deref() {
        eval.measured_startup_findings(resolver, &mut out.findings)?;
    }
    let mut change = Change::default();
    for c in containers {
        let name = c.name.as_str();
        let hook = Hook::of(c);
        eval.container_findings(name, &hook, &mut out.findings, &mut change);
        out.checked.push(Checked {
            file: file.clone(),
            line: w.container_line(name),
            namespace: w.namespace.clone(),
            kind: w.kind.clone(),
            workload: w.name.clone(),
            container: name.to_string(),
            services: service_names.clone(),
            pre_stop_seconds: hook.seconds(),
            pre_stop: hook.describe(),
            termination_grace_period_seconds: w.grace_seconds(),
            recommendation: binding.clone(),
        });
    }
    if !change.pre_stop.is_empty() || change.grace_seconds.is_some() {
        let patch = crate::fix::patch_text(w, &change, opts.hook_style);
        for f in out.findings.iter_mut().filter(|f| {
            matches!(
                f.problem,
                Problem::PreStopBelowRecommendation | Problem::GracePeriodTooShort
            )
        }) {
            f.patch = Some(patch.clone());
        }
        out.change = Some(change);
    }
    Ok(out)
}

pub(crate) struct Evaluation<'a> {
    pub(crate) w: &'a Workload,
    file: &'a String,
    rec: Option<&'a Recommendation>,
    pub(crate) opts: &'a Options,
}

impl Evaluation<'_> {
    pub(crate) fn finding(
        &self,
        severity: Severity,
        problem: Problem,
        line: usize,
        message: String,
    ) -> Finding {
        Finding {
            severity,
            problem,
            file_index: self.w.file,
            file: self.file.clone(),
            line,
            object: self.w.object(),
            container: None,
            message,
            has: None,
            recommended: None,
            why: None,
            patch: None,
            fixed: false,
        }
    }

    fn low_confidence_severity(&self) -> Severity {
        if self.opts.low_confidence == LowConfidence::Fail {
            Severity::Error
        } else {
            Severity::Warning
        }
    }

    fn workload_findings(
        &self,
        online: bool,
        keep_alive: &[Recommendation],
        out: &mut Vec<Finding>,
    ) {
        if !online {
            return;
        }
        let Some(rec) = self.rec.filter(|r| r.pre_stop_seconds.is_some()) else {
            let reason = self
                .rec
                .map_or("the aggregator knows no deletions yet".into(), |r| {
                    r.reason.clone()
                });
            out.push(self.finding(
                self.low_confidence_severity(),
                Problem::NoMeasurements,
                self.w.line,
                format!("no propagation measurements to compare with: {reason}"),
            ));
            return;
        };
        if rec.low_confidence && self.opts.low_confidence != LowConfidence::Ignore {
            let mut f = self.finding(
                self.low_confidence_severity(),
                Problem::LowConfidence,
                self.w.line,
                format!(
                    "the recommendation of {}s is low confidence ({} samples, {} more needed)",
                    rec.pre_stop_seconds.unwrap_or_default(),
                    rec.samples,
                    rec.samples_needed
                ),
            );
            f.why = Some(recommendation::why(rec));
            out.push(f);
        }
        for own in keep_alive {
            let Some(advice) = &own.keep_alive.finding else {
                continue;
            };
            let mut f = self.finding(
                Severity::Warning,
                Problem::KeepAlive,
                self.w.line,
                format!(
                    "{} keep-alive connections of {} were aborted at shutdown: {advice}",
                    own.keep_alive.aborted_connections,
                    recommendation::describe(&own.scope)
                ),
            );
            f.why = Some(recommendation::why(own));
            out.push(f);
        }
    }

    fn container_findings(
        &self,
        name: &str,
        hook: &Hook,
        out: &mut Vec<Finding>,
        change: &mut Change,
    ) {
        let line = self.w.container_line(name);
        let Some(delay) = hook.seconds() else {
            let severity = if self.opts.fail_on_unknown {
                Severity::Error
            } else {
                Severity::Warning
            };
            let mut f = self.finding(
                severity,
                Problem::UnknownPreStop,
                line,
                format!(
                    "cannot tell how long the preStop hook delays SIGTERM: {}",
                    hook.describe()
                ),
            );
            f.container = Some(name.to_string());
            f.has = Some(hook.describe());
            out.push(f);
            return;
        };
        let grace = self.w.grace_seconds();
        let drain = self.opts.drain_seconds;
        // The grace period holds the hook's longest wait (the adaptive
        // drain's max), the recommendation its guaranteed one.
        let longest = hook.longest().unwrap_or(delay);
        let mut needed_delay = longest;
        if let Some(rec) = self.rec
            && let Some(recommended) = rec.pre_stop_seconds
            && delay < recommended as f64
        {
            // Under `fail` the low confidence itself is the error (exit 5);
            // a shortfall against an untrustworthy number is only a warning.
            let severity =
                if rec.low_confidence && self.opts.low_confidence != LowConfidence::Ignore {
                    Severity::Warning
                } else {
                    Severity::Error
                };
            let mut f = self.finding(
                severity,
                Problem::PreStopBelowRecommendation,
                line,
                format!(
                    "{} is below the {recommended}s needed to outlast the measured endpoint propagation",
                    hook.describe()
                ),
            );
            f.container = Some(name.to_string());
            f.has = Some(hook.describe());
            f.recommended = Some(format!("preStop sleep {recommended}s"));
            f.why = Some(recommendation::why(rec));
            if severity == Severity::Error {
                needed_delay = needed_delay.max(recommended as f64);
                change.pre_stop.push((name.to_string(), recommended));
            }
            out.push(f);
        }
        let needed_grace = (needed_delay + drain).ceil() as i64;
        if (grace as f64) < longest + drain {
            let mut f = self.finding(
                Severity::Error,
                Problem::GracePeriodTooShort,
                self.w.grace_line(),
                format!(
                    "terminationGracePeriodSeconds {grace} cannot hold the {}s preStop plus {}s drain; \
                     the app is killed mid-drain",
                    fmt_secs(longest),
                    fmt_secs(drain)
                ),
            );
            f.container = Some(name.to_string());
            f.has = Some(format!("terminationGracePeriodSeconds: {grace}"));
            f.recommended = Some(format!("terminationGracePeriodSeconds: {needed_grace}"));
            out.push(f);
        }
        if (grace as f64) < needed_delay + drain {
            change.grace_seconds = Some(change.grace_seconds.unwrap_or(0).max(needed_grace));
        }
    }
}
