//! The correlator's side of new pods' startup windows (`crate::startup`):
//! opens one when a slice shows an endpoint ready and tells the agents,
//! feeds it their observations attributed to routers as deletions are,
//! and closes it into the startup log.

use std::sync::Arc;

use observer_proto::{ClockEstimate, NewEndpoint, Observation, UnixNanos};

use super::fold::{Plausibility, peer_node};
use super::routers;
use super::state::State;
use super::{Correlator, WatchChange};
use crate::nodes::from_own_socket;
use crate::startup::detect::ReadyEndpoint;
use crate::startup::{Log, NewPod, Opened, Seen};

impl Correlator {
    /// An EndpointSlice showed `ready` ready; the aggregator received that
    /// at `now` (T_ready). `ready_condition`: the pod's Ready condition.
    pub fn endpoint_ready(
        &self,
        ready: ReadyEndpoint,
        ready_condition: Option<UnixNanos>,
        now: UnixNanos,
    ) {
        let mut st = self.state();
        let expected = st.live_nodes();
        let pod = st.pods.get(ready.ip).filter(|p| p.uid == ready.pod_uid);
        let workload = pod.map_or_else(
            || format!("{}/{}", ready.namespace, ready.pod_name),
            |p| p.workload.clone(),
        );
        let host_node = pod.and_then(|p| p.node.clone());
        let new = NewPod {
            endpoint: NewEndpoint {
                pod_uid: ready.pod_uid,
                namespace: ready.namespace,
                pod_name: ready.pod_name,
                services: vec![ready.service],
                ip: ready.ip,
                ports: ready.ports,
                ready: now,
            },
            workload,
            host_node,
            ready_condition,
            identified: pod.is_some(),
        };
        let (namespace, pod_name) = (
            new.endpoint.namespace.clone(),
            new.endpoint.pod_name.clone(),
        );
        match st.startup.open(new, expected) {
            Opened::Watch(e) => {
                tracing::info!(%namespace, pod = %pod_name, ip = %e.ip, "endpoint ready: startup window opened");
                // No receivers is fine: no agent is connected.
                let _ = self.changes.send(WatchChange::AddNew(e));
            }
            Opened::AlreadyOpen => {}
            Opened::Full => {
                self.metrics.startup.not_watched();
                tracing::warn!(
                    %namespace, pod = %pod_name, open = st.startup.len(),
                    "startup windows at --startup-max-watched: new pod not watched"
                );
            }
        }
    }

    /// The finished startup windows.
    pub fn startup_log(&self) -> Arc<Log> {
        Arc::clone(&self.startup_log)
    }

    /// Closes the startup windows that are over: agents stop watching
    /// them, their records go to the store and the log.
    pub(super) fn finish_startups(&self, now: UnixNanos) {
        let closed = {
            let mut st = self.state();
            let st = &mut *st;
            st.startup.due(now, &st.pods)
        };
        for w in closed {
            let _ = self
                .changes
                .send(WatchChange::RemoveNew(w.pod.endpoint.clone()));
            let record = w.record();
            self.metrics.startup.finished(&record);
            if record.refused_connections > 0 {
                tracing::warn!(
                    namespace = %record.namespace, pod = %record.pod_name,
                    workload = %record.workload, refused = record.refused_connections,
                    "new pod refused connections after it was marked ready"
                );
            }
            if let Err(e) = self.store.record_startup(&record) {
                tracing::error!(error = %e, pod = %record.pod_name, "storing a finished startup window failed");
            }
            self.startup_log.push(record, now);
        }
    }
}

impl State {
    /// Folds `node`'s observation into the startup windows of its
    /// endpoint; false when none watches it or it is implausible (the
    /// deletion fold then counts the refusal).
    pub(super) fn observe_startup(
        &mut self,
        node: &str,
        obs: &Observation,
        clock: ClockEstimate,
        now: UnixNanos,
        plausible: Plausibility,
    ) -> bool {
        if !self.startup.watches(obs.endpoint().ip()) || !from_own_socket(obs, node, &self.nodes) {
            return false;
        }
        let time = clock.to_aggregator(obs.time());
        if plausible.check(time, clock, now).is_err() {
            return false;
        }
        let ip = obs.endpoint().ip();
        if let Some(p) = self.pods.get(ip) {
            self.startup.identify(ip, p);
        }
        let peer = peer_node(&self.nodes, obs);
        let peer_host = obs.peer().and_then(|ip| self.nodes.node_with_address(ip));
        let router = routers::attribute(&mut self.pods, &self.nodes, node, peer, obs);
        self.startup.apply(&Seen {
            obs,
            time,
            node,
            router: router.as_ref().map(|a| (&a.router, a.evidence)),
            peer_host,
            uncertainty_ns: clock.uncertainty_ns,
        });
        true
    }
}
