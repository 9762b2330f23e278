//! Token verification by the API server (`TokenReview`), with the
//! aggregator's own audience, a deadline and a short cache.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use kube::api::{Api, PostParams};

use super::cache::Cache;
use super::{AuthError, CacheSettings};
use crate::metrics::{Metrics, ReasonLabel};

#[derive(Clone, Debug)]
pub struct ReviewSettings {
    /// The audience tokens must be issued for (the projected volume's
    /// `audience`); a token for the API server or another service is
    /// refused.
    pub audience: String,
    /// A review not answered by then counts as an outage: the caller is
    /// refused with `Unavailable` (kube's client retries a 503 for minutes).
    pub timeout: Duration,
    pub cache: CacheSettings,
}

/// A verified user: who the API server says the token belongs to.
pub type User = Arc<UserInfo>;

/// The first value of `user.extra[key]` (the pod and node a projected
/// token is bound to).
pub fn extra(user: &User, key: &str) -> Option<String> {
    user.extra
        .as_ref()
        .and_then(|e| e.get(key))
        .and_then(|v| v.first())
        .cloned()
}

pub struct TokenReviewer {
    reviews: Api<TokenReview>,
    settings: ReviewSettings,
    /// Refusals are cached too: a caller repeating a bad token costs one
    /// review per TTL.
    cache: Cache<Result<User, String>>,
    metrics: Arc<Metrics>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, settings: ReviewSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            reviews: Api::all(client),
            cache: Cache::new(settings.cache.clone()),
            settings,
            metrics,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// Counts a refused caller by the refusal's reason.
    pub fn count_refusal(&self, e: &AuthError) {
        self.metrics
            .auth_refusals
            .get_or_create(&ReasonLabel {
                reason: e.reason().into(),
            })
            .inc();
    }

    /// The user `token` authenticates, for this aggregator's audience.
    /// An outage is never cached and never accepts anyone.
    pub async fn review(&self, token: &str) -> Result<User, AuthError> {
        if let Some(answer) = self.cache.get(token) {
            return answer.map_err(AuthError::Rejected);
        }
        let answer = match self.ask(token).await {
            Ok(a) => a,
            Err(e) => {
                self.count("unavailable");
                tracing::error!(error = %e, "TokenReview failed: refusing every caller until it answers");
                return Err(e);
            }
        };
        self.count(if answer.is_ok() {
            "authenticated"
        } else {
            "rejected"
        });
        self.cache.put(token, answer.clone());
        answer.map_err(AuthError::Rejected)
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .token_reviews
            .get_or_create(&ReasonLabel {
                reason: outcome.into(),
            })
            .inc();
    }

    /// Ok(Ok(user)) authenticated, Ok(Err(why)) refused by the API server,
    /// Err(_) no answer.
    async fn ask(&self, token: &str) -> Result<Result<User, String>, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.settings.audience.clone()]),
            },
            ..Default::default()
        };
        let created = tokio::time::timeout(
            self.settings.timeout,
            self.reviews.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| {
            AuthError::Unavailable(format!("no answer within {:?}", self.settings.timeout))
        })?
        .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = created.status.unwrap_or_default();
        let audience_ok = status
            .audiences
            .as_ref()
            .is_none_or(|a| a.contains(&self.settings.audience));
        Ok(match (status.authenticated, status.user) {
            (Some(true), Some(user)) if audience_ok && user.username.is_some() => {
                Ok(Arc::new(user))
            }
            (Some(true), _) => Err(format!(
                "authenticated for audiences {:?}, not {:?}",
                status.audiences.unwrap_or_default(),
                self.settings.audience
            )),
            _ => Err(status
                .error
                .unwrap_or_else(|| "not authenticated".to_owned())),
        })
    }
}
