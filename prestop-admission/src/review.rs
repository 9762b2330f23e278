//! What an AdmissionReview asks about: the workload to check, or why it is
//! left alone.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, Operation};
use prestop_check::workload::Workload;

/// The kinds the webhook checks, by API group: where pod templates are
/// written. Jobs and CronJobs run to completion and are not routed to
/// during a rollout; ReplicationControllers are left to prestop-check.
pub const KINDS: &[(&str, &str)] = &[
    ("", "Pod"),
    ("apps", "Deployment"),
    ("apps", "StatefulSet"),
    ("apps", "DaemonSet"),
    ("apps", "ReplicaSet"),
    ("argoproj.io", "Rollout"),
];

/// What to do with one request.
#[derive(Debug)]
pub enum Subject {
    /// `object` is the request's object as JSON, for patches.
    Check {
        workload: Box<Workload>,
        object: serde_json::Value,
    },
    /// Nothing to check, and why (for the debug log).
    Skip(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{kind} {namespace}/{name}: the object does not read as a {kind}: {source}")]
pub struct ReviewError {
    kind: String,
    namespace: String,
    name: String,
    source: serde_json::Error,
}

pub fn subject(req: &AdmissionRequest<DynamicObject>) -> Result<Subject, ReviewError> {
    let (group, version, kind) = (&req.kind.group, &req.kind.version, &req.kind.kind);
    if !KINDS.contains(&(group.as_str(), kind.as_str())) {
        return Ok(Subject::Skip(format!("{kind}.{group} is not checked")));
    }
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Ok(Subject::Skip(format!("{:?} is not checked", req.operation)));
    }
    // A Pod's containers' lifecycle and its grace period cannot change
    // after creation: an update could only be warned about in vain.
    if kind == "Pod" && req.operation == Operation::Update {
        return Ok(Subject::Skip("a Pod's lifecycle is immutable".into()));
    }
    let Some(object) = &req.object else {
        return Ok(Subject::Skip("no object".into()));
    };
    // A controller's ReplicaSets and Pods are checked where their template
    // is written (the Deployment, the Rollout): checking them again would
    // repeat every warning, and denying one would stall a rollout the
    // owner's admission already let through.
    if object
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true))
    {
        return Ok(Subject::Skip("owned by a controller".into()));
    }
    let mut json = serde_json::to_value(object).map_err(|source| error(req, source))?;
    let api_version = if group.is_empty() {
        version.clone()
    } else {
        format!("{group}/{version}")
    };
    if let Some(map) = json.as_object_mut() {
        map.entry("apiVersion")
            .or_insert(api_version.clone().into());
        map.entry("kind").or_insert(kind.clone().into());
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    match Workload::from_json(&api_version, kind, json.clone(), &namespace) {
        Ok(Some(workload)) => Ok(Subject::Check {
            workload: Box::new(workload),
            object: json,
        }),
        Ok(None) => Ok(Subject::Skip("no pod template of its own".into())),
        Err(source) => Err(error(req, source)),
    }
}

fn error(req: &AdmissionRequest<DynamicObject>, source: serde_json::Error) -> ReviewError {
    ReviewError {
        kind: req.kind.kind.clone(),
        namespace: req.namespace.clone().unwrap_or_default(),
        name: req.name.clone(),
        source,
    }
}
