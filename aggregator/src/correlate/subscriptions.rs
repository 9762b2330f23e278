//! Agents' endpoint subscriptions: the deletions in flight as a snapshot,
//! then every change; an agent with a live subscription is a node the next
//! deletion expects a report from.

use std::sync::Arc;

use observer_proto::Endpoint;
use tokio::sync::broadcast;

use super::state::Pending;
use super::{CorrelateError, Correlator};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchChange {
    Add(Endpoint),
    Remove(Endpoint),
    /// The snapshot of a new subscription is complete.
    Synced,
}

/// Broadcast buffer per subscriber; a subscriber that falls further behind
/// is disconnected and resubscribes (getting a fresh snapshot).
pub(super) const CHANGE_BUFFER: usize = 4096;

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

impl Correlator {
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
}
