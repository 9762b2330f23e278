//! Authentication and authorization as the API server serves them to other
//! components: `TokenRequest` (a ServiceAccount token bound to a Pod),
//! `TokenReview` (what a token proves) and `SubjectAccessReview` (what a
//! user may do, decided by a rule table the tests set).
//!
//! Tokens are opaque random strings the double remembers; only the double
//! can verify them, as only the API server can verify its own. A review of a
//! pod-bound token answers as a 1.30+ API server does: the ServiceAccount's
//! username and groups, and the pod and its node in `user.extra`; it is
//! refused when expired, for another audience, or when the bound pod is gone
//! or was replaced (another uid).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestStatus, TokenReview, TokenReviewStatus, UserInfo,
};
use k8s_openapi::api::authorization::v1::{SubjectAccessReview, SubjectAccessReviewStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use crate::{DoubleError, Kind, Shared, status};

/// The audience of tokens requested without one, and of reviews that name
/// none (the API server's own, `--api-audiences`).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// `expirationSeconds` when a TokenRequest sets none.
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The API server refuses shorter token lifetimes.
const MIN_EXPIRATION_SECONDS: i64 = 600;

pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// One grant of the double's authorizer: `user` may do `verb` on
/// `resource` of API `group` (in `namespace`, or anywhere when `None`).
/// `"*"` matches any verb, group or resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRule {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
}

/// What a token was issued for.
#[derive(Clone, Debug)]
struct Issued {
    namespace: String,
    service_account: String,
    audiences: Vec<String>,
    expires: Timestamp,
    pod: Option<(String, String)>,
    credential_id: String,
}

#[derive(Default)]
pub(crate) struct Auth {
    tokens: HashMap<String, Issued>,
    rules: Vec<AccessRule>,
    issued: u64,
    reviews: u64,
    unavailable: bool,
}

/// A pod-bound token request, for the Rust API and the HTTP one alike.
#[derive(Clone, Debug)]
pub struct TokenGrant<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The pod the token is bound to (it must exist and run as the
    /// ServiceAccount); `None` for an unbound token.
    pub pod: Option<&'a str>,
    /// Empty: the API server's own audience.
    pub audiences: Vec<String>,
    /// May be zero or short in the Rust API (tests of expiry); the HTTP API
    /// refuses less than ten minutes as the API server does.
    pub valid_for: Duration,
}

fn random_hex() -> String {
    let a = std::hash::RandomState::new().build_hasher().finish();
    let b = std::hash::RandomState::new().build_hasher().finish();
    format!("{a:016x}{b:016x}")
}

impl Shared {
    pub(crate) fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a token; see [`crate::ApiServerDouble::token`].
    pub(crate) fn issue(&self, g: &TokenGrant<'_>) -> Result<(String, Timestamp), DoubleError> {
        let pod = match g.pod {
            Some(name) => {
                let pod = self.pod(g.namespace, name)?;
                let sa = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default");
                if sa != g.service_account {
                    return Err(DoubleError::Invalid(format!(
                        "the API server refuses to bind a token of service account {}/{} to pod {name}, which runs as {sa}",
                        g.namespace, g.service_account
                    )));
                }
                Some((name.to_owned(), pod.metadata.uid.unwrap_or_default()))
            }
            None => None,
        };
        let audiences = if g.audiences.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            g.audiences.clone()
        };
        let valid_for = SignedDuration::try_from(g.valid_for)
            .map_err(|e| DoubleError::Invalid(format!("token lifetime: {e}")))?;
        let expires = Timestamp::now()
            .checked_add(valid_for)
            .map_err(|e| DoubleError::Invalid(format!("token lifetime: {e}")))?;
        let token = format!("double.{}", random_hex());
        let mut auth = self.auth();
        auth.issued += 1;
        auth.tokens.insert(
            token.clone(),
            Issued {
                namespace: g.namespace.to_owned(),
                service_account: g.service_account.to_owned(),
                audiences,
                expires,
                pod,
                credential_id: format!("JTI={}", random_hex()),
            },
        );
        Ok((token, expires))
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<Pod, DoubleError> {
        let st = self.state();
        let v = st
            .objects
            .get(&(Kind::of::<Pod>(), namespace.into(), name.into()))
            .ok_or_else(|| DoubleError::NotFound {
                kind: "Pod".into(),
                key: format!("{namespace}/{name}"),
            })?;
        Ok(serde_json::from_value(v.clone())?)
    }

    fn node_uid(&self, name: &str) -> Option<String> {
        let st = self.state();
        let v = st
            .objects
            .get(&(Kind::of::<Node>(), String::new(), name.into()))?;
        v.pointer("/metadata/uid")?.as_str().map(str::to_owned)
    }

    /// What `token` proves for a reviewer accepting `audiences`.
    fn review(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus, String> {
        let issued = self
            .auth()
            .tokens
            .get(token)
            .cloned()
            .ok_or("invalid bearer token")?;
        if Timestamp::now() >= issued.expires {
            return Err("invalid bearer token, service account token has expired".into());
        }
        let wanted: Vec<String> = if audiences.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            audiences.to_vec()
        };
        let matched: Vec<String> = wanted
            .iter()
            .filter(|a| issued.audiences.contains(a))
            .cloned()
            .collect();
        if matched.is_empty() {
            return Err(format!(
                "invalid bearer token, token audiences {:?} is invalid for the target audiences {wanted:?}",
                issued.audiences
            ));
        }
        let ns = &issued.namespace;
        let mut extra = BTreeMap::new();
        extra.insert(
            EXTRA_CREDENTIAL_ID.to_owned(),
            vec![issued.credential_id.clone()],
        );
        if let Some((name, uid)) = &issued.pod {
            let pod = self
                .pod(ns, name)
                .map_err(|_| format!("invalid bearer token, pods \"{name}\" not found"))?;
            if pod.metadata.uid.as_deref() != Some(uid) {
                return Err(format!(
                    "invalid bearer token, the UID in the bound object reference ({uid}) does not match the UID in record. The object might have been deleted and then recreated"
                ));
            }
            extra.insert(EXTRA_POD_NAME.to_owned(), vec![name.clone()]);
            extra.insert(EXTRA_POD_UID.to_owned(), vec![uid.clone()]);
            if let Some(node) = pod.spec.and_then(|s| s.node_name) {
                if let Some(node_uid) = self.node_uid(&node) {
                    extra.insert(EXTRA_NODE_UID.to_owned(), vec![node_uid]);
                }
                extra.insert(EXTRA_NODE_NAME.to_owned(), vec![node]);
            }
        }
        Ok(TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(matched),
            user: Some(UserInfo {
                username: Some(format!(
                    "system:serviceaccount:{ns}:{}",
                    issued.service_account
                )),
                uid: Some(format!("sa-uid-{ns}-{}", issued.service_account)),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ]),
                extra: Some(extra),
            }),
            error: None,
        })
    }

    fn allowed(&self, user: &str, verb: &str, group: &str, resource: &str, ns: &str) -> bool {
        let any = |rule: &str, v: &str| rule == "*" || rule == v;
        self.auth().rules.iter().any(|r| {
            r.user == user
                && any(&r.verb, verb)
                && any(&r.group, group)
                && any(&r.resource, resource)
                && r.namespace.as_deref().is_none_or(|n| n == ns)
        })
    }
}

impl Auth {
    pub fn set_rules(&mut self, rules: Vec<AccessRule>) {
        self.rules = rules;
    }
    pub fn set_unavailable(&mut self, down: bool) {
        self.unavailable = down;
    }
    pub fn reviews(&self) -> u64 {
        self.reviews
    }
}

/// The POST paths of this module; `None` for any other.
pub(crate) fn route(shared: &Shared, segs: &[&str], body: &[u8]) -> Option<Response> {
    Some(match segs {
        [
            "api",
            "v1",
            "namespaces",
            ns,
            "serviceaccounts",
            name,
            "token",
        ] => token_request(shared, ns, name, body),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => token_review(shared, body),
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => {
            access_review(shared, body)
        }
        _ => return None,
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("the request body is not valid: {e}"))
}

fn invalid(kind: &str, message: String) -> Response {
    status::failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{kind} is invalid: {message}"),
        None,
    )
}

fn token_request(shared: &Shared, ns: &str, sa: &str, body: &[u8]) -> Response {
    let mut req: TokenRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return status::bad_request(e),
    };
    let seconds = req
        .spec
        .expiration_seconds
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    if seconds < MIN_EXPIRATION_SECONDS {
        return invalid(
            "TokenRequest.authentication.k8s.io",
            format!(
                "spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            ),
        );
    }
    let bound = req.spec.bound_object_ref.as_ref();
    if let Some(b) = bound
        && b.kind.as_deref() != Some("Pod")
    {
        return invalid(
            "TokenRequest.authentication.k8s.io",
            format!(
                "spec.boundObjectRef.kind: Unsupported value: {:?}: the double binds tokens to pods only",
                b.kind.as_deref().unwrap_or_default()
            ),
        );
    }
    let pod = bound.and_then(|b| b.name.as_deref());
    if let (Some(name), Some(uid)) = (pod, bound.and_then(|b| b.uid.as_deref()))
        && shared
            .pod(ns, name)
            .is_ok_and(|p| p.metadata.uid.as_deref() != Some(uid))
    {
        return status::failure(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "the UID in the bound object reference ({uid}) does not match the UID in record"
            ),
            None,
        );
    }
    let grant = TokenGrant {
        namespace: ns,
        service_account: sa,
        pod,
        audiences: req.spec.audiences.clone(),
        valid_for: Duration::from_secs(seconds.unsigned_abs()),
    };
    match shared.issue(&grant) {
        Ok((token, expires)) => {
            if req.spec.audiences.is_empty() {
                req.spec.audiences = vec![API_AUDIENCE.to_owned()];
            }
            req.spec.expiration_seconds = Some(seconds);
            req.metadata.namespace = Some(ns.to_owned());
            req.metadata.name = Some(sa.to_owned());
            req.status = Some(TokenRequestStatus {
                token,
                expiration_timestamp: Time(expires),
            });
            (StatusCode::CREATED, axum::Json(with_kind(&req))).into_response()
        }
        Err(DoubleError::NotFound { key, .. }) => status::failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{key}\" not found"),
            None,
        ),
        Err(e) => invalid("TokenRequest.authentication.k8s.io", e.to_string()),
    }
}

fn with_kind<T: k8s_openapi::Resource + serde::Serialize>(obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = T::API_VERSION.into();
    v["kind"] = T::KIND.into();
    v
}

fn unavailable() -> Response {
    status::failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "the server is currently unable to handle the request".into(),
        None,
    )
}

fn token_review(shared: &Shared, body: &[u8]) -> Response {
    let mut review: TokenReview = match parse(body) {
        Ok(r) => r,
        Err(e) => return status::bad_request(e),
    };
    {
        let mut auth = shared.auth();
        if auth.unavailable {
            return unavailable();
        }
        auth.reviews += 1;
    }
    let token = review.spec.token.clone().unwrap_or_default();
    let audiences = review.spec.audiences.clone().unwrap_or_default();
    review.status = Some(match shared.review(&token, &audiences) {
        Ok(s) => s,
        Err(error) => TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error),
            user: Some(UserInfo::default()),
            audiences: None,
        },
    });
    (StatusCode::CREATED, axum::Json(with_kind(&review))).into_response()
}

fn access_review(shared: &Shared, body: &[u8]) -> Response {
    let mut review: SubjectAccessReview = match parse(body) {
        Ok(r) => r,
        Err(e) => return status::bad_request(e),
    };
    if shared.auth().unavailable {
        return unavailable();
    }
    let spec = &review.spec;
    let user = spec.user.clone().unwrap_or_default();
    let Some(ra) = &spec.resource_attributes else {
        return invalid(
            "SubjectAccessReview.authorization.k8s.io",
            "spec.resourceAttributes: Required value: the double decides on resource attributes only".into(),
        );
    };
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    let (verb, group, resource, ns) =
        (s(&ra.verb), s(&ra.group), s(&ra.resource), s(&ra.namespace));
    let allowed = shared.allowed(&user, &verb, &group, &resource, &ns);
    review.status = Some(SubjectAccessReviewStatus {
        allowed,
        reason: Some(if allowed {
            format!("the double's rule table lets {user} {verb} {resource}.{group}")
        } else {
            String::new()
        }),
        ..Default::default()
    });
    (StatusCode::CREATED, axum::Json(with_kind(&review))).into_response()
}
