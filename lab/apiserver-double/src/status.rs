//! Errors as the API server returns them: `Status` objects whose `reason`
//! and `code` kubectl turns into its usual messages
//! (`Error from server (NotFound): pods "x" not found`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::DoubleError;
use crate::discovery::Resource;

/// A failure `Status` with HTTP status `code`; `details` names the object
/// (`name`, `group`, `kind` as the plural resource).
pub fn failure(
    code: StatusCode,
    reason: &str,
    message: String,
    details: Option<Value>,
) -> Response {
    (
        code,
        axum::Json(body(code.as_u16(), reason, message, details)),
    )
        .into_response()
}

pub fn body(code: u16, reason: &str, message: String, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

fn details(resource: &Resource, name: &str) -> Value {
    let mut d = json!({ "name": name, "kind": resource.plural });
    if !resource.group.is_empty() {
        d["group"] = resource.group.into();
    }
    d
}

/// `pods "web-0" not found` (for a named group: `endpointslices.discovery.k8s.io "x" not found`).
pub fn not_found(resource: &Resource, name: &str) -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{} \"{name}\" not found", qualified(resource)),
        Some(details(resource, name)),
    )
}

/// A path the double does not serve.
pub fn no_route() -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource".into(),
        None,
    )
}

/// A verb the double does not carry out on this resource.
pub fn method_not_allowed(verb: &str, resource: &Resource) -> Response {
    failure(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!(
            "{verb} is not supported on resources of kind \"{}\"",
            qualified(resource)
        ),
        Some(json!({ "kind": resource.plural })),
    )
}

pub fn bad_request(message: String) -> Response {
    failure(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// A precondition of the request does not hold for the stored object.
pub fn conflict(resource: &Resource, name: &str, why: String) -> Response {
    failure(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            qualified(resource)
        ),
        Some(details(resource, name)),
    )
}

/// A failure of the double itself or of its [`crate::PodDeleter`].
pub fn internal(resource: &Resource, name: &str, e: &DoubleError) -> Response {
    match e {
        DoubleError::NotFound { .. } => not_found(resource, name),
        e => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("Internal error occurred: {e}"),
            Some(details(resource, name)),
        ),
    }
}

fn qualified(resource: &Resource) -> String {
    if resource.group.is_empty() {
        resource.plural.to_owned()
    } else {
        format!("{}.{}", resource.plural, resource.group)
    }
}
