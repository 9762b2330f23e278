//! The text of warnings and denials (docs/admission.md quotes it): one
//! warning per finding, then the patch that fixes them all.

use prestop_check::check::{Finding, HookStyle, Severity, WorkloadOutcome};
use prestop_check::fix;
use prestop_check::workload::Workload;

use crate::names;

/// Shown once per answer when nothing could be compared.
pub fn unavailable(reason: &str) -> String {
    format!("prestop-admission: {reason}; preStop delays were not checked")
}

/// One line per finding: the object, the container, what is wrong, what
/// it needs and where that number comes from.
pub fn warning(f: &Finding) -> String {
    let mut s = format!("prestop: {}", f.object);
    if let Some(c) = &f.container {
        s += &format!(" container {c}");
    }
    s += &format!(": {}", f.message);
    if let Some(r) = &f.recommended {
        s += &format!("; needs {r}");
    }
    if let Some(why) = &f.why {
        s += &format!(" ({why})");
    }
    s
}

/// The fix as a strategic merge patch (containers merge by name): what to
/// merge into the manifest, or to pass to `kubectl patch -p` for the
/// built-in kinds.
pub fn fix_line(w: &Workload, outcome: &WorkloadOutcome, style: HookStyle) -> Option<String> {
    let change = outcome.change.as_ref()?;
    let patch = fix::patch_json(w, change, style);
    Some(format!(
        "prestop: fix {}: merge into the manifest {patch}",
        w.object()
    ))
}

/// Every warning of an outcome, the fix last.
pub fn warnings(w: &Workload, outcome: &WorkloadOutcome, style: HookStyle) -> Vec<String> {
    outcome
        .findings
        .iter()
        .map(warning)
        .chain(fix_line(w, outcome, style))
        .collect()
}

/// The denial under enforce, when a finding is an error: findings against a
/// low-confidence recommendation are warnings and never deny.
pub fn denial(w: &Workload, outcome: &WorkloadOutcome, style: HookStyle) -> Option<String> {
    let errors: Vec<String> = outcome
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(warning)
        .collect();
    if errors.is_empty() {
        return None;
    }
    let mut s = format!(
        "{} would lose requests at shutdown (namespace label {}=enforce):\n{}",
        w.object(),
        names::MODE_LABEL,
        errors.join("\n")
    );
    if let Some(fix) = fix_line(w, outcome, style) {
        s += &format!("\n{fix}");
    }
    s += "\nApply the fix to the manifest and apply again; to be warned instead of denied, remove the namespace label.";
    Some(s)
}
