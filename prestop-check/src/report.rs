//! Output formats: human, JSON and GitHub Actions workflow commands.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::check::{Checked, Finding, Severity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
    /// `::error file=…,line=…::` annotations, shown inline on pull requests.
    Github,
}

/// A problem outside the comparison itself: unparsable manifests, an
/// unreachable aggregator (both stop the check before any comparison), a
/// file that could not be written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub severity: Severity,
    pub file: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report<'a> {
    pub exit_code: u8,
    pub failures: &'a [Failure],
    pub findings: &'a [Finding],
    pub checked: &'a [Checked],
    /// Objects of kinds this check does not read, by `apiVersion kind`.
    pub skipped: &'a BTreeMap<String, usize>,
}

/// "v1 ConfigMap (2), serving.knative.dev/v1 Service (1)".
pub fn kinds_list(skipped: &BTreeMap<String, usize>) -> String {
    let kinds: Vec<String> = skipped
        .iter()
        .map(|(kind, n)| format!("{kind} ({n})"))
        .collect();
    kinds.join(", ")
}

fn skipped_kinds(r: &Report<'_>) -> Option<String> {
    (!r.skipped.is_empty()).then(|| {
        format!(
            "not checked, kinds this check does not read: {}",
            kinds_list(r.skipped)
        )
    })
}

pub fn render(format: Format, report: &Report<'_>) -> String {
    match format {
        Format::Human => human(report),
        Format::Json => serde_json::to_string_pretty(report).unwrap_or_default() + "\n",
        Format::Github => github(report),
    }
}

fn label(severity: Severity, fixed: bool) -> &'static str {
    match (severity, fixed) {
        (_, true) => "fixed",
        (Severity::Error, _) => "error",
        (Severity::Warning, _) => "warning",
    }
}

fn human(r: &Report<'_>) -> String {
    let mut out = String::new();
    for f in r.failures {
        let at = match (&f.file, f.line) {
            (Some(file), Some(line)) => format!("{file}:{line}: "),
            (Some(file), None) => format!("{file}: "),
            _ => String::new(),
        };
        let _ = writeln!(out, "{at}{}: {}", label(f.severity, false), f.message);
    }
    for f in r.findings {
        let container = f
            .container
            .as_ref()
            .map(|c| format!(" container {c}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}:{}: {}: {}{container}: {}",
            f.file,
            f.line,
            label(f.severity, f.fixed),
            f.object,
            f.message
        );
        if let Some(has) = &f.has {
            let _ = writeln!(out, "    has:         {has}");
        }
        if let Some(rec) = &f.recommended {
            let _ = writeln!(out, "    recommended: {rec}");
        }
        if let Some(why) = &f.why {
            let _ = writeln!(out, "    why:         {why}");
        }
        if let Some(patch) = f.patch.as_ref().filter(|_| !f.fixed) {
            let _ = writeln!(out, "    patch:");
            for line in patch.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
    }
    let errors = r
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error && !f.fixed)
        .count();
    let warnings = r
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .count();
    let fixed = r.findings.iter().filter(|f| f.fixed).count();
    if let Some(skipped) = skipped_kinds(r) {
        let _ = writeln!(out, "prestop-check: {skipped}");
    }
    let _ = writeln!(
        out,
        "prestop-check: {} routed containers checked, {errors} errors, {warnings} warnings, {fixed} fixed (exit {})",
        r.checked.len(),
        r.exit_code
    );
    out
}

/// Workflow command escaping (actions/toolkit `command.ts`).
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

fn github(r: &Report<'_>) -> String {
    let mut out = String::new();
    for f in r.failures {
        let mut props = Vec::new();
        if let Some(file) = &f.file {
            props.push(format!("file={}", escape_property(file)));
        }
        if let Some(line) = f.line {
            props.push(format!("line={line}"));
        }
        props.push("title=prestop-check".to_string());
        let _ = writeln!(
            out,
            "::{} {}::{}",
            label(f.severity, false),
            props.join(","),
            escape_data(&f.message)
        );
    }
    for f in r.findings {
        let command = if f.fixed {
            "notice"
        } else {
            label(f.severity, false)
        };
        let mut message = format!("{}: {}", f.object, f.message);
        if let Some(c) = &f.container {
            message = format!("{} container {c}: {}", f.object, f.message);
        }
        for (name, value) in [
            ("has", &f.has),
            ("recommended", &f.recommended),
            ("why", &f.why),
        ] {
            if let Some(v) = value {
                message += &format!("\n{name}: {v}");
            }
        }
        if let Some(patch) = f.patch.as_ref().filter(|_| !f.fixed) {
            message += &format!("\npatch:\n{patch}");
        }
        let title = format!("prestop-check: {:?}", f.problem);
        let _ = writeln!(
            out,
            "::{command} file={},line={},title={}::{}",
            escape_property(&f.file),
            f.line,
            escape_property(&title),
            escape_data(&message)
        );
    }
    if let Some(skipped) = skipped_kinds(r) {
        let _ = writeln!(
            out,
            "::notice title=prestop-check::{}",
            escape_data(&skipped)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_escaping_keeps_one_line_per_annotation() {
        assert_eq!(escape_data("a%b\nc"), "a%25b%0Ac");
        assert_eq!(escape_property("x:y,z"), "x%3Ay%2Cz");
    }
}
