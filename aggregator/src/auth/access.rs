//! Readers of the HTTP API, as kube-rbac-proxy checks them: the bearer
//! token through TokenReview, then a SubjectAccessReview of the user for a
//! named verb on a named (virtual) resource, which RBAC Roles grant.

use std::sync::Arc;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::cache::Cache;
use super::review::{TokenReviewer, User};
use super::{AuthError, bearer};

/// The API group of the virtual resources RBAC grants on
/// (`deletions`, `recommendations`): no such API is served; RBAC accepts
/// rules for any group and resource name.
pub const API_GROUP: &str = "observer.prestop.dev";

/// The verb readers need on a resource.
pub const VERB: &str = "get";
/// The resource of `/v1/deletions` (always protected).
pub const DELETIONS: &str = "deletions";
/// The resource of `/v1/recommendations` (protected on request).
pub const RECOMMENDATIONS: &str = "recommendations";

/// What a reader must be allowed: `verb` on `resource` of [`API_GROUP`] in
/// `namespace` (the aggregator's).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Permission {
    verb: String,
    resource: String,
    namespace: String,
}

pub struct HttpAccess {
    reviewer: Arc<TokenReviewer>,
    sars: Api<SubjectAccessReview>,
    namespace: String,
    protect_recommendations: bool,
    /// (username, permission) -> allowed.
    decisions: Cache<bool>,
}

impl HttpAccess {
    pub fn new(
        reviewer: Arc<TokenReviewer>,
        client: kube::Client,
        settings: &super::TokenSettings,
    ) -> Self {
        Self {
            reviewer,
            sars: Api::all(client),
            namespace: settings.namespace.clone(),
            protect_recommendations: settings.protect_recommendations,
            decisions: Cache::new(settings.review.cache.clone()),
        }
    }

    /// Checks the `authorization` header's token for `get` on `resource`
    /// ([`DELETIONS`], [`RECOMMENDATIONS`]) when that resource is
    /// protected; refusals are logged and counted.
    pub async fn authorize(
        &self,
        authorization: Option<&[u8]>,
        resource: &str,
    ) -> Result<(), AuthError> {
        if resource == RECOMMENDATIONS && !self.protect_recommendations {
            return Ok(());
        }
        let permission = Permission {
            verb: VERB.into(),
            resource: resource.into(),
            namespace: self.namespace.clone(),
        };
        let r = self.check(authorization, &permission).await;
        if let Err(e) = &r {
            tracing::info!(resource = %permission.resource, error = %e, "HTTP API request refused");
            self.reviewer.count_refusal(e);
        }
        r
    }

    async fn check(
        &self,
        authorization: Option<&[u8]>,
        permission: &Permission,
    ) -> Result<(), AuthError> {
        let token = bearer(authorization)?;
        let user = self.reviewer.review(token).await?;
        let name = user.username.clone().unwrap_or_default();
        let key = format!(
            "{name}\n{}\n{}\n{}",
            permission.verb, permission.resource, permission.namespace
        );
        let allowed = match self.decisions.get(&key) {
            Some(a) => a,
            None => {
                let a = self.ask(&user, permission).await?;
                self.decisions.put(&key, a);
                a
            }
        };
        if !allowed {
            return Err(AuthError::Forbidden {
                user: name,
                verb: permission.verb.clone(),
                resource: format!(
                    "{}.{API_GROUP} in namespace {}",
                    permission.resource, permission.namespace
                ),
            });
        }
        Ok(())
    }

    async fn ask(&self, user: &User, p: &Permission) -> Result<bool, AuthError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid.clone(),
                groups: user.groups.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(p.verb.clone()),
                    group: Some(API_GROUP.into()),
                    resource: Some(p.resource.clone()),
                    namespace: Some(p.namespace.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let timeout = self.reviewer.timeout();
        let answer =
            tokio::time::timeout(timeout, self.sars.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    AuthError::Unavailable(format!(
                        "SubjectAccessReview: no answer within {timeout:?}"
                    ))
                })?
                .map_err(|e| AuthError::Unavailable(format!("SubjectAccessReview: {e}")))?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}
