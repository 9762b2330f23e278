//! Renders every Kustomize base and overlay in deploy/ with `kubectl
//! kustomize`, deserialises every object into its Kubernetes type (a field
//! the type does not know fails the round trip), and checks the security
//! settings docs/deploy.md promises.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodSpec, PodTemplateSpec, Probe,
    Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The base and every overlay: each is something a user may apply.
fn targets() -> Vec<PathBuf> {
    let mut out = vec![deploy_dir().join("base")];
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    overlays.sort();
    assert!(overlays.len() >= 3, "{overlays:?}");
    out.extend(overlays);
    out
}

fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect(
            "kubectl 1.21 or newer must be on PATH (its built-in kustomize renders deploy/); \
             setup cannot install it: `cargo xtask setup --check` says how to get it",
        );
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}(kubectl older than 1.21 cannot render Kustomize components: \
         `cargo xtask setup --check`)",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    prestop_check::yaml::parse_stream(&text)
        .unwrap()
        .iter()
        .map(|d| d.to_json())
        .filter(|v| !v.is_null())
        .collect()
}

/// Deserialises into `T` and back: a misspelt or misplaced field is dropped
/// by the typed model and shows up as a difference.
fn typed<T: DeserializeOwned + Serialize>(object: &Value) -> T {
    let t: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object:#}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        strip_empty(&back),
        strip_empty(object),
        "round trip changed the object"
    );
    t
}

fn strip_empty(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| {
                    !matches!(v, Value::Null) && v != &&Value::Object(Default::default())
                })
                .map(|(k, v)| (k.clone(), strip_empty(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_empty).collect()),
        v => v.clone(),
    }
}

#[derive(Default)]
struct Rendered {
    daemonsets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    bindings: Vec<ClusterRoleBinding>,
    claims: Vec<PersistentVolumeClaim>,
    priority_classes: Vec<PriorityClass>,
    config_maps: Vec<ConfigMap>,
    service_monitors: Vec<Value>,
    pod_monitors: Vec<Value>,
    network_policies: Vec<NetworkPolicy>,
    certificates: Vec<Value>,
    issuers: Vec<Value>,
    /// The admission webhook's objects (deploy/components/admission-webhook).
    admission: Vec<Value>,
}

fn load(dir: &Path) -> Rendered {
    let mut r = Rendered::default();
    for object in render(dir) {
        if object["metadata"]["labels"]["app.kubernetes.io/component"] == "admission-webhook" {
            r.admission.push(object);
            continue;
        }
        match object["kind"].as_str().unwrap() {
            "Namespace" => drop(typed::<Namespace>(&object)),
            "ConfigMap" => r.config_maps.push(typed(&object)),
            "DaemonSet" => r.daemonsets.push(typed(&object)),
            "Deployment" => r.deployments.push(typed(&object)),
            "Service" => r.services.push(typed(&object)),
            "ServiceAccount" => r.service_accounts.push(typed(&object)),
            "ClusterRole" => r.cluster_roles.push(typed(&object)),
            "Role" => r.roles.push(typed(&object)),
            "ClusterRoleBinding" => r.bindings.push(typed(&object)),
            "PersistentVolumeClaim" => r.claims.push(typed(&object)),
            "PriorityClass" => r.priority_classes.push(typed(&object)),
            "NetworkPolicy" => r.network_policies.push(typed(&object)),
            // CRDs of the Prometheus Operator: not in k8s-openapi.
            "ServiceMonitor" => r.service_monitors.push(object),
            "PodMonitor" => r.pod_monitors.push(object),
            // cert-manager's.
            "Certificate" => r.certificates.push(object),
            "Issuer" => r.issuers.push(object),
            other => panic!("{}: unexpected kind {other}", dir.display()),
        }
    }
    r
}

/// The labels a workload gives its pods.
fn template_labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template.metadata.as_ref().unwrap().labels.clone().unwrap()
}

fn only<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "exactly one {what}");
    &items[0]
}

fn pod_spec(spec: Option<&PodSpec>) -> &PodSpec {
    spec.expect("pod spec")
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Settings both containers share: nothing privileged, everything
/// dropped, read-only root, limits and probes.
fn check_hardened(c: &Container) -> BTreeSet<String> {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "{}", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "{}",
        c.name
    );
    let resources = c.resources.as_ref().expect("resources");
    for key in ["cpu", "memory"] {
        assert!(
            resources
                .requests
                .as_ref()
                .is_some_and(|r| r.contains_key(key)),
            "{} request {key}",
            c.name
        );
        assert!(
            resources
                .limits
                .as_ref()
                .is_some_and(|r| r.contains_key(key)),
            "{} limit {key}",
            c.name
        );
    }
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("http probe");
        assert_eq!(get.path.as_deref(), Some(path), "{}", c.name);
    }
    caps.add.clone().unwrap_or_default().into_iter().collect()
}

/// `cilium`: the overlay that mounts Cilium's bpffs (read-only) for its detector.
fn check_agent(r: &Rendered, expected_caps: &BTreeSet<String>, cilium: bool) {
    let ds = only(&r.daemonsets, "DaemonSet");
    let spec = ds.spec.as_ref().unwrap();
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    let pod = pod_spec(spec.template.spec.as_ref());
    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let tolerates_control_plane = pod.tolerations.iter().flatten().any(|t| {
        let key_ok = t.key.is_none() && t.operator.as_deref() == Some("Exists")
            || t.key.as_deref() == Some("node-role.kubernetes.io/control-plane");
        key_ok && t.effect.as_deref().is_none_or(|e| e == "NoSchedule")
    });
    assert!(tolerates_control_plane, "{:?}", pod.tolerations);
    let class = pod.priority_class_name.as_deref().expect("priority class");
    assert!(
        r.priority_classes
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(class))
    );

    let [c] = &pod.containers[..] else {
        panic!("one agent container")
    };
    assert_eq!(&check_hardened(c), expected_caps);
    // Loading the eBPF programs may take minutes on a big node, and the
    // liveness endpoint fails until the main loop runs: a startup probe on
    // /startedz (programs loaded) holds liveness back meanwhile, and, not
    // being readiness, does not restart a node missing a required
    // capability in a loop.
    let startup = c.startup_probe.as_ref().expect("agent startup probe");
    let get = startup.http_get.as_ref().expect("http startup probe");
    assert_eq!(get.path.as_deref(), Some("/startedz"));
    assert_eq!(get.port, IntOrString::String("health".into()));
    let budget = |p: &Probe| p.period_seconds.unwrap_or(10) * p.failure_threshold.unwrap_or(3);
    assert!(
        budget(startup) >= 120,
        "startup budget {}s is too short for a slow eBPF load",
        budget(startup)
    );
    assert!(budget(startup) > budget(c.liveness_probe.as_ref().unwrap()));
    let args = c.args.clone().unwrap_or_default().join(" ");
    assert!(
        args.starts_with("run --aggregator https://prestop-aggregator.$(POD_NAMESPACE).svc:50051"),
        "{args}"
    );
    check_agent_credentials(pod, c);
    assert!(
        args.contains("--node-name $(NODE_NAME)") && args.contains("--health-addr $(POD_IP)"),
        "{args}"
    );
    let env: BTreeMap<&str, &str> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            (e.name.as_str(), field.unwrap_or_default())
        })
        .collect();
    assert_eq!(
        env.get("NODE_NAME"),
        Some(&"spec.nodeName"),
        "node name from the downward API"
    );
    assert_eq!(env.get("POD_NAMESPACE"), Some(&"metadata.namespace"));
    // Host network: the pod IP is the node's, where probes and Prometheus
    // connect; the health server binds it, not every interface.
    assert_eq!(env.get("POD_IP"), Some(&"status.podIP"));
    let health = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("health"))
        .unwrap();
    assert_eq!(health.container_port, 9464);

    let host_paths: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            v.host_path
                .as_ref()
                .map(|h| (v.name.clone(), h.path.clone()))
        })
        .collect();
    let mut expected_paths = BTreeMap::from([
        ("btf".to_string(), "/sys/kernel/btf".to_string()),
        ("tracefs".to_string(), "/sys/kernel/tracing".to_string()),
        ("xtables-lock".to_string(), "/run/xtables.lock".to_string()),
    ]);
    if cilium {
        expected_paths.insert("bpffs".to_string(), "/sys/fs/bpf".to_string());
    }
    assert_eq!(host_paths, expected_paths);
    for m in c.volume_mounts.iter().flatten() {
        assert_eq!(
            m.read_only,
            Some(true),
            "host mount {} must be read-only",
            m.name
        );
    }
}

/// The agent's projected token: its own audience, short-lived, with the CA
/// from a ConfigMap (never the aggregator's key Secret), files the flags name.
fn check_agent_credentials(pod: &PodSpec, c: &Container) {
    let args = c.args.clone().unwrap_or_default().join(" ");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "aggregator-credentials")
        .expect("credentials mount");
    assert!(
        args.contains(&format!("--token-file {}/token", mount.mount_path))
            && args.contains(&format!("--ca-file {}/ca.crt", mount.mount_path)),
        "{args}"
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let sources = volume
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_deref()
        .unwrap();
    let token = sources
        .iter()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("projected token");
    assert_eq!(token.audience.as_deref(), Some("prestop-aggregator"));
    assert!(token.expiration_seconds.is_some_and(|e| e <= 3600));
    assert!(
        sources.iter().all(|s| s.secret.is_none()),
        "no Secret in the agents' volume"
    );
    let ca = sources
        .iter()
        .find_map(|s| s.config_map.as_ref())
        .expect("CA");
    assert_eq!(ca.name, "prestop-aggregator-ca");
}

/// cert-manager's Certificate fills the Secret the aggregator mounts, for
/// the name the agents dial.
fn check_certificates(r: &Rendered, tls_secret: &str) {
    let serving = r
        .certificates
        .iter()
        .find(|c| c["spec"]["secretName"] == tls_secret)
        .expect("a Certificate for the aggregator's Secret");
    let names = serving["spec"]["dnsNames"].as_array().unwrap();
    assert!(
        names
            .iter()
            .any(|n| n == "prestop-aggregator.prestop-system.svc")
    );
    let issuer = serving["spec"]["issuerRef"]["name"].as_str().unwrap();
    assert!(r.issuers.iter().any(|i| i["metadata"]["name"] == issuer));
}

fn check_aggregator(r: &Rendered) {
    let d = only(&r.deployments, "Deployment");
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1), "one SQLite writer");
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate")
    );
    let pod = pod_spec(spec.template.spec.as_ref());
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let [c] = &pod.containers[..] else {
        panic!("one aggregator container")
    };
    assert!(
        check_hardened(c).is_empty(),
        "the aggregator needs no capability"
    );
    let args = c.args.clone().unwrap_or_default().join(" ");
    assert_eq!(
        args,
        "--grpc-addr 0.0.0.0:50051 --http-addr 0.0.0.0:8080 --store /var/lib/prestop-aggregator/store.db \
         --cluster-name $(CLUSTER_NAME) --tls-cert-file /etc/prestop-aggregator/tls/tls.crt \
         --tls-key-file /etc/prestop-aggregator/tls/tls.key"
    );
    let tls = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone())
        .expect("TLS Secret volume");
    if !r.certificates.is_empty() {
        check_certificates(r, &tls);
    }
    let reader = only(&r.roles, "Role");
    let rule = only(reader.rules.as_deref().unwrap(), "reader rule");
    assert_eq!(rule.verbs, ["get"]);
    assert_eq!(
        rule.api_groups.as_deref(),
        Some(&["observer.prestop.dev".to_string()][..])
    );
    let store = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/lib/prestop-aggregator")
        .expect("store mount");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == store.name)
        .unwrap();
    let claim = volume
        .persistent_volume_claim
        .as_ref()
        .expect("store on a PVC");
    assert!(
        r.claims
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(claim.claim_name.as_str()))
    );

    let sa = pod
        .service_account_name
        .as_deref()
        .expect("service account");
    assert!(
        r.service_accounts
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(sa))
    );
    let binding = only(&r.bindings, "ClusterRoleBinding");
    let subject = only(binding.subjects.as_deref().unwrap(), "subject");
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa)
    );
    assert_eq!(subject.namespace, d.metadata.namespace);

    let role = only(&r.cluster_roles, "ClusterRole");
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let mut grants = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                grants.insert(format!("{group}/{resource}:{}", rule.verbs.join(",")));
            }
        }
    }
    // Read-only on the cluster; `create` only of reviews, which change
    // nothing.
    assert_eq!(
        grants,
        set(&[
            "/nodes:get,list,watch",
            "/pods:get,list,watch",
            "discovery.k8s.io/endpointslices:get,list,watch",
            "authentication.k8s.io/tokenreviews:create",
            "authorization.k8s.io/subjectaccessreviews:create",
        ])
    );

    let svc = only(&r.services, "Service");
    let labels = template_labels(&spec.template);
    let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "Service selects the aggregator"
    );
    let ports: BTreeMap<String, i32> = svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("grpc".into(), 50051), ("http".into(), 8080)])
    );
    for port in ["grpc", "http"] {
        assert!(
            c.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some(port)),
            "container port {port}"
        );
    }

    for sm in &r.service_monitors {
        assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(
            sm["metadata"]["namespace"].as_str(),
            d.metadata.namespace.as_deref()
        );
        let wanted = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
        let svc_labels = svc.metadata.labels.clone().unwrap();
        assert!(
            wanted
                .iter()
                .all(|(k, v)| svc_labels.get(k).map(String::as_str) == v.as_str())
        );
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
        assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    }
}

/// The `cluster` label value a monitor's relabelings set.
fn cluster_label(relabelings: &Value) -> Option<&str> {
    relabelings
        .as_array()?
        .iter()
        .find(|r| r["targetLabel"] == "cluster")?["replacement"]
        .as_str()
}

/// The PodMonitor scrapes every agent's own /metrics: same namespace,
/// selects the agent pods, names the container port the agent's
/// --health-addr listens on, labels each series with its node and with
/// the same cluster as the aggregator's ServiceMonitor and the aggregator's
/// configured cluster name.
fn check_monitoring(r: &Rendered) {
    let ds = only(&r.daemonsets, "DaemonSet");
    let sm = only(&r.service_monitors, "ServiceMonitor");
    let pm = only(&r.pod_monitors, "PodMonitor");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        pm["metadata"]["namespace"].as_str(),
        ds.metadata.namespace.as_deref()
    );
    let spec = ds.spec.as_ref().unwrap();
    let pod_labels = template_labels(&spec.template);
    let wanted = pm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    assert!(!wanted.is_empty());
    assert!(
        wanted
            .iter()
            .all(|(k, v)| pod_labels.get(k).map(String::as_str) == v.as_str()),
        "PodMonitor selects the agent pods"
    );
    let [endpoint] = pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .unwrap()
        .as_slice()
    else {
        panic!("one PodMonitor endpoint")
    };
    // The agent's health server (observer-agent/src/health.rs) serves
    // /metrics next to /healthz and /readyz on --health-addr.
    assert_eq!(endpoint["path"], "/metrics");
    let pod = pod_spec(spec.template.spec.as_ref());
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    let health_port: i32 = args
        .iter()
        .skip_while(|a| *a != "--health-addr")
        .nth(1)
        // A bare IP (the pod IP) listens on the agent's default port.
        .and_then(|a| {
            a.rsplit_once(':')
                .map_or(Some(9464), |(_, p)| p.parse().ok())
        })
        .expect("--health-addr HOST:PORT or IP");
    let port_name = endpoint["port"].as_str().expect("PodMonitor port by name");
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port_name))
        .unwrap_or_else(|| panic!("agent container has no port {port_name}"));
    assert_eq!(port.container_port, health_port);
    let relabelings = &endpoint["relabelings"];
    assert!(
        relabelings.as_array().unwrap().iter().any(|r| {
            r["targetLabel"] == "node"
                && r["sourceLabels"] == serde_json::json!(["__meta_kubernetes_pod_node_name"])
        }),
        "node label from the pod's node: {relabelings}"
    );
    let cluster = cluster_label(relabelings).expect("PodMonitor cluster label");
    assert_eq!(
        Some(cluster),
        cluster_label(&sm["spec"]["endpoints"][0]["relabelings"]),
        "agents and aggregator carry the same cluster label"
    );
    let configured = r
        .config_maps
        .iter()
        .find_map(|c| c.data.as_ref()?.get("cluster-name"))
        .expect("cluster-name");
    assert_eq!(
        cluster, configured,
        "the scrape's cluster label is the aggregator's --cluster-name (what prestop-check --cluster should be)"
    );
}

#[test]
fn every_rendering_deserialises_and_is_least_privilege() {
    for dir in targets() {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let r = load(&dir);
        let caps = match name.as_str() {
            "kernel-before-5.8" => set(&[
                "SYS_ADMIN",
                "SYS_RESOURCE",
                "NET_ADMIN",
                "NET_RAW",
                "SYS_NICE",
            ]),
            "kernel-5.8-to-5.10" => set(&[
                "BPF",
                "PERFMON",
                "NET_ADMIN",
                "NET_RAW",
                "SYS_NICE",
                "SYS_RESOURCE",
            ]),
            _ => set(&["BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_NICE"]),
        };
        check_agent(&r, &caps, name == "cilium");
        check_aggregator(&r);
        let certified = matches!(name.as_str(), "cert-manager" | "admission");
        assert_eq!(r.certificates.is_empty(), !certified, "{name}");
        assert_eq!(r.admission.is_empty(), name != "admission", "{name}");
        if !r.admission.is_empty() {
            check_admission(&r);
        }
        let monitored = name == "production";
        assert_eq!(r.service_monitors.len(), usize::from(monitored), "{name}");
        assert_eq!(r.pod_monitors.len(), usize::from(monitored), "{name}");
        if monitored {
            check_monitoring(&r);
        }
        let fenced = name == "network-policy";
        assert_eq!(r.network_policies.len(), usize::from(fenced), "{name}");
        if fenced {
            check_network_policy(&r);
        }
    }
}

/// The webhook: configurations that can never block an apply (Ignore, a
/// short timeout), never see kube-system or the project's namespace, call
/// the path of their mode over the webhook's Service, with a caBundle from
/// cert-manager; a hardened Deployment serving a certificate of the CA;
/// read-only RBAC on Services.
fn check_admission(r: &Rendered) {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    let of = |kind: &str| -> Vec<Value> {
        r.admission
            .iter()
            .filter(|o| o["kind"] == kind)
            .cloned()
            .collect()
    };
    let kinds: BTreeSet<&str> = r
        .admission
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Certificate",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "MutatingWebhookConfiguration",
            "Service",
            "ServiceAccount",
            "ValidatingWebhookConfiguration",
        ])
    );
    let validating: ValidatingWebhookConfiguration =
        typed(only(&of("ValidatingWebhookConfiguration"), "validating"));
    let mutating: MutatingWebhookConfiguration =
        typed(only(&of("MutatingWebhookConfiguration"), "mutating"));
    let mut paths = BTreeMap::new();
    let checks = validating
        .webhooks
        .iter()
        .flatten()
        .map(|w| {
            (
                &w.name,
                &w.failure_policy,
                w.timeout_seconds,
                &w.client_config,
                &w.namespace_selector,
                &w.side_effects,
                &w.rules,
            )
        })
        .chain(mutating.webhooks.iter().flatten().map(|w| {
            (
                &w.name,
                &w.failure_policy,
                w.timeout_seconds,
                &w.client_config,
                &w.namespace_selector,
                &w.side_effects,
                &w.rules,
            )
        }));
    for (name, policy, timeout, client, selector, side_effects, rules) in checks {
        assert_eq!(policy.as_deref(), Some("Ignore"), "{name}");
        assert!(timeout.is_some_and(|t| t <= 5), "{name}");
        assert_eq!(side_effects, "None", "{name}");
        let svc = client.service.as_ref().expect("a Service reference");
        assert_eq!(
            (svc.name.as_str(), svc.namespace.as_str()),
            ("prestop-admission", "prestop-system")
        );
        paths.insert(name.clone(), svc.path.clone().unwrap());
        let excluded = selector
            .as_ref()
            .and_then(|s| s.match_expressions.as_ref())
            .and_then(|e| e.iter().find(|e| e.key == "kubernetes.io/metadata.name"))
            .expect("a namespace exclusion");
        assert_eq!(excluded.operator, "NotIn");
        assert_eq!(
            excluded.values.as_deref(),
            Some(&["kube-system".to_string(), "prestop-system".to_string()][..])
        );
        let resources: BTreeSet<String> = rules
            .iter()
            .flatten()
            .flat_map(|r| {
                let group = r.api_groups.clone().unwrap_or_default().join(",");
                r.resources
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |res| format!("{group}/{res}"))
            })
            .collect();
        assert_eq!(
            resources,
            set(&[
                "/pods",
                "apps/deployments",
                "apps/statefulsets",
                "apps/daemonsets",
                "apps/replicasets",
                "argoproj.io/rollouts"
            ]),
            "{name}"
        );
    }
    assert_eq!(
        paths.into_values().collect::<BTreeSet<_>>(),
        set(&[
            "/validate",
            "/validate/enforce",
            "/mutate",
            "/mutate/adaptive-drain"
        ])
    );
    for config in [&validating.metadata, &mutating.metadata] {
        assert_eq!(
            config.annotations.as_ref().unwrap()["cert-manager.io/inject-ca-from"],
            "prestop-system/prestop-admission"
        );
    }
    let d: Deployment = typed(only(&of("Deployment"), "Deployment"));
    let pod = pod_spec(d.spec.as_ref().unwrap().template.spec.as_ref());
    let [c] = &pod.containers[..] else {
        panic!("one webhook container")
    };
    assert!(
        check_hardened(c).is_empty(),
        "the webhook needs no capability"
    );
    let secret = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.secret.as_ref()?.secret_name.clone())
        .expect("TLS Secret volume");
    let certs = of("Certificate");
    let cert = only(&certs, "Certificate");
    assert_eq!(cert["spec"]["secretName"], secret.as_str());
    assert!(
        cert["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "prestop-admission.prestop-system.svc"),
        "the name the API server dials"
    );
    assert!(
        r.issuers
            .iter()
            .any(|i| i["metadata"]["name"] == cert["spec"]["issuerRef"]["name"])
    );
    let role: ClusterRole = typed(only(&of("ClusterRole"), "ClusterRole"));
    let [rule] = &role.rules.unwrap()[..] else {
        panic!("one rule")
    };
    assert_eq!(
        (rule.resources.as_deref(), rule.verbs.as_slice()),
        (
            Some(&["services".to_string()][..]),
            &["list".to_string(), "watch".to_string()][..]
        )
    );
    drop(typed::<Service>(only(&of("Service"), "Service")));
    drop(typed::<ServiceAccount>(only(
        &of("ServiceAccount"),
        "ServiceAccount",
    )));
    drop(typed::<ClusterRoleBinding>(only(
        &of("ClusterRoleBinding"),
        "ClusterRoleBinding",
    )));
}

/// The aggregator's NetworkPolicy selects its pods, in its namespace, and
/// admits exactly its two named ports: gRPC from address blocks (agents
/// use the host network), HTTP from namespaces.
fn check_network_policy(r: &Rendered) {
    let np = only(&r.network_policies, "NetworkPolicy");
    let d = only(&r.deployments, "Deployment");
    assert_eq!(np.metadata.namespace, d.metadata.namespace);
    let spec = np.spec.as_ref().unwrap();
    let labels = template_labels(&d.spec.as_ref().unwrap().template);
    let wanted = spec.pod_selector.as_ref().unwrap().match_labels.clone();
    assert!(
        wanted
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v)),
        "the policy selects the aggregator: {wanted:?} vs {labels:?}"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    let rules = spec.ingress.as_deref().unwrap();
    let port_of = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        let [p] = rule.ports.as_deref().unwrap() else {
            panic!("one port per rule")
        };
        p.port.clone()
    };
    let [grpc, http] = rules else {
        panic!("two ingress rules")
    };
    assert_eq!(port_of(grpc), Some(IntOrString::String("grpc".into())));
    assert!(
        grpc.from.iter().flatten().all(|f| f.ip_block.is_some()),
        "agents (host network) are admitted by address"
    );
    assert_eq!(port_of(http), Some(IntOrString::String("http".into())));
    assert!(
        http.from
            .iter()
            .flatten()
            .all(|f| f.namespace_selector.is_some() && f.ip_block.is_none()),
        "HTTP clients are admitted by namespace"
    );
}

#[test]
fn a_capability_slipping_in_is_caught() {
    // Kustomize only accepts relative resource paths: copy the base.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(deploy_dir().join("base")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    let overlay = dir.path().join("overlay");
    std::fs::create_dir(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "resources: [../base]\npatches:\n- target: {kind: DaemonSet}\n  patch: |-\n    - op: add\n      \
         path: /spec/template/spec/containers/0/securityContext/capabilities/add/-\n      value: SYS_PTRACE\n",
    )
    .unwrap();
    let r = load(&overlay);
    let result = std::panic::catch_unwind(|| {
        check_agent(
            &r,
            &set(&["BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_NICE"]),
            false,
        )
    });
    assert!(result.is_err());
}
