//! A pod deletion as it starts (from the Kubernetes watcher) and a node's
//! rules removal as the correlator keeps it and the store persists it. The
//! finished measurement is [`observer_proto::api::DeletionRecord`], the
//! form `GET /v1/deletions` shows.

use std::net::IpAddr;

use observer_proto::api::RouterRef;
use observer_proto::{Detector, UnixNanos};
use serde::{Deserialize, Serialize};

/// A pod deletion as the Kubernetes watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletionStart {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub services: Vec<String>,
    pub ip: IpAddr,
    pub ports: Vec<u16>,
    pub host_node: Option<String>,
    /// When the aggregator received the watch event that showed the deletion;
    /// `None` when the deletion was already under way when the aggregator
    /// (re)listed, so the receipt time says nothing about the start.
    pub received_unix_nanos: Option<UnixNanos>,
    /// deletionTimestamp - deletionGracePeriodSeconds (whole seconds).
    pub api_start_unix_nanos: Option<UnixNanos>,
    pub grace_period_seconds: Option<i64>,
    /// When an EndpointSlice first showed the endpoint terminating (as
    /// stored for a deletion in flight: the latest known).
    pub terminating_unix_nanos: Option<UnixNanos>,
}

impl DeletionStart {
    /// The sharper receipt time when there is one, else the API's
    /// whole-second start.
    pub fn t0(&self) -> Option<UnixNanos> {
        self.received_unix_nanos.or(self.api_start_unix_nanos)
    }
}

/// What one node contributed so far to a deletion in flight: folded from
/// its observations, checkpointed as it is, finished into its
/// `NodeMeasurement`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAccumulator {
    pub rules_removed: Option<RulesRemoval>,
    /// T_last, on the aggregator's clock.
    pub last_connection: Option<UnixNanos>,
    /// New flows after T0 seen by this node's own conntrack.
    pub late_flows: u64,
    /// Connections after T0 accepted by the pod and attributed to this node
    /// by their source address (the destination node's view).
    pub late_accepted: u64,
    pub refused: u64,
    pub aborted: u64,
    pub clock_uncertainty_ns: Option<u64>,
    /// The node's agent started after the deletion and its dataplane no
    /// longer selected the endpoint: removed before that time, when is
    /// unknown.
    pub removed_before_start: Option<UnixNanos>,
}

/// The last rules removal a node reported for a deletion's endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulesRemoval {
    /// On the aggregator's clock.
    pub time: UnixNanos,
    pub detector: Detector,
    /// Upper bound of the error of `time` as the detector timed it; `None`
    /// only for a removal checkpointed before precisions were kept.
    pub precision_ns: Option<u64>,
}

/// What one router (see `correlate::routers`) sent a deletion's pod so
/// far: new connections, accepted or refused. Checkpointed as JSON with
/// its deletion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterAccumulator {
    pub router: RouterRef,
    /// Its last new connection to the pod, on the aggregator's clock.
    pub last_connection: Option<UnixNanos>,
    /// New flows after T0 seen by its node's conntrack.
    pub late_flows: u64,
    /// Connections after T0 the pod accepted.
    pub late_accepted: u64,
    pub refused: u64,
    /// The largest clock uncertainty of the agents that timed it.
    pub clock_uncertainty_ns: u64,
}
