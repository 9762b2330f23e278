//! A running lab: nodes with their proxies, the Service's pods, and rolling
//! updates driven through the control plane while clients on every node
//! send traffic to the Service VIP.

use observer_proto::UnixNanos;
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use crate::{
    api::{self, ApiMirror, ControlPlane, PodRecord, PodTermination},
    client::{Client, ClientConfig, ClientKind, ClientReport},
    delay::DelayDistribution,
    drain::{DrainHook, PreStop},
    kubelet::{Kubelet, Pod},
    kubeproxy::{CiliumNode, KubeProxyError, Mode},
    proxy::{Proxy, ProxyConfig, RuleChange, Services},
    routers::{ByRouter, RouterDrop, RouterError, Routers},
    server::ShutdownMode,
    startup::{NewPodTruth, StartBehaviour},
    topology::{Cluster, TopologyError},
    workload::{Ending, PodProcess, WorkloadError},
};

#[derive(Debug, Error)]
pub enum LabError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    KubeProxy(#[from] KubeProxyError),
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("client: {0}")]
    Client(std::io::Error),
    #[error("{0}")]
    Timeout(String),
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    pub nodes: usize,
    /// Replicas of the Service.
    pub pods: usize,
    /// Dataplane modes, assigned to nodes in turn.
    pub modes: Vec<Mode>,
    pub delay: DelayDistribution,
    pub seed: u64,
    /// The `lab-pod-server` binary.
    pub pod_server: PathBuf,
    /// How every pod's server shuts down.
    pub server_mode: ShutdownMode,
    /// When every pod's server serves, relative to being marked ready.
    pub start: StartBehaviour,
    /// The pods' preStop delay and grace period, which a deletion through
    /// the API (kubectl) runs.
    pub termination: PodTermination,
}

#[derive(Debug, Clone)]
pub struct RolloutConfig {
    /// Pods deleted (and replaced) in this rollout.
    pub deletions: usize,
    /// Time between two deletions (at least the time a replacement pod
    /// takes to start).
    pub spacing: Duration,
    pub pre_stop: Duration,
    /// terminationGracePeriodSeconds (counts the preStop time too).
    pub grace: Duration,
    /// Requests per second of each client (two per node: one opening a
    /// connection per request, one keep-alive).
    pub rate: f64,
    pub keep_alive_connections: usize,
    /// The adaptive drain instead of the fixed `pre_stop` sleep, which is
    /// then its fallback.
    pub drain: Option<Arc<DrainHook>>,
}

/// A node of the lab as reported.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    pub mode: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
}

/// One pod deletion of a rollout and what each node's proxy did about it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletionTruth {
    pub pod: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub host_node: String,
    pub requested_unix_nano: UnixNanos,
    pub ending: Option<Ending>,
    /// How long its preStop hook ran.
    pub pre_stop_seconds: Option<f64>,
    /// The rule removal on each node (ground truth), in node order.
    pub removals: Vec<RuleChange>,
    /// When each other router dropped the pod (ground truth).
    pub router_drops: Vec<RouterDrop>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutResult {
    /// The fixed preStop sleep, or the adaptive drain's fallback.
    pub pre_stop_seconds: f64,
    pub adaptive_drain: bool,
    pub server_mode: ShutdownMode,
    pub deletions: Vec<DeletionTruth>,
    /// The pods the rollout started, and when each node added them.
    pub new_pods: Vec<NewPodTruth>,
    /// Every client opening a connection per request: kube-proxy's VIP
    /// clients and the other routers' clients.
    pub new_connection: ClientReport,
    pub keep_alive: ClientReport,
    /// The same requests by router: a node's name for its VIP clients (both
    /// kinds), a router's name for its client.
    pub by_router: ByRouter,
    pub seconds: f64,
}

impl RolloutResult {
    pub fn requests(&self) -> u64 {
        self.new_connection.requests + self.keep_alive.requests
    }

    pub fn failed(&self) -> u64 {
        self.new_connection.failed_total() + self.keep_alive.failed_total()
    }
}

pub struct Lab {
    pub cluster: Cluster,
    config: LabConfig,
    control: Arc<Mutex<ControlPlane>>,
    proxies: Vec<Proxy>,
    modes: Vec<Mode>,
    kubelet: Arc<Kubelet>,
    next_pod: usize,
    routers: Routers,
    /// The largest extra delay a node was slowed down by.
    slowed: Duration,
}

/// How long after its delay ran out a proxy may take to commit a change.
const APPLY_SLACK: Duration = Duration::from_secs(5);

impl Lab {
    /// Builds the network, starts a proxy per node and the Service's pods,
    /// and waits until every node routes to all of them.
    pub async fn start(config: LabConfig) -> Result<Self, LabError> {
        let cluster = Cluster::create(config.nodes)?;
        let control = Arc::new(Mutex::new(ControlPlane::new()));
        let modes: Vec<Mode> = (0..config.nodes)
            .map(|i| config.modes[i % config.modes.len().max(1)])
            .collect();
        let mut proxies = Vec::new();
        for (node, mode) in cluster.nodes.iter().zip(&modes) {
            let proxy_config = ProxyConfig {
                node: node.name.clone(),
                netns: node.ns.name().to_owned(),
                mode: *mode,
                delay: config.delay,
                seed: config
                    .seed
                    .wrapping_mul(1000)
                    .wrapping_add(node.index as u64),
            };
            let subscription = control.lock().expect("control lock").subscribe();
            proxies.push(Proxy::start(proxy_config, subscription).await?);
        }
        let mut lab = Lab {
            cluster,
            config,
            kubelet: Arc::new(Kubelet::new(control.clone())),
            control,
            proxies,
            modes,
            next_pod: 0,
            routers: Routers::kube_proxy_only(),
            slowed: Duration::ZERO,
        };
        for _ in 0..lab.config.pods {
            let pod = lab.start_pod(lab.config.termination).await?;
            lab.kubelet.add(pod);
        }
        for ip in lab.kubelet.records().iter().map(|r| r.ip) {
            lab.wait_for_rule(ip, false).await?;
        }
        Ok(lab)
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.cluster
            .nodes
            .iter()
            .zip(&self.modes)
            .map(|(n, m)| NodeInfo {
                name: n.name.clone(),
                mode: m.to_string(),
                ip: n.ip,
                pod_cidr: n.pod_cidr_string(),
            })
            .collect()
    }

    /// Sends the control plane's state and every later change to `mirror`.
    pub fn mirror_to(&self, mirror: Box<dyn ApiMirror>) {
        self.control
            .lock()
            .expect("control lock")
            .set_mirror(mirror, &self.kubelet.records());
    }

    /// The running pods and their deletion, for the API's DELETE.
    pub fn kubelet(&self) -> &Arc<Kubelet> {
        &self.kubelet
    }

    pub fn modes(&self) -> &[Mode] {
        &self.modes
    }

    /// Node `node`'s Cilium maps and writer, when it runs the cilium mode.
    pub fn cilium_node(&self, node: usize) -> Option<&CiliumNode> {
        self.proxies.get(node).and_then(Proxy::cilium)
    }

    /// From now on node `node`'s proxy applies every change `extra` later
    /// than its drawn delay: a node slower than what was measured.
    pub fn slow_down(&mut self, node: usize, extra: Duration) {
        if let Some(p) = self.proxies.get(node) {
            p.slow_down(extra);
            self.slowed = self.slowed.max(extra);
        }
    }

    /// The Service's endpoints as the EndpointSlice publishes them, for a
    /// router to follow.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Services> {
        self.control.lock().expect("control lock").subscribe()
    }

    /// The routers the rollouts send through from now on (the lab starts
    /// with kube-proxy's alone); the previous ones stop.
    pub fn set_routers(&mut self, routers: Routers) {
        self.routers = routers;
    }

    pub fn routers(&self) -> &Routers {
        &self.routers
    }

    /// Starts the next pod with this spec; [`Kubelet::add`] makes it ready.
    async fn start_pod(&mut self, termination: PodTermination) -> Result<Pod, LabError> {
        let index = self.next_pod;
        self.next_pod += 1;
        let node = index % self.cluster.nodes.len();
        let name = format!("{}-{index}", api::SERVICE);
        let net = self.cluster.add_pod(node, &format!("p{index}"))?;
        let process = PodProcess::start(
            &self.config.pod_server,
            &net.ns,
            &name,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, api::POD_PORT),
            self.config.server_mode,
            self.config.start,
        )
        .await?;
        let record = PodRecord {
            uid: format!(
                "{:08x}-0000-4000-8000-{index:012x}",
                self.config.seed as u32
            ),
            name,
            ip: net.ip,
            node: self.cluster.nodes[node].name.clone(),
            termination,
            deletion_requested_unix_nano: None,
        };
        Ok(Pod {
            record,
            net,
            process,
        })
    }

    /// Waits until every node has added (or removed) `ip` in its rules.
    async fn wait_for_rule(
        &self,
        ip: Ipv4Addr,
        removed: bool,
    ) -> Result<Vec<RuleChange>, LabError> {
        let deadline = Instant::now() + self.config.delay.max() + self.slowed + APPLY_SLACK;
        loop {
            let found: Vec<Option<RuleChange>> = self
                .proxies
                .iter()
                .map(|p| p.last_change(ip, removed))
                .collect();
            if found.iter().all(Option::is_some) {
                return Ok(found.into_iter().flatten().collect());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout(format!(
                    "not every node {} {ip} in time",
                    if removed { "removed" } else { "added" }
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each client with the router it sends through and its kind.
    fn start_clients(&self, config: &RolloutConfig) -> Vec<(String, ClientKind, Client)> {
        let target = SocketAddrV4::new(api::SERVICE_IP, api::SERVICE_PORT);
        let mut clients: Vec<_> = self
            .routers
            .start_clients()
            .into_iter()
            .map(|(router, client)| (router, ClientKind::NewConnection, client))
            .collect();
        let vip_nodes = if self.routers.kube_proxy {
            &self.cluster.nodes[..]
        } else {
            &[]
        };
        for node in vip_nodes {
            for (kind, concurrency) in [
                (ClientKind::NewConnection, 16),
                (ClientKind::KeepAlive, config.keep_alive_connections),
            ] {
                let client_config = ClientConfig {
                    target: target.into(),
                    kind,
                    rate: config.rate,
                    // Bounded; the rollout stops the clients when it ends.
                    duration: Duration::from_secs(600),
                    concurrency,
                    timeout: Duration::from_secs(2),
                };
                clients.push((
                    node.name.clone(),
                    kind,
                    Client::start(Some(node.ns.path()), client_config),
                ));
            }
        }
        clients
    }

    /// A rolling update: `deletions` times, a replacement pod starts and
    /// becomes ready, then the oldest pod is deleted (preStop, SIGTERM,
    /// SIGKILL at the end of the grace period; its endpoint turns
    /// terminating at once and leaves the slice when its process ended).
    /// Returns when every node has removed every deleted pod.
    pub async fn rollout(
        &mut self,
        config: &RolloutConfig,
        mut progress: impl FnMut(&str),
    ) -> Result<RolloutResult, LabError> {
        let started = Instant::now();
        let clients = self.start_clients(config);
        // Let keep-alive connections spread over the pods first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut terminations = Vec::new();
        let mut deleted = Vec::new();
        let mut replacements = Vec::new();
        // The rollout's pods carry its preStop delay and grace period.
        let spec = PodTermination {
            pre_stop: config.pre_stop,
            grace: config.grace,
        };
        let pre_stop = match &config.drain {
            Some(hook) => PreStop::Drain(Arc::clone(hook)),
            None => PreStop::Sleep(config.pre_stop),
        };
        // A rolling update replaces each running pod at most once.
        let steps = config.deletions.min(self.kubelet.running());
        for step in 0..steps {
            let step_started = tokio::time::Instant::now();
            let replacement = self.start_pod(spec).await?;
            let (name, node) = (
                replacement.record.name.clone(),
                replacement.record.node.clone(),
            );
            replacements.push(replacement.record.clone());
            self.kubelet.add(replacement);
            let Some(deletion) = self.kubelet.delete_oldest(&pre_stop, config.grace) else {
                break;
            };
            progress(&format!(
                "step {}/{}: {name} ready on {node}; deleted {} on {}",
                step + 1,
                steps,
                deletion.record.name,
                deletion.record.node
            ));
            terminations.push(deletion.ended);
            // The namespace (and so the pod IP) stays until the rollout
            // ends, as a pod sandbox outlives its exited container.
            deleted.push((deletion.record, deletion.net));
            // The replacement's start counts: a rollout of many pods keeps
            // its pace where starting a pod takes most of the spacing.
            tokio::time::sleep_until(step_started + config.spacing).await;
        }
        progress(&format!(
            "{} pods deleted; waiting for them to end and for every node and router to drop them",
            deleted.len()
        ));
        let mut endings = Vec::new();
        for t in terminations {
            endings.push(t.await.ok());
        }
        let mut deletions = Vec::new();
        for ((record, _), ending) in deleted.iter().zip(endings) {
            let removals = self.wait_for_rule(record.ip, true).await?;
            let router_drops = self.routers.wait_dropped(record.ip).await?;
            deletions.push(DeletionTruth {
                pod: record.name.clone(),
                uid: record.uid.clone(),
                ip: record.ip,
                host_node: record.node.clone(),
                requested_unix_nano: record.deletion_requested_unix_nano.unwrap_or_default(),
                ending: ending.map(|t| t.ending),
                pre_stop_seconds: ending.map(|t| t.pre_stop.as_secs_f64()),
                removals,
                router_drops,
            });
        }
        let mut new_pods = Vec::new();
        for record in replacements {
            new_pods.push(NewPodTruth {
                additions: self.wait_for_rule(record.ip, false).await?,
                pod: record.name,
                uid: record.uid,
                host_node: record.node,
            });
        }
        // Traffic continues a moment after the last removal, so a late
        // failure would still be counted.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut new_connection = ClientReport::default();
        let mut keep_alive = ClientReport::default();
        let mut by_router = ByRouter::new();
        for (router, kind, client) in clients {
            let report = client.finish().map_err(LabError::Client)?;
            by_router.entry(router).or_default().merge(&report);
            match kind {
                ClientKind::NewConnection => new_connection.merge(&report),
                ClientKind::KeepAlive => keep_alive.merge(&report),
            }
        }
        drop(deleted);
        Ok(RolloutResult {
            pre_stop_seconds: config.pre_stop.as_secs_f64(),
            adaptive_drain: config.drain.is_some(),
            server_mode: self.config.server_mode,
            deletions,
            new_pods,
            new_connection,
            keep_alive,
            by_router,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Stops the proxies (removing their rules) and the pods; the network
    /// goes when the lab is dropped.
    pub async fn shutdown(self) -> Result<(), LabError> {
        for proxy in self.proxies {
            proxy.stop().await?;
        }
        Ok(())
    }
}
