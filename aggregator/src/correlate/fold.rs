//! The one fold of observations into a deletion's per-node accumulators:
//! the last rules removal (cleared by a later re-add), the last connection
//! routed to the endpoint, late, refused and aborted connections. Agent
//! times are put on the aggregator's clock first; each observation is
//! attributed to the node whose routing it shows.

use std::collections::{BTreeMap, BTreeSet};

use observer_proto::{ClockEstimate, CloseKind, Observation, ResetCause, UnixNanos};

use super::routers;
use super::state::{Pending, State, mark_pending};
use crate::model::{NodeAccumulator, RulesRemoval};
use crate::nodes::{NodeIndex, from_own_socket, from_pod_kernel};

/// Pseudo node for connections whose source address matches no node.
pub const UNATTRIBUTED: &str = "unattributed";

/// Why an observation was refused before it could move a latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implausible {
    /// Later than the aggregator's now plus the clock tolerance and the
    /// agent's clock uncertainty.
    Future,
    /// Earlier than its deletion's start minus the grace period and the
    /// tolerance: no deletion of this endpoint was under way.
    BeforeDeletion,
    /// The agent's clock offset exceeds the limit: its times cannot be
    /// trusted at all.
    ClockOffset,
}

impl Implausible {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Future => "future",
            Self::BeforeDeletion => "before_deletion",
            Self::ClockOffset => "clock_offset",
        }
    }
}

/// The plausibility window of observation times.
#[derive(Clone, Copy, Debug)]
pub struct Plausibility {
    /// Allowed error of agents' times beyond their stated uncertainty.
    pub tolerance_ns: i64,
    /// Largest clock offset an agent may have.
    pub max_offset_ns: i64,
}

impl Plausibility {
    /// Refusals that do not depend on the deletion.
    pub fn check(
        &self,
        time: UnixNanos,
        clock: ClockEstimate,
        now: UnixNanos,
    ) -> Result<(), Implausible> {
        if clock.offset_ns.unsigned_abs() > self.max_offset_ns.unsigned_abs() {
            return Err(Implausible::ClockOffset);
        }
        let slack = self.tolerance_ns + i64::try_from(clock.uncertainty_ns).unwrap_or(i64::MAX);
        if time > now + slack {
            return Err(Implausible::Future);
        }
        Ok(())
    }
}

/// One observation as the fold sees it: on the aggregator's clock, with the
/// node that reported it and the node its other side belongs to.
struct Seen<'a> {
    obs: &'a Observation,
    time: UnixNanos,
    node: &'a str,
    /// Where the other side of a destination-side connection lives.
    peer_node: Option<&'a str>,
    uncertainty_ns: u64,
}

impl State {
    /// Folds one observation of `node` into the deletions of its endpoint;
    /// says why when a deletion refused it as implausible.
    pub(super) fn fold(
        &mut self,
        node: &str,
        obs: &Observation,
        clock: ClockEstimate,
        tolerance_ns: i64,
    ) -> Option<Implausible> {
        let uids = self.by_ip.get(&obs.endpoint().ip())?;
        let own_socket = from_own_socket(obs, node, &self.nodes);
        let peer_node = peer_node(&self.nodes, obs);
        let peer_host = obs.peer().and_then(|ip| self.nodes.node_with_address(ip));
        let router = routers::attribute(&mut self.pods, &self.nodes, node, peer_node, obs);
        // Refusals prove routing as connections do (the source sent a new
        // connection then), so they are filtered alike.
        let connection = matches!(
            obs,
            Observation::Accepted(_) | Observation::Connected(_) | Observation::NewFlow(_)
        ) || matches!(obs, Observation::ResetSent(c) if c.reset_cause() == ResetCause::Refused);
        let seen = Seen {
            obs,
            time: clock.to_aggregator(obs.time()),
            node,
            peer_node,
            uncertainty_ns: clock.uncertainty_ns,
        };
        let mut refused = None;
        for uid in uids {
            let Some(p) = self.pending.get_mut(uid) else {
                continue;
            };
            let grace_ns = p.start.grace_period_seconds.unwrap_or(0).max(0) * 1_000_000_000;
            if seen.time < p.t0 - grace_ns - tolerance_ns {
                refused = Some(Implausible::BeforeDeletion);
                continue;
            }
            if !own_socket || !from_pod_kernel(obs, node, p.start.host_node.as_deref()) {
                continue;
            }
            // Connections from the pod's own node address are the
            // kubelet's probes, not traffic the dataplane routed: they
            // go on until the pod exits and would stretch T_last.
            if connection && peer_host.is_some() && peer_host == p.start.host_node.as_deref() {
                continue;
            }
            let routed = router.as_ref().is_some_and(|r| {
                routers::apply(&mut p.routers, r, seen.time, p.t0, seen.uncertainty_ns)
            });
            p.routers_dirty |= routed;
            if apply(p, &seen) || routed {
                mark_pending(&mut self.dirty_pending, uid, p);
            }
        }
        refused
    }
}

/// Where the other side of `obs` lives. Destination-side events are
/// attributed to the peer's node; a new flow's source tells whether the
/// reporting node routed it or only forwarded it.
pub(super) fn peer_node<'a>(nodes: &'a NodeIndex, obs: &Observation) -> Option<&'a str> {
    match obs {
        Observation::Accepted(_)
        | Observation::ResetSent(_)
        | Observation::Closed(_)
        | Observation::NewFlow(_) => obs.peer().and_then(|ip| nodes.node_of(ip)),
        _ => None,
    }
}

/// Folds one observation into the deletion. Returns whether the deletion's
/// accumulators changed.
fn apply(p: &mut Pending, s: &Seen<'_>) -> bool {
    let (t, after_t0) = (s.time, s.time >= p.t0);
    let mut accs = Accumulators {
        nodes: &mut p.nodes,
        dirty: &mut p.dirty_nodes,
        uncertainty_ns: s.uncertainty_ns,
    };
    let source = s.peer_node.unwrap_or(UNATTRIBUTED);
    match s.obs {
        Observation::RulesRemoved(r) => {
            let a = accs.of(s.node);
            if a.rules_removed.is_none_or(|prev| t >= prev.time) {
                a.rules_removed = Some(RulesRemoval {
                    time: t,
                    detector: r.detector,
                    precision_ns: Some(r.precision_ns),
                });
            }
        }
        Observation::RemovedBeforeStart(_) => {
            let a = accs.of(s.node);
            a.removed_before_start = a.removed_before_start.max(Some(t));
        }
        Observation::RulesAdded(_) => {
            // The dataplane selects the endpoint again: an earlier removal was
            // not the final one.
            let a = accs.of(s.node);
            if a.rules_removed.is_some_and(|prev| t >= prev.time) {
                a.rules_removed = None;
            }
        }
        // A direct connection to the pod IP from this node also shows up as
        // a new flow: only flows count as late, so it is counted once.
        // The pod's node also sees, in its own conntrack, the flows other
        // nodes route to the pod through it: those are the source node's
        // evidence (its agent reports them), not this node's routing.
        Observation::NewFlow(_) if s.peer_node.is_some_and(|p| p != s.node) => return false,
        Observation::NewFlow(_) => {
            let a = accs.of(s.node);
            a.last_connection = a.last_connection.max(Some(t));
            a.late_flows += u64::from(after_t0);
        }
        Observation::Connected(_) => {
            let a = accs.of(s.node);
            a.last_connection = a.last_connection.max(Some(t));
        }
        Observation::Accepted(_) => {
            let a = accs.of(source);
            a.last_connection = a.last_connection.max(Some(t));
            a.late_accepted += u64::from(after_t0);
        }
        Observation::ResetSent(c) => match c.reset_cause() {
            // The source still sent a new connection at `t`: as late as an
            // accepted one for its last-routed time.
            ResetCause::Refused => {
                let a = accs.of(source);
                a.refused += 1;
                a.last_connection = a.last_connection.max(Some(t));
            }
            // A request on a keep-alive connection the pod closed: lost like
            // an aborted one.
            ResetCause::DataAfterClose => accs.of(source).aborted += 1,
            ResetCause::Other => return false,
        },
        Observation::Closed(c) if c.close == Some(CloseKind::Reset) => {
            accs.of(source).aborted += 1;
        }
        Observation::Closed(_) | Observation::ResetReceived(_) => return false,
    }
    true
}

/// A deletion's node accumulators while one observation is folded in.
struct Accumulators<'a> {
    nodes: &'a mut BTreeMap<String, NodeAccumulator>,
    dirty: &'a mut BTreeSet<String>,
    uncertainty_ns: u64,
}

impl Accumulators<'_> {
    /// The node's accumulator, marked changed.
    fn of(&mut self, node: &str) -> &mut NodeAccumulator {
        if !self.dirty.contains(node) {
            self.dirty.insert(node.to_owned());
        }
        let a = self.nodes.entry(node.to_owned()).or_default();
        a.clock_uncertainty_ns.get_or_insert(self.uncertainty_ns);
        a
    }
}
