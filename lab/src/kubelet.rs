//! The Service's running pods and the one path every pod deletion takes,
//! whether the lab's rollout asks for it or a `DELETE` through the
//! Kubernetes API does (kubectl): the API records the deletion, the
//! EndpointSlice marks the endpoint terminating (the proxies follow after
//! their delays), the kubelet runs the preStop hook (a sleep, or the
//! adaptive drain: [`crate::drain`]), SIGTERM and, at the
//! end of the grace period, SIGKILL; then the endpoint and the pod go.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use observer_proto::UnixNanos;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    api::{ControlPlane, PodRecord},
    drain::PreStop,
    topology::PodNet,
    workload::{PodProcess, Termination},
};

/// A running pod: its record in the API, its network, its process.
pub struct Pod {
    pub record: PodRecord,
    pub net: PodNet,
    pub process: PodProcess,
}

/// A deletion under way. The pod's network stays while this lives, as a
/// pod sandbox outlives its exited container.
pub struct Deletion {
    pub record: PodRecord,
    pub net: PodNet,
    /// The kubelet's termination, once the pod is gone.
    pub ended: JoinHandle<Termination>,
}

/// A pod whose termination runs, and how to shorten its grace period.
struct Terminating {
    record: PodRecord,
    grace: watch::Sender<Duration>,
}

pub struct Kubelet {
    control: Arc<Mutex<ControlPlane>>,
    running: Mutex<Vec<Pod>>,
    terminating: Arc<Mutex<HashMap<String, Terminating>>>,
    /// Deletions asked through the API: nobody waits for them, so their
    /// sandboxes stay until the lab ends.
    api_deletions: Mutex<Vec<Deletion>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Kubelet {
    pub fn new(control: Arc<Mutex<ControlPlane>>) -> Self {
        Kubelet {
            control,
            running: Mutex::new(Vec::new()),
            terminating: Arc::default(),
            api_deletions: Mutex::new(Vec::new()),
        }
    }

    /// A started pod passed its readiness probe: the API and the
    /// EndpointSlice get it.
    pub fn add(&self, pod: Pod) {
        lock(&self.control).pod_ready(&pod.record);
        lock(&self.running).push(pod);
    }

    /// The running pods, oldest first.
    pub fn records(&self) -> Vec<PodRecord> {
        lock(&self.running)
            .iter()
            .map(|p| p.record.clone())
            .collect()
    }

    /// The pods whose termination still runs.
    pub fn terminating(&self) -> Vec<String> {
        lock(&self.terminating).keys().cloned().collect()
    }

    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// Deletes the oldest running pod (a rollout's next victim) with the
    /// rollout's preStop hook and grace period.
    pub fn delete_oldest(&self, pre_stop: &PreStop, grace: Duration) -> Option<Deletion> {
        let pod = {
            let mut running = lock(&self.running);
            (!running.is_empty()).then(|| running.remove(0))?
        };
        Some(self.terminate(pod, pre_stop.clone(), grace))
    }

    /// Deletes the pod `name` as the API asked: the pod's own preStop
    /// delay, the request's grace period; the deletion is kept until the
    /// lab ends. A pod already terminating gets the shorter of its grace
    /// periods, as from a second `kubectl delete`. False when no such pod
    /// runs or terminates.
    pub fn delete_by_api(&self, name: &str, grace: Duration) -> bool {
        let pod = {
            let mut running = lock(&self.running);
            match running.iter().position(|p| p.record.name == name) {
                Some(i) => running.remove(i),
                None => {
                    drop(running);
                    return self.shorten(name, grace);
                }
            }
        };
        let pre_stop = PreStop::Sleep(pod.record.termination.pre_stop);
        let deletion = self.terminate(pod, pre_stop, grace);
        lock(&self.api_deletions).push(deletion);
        true
    }

    /// A shorter grace period for a terminating pod: the API records it,
    /// the kubelet kills sooner. A longer one changes nothing.
    fn shorten(&self, name: &str, grace: Duration) -> bool {
        let terminating = lock(&self.terminating);
        let Some(t) = terminating.get(name) else {
            return false;
        };
        if grace < *t.grace.borrow() {
            t.grace.send_replace(grace);
            lock(&self.control).pod_deletion_shortened(&t.record, grace);
        }
        true
    }

    fn terminate(&self, pod: Pod, pre_stop: PreStop, grace: Duration) -> Deletion {
        let Pod {
            mut record,
            net,
            process,
        } = pod;
        record.deletion_requested_unix_nano = Some(UnixNanos::now());
        let (grace_tx, grace_rx) = watch::channel(grace);
        lock(&self.terminating).insert(
            record.name.clone(),
            Terminating {
                record: record.clone(),
                grace: grace_tx,
            },
        );
        lock(&self.control).pod_terminating(&record, grace);
        let control = self.control.clone();
        let terminating = self.terminating.clone();
        let gone = record.clone();
        let hook = pre_stop.start(&record, &net.ns);
        let ended = tokio::spawn(async move {
            let termination = process.terminate_after(hook, grace_rx).await;
            lock(&terminating).remove(&gone.name);
            lock(&control).pod_removed(&gone);
            termination
        });
        Deletion { record, net, ended }
    }
}
