//! The webhook as the API server sees it: HTTPS with a CA the test made,
//! recommendations copied from the real aggregator HTTP API on a loopback
//! socket, and AdmissionReview v1 requests built from typed objects.

use std::sync::Arc;
use std::time::Duration;

use aggregator::config::Settings as AggregatorSettings;
use aggregator::http::{self, HttpState};
use aggregator::store::Store;
use k8s_openapi::api::core::v1::Service;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionResponse, AdmissionReview};
use lab::tls::LabCa;
use observer_proto::UnixNanos;
use observer_proto::api::{Coverage, DeletionRecord, NodeClass};
use prestop_admission::cache::{self, Recommendations};
use prestop_admission::inject;
use prestop_admission::routes::Routes;
use prestop_admission::server::{self, Webhook};
use prestop_admission::tls::{self, TlsListener};
use prestop_check::recommendation::{Access, HttpSource};
use prestop_check::workload::RoutingService;
use serde_json::{Value, json};

pub struct Env {
    pub url: String,
    agent: ureq::Agent,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

/// Why the recommendation of [`deletions`]' 300 deletions of shop/web is
/// what it is, as the webhook words it.
pub const WHY: &str = "p99 at 95% confidence over 300 deletions of service shop/web in the last 7d (observed p50 5.50s, p99 5.50s, max 5.50s), margin 1s";

/// Deletions of `namespace/service` whose propagation took `seconds` each.
pub fn deletions(n: usize, namespace: &str, service: &str, seconds: f64) -> Vec<DeletionRecord> {
    let now = UnixNanos::now();
    (0..n)
        .map(|i| {
            let mut coverage = Coverage::default();
            coverage.add(NodeClass::Measured);
            DeletionRecord {
                pod_uid: format!("{namespace}-{service}-{i}"),
                namespace: namespace.into(),
                pod_name: format!("{service}-{i}"),
                services: vec![service.into()],
                deletion_start_unix_nanos: now - 60_000_000_000,
                complete: true,
                propagation_seconds: Some(seconds),
                propagation_upper_seconds: Some(seconds),
                coverage,
                finished_unix_nanos: now - 1_000_000_000,
                ..Default::default()
            }
        })
        .collect()
}

/// Services of the tests: `shop/web` routes `app: web` on port 8080.
pub fn services() -> Vec<RoutingService> {
    vec![service("shop", "web", "web"), service("lab", "web", "web")]
}

/// `namespace/name` selecting `app: <app>`, port 80 to 8080.
pub fn service(namespace: &str, name: &str, app: &str) -> RoutingService {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    RoutingService::of(svc, namespace).unwrap()
}

pub struct Options {
    pub records: Vec<DeletionRecord>,
    /// The Services the webhook knows.
    pub services: Vec<RoutingService>,
    /// `false`: the aggregator is down (a closed port).
    pub aggregator_up: bool,
    pub settings: inject::Settings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            records: deletions(300, "shop", "web", 5.5),
            services: services(),
            aggregator_up: true,
            settings: inject::Settings {
                sleep_action: true,
                drain_seconds: 0.0,
                adaptive_drain: adaptive_drain(),
            },
        }
    }
}

/// The adaptive drain of the tests: max 60 s.
pub fn adaptive_drain() -> inject::AdaptiveDrain {
    inject::AdaptiveDrain {
        image: "registry.example/prestop-drain:1".into(),
        aggregator: "http://prestop-aggregator.prestop-system.svc:8080".into(),
        audience: "prestop-aggregator".into(),
        max_seconds: 60,
    }
}

impl Env {
    pub fn start(o: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let aggregator_url = if o.aggregator_up {
            let store = Store::open(dir.path().join("store.db")).unwrap();
            for r in &o.records {
                store.record_deletion(r).unwrap();
            }
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let settings = AggregatorSettings {
                cluster_name: "test".into(),
                ..AggregatorSettings::default()
            };
            runtime.spawn(http::serve(
                listener,
                HttpState::new(Arc::new(store), settings),
            ));
            url
        } else {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", closed.local_addr().unwrap())
        };
        let routes = Routes::of(o.services);
        let recommendations = Recommendations::default();
        let source = HttpSource::new(
            &aggregator_url,
            None,
            None,
            Duration::from_secs(5),
            Access::default(),
        )
        .unwrap();
        let refreshed = recommendations.refresh(&source, cache::scopes(&routes.all()));
        assert_eq!(refreshed.is_ok(), o.aggregator_up, "{refreshed:?}");

        let ca = LabCa::generate(&["localhost", "127.0.0.1"]).unwrap();
        let files = ca.write(dir.path()).unwrap();
        let config = tls::server_config(&files.cert, &files.key).unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let webhook = Webhook {
            routes,
            recommendations,
            settings: o.settings,
        };
        let listener = runtime
            .block_on(async { TlsListener::new(listener, config) })
            .unwrap();
        runtime.spawn(server::serve(listener, webhook, std::future::pending()));

        let roots: Vec<_> = ureq::tls::parse_pem(ca.ca_pem.as_bytes())
            .filter_map(|i| match i.unwrap() {
                ureq::tls::PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            )
            .build()
            .into();
        Env {
            url,
            agent,
            _runtime: runtime,
            _dir: dir,
        }
    }

    /// Posts `review` to `path` and returns the response part.
    pub fn review(&self, path: &str, review: &AdmissionReview<DynamicObject>) -> AdmissionResponse {
        let answer: AdmissionReview<DynamicObject> = self
            .agent
            .post(format!("{}{path}", self.url))
            .send_json(review)
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        let response = answer.response.expect("a response");
        assert_eq!(response.uid, "uid-1", "the uid is the request's");
        response
    }
}

/// `(group, version, kind, plural)` of every kind the webhook checks.
pub const KINDS: &[(&str, &str, &str, &str)] = &[
    ("", "v1", "Pod", "pods"),
    ("apps", "v1", "Deployment", "deployments"),
    ("apps", "v1", "StatefulSet", "statefulsets"),
    ("apps", "v1", "DaemonSet", "daemonsets"),
    ("apps", "v1", "ReplicaSet", "replicasets"),
    ("argoproj.io", "v1alpha1", "Rollout", "rollouts"),
];

/// An object of `kind` in `namespace` whose pod template is `pod` (labels
/// and spec).
pub fn object(kind: &str, namespace: &str, labels: Value, spec: Value) -> Value {
    let (group, version) = KINDS
        .iter()
        .chain(&[("batch", "v1", "Job", "jobs")])
        .find(|k| k.2 == kind)
        .map(|k| (k.0, k.1))
        .unwrap();
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let meta = json!({"name": "web", "namespace": namespace});
    if kind == "Pod" {
        let mut meta = meta;
        meta["labels"] = labels;
        return json!({"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec});
    }
    let mut spec_of = json!({"template": {"metadata": {"labels": labels}, "spec": spec}});
    if kind != "Job" {
        spec_of["selector"] = json!({"matchLabels": labels});
    }
    if kind == "StatefulSet" {
        spec_of["serviceName"] = json!("web");
    }
    json!({"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec_of})
}

/// An AdmissionReview v1 request for `object`, typed (kube-core's
/// AdmissionReview over k8s-openapi's objects) as the API server sends it.
pub fn request(operation: &str, object: &Value) -> AdmissionReview<DynamicObject> {
    let kind = object["kind"].as_str().unwrap();
    let (group, version, _, plural) = KINDS
        .iter()
        .chain(&[("batch", "v1", "Job", "jobs")])
        .find(|k| k.2 == kind)
        .copied()
        .unwrap();
    let gvk = json!({"group": group, "version": version, "kind": kind});
    let gvr = json!({"group": group, "version": version, "resource": plural});
    serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "uid-1",
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "alice"},
            "object": object,
            "oldObject": if operation == "UPDATE" { object.clone() } else { Value::Null },
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": if operation == "UPDATE" { "UpdateOptions" } else { "CreateOptions" }}
        }
    }))
    .unwrap()
}

/// A pod spec with the serving container `app` (port 8080, `lifecycle`,
/// an HTTP readiness probe: the findings here are about shutdown) and a
/// sidecar no Service routes to.
pub fn pod_spec(lifecycle: Option<Value>, grace: Option<i64>) -> Value {
    let mut app = json!({"name": "app", "image": "registry.example/web:1", "ports": [{"containerPort": 8080}], "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}});
    if let Some(l) = lifecycle {
        app["lifecycle"] = l;
    }
    let mut spec = json!({"containers": [app, {"name": "log-shipper", "image": "registry.example/ship:1", "ports": [{"containerPort": 9000}]}]});
    if let Some(g) = grace {
        spec["terminationGracePeriodSeconds"] = json!(g);
    }
    spec
}

/// A `kind` in shop whose pods `shop/web` routes to (see [`pod_spec`]).
pub fn routed(kind: &str, lifecycle: Option<Value>, grace: Option<i64>) -> Value {
    object(
        kind,
        "shop",
        json!({"app": "web"}),
        pod_spec(lifecycle, grace),
    )
}

/// The pod spec inside `object`.
pub fn spec_of(object: &Value) -> &Value {
    if object["kind"] == "Pod" {
        &object["spec"]
    } else {
        &object["spec"]["template"]["spec"]
    }
}

/// The warnings of an answer.
pub fn warnings(r: &AdmissionResponse) -> Vec<String> {
    r.warnings.clone().unwrap_or_default()
}

/// The object after the mutating answer of `path` to `operation` on
/// `object`, its JSONPatch applied, and the answer's warnings.
pub fn mutated(env: &Env, path: &str, operation: &str, object: &Value) -> (Value, Vec<String>) {
    let r = env.review(path, &request(operation, object));
    assert!(r.allowed);
    let mut out = object.clone();
    if let Some(bytes) = &r.patch {
        let patch: json_patch::Patch = serde_json::from_slice(bytes).unwrap();
        json_patch::patch(&mut out, &patch).unwrap();
    }
    (out, warnings(&r))
}
