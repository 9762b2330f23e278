//! Workloads and Services found in manifests, and which Services route to
//! which workloads.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    Container, Pod, PodSpec, PodTemplateSpec, ReplicationController, Service,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::source::Document;
use crate::yaml::Node;

/// Where a pod spec sits inside each workload kind.
const KINDS: &[(&str, &[&str])] = &[
    ("Pod", &["spec"]),
    ("Deployment", &["spec", "template", "spec"]),
    ("StatefulSet", &["spec", "template", "spec"]),
    ("DaemonSet", &["spec", "template", "spec"]),
    ("ReplicaSet", &["spec", "template", "spec"]),
    ("ReplicationController", &["spec", "template", "spec"]),
    ("Job", &["spec", "template", "spec"]),
    (
        "CronJob",
        &["spec", "jobTemplate", "spec", "template", "spec"],
    ),
];

#[derive(Debug, Clone)]
pub struct Workload {
    pub file: usize,
    pub line: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub pod_spec: PodSpec,
    pub pod_spec_path: &'static [&'static str],
    /// The whole object, for positions and `--fix`.
    pub node: Node,
}

impl Workload {
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    pub fn pod_spec_node(&self) -> Option<&Node> {
        self.node.path(self.pod_spec_path)
    }

    pub fn container_node(&self, name: &str) -> Option<&Node> {
        self.pod_spec_node()?
            .get("containers")?
            .items()
            .iter()
            .find(|c| c.get("name").and_then(Node::as_str) == Some(name))
    }

    /// Kubernetes' default when the field is unset.
    pub fn grace_seconds(&self) -> i64 {
        self.pod_spec.termination_grace_period_seconds.unwrap_or(30)
    }
}

#[derive(Debug, Clone)]
pub struct RoutingService {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub target_ports: Vec<IntOrString>,
}

impl RoutingService {
    pub fn selects(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }

    /// The containers that serve this Service: those declaring a targeted
    /// port. Ports need not be declared, so with no match every container
    /// counts.
    pub fn serving_containers<'w>(&self, spec: &'w PodSpec) -> Vec<&'w Container> {
        let serves = |c: &&Container| {
            c.ports.iter().flatten().any(|p| {
                self.target_ports.iter().any(|t| match t {
                    IntOrString::Int(n) => p.container_port == *n,
                    IntOrString::String(s) => p.name.as_deref() == Some(s),
                })
            })
        };
        let declared: Vec<&Container> = spec.containers.iter().filter(serves).collect();
        if declared.is_empty() {
            spec.containers.iter().collect()
        } else {
            declared
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{kind} at line {line}: {message}")]
pub struct InvalidObject {
    pub file: usize,
    pub line: usize,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Inventory {
    pub workloads: Vec<Workload>,
    pub services: Vec<RoutingService>,
}

impl Inventory {
    /// Documents that are not objects of interest (ConfigMaps, CRDs, empty
    /// documents) are skipped; `kind: List` is unpacked.
    pub fn collect(docs: &[Document], default_namespace: &str) -> (Self, Vec<InvalidObject>) {
        let mut inventory = Inventory::default();
        let mut errors = Vec::new();
        for doc in docs {
            inventory.add(doc.file, &doc.node, default_namespace, &mut errors);
        }
        (inventory, errors)
    }

    fn add(&mut self, file: usize, node: &Node, ns: &str, errors: &mut Vec<InvalidObject>) {
        let Some(kind) = node.get("kind").and_then(Node::as_str) else {
            return;
        };
        let line = node
            .entry("kind")
            .map_or(node.span.line, |(k, _)| k.span.line);
        let invalid = |message: String| InvalidObject {
            file,
            line,
            kind: kind.to_string(),
            message,
        };
        if kind == "List" {
            for item in node.get("items").map(Node::items).unwrap_or_default() {
                self.add(file, item, ns, errors);
            }
            return;
        }
        if kind == "Service" {
            match typed::<Service>(node) {
                Ok(svc) => self.services.extend(routing_service(svc, ns)),
                Err(e) => errors.push(invalid(e)),
            }
            return;
        }
        let Some(&(_, path)) = KINDS.iter().find(|(k, _)| *k == kind) else {
            return;
        };
        match template(kind, node) {
            Ok((meta_ns, name, template)) => {
                let Some(pod_spec) = template.spec else {
                    errors.push(invalid("no pod spec".into()));
                    return;
                };
                let labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
                self.workloads.push(Workload {
                    file,
                    line,
                    kind: kind.to_string(),
                    namespace: meta_ns.unwrap_or_else(|| ns.to_string()),
                    name: name.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    pod_spec,
                    pod_spec_path: path,
                    node: node.clone(),
                });
            }
            Err(e) => errors.push(invalid(e)),
        }
    }

    pub fn services_for(&self, w: &Workload) -> Vec<&RoutingService> {
        self.services.iter().filter(|s| s.selects(w)).collect()
    }
}

fn typed<T: DeserializeOwned>(node: &Node) -> Result<T, String> {
    serde_json::from_value(node.to_json()).map_err(|e| e.to_string())
}

type Template = (Option<String>, Option<String>, PodTemplateSpec);

/// Deserialises the whole object into its Kubernetes type, so a malformed
/// manifest is caught here rather than by the cluster.
fn template(kind: &str, node: &Node) -> Result<Template, String> {
    fn from<T>(
        meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        t: T,
    ) -> Result<Template, String>
    where
        T: Into<Option<PodTemplateSpec>>,
    {
        let t = t.into().ok_or("no pod template")?;
        Ok((meta.namespace, meta.name, t))
    }
    match kind {
        "Pod" => {
            let p: Pod = typed(node)?;
            let template = PodTemplateSpec {
                metadata: Some(p.metadata.clone()),
                spec: p.spec,
            };
            Ok((p.metadata.namespace, p.metadata.name, template))
        }
        "Deployment" => {
            let d: Deployment = typed(node)?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "StatefulSet" => {
            let d: StatefulSet = typed(node)?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "DaemonSet" => {
            let d: DaemonSet = typed(node)?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "ReplicaSet" => {
            let d: ReplicaSet = typed(node)?;
            from(d.metadata, d.spec.and_then(|s| s.template))
        }
        "ReplicationController" => {
            let d: ReplicationController = typed(node)?;
            from(d.metadata, d.spec.and_then(|s| s.template))
        }
        "Job" => {
            let d: Job = typed(node)?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "CronJob" => {
            let d: CronJob = typed(node)?;
            from(
                d.metadata,
                d.spec.and_then(|s| s.job_template.spec).map(|s| s.template),
            )
        }
        _ => Err(format!("unsupported kind {kind}")),
    }
}

fn routing_service(svc: Service, default_ns: &str) -> Option<RoutingService> {
    let spec = svc.spec?;
    // Without a selector the Service's endpoints are managed elsewhere: no
    // workload in these manifests is routed by it.
    let selector = spec.selector.filter(|s| !s.is_empty())?;
    let target_ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.target_port.unwrap_or(IntOrString::Int(p.port)))
        .collect();
    Some(RoutingService {
        namespace: svc
            .metadata
            .namespace
            .unwrap_or_else(|| default_ns.to_string()),
        name: svc.metadata.name.unwrap_or_default(),
        selector: selector.into_iter().collect(),
        target_ports,
    })
}
