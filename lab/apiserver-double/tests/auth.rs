//! TokenRequest, TokenReview and SubjectAccessReview against the real kube
//! client, with the fields a real API server sets.

use std::time::Duration;

use apiserver_double::ApiServerDouble;
use apiserver_double::auth::{
    API_AUDIENCE, AccessRule, EXTRA_NODE_NAME, EXTRA_NODE_UID, EXTRA_POD_NAME, EXTRA_POD_UID,
    TokenGrant,
};
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    TokenReviewStatus,
};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};

fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn agent_pod(name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("observer".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("agent".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn request_token(d: &ApiServerDouble, pod: &Pod, seconds: i64) -> kube::Result<TokenRequest> {
    let sas: Api<ServiceAccount> = Api::namespaced(d.client().unwrap(), "observer");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["prestop-aggregator".into()],
            expiration_seconds: Some(seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    sas.create_token_request("agent", &PostParams::default(), &req)
        .await
}

async fn review(d: &ApiServerDouble, token: &str, audience: &str) -> TokenReviewStatus {
    let reviews: Api<TokenReview> = Api::all(d.client().unwrap());
    let r = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: Some(vec![audience.into()]),
        },
        ..Default::default()
    };
    reviews
        .create(&PostParams::default(), &r)
        .await
        .unwrap()
        .status
        .unwrap()
}

#[tokio::test]
async fn a_pod_bound_token_reviews_as_its_service_account_pod_and_node() {
    let d = ApiServerDouble::start().await.unwrap();
    let n = d.create(&node("node-a")).unwrap();
    let pod = d.create(&agent_pod("agent-x", "node-a")).unwrap();
    let tr = request_token(&d, &pod, 600).await.unwrap();
    assert_eq!(tr.spec.expiration_seconds, Some(600));
    let status = tr.status.unwrap();
    let left = status.expiration_timestamp.0.as_second() - jiff_now();
    assert!((598..=601).contains(&left), "expires in {left} s");

    let s = review(&d, &status.token, "prestop-aggregator").await;
    assert_eq!(s.authenticated, Some(true), "{s:?}");
    assert_eq!(s.audiences.unwrap(), ["prestop-aggregator"]);
    let user = s.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:observer:agent")
    );
    assert!(
        user.groups
            .unwrap()
            .contains(&"system:serviceaccounts:observer".to_string())
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra[EXTRA_POD_NAME], ["agent-x"]);
    assert_eq!(extra[EXTRA_POD_UID], [pod.metadata.uid.unwrap()]);
    assert_eq!(extra[EXTRA_NODE_NAME], ["node-a"]);
    assert_eq!(extra[EXTRA_NODE_UID], [n.metadata.uid.unwrap()]);
    assert_eq!(d.token_reviews(), 1);
}

fn jiff_now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

#[tokio::test]
async fn reviews_refuse_wrong_audience_expiry_unknown_tokens_and_deleted_pods() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&node("node-a")).unwrap();
    let pod = d.create(&agent_pod("agent-x", "node-a")).unwrap();
    let token = request_token(&d, &pod, 3600)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;

    let wrong = review(&d, &token, "someone-else").await;
    assert_eq!(wrong.authenticated, Some(false));
    assert!(wrong.error.unwrap().contains("audiences"));
    let default_audience = review(&d, &token, API_AUDIENCE).await;
    assert_eq!(default_audience.authenticated, Some(false));

    let unknown = review(&d, "not-a-token", "prestop-aggregator").await;
    assert_eq!(unknown.authenticated, Some(false));
    assert!(unknown.user.unwrap().username.is_none());

    let expired = d
        .token(&TokenGrant {
            namespace: "observer",
            service_account: "agent",
            pod: Some("agent-x"),
            audiences: vec!["prestop-aggregator".into()],
            valid_for: Duration::ZERO,
        })
        .unwrap();
    let s = review(&d, &expired, "prestop-aggregator").await;
    assert_eq!(s.authenticated, Some(false));
    assert!(s.error.unwrap().contains("expired"));

    // The pod is replaced by one of the same name: the old token is void.
    d.finish_deletion::<Pod>("observer", "agent-x").unwrap();
    d.create(&agent_pod("agent-x", "node-a")).unwrap();
    let s = review(&d, &token, "prestop-aggregator").await;
    assert_eq!(s.authenticated, Some(false));
    assert!(s.error.unwrap().contains("UID"), "replaced pod");
}

#[tokio::test]
async fn token_requests_are_validated_as_the_api_server_does() {
    let d = ApiServerDouble::start().await.unwrap();
    let pod = d.create(&agent_pod("agent-x", "node-a")).unwrap();
    let short = request_token(&d, &pod, 60).await.unwrap_err();
    assert!(
        matches!(&short, kube::Error::Api(s) if s.code == 422 && s.message.contains("10 minutes")),
        "{short:?}"
    );
    let mut other = pod.clone();
    other.metadata.name = Some("missing".into());
    let missing = request_token(&d, &other, 600).await.unwrap_err();
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404),
        "{missing:?}"
    );
    let mut stale = pod.clone();
    stale.metadata.uid = Some("another-uid".into());
    let conflict = request_token(&d, &stale, 600).await.unwrap_err();
    assert!(
        matches!(&conflict, kube::Error::Api(s) if s.code == 409),
        "{conflict:?}"
    );
    // A token of another ServiceAccount cannot be bound to the agent's pod.
    let not_its_sa = d.token(&TokenGrant {
        namespace: "observer",
        service_account: "default",
        pod: Some("agent-x"),
        audiences: vec![],
        valid_for: Duration::from_secs(600),
    });
    assert!(not_its_sa.is_err());
}

async fn access(d: &ApiServerDouble, user: &str, verb: &str) -> kube::Result<bool> {
    let sars: Api<SubjectAccessReview> = Api::all(d.client().unwrap());
    let r = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some("observer.prestop.dev".into()),
                resource: Some("deletions".into()),
                namespace: Some("observer".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = sars.create(&PostParams::default(), &r).await?;
    Ok(out.status.unwrap().allowed)
}

#[tokio::test]
async fn access_reviews_follow_the_rule_table_and_outages_answer_503() {
    let d = ApiServerDouble::start().await.unwrap();
    let ci = "system:serviceaccount:ci:reader";
    assert!(!access(&d, ci, "get").await.unwrap(), "denied by default");
    d.set_access_rules(vec![AccessRule {
        user: ci.into(),
        verb: "get".into(),
        group: "observer.prestop.dev".into(),
        resource: "deletions".into(),
        namespace: Some("observer".into()),
    }]);
    assert!(access(&d, ci, "get").await.unwrap());
    assert!(!access(&d, ci, "delete").await.unwrap());
    assert!(!access(&d, "system:anonymous", "get").await.unwrap());

    d.set_reviews_unavailable(true);
    // kube retries 503s for minutes by default: one answer is enough here.
    let mut config = d.kube_config();
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let sars: Api<SubjectAccessReview> = Api::all(client.clone());
    let down = sars
        .create(&PostParams::default(), &SubjectAccessReview::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&down, kube::Error::Api(s) if s.code == 503),
        "{down:?}"
    );
    let reviews: Api<TokenReview> = Api::all(client);
    let r = reviews
        .create(&PostParams::default(), &TokenReview::default())
        .await
        .unwrap_err();
    assert!(matches!(&r, kube::Error::Api(s) if s.code == 503), "{r:?}");
}
