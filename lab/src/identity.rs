//! Agents' identities as a cluster gives them: each agent runs as a pod of
//! the agents' ServiceAccount on its node, and gets a projected token for
//! the aggregator's audience through `TokenRequest` (the kubelet's call).

use std::time::Duration;

use apiserver_double::{ApiServerDouble, DoubleError};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, PodSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Where deploy/ runs the agents, and the aggregator's defaults.
pub const NAMESPACE: &str = "prestop-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "prestop-agent";
pub const AUDIENCE: &str = "prestop-aggregator";
/// deploy/'s projected token lifetime (the API server's minimum).
pub const TOKEN_SECONDS: i64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("creating the agent pod of node {node}: {source}")]
    Pod { node: String, source: DoubleError },
    #[error("TokenRequest for the agent pod of node {node}: {source}")]
    Token { node: String, source: kube::Error },
    #[error("TokenRequest for the agent pod of node {node} returned no token")]
    NoToken { node: String },
}

/// The agent pod's name on `node`.
pub fn agent_pod_name(node: &str) -> String {
    format!("prestop-agent-{node}")
}

/// The agent pod of `node`, running as the agents' ServiceAccount.
pub fn agent_pod(node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(agent_pod_name(node)),
            namespace: Some(NAMESPACE.into()),
            labels: Some([("app.kubernetes.io/name".into(), "prestop-agent".into())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(AGENT_SERVICE_ACCOUNT.into()),
            host_network: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates (or keeps) `node`'s agent pod and returns a token bound to it
/// for `audience`, valid [`TOKEN_SECONDS`], as the kubelet's `TokenRequest`
/// for a projected volume gets it (the double's issuing path; the lab's
/// double listens inside the control-plane namespace, out of reach of an
/// HTTP client in the host's).
pub fn agent_token(
    double: &ApiServerDouble,
    node: &str,
    audience: &str,
) -> Result<String, DoubleError> {
    token_of_agent_pod(
        double,
        node,
        audience,
        Duration::from_secs(TOKEN_SECONDS.unsigned_abs()),
    )
}

/// `agent_token`, through the double's `TokenRequest` over HTTP.
pub async fn agent_token_requested(
    double: &ApiServerDouble,
    node: &str,
    audience: &str,
) -> Result<String, IdentityError> {
    let pod = ensure_agent_pod(double, node).map_err(|source| IdentityError::Pod {
        node: node.into(),
        source,
    })?;
    let client = double.client().map_err(|source| IdentityError::Pod {
        node: node.into(),
        source,
    })?;
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client, NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = accounts
        .create_token_request(AGENT_SERVICE_ACCOUNT, &Default::default(), &request)
        .await
        .map_err(|source| IdentityError::Token {
            node: node.into(),
            source,
        })?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| IdentityError::NoToken { node: node.into() })
}

fn ensure_agent_pod(double: &ApiServerDouble, node: &str) -> Result<Pod, DoubleError> {
    match double.get::<Pod>(NAMESPACE, &agent_pod_name(node)) {
        Some(p) => Ok(p),
        None => double.create(&agent_pod(node)),
    }
}

fn token_of_agent_pod(
    double: &ApiServerDouble,
    node: &str,
    audience: &str,
    valid_for: Duration,
) -> Result<String, DoubleError> {
    ensure_agent_pod(double, node)?;
    double.token(&apiserver_double::auth::TokenGrant {
        namespace: NAMESPACE,
        service_account: AGENT_SERVICE_ACCOUNT,
        pod: Some(&agent_pod_name(node)),
        audiences: vec![audience.into()],
        valid_for,
    })
}

/// A token of `node`'s agent pod that has already expired (only the
/// double's Rust API issues those).
pub fn expired_agent_token(double: &ApiServerDouble, node: &str) -> Result<String, DoubleError> {
    token_of_agent_pod(double, node, AUDIENCE, Duration::ZERO)
}

/// A token bound to pod `namespace/pod` (running as `default`) for the
/// aggregator's audience: what its projected volume holds for
/// `prestop-drain`.
pub fn pod_token(
    double: &ApiServerDouble,
    namespace: &str,
    pod: &str,
) -> Result<String, DoubleError> {
    double.token(&apiserver_double::auth::TokenGrant {
        namespace,
        service_account: "default",
        pod: Some(pod),
        audiences: vec![AUDIENCE.into()],
        valid_for: Duration::from_secs(TOKEN_SECONDS.unsigned_abs()),
    })
}

/// The ServiceAccount of the lab's and tests' HTTP API reader (CI).
pub const READER_SERVICE_ACCOUNT: &str = "prestop-reader";

/// A token of the reader's ServiceAccount for the aggregator's audience,
/// allowed (by the double's access rules, which this replaces) to `get`
/// `resources` of the aggregator's API group in [`NAMESPACE`], as a Role
/// would grant.
pub fn reader_token(
    double: &ApiServerDouble,
    group: &str,
    resources: &[&str],
) -> Result<String, DoubleError> {
    double.set_access_rules(
        resources
            .iter()
            .map(|r| apiserver_double::auth::AccessRule {
                user: format!("system:serviceaccount:{NAMESPACE}:{READER_SERVICE_ACCOUNT}"),
                verb: "get".into(),
                group: group.into(),
                resource: (*r).into(),
                namespace: Some(NAMESPACE.into()),
            })
            .collect(),
    );
    double.token(&apiserver_double::auth::TokenGrant {
        namespace: NAMESPACE,
        service_account: READER_SERVICE_ACCOUNT,
        pod: None,
        audiences: vec![AUDIENCE.into()],
        valid_for: Duration::from_secs(TOKEN_SECONDS.unsigned_abs()),
    })
}
