//! What the dashboards and alert rules query, shared by the promtool test
//! and the live-Prometheus lab test.

use std::path::{Path, PathBuf};

use serde_json::Value;

pub fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every dashboard under deploy/grafana, parsed.
pub fn dashboards() -> Vec<(PathBuf, Value)> {
    let mut out: Vec<(PathBuf, Value)> = std::fs::read_dir(deploy().join("grafana"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty());
    out
}

/// Every `expr` of every panel (rows nest panels) and the series selector
/// inside each `label_values(selector, label)` variable query.
pub fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(s, _)| s);
            out.push(
                inner
                    .unwrap_or_else(|| panic!("unexpected variable query {q}"))
                    .to_string(),
            );
        }
    }
    out
}

/// Grafana's built-in variables replaced by values PromQL accepts (the
/// windows as Grafana would pick them for `scrape`); the template variables
/// are used inside `=~"…"` matchers.
pub fn instantiate(expr: &str, scrape: &str) -> String {
    expr.replace("$__rate_interval", scrape)
        .replace("$__interval", scrape)
        .replace("$__range", "1h")
        .replace("$cluster", ".*")
        .replace("$namespace", ".*")
        .replace("$node", ".*")
}

pub fn rules_file() -> PathBuf {
    deploy().join("prometheus/prestop-rules.yaml")
}

/// `(recorded name, expression)` of every rule.
pub fn rule_exprs() -> Vec<(Option<String>, String)> {
    let text = std::fs::read_to_string(rules_file()).unwrap();
    let doc = &prestop_check::yaml::parse_stream(&text).unwrap()[0];
    let mut out = Vec::new();
    for group in doc.get("groups").unwrap().items() {
        for rule in group.get("rules").unwrap().items() {
            let record = rule
                .get("record")
                .and_then(|r| r.as_str())
                .map(str::to_string);
            out.push((
                record,
                rule.get("expr").unwrap().as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// Names of the form `prestop_…` (metrics) and `x:prestop_…:y` (recording
/// rules) in a query.
pub fn names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.contains("prestop_"))
        .map(str::to_string)
        .collect()
}
