//! Inject mode: the recommended preStop delay on every routed container
//! without a preStop hook, and a grace period long enough to hold it.
//!
//! A container that has a preStop hook keeps it (the validating webhook
//! warns when it is short): its owner chose it, and replacing it could drop
//! what it does besides waiting. The grace period is raised, never lowered,
//! to hold the longest delay of the pod plus the drain time. The object is
//! annotated with what was set and where the number comes from.
//!
//! The delay is one of two ([`Delay`], chosen by the webhook path):
//! - the fixed sleep. On clusters without the sleep action (before 1.30)
//!   the hook is `exec sleep N`, which needs `sleep` in the image: only
//!   containers known to have a shell get it (they run one, or the pod
//!   template's `observer.prestop.dev/image-has-shell` annotation names
//!   them); the others get nothing, and a warning says so;
//! - the adaptive drain: an init container copies the static
//!   `prestop-drain` binary into an emptyDir the routed containers mount,
//!   and their preStop execs it with the recommendation as its fallback.
//!   It needs neither a shell nor the sleep action, nor the
//!   SidecarContainers feature (README, "Adaptive drain"). Pieces already
//!   there from an earlier admission are recognised and not added twice;
//!   a volume, container or mount path of the same name that is not ours
//!   stops the injection with a warning rather than being overwritten.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use observer_proto::api::{DRAIN_ANSWER_SLACK_SECONDS, Recommendation};
use prestop_check::check::{Checked, HookStyle};
use prestop_check::fix::pre_stop_handler;
use prestop_check::hook::{Hook, is_shell};
use prestop_check::recommendation;
use prestop_check::workload::Workload;
use serde_json::{Value, json};

use crate::names;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Whether the cluster has `lifecycle.preStop.sleep` (1.30 and later).
    pub sleep_action: bool,
    pub drain_seconds: f64,
    pub adaptive_drain: AdaptiveDrain,
}

/// What the routed containers' preStop becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// Sleep the recommendation.
    FixedSleep,
    /// `prestop-drain`, falling back to the recommendation.
    AdaptiveDrain,
}

/// How injected `prestop-drain` hooks reach the aggregator.
#[derive(Debug, Clone)]
pub struct AdaptiveDrain {
    /// The prestop-drain image the init container runs.
    pub image: String,
    /// The aggregator's HTTP API as pods reach it (`http://` only).
    pub aggregator: String,
    /// The audience of the projected token (the aggregator's
    /// `--token-audience`).
    pub audience: String,
    /// `prestop-drain --max`: the longest the aggregator may hold a hook.
    pub max_seconds: u64,
}

/// Names and paths of what the adaptive drain adds to a pod.
pub mod drain {
    /// The init container and the emptyDir volume holding the binary.
    pub const NAME: &str = "prestop-drain";
    /// The projected ServiceAccount token volume.
    pub const TOKEN_VOLUME: &str = "prestop-drain-token";
    /// Where the emptyDir is mounted (the image's Containerfile names it).
    pub const DIR: &str = "/opt/prestop-drain";
    pub const BINARY: &str = "/opt/prestop-drain/prestop-drain";
    pub const TOKEN_DIR: &str = "/var/run/secrets/prestop-drain";
    pub const TOKEN_FILE: &str = "/var/run/secrets/prestop-drain/token";
    /// The kubelet refreshes the token at 80 % of this (600 is the least
    /// the API server accepts).
    pub const TOKEN_SECONDS: u64 = 600;
}

/// What injection does to one object.
#[derive(Debug, Default)]
pub struct Plan {
    pub patch: Patch,
    pub warnings: Vec<String>,
}

/// A routed container that has no preStop hook and a recommendation.
struct Candidate<'c> {
    name: &'c str,
    /// Index in the raw `containers` list.
    index: usize,
    seconds: u64,
    recommendation: &'c Recommendation,
}

/// One container's injected hook: its description, and the longest it can
/// delay SIGTERM.
struct Injected {
    container: String,
    summary: String,
    longest: f64,
}

pub fn plan(
    w: &Workload,
    object: &Value,
    checked: &[Checked],
    settings: &Settings,
    delay: Delay,
) -> Plan {
    let mut plan = Plan::default();
    let spec: Vec<&str> = w.pod_spec_path.to_vec();
    let raw_containers = pointer(object, &[&spec[..], &["containers"]].concat())
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut candidates = Vec::new();
    for c in checked {
        let Some(typed) = w.pod_spec.containers.iter().find(|t| t.name == c.container) else {
            continue;
        };
        if Hook::of(typed) != Hook::None {
            continue;
        }
        let Some((recommendation, seconds)) = c
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
        let Some(index) = raw_containers
            .iter()
            .position(|r| r["name"] == c.container.as_str())
        else {
            continue;
        };
        candidates.push(Candidate {
            name: &c.container,
            index,
            seconds,
            recommendation,
        });
    }
    let injected = match delay {
        Delay::FixedSleep => {
            fixed_sleep(&mut plan, w, object, &raw_containers, &candidates, settings)
        }
        Delay::AdaptiveDrain => adaptive_drain(
            &mut plan,
            w,
            object,
            &raw_containers,
            &candidates,
            &settings.adaptive_drain,
        ),
    };
    let Some(why) = candidates
        .iter()
        .find(|c| injected.iter().any(|i| i.container == c.name))
        .map(|c| recommendation::why(c.recommendation))
    else {
        return plan;
    };
    let mut summary: Vec<String> = injected.iter().map(|i| i.summary.clone()).collect();
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

/// `sleep N` hooks, the sleep action or `exec sleep` where the image has a
/// shell.
fn fixed_sleep(
    plan: &mut Plan,
    w: &Workload,
    object: &Value,
    raw_containers: &[Value],
    candidates: &[Candidate],
    settings: &Settings,
) -> Vec<Injected> {
    let spec = w.pod_spec_path;
    let shells = shell_containers(object, spec);
    let mut injected = Vec::new();
    for c in candidates {
        let raw = &raw_containers[c.index];
        let style = if settings.sleep_action {
            HookStyle::Sleep
        } else if shells.iter().any(|s| s == "*" || s == c.name) || runs_shell(raw) {
            HookStyle::Exec
        } else {
            plan.warnings.push(format!(
                "prestop: nothing injected into {} container {}: this cluster has no preStop sleep action \
                 (Kubernetes before 1.30) and the image is not known to have a shell for `exec sleep`; \
                 annotate the pod template {}: \"{}\" if it has one",
                w.object(),
                c.name,
                names::SHELL,
                c.name
            ));
            continue;
        };
        set_pre_stop(
            &mut plan.patch,
            &container_path(spec, c.index),
            raw,
            pre_stop_handler(c.seconds, style),
        );
        let seconds = c.seconds;
        injected.push(Injected {
            container: c.name.to_string(),
            summary: match style {
                HookStyle::Sleep => format!("{}: preStop sleep {seconds}s", c.name),
                HookStyle::Exec => format!("{}: preStop exec sleep {seconds}s", c.name),
            },
            longest: seconds as f64,
        });
    }
    injected
}

/// `prestop-drain` hooks, with the init container and volumes they need.
fn adaptive_drain(
    plan: &mut Plan,
    w: &Workload,
    object: &Value,
    raw_containers: &[Value],
    candidates: &[Candidate],
    settings: &AdaptiveDrain,
) -> Vec<Injected> {
    if candidates.is_empty() {
        return Vec::new();
    }
    let spec = w.pod_spec_path;
    let missing = match PodPieces::missing(object, spec, settings) {
        Ok(m) => m,
        Err(conflict) => {
            plan.warnings.push(format!(
                "prestop: nothing injected into {}: {conflict}; the adaptive drain needs these names \
                 (rename yours, or label the namespace observer.prestop.dev/inject=true for the fixed sleep)",
                w.object()
            ));
            return Vec::new();
        }
    };
    let mut injected = Vec::new();
    for c in candidates {
        let raw = &raw_containers[c.index];
        let (mounts, env) = match container_pieces(raw) {
            Ok(p) => p,
            Err(conflict) => {
                plan.warnings.push(format!(
                    "prestop: nothing injected into {} container {}: {conflict}",
                    w.object(),
                    c.name
                ));
                continue;
            }
        };
        let at = container_path(spec, c.index);
        append(&mut plan.patch, &at, raw, "volumeMounts", mounts);
        append(&mut plan.patch, &at, raw, "env", env);
        let fallback = format!("{}s", c.seconds);
        let max = format!("{}s", settings.max_seconds);
        let handler = json!({"exec": {"command": [
            drain::BINARY,
            "--aggregator", settings.aggregator,
            "--token-file", drain::TOKEN_FILE,
            "--fallback", fallback,
            "--max", max,
        ]}});
        set_pre_stop(&mut plan.patch, &at, raw, handler);
        // Without an answer it gives up at max plus the slack, and never
        // ends before the fallback.
        let longest = (settings.max_seconds + DRAIN_ANSWER_SLACK_SECONDS).max(c.seconds);
        injected.push(Injected {
            container: c.name.to_string(),
            summary: format!(
                "{}: preStop {} (fallback {fallback}, max {max})",
                c.name,
                drain::NAME
            ),
            longest: longest as f64,
        });
    }
    if !injected.is_empty() {
        let spec_value = pointer(object, spec).cloned().unwrap_or_default();
        if missing.init_container {
            let init = json!({
                "name": drain::NAME,
                "image": settings.image,
                "args": ["--copy-to", drain::BINARY],
                "volumeMounts": [{"name": drain::NAME, "mountPath": drain::DIR}],
                // Counted by quotas and LimitRanges; it only copies a file.
                "resources": {
                    "requests": {"cpu": "10m", "memory": "16Mi"},
                    "limits": {"cpu": "100m", "memory": "32Mi"}
                },
                // Passes the restricted Pod Security Standard.
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"}
                }
            });
            append(
                &mut plan.patch,
                spec,
                &spec_value,
                "initContainers",
                vec![init],
            );
        }
        let mut volumes = Vec::new();
        if missing.binary_volume {
            volumes.push(json!({"name": drain::NAME, "emptyDir": {"sizeLimit": "16Mi"}}));
        }
        if missing.token_volume {
            volumes.push(
                json!({"name": drain::TOKEN_VOLUME, "projected": {"sources": [
                    {"serviceAccountToken": {
                        "audience": settings.audience,
                        "expirationSeconds": drain::TOKEN_SECONDS,
                        "path": "token"
                    }}
                ]}}),
            );
        }
        append(&mut plan.patch, spec, &spec_value, "volumes", volumes);
    }
    injected
}

/// Which pod-level pieces of the adaptive drain are still to be added.
#[derive(Debug, PartialEq, Eq)]
struct PodPieces {
    init_container: bool,
    binary_volume: bool,
    token_volume: bool,
}

impl PodPieces {
    /// `Err` names a piece's name taken by something that is not ours.
    fn missing(object: &Value, spec: &[&str], settings: &AdaptiveDrain) -> Result<Self, String> {
        let list = |field: &str| -> Vec<Value> {
            pointer(object, &[spec, &[field]].concat())
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let named = |items: &[Value], name: &str| items.iter().find(|i| i["name"] == name).cloned();
        if named(&list("containers"), drain::NAME).is_some() {
            return Err(format!("a container is named {}", drain::NAME));
        }
        let init_container = match named(&list("initContainers"), drain::NAME) {
            None => true,
            Some(i) if i["args"] == json!(["--copy-to", drain::BINARY]) => false,
            Some(_) => {
                return Err(format!(
                    "an init container named {} does not run `--copy-to {}`",
                    drain::NAME,
                    drain::BINARY
                ));
            }
        };
        let volumes = list("volumes");
        let binary_volume = match named(&volumes, drain::NAME) {
            None => true,
            Some(v) if v.get("emptyDir").is_some() => false,
            Some(_) => {
                return Err(format!("a volume named {} is not an emptyDir", drain::NAME));
            }
        };
        let token_volume = match named(&volumes, drain::TOKEN_VOLUME) {
            None => true,
            Some(v)
                if v["projected"]["sources"].as_array().is_some_and(|s| {
                    s.iter().any(|s| {
                        s["serviceAccountToken"]["audience"] == settings.audience.as_str()
                            && s["serviceAccountToken"]["path"] == "token"
                    })
                }) =>
            {
                false
            }
            Some(_) => {
                return Err(format!(
                    "a volume named {} is not a projected token for audience {}",
                    drain::TOKEN_VOLUME,
                    settings.audience
                ));
            }
        };
        Ok(Self {
            init_container,
            binary_volume,
            token_volume,
        })
    }
}

/// The mounts and environment variables a container still needs for the
/// hook; `Err` names a mount path or variable it uses otherwise.
fn container_pieces(raw: &Value) -> Result<(Vec<Value>, Vec<Value>), String> {
    let empty = Vec::new();
    let mounts = raw["volumeMounts"].as_array().unwrap_or(&empty);
    let mut add_mounts = Vec::new();
    for (volume, path) in [
        (drain::NAME, drain::DIR),
        (drain::TOKEN_VOLUME, drain::TOKEN_DIR),
    ] {
        match mounts.iter().find(|m| m["mountPath"] == path) {
            None => add_mounts.push(json!({"name": volume, "mountPath": path, "readOnly": true})),
            Some(m) if m["name"] == volume => {}
            Some(m) => {
                return Err(format!(
                    "it mounts volume {} at {path}, where the adaptive drain mounts {volume}",
                    m["name"]
                ));
            }
        }
    }
    let env = raw["env"].as_array().unwrap_or(&empty);
    let mut add_env = Vec::new();
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        match env.iter().find(|e| e["name"] == name) {
            None => {
                add_env.push(json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}}))
            }
            Some(e) if e["valueFrom"]["fieldRef"]["fieldPath"] == field => {}
            Some(_) => {
                return Err(format!(
                    "it sets {name} otherwise than from {field}, and prestop-drain reads the pod's identity from it"
                ));
            }
        }
    }
    Ok((add_mounts, add_env))
}

/// The grace period that holds the pod's longest delay after injection
/// plus the drain time, when the current one (explicit or the default 30s)
/// is shorter. Hooks of unknown length count as nothing.
fn raised_grace(w: &Workload, injected: &[Injected], drain: f64) -> Option<i64> {
    let longest = w
        .pod_spec
        .containers
        .iter()
        .map(|c| match injected.iter().find(|i| i.container == c.name) {
            Some(i) => i.longest,
            None => Hook::of(c).longest().unwrap_or(0.0),
        })
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
fn runs_shell(c: &Value) -> bool {
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

/// `{spec}/containers/{index}`.
fn container_path(spec: &[&str], index: usize) -> Vec<String> {
    spec.iter()
        .map(|s| s.to_string())
        .chain(["containers".to_string(), index.to_string()])
        .collect()
}

/// Sets the preStop handler of the container at `at`, keeping the rest of
/// its lifecycle.
fn set_pre_stop(patch: &mut Patch, at: &[String], raw: &Value, handler: Value) {
    if raw.get("lifecycle").is_some() {
        let path = [at, &["lifecycle".to_string(), "preStop".to_string()]].concat();
        add(patch, &path, handler);
    } else {
        add(
            patch,
            &[at, &["lifecycle".to_string()]].concat(),
            json!({ "preStop": handler }),
        );
    }
}

/// Appends `items` to the list `field` of `parent` (at `at`), creating it
/// when absent.
fn append<S: AsRef<str>>(
    patch: &mut Patch,
    at: &[S],
    parent: &Value,
    field: &str,
    items: Vec<Value>,
) {
    if items.is_empty() {
        return;
    }
    let path: Vec<&str> = at.iter().map(AsRef::as_ref).chain([field]).collect();
    if parent.get(field).is_some_and(Value::is_array) {
        for item in items {
            add(patch, &[&path[..], &["-"]].concat(), item);
        }
    } else {
        add(patch, &path, Value::Array(items));
    }
}

fn add<S: AsRef<str>>(patch: &mut Patch, path: &[S], value: Value) {
    patch.0.push(PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().map(AsRef::as_ref)),
        value,
    }));
}

fn pointer<'v>(object: &'v Value, path: &[&str]) -> Option<&'v Value> {
    object.pointer(PointerBuf::from_tokens(path.iter().copied()).as_str())
}
