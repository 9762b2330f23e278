//! Correlation: joins the deletions seen in Kubernetes with what every
//! node's agent observed, and finishes each deletion into a
//! [`DeletionRecord`] once every expected node has reported (and the pod is
//! gone) or the completion timeout passed.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use observer_proto::Endpoint;
use tokio::sync::broadcast;

use crate::config::Settings;
use crate::metrics::{
    Metrics, NamespaceLabel, NamespaceOutcome, NodeLabel, NodeNamespace, NodeNamespaceMode,
};
pub use crate::model::DeletionStart;
use crate::model::{DeletionRecord, NodeMeasurement, UnixNanos};
use crate::nodes::{NodeIndex, NodeInfo};
use crate::store::{
    AgentRow, Checkpoint, NodeAccRow, PendingNodes, PendingRow, PendingUpdate, Store, StoreError,
};

const NANOS: f64 = 1e9;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchChange {
    Add(Endpoint),
    Remove(Endpoint),
    /// The snapshot of a new subscription is complete.
    Synced,
}

/// Dataplane mode that produced a rules change (a metric label value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    IptablesNft,
    IptablesLegacy,
    Unknown,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::IptablesNft => "iptables_nft",
            Self::IptablesLegacy => "iptables_legacy",
            Self::Unknown => "unknown",
        }
    }

    /// The inverse of [`Mode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Nftables,
            Self::IptablesNft,
            Self::IptablesLegacy,
            Self::Unknown,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// A validated observation: `endpoint` is the watched IP, `peer` the other
/// side where it matters, times already on the agent's wall clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Obs {
    pub kind: ObsKind,
    pub endpoint: IpAddr,
    pub peer: Option<IpAddr>,
    pub time_unix_nanos: UnixNanos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObsKind {
    /// Destination side: the endpoint accepted a connection from `peer`.
    Accepted,
    /// Source side: a socket on the reporting node connected to the endpoint.
    Connected,
    /// Destination side: an established connection ended; `reset` when the
    /// endpoint aborted it.
    Closed {
        reset: bool,
    },
    /// Destination side: the endpoint sent a RST.
    ResetSent {
        cause: ResetCause,
    },
    ResetReceived,
    RulesRemoved(Mode),
    RulesAdded,
    /// Source side: the reporting node routed a new flow to the endpoint.
    NewFlow,
}

/// Why the endpoint sent a RST, from the kernel's reset reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    /// No socket listened any more: a refused connection.
    Refused,
    /// Data arrived on a connection the endpoint had already closed: the
    /// keep-alive race (the client reused an idle connection the server
    /// closed at shutdown).
    DataAfterClose,
    Other,
}

impl ResetCause {
    /// From the kernel's `sk_rst_reason` name as the agent reports it.
    pub fn from_reason(reason: &str) -> Self {
        match reason.to_ascii_lowercase().as_str() {
            "no_socket" => ResetCause::Refused,
            "tcp_abort_on_data" => ResetCause::DataAfterClose,
            _ => ResetCause::Other,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    pub events_lost: u64,
    pub observations_dropped: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockEstimate {
    pub offset_ns: i64,
    pub uncertainty_ns: u64,
}

#[derive(Clone, Debug)]
pub struct Batch {
    pub agent_id: String,
    pub sequence: u64,
    pub observations: Vec<Obs>,
    pub counters: AgentCounters,
    pub clock: Option<ClockEstimate>,
    pub sent_unix_nanos: UnixNanos,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub agent_id: String,
    pub node_name: String,
    pub kernel_release: String,
    pub capabilities: Vec<(String, bool, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportOutcome {
    /// The highest sequence of this agent covered by the last completed
    /// checkpoint (durable): the agent may forget batches up to it.
    pub acknowledged_sequence: u64,
    pub duplicate: bool,
}

/// What one checkpoint wrote, and how long it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    pub deletions: usize,
    pub node_accumulators: usize,
    pub agents: usize,
    /// Taking the snapshot (the state lock's hold).
    pub snapshot: std::time::Duration,
    /// Writing it (one transaction).
    pub write: std::time::Duration,
}

/// What [`Correlator::restore`] brought back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub deletions: usize,
    pub node_accumulators: usize,
    pub agents: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorrelateError {
    #[error("unknown agent {0:?}: register first")]
    UnknownAgent(String),
}

struct Agent {
    node: String,
    registration: Registration,
    /// Highest sequence applied (dedupe).
    last_sequence: u64,
    /// Highest sequence covered by a completed checkpoint (acknowledged).
    durable_sequence: u64,
    /// Changed since the last checkpoint (listed in `State::dirty_agents`).
    dirty: bool,
    /// Last registration or report, aggregator clock.
    seen: UnixNanos,
    clock: Option<ClockEstimate>,
    counters: AgentCounters,
    subscriptions: usize,
}

impl Agent {
    fn new(reg: Registration, now: UnixNanos) -> Self {
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
        }
    }
}

#[derive(Default)]
struct NodeAcc {
    /// Changed since the last checkpoint (listed in `Pending::dirty_nodes`).
    dirty: bool,
    rules_removed: Option<(UnixNanos, Mode)>,
    last_connection: Option<UnixNanos>,
    /// New flows after T0 seen by this node's own conntrack.
    late_flows: u64,
    /// Connections after T0 accepted by the pod and attributed to this node
    /// by their source address (the destination node's view).
    late_accepted: u64,
    refused: u64,
    aborted: u64,
    clock_uncertainty_ns: Option<u64>,
}

struct Pending {
    start: DeletionStart,
    t0: UnixNanos,
    /// Aggregator time the tracking began (the timeout runs from here).
    tracked_since: UnixNanos,
    terminating: Option<UnixNanos>,
    /// Nodes with a live agent at T0 (shared between deletions: it changes
    /// only when agents come and go).
    expected: Arc<BTreeSet<String>>,
    nodes: BTreeMap<String, NodeAcc>,
    /// When the pod object disappeared.
    pod_gone: Option<UnixNanos>,
    /// Changed since the last checkpoint (listed in `State::dirty_pending`).
    dirty: bool,
    /// Nodes whose accumulator changed since the last checkpoint (each once:
    /// see `NodeAcc::dirty`), so a checkpoint does not scan every node.
    dirty_nodes: Vec<String>,
    /// The start row is in the store (else the next checkpoint writes it).
    stored: bool,
}

impl Pending {
    /// What agents are told to watch.
    fn endpoint(&self) -> Endpoint {
        let d = &self.start;
        Endpoint {
            pod_uid: d.pod_uid.clone(),
            namespace: d.namespace.clone(),
            pod_name: d.pod_name.clone(),
            services: d.services.clone(),
            ip: d.ip,
            ports: d.ports.clone(),
            // Wall-clock times since 1970: never negative.
            deletion_start_unix_nanos: self.t0.max(0) as u64,
            grace_period_seconds: d.grace_period_seconds,
        }
    }

    /// Nodes that must report: those live at T0 or, when none were (the
    /// aggregator had just started and agents were still reconnecting),
    /// those live now.
    fn expected_nodes(&self, live: &Arc<BTreeSet<String>>) -> Arc<BTreeSet<String>> {
        if self.expected.is_empty() {
            Arc::clone(live)
        } else {
            Arc::clone(&self.expected)
        }
    }

    fn all_reported(&self, live: &Arc<BTreeSet<String>>) -> bool {
        let expected = self.expected_nodes(live);
        !expected.is_empty()
            && expected
                .iter()
                .all(|n| self.nodes.get(n).is_some_and(|a| a.rules_removed.is_some()))
    }
}

#[derive(Default)]
struct State {
    agents: HashMap<String, Agent>,
    pending: HashMap<String, Pending>,
    by_ip: HashMap<IpAddr, Vec<String>>,
    nodes: NodeIndex,
    /// [`State::live_nodes`], until an agent subscribes or leaves.
    live_cache: Option<Arc<BTreeSet<String>>>,
    orphans: std::collections::VecDeque<Orphan>,
    /// Pending deletions and agents changed since the last checkpoint.
    dirty_pending: Vec<String>,
    dirty_agents: Vec<String>,
}

/// Observations for endpoints no known deletion uses yet, kept at most
/// [`ORPHAN_TTL`] and [`MAX_ORPHANS`].
struct Orphan {
    node: String,
    obs: Obs,
    clock: ClockEstimate,
    received: UnixNanos,
}

const MAX_ORPHANS: usize = 100_000;
const ORPHAN_TTL: UnixNanos = 60 * 1_000_000_000;

impl State {
    /// Folds one observation of `node` into the deletions of its endpoint.
    fn fold(&mut self, node: &str, obs: &Obs, clock: ClockEstimate) {
        let Some(uids) = self.by_ip.get(&obs.endpoint) else {
            return;
        };
        let t = obs.time_unix_nanos + clock.offset_ns;
        // Destination-side events are attributed to the peer's node; a
        // new flow's source tells whether this node routed it or only
        // forwarded it.
        let peer_node = match obs.kind {
            ObsKind::Accepted
            | ObsKind::ResetSent { .. }
            | ObsKind::Closed { .. }
            | ObsKind::NewFlow => obs.peer.and_then(|ip| self.nodes.node_of(ip)),
            _ => None,
        };
        let peer_host = obs.peer.and_then(|ip| self.nodes.node_with_address(ip));
        let connection = matches!(
            obs.kind,
            ObsKind::Accepted | ObsKind::Connected | ObsKind::NewFlow
        );
        for uid in uids {
            let Some(p) = self.pending.get_mut(uid) else {
                continue;
            };
            // Connections from the pod's own node address are the
            // kubelet's probes, not traffic the dataplane routed: they
            // go on until the pod exits and would stretch T_last.
            if connection && peer_host.is_some() && peer_host == p.start.host_node.as_deref() {
                continue;
            }
            if apply(p, node, peer_node, obs.kind, t, clock.uncertainty_ns) {
                mark_pending(&mut self.dirty_pending, uid, p);
            }
        }
    }

    /// Applies the kept observations of `ip` (a deletion of it just started)
    /// and forgets those past their time.
    fn replay_orphans(&mut self, ip: Option<IpAddr>, now: UnixNanos) {
        let orphans = std::mem::take(&mut self.orphans);
        for o in orphans {
            if now - o.received > ORPHAN_TTL {
                continue;
            }
            if Some(o.obs.endpoint) == ip {
                self.fold(&o.node, &o.obs, o.clock);
            } else {
                self.orphans.push_back(o);
            }
        }
    }

    /// Nodes with at least one live endpoint subscription.
    fn live_nodes(&mut self) -> Arc<BTreeSet<String>> {
        let agents = &self.agents;
        Arc::clone(self.live_cache.get_or_insert_with(|| {
            Arc::new(
                agents
                    .values()
                    .filter(|a| a.subscriptions > 0)
                    .map(|a| a.node.clone())
                    .collect(),
            )
        }))
    }

    fn connected_agents(&self) -> i64 {
        self.agents.values().filter(|a| a.subscriptions > 0).count() as i64
    }

    /// Takes the changes since the last checkpoint, clearing their marks.
    fn take_checkpoint(&mut self, now: UnixNanos) -> Checkpoint {
        let mut c = Checkpoint::default();
        for uid in std::mem::take(&mut self.dirty_pending) {
            let Some(p) = self.pending.get_mut(&uid) else {
                continue;
            };
            p.dirty = false;
            if !p.stored {
                c.started.push(pending_row(p));
            }
            c.updated.push(PendingUpdate {
                pod_uid: uid.clone(),
                terminating_unix_nanos: p.terminating,
                pod_gone_unix_nanos: p.pod_gone,
            });
            let nodes: Vec<NodeAccRow> = std::mem::take(&mut p.dirty_nodes)
                .into_iter()
                .filter_map(|node| {
                    let a = p.nodes.get_mut(&node)?;
                    a.dirty = false;
                    Some(acc_row(node, a))
                })
                .collect();
            if !nodes.is_empty() {
                c.nodes.push(PendingNodes {
                    pod_uid: uid,
                    nodes,
                });
            }
        }
        for id in std::mem::take(&mut self.dirty_agents) {
            let Some(a) = self.agents.get_mut(&id) else {
                continue;
            };
            a.dirty = false;
            c.agents.push(AgentRow {
                agent_id: id,
                node: a.node.clone(),
                last_sequence: a.last_sequence,
                clock: a.clock.map(|c| (c.offset_ns, c.uncertainty_ns)),
                seen_unix_nanos: now,
            });
        }
        c
    }

    /// A checkpoint failed: mark what it held dirty again.
    fn untake_checkpoint(&mut self, c: &Checkpoint) {
        for u in &c.updated {
            let Some(p) = self.pending.get_mut(&u.pod_uid) else {
                continue;
            };
            mark_pending(&mut self.dirty_pending, &u.pod_uid, p);
        }
        for n in &c.nodes {
            let Some(p) = self.pending.get_mut(&n.pod_uid) else {
                continue;
            };
            for row in &n.nodes {
                if let Some(a) = p.nodes.get_mut(&row.node)
                    && !a.dirty
                {
                    a.dirty = true;
                    p.dirty_nodes.push(row.node.clone());
                }
            }
        }
        for r in &c.agents {
            if let Some(a) = self.agents.get_mut(&r.agent_id) {
                mark_agent(&mut self.dirty_agents, &r.agent_id, a);
            }
        }
    }
}

fn mark_pending(list: &mut Vec<String>, uid: &str, p: &mut Pending) {
    if !p.dirty {
        p.dirty = true;
        list.push(uid.to_owned());
    }
}

fn mark_agent(list: &mut Vec<String>, id: &str, a: &mut Agent) {
    if !a.dirty {
        a.dirty = true;
        list.push(id.to_owned());
    }
}

fn pending_row(p: &Pending) -> PendingRow {
    PendingRow {
        start: DeletionStart {
            terminating_unix_nanos: p.terminating,
            ..p.start.clone()
        },
        t0_unix_nanos: p.t0,
        tracked_since_unix_nanos: p.tracked_since,
        expected_nodes: p.expected.iter().cloned().collect(),
        pod_gone_unix_nanos: p.pod_gone,
    }
}

fn acc_row(node: String, a: &NodeAcc) -> NodeAccRow {
    NodeAccRow {
        node,
        rules_removed: a.rules_removed.map(|(t, m)| (t, m.as_str().to_owned())),
        last_connection_unix_nanos: a.last_connection,
        late_flows: a.late_flows,
        late_accepted: a.late_accepted,
        refused: a.refused,
        aborted: a.aborted,
        clock_uncertainty_ns: a.clock_uncertainty_ns,
    }
}

/// A persisted deletion back in memory (not dirty: it is what is stored).
fn restored_pending(
    row: PendingRow,
    accs: Vec<NodeAccRow>,
) -> Result<(Pending, usize), StoreError> {
    let mut nodes = BTreeMap::new();
    for a in accs {
        let rules_removed = match a.rules_removed {
            None => None,
            Some((t, mode)) => Some((
                t,
                Mode::parse(&mode).ok_or_else(|| StoreError::Corrupt {
                    table: "pending_nodes",
                    key: format!("pod_uid {:?}, node {:?}", row.start.pod_uid, a.node),
                    reason: format!("unknown rules_mode {mode:?}"),
                })?,
            )),
        };
        nodes.insert(
            a.node,
            NodeAcc {
                dirty: false,
                rules_removed,
                last_connection: a.last_connection_unix_nanos,
                late_flows: a.late_flows,
                late_accepted: a.late_accepted,
                refused: a.refused,
                aborted: a.aborted,
                clock_uncertainty_ns: a.clock_uncertainty_ns,
            },
        );
    }
    let start = row.start;
    let terminating = start.terminating_unix_nanos;
    let n = nodes.len();
    Ok((
        Pending {
            start,
            t0: row.t0_unix_nanos,
            tracked_since: row.tracked_since_unix_nanos,
            terminating,
            expected: Arc::new(row.expected_nodes.into_iter().collect()),
            nodes,
            pod_gone: row.pod_gone_unix_nanos,
            dirty: false,
            dirty_nodes: Vec::new(),
            stored: true,
        },
        n,
    ))
}

/// A live endpoint subscription: the current set, then changes. Dropping it
/// marks the agent's subscription closed.
pub struct Subscription {
    snapshot: Vec<Endpoint>,
    changes: broadcast::Receiver<WatchChange>,
    guard: SubscriptionGuard,
}

/// The subscriber fell more than the broadcast buffer behind; it must
/// subscribe again to get a fresh snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("endpoint subscriber fell {0} changes behind")]
pub struct Lagged(pub u64);

impl Subscription {
    /// Adds for the snapshot, `Synced`, then every change; ends with [`Lagged`] if the
    /// subscriber falls too far behind. Holds the subscription open while
    /// the stream lives.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<WatchChange, Lagged>> + Send {
        use futures::StreamExt;
        use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
        let guard = self.guard;
        let snapshot = futures::stream::iter(
            self.snapshot
                .into_iter()
                .map(|e| Ok(WatchChange::Add(e)))
                .chain(std::iter::once(Ok(WatchChange::Synced))),
        );
        let changes = BroadcastStream::new(self.changes).map(move |r| {
            let _hold = &guard;
            r.map_err(|BroadcastStreamRecvError::Lagged(n)| Lagged(n))
        });
        // Stop after the first error: the receiver skipped changes.
        let mut failed = false;
        snapshot.chain(changes).take_while(move |r| {
            let pass = !failed;
            failed |= r.is_err();
            futures::future::ready(pass)
        })
    }
}

struct SubscriptionGuard {
    correlator: Arc<Correlator>,
    agent_id: String,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let mut st = self.correlator.state();
        if let Some(a) = st.agents.get_mut(&self.agent_id) {
            a.subscriptions = a.subscriptions.saturating_sub(1);
        }
        st.live_cache = None;
        self.correlator
            .metrics
            .agents_connected
            .set(st.connected_agents());
    }
}

pub struct Correlator {
    settings: Arc<Settings>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    changes: broadcast::Sender<WatchChange>,
    /// Serialises checkpoints with deletion starts and finishes, which also
    /// write the store: a checkpoint never sees a deletion that is out of
    /// memory but not yet recorded (it would acknowledge sequences whose
    /// effect is in neither), nor writes accumulators before the start row.
    /// Order: `persist`, then `state`, then the store's connection.
    persist: Mutex<()>,
}

/// Broadcast buffer per subscriber; a subscriber that falls further behind
/// is disconnected and resubscribes (getting a fresh snapshot).
const CHANGE_BUFFER: usize = 4096;

impl Correlator {
    pub fn new(settings: Arc<Settings>, store: Arc<Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            store,
            metrics,
            state: Mutex::new(State::default()),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            persist: Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) -> MutexGuard<'_, ()> {
        self.persist.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the in-flight state of the last run (pending deletions with
    /// their node accumulators, agents' sequences) from the store. Call once,
    /// before serving agents and before the Kubernetes watchers start.
    pub fn restore(&self) -> Result<RestoreStats, StoreError> {
        let _persist = self.persist();
        let saved = self.store.in_flight()?;
        let mut stats = RestoreStats::default();
        let mut pending = Vec::with_capacity(saved.pending.len());
        for (row, accs) in saved.pending {
            let (p, n) = restored_pending(row, accs)?;
            stats.node_accumulators += n;
            pending.push(p);
        }
        let mut st = self.state();
        for p in pending {
            let uid = p.start.pod_uid.clone();
            if st.pending.contains_key(&uid) {
                continue;
            }
            st.by_ip.entry(p.start.ip).or_default().push(uid.clone());
            st.pending.insert(uid, p);
            stats.deletions += 1;
        }
        for a in saved.agents {
            let reg = Registration {
                agent_id: a.agent_id.clone(),
                node_name: a.node,
                kernel_release: String::new(),
                capabilities: Vec::new(),
            };
            let agent = st
                .agents
                .entry(a.agent_id)
                .or_insert_with(|| Agent::new(reg, a.seen_unix_nanos));
            agent.last_sequence = agent.last_sequence.max(a.last_sequence);
            agent.durable_sequence = agent.durable_sequence.max(a.last_sequence);
            if agent.clock.is_none() {
                agent.clock = a.clock.map(|(offset_ns, uncertainty_ns)| ClockEstimate {
                    offset_ns,
                    uncertainty_ns,
                });
            }
            stats.agents += 1;
        }
        st.live_cache = None;
        Ok(stats)
    }

    /// Writes what changed since the last checkpoint (dirty node
    /// accumulators, deletion updates, agents' last sequences) in one store
    /// transaction, then acknowledges the agents' sequences it covered.
    /// Blocking: run it on a blocking thread. On failure the changes stay
    /// marked for the next one.
    pub fn checkpoint(&self, now: UnixNanos) -> Result<CheckpointStats, StoreError> {
        let _persist = self.persist();
        let started = std::time::Instant::now();
        let c = self.state().take_checkpoint(now);
        let snapshot = started.elapsed();
        if c.is_empty() {
            return Ok(CheckpointStats {
                snapshot,
                ..CheckpointStats::default()
            });
        }
        let started = std::time::Instant::now();
        if let Err(e) = self.store.checkpoint(&c) {
            self.state().untake_checkpoint(&c);
            return Err(e);
        }
        let write = started.elapsed();
        let mut st = self.state();
        for r in &c.agents {
            if let Some(a) = st.agents.get_mut(&r.agent_id) {
                a.durable_sequence = a.durable_sequence.max(r.last_sequence);
            }
        }
        for r in &c.started {
            if let Some(p) = st.pending.get_mut(&r.start.pod_uid) {
                p.stored = true;
            }
        }
        Ok(CheckpointStats {
            deletions: c.updated.len(),
            node_accumulators: c.nodes.iter().map(|n| n.nodes.len()).sum(),
            agents: c.agents.len(),
            snapshot,
            write,
        })
    }

    /// Forgets agents without a live subscription not seen since `before`,
    /// in memory and in the store; returns how many rows were deleted.
    pub fn prune_agents(&self, before: UnixNanos) -> Result<usize, StoreError> {
        {
            let mut st = self.state();
            st.agents
                .retain(|_, a| a.subscriptions > 0 || a.dirty || a.seen >= before);
        }
        self.store.prune_agents(before)
    }

    /// Pod UIDs of the deletions being tracked.
    pub fn pending_uids(&self) -> Vec<String> {
        self.state().pending.keys().cloned().collect()
    }

    /// Registers (or re-registers) an agent; returns the highest report
    /// sequence of this agent id durably applied (covered by a checkpoint).
    pub fn register(&self, reg: Registration) -> u64 {
        let now = crate::http::now_unix_nanos();
        let mut st = self.state();
        let agent = st
            .agents
            .entry(reg.agent_id.clone())
            .or_insert_with(|| Agent::new(reg.clone(), now));
        agent.node = reg.node_name.clone();
        agent.registration = reg;
        agent.seen = now;
        let acked = agent.durable_sequence;
        st.live_cache = None;
        acked
    }

    /// Kernel and capabilities an agent registered with.
    pub fn registration(&self, agent_id: &str) -> Option<Registration> {
        self.state()
            .agents
            .get(agent_id)
            .map(|a| a.registration.clone())
    }

    pub fn subscribe(self: &Arc<Self>, agent_id: &str) -> Result<Subscription, CorrelateError> {
        let mut st = self.state();
        let agent = st
            .agents
            .get_mut(agent_id)
            .ok_or_else(|| CorrelateError::UnknownAgent(agent_id.into()))?;
        agent.subscriptions += 1;
        st.live_cache = None;
        // Snapshot and receiver under the same lock: no change falls between.
        let changes = self.changes.subscribe();
        let snapshot = st.pending.values().map(Pending::endpoint).collect();
        self.metrics.agents_connected.set(st.connected_agents());
        Ok(Subscription {
            snapshot,
            changes,
            guard: SubscriptionGuard {
                correlator: Arc::clone(self),
                agent_id: agent_id.into(),
            },
        })
    }

    pub fn set_node(&self, name: String, info: NodeInfo) {
        self.state().nodes.set(name, info);
    }

    pub fn remove_node(&self, name: &str) {
        self.state().nodes.remove(name);
    }

    /// Starts tracking a deletion. Idempotent: a deletion already tracked or
    /// already stored is ignored (relists deliver the same pod again).
    pub fn deletion_started(&self, d: DeletionStart, now: UnixNanos) {
        let Some(t0) = d.t0() else {
            tracing::warn!(pod = %d.pod_name, "deletion without any start time ignored");
            return;
        };
        {
            let st = self.state();
            if st.pending.contains_key(&d.pod_uid) {
                return;
            }
        }
        match self.store.deletion(&d.pod_uid) {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed; tracking the deletion anyway")
            }
        }
        let _persist = self.persist();
        let row = self.start_tracking(d, t0, now);
        let Some(row) = row else { return };
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
        let p = Pending {
            terminating: d.terminating_unix_nanos,
            start: d,
            t0,
            tracked_since: now,
            expected,
            nodes: BTreeMap::new(),
            pod_gone: None,
            dirty: false,
            dirty_nodes: Vec::new(),
            stored: true,
        };
        let row = pending_row(&p);
        let endpoint = p.endpoint();
        st.pending.insert(row.start.pod_uid.clone(), p);
        st.replay_orphans(Some(endpoint.ip), now);
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

    /// Applies a batch of observations. A sequence at or below the last one
    /// applied for this agent is ignored. Either way the reply acknowledges
    /// only what the last checkpoint made durable.
    pub fn report(&self, batch: Batch, now: UnixNanos) -> Result<ReportOutcome, CorrelateError> {
        let mut st = self.state();
        let st = &mut *st;
        let agent = st
            .agents
            .get_mut(&batch.agent_id)
            .ok_or_else(|| CorrelateError::UnknownAgent(batch.agent_id.clone()))?;
        agent.seen = now;
        if batch.sequence <= agent.last_sequence {
            return Ok(ReportOutcome {
                acknowledged_sequence: agent.durable_sequence,
                duplicate: true,
            });
        }
        agent.last_sequence = batch.sequence;
        let acknowledged_sequence = agent.durable_sequence;
        mark_agent(&mut st.dirty_agents, &batch.agent_id, agent);
        if let Some(c) = batch.clock {
            agent.clock = Some(c);
        }
        let node = agent.node.clone();
        let lost = batch
            .counters
            .events_lost
            .saturating_sub(agent.counters.events_lost);
        if lost > 0 {
            self.metrics
                .agent_events_lost
                .get_or_create(&NodeLabel { node: node.clone() })
                .inc_by(lost);
        }
        agent.counters = batch.counters;
        let clock = agent.clock.unwrap_or_default();
        let lag = (now - (batch.sent_unix_nanos + clock.offset_ns)) as f64 / NANOS;
        self.metrics.report_lag.observe(lag.max(0.0));

        for obs in batch.observations {
            if st.by_ip.contains_key(&obs.endpoint) {
                st.fold(&node, &obs, clock);
            } else {
                // The deletion may not be known yet (the aggregator has just
                // restarted and not relisted the pod): keep the evidence
                // until it is, for a while.
                if st.orphans.len() >= MAX_ORPHANS {
                    st.orphans.pop_front();
                }
                st.orphans.push_back(Orphan {
                    node: node.clone(),
                    obs,
                    clock,
                    received: now,
                });
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
        let timeout = self.settings.completion_timeout.as_nanos() as i64;
        let linger = self.settings.shutdown_linger.as_nanos() as i64;
        let due: Vec<String> = {
            let mut st = self.state();
            st.replay_orphans(None, now);
            let live = st.live_nodes();
            st.pending
                .iter()
                .filter(|(_, p)| {
                    (p.pod_gone.is_some_and(|gone| now - gone >= linger) && p.all_reported(&live))
                        || now - p.tracked_since >= timeout
                })
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        if !due.is_empty() {
            self.finish(&due, now);
        }
    }

    /// Deletions currently tracked.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    fn finish(&self, uids: &[String], now: UnixNanos) {
        // Held until the records are stored (see `Correlator::persist`).
        let _persist = self.persist();
        let mut finished = Vec::new();
        {
            let mut st = self.state();
            let live = st.live_nodes();
            for uid in uids {
                let Some(mut p) = st.pending.remove(uid) else {
                    continue;
                };
                p.expected = p.expected_nodes(&live);
                if let Some(v) = st.by_ip.get_mut(&p.start.ip) {
                    v.retain(|u| u != uid);
                    if v.is_empty() {
                        st.by_ip.remove(&p.start.ip);
                    }
                }
                let _ = self.changes.send(WatchChange::Remove(p.endpoint()));
                finished.push(p);
            }
        }
        for p in finished {
            let rec = record(p, now);
            self.observe(&rec);
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

    fn observe(&self, rec: &DeletionRecord) {
        let m = &self.metrics;
        let ns = &rec.namespace;
        for n in &rec.nodes {
            let nn = NodeNamespace {
                node: n.node.clone(),
                namespace: ns.clone(),
            };
            if let Some(l) = n.latency_seconds {
                m.propagation_latency
                    .get_or_create(&NodeNamespaceMode {
                        node: n.node.clone(),
                        namespace: ns.clone(),
                        mode: n.mode.clone().unwrap_or_else(|| "unknown".into()),
                    })
                    .observe(l);
            }
            for (family, v) in [
                (&m.late_connections, n.late_connections),
                (&m.refused_connections, n.refused_connections),
                (&m.keepalive_aborted, n.aborted_connections),
            ] {
                if v > 0 {
                    family.get_or_create(&nn).inc_by(v);
                }
            }
        }
        if let Some(c) = rec.control_plane_seconds {
            m.control_plane_latency
                .get_or_create(&NamespaceLabel {
                    namespace: ns.clone(),
                })
                .observe(c);
        }
        m.deletions
            .get_or_create(&NamespaceOutcome {
                namespace: ns.clone(),
                outcome: if rec.complete {
                    "complete"
                } else {
                    "incomplete"
                }
                .into(),
            })
            .inc();
        for node in &rec.missing_nodes {
            m.nodes_missing
                .get_or_create(&NodeLabel { node: node.clone() })
                .inc();
        }
    }
}

/// Folds one observation into the deletion. `node` reported it; `peer_node`
/// is where the other side of a connection lives (destination-side events
/// are attributed to the source node).
/// Returns whether the deletion's accumulators changed.
fn apply(
    p: &mut Pending,
    node: &str,
    peer_node: Option<&str>,
    kind: ObsKind,
    t: UnixNanos,
    uncertainty: u64,
) -> bool {
    let after_t0 = t >= p.t0;
    let nodes = &mut (&mut p.nodes, &mut p.dirty_nodes);
    let source = peer_node.unwrap_or(UNATTRIBUTED);
    match kind {
        ObsKind::RulesRemoved(mode) => {
            let a = node_acc(nodes, node, uncertainty);
            if a.rules_removed.is_none_or(|(prev, _)| t >= prev) {
                a.rules_removed = Some((t, mode));
            }
        }
        ObsKind::RulesAdded => {
            // The dataplane selects the endpoint again: an earlier removal was
            // not the final one.
            let a = node_acc(nodes, node, uncertainty);
            if a.rules_removed.is_some_and(|(prev, _)| t >= prev) {
                a.rules_removed = None;
            }
        }
        // A direct connection to the pod IP from this node also shows up as
        // a new flow: only flows count as late, so it is counted once.
        // The pod's node also sees, in its own conntrack, the flows other
        // nodes route to the pod through it: those are the source node's
        // evidence (its agent reports them), not this node's routing.
        ObsKind::NewFlow if peer_node.is_some_and(|p| p != node) => return false,
        ObsKind::NewFlow => {
            let a = node_acc(nodes, node, uncertainty);
            a.last_connection = a.last_connection.max(Some(t));
            if after_t0 {
                a.late_flows += 1;
            }
        }
        ObsKind::Connected => {
            let a = node_acc(nodes, node, uncertainty);
            a.last_connection = a.last_connection.max(Some(t));
        }
        ObsKind::Accepted => {
            let a = node_acc(nodes, source, uncertainty);
            a.last_connection = a.last_connection.max(Some(t));
            if after_t0 {
                a.late_accepted += 1;
            }
        }
        ObsKind::ResetSent {
            cause: ResetCause::Refused,
        } => node_acc(nodes, source, uncertainty).refused += 1,
        // A request on a keep-alive connection the pod closed: lost like an
        // aborted one.
        ObsKind::ResetSent {
            cause: ResetCause::DataAfterClose,
        } => node_acc(nodes, source, uncertainty).aborted += 1,
        ObsKind::Closed { reset: true } => node_acc(nodes, source, uncertainty).aborted += 1,
        ObsKind::Closed { reset: false }
        | ObsKind::ResetSent {
            cause: ResetCause::Other,
        }
        | ObsKind::ResetReceived => return false,
    }
    true
}

/// The node's accumulator, marked changed.
fn node_acc<'a>(
    (nodes, dirty): &'a mut (&mut BTreeMap<String, NodeAcc>, &mut Vec<String>),
    n: &str,
    uncertainty: u64,
) -> &'a mut NodeAcc {
    let a = nodes.entry(n.to_owned()).or_default();
    a.clock_uncertainty_ns.get_or_insert(uncertainty);
    if !a.dirty {
        a.dirty = true;
        dirty.push(n.to_owned());
    }
    a
}

/// Pseudo node for connections whose source address matches no node.
pub const UNATTRIBUTED: &str = "unattributed";

fn record(p: Pending, now: UnixNanos) -> DeletionRecord {
    let complete = p.all_reported(&p.expected);
    let missing_nodes: Vec<String> = p
        .expected
        .iter()
        .filter(|n| p.nodes.get(*n).is_none_or(|a| a.rules_removed.is_none()))
        .cloned()
        .collect();
    let nodes: Vec<NodeMeasurement> = p
        .nodes
        .into_iter()
        .map(|(node, a)| {
            let rules = a.rules_removed.map(|(t, _)| t);
            let latest = rules.max(a.last_connection);
            NodeMeasurement {
                latency_seconds: latest.map(|t| (t - p.t0) as f64 / NANOS),
                mode: match a.rules_removed {
                    Some((_, m)) => Some(m.as_str().into()),
                    None if a.last_connection.is_some() => Some("traffic".into()),
                    None => None,
                },
                node,
                rules_removed_unix_nanos: rules,
                last_connection_unix_nanos: a.last_connection,
                clock_uncertainty_seconds: a.clock_uncertainty_ns.map(|u| u as f64 / NANOS),
                // The same connection can be seen from both ends (the source
                // node's conntrack, the pod's accept): take the larger view.
                late_connections: a.late_flows.max(a.late_accepted),
                refused_connections: a.refused,
                aborted_connections: a.aborted,
            }
        })
        .collect();
    let propagation_seconds = complete
        .then(|| {
            nodes
                .iter()
                .filter_map(|n| n.latency_seconds)
                .reduce(f64::max)
        })
        .flatten();
    DeletionRecord {
        pod_uid: p.start.pod_uid,
        namespace: p.start.namespace,
        pod_name: p.start.pod_name,
        services: p.start.services,
        pod_ip: p.start.ip.to_string(),
        host_node: p.start.host_node,
        deletion_start_unix_nanos: p.t0,
        api_deletion_start_unix_nanos: p.start.api_start_unix_nanos,
        grace_period_seconds: p.start.grace_period_seconds,
        control_plane_seconds: p.terminating.map(|t| (t - p.t0) as f64 / NANOS),
        complete,
        propagation_seconds,
        finished_unix_nanos: now,
        nodes,
        missing_nodes,
    }
}
