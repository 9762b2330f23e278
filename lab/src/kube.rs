//! The lab's Kubernetes API: the API double, serving inside the
//! control-plane namespace (where the aggregator watches it on loopback),
//! holding the lab's Nodes, Pods and the Service's EndpointSlice, built the
//! way kubelet, the scheduler and the EndpointSlice controller fill them in.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use apiserver_double::{ApiServerDouble, DoubleError, PodDeleter, ServeError};
use thiserror::Error;

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerState, ContainerStateRunning, ContainerStatus, Lifecycle,
            LifecycleHandler, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus,
            NodeSystemInfo, ObjectReference, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service,
            ServicePort, ServiceSpec, SleepAction,
        },
        discovery::v1::{
            Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference, Time},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};

use crate::{
    api::{ApiMirror, NAMESPACE, POD_PORT, PodRecord, SERVICE, SERVICE_IP, SERVICE_PORT},
    kubelet::Kubelet,
    netns::{self, NetNs},
    proxy::Endpoint,
    scenario::NodeInfo,
};

pub const SLICE_NAME: &str = "web-lab01";

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

pub fn node_object(info: &NodeInfo) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(info.name.clone()),
            labels: labels(&[("kubernetes.io/hostname", &info.name)]),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(info.pod_cidr.clone()),
            pod_cidrs: Some(vec![info.pod_cidr.clone()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: info.ip.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: info.name.clone(),
                },
            ]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            node_info: Some(NodeSystemInfo {
                kubelet_version: "v1.32.0-lab".into(),
                operating_system: "linux".into(),
                architecture: std::env::consts::ARCH.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The pod-template-hash of the lab's ReplicaSets: one per workload.
const TEMPLATE_HASH: &str = "6d4cf56db6";

/// The owner of a pod of the Deployment `deployment`, as its ReplicaSet
/// `{deployment}-{hash}` names it (the aggregator names the workload by it).
fn replica_set_owner(deployment: &str, uid: String) -> Option<Vec<OwnerReference>> {
    Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: format!("{deployment}-{TEMPLATE_HASH}"),
        uid,
        controller: Some(true),
        ..Default::default()
    }])
}

/// A scheduled, running, ready pod of the Deployment `web`, with its
/// preStop sleep and grace period. Its deletion is the API double's
/// business (`deletionTimestamp`, `deletionGracePeriodSeconds`).
pub fn pod_object(record: &PodRecord, host_ip: &str) -> Pod {
    let pre_stop = record.termination.pre_stop.as_secs();
    Pod {
        metadata: ObjectMeta {
            name: Some(record.name.clone()),
            namespace: Some(NAMESPACE.into()),
            uid: Some(record.uid.clone()),
            labels: labels(&[("app", SERVICE), ("pod-template-hash", TEMPLATE_HASH)]),
            owner_references: replica_set_owner(
                SERVICE,
                "00000000-0000-4000-a000-000000000000".into(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(record.node.clone()),
            termination_grace_period_seconds: Some(record.termination.grace.as_secs() as i64),
            containers: vec![Container {
                name: "web".into(),
                image: Some("lab-pod-server".into()),
                lifecycle: (pre_stop > 0).then(|| Lifecycle {
                    pre_stop: Some(LifecycleHandler {
                        sleep: Some(SleepAction {
                            seconds: pre_stop as i64,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            host_ip: Some(host_ip.to_owned()),
            pod_ip: Some(record.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: record.ip.to_string(),
            }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            container_statuses: Some(vec![ContainerStatus {
                name: "web".into(),
                image: "lab-pod-server".into(),
                ready: true,
                started: Some(true),
                state: Some(ContainerState {
                    // Built when the pod turned ready: it has run since.
                    running: Some(ContainerStateRunning {
                        started_at: Some(Time(Timestamp::now())),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A pod of another workload (a router: an ingress controller, a
/// client-side balancer), running and ready on `node`, owned by the
/// ReplicaSet `{owner}-{hash}` of the Deployment `owner`, as the
/// aggregator sees any pod that sends to the Service's pods.
pub fn workload_pod_object(
    namespace: &str,
    owner: &str,
    node: &NodeInfo,
    ip: std::net::Ipv4Addr,
) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{owner}-{TEMPLATE_HASH}-lab01")),
            namespace: Some(namespace.into()),
            uid: Some(format!("00000000-0000-4000-9000-{:012x}", u32::from(ip))),
            labels: labels(&[("app", owner), ("pod-template-hash", TEMPLATE_HASH)]),
            owner_references: replica_set_owner(
                owner,
                format!("00000000-0000-4000-a000-{:012x}", u32::from(ip)),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.name.clone()),
            containers: vec![Container {
                name: owner.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            host_ip: Some(node.ip.to_string()),
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// The Service the lab's pods serve, as `kubectl get svc` shows it.
pub fn service_object() -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(SERVICE.into()),
            namespace: Some(NAMESPACE.into()),
            labels: labels(&[("app", SERVICE)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(SERVICE_IP.to_string()),
            cluster_ips: Some(vec![SERVICE_IP.to_string()]),
            selector: labels(&[("app", SERVICE)]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVICE_PORT as i32,
                target_port: Some(IntOrString::Int(POD_PORT as i32)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The Service's EndpointSlice listing `endpoints` (`pods` gives each
/// endpoint's pod for its node and target reference).
pub fn endpoint_slice(endpoints: &[Endpoint], pods: &BTreeMap<String, PodRecord>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(SLICE_NAME.into()),
            namespace: Some(NAMESPACE.into()),
            labels: labels(&[
                ("kubernetes.io/service-name", SERVICE),
                (
                    "endpointslice.kubernetes.io/managed-by",
                    "endpointslice-controller.k8s.io",
                ),
            ]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|e| {
                let pod = pods.get(&e.pod);
                SliceEndpoint {
                    addresses: vec![e.ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(e.ready),
                        serving: Some(e.serving),
                        terminating: Some(e.terminating),
                    }),
                    node_name: pod.map(|p| p.node.clone()),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(e.pod.clone()),
                        namespace: Some(NAMESPACE.into()),
                        uid: pod.map(|p| p.uid.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(POD_PORT as i32),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("API double: {0}")]
    Serve(#[from] ServeError),
    #[error("API double: {0}")]
    Double(#[from] DoubleError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The API double of a lab, with a kubeconfig for processes.
pub struct ApiServer {
    double: Arc<ApiServerDouble>,
    kubeconfig: PathBuf,
    host_ips: BTreeMap<String, String>,
}

impl ApiServer {
    /// Serves on loopback inside `control_plane`, holding `nodes`; writes
    /// the kubeconfig into `dir`.
    pub async fn start(
        control_plane: &NetNs,
        dir: &Path,
        nodes: &[NodeInfo],
    ) -> Result<Self, KubeError> {
        let runtime = tokio::runtime::Handle::current();
        let path = control_plane.path();
        // Bound on a thread inside the namespace, so the listening socket
        // lives there; the server task itself runs on this runtime.
        let double = std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<ApiServerDouble, KubeError> {
                    netns::enter(&path)?;
                    Ok(runtime.block_on(ApiServerDouble::start())?)
                })
                .join()
                .expect("API double start thread panicked")
        })?;
        for info in nodes {
            double.apply(&node_object(info))?;
        }
        double.apply(&service_object())?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, double.kubeconfig_yaml())?;
        Ok(ApiServer {
            double: Arc::new(double),
            kubeconfig,
            host_ips: nodes
                .iter()
                .map(|n| (n.name.clone(), n.ip.to_string()))
                .collect(),
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn double(&self) -> &ApiServerDouble {
        &self.double
    }

    /// The double, for what outlives a borrow (the drain hooks' tokens).
    pub fn shared_double(&self) -> Arc<ApiServerDouble> {
        Arc::clone(&self.double)
    }

    /// Hands every pod DELETE this API receives (kubectl's) to `kubelet`,
    /// the path the lab's own rollouts take. The API holds it weakly: the
    /// kubelet's pods go with the lab.
    pub fn serve_deletions(&self, kubelet: &Arc<Kubelet>) {
        self.double
            .serve_pod_deletions(Arc::new(ApiDeletions(Arc::downgrade(kubelet))));
    }

    /// Writes the lab's control-plane changes into this API.
    pub fn mirror(&self) -> Box<dyn ApiMirror> {
        Box::new(DoubleMirror {
            double: self.double.clone(),
            host_ips: self.host_ips.clone(),
            pods: BTreeMap::new(),
        })
    }
}

struct DoubleMirror {
    double: Arc<ApiServerDouble>,
    host_ips: BTreeMap<String, String>,
    pods: BTreeMap<String, PodRecord>,
}

impl DoubleMirror {
    /// A failed write is a lab bug that would skew every measurement after
    /// it: say so loudly, the run goes on and its report shows the gap.
    fn check<T>(&self, what: &str, result: Result<T, DoubleError>) {
        if let Err(e) = result {
            eprintln!("lab: API double rejected {what}: {e}");
        }
    }
}

impl ApiMirror for DoubleMirror {
    fn pod_ready(&mut self, pod: &PodRecord) {
        let host_ip = self.host_ips.get(&pod.node).cloned().unwrap_or_default();
        self.pods.insert(pod.name.clone(), pod.clone());
        self.check("a pod", self.double.apply(&pod_object(pod, &host_ip)));
    }

    fn pod_deleting(&mut self, pod: &PodRecord, grace: Duration) {
        self.check(
            "a pod deletion",
            self.double
                .delete::<Pod>(NAMESPACE, &pod.name, grace.as_secs() as i64),
        );
    }

    fn pod_removed(&mut self, pod: &PodRecord) {
        // A zero grace period already removed the object.
        if self.double.get::<Pod>(NAMESPACE, &pod.name).is_some() {
            self.check(
                "the end of a pod",
                self.double.finish_deletion::<Pod>(NAMESPACE, &pod.name),
            );
        }
        self.pods.remove(&pod.name);
    }

    fn endpoints(&mut self, endpoints: &[Endpoint]) {
        let slice = endpoint_slice(endpoints, &self.pods);
        self.check("the EndpointSlice", self.double.apply(&slice));
    }
}

/// A pod DELETE through the API, carried out by the lab's kubelet.
struct ApiDeletions(Weak<Kubelet>);

impl PodDeleter for ApiDeletions {
    fn delete_pod(&self, namespace: &str, name: &str, grace: i64) -> Result<(), DoubleError> {
        let not_found = || DoubleError::NotFound {
            kind: "Pod".into(),
            key: format!("{namespace}/{name}"),
        };
        if namespace != NAMESPACE {
            return Err(not_found());
        }
        let kubelet = self.0.upgrade().ok_or_else(|| DoubleError::Deletion {
            namespace: namespace.into(),
            name: name.into(),
            reason: "the lab is shutting down".into(),
        })?;
        if kubelet.delete_by_api(name, Duration::from_secs(grace.max(0) as u64)) {
            Ok(())
        } else {
            Err(not_found())
        }
    }
}
