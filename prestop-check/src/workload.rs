//! Workloads and Services found in manifests, and which Services route to
//! which workloads.
//!
//! Objects are matched by API group and kind (a Knative `Service` is not a
//! core Service), validated against their Kubernetes schema (unknown fields,
//! required fields, types) with the line of the offending field, and read
//! one document at a time: a workload keeps its typed pod spec and the lines
//! findings point at, not its YAML tree.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    Container, Pod, PodSpec, PodTemplateSpec, ReplicationController, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::rollout::Rollout;
use crate::source::SourceFile;
use crate::yaml::{self, Node};

/// A workload kind this check reads: its API group, and where its pod spec
/// and required fields sit.
struct Kind {
    group: &'static str,
    kind: &'static str,
    pod_spec: &'static [&'static str],
    /// Required by the Kubernetes schema, on top of `metadata.name` and the
    /// pod spec's own; `[]` means every item of a list.
    required: &'static [&'static str],
}

const TEMPLATE: &[&str] = &["spec", "template", "spec"];
const CONTROLLER: &[&str] = &["spec", "spec.selector", "spec.template"];

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        kind: "Pod",
        pod_spec: &["spec"],
        required: &["spec"],
    },
    Kind {
        group: "apps",
        kind: "Deployment",
        pod_spec: TEMPLATE,
        required: CONTROLLER,
    },
    Kind {
        group: "apps",
        kind: "StatefulSet",
        pod_spec: TEMPLATE,
        required: CONTROLLER,
    },
    Kind {
        group: "apps",
        kind: "DaemonSet",
        pod_spec: TEMPLATE,
        required: CONTROLLER,
    },
    Kind {
        group: "apps",
        kind: "ReplicaSet",
        pod_spec: TEMPLATE,
        required: CONTROLLER,
    },
    Kind {
        group: "",
        kind: "ReplicationController",
        pod_spec: TEMPLATE,
        required: &["spec", "spec.template"],
    },
    Kind {
        group: "batch",
        kind: "Job",
        pod_spec: TEMPLATE,
        required: &["spec", "spec.template"],
    },
    Kind {
        group: "batch",
        kind: "CronJob",
        pod_spec: &["spec", "jobTemplate", "spec", "template", "spec"],
        required: &[
            "spec",
            "spec.schedule",
            "spec.jobTemplate",
            "spec.jobTemplate.spec",
            "spec.jobTemplate.spec.template",
        ],
    },
    Kind {
        group: "argoproj.io",
        kind: "Rollout",
        pod_spec: TEMPLATE,
        required: CONTROLLER,
    },
];

const POD_SPEC_REQUIRED: &[&str] = &[
    "containers",
    "containers[].name",
    "containers[].ports[].containerPort",
    "containers[].env[].name",
    "initContainers[].name",
    "initContainers[].ports[].containerPort",
];

const SERVICE_REQUIRED: &[&str] = &["spec.ports[].port"];

#[derive(Debug, Clone)]
pub struct Workload {
    pub file: usize,
    /// Byte offset of the object in its file, to find it again for `--fix`.
    pub at: usize,
    pub line: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What the check reads of the pod spec: containers' names, ports and
    /// lifecycle, and the grace period (see `slim`).
    pub pod_spec: PodSpec,
    pub pod_spec_path: &'static [&'static str],
    /// Line of each container's `name` key.
    pub container_lines: Vec<(String, usize)>,
    pub grace_line: Option<usize>,
}

impl Workload {
    /// The workload of an object as the API server holds it (JSON), for
    /// admission: `Ok(None)` for kinds this check does not read and for
    /// objects without a pod template of their own (a Rollout with a
    /// workloadRef).
    pub fn from_json(
        api_version: &str,
        kind: &str,
        object: serde_json::Value,
        default_ns: &str,
    ) -> Result<Option<Self>, serde_json::Error> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let Some(k) = KINDS.iter().find(|k| k.group == group && k.kind == kind) else {
            return Ok(None);
        };
        let (meta, template) = template(k.kind, object)?;
        Ok(Self::typed(k, meta, template, default_ns))
    }

    /// Without the lines of a manifest: they are filled in by the caller
    /// that has one.
    fn typed(
        k: &Kind,
        meta: ObjectMeta,
        template: PodTemplateSpec,
        default_ns: &str,
    ) -> Option<Self> {
        let pod_spec = template.spec?;
        let labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
        Some(Workload {
            file: 0,
            at: 0,
            line: 0,
            kind: k.kind.to_string(),
            namespace: meta.namespace.unwrap_or_else(|| default_ns.to_string()),
            name: meta.name.unwrap_or_default(),
            labels: labels.into_iter().collect(),
            pod_spec: slim(pod_spec),
            pod_spec_path: k.pod_spec,
            container_lines: Vec::new(),
            grace_line: None,
        })
    }

    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    pub fn pod_spec_node<'n>(&self, object: &'n Node) -> Option<&'n Node> {
        object.path(self.pod_spec_path)
    }

    pub fn container_node<'n>(&self, object: &'n Node, name: &str) -> Option<&'n Node> {
        self.pod_spec_node(object)?
            .get("containers")?
            .items()
            .iter()
            .find(|c| c.get("name").and_then(Node::as_str) == Some(name))
    }

    pub fn container_line(&self, name: &str) -> usize {
        self.container_lines
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.line, |(_, line)| *line)
    }

    pub fn grace_line(&self) -> usize {
        self.grace_line.unwrap_or(self.line)
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
    /// How `svc` routes, `None` without a selector: its endpoints are then
    /// managed elsewhere and no workload is routed by it.
    pub fn of(svc: Service, default_ns: &str) -> Option<Self> {
        let spec = svc.spec?;
        let selector = spec.selector.filter(|s| !s.is_empty())?;
        let target_ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.target_port.unwrap_or(IntOrString::Int(p.port)))
            .collect();
        Some(Self {
            namespace: svc
                .metadata
                .namespace
                .unwrap_or_else(|| default_ns.to_string()),
            name: svc.metadata.name.unwrap_or_default(),
            selector: selector.into_iter().collect(),
            target_ports,
        })
    }

    pub fn selects(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }

    /// The containers that serve this Service: those declaring a targeted
    /// port. A port number need not be declared, so when a number (or a
    /// Service without ports) matches no declaration every container may
    /// serve it; a port *name* resolves only through a declaration, so one
    /// nobody declares routes nowhere.
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
        let by_number = self.target_ports.is_empty()
            || self
                .target_ports
                .iter()
                .any(|t| matches!(t, IntOrString::Int(_)));
        if declared.is_empty() && by_number {
            spec.containers.iter().collect()
        } else {
            declared
        }
    }
}

/// A manifest that cannot be read as what it claims to be.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ManifestError {
    pub file: usize,
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Inventory {
    pub workloads: Vec<Workload>,
    pub services: Vec<RoutingService>,
    /// Objects this check does not read, by `apiVersion kind`, with counts.
    pub skipped: BTreeMap<String, usize>,
    /// Objects read, workloads and Services included.
    pub objects: usize,
}

impl Inventory {
    /// Reads every document of every file; empty documents are skipped,
    /// `kind: List` is unpacked, objects of other kinds are counted by kind.
    pub fn collect(files: &[SourceFile], default_namespace: &str) -> (Self, Vec<ManifestError>) {
        let mut inventory = Inventory::default();
        let mut errors = Vec::new();
        for (file, source) in files.iter().enumerate() {
            for doc in yaml::documents(&source.text) {
                match doc {
                    Ok(node) => inventory.add(file, &node, default_namespace, &mut errors),
                    Err(e) => errors.push(ManifestError {
                        file,
                        line: e.line,
                        message: format!("unparsable YAML: {e}"),
                    }),
                }
            }
        }
        (inventory, errors)
    }

    fn add(&mut self, file: usize, node: &Node, ns: &str, errors: &mut Vec<ManifestError>) {
        if matches!(node.value, yaml::Value::Null) {
            return;
        }
        let api_version = node.get("apiVersion").and_then(Node::as_str).unwrap_or("");
        let Some(kind) = node.get("kind").and_then(Node::as_str) else {
            self.skip(format!("{api_version} (an object without a kind)"));
            return;
        };
        // "apps/v1" is group "apps"; the core group's versions ("v1") have
        // no slash.
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let line = node
            .entry("kind")
            .map_or(node.span.line, |(k, _)| k.span.line);
        if (group, kind) != ("", "List") {
            self.objects += 1;
        }
        match (group, kind) {
            ("", "List") => {
                for item in node.get("items").map(Node::items).unwrap_or_default() {
                    self.add(file, item, ns, errors);
                }
            }
            ("", "Service") => match service(node, ns) {
                Ok(svc) => self.services.extend(svc),
                Err(problems) => {
                    errors.extend(problems.into_iter().map(|(line, message)| ManifestError {
                        file,
                        line,
                        message: format!("invalid Service: {message}"),
                    }))
                }
            },
            ("argoproj.io", "Rollout") if node.path(&["spec", "template"]).is_none() => {
                // A Rollout with a workloadRef: its template is that of the
                // Deployment it names, which is checked as itself.
                self.skip(format!(
                    "{api_version} {kind} without a template (workloadRef)"
                ));
            }
            _ => match KINDS.iter().find(|k| k.group == group && k.kind == kind) {
                Some(k) => match workload(k, node, ns) {
                    Ok(mut w) => {
                        w.file = file;
                        w.line = line;
                        self.workloads.push(w);
                    }
                    Err(problems) => {
                        errors.extend(problems.into_iter().map(|(line, message)| ManifestError {
                            file,
                            line,
                            message: format!("invalid {kind}: {message}"),
                        }))
                    }
                },
                None => self.skip(format!("{api_version} {kind}")),
            },
        }
    }

    fn skip(&mut self, what: String) {
        *self.skipped.entry(what).or_default() += 1;
    }

    pub fn services_for(&self, w: &Workload) -> Vec<&RoutingService> {
        self.services.iter().filter(|s| s.selects(w)).collect()
    }
}

/// The object for a workload, found again in its file's documents.
pub fn find_object(docs: &[Node], at: usize) -> Option<&Node> {
    docs.iter().find_map(|d| {
        if d.span.start == at {
            return Some(d);
        }
        d.get("items")?.items().iter().find(|i| i.span.start == at)
    })
}

/// (line, message) of each schema problem.
type Problems = Vec<(usize, String)>;

fn workload(k: &Kind, node: &Node, ns: &str) -> Result<Workload, Problems> {
    let pod_required: Vec<String> = POD_SPEC_REQUIRED
        .iter()
        .map(|r| format!("{}.{r}", k.pod_spec.join(".")))
        .collect();
    let required = ["metadata.name"]
        .iter()
        .chain(k.required)
        .map(|r| r.to_string())
        .chain(pod_required);
    let mut problems: Problems = required.flat_map(|r| missing(node, &r)).collect();
    let (meta, template) = match template(k.kind, node) {
        Ok(t) => t,
        Err(mut p) => {
            problems.append(&mut p);
            return Err(problems);
        }
    };
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        return Err(problems);
    }
    let Some(mut w) = Workload::typed(k, meta, template, ns) else {
        return Err(vec![(node.span.line, "no pod spec".into())]);
    };
    let spec_node = node.path(k.pod_spec);
    w.container_lines = spec_node
        .and_then(|s| s.get("containers"))
        .map(Node::items)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| {
            let (key, value) = c.entry("name")?;
            Some((value.as_str()?.to_string(), key.span.line))
        })
        .collect();
    w.grace_line = spec_node
        .and_then(|s| s.entry("terminationGracePeriodSeconds"))
        .map(|(key, _)| key.span.line);
    w.at = node.span.start;
    w.line = node.span.line;
    Ok(w)
}

/// The fields the check reads. Workloads are kept until the report, and
/// their env, volumes and the like would otherwise make memory grow with
/// the input many times over.
fn slim(spec: PodSpec) -> PodSpec {
    PodSpec {
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                lifecycle: c.lifecycle,
                readiness_probe: c.readiness_probe,
                ..Default::default()
            })
            .collect(),
        termination_grace_period_seconds: spec.termination_grace_period_seconds,
        ..Default::default()
    }
}

/// Reads an object as a typed value: a YAML node reports problems with
/// their lines, a JSON value (an admission request's object) serde's error.
trait Decode {
    type Error;
    fn decode<T: DeserializeOwned>(self) -> Result<T, Self::Error>;
}

impl Decode for &Node {
    type Error = Problems;
    fn decode<T: DeserializeOwned>(self) -> Result<T, Problems> {
        typed(self)
    }
}

impl Decode for serde_json::Value {
    type Error = serde_json::Error;
    fn decode<T: DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        serde_json::from_value(self)
    }
}

/// Deserialises the whole object into its Kubernetes type, so a malformed
/// manifest is caught here rather than by the cluster.
fn template<D: Decode>(kind: &str, node: D) -> Result<(ObjectMeta, PodTemplateSpec), D::Error> {
    fn from(meta: ObjectMeta, t: Option<PodTemplateSpec>) -> (ObjectMeta, PodTemplateSpec) {
        (meta, t.unwrap_or_default())
    }
    Ok(match kind {
        "Pod" => {
            let p: Pod = node.decode()?;
            let template = PodTemplateSpec {
                metadata: Some(p.metadata.clone()),
                spec: p.spec,
            };
            (p.metadata, template)
        }
        "Deployment" => {
            let d: Deployment = node.decode()?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "StatefulSet" => {
            let d: StatefulSet = node.decode()?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "DaemonSet" => {
            let d: DaemonSet = node.decode()?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "ReplicaSet" => {
            let d: ReplicaSet = node.decode()?;
            from(d.metadata, d.spec.and_then(|s| s.template))
        }
        "ReplicationController" => {
            let d: ReplicationController = node.decode()?;
            from(d.metadata, d.spec.and_then(|s| s.template))
        }
        "Job" => {
            let d: Job = node.decode()?;
            from(d.metadata, d.spec.map(|s| s.template))
        }
        "CronJob" => {
            let d: CronJob = node.decode()?;
            from(
                d.metadata,
                d.spec.and_then(|s| s.job_template.spec).map(|s| s.template),
            )
        }
        "Rollout" => {
            let r: Rollout = node.decode()?;
            from(r.metadata, r.spec.template)
        }
        _ => unreachable!("KINDS names only the kinds handled here"),
    })
}

fn service(node: &Node, default_ns: &str) -> Result<Option<RoutingService>, Problems> {
    let problems: Problems = ["metadata.name"]
        .iter()
        .chain(SERVICE_REQUIRED)
        .flat_map(|r| missing(node, r))
        .collect();
    let svc: Service = typed(node)?;
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(RoutingService::of(svc, default_ns))
}

/// One step into a YAML tree.
enum Step {
    Key(String),
    Index(usize),
}

impl Step {
    fn show(path: &[Step]) -> String {
        let mut out = String::new();
        for s in path {
            match s {
                Step::Key(k) if out.is_empty() => out += k,
                Step::Key(k) => out += &format!(".{k}"),
                Step::Index(i) => out += &format!("[{i}]"),
            }
        }
        out
    }
}

/// The line of the deepest node of `path` that exists: the field itself
/// when it does, else the object that lacks it.
fn line_of(node: &Node, path: &[Step]) -> usize {
    let mut line = node.span.line;
    let mut at = node;
    for step in path {
        let next = match step {
            Step::Key(k) => at.entry(k).map(|(key, value)| (key.span.line, value)),
            Step::Index(i) => at.items().get(*i).map(|item| (item.span.line, item)),
        };
        let Some((l, n)) = next else { break };
        line = l;
        at = n;
    }
    line
}

/// Deserialises `node` as `T`; fields `T` does not know and values of the
/// wrong type are problems at their line.
fn typed<T: DeserializeOwned>(node: &Node) -> Result<T, Problems> {
    let mut unknown = Vec::new();
    let result: Result<T, _> = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(ignored_path(&path));
        let ignored = serde_ignored::Deserializer::new(node.to_json(), &mut record);
        serde_path_to_error::deserialize(ignored)
    };
    match result {
        Err(e) => {
            let path: Vec<Step> = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                    _ => None,
                })
                .collect();
            Err(vec![(
                line_of(node, &path),
                format!("{}: {}", Step::show(&path), e.inner()),
            )])
        }
        Ok(_) if !unknown.is_empty() => Err(unknown
            .into_iter()
            .map(|path| {
                (
                    line_of(node, &path),
                    format!("unknown field `{}`", Step::show(&path)),
                )
            })
            .collect()),
        Ok(value) => Ok(value),
    }
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    use serde_ignored::Path;
    let mut steps = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    };
    match path {
        Path::Seq { index, .. } => steps.push(Step::Index(*index)),
        Path::Map { key, .. } => steps.push(Step::Key(key.clone())),
        _ => {}
    }
    steps
}

/// Each place where the required field `path` (dotted; `x[]` means every
/// item of list `x`) is absent, as a problem at its parent's line.
fn missing(node: &Node, path: &str) -> Problems {
    /// `line`: where `node` starts for a reader (its key's line).
    fn walk(node: &Node, line: usize, steps: &[&str], shown: String, out: &mut Problems) {
        let Some((first, rest)) = steps.split_first() else {
            return;
        };
        let (key, each) = match first.strip_suffix("[]") {
            Some(key) => (key, true),
            None => (*first, false),
        };
        let at = if shown.is_empty() {
            key.to_string()
        } else {
            format!("{shown}.{key}")
        };
        let Some((k, value)) = node
            .entry(key)
            .filter(|(_, v)| !matches!(v.value, yaml::Value::Null))
        else {
            // Lists are optional unless the path ends at one; their items'
            // fields are required only where items exist.
            if !each {
                out.push((line, format!("missing required field `{at}`")));
            }
            return;
        };
        if each {
            for (i, item) in value.items().iter().enumerate() {
                walk(item, item.span.line, rest, format!("{at}[{i}]"), out);
            }
        } else {
            walk(value, k.span.line, rest, at, out);
        }
    }
    let steps: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    walk(node, node.span.line, &steps, String::new(), &mut out);
    out
}
