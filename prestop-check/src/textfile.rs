//! `--metrics-file`: the preStop each routed container has, in the
//! Prometheus text format for node-exporter's textfile collector (or any
//! file-based scrape). The aggregator knows measurements, not manifests;
//! this is how the "recommendation vs. configured preStop" dashboard panel
//! and the p99-exceeds-preStop alert learn what workloads have.

use std::fmt::Write;

use crate::check::Checked;

pub const PRE_STOP: &str = "prestop_check_configured_prestop_seconds";
pub const GRACE: &str = "prestop_check_termination_grace_period_seconds";

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `cluster="…"` followed by a comma, or nothing.
fn cluster_label(cluster: Option<&str>) -> String {
    cluster.map_or(String::new(), |c| format!("cluster=\"{}\",", escape(c)))
}

/// Containers whose preStop is unknown are left out rather than exported
/// as zero. `cluster`, when given, labels every series (the label the
/// aggregator's series carry); without it, whoever publishes the file may
/// add it, and the alert rules join without it (docs/dashboards.md).
pub fn render(checked: &[Checked], cluster: Option<&str>) -> String {
    let cluster = cluster_label(cluster);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP {PRE_STOP} preStop delay configured in the manifests, per routed container and Service."
    );
    let _ = writeln!(out, "# TYPE {PRE_STOP} gauge");
    for c in checked {
        let Some(seconds) = c.pre_stop_seconds else {
            continue;
        };
        for svc in &c.services {
            let service = svc.split_once('/').map_or(svc.as_str(), |(_, s)| s);
            let _ = writeln!(
                out,
                "{PRE_STOP}{{{cluster}namespace=\"{}\",service=\"{}\",workload=\"{}\",container=\"{}\"}} {seconds}",
                escape(&c.namespace),
                escape(service),
                escape(&format!("{}/{}", c.kind, c.workload)),
                escape(&c.container)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP {GRACE} terminationGracePeriodSeconds of each routed workload."
    );
    let _ = writeln!(out, "# TYPE {GRACE} gauge");
    let mut seen = std::collections::BTreeSet::new();
    for c in checked {
        let workload = format!("{}/{}", c.kind, c.workload);
        if seen.insert((c.namespace.clone(), workload.clone())) {
            let _ = writeln!(
                out,
                "{GRACE}{{{cluster}namespace=\"{}\",workload=\"{}\"}} {}",
                escape(&c.namespace),
                escape(&workload),
                c.termination_grace_period_seconds
            );
        }
    }
    out
}
