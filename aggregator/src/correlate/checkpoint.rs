//! Persistence of the in-flight state: what changed since the last
//! checkpoint (dirty deletions, node accumulators, agents) taken from the
//! state and written in one store transaction, put back as dirty when the
//! write fails, and the state rebuilt from the store after a restart.

use std::sync::Arc;

use observer_proto::UnixNanos;

use super::state::{Agent, Pending, State, mark_agent, mark_pending};
use super::{Correlator, Registration};
use crate::model::{DeletionStart, RouterAccumulator};
use crate::store::{AgentRow, Checkpoint, NodeAccRow, PendingNodes, PendingRow, StoreError};

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
    /// Finished startup windows back in the startup log.
    pub startup_records: usize,
}

impl Correlator {
    /// Loads the in-flight state of the last run (pending deletions with
    /// their node accumulators, agents' sequences) and the finished startup
    /// windows within the retention at `now` from the store. Call once,
    /// before serving agents and before the Kubernetes watchers start.
    pub fn restore(&self, now: UnixNanos) -> Result<RestoreStats, StoreError> {
        let _persist = self.persist();
        let saved = self.store.in_flight()?;
        let startups = self
            .store
            .startups(now - self.settings.retention, self.settings.startup.kept)?;
        let mut stats = RestoreStats {
            startup_records: startups.len(),
            ..RestoreStats::default()
        };
        for r in startups {
            self.startup_log.push(r, now);
        }
        let mut st = self.state();
        for (row, accs) in saved.pending {
            let uid = row.start.pod_uid.clone();
            if st.pending.contains_key(&uid) {
                continue;
            }
            let p = restored_pending(row, accs);
            stats.node_accumulators += p.nodes.len();
            st.by_ip.entry(p.start.ip).or_default().push(uid.clone());
            st.pending.insert(uid, p);
            stats.deletions += 1;
        }
        for a in saved.agents {
            restore_agent(&mut st, a);
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
        self.state().checkpoint_written(&c);
        Ok(CheckpointStats {
            deletions: c.updated.len(),
            node_accumulators: c.nodes.iter().map(|n| n.nodes.len()).sum(),
            agents: c.agents.len(),
            snapshot,
            write,
        })
    }
}

impl State {
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
            c.updated.push(crate::store::PendingUpdate {
                pod_uid: uid.clone(),
                terminating_unix_nanos: p.terminating,
                pod_gone_unix_nanos: p.pod_gone,
                routers: std::mem::take(&mut p.routers_dirty).then(|| routers_row(p)),
            });
            let nodes = take_dirty_nodes(p);
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
                clock: a.clock,
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
            p.routers_dirty |= u.routers.is_some();
        }
        for n in &c.nodes {
            let Some(p) = self.pending.get_mut(&n.pod_uid) else {
                continue;
            };
            for row in &n.nodes {
                if p.nodes.contains_key(&row.node) {
                    p.dirty_nodes.insert(row.node.clone());
                }
            }
        }
        for r in &c.agents {
            if let Some(a) = self.agents.get_mut(&r.agent_id) {
                mark_agent(&mut self.dirty_agents, &r.agent_id, a);
            }
        }
    }

    /// A checkpoint is durable: acknowledge the sequences it covered.
    fn checkpoint_written(&mut self, c: &Checkpoint) {
        for r in &c.agents {
            if let Some(a) = self.agents.get_mut(&r.agent_id) {
                a.durable_sequence = a.durable_sequence.max(r.last_sequence);
            }
        }
        for r in &c.started {
            if let Some(p) = self.pending.get_mut(&r.start.pod_uid) {
                p.stored = true;
            }
        }
    }
}

/// The rows of the deletion's changed node accumulators, clearing their marks.
fn take_dirty_nodes(p: &mut Pending) -> Vec<NodeAccRow> {
    std::mem::take(&mut p.dirty_nodes)
        .into_iter()
        .filter_map(|node| {
            let acc = p.nodes.get(&node)?.clone();
            Some(NodeAccRow { node, acc })
        })
        .collect()
}

/// The deletion as its start row stores it.
pub(super) fn pending_row(p: &Pending) -> PendingRow {
    PendingRow {
        start: DeletionStart {
            terminating_unix_nanos: p.terminating,
            ..p.start.clone()
        },
        t0_unix_nanos: p.t0,
        tracked_since_unix_nanos: p.tracked_since,
        expected_nodes: p.expected.iter().cloned().collect(),
        pod_gone_unix_nanos: p.pod_gone,
        routers: routers_row(p),
    }
}

/// The deletion's routers as stored, in a stable order.
fn routers_row(p: &Pending) -> Vec<RouterAccumulator> {
    let mut v: Vec<RouterAccumulator> = p.routers.values().cloned().collect();
    v.sort_by(|a, b| {
        (a.router.kind, &a.router.name, &a.router.node).cmp(&(
            b.router.kind,
            &b.router.name,
            &b.router.node,
        ))
    });
    v
}

/// A persisted deletion back in memory (not dirty: it is what is stored).
fn restored_pending(row: PendingRow, accs: Vec<NodeAccRow>) -> Pending {
    let nodes = accs.into_iter().map(|r| (r.node, r.acc)).collect();
    let expected = Arc::new(row.expected_nodes.into_iter().collect());
    let routers = row
        .routers
        .into_iter()
        .map(|r| (r.router.clone(), r))
        .collect();
    let mut p = Pending::new(
        row.start,
        row.t0_unix_nanos,
        row.tracked_since_unix_nanos,
        expected,
    );
    p.nodes = nodes;
    p.routers = routers;
    p.pod_gone = row.pod_gone_unix_nanos;
    p
}

/// A persisted agent back in memory; a registration since the restart
/// keeps what it knows.
fn restore_agent(st: &mut State, a: AgentRow) {
    let reg = Registration {
        agent_id: a.agent_id.clone(),
        node_name: a.node,
        ..Registration::default()
    };
    let agent = st
        .agents
        .entry(a.agent_id)
        .or_insert_with(|| Agent::new(reg, a.seen_unix_nanos));
    agent.last_sequence = agent.last_sequence.max(a.last_sequence);
    agent.durable_sequence = agent.durable_sequence.max(a.last_sequence);
    if agent.clock.is_none() {
        agent.clock = a.clock;
    }
}
