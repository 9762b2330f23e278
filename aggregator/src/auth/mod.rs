//! Who may talk to the aggregator: agents prove their ServiceAccount and
//! the node they run on with a projected token ([`agent`]), readers of the
//! HTTP API their identity and permission ([`access`]), pods asking about
//! their own drain the pod their token is bound to ([`pod`]); all through
//! the API server's TokenReview ([`review`]). The server's certificate is in
//! [`tls`].

pub mod access;
pub mod agent;
mod cache;
pub mod pod;
pub mod review;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::readiness::Readiness;
use access::HttpAccess;
use agent::{AgentAuth, ServiceAccount};
use pod::PodAuth;
use review::{ReviewSettings, TokenReviewer};
use tls::{TlsError, TlsFiles};

/// How callers are authenticated. The default (no tokens, no TLS) is for
/// tests that feed the correlator directly and `--insecure-no-auth`.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// `None`: anyone may register as any node and read every API.
    pub tokens: Option<TokenSettings>,
    /// `None`: the gRPC channel is plaintext.
    pub tls: Option<TlsFiles>,
}

#[derive(Clone, Debug)]
pub struct TokenSettings {
    pub review: ReviewSettings,
    /// The only ServiceAccount agents may run as.
    pub agents: ServiceAccount,
    /// The namespace of the access checks of HTTP readers (the aggregator's).
    pub namespace: String,
    /// Whether `/v1/recommendations` needs a token too (`/v1/deletions`
    /// always does).
    pub protect_recommendations: bool,
}

impl TokenSettings {
    /// Tokens for `audience`, agents running as `agents`, readers checked
    /// in `namespace`; reviews cached 10 s, 5 s to answer,
    /// `/v1/recommendations` open.
    pub fn new(audience: &str, agents: ServiceAccount, namespace: &str) -> Self {
        Self {
            review: ReviewSettings {
                audience: audience.into(),
                timeout: Duration::from_secs(5),
                cache: CacheSettings::default(),
            },
            agents,
            namespace: namespace.into(),
            protect_recommendations: false,
        }
    }
}

/// The checks [`AuthSettings`] ask for, built once at start.
#[derive(Clone, Default)]
pub struct Guards {
    pub agents: Option<Arc<AgentAuth>>,
    pub http: Option<Arc<HttpAccess>>,
    pub pods: Option<Arc<PodAuth>>,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "token checks need a Kubernetes client (TokenReview); run with Kubernetes or --insecure-no-auth"
    )]
    NoKube,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl AuthSettings {
    /// `nodes_synced` turns true once the Node list has been read: until
    /// then no agent's node can be checked.
    pub fn guards(
        &self,
        kube: Option<&kube::Client>,
        metrics: &Arc<Metrics>,
        nodes_synced: Readiness,
    ) -> Result<Guards, GuardError> {
        let tls = self.tls.as_ref().map(TlsFiles::server_config).transpose()?;
        let Some(t) = &self.tokens else {
            return Ok(Guards {
                tls,
                ..Guards::default()
            });
        };
        let client = kube.ok_or(GuardError::NoKube)?;
        let reviewer = Arc::new(TokenReviewer::new(
            client.clone(),
            t.review.clone(),
            Arc::clone(metrics),
        ));
        Ok(Guards {
            agents: Some(Arc::new(AgentAuth::new(
                Arc::clone(&reviewer),
                t.agents.clone(),
                client.clone(),
                t.review.cache.clone(),
                nodes_synced,
            ))),
            pods: Some(Arc::new(PodAuth::new(Arc::clone(&reviewer)))),
            http: Some(Arc::new(HttpAccess::new(reviewer, client.clone(), t))),
            tls,
        })
    }
}

/// Longest accepted bearer token: projected tokens are about 1 KiB; a
/// larger one is refused before it reaches the API server or the cache.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a caller was refused. Each names what it was refused for; tokens
/// are never logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token in the authorization metadata")]
    NoToken,
    #[error(
        "the authorization metadata is not \"Bearer <token>\" of at most {MAX_TOKEN_BYTES} bytes"
    )]
    Malformed,
    #[error("the token was refused by TokenReview: {0}")]
    Rejected(String),
    #[error("TokenReview is unavailable, nobody can be authenticated: {0}")]
    Unavailable(String),
    #[error("the Node list has not been read yet (the aggregator is starting): retry")]
    NodesNotSynced,
    #[error("{user:?} is not the agents' service account {expected:?}")]
    WrongAccount { user: String, expected: String },
    #[error("the token of {user:?} is bound to no pod on a node")]
    NoNode { user: String },
    #[error("node {0:?} is not in the Node list")]
    UnknownNode(String),
    #[error("the token speaks for node {bound:?}, not for {claimed:?}")]
    OtherNode { bound: String, claimed: String },
    #[error("agent {agent_id:?} belongs to node {owner:?}; this token speaks for {bound:?}")]
    OtherAgent {
        agent_id: String,
        owner: String,
        bound: String,
    },
    #[error("{user:?} is no pod's ServiceAccount token: only a pod may ask about its own drain")]
    NotAPod { user: String },
    #[error("the token of pod {bound} may only ask about that pod, not {asked}")]
    OtherPod { bound: String, asked: String },
    #[error("{user:?} may not {verb} {resource}")]
    Forbidden {
        user: String,
        verb: String,
        resource: String,
    },
}

impl AuthError {
    /// The metric label of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoToken | Self::Malformed | Self::Rejected(_) => "unauthenticated",
            Self::Unavailable(_) => "review_unavailable",
            Self::NodesNotSynced => "starting",
            Self::WrongAccount { .. }
            | Self::NoNode { .. }
            | Self::UnknownNode(_)
            | Self::OtherNode { .. }
            | Self::OtherAgent { .. }
            | Self::NotAPod { .. }
            | Self::OtherPod { .. }
            | Self::Forbidden { .. } => "forbidden",
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e.reason() {
            "unauthenticated" => Self::unauthenticated(msg),
            "review_unavailable" | "starting" => Self::unavailable(msg),
            _ => Self::permission_denied(msg),
        }
    }
}

/// The token of an `authorization: Bearer <token>` value (gRPC metadata or
/// HTTP header).
pub fn bearer(value: Option<&[u8]>) -> Result<&str, AuthError> {
    let v = value.ok_or(AuthError::NoToken)?;
    let v = std::str::from_utf8(v).map_err(|_| AuthError::Malformed)?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or(AuthError::Malformed)?;
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// How long a review's answer is reused, and how many are kept.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Kept well under the shortest token lifetime (10 minutes): a token
    /// whose pod was deleted is refused at most this late.
    pub ttl: Duration,
    pub max_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            max_entries: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(Some(b"Bearer abc")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::NoToken));
        assert_eq!(bearer(Some(b"Basic abc")), Err(AuthError::Malformed));
        assert_eq!(bearer(Some(b"Bearer ")), Err(AuthError::Malformed));
        let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(bearer(Some(huge.as_bytes())), Err(AuthError::Malformed));
    }
}
