//! The startup side of a routed workload: containers a Service routes to
//! without a readinessProbe (the kubelet marks them ready as soon as they
//! start: nodes route to them before they listen), and the aggregator's
//! measured finding when the workload's new pods refused connections after
//! being marked ready (`GET /v1/startup`). Warnings, errors with
//! `--fail-on-startup`.

use k8s_openapi::api::core::v1::Container;

use crate::check::{Evaluation, Finding, Problem, Severity};
use crate::recommendation::{QueryError, Resolver};

impl Evaluation<'_> {
    fn startup_severity(&self) -> Severity {
        if self.opts.fail_on_startup {
            Severity::Error
        } else {
            Severity::Warning
        }
    }

    /// A serving container without a readinessProbe.
    pub(crate) fn readiness_findings(&self, containers: &[&Container], out: &mut Vec<Finding>) {
        for c in containers.iter().filter(|c| c.readiness_probe.is_none()) {
            let mut f = self.finding(
                self.startup_severity(),
                Problem::NoReadinessProbe,
                self.w.container_line(&c.name),
                "no readinessProbe: the pod is ready as soon as its containers start, so nodes \
                 route to it before the server listens (connections refused after ready)"
                    .to_string(),
            );
            f.container = Some(c.name.clone());
            out.push(f);
        }
    }

    /// The aggregator's finding on the workload's new pods.
    pub(crate) fn measured_startup_findings(
        &self,
        resolver: &Resolver<'_>,
        out: &mut Vec<Finding>,
    ) -> Result<(), QueryError> {
        let workload = format!("{}/{}", self.w.namespace, self.w.name);
        let Some(report) = resolver.startup(&self.w.namespace, &workload)? else {
            return Ok(());
        };
        for measured in report.findings.iter().filter(|f| f.workload == workload) {
            let mut f = self.finding(
                self.startup_severity(),
                Problem::RefusedAfterReady,
                self.w.line,
                format!("measured: {}", measured.message),
            );
            f.why = Some(format!(
                "{} refused connections over {} new pods (window {} s after ready); GET /v1/startup?namespace={}&workload={workload} lists them",
                measured.refused_connections,
                measured.new_pods,
                report.window_seconds,
                self.w.namespace
            ));
            out.push(f);
        }
        Ok(())
    }
}
