//! What the agent observes, from every source (connection tracepoints,
//! dataplane rule detectors, conntrack flows), in one type. Sources send
//! these into one channel; `observe` prints them and `run` reports them to
//! the aggregator. The serde form is the `observe --output json` line format.

use std::net::SocketAddr;

use serde::Serialize;

/// Nanoseconds since the Unix epoch (wall clock).
pub type UnixNanos = u64;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Observation {
    /// The watched endpoint accepted a new inbound connection.
    Accepted(ConnObservation),
    /// A socket on this node connected directly to the watched endpoint.
    Connected(ConnObservation),
    /// An established connection of the watched endpoint ended.
    Closed(ConnObservation),
    /// The watched endpoint sent a RST (`reason` says why; `no_socket` is a
    /// refused connection).
    ResetSent(ConnObservation),
    /// A socket on this node received a RST from the watched endpoint.
    ResetReceived(ConnObservation),
    /// This node's dataplane stopped selecting the endpoint for new connections.
    RulesRemoved(RulesChange),
    /// This node's dataplane (again) selects the endpoint for new connections.
    RulesAdded(RulesChange),
    /// A new flow whose destination after NAT is the watched endpoint.
    NewFlow(NewFlow),
}

/// A connection event, from the watched endpoint's point of view: `dst` is
/// always the watched endpoint, `src` the other side.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnObservation {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub time_unix_nano: UnixNanos,
    /// For `closed`: `endpoint_fin`, `peer_fin` or `reset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close: Option<CloseKind>,
    /// For `reset_sent`: the kernel's `sk_rst_reason` name, when the kernel reports one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// TCP state name before the transition (for resets: the socket's state).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_state: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseKind {
    EndpointFin,
    PeerFin,
    Reset,
}

/// Which mechanism noticed a dataplane change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// nftables netlink notifications, kube-proxy nftables mode.
    Nftables,
    /// nftables netlink notifications carrying xtables rules (iptables-nft).
    IptablesNft,
    /// Change-triggered re-read of iptables-legacy tables.
    IptablesLegacy,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RulesChange {
    pub endpoint: SocketAddr,
    pub detector: Detector,
    pub time_unix_nano: UnixNanos,
    /// Upper bound of the error of `time_unix_nano`, in nanoseconds.
    pub precision_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NewFlow {
    /// Source of the flow (a local pod or the node itself).
    pub src: SocketAddr,
    /// Destination after NAT: the watched endpoint.
    pub dst: SocketAddr,
    /// Destination the client chose (for example the Service's ClusterIP).
    pub original_dst: SocketAddr,
    pub time_unix_nano: UnixNanos,
}
