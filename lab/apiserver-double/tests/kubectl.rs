//! The real kubectl (on PATH) against the double: discovery, tables, JSON,
//! describe, delete and its errors. The lab's root e2e test drives a whole
//! deletion through it; this one pins the wire shapes kubectl needs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiserver_double::kubectl::Kubectl;
use apiserver_double::{ApiServerDouble, DoubleError, PodDeleter, objects};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn kubectl(d: &ApiServerDouble, test: &str) -> Kubectl {
    let dir = std::env::temp_dir().join(format!("double-kubectl-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, d.kubeconfig_yaml()).unwrap();
    Kubectl::new(kubeconfig, dir.join("cache"))
}

/// Records each deletion's grace period and finishes it after half a
/// second, as a kubelet would once the pod's processes ended.
struct Kubelet {
    double: Arc<ApiServerDouble>,
    graces: Mutex<Vec<i64>>,
}

impl PodDeleter for Kubelet {
    fn delete_pod(&self, namespace: &str, name: &str, grace: i64) -> Result<(), DoubleError> {
        self.graces.lock().unwrap().push(grace);
        self.double.delete::<Pod>(namespace, name, grace)?;
        let (double, namespace, name) =
            (self.double.clone(), namespace.to_owned(), name.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = double.finish_deletion::<Pod>(&namespace, &name);
        });
        Ok(())
    }
}

fn running_pod(name: &str, ip: &str) -> Pod {
    let mut p = objects::pod("default", name, ip, "node-1");
    let spec = p.spec.as_mut().unwrap();
    spec.termination_grace_period_seconds = Some(5);
    spec.containers = vec![k8s_openapi::api::core::v1::Container {
        name: "web".into(),
        ..Default::default()
    }];
    p.status.as_mut().unwrap().phase = Some("Running".into());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_gets_describes_and_deletes() {
    let d = Arc::new(ApiServerDouble::start().await.unwrap());
    let kubelet = Arc::new(Kubelet {
        double: d.clone(),
        graces: Mutex::new(Vec::new()),
    });
    d.serve_pod_deletions(kubelet.clone());
    let web0 = d.create(&running_pod("web-0", "10.244.1.5")).unwrap();
    d.create(&running_pod("web-1", "10.244.2.6")).unwrap();
    d.create(&objects::endpoint_slice(
        "default",
        "web",
        &[(&web0, true, false)],
    ))
    .unwrap();
    let k = kubectl(&d, "basics");

    let table = k.ok(&["get", "pods", "-o", "wide"]).await.unwrap();
    let header = table.lines().next().unwrap();
    for col in ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"] {
        assert!(header.contains(col), "{col} missing: {header}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web-0") && l.contains("Running") && l.contains("10.244.1.5")),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "po", "-o", "json"]).await.unwrap()).unwrap();
    let names: Vec<&str> = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["web-0", "web-1"]);
    let yaml = k
        .ok(&["get", "endpointslices", "-o", "yaml"])
        .await
        .unwrap();
    assert!(
        yaml.contains("kind: EndpointSlice") && yaml.contains("10.244.1.5"),
        "{yaml}"
    );
    let slices = k.ok(&["get", "endpointslices"]).await.unwrap();
    assert!(
        slices.contains("web-abcde") && slices.contains("IPv4"),
        "{slices}"
    );

    // get -w on the slice sees the endpoint turn terminating.
    let mut watch = k
        .watch(&[
            "get",
            "endpointslices",
            "-w",
            "-o",
            "custom-columns=IP:.endpoints[*].addresses[0],TERMINATING:.endpoints[*].conditions.terminating",
        ])
        .unwrap();
    let wait = Duration::from_secs(10);
    let mut row = async || {
        let line = watch.next_line(wait).await.expect("a line of get -w");
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(row().await, ["IP", "TERMINATING"]);
    assert_eq!(row().await, ["10.244.1.5", "false"]);
    d.apply(&objects::endpoint_slice(
        "default",
        "web",
        &[(&web0, false, true)],
    ))
    .unwrap();
    assert_eq!(row().await, ["10.244.1.5", "true"]);
    drop(watch);

    let described = k.ok(&["describe", "pod", "web-0"]).await.unwrap();
    assert!(
        described.contains("Name:") && described.contains("web-0"),
        "{described}"
    );
    assert!(described.contains("10.244.1.5"), "{described}");

    let deleted = k
        .ok(&["delete", "pod", "web-0", "--grace-period=3"])
        .await
        .unwrap();
    assert!(deleted.contains("pod \"web-0\" deleted"), "{deleted}");
    assert!(d.get::<Pod>("default", "web-0").is_none());

    d.create(&running_pod("web-2", "10.244.2.7")).unwrap();
    k.ok(&["delete", "pod", "web-2", "--now"]).await.unwrap();
    k.ok(&["delete", "pod", "web-1"]).await.unwrap();
    // --grace-period, --now (1 s), none (the pod's 5 s).
    assert_eq!(*kubelet.graces.lock().unwrap(), [3, 1, 5]);

    let missing = k.run(&["get", "pod", "web-0"]).await.unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("Error from server (NotFound): pods \"web-0\" not found")
    );
    d.create(&running_pod("web-3", "10.244.2.8")).unwrap();
    let label = k.run(&["label", "pod", "web-3", "x=y"]).await.unwrap();
    assert!(!label.status.success());
    assert!(
        String::from_utf8_lossy(&label.stderr).contains("Error from server (MethodNotAllowed)"),
        "{}",
        String::from_utf8_lossy(&label.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_lists_nodes_services_and_resource_types() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&Node {
        metadata: ObjectMeta {
            name: Some("node-1".into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "10.100.0.2".into(),
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    d.create(&Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
    .unwrap();
    d.create(&running_pod("web-0", "10.244.1.5")).unwrap();
    let k = kubectl(&d, "kinds");

    let nodes = k.ok(&["get", "no", "-o", "wide"]).await.unwrap();
    let row: Vec<&str> = nodes.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["node-1", "Ready", "<none>"], "{nodes}");
    assert!(row.contains(&"10.100.0.2"), "{nodes}");

    let services = k.ok(&["get", "svc", "-o", "wide"]).await.unwrap();
    let row: Vec<&str> = services
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..5],
        ["web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP"],
        "{services}"
    );
    assert_eq!(row.last(), Some(&"app=web"), "{services}");

    // `all` is the category of pods and services.
    let all = k.ok(&["get", "all"]).await.unwrap();
    assert!(
        all.contains("pod/web-0") && all.contains("service/web"),
        "{all}"
    );

    let kinds = k.ok(&["api-resources", "--no-headers"]).await.unwrap();
    let names: Vec<&str> = kinds
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        names,
        ["events", "nodes", "pods", "services", "endpointslices"],
        "{kinds}"
    );

    // A resource the lab does not model: kubectl's own message.
    let scale = k
        .run(&["scale", "deployment", "web", "--replicas=2"])
        .await
        .unwrap();
    assert!(!scale.status.success());
    let stderr = String::from_utf8_lossy(&scale.stderr);
    assert!(
        stderr.contains("the server doesn't have a resource type \"deployment"),
        "{stderr}"
    );
}
