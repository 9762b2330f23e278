//! Agents: a projected ServiceAccount token proves the agent's account and,
//! through the pod it is bound to, the one node it may speak for.

use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use tonic::metadata::MetadataMap;

use super::cache::Cache;
use super::review::{TokenReviewer, User, extra};
use super::{AuthError, CacheSettings, bearer};
use crate::correlate::Correlator;
use crate::readiness::Readiness;

pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// `namespace:name` of the agents' ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// The username TokenReview gives its tokens.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(Self {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("{s:?} is not NAMESPACE:NAME")),
        }
    }
}

/// What a call claims to speak for.
#[derive(Clone, Copy, Debug)]
pub enum Claim<'a> {
    /// Registration: this agent id for this node.
    Register { agent_id: &'a str, node: &'a str },
    /// Later calls: an agent id registered before.
    Agent(&'a str),
    /// Only an authenticated agent of a known node (clock exchanges).
    AnyNode,
}

pub struct AgentAuth {
    reviewer: Arc<TokenReviewer>,
    account: ServiceAccount,
    username: String,
    pods: Api<Pod>,
    /// Token -> node, for tokens whose review named no node (clusters
    /// before 1.30): the bound pod's `spec.nodeName`, read once per TTL.
    pod_nodes: Cache<String>,
    /// Until the watchers have listed once, a node not known yet may just
    /// not be read yet: its agent is asked to retry (`UNAVAILABLE`) rather
    /// than refused as speaking for an unknown node.
    nodes_synced: Readiness,
}

impl AgentAuth {
    pub fn new(
        reviewer: Arc<TokenReviewer>,
        account: ServiceAccount,
        client: kube::Client,
        cache: CacheSettings,
        nodes_synced: Readiness,
    ) -> Self {
        Self {
            nodes_synced,
            pods: Api::namespaced(client, &account.namespace),
            username: account.username(),
            account,
            reviewer,
            pod_nodes: Cache::new(cache),
        }
    }

    /// Checks the caller's token and `claim`; returns the node it speaks
    /// for. Refusals are logged and counted by reason.
    pub async fn authorize(
        &self,
        metadata: &MetadataMap,
        correlator: &Correlator,
        claim: Claim<'_>,
    ) -> Result<String, tonic::Status> {
        let r = self.check(metadata, correlator, claim).await;
        self.refused(r, claim)
    }

    /// Refuses a batch of a stream opened for `node` under another node's
    /// agent id.
    pub fn owns(
        &self,
        correlator: &Correlator,
        node: &str,
        agent_id: &str,
    ) -> Result<(), tonic::Status> {
        let r = owned_by(correlator, agent_id, node);
        self.refused(r, Claim::Agent(agent_id))
    }

    fn refused<T>(&self, r: Result<T, AuthError>, claim: Claim<'_>) -> Result<T, tonic::Status> {
        if let Err(e) = &r {
            tracing::warn!(?claim, error = %e, "agent call refused");
            self.reviewer.count_refusal(e);
        }
        r.map_err(Into::into)
    }

    async fn check(
        &self,
        metadata: &MetadataMap,
        correlator: &Correlator,
        claim: Claim<'_>,
    ) -> Result<String, AuthError> {
        let value = metadata.get("authorization").map(|v| v.as_bytes());
        let token = bearer(value)?;
        let user = self.reviewer.review(token).await?;
        let name = user.username.clone().unwrap_or_default();
        if name != self.username {
            return Err(AuthError::WrongAccount {
                user: name,
                expected: self.username.clone(),
            });
        }
        let bound = self.node_of(token, &user).await?;
        if !correlator.knows_node(&bound) {
            // Before the first list the node may just not be known yet.
            if !self.nodes_synced.get() {
                return Err(AuthError::NodesNotSynced);
            }
            return Err(AuthError::UnknownNode(bound));
        }
        let agent = match claim {
            Claim::Register { agent_id, node } => {
                if node != bound {
                    return Err(AuthError::OtherNode {
                        bound,
                        claimed: node.into(),
                    });
                }
                Some(agent_id)
            }
            Claim::Agent(agent_id) => Some(agent_id),
            Claim::AnyNode => None,
        };
        if let Some(id) = agent {
            owned_by(correlator, id, &bound)?;
        }
        Ok(bound)
    }

    /// The node of the token's pod binding: the review's node-name extra,
    /// else the bound pod's `spec.nodeName` (same uid as the binding).
    async fn node_of(&self, token: &str, user: &User) -> Result<String, AuthError> {
        let extra = |k: &str| extra(user, k);
        if let Some(node) = extra(EXTRA_NODE_NAME) {
            return Ok(node);
        }
        if let Some(node) = self.pod_nodes.get(token) {
            return Ok(node);
        }
        let no_node = || AuthError::NoNode {
            user: self.username.clone(),
        };
        let (Some(pod), Some(uid)) = (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) else {
            return Err(no_node());
        };
        let found = self
            .pods
            .get_opt(&pod)
            .await
            .map_err(|e| {
                AuthError::Unavailable(format!("reading pod {}/{pod}: {e}", self.account.namespace))
            })?
            .filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
            .ok_or_else(|| AuthError::Rejected(format!("the bound pod {pod} ({uid}) is gone")))?;
        let node = found.spec.and_then(|s| s.node_name).ok_or_else(no_node)?;
        self.pod_nodes.put(token, node.clone());
        Ok(node)
    }
}

/// An agent id registered for another node stays that node's: a report
/// under it would be taken as the other node's.
fn owned_by(correlator: &Correlator, agent_id: &str, bound: &str) -> Result<(), AuthError> {
    match correlator.agent_node(agent_id) {
        Some(owner) if owner != bound => Err(AuthError::OtherAgent {
            agent_id: agent_id.into(),
            owner,
            bound: bound.into(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_flag() {
        let sa: ServiceAccount = "observer:agent".parse().unwrap();
        assert_eq!(sa.username(), "system:serviceaccount:observer:agent");
        for bad in ["observer", ":agent", "observer:", "a:b:c"] {
            assert!(bad.parse::<ServiceAccount>().is_err(), "{bad}");
        }
    }
}
