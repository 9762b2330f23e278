//! `DELETE` of one object over HTTP, with the API server's semantics for
//! pods: the grace period comes from the request (`DeleteOptions` body or
//! `gracePeriodSeconds` query) or the pod's `terminationGracePeriodSeconds`;
//! preconditions are checked; the rest is the [`crate::PodDeleter`]'s (a
//! pod already terminating may only have its grace shortened).

use std::collections::HashMap;

use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions;
use serde_json::Value;

use crate::discovery::Resource;
use crate::{Shared, status};

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

fn options(q: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOptions, String> {
    let mut opts: DeleteOptions = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        serde_json::from_slice(body).map_err(|e| format!("DeleteOptions in the body: {e}"))?
    };
    if let Some(g) = q.get("gracePeriodSeconds") {
        opts.grace_period_seconds = Some(
            g.parse()
                .map_err(|_| format!("gracePeriodSeconds {g:?}: not an integer"))?,
        );
    }
    if q.contains_key("dryRun") {
        opts.dry_run = Some(vec![q["dryRun"].clone()]);
    }
    Ok(opts)
}

/// The grace period the API server would use for this pod.
fn grace_seconds(opts: &DeleteOptions, pod: &Value) -> i64 {
    // An unscheduled pod has no kubelet to wait for: it goes at once.
    if pod.pointer("/spec/nodeName").is_none_or(Value::is_null) {
        return 0;
    }
    let grace = opts.grace_period_seconds.unwrap_or_else(|| {
        pod.pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(DEFAULT_GRACE_SECONDS)
    });
    // As the pod strategy does: a negative grace means "shortest".
    if grace < 0 { 1 } else { grace }
}

fn precondition_failure(opts: &DeleteOptions, obj: &Value) -> Option<String> {
    let pre = opts.preconditions.as_ref()?;
    let meta = &obj["metadata"];
    if let Some(uid) = &pre.uid {
        let have = meta["uid"].as_str().unwrap_or_default();
        if uid != have {
            return Some(format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
            ));
        }
    }
    if let Some(rv) = &pre.resource_version {
        let have = meta["resourceVersion"].as_str().unwrap_or_default();
        if rv != have {
            return Some(format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"
            ));
        }
    }
    None
}

/// Deletes `namespace/name` of `resource` (a resource whose verbs include
/// `delete`); answers with the object as the deletion left it.
pub fn delete(
    shared: &Shared,
    resource: &Resource,
    namespace: &str,
    name: &str,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    let opts = match options(q, body) {
        Ok(o) => o,
        Err(e) => return status::bad_request(e),
    };
    if opts.dry_run.as_ref().is_some_and(|d| !d.is_empty()) {
        return status::bad_request("dry runs are not supported by the API double".into());
    }
    let kind = resource.kind();
    let key = (kind.clone(), namespace.to_owned(), name.to_owned());
    let Some(before) = shared.state().objects.get(&key).cloned() else {
        return status::not_found(resource, name);
    };
    if let Some(why) = precondition_failure(&opts, &before) {
        return status::conflict(resource, name, why);
    }
    let grace = grace_seconds(&opts, &before);
    // The deleter runs without the state lock: it writes the deletion back
    // through the double.
    let result = match shared.deleter() {
        Some(deleter) => deleter.delete_pod(namespace, name, grace),
        None => shared.delete(&kind, namespace, name, grace),
    };
    if let Err(e) = result {
        return status::internal(resource, name, &e);
    }
    let after = shared.state().objects.get(&key).cloned();
    axum::Json(after.unwrap_or(before)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn grace_from_request_query_or_pod_spec() {
        let pod = json!({"spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 7}});
        let body = br#"{"kind":"DeleteOptions","apiVersion":"v1","gracePeriodSeconds":3,"propagationPolicy":"Background"}"#;
        assert_eq!(grace_seconds(&options(&q(&[]), body).unwrap(), &pod), 3);
        let opts = options(&q(&[("gracePeriodSeconds", "0")]), b"").unwrap();
        assert_eq!(grace_seconds(&opts, &pod), 0);
        assert_eq!(grace_seconds(&options(&q(&[]), b"").unwrap(), &pod), 7);
        let bare = json!({"spec": {"nodeName": "n1"}});
        assert_eq!(grace_seconds(&DeleteOptions::default(), &bare), 30);
        let unscheduled = json!({"spec": {}});
        assert_eq!(grace_seconds(&DeleteOptions::default(), &unscheduled), 0);
        let negative = DeleteOptions {
            grace_period_seconds: Some(-1),
            ..Default::default()
        };
        assert_eq!(grace_seconds(&negative, &pod), 1);
        assert!(options(&q(&[("gracePeriodSeconds", "x")]), b"").is_err());
        assert!(options(&q(&[]), b"{not json").is_err());
    }

    #[test]
    fn preconditions_name_both_values() {
        let pod = json!({"metadata": {"uid": "u1", "resourceVersion": "5"}});
        let opts: DeleteOptions =
            serde_json::from_value(json!({"preconditions": {"uid": "u2"}})).unwrap();
        let why = precondition_failure(&opts, &pod).unwrap();
        assert!(why.contains("u2") && why.contains("u1"), "{why}");
        let opts: DeleteOptions =
            serde_json::from_value(json!({"preconditions": {"uid": "u1", "resourceVersion": "5"}}))
                .unwrap();
        assert_eq!(precondition_failure(&opts, &pod), None);
    }
}
