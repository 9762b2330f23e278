//! The lab's control plane state: the Service's pods and EndpointSlice
//! endpoints, changed the way the Kubernetes API and the EndpointSlice
//! controller change them, and published to every node's proxy.

use observer_proto::UnixNanos;
use std::{net::Ipv4Addr, time::Duration};

use tokio::sync::watch;

use crate::{
    kubeproxy::ServicePort,
    proxy::{Endpoint, Services},
};

pub const NAMESPACE: &str = "default";
pub const SERVICE: &str = "web";
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;
pub const POD_PORT: u16 = 8080;

pub fn service_port() -> ServicePort {
    ServicePort {
        namespace: NAMESPACE.into(),
        name: SERVICE.into(),
        port_name: "http".into(),
        cluster_ip: SERVICE_IP,
        port: SERVICE_PORT,
    }
}

/// A pod as the API knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub node: String,
    /// Set when the deletion was requested.
    pub deletion_requested_unix_nano: Option<UnixNanos>,
}

/// Where the control plane's changes go besides the proxies: the
/// Kubernetes API double the aggregator watches.
pub trait ApiMirror: Send {
    /// A pod was created, scheduled and became ready.
    fn pod_ready(&mut self, pod: &PodRecord);
    /// A pod's deletion was requested with this grace period.
    fn pod_deleting(&mut self, pod: &PodRecord, grace: Duration);
    /// The pod's containers ended; its object is gone.
    fn pod_removed(&mut self, pod: &PodRecord);
    /// The Service's EndpointSlice now lists these endpoints.
    fn endpoints(&mut self, endpoints: &[Endpoint]);
}

/// The Service's endpoints as its EndpointSlice shows them, published to the
/// proxies (and the API mirror, when there is one) on every change.
pub struct ControlPlane {
    endpoints: Vec<Endpoint>,
    publish: watch::Sender<Services>,
    mirror: Option<Box<dyn ApiMirror>>,
}

impl ControlPlane {
    pub fn new() -> Self {
        let (publish, _) = watch::channel(vec![(service_port(), Vec::new())]);
        ControlPlane {
            endpoints: Vec::new(),
            publish,
            mirror: None,
        }
    }

    /// Sends every later change to `mirror` as well.
    pub fn set_mirror(&mut self, mut mirror: Box<dyn ApiMirror>, pods: &[PodRecord]) {
        for pod in pods {
            mirror.pod_ready(pod);
        }
        mirror.endpoints(&self.endpoints);
        self.mirror = Some(mirror);
    }

    /// What a node's proxy follows.
    pub fn subscribe(&self) -> watch::Receiver<Services> {
        self.publish.subscribe()
    }

    fn publish(&mut self) {
        // The API first: the EndpointSlice is written before any proxy can
        // see it, as in a cluster.
        if let Some(m) = &mut self.mirror {
            m.endpoints(&self.endpoints);
        }
        self.publish
            .send_replace(vec![(service_port(), self.endpoints.clone())]);
    }

    /// A new pod passed its readiness probe: the endpoint controller adds
    /// it as ready.
    pub fn pod_ready(&mut self, pod: &PodRecord) {
        if let Some(m) = &mut self.mirror {
            m.pod_ready(pod);
        }
        self.endpoints.retain(|e| e.pod != pod.name);
        self.endpoints.push(Endpoint {
            pod: pod.name.clone(),
            ip: pod.ip,
            port: POD_PORT,
            ready: true,
            serving: true,
            terminating: false,
        });
        self.publish();
    }

    /// The pod's deletion was requested: the pod gets its deletion
    /// timestamp, then its endpoint turns not ready and terminating, still
    /// serving until its process stops.
    pub fn pod_terminating(&mut self, pod: &PodRecord, grace: Duration) {
        if let Some(m) = &mut self.mirror {
            m.pod_deleting(pod, grace);
        }
        for e in self.endpoints.iter_mut().filter(|e| e.pod == pod.name) {
            e.ready = false;
            e.serving = true;
            e.terminating = true;
        }
        self.publish();
    }

    /// The pod is gone: its endpoint leaves the slice, its object the API.
    pub fn pod_removed(&mut self, pod: &PodRecord) {
        self.endpoints.retain(|e| e.pod != pod.name);
        self.publish();
        if let Some(m) = &mut self.mirror {
            m.pod_removed(pod);
        }
    }
}

impl Default for ControlPlane {
    fn default() -> Self {
        Self::new()
    }
}
