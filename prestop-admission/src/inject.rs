//! Inject mode: the recommended preStop sleep on every routed container
//! without a preStop hook, and a grace period long enough to hold it.
//!
//! A container that has a preStop hook keeps it (the validating webhook
//! warns when it is short): its owner chose it, and replacing it could drop
//! what it does besides waiting. The grace period is raised, never lowered,
//! to hold the longest delay of the pod plus the drain time. The object is
//! annotated with what was set and where the number comes from.
//!
//! On clusters without the sleep action (before 1.30) the hook is `exec
//! sleep N`, which needs `sleep` in the image: only containers known to
//! have a shell get it (they run one, or the pod template's
//! `observer.prestop.dev/image-has-shell` annotation names them); the others
//! get nothing, and a warning says so.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use prestop_check::check::{Checked, HookStyle};
use prestop_check::fix::pre_stop_handler;
use prestop_check::hook::{Hook, is_shell};
use prestop_check::recommendation;
use prestop_check::workload::Workload;
use serde_json::{Value, json};

use crate::names;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Whether the cluster has `lifecycle.preStop.sleep` (1.30 and later).
    pub sleep_action: bool,
    pub drain_seconds: f64,
}

/// What injection does to one object.
#[derive(Debug, Default)]
pub struct Plan {
    pub patch: Patch,
    pub warnings: Vec<String>,
}

pub fn plan(w: &Workload, object: &Value, checked: &[Checked], settings: Settings) -> Plan {
    let mut plan = Plan::default();
    let spec: Vec<&str> = w.pod_spec_path.to_vec();
    let raw_containers = pointer(object, &[&spec[..], &["containers"]].concat())
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let shells = shell_containers(object, &spec);
    let mut injected: Vec<(String, u64, HookStyle)> = Vec::new();
    let mut why = None;
    for c in checked {
        let Some(typed) = w.pod_spec.containers.iter().find(|t| t.name == c.container) else {
            continue;
        };
        if Hook::of(typed) != Hook::None {
            continue;
        }
        let Some((rec, seconds)) = c
            .recommendation
            .as_ref()
            .and_then(|r| Some((r, r.pre_stop_seconds.filter(|s| *s > 0)?)))
        else {
            plan.warnings.push(format!(
                "prestop: nothing injected into {} container {}: no measured recommendation for {}",
                w.object(),
                c.container,
                c.services.join(", ")
            ));
            continue;
        };
        let style = if settings.sleep_action {
            HookStyle::Sleep
        } else if shells.iter().any(|s| s == "*" || *s == c.container)
            || runs_shell(
                raw_containers
                    .iter()
                    .find(|r| r["name"] == c.container.as_str()),
            )
        {
            HookStyle::Exec
        } else {
            plan.warnings.push(format!(
                "prestop: nothing injected into {} container {}: this cluster has no preStop sleep action \
                 (Kubernetes before 1.30) and the image is not known to have a shell for `exec sleep`; \
                 annotate the pod template {}: \"{}\" if it has one",
                w.object(),
                c.container,
                names::SHELL,
                c.container
            ));
            continue;
        };
        let Some(index) = raw_containers
            .iter()
            .position(|r| r["name"] == c.container.as_str())
        else {
            continue;
        };
        let has_lifecycle = raw_containers[index].get("lifecycle").is_some();
        let index = index.to_string();
        let at = [&spec[..], &["containers", &index]].concat();
        let handler = pre_stop_handler(seconds, style);
        if has_lifecycle {
            add(
                &mut plan.patch,
                &[&at[..], &["lifecycle", "preStop"]].concat(),
                handler,
            );
        } else {
            add(
                &mut plan.patch,
                &[&at[..], &["lifecycle"]].concat(),
                json!({ "preStop": handler }),
            );
        }
        injected.push((c.container.clone(), seconds, style));
        why.get_or_insert_with(|| recommendation::why(rec));
    }
    let Some(why) = why else {
        return plan;
    };
    let mut summary: Vec<String> = injected
        .iter()
        .map(|(name, seconds, style)| match style {
            HookStyle::Sleep => format!("{name}: preStop sleep {seconds}s"),
            HookStyle::Exec => format!("{name}: preStop exec sleep {seconds}s"),
        })
        .collect();
    if let Some(grace) = raised_grace(w, &injected, settings.drain_seconds) {
        add(
            &mut plan.patch,
            &[&spec[..], &["terminationGracePeriodSeconds"]].concat(),
            grace.into(),
        );
        summary.push(format!(
            "terminationGracePeriodSeconds {} -> {grace}",
            w.grace_seconds()
        ));
    }
    let summary = summary.join("; ");
    plan.warnings.push(format!(
        "prestop: injected into {}: {summary} ({why})",
        w.object()
    ));
    annotate(
        &mut plan.patch,
        object,
        &[(names::INJECTED, summary), (names::INJECTED_WHY, why)],
    );
    plan
}

/// The grace period that holds the pod's longest delay after injection
/// plus the drain time, when the current one (explicit or the default 30s)
/// is shorter. Hooks of unknown length count as nothing.
fn raised_grace(w: &Workload, injected: &[(String, u64, HookStyle)], drain: f64) -> Option<i64> {
    let longest = w
        .pod_spec
        .containers
        .iter()
        .map(
            |c| match injected.iter().find(|(name, ..)| *name == c.name) {
                Some((_, seconds, _)) => *seconds as f64,
                None => Hook::of(c).seconds().unwrap_or(0.0),
            },
        )
        .fold(0.0, f64::max);
    let needed = (longest + drain).ceil() as i64;
    (w.grace_seconds() < needed).then_some(needed)
}

/// Names from the pod template's shell annotation.
fn shell_containers(object: &Value, spec: &[&str]) -> Vec<String> {
    let template_meta = [
        &spec[..spec.len() - 1],
        &["metadata", "annotations", names::SHELL],
    ]
    .concat();
    pointer(object, &template_meta)
        .and_then(Value::as_str)
        .map(|s| s.split(',').map(|n| n.trim().to_string()).collect())
        .unwrap_or_default()
}

/// Whether the container runs a shell itself (its command, or an exec
/// probe): then its image has one.
fn runs_shell(container: Option<&Value>) -> bool {
    let Some(c) = container else { return false };
    let first = |v: &Value| v.get(0).and_then(Value::as_str).is_some_and(is_shell);
    c.get("command").is_some_and(first)
        || ["livenessProbe", "readinessProbe", "startupProbe"]
            .iter()
            .filter_map(|p| c.get(p)?.get("exec")?.get("command"))
            .any(first)
}

/// Adds annotations, creating the map when the object has none.
fn annotate(patch: &mut Patch, object: &Value, entries: &[(&str, String)]) {
    if object
        .pointer("/metadata/annotations")
        .is_some_and(Value::is_object)
    {
        for (key, value) in entries {
            add(
                patch,
                &["metadata", "annotations", key],
                value.clone().into(),
            );
        }
    } else {
        let map: serde_json::Map<String, Value> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone().into()))
            .collect();
        add(patch, &["metadata", "annotations"], Value::Object(map));
    }
}

fn add(patch: &mut Patch, path: &[&str], value: Value) {
    patch.0.push(PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    }));
}

fn pointer<'v>(object: &'v Value, path: &[&str]) -> Option<&'v Value> {
    object.pointer(PointerBuf::from_tokens(path.iter().copied()).as_str())
}
