//! Correlation: joins the deletions seen in Kubernetes with what every
//! node's agent observed, and finishes each deletion into a
//! [`DeletionRecord`] once every expected node has reported (and the pod is
//! gone) or the completion timeout passed.
//!
//! By job: `state` holds agents and deletions in flight, `fold` folds
//! observations into a deletion's node accumulators, `checkpoint` persists
//! and restores them, `subscriptions` streams the endpoints to watch to the
//! agents, `record` finishes a deletion, `routers` names and times what
//! sent the pod connections, `new_pods` opens, feeds and closes the new
//! pods' startup windows (`crate::startup`), `drain` tells a pod's preStop
//! whether it may stop. This module is the
//! facade the gRPC service and the Kubernetes watcher call, each call with
//! the aggregator's time `now`.
//!
//! All state sits behind one mutex held only for in-memory work; store
//! writes and metric updates of finished deletions happen outside it.
//!
//! Persistence (so an aggregator restart loses nothing and counts nothing
//! twice): a deletion is stored when it starts; per-node accumulators and
//! each agent's last applied sequence change at report rate, so reports only
//! mark them dirty and [`Correlator::checkpoint`] writes the dirty ones
//! periodically in one transaction. Agents are acknowledged only up to the
//! last checkpoint, so what a crash loses since then is resent by them and
//! applied once against the restored state ([`Correlator::restore`]).

mod checkpoint;
mod drain;
mod fold;
mod new_pods;
mod record;
mod routers;
mod state;
mod subscriptions;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use observer_proto::api::DeletionRecord;
use observer_proto::{Report, UnixNanos};
use tokio::sync::broadcast;

pub use self::checkpoint::{CheckpointStats, RestoreStats};
pub use self::drain::{DrainView, MAX_MISSING_NAMED, PodRef, QuietRule};
pub use self::fold::{Implausible, Plausibility, UNATTRIBUTED};
pub use self::routers::{Evidence, MAX_TRAFFIC_ROUTERS, OTHER};
use self::state::{Agent, Pending, State, mark_agent, mark_pending};
pub use self::subscriptions::{Subscription, SubscriptionEnded, WatchChange};
use crate::config::Settings;
use crate::metrics::Metrics;
pub use crate::model::DeletionStart;
use crate::nodes::NodeInfo;
use crate::pods::PodSource;
use crate::store::{PendingRow, Store};

/// What an agent registered with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    pub agent_id: String,
    pub node_name: String,
    pub kernel_release: String,
    pub agent_version: String,
    pub capabilities: Vec<(String, bool, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportOutcome {
    /// The highest sequence of this agent covered by the last completed
    /// checkpoint (durable): the agent may forget batches up to it.
    pub acknowledged_sequence: u64,
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorrelateError {
    #[error("unknown agent {0:?}: register first")]
    UnknownAgent(String),
    #[error("agent {agent_id:?} of node {node:?} was replaced by a newer agent of its node")]
    Replaced { agent_id: String, node: String },
    #[error("{limit} agents registered (--max-agents): agent {agent_id:?} refused")]
    TooManyAgents { agent_id: String, limit: usize },
    #[error("node {node:?} of agent {agent_id:?} is not in the Node list: its reports are refused")]
    UnlistedNode { agent_id: String, node: String },
}

pub struct Correlator {
    settings: Arc<Settings>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    changes: broadcast::Sender<WatchChange>,
    /// The finished startup windows, for `GET /v1/startup`.
    startup_log: Arc<crate::startup::Log>,
    /// Serialises checkpoints with deletion starts and finishes, which also
    /// write the store: a checkpoint never sees a deletion that is out of
    /// memory but not yet recorded (it would acknowledge sequences whose
    /// effect is in neither), nor writes accumulators before the start row.
    /// Order: `persist`, then `state`, then the store's connection.
    persist: Mutex<()>,
}

impl Correlator {
    pub fn new(settings: Arc<Settings>, store: Arc<Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        let state = State {
            startup: crate::startup::Tracker::new(settings.startup.clone()),
            ..State::default()
        };
        let startup_log = Arc::new(crate::startup::Log::new(
            settings.startup.clone(),
            settings.retention,
        ));
        Arc::new(Self {
            settings,
            store,
            metrics,
            state: Mutex::new(state),
            changes: broadcast::channel(subscriptions::CHANGE_BUFFER).0,
            startup_log,
            persist: Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) -> MutexGuard<'_, ()> {
        self.persist.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets agents without a live subscription not seen since `before`,
    /// in memory and in the store; returns how many rows were deleted.
    pub fn prune_agents(&self, before: UnixNanos) -> Result<usize, crate::store::StoreError> {
        {
            let mut st = self.state();
            st.agents
                .retain(|_, a| a.subscriptions > 0 || a.dirty || a.seen >= before);
            let st = &mut *st;
            let agents = &st.agents;
            st.replaced
                .retain(|node, _| agents.values().any(|a| &a.node == node));
        }
        self.store.prune_agents(before)
    }

    /// Pod UIDs of the deletions being tracked.
    pub fn pending_uids(&self) -> Vec<String> {
        self.state().pending.keys().cloned().collect()
    }

    /// Registers (or re-registers) an agent at `now`; returns the highest
    /// report sequence of this agent id durably applied (covered by a
    /// checkpoint). A node has one agent: a new agent id for a node
    /// replaces the old one (a restarted agent, whose old connection may
    /// linger), whose subscription ends and which may not come back.
    pub fn register(&self, reg: Registration, now: UnixNanos) -> Result<u64, CorrelateError> {
        let mut st = self.state();
        if st.replaced.get(&reg.node_name) == Some(&reg.agent_id) {
            return Err(CorrelateError::Replaced {
                agent_id: reg.agent_id,
                node: reg.node_name,
            });
        }
        let known = st.agents.contains_key(&reg.agent_id);
        let older: Vec<String> = st
            .agents
            .iter()
            .filter(|(id, a)| a.node == reg.node_name && **id != reg.agent_id)
            .map(|(id, _)| id.clone())
            .collect();
        let limit = self.settings.limits.max_agents;
        if !known && older.is_empty() && st.agents.len() >= limit {
            return Err(CorrelateError::TooManyAgents {
                agent_id: reg.agent_id,
                limit,
            });
        }
        // Another process for a node that had one: the old one's memory of
        // what it saw since T0 is gone with it.
        if !older.is_empty() {
            tracing::warn!(
                node = %reg.node_name, agent = %reg.agent_id, replaced = ?older,
                "agent restarted: its node is unknown for the deletions in flight unless their removal is seen"
            );
            st.disrupt(&reg.node_name);
        }
        for id in older {
            // Dropping the agent ends its subscription.
            st.agents.remove(&id);
            st.replaced.insert(reg.node_name.clone(), id);
        }
        let agent = st
            .agents
            .entry(reg.agent_id.clone())
            .or_insert_with(|| Agent::new(reg.clone(), now));
        agent.node = reg.node_name.clone();
        agent.registration = reg;
        agent.seen = now;
        let acked = agent.durable_sequence;
        st.live_cache = None;
        self.metrics.agents_connected.set(st.connected_agents());
        Ok(acked)
    }

    /// From now on only nodes in the Node list ([`Correlator::set_node`])
    /// count as expected, report, and name metric labels.
    pub fn use_node_list(&self) {
        let mut st = self.state();
        st.node_list = true;
        st.live_cache = None;
    }

    /// Kernel, version and capabilities an agent registered with.
    pub fn registration(&self, agent_id: &str) -> Option<Registration> {
        self.state()
            .agents
            .get(agent_id)
            .map(|a| a.registration.clone())
    }

    /// The node `agent_id` registered for.
    pub fn agent_node(&self, agent_id: &str) -> Option<String> {
        self.state().agents.get(agent_id).map(|a| a.node.clone())
    }

    /// Whether `name` is in the Node list.
    pub fn knows_node(&self, name: &str) -> bool {
        self.state().nodes.contains(name)
    }

    pub fn set_node(&self, name: String, info: NodeInfo) {
        let mut st = self.state();
        st.nodes.set(name, info);
        st.live_cache = None;
    }

    pub fn remove_node(&self, name: &str) {
        let mut st = self.state();
        st.nodes.remove(name);
        st.live_cache = None;
    }

    /// Indexes a pod by its addresses, so connections from it are
    /// attributed to its workload or its node.
    pub fn set_pod(&self, ips: &[IpAddr], pod: PodSource) {
        self.state().pods.set(ips, pod);
    }

    /// The pod `uid` no longer has `ip`.
    pub fn remove_pod(&self, ip: IpAddr, uid: &str) {
        self.state().pods.remove(ip, uid);
    }

    /// Addresses indexed and their pods' UIDs (to find what a relist lost).
    pub fn indexed_pods(&self) -> Vec<(IpAddr, String)> {
        self.state()
            .pods
            .uids()
            .map(|(ip, uid)| (ip, uid.to_owned()))
            .collect()
    }

    /// Starts tracking a deletion. Idempotent: a deletion already tracked or
    /// already stored is ignored (relists deliver the same pod again).
    pub fn deletion_started(&self, d: DeletionStart, now: UnixNanos) {
        let Some(t0) = d.t0() else {
            tracing::warn!(pod = %d.pod_name, "deletion without any start time ignored");
            return;
        };
        if self.state().pending.contains_key(&d.pod_uid) {
            return;
        }
        match self.store.deletion(&d.pod_uid) {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed; tracking the deletion anyway")
            }
        }
        let _persist = self.persist();
        let Some(row) = self.start_tracking(d, t0, now) else {
            return;
        };
        if let Err(e) = self.store.insert_pending(&row) {
            tracing::error!(error = %e, pod = %row.start.pod_name, "storing a started deletion failed; the next checkpoint retries");
            let mut st = self.state();
            let st = &mut *st;
            if let Some(p) = st.pending.get_mut(&row.start.pod_uid) {
                p.stored = false;
                mark_pending(&mut st.dirty_pending, &row.start.pod_uid, p);
            }
        }
    }

    /// The in-memory part of [`Correlator::deletion_started`]: the row to
    /// store, or `None` when the deletion is already tracked.
    fn start_tracking(
        &self,
        d: DeletionStart,
        t0: UnixNanos,
        now: UnixNanos,
    ) -> Option<PendingRow> {
        let mut st = self.state();
        if st.pending.contains_key(&d.pod_uid) {
            return None;
        }
        let expected = st.live_nodes();
        tracing::info!(
            namespace = %d.namespace, pod = %d.pod_name, ip = %d.ip,
            expected_nodes = expected.len(), "deletion started"
        );
        st.by_ip.entry(d.ip).or_default().push(d.pod_uid.clone());
        // A rollout's next step: new pods of the workload whose nodes may
        // not all route to them yet.
        if let Some(pod) = st.pods.get(d.ip).filter(|p| p.uid == d.pod_uid) {
            let workload = pod.workload.clone();
            st.startup.old_pod_deleted(workload, t0);
        }
        let p = Pending::new(d, t0, now, expected);
        let row = checkpoint::pending_row(&p);
        let endpoint = p.endpoint();
        st.pending.insert(row.start.pod_uid.clone(), p);
        st.snapshot = None;
        st.replay_orphans(Some(endpoint.ip), now, self.plausibility().tolerance_ns);
        // No receivers is fine: no agent is connected.
        let _ = self.changes.send(WatchChange::Add(endpoint));
        Some(row)
    }

    /// An EndpointSlice showed the endpoint terminating / not ready.
    pub fn endpoint_terminating(&self, pod_uid: &str, at: UnixNanos) {
        let mut st = self.state();
        let st = &mut *st;
        if let Some(p) = st.pending.get_mut(pod_uid)
            && p.terminating.is_none()
        {
            p.terminating = Some(at);
            mark_pending(&mut st.dirty_pending, pod_uid, p);
        }
    }

    /// The pod object is gone: nothing can connect to it any more.
    pub fn pod_gone(&self, pod_uid: &str, now: UnixNanos) {
        let done = {
            let mut st = self.state();
            let live = st.live_nodes();
            let st = &mut *st;
            match st.pending.get_mut(pod_uid) {
                Some(p) => {
                    if p.pod_gone.is_none() {
                        p.pod_gone = Some(now);
                        mark_pending(&mut st.dirty_pending, pod_uid, p);
                    }
                    self.settings.shutdown_linger.is_zero() && p.all_reported(&live)
                }
                None => false,
            }
        };
        if done {
            self.finish(&[pod_uid.to_string()], now);
        }
    }

    /// Applies a report's observations. A sequence at or below the last one
    /// applied for this agent is ignored. Either way the reply acknowledges
    /// only what the last checkpoint made durable.
    pub fn report(&self, report: Report, now: UnixNanos) -> Result<ReportOutcome, CorrelateError> {
        let mut st = self.state();
        let st = &mut *st;
        let agent = st
            .agents
            .get_mut(&report.agent_id)
            .ok_or_else(|| CorrelateError::UnknownAgent(report.agent_id.clone()))?;
        // Checked before the sequence is taken: refused, nothing is kept.
        if st.node_list && !st.nodes.contains(&agent.node) {
            return Err(CorrelateError::UnlistedNode {
                agent_id: report.agent_id,
                node: agent.node.clone(),
            });
        }
        agent.seen = now;
        if report.sequence <= agent.last_sequence {
            return Ok(ReportOutcome {
                acknowledged_sequence: agent.durable_sequence,
                duplicate: true,
            });
        }
        agent.last_sequence = report.sequence;
        let acknowledged_sequence = agent.durable_sequence;
        mark_agent(&mut st.dirty_agents, &report.agent_id, agent);
        if let Some(c) = report.clock {
            agent.clock = Some(c);
        }
        let node = agent.node.clone();
        self.metrics
            .agent_counters(&node, agent.counters, report.counters);
        let lost = report.counters.events_lost > agent.counters.events_lost
            || report.counters.observations_dropped > agent.counters.observations_dropped;
        agent.counters = report.counters;
        let clock = agent.clock.unwrap_or_default();
        let lag = now.seconds_since(clock.to_aggregator(report.sent));
        self.metrics.report_lag.observe(lag.max(0.0));
        if lost {
            tracing::warn!(node = %node, "agent lost events or observations: its node is unknown for the deletions in flight unless their removal is seen");
            st.disrupt(&node);
        }
        let plausible = self.plausibility();
        for obs in report.observations {
            // Only a startup window watches the address: nothing to keep
            // for a deletion that may start later.
            if st.observe_startup(&node, &obs, clock, now, plausible)
                && !st.by_ip.contains_key(&obs.endpoint().ip())
            {
                continue;
            }
            let (kind, time) = (obs.kind_name(), obs.time());
            if let Err(why) = st.observe(&node, obs, clock, now, plausible) {
                self.metrics.rejected(why);
                tracing::warn!(
                    node = %node, agent = %report.agent_id, reason = why.as_str(), kind,
                    time = %time, offset_ns = clock.offset_ns,
                    "implausible observation refused"
                );
            }
        }
        Ok(ReportOutcome {
            acknowledged_sequence,
            duplicate: false,
        })
    }

    /// Finishes deletions whose nodes all reported and whose pod is gone, and
    /// those past the completion timeout. Call periodically.
    pub fn tick(&self, now: UnixNanos) {
        let (timeout, linger) = (
            self.settings.completion_timeout,
            self.settings.shutdown_linger,
        );
        let due: Vec<String> = {
            let mut st = self.state();
            st.replay_orphans(None, now, self.settings.clock_tolerance_ns());
            let live = st.live_nodes();
            st.pending
                .iter()
                .filter(|(_, p)| {
                    (p.pod_gone.is_some_and(|gone| gone + linger <= now) && p.all_reported(&live))
                        || p.tracked_since + timeout <= now
                })
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        if !due.is_empty() {
            self.finish(&due, now);
        }
        self.finish_startups(now);
    }

    fn plausibility(&self) -> Plausibility {
        Plausibility {
            tolerance_ns: self.settings.clock_tolerance_ns(),
            max_offset_ns: i64::try_from(self.settings.max_clock_offset.as_nanos())
                .unwrap_or(i64::MAX),
        }
    }

    /// What `pod`'s adaptive drain waits for at `now` (see `drain`);
    /// `None` when no deletion of it is in flight.
    pub fn drain_view(&self, pod: &PodRef, rule: &QuietRule, now: UnixNanos) -> Option<DrainView> {
        self.state().drain_view(pod, rule, now)
    }

    /// Deletions currently tracked.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    fn finish(&self, uids: &[String], now: UnixNanos) {
        // Held until the records are stored (see `Correlator::persist`).
        let _persist = self.persist();
        let mut finished = Vec::new();
        // The nodes live now: what the deletions expect when none were at
        // T0, and whose agents are still there to classify them.
        let live = {
            let mut st = self.state();
            let live = st.live_nodes();
            for uid in uids {
                let Some(mut p) = st.untrack(uid) else {
                    continue;
                };
                p.expected = p.expected_nodes(&live);
                let _ = self.changes.send(WatchChange::Remove(p.endpoint()));
                finished.push(p);
            }
            live
        };
        for p in finished {
            self.recorded(record::record(p, now, &live));
        }
    }

    /// Counts and stores a finished deletion.
    fn recorded(&self, rec: DeletionRecord) {
        self.metrics.deletion_finished(&rec);
        if let Err(e) = self.store.record_deletion(&rec) {
            tracing::error!(error = %e, pod = %rec.pod_name, "storing a finished deletion failed");
        }
        tracing::info!(
            namespace = %rec.namespace, pod = %rec.pod_name, complete = rec.complete,
            propagation_seconds = ?rec.propagation_seconds, missing = ?rec.missing_nodes,
            "deletion finished"
        );
    }
}
