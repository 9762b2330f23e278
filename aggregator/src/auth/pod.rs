//! Pods asking about themselves (`GET /v1/drain`): the pod's projected
//! ServiceAccount token, reviewed by the API server, names the pod it is
//! bound to (`user.extra`); the pod may ask about that pod only. No RBAC
//! grant is needed: being the pod is the permission.

use std::sync::Arc;

use super::agent::{EXTRA_POD_NAME, EXTRA_POD_UID};
use super::review::{TokenReviewer, extra};
use super::{AuthError, bearer};

/// The pod a token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    /// Absent only from API servers that name no pod UID.
    pub uid: Option<String>,
}

pub struct PodAuth {
    reviewer: Arc<TokenReviewer>,
}

impl PodAuth {
    pub fn new(reviewer: Arc<TokenReviewer>) -> Self {
        Self { reviewer }
    }

    /// The pod of the `authorization` header's token, if it is `namespace`/
    /// `pod`; refusals are logged and counted.
    pub async fn authorize(
        &self,
        authorization: Option<&[u8]>,
        namespace: &str,
        pod: &str,
    ) -> Result<PodIdentity, AuthError> {
        let r = self.check(authorization, namespace, pod).await;
        if let Err(e) = &r {
            tracing::info!(namespace, pod, error = %e, "drain request refused");
            self.reviewer.count_refusal(e);
        }
        r
    }

    async fn check(
        &self,
        authorization: Option<&[u8]>,
        namespace: &str,
        pod: &str,
    ) -> Result<PodIdentity, AuthError> {
        let token = bearer(authorization)?;
        let user = self.reviewer.review(token).await?;
        let username = user.username.clone().unwrap_or_default();
        let account_namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, _)| ns.to_owned());
        let (Some(ns), Some(name)) = (account_namespace, extra(&user, EXTRA_POD_NAME)) else {
            return Err(AuthError::NotAPod { user: username });
        };
        let bound = PodIdentity {
            namespace: ns,
            name,
            uid: extra(&user, EXTRA_POD_UID),
        };
        if bound.namespace != namespace || bound.name != pod {
            return Err(AuthError::OtherPod {
                bound: format!("{}/{}", bound.namespace, bound.name),
                asked: format!("{namespace}/{pod}"),
            });
        }
        Ok(bound)
    }
}
