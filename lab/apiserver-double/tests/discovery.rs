//! What kubectl needs beyond list and watch, against the real kube client:
//! discovery in both forms, DELETE handed to a pod deleter with the grace
//! period resolved, and Status errors for what the double does not do.

use std::sync::{Arc, Mutex};

use apiserver_double::{ApiServerDouble, DoubleError, PodDeleter, objects};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::discovery::{Discovery, Scope, verbs};

fn check_discovery(d: &Discovery) {
    for (group, kind, plural, scope) in [
        ("", "Pod", "pods", Scope::Namespaced),
        ("", "Node", "nodes", Scope::Cluster),
        ("", "Service", "services", Scope::Namespaced),
        (
            "discovery.k8s.io",
            "EndpointSlice",
            "endpointslices",
            Scope::Namespaced,
        ),
    ] {
        let g = d.get(group).unwrap_or_else(|| panic!("group {group:?}"));
        let (ar, caps) = g
            .recommended_kind(kind)
            .unwrap_or_else(|| panic!("{kind} in {group:?}"));
        assert_eq!(ar.plural, plural);
        assert_eq!(ar.version, "v1");
        assert_eq!(caps.scope, scope, "{kind}");
        assert!(caps.supports_operation(verbs::WATCH), "{kind} watch");
        assert_eq!(
            caps.supports_operation(verbs::DELETE),
            kind == "Pod",
            "{kind}"
        );
    }
}

#[tokio::test]
async fn kube_discovers_every_resource_in_both_forms() {
    let d = ApiServerDouble::start().await.unwrap();
    let client = d.client().unwrap();
    check_discovery(&Discovery::new(client.clone()).run().await.unwrap());
    check_discovery(&Discovery::new(client).run_aggregated().await.unwrap());
}

/// Records each deletion and carries it out the way the lab's kubelet
/// does: marks it through the double, removes it when told.
struct Recorder {
    double: Arc<ApiServerDouble>,
    calls: Mutex<Vec<(String, String, i64)>>,
}

impl PodDeleter for Recorder {
    fn delete_pod(&self, namespace: &str, name: &str, grace: i64) -> Result<(), DoubleError> {
        self.calls
            .lock()
            .unwrap()
            .push((namespace.into(), name.into(), grace));
        self.double.delete::<Pod>(namespace, name, grace)
    }
}

fn scheduled_pod(name: &str, grace: i64) -> Pod {
    let mut p = objects::pod("default", name, "10.0.0.9", "n1");
    p.spec.as_mut().unwrap().termination_grace_period_seconds = Some(grace);
    p
}

#[tokio::test]
async fn delete_goes_to_the_deleter_with_the_resolved_grace() {
    let d = Arc::new(ApiServerDouble::start().await.unwrap());
    let recorder = Arc::new(Recorder {
        double: d.clone(),
        calls: Mutex::new(Vec::new()),
    });
    d.serve_pod_deletions(recorder.clone());
    d.create(&scheduled_pod("a", 9)).unwrap();
    d.create(&scheduled_pod("b", 9)).unwrap();
    let pods: Api<Pod> = Api::namespaced(d.client().unwrap(), "default");

    // No grace in the request: the pod's terminationGracePeriodSeconds.
    let answer = pods.delete("a", &DeleteParams::default()).await.unwrap();
    let pod = answer
        .left()
        .expect("a graceful deletion answers the object");
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(9));
    assert!(pod.metadata.deletion_timestamp.is_some());
    // A second, shorter deletion: the deleter shortens the grace.
    pods.delete("a", &DeleteParams::default().grace_period(2))
        .await
        .unwrap();
    let a = d.get::<Pod>("default", "a").unwrap();
    assert_eq!(a.metadata.deletion_grace_period_seconds, Some(2));

    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-its-uid".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let err = pods.delete("b", &wrong_uid).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err}"
    );
    pods.delete("b", &DeleteParams::default().grace_period(4))
        .await
        .unwrap();
    assert_eq!(
        *recorder.calls.lock().unwrap(),
        [
            ("default".to_string(), "a".to_string(), 9),
            ("default".to_string(), "a".to_string(), 2),
            ("default".to_string(), "b".to_string(), 4)
        ]
    );

    let err = pods
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound" && s.message == "pods \"gone\" not found"),
        "{err}"
    );
}

#[tokio::test]
async fn unsupported_verbs_get_method_not_allowed() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&scheduled_pod("a", 1)).unwrap();
    d.create(&Node {
        metadata: kube::api::ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let client = d.client().unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let patch = Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}}));
    let err = pods
        .patch("a", &PatchParams::default(), &patch)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 405 && s.reason == "MethodNotAllowed"),
        "{err}"
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let err = nodes
        .delete("n1", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 405 && s.message.contains("delete") && s.message.contains("nodes")),
        "{err}"
    );
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let err = slices.get("missing").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.message == "endpointslices.discovery.k8s.io \"missing\" not found"),
        "{err}"
    );
}
