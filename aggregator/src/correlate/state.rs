//! The correlator's in-memory state: agents, deletions in flight with their
//! per-node accumulators, the index from endpoint IP to deletions, and what
//! changed since the last checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use observer_proto::api::RouterRef;
use observer_proto::{AgentCounters, ClockEstimate, Endpoint, Observation, UnixNanos};

use super::Registration;
use super::fold::{Implausible, Plausibility};
use crate::model::{DeletionStart, NodeAccumulator, RouterAccumulator};
use crate::nodes::NodeIndex;
use crate::pods::PodIndex;

pub(super) struct Agent {
    pub node: String,
    pub registration: Registration,
    /// Highest sequence applied (dedupe).
    pub last_sequence: u64,
    /// Highest sequence covered by a completed checkpoint (acknowledged).
    pub durable_sequence: u64,
    /// Changed since the last checkpoint (listed in `State::dirty_agents`).
    pub dirty: bool,
    /// Last registration or report, aggregator clock.
    pub seen: UnixNanos,
    pub clock: Option<ClockEstimate>,
    pub counters: AgentCounters,
    pub subscriptions: usize,
    /// Generation of the agent's newest subscription: an older one ends
    /// when it changes, every one when the agent is dropped (replaced by a
    /// newer agent of its node), so an agent holds one live subscription.
    pub generation: tokio::sync::watch::Sender<u64>,
}

impl Agent {
    pub fn new(reg: Registration, now: UnixNanos) -> Self {
        Self {
            node: reg.node_name.clone(),
            registration: reg,
            last_sequence: 0,
            durable_sequence: 0,
            dirty: false,
            seen: now,
            clock: None,
            counters: AgentCounters::default(),
            subscriptions: 0,
            generation: tokio::sync::watch::Sender::new(0),
        }
    }
}

pub(super) struct Pending {
    pub start: DeletionStart,
    pub t0: UnixNanos,
    /// Aggregator time the tracking began (the timeout runs from here).
    pub tracked_since: UnixNanos,
    pub terminating: Option<UnixNanos>,
    /// Nodes with a live agent at T0 (shared between deletions: it changes
    /// only when agents come and go).
    pub expected: Arc<BTreeSet<String>>,
    pub nodes: BTreeMap<String, NodeAccumulator>,
    /// Every router that sent the pod new connections (see `routers`);
    /// checkpointed whole with the deletion when it changed.
    pub routers: HashMap<RouterRef, RouterAccumulator>,
    /// `routers` changed since the last checkpoint.
    pub routers_dirty: bool,
    /// When the pod object disappeared.
    pub pod_gone: Option<UnixNanos>,
    /// Changed since the last checkpoint (listed in `State::dirty_pending`).
    pub dirty: bool,
    /// Nodes whose accumulator changed since the last checkpoint, so a
    /// checkpoint does not scan every node.
    pub dirty_nodes: BTreeSet<String>,
    /// The start row is in the store (else the next checkpoint writes it).
    pub stored: bool,
    /// Nodes whose evidence has a gap since T0 (agent restarted, events or
    /// observations lost): unknown unless their removal was seen. Kept in
    /// memory only: an aggregator restart forgets it (agents resend).
    pub disrupted: BTreeSet<String>,
}

impl Pending {
    /// A deletion whose tracking starts `now`, stored as it starts.
    pub fn new(
        start: DeletionStart,
        t0: UnixNanos,
        now: UnixNanos,
        expected: Arc<BTreeSet<String>>,
    ) -> Self {
        Self {
            terminating: start.terminating_unix_nanos,
            start,
            t0,
            tracked_since: now,
            expected,
            nodes: BTreeMap::new(),
            routers: HashMap::new(),
            routers_dirty: false,
            pod_gone: None,
            dirty: false,
            dirty_nodes: BTreeSet::new(),
            stored: true,
            disrupted: BTreeSet::new(),
        }
    }

    /// What agents are told to watch.
    pub fn endpoint(&self) -> Endpoint {
        let d = &self.start;
        Endpoint {
            pod_uid: d.pod_uid.clone(),
            namespace: d.namespace.clone(),
            pod_name: d.pod_name.clone(),
            services: d.services.clone(),
            ip: d.ip,
            ports: d.ports.clone(),
            deletion_start: self.t0,
            grace_period_seconds: d.grace_period_seconds,
        }
    }

    /// Nodes that must report: those live at T0 or, when none were (the
    /// aggregator had just started and agents were still reconnecting),
    /// those live now.
    pub fn expected_nodes(&self, live: &Arc<BTreeSet<String>>) -> Arc<BTreeSet<String>> {
        if self.expected.is_empty() {
            Arc::clone(live)
        } else {
            Arc::clone(&self.expected)
        }
    }

    pub fn all_reported(&self, live: &Arc<BTreeSet<String>>) -> bool {
        let expected = self.expected_nodes(live);
        !expected.is_empty()
            && expected
                .iter()
                .all(|n| self.nodes.get(n).is_some_and(|a| a.rules_removed.is_some()))
    }
}

#[derive(Default)]
pub(super) struct State {
    pub agents: HashMap<String, Agent>,
    pub pending: HashMap<String, Pending>,
    pub by_ip: HashMap<IpAddr, Vec<String>>,
    pub nodes: NodeIndex,
    pub pods: PodIndex,
    /// The Node list decides which nodes count ([`State::listed`]); false
    /// without Kubernetes, where every registered node counts.
    pub node_list: bool,
    /// Per node, the agent id a newer agent of the node replaced: it may
    /// not register again (it would take the node back from the new one).
    pub replaced: HashMap<String, String>,
    /// [`State::live_nodes`], until an agent subscribes or leaves or the
    /// Node list changes.
    pub live_cache: Option<Arc<BTreeSet<String>>>,
    /// The endpoints of the deletions in flight, shared by every new
    /// subscription's snapshot until a deletion starts or finishes.
    pub snapshot: Option<Arc<[Endpoint]>>,
    pub orphans: VecDeque<Orphan>,
    /// Pending deletions and agents changed since the last checkpoint.
    pub dirty_pending: Vec<String>,
    pub dirty_agents: Vec<String>,
    /// New pods' startup windows (see `crate::startup`).
    pub startup: crate::startup::Tracker,
}

/// Observations for endpoints no known deletion uses yet, kept at most
/// [`ORPHAN_TTL`] and [`MAX_ORPHANS`].
pub(super) struct Orphan {
    pub node: String,
    pub obs: Observation,
    pub clock: ClockEstimate,
    pub received: UnixNanos,
}

const MAX_ORPHANS: usize = 100_000;
const ORPHAN_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl State {
    /// Folds `node`'s observation into the deletions of its endpoint, or
    /// keeps it when no deletion of that endpoint is known yet (the
    /// aggregator has just restarted and not relisted the pod) for a while.
    pub fn observe(
        &mut self,
        node: &str,
        obs: Observation,
        clock: ClockEstimate,
        now: UnixNanos,
        plausible: Plausibility,
    ) -> Result<(), Implausible> {
        plausible.check(clock.to_aggregator(obs.time()), clock, now)?;
        if self.by_ip.contains_key(&obs.endpoint().ip()) {
            return match self.fold(node, &obs, clock, plausible.tolerance_ns) {
                Some(why) => Err(why),
                None => Ok(()),
            };
        }
        if self.orphans.len() >= MAX_ORPHANS {
            self.orphans.pop_front();
        }
        self.orphans.push_back(Orphan {
            node: node.to_owned(),
            obs,
            clock,
            received: now,
        });
        Ok(())
    }

    /// Marks `node`'s evidence as having a gap for every deletion in flight.
    pub fn disrupt(&mut self, node: &str) {
        for p in self.pending.values_mut() {
            p.disrupted.insert(node.to_owned());
        }
    }

    /// Applies the kept observations of `ip` (a deletion of it just started)
    /// and forgets those past their time.
    pub fn replay_orphans(&mut self, ip: Option<IpAddr>, now: UnixNanos, tolerance_ns: i64) {
        let orphans = std::mem::take(&mut self.orphans);
        for o in orphans {
            if o.received + ORPHAN_TTL < now {
                continue;
            }
            if Some(o.obs.endpoint().ip()) == ip {
                self.fold(&o.node, &o.obs, o.clock, tolerance_ns);
            } else {
                self.orphans.push_back(o);
            }
        }
    }

    /// Whether `node` may count as expected, report and name a metric
    /// label: it is in the Node list, or there is no Node list.
    pub fn listed(&self, node: &str) -> bool {
        !self.node_list || self.nodes.contains(node)
    }

    /// Listed nodes with at least one live endpoint subscription.
    pub fn live_nodes(&mut self) -> Arc<BTreeSet<String>> {
        if let Some(live) = &self.live_cache {
            return Arc::clone(live);
        }
        let live: Arc<BTreeSet<String>> = Arc::new(
            self.agents
                .values()
                .filter(|a| a.subscriptions > 0 && self.listed(&a.node))
                .map(|a| a.node.clone())
                .collect(),
        );
        self.live_cache = Some(Arc::clone(&live));
        live
    }

    /// The endpoints of the deletions in flight, built once per change.
    pub fn snapshot(&mut self) -> Arc<[Endpoint]> {
        let pending = &self.pending;
        Arc::clone(
            self.snapshot
                .get_or_insert_with(|| pending.values().map(Pending::endpoint).collect()),
        )
    }

    pub fn connected_agents(&self) -> i64 {
        self.agents.values().filter(|a| a.subscriptions > 0).count() as i64
    }

    /// Stops tracking a deletion; `None` when it was not tracked.
    pub fn untrack(&mut self, uid: &str) -> Option<Pending> {
        let p = self.pending.remove(uid)?;
        self.snapshot = None;
        if let Some(v) = self.by_ip.get_mut(&p.start.ip) {
            v.retain(|u| u != uid);
            if v.is_empty() {
                self.by_ip.remove(&p.start.ip);
            }
        }
        Some(p)
    }
}

pub(super) fn mark_pending(list: &mut Vec<String>, uid: &str, p: &mut Pending) {
    if !p.dirty {
        p.dirty = true;
        list.push(uid.to_owned());
    }
}

pub(super) fn mark_agent(list: &mut Vec<String>, id: &str, a: &mut Agent) {
    if !a.dirty {
        a.dirty = true;
        list.push(id.to_owned());
    }
}
