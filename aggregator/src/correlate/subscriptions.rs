//! Agents' endpoint subscriptions: the deletions in flight and the open
//! startup windows as a snapshot, then every change; an agent with a live subscription is a node the next
//! deletion expects a report from.

use std::sync::Arc;

use observer_proto::{Endpoint, NewEndpoint};
use tokio::sync::{broadcast, watch};

use super::{CorrelateError, Correlator};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchChange {
    Add(Endpoint),
    Remove(Endpoint),
    /// A new pod's startup window opened / closed.
    AddNew(NewEndpoint),
    RemoveNew(NewEndpoint),
    /// The snapshot of a new subscription is complete.
    Synced,
}

/// Broadcast buffer per subscriber; a subscriber that falls further behind
/// is disconnected and resubscribes (getting a fresh snapshot).
pub(super) const CHANGE_BUFFER: usize = 4096;

/// A live endpoint subscription: the current set, then changes. Dropping it
/// marks the agent's subscription closed.
pub struct Subscription {
    /// Shared with every subscription since the last change.
    snapshot: Arc<[Endpoint]>,
    /// The open startup windows when it began.
    new_endpoints: Vec<NewEndpoint>,
    changes: broadcast::Receiver<WatchChange>,
    /// The agent's subscription generation ([`super::state::Agent`]).
    generation: watch::Receiver<u64>,
    guard: SubscriptionGuard,
}

/// Why a subscription ended early.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscriptionEnded {
    /// The subscriber fell more than the broadcast buffer behind; it must
    /// subscribe again to get a fresh snapshot.
    #[error("endpoint subscriber fell {0} changes behind")]
    Lagged(u64),
    #[error("the agent subscribed again or was replaced by a newer agent of its node")]
    Superseded,
}

impl Subscription {
    /// Adds for the snapshot, `Synced`, then every change; ends with
    /// [`SubscriptionEnded`] if the subscriber falls too far behind or is
    /// superseded. Holds the subscription open while the stream lives.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<WatchChange, SubscriptionEnded>> + Send {
        use futures::StreamExt;
        use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
        let guard = self.guard;
        let snapshot = self.snapshot;
        let adds = (0..snapshot.len()).map(move |i| Ok(WatchChange::Add(snapshot[i].clone())));
        let new = self
            .new_endpoints
            .into_iter()
            .map(|e| Ok(WatchChange::AddNew(e)));
        let snapshot = futures::stream::iter(
            adds.chain(new)
                .chain(std::iter::once(Ok(WatchChange::Synced))),
        );
        let changes = BroadcastStream::new(self.changes).map(move |r| {
            let _hold = &guard;
            r.map_err(|BroadcastStreamRecvError::Lagged(n)| SubscriptionEnded::Lagged(n))
        });
        let mut generation = self.generation;
        let mine = *generation.borrow_and_update();
        // Ends when a newer subscription of the agent starts, or the agent
        // (and with it the sender) is dropped.
        let superseded = futures::stream::once(async move {
            let _ = generation.wait_for(|g| *g != mine).await;
            Err(SubscriptionEnded::Superseded)
        });
        // Stop after the first error: the receiver skipped changes.
        let mut failed = false;
        futures::stream::select(snapshot.chain(changes), superseded).take_while(move |r| {
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
        agent.generation.send_modify(|g| *g += 1);
        let generation = agent.generation.subscribe();
        st.live_cache = None;
        // Snapshot and receiver under the same lock: no change falls between.
        let changes = self.changes.subscribe();
        let snapshot = st.snapshot();
        let new_endpoints = st.startup.endpoints();
        self.metrics.agents_connected.set(st.connected_agents());
        Ok(Subscription {
            snapshot,
            new_endpoints,
            changes,
            generation,
            guard: SubscriptionGuard {
                correlator: Arc::clone(self),
                agent_id: agent_id.into(),
            },
        })
    }
}
