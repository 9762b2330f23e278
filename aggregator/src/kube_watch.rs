//! One set of cluster-wide watchers (Pods, EndpointSlices, Nodes) feeding
//! the correlator: deletions, endpoints turning ready (new pods' startup,
//! `crate::startup::detect`), and the pod and node addresses connections
//! are attributed by. Runs as a single task over the merged event streams, so
//! its indexes need no locking.
//!
//! Relists (after a 410 Gone or a restart) deliver every object again: the
//! correlator ignores deletions it already tracks or stored, and objects
//! missing from a relist are treated as deleted. Watch reconnects resume
//! from the last resourceVersion (bookmarks keep it fresh), so nothing is
//! missed or repeated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, watch};

use observer_proto::UnixNanos;

use crate::correlate::{Correlator, DeletionStart};
use crate::kube_thread::KubeThread;
use crate::nodes::NodeInfo;
use crate::pods;
use crate::readiness::Readiness;
use crate::startup::detect::ReadyWatch;

pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long a pod's last slices are kept after it left them all, for its
/// deletion event to arrive.
const LEFT_SLICES_KEPT: Duration = Duration::from_secs(600);

// Boxed: the objects are large and of very different sizes.
enum Ev {
    Pod(Box<Event<Pod>>),
    Slice(Box<Event<EndpointSlice>>),
    Node(Box<Event<Node>>),
}

/// Events waiting between the reading thread and the task applying them.
const EVENT_QUEUE: usize = 4096;

/// Starts the watchers: their streams read on the kube thread, each event
/// stamped as it is read (`crate::kube_thread`: receipt times are the
/// deletions' T0 and the endpoints' T_ready), and applied in order by a
/// task on the caller's runtime, until `stop`. Sets `ready` once all three
/// watchers listed.
pub fn spawn(
    kube: &KubeThread,
    correlator: Arc<Correlator>,
    ready: Readiness,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    kube.handle
        .spawn(read(kube.client.clone(), tx, stop.clone()));
    tokio::spawn(apply(rx, correlator, ready, stop))
}

/// Reads the streams, every event stamped as it is read.
async fn read(client: Client, tx: mpsc::Sender<(Ev, UnixNanos)>, mut stop: watch::Receiver<bool>) {
    let mut events = std::pin::pin!(streams(client));
    let mut queue_full_logged = false;
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = stop.wait_for(|v| *v) => return,
        };
        let Some(ev) = ev else { return };
        let item = (ev, UnixNanos::now());
        let item = match tx.try_send(item) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        if !queue_full_logged {
            queue_full_logged = true;
            tracing::warn!(
                queued = EVENT_QUEUE,
                "Kubernetes events arrive faster than they are applied: the watch is read only as they are, so later receipt times (T0, T_ready) may be late"
            );
        }
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

/// Pods, EndpointSlices and Nodes, merged (each retries with backoff, so:
/// endless).
fn streams(client: Client) -> impl futures::Stream<Item = Ev> + Send {
    let cfg = watcher::Config::default();
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), cfg.clone())
        .default_backoff()
        .filter_map(|r| logged("pods", r))
        .map(|e| Ev::Pod(Box::new(e)));
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone())
        .default_backoff()
        .filter_map(|r| logged("endpointslices", r))
        .map(|e| Ev::Slice(Box::new(e)));
    let nodes = watcher::watcher(Api::<Node>::all(client), cfg)
        .default_backoff()
        .filter_map(|r| logged("nodes", r))
        .map(|e| Ev::Node(Box::new(e)));
    stream::select(stream::select(pods, slices), nodes)
}

/// Applies the stamped events in order, until `stop` or the reader ends.
async fn apply(
    mut rx: mpsc::Receiver<(Ev, UnixNanos)>,
    correlator: Arc<Correlator>,
    ready: Readiness,
    mut stop: watch::Receiver<bool>,
) {
    let mut w = Watch::new(correlator);
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = stop.wait_for(|v| *v) => return,
        };
        let Some((ev, now)) = next else { return };
        match ev {
            Ev::Pod(e) => w.pod_event(*e, now),
            Ev::Slice(e) => w.slice_event(*e, now),
            Ev::Node(e) => w.node_event(*e),
        }
        if w.synced == [true; 3] && !ready.get() {
            tracing::info!("Kubernetes watchers synced");
            ready.set(true);
        }
    }
}

/// Watch errors are retried by the backoff; here they are only logged.
fn logged<T>(
    kind: &'static str,
    r: Result<T, watcher::Error>,
) -> futures::future::Ready<Option<T>> {
    futures::future::ready(
        r.map_err(|e| tracing::warn!(kind, error = %e, "watch error; retrying"))
            .ok(),
    )
}

/// (service, ports) of a pod in one slice.
type SliceEntry = (String, Vec<u16>);

struct Watch {
    correlator: Arc<Correlator>,
    /// pod uid -> slice key -> (service, ports)
    pod_slices: HashMap<String, BTreeMap<String, SliceEntry>>,
    /// slice key -> pod uids it lists
    slice_pods: HashMap<String, HashSet<String>>,
    /// Pods no slice lists any more, with the slices that last did and
    /// when: the slices' and the pods' watches are separate streams, so a
    /// slice dropping a pod can arrive before the pod's deletion does.
    left_slices: HashMap<String, (UnixNanos, BTreeMap<String, SliceEntry>)>,
    /// pod uid -> first time a slice showed it terminating / not ready
    terminating: HashMap<String, UnixNanos>,
    /// Pods being deleted: handed to the correlator (`started`) or waiting
    /// for a slice to say which service they belong to.
    deleting: HashMap<String, DeletionStart>,
    started: HashSet<String>,
    nodes: HashSet<String>,
    /// Objects listed since the current Init, per watcher.
    init_pods: HashSet<String>,
    init_slices: HashSet<String>,
    init_nodes: HashSet<String>,
    /// pods, slices, nodes have listed at least once
    synced: [bool; 3],
    /// Endpoints ready per slice, and pods' recent Ready conditions.
    ready: ReadyWatch,
}

impl Watch {
    fn new(correlator: Arc<Correlator>) -> Self {
        Self {
            correlator,
            pod_slices: HashMap::new(),
            slice_pods: HashMap::new(),
            left_slices: HashMap::new(),
            terminating: HashMap::new(),
            deleting: HashMap::new(),
            started: HashSet::new(),
            nodes: HashSet::new(),
            init_pods: HashSet::new(),
            init_slices: HashSet::new(),
            init_nodes: HashSet::new(),
            synced: [false; 3],
            ready: ReadyWatch::default(),
        }
    }

    fn pod_event(&mut self, e: Event<Pod>, now: UnixNanos) {
        match e {
            Event::Init => self.init_pods.clear(),
            Event::InitApply(p) => {
                self.init_pods.insert(p.uid().unwrap_or_default());
                self.ready.pod_seen(&p, now);
                self.index_pod(&p);
                self.pod_seen(&p, None, now);
            }
            Event::Apply(p) => {
                self.ready.pod_seen(&p, now);
                self.index_pod(&p);
                self.pod_seen(&p, Some(now), now);
            }
            Event::Delete(p) => {
                let uid = p.uid().unwrap_or_default();
                self.ready.pod_gone(&uid);
                if let Some((ips, _)) = pods::source_of(&p) {
                    for ip in ips {
                        self.correlator.remove_pod(ip, &uid);
                    }
                }
                self.pod_gone(&uid, now);
            }
            Event::InitDone => {
                // Pods the relist no longer has lost their addresses.
                for (ip, uid) in self.correlator.indexed_pods() {
                    if !self.init_pods.contains(&uid) {
                        self.correlator.remove_pod(ip, &uid);
                    }
                }
                let mut gone: Vec<String> = self
                    .deleting
                    .keys()
                    .filter(|u| !self.init_pods.contains(*u))
                    .cloned()
                    .collect();
                // Deletions restored from the store whose pod went while the
                // aggregator was down: this watcher never saw them.
                gone.extend(
                    self.correlator
                        .pending_uids()
                        .into_iter()
                        .filter(|u| !self.init_pods.contains(u) && !self.deleting.contains_key(u)),
                );
                for uid in gone {
                    self.pod_gone(&uid, now);
                }
                self.synced[0] = true;
            }
        }
    }

    /// Connections from the pod are attributed by its addresses.
    fn index_pod(&self, p: &Pod) {
        if let Some((ips, source)) = pods::source_of(p) {
            self.correlator.set_pod(&ips, source);
        }
    }

    fn pod_seen(&mut self, p: &Pod, received: Option<UnixNanos>, now: UnixNanos) {
        let Some(uid) = p.uid() else { return };
        let Some(ts) = &p.metadata.deletion_timestamp else {
            return;
        };
        if self.deleting.contains_key(&uid) {
            return;
        }
        let spec = p.spec.as_ref();
        // A host-network pod's IP is its node's: watching it would watch
        // every connection of the node.
        if spec.and_then(|s| s.host_network).unwrap_or(false) {
            return;
        }
        let Some(ip) = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        else {
            return;
        };
        let grace = p.metadata.deletion_grace_period_seconds;
        let deadline = UnixNanos::from(std::time::SystemTime::from(ts.0));
        let d = DeletionStart {
            pod_uid: uid.clone(),
            namespace: p.namespace().unwrap_or_default(),
            pod_name: p.name_any(),
            services: Vec::new(),
            ip,
            ports: Vec::new(),
            host_node: spec.and_then(|s| s.node_name.clone()),
            received_unix_nanos: received,
            api_start_unix_nanos: Some(
                deadline - UnixNanos::from_seconds(grace.unwrap_or(0)).as_nanos(),
            ),
            grace_period_seconds: grace,
            terminating_unix_nanos: None,
        };
        self.deleting.insert(uid.clone(), d);
        self.try_start(&uid, now);
    }

    /// Hands a deleting pod to the correlator once a slice names its service.
    fn try_start(&mut self, uid: &str, now: UnixNanos) {
        if self.started.contains(uid) {
            return;
        }
        let slices = self
            .pod_slices
            .get(uid)
            .or_else(|| self.left_slices.get(uid).map(|(_, s)| s));
        let (Some(d), Some(slices)) = (self.deleting.get(uid), slices) else {
            return;
        };
        let mut d = d.clone();
        let mut services: Vec<String> = slices.values().map(|(s, _)| s.clone()).collect();
        services.sort();
        services.dedup();
        let mut ports: Vec<u16> = slices
            .values()
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        d.services = services;
        d.ports = ports;
        d.terminating_unix_nanos = self.terminating.get(uid).copied();
        self.started.insert(uid.to_string());
        self.correlator.deletion_started(d, now);
    }

    fn pod_gone(&mut self, uid: &str, now: UnixNanos) {
        self.deleting.remove(uid);
        self.terminating.remove(uid);
        self.started.remove(uid);
        self.left_slices.remove(uid);
        // Also when this watcher never started it: the deletion may have
        // been restored from the store (a no-op for pods not tracked).
        self.correlator.pod_gone(uid, now);
    }

    fn slice_event(&mut self, e: Event<EndpointSlice>, now: UnixNanos) {
        match e {
            Event::Init => self.init_slices.clear(),
            Event::InitApply(s) => {
                self.init_slices.insert(slice_key(&s));
                self.ready.slice_seen(&s, true);
                self.slice_seen(&s, now);
            }
            Event::Apply(s) => {
                for e in self.ready.slice_seen(&s, false) {
                    let condition = self.ready.ready_condition(&e.pod_uid);
                    self.correlator.endpoint_ready(e, condition, now);
                }
                self.slice_seen(&s, now);
            }
            Event::Delete(s) => self.slice_gone(&slice_key(&s), now),
            Event::InitDone => {
                let gone: Vec<String> = self
                    .slice_pods
                    .keys()
                    .filter(|k| !self.init_slices.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.slice_gone(&k, now);
                }
                self.synced[1] = true;
            }
        }
    }

    fn slice_seen(&mut self, s: &EndpointSlice, now: UnixNanos) {
        let key = slice_key(s);
        let Some(service) = s.labels().get(SERVICE_NAME_LABEL).cloned() else {
            return;
        };
        let ports = slice_ports(s);
        let mut listed = HashSet::new();
        for ep in &s.endpoints {
            let Some(uid) = pod_target(ep).and_then(|r| r.uid.clone()) else {
                continue;
            };
            let c = ep.conditions.as_ref();
            let leaving = c.and_then(|c| c.terminating).unwrap_or(false)
                || c.and_then(|c| c.ready) == Some(false);
            if leaving {
                self.mark_terminating(&uid, now);
            }
            self.pod_slices
                .entry(uid.clone())
                .or_default()
                .insert(key.clone(), (service.clone(), ports.clone()));
            listed.insert(uid);
        }
        let before = self
            .slice_pods
            .insert(key.clone(), listed.clone())
            .unwrap_or_default();
        // Dropped from the slice: as final a sign of leaving as terminating.
        for uid in before.difference(&listed) {
            self.mark_terminating(uid, now);
            self.unindex(uid, &key, now);
        }
        self.forget_left(now);
        for uid in &listed {
            if self.deleting.contains_key(uid) {
                self.try_start(uid, now);
            }
        }
    }

    fn mark_terminating(&mut self, uid: &str, now: UnixNanos) {
        if !self.terminating.contains_key(uid) {
            self.terminating.insert(uid.to_string(), now);
            self.correlator.endpoint_terminating(uid, now);
        }
    }

    fn unindex(&mut self, uid: &str, key: &str, now: UnixNanos) {
        let Some(m) = self.pod_slices.get_mut(uid) else {
            return;
        };
        let Some(entry) = m.remove(key) else { return };
        if m.is_empty() {
            self.pod_slices.remove(uid);
            let last = BTreeMap::from([(key.to_string(), entry)]);
            self.left_slices.insert(uid.to_string(), (now, last));
        }
    }

    /// Forgets pods that left every slice long ago: a pod deleted after
    /// that is not one whose routing anybody still had to drop.
    fn forget_left(&mut self, now: UnixNanos) {
        let horizon = now - LEFT_SLICES_KEPT;
        self.left_slices.retain(|_, (at, _)| *at >= horizon);
    }

    fn slice_gone(&mut self, key: &str, now: UnixNanos) {
        self.ready.slice_gone(key);
        for uid in self.slice_pods.remove(key).unwrap_or_default() {
            self.mark_terminating(&uid, now);
            self.unindex(&uid, key, now);
        }
    }

    fn node_event(&mut self, e: Event<Node>) {
        match e {
            Event::Init => self.init_nodes.clear(),
            Event::InitApply(n) => {
                self.init_nodes.insert(n.name_any());
                self.node_seen(&n);
            }
            Event::Apply(n) => self.node_seen(&n),
            Event::Delete(n) => {
                self.nodes.remove(&n.name_any());
                self.correlator.remove_node(&n.name_any());
            }
            Event::InitDone => {
                let gone: Vec<String> = self.nodes.difference(&self.init_nodes).cloned().collect();
                for n in gone {
                    self.nodes.remove(&n);
                    self.correlator.remove_node(&n);
                }
                self.synced[2] = true;
            }
        }
    }

    fn node_seen(&mut self, n: &Node) {
        let name = n.name_any();
        let addresses = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        let spec = n.spec.as_ref();
        let pod_cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        self.nodes.insert(name.clone());
        self.correlator.set_node(
            name,
            NodeInfo {
                addresses,
                pod_cidrs,
            },
        );
    }
}

pub(crate) fn slice_key(s: &EndpointSlice) -> String {
    format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())
}

/// The ports a slice lists.
pub(crate) fn slice_ports(s: &EndpointSlice) -> Vec<u16> {
    s.ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
        .collect()
}

/// The pod behind an endpoint, when a pod is.
pub(crate) fn pod_target(
    ep: &k8s_openapi::api::discovery::v1::Endpoint,
) -> Option<&k8s_openapi::api::core::v1::ObjectReference> {
    ep.target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ObjectReference, PodSpec, PodStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;
    use crate::config::Settings;
    use crate::metrics::Metrics;
    use crate::store::Store;

    fn watch() -> (Watch, Arc<Correlator>) {
        let store = Arc::new(Store::in_memory().unwrap());
        let c = Correlator::new(
            Arc::new(Settings::default()),
            store,
            Arc::new(Metrics::new()),
        );
        (Watch::new(Arc::clone(&c)), c)
    }

    fn slice(pods: &[&str]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("default".into()),
                labels: Some([(SERVICE_NAME_LABEL.into(), "web".into())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: pods
                .iter()
                .map(|uid| Endpoint {
                    addresses: vec!["10.0.0.7".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..EndpointConditions::default()
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        uid: Some((*uid).into()),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..EndpointPort::default()
            }]),
        }
    }

    fn deleted_pod(uid: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("default".into()),
                uid: Some(uid.into()),
                deletion_timestamp: Some(Time(std::time::SystemTime::now().try_into().unwrap())),
                deletion_grace_period_seconds: Some(30),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.7".into()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn a_deletion_seen_after_its_slice_dropped_the_pod_still_starts() {
        let (mut w, c) = watch();
        let now = UnixNanos::now();
        w.slice_event(Event::Apply(slice(&["u1"])), now);
        w.slice_event(Event::Apply(slice(&[])), now);
        assert!(c.pending_uids().is_empty());
        w.pod_event(Event::Apply(deleted_pod("u1")), now);
        assert_eq!(c.pending_uids(), ["u1"]);
    }

    #[test]
    fn pods_that_left_their_slices_long_ago_are_forgotten() {
        let (mut w, c) = watch();
        let then = UnixNanos::now() - Duration::from_secs(3600);
        w.slice_event(Event::Apply(slice(&["u1"])), then);
        w.slice_event(Event::Apply(slice(&[])), then);
        w.slice_event(Event::Apply(slice(&[])), UnixNanos::now());
        w.pod_event(Event::Apply(deleted_pod("u1")), UnixNanos::now());
        assert!(c.pending_uids().is_empty());
    }
}
