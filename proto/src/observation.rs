//! What an agent observes and reports, typed: built by the agent's sources,
//! printed by `observer-agent observe` (the serde form is its JSON line
//! format), and folded by the aggregator. Converted to and from the wire
//! form ([`v1::Observation`]) here only.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::{UnixNanos, v1};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Observation {
    /// The watched endpoint accepted a new inbound connection.
    Accepted(ConnEvent),
    /// A socket on the reporting node connected directly to the watched endpoint.
    Connected(ConnEvent),
    /// An established connection of the watched endpoint ended.
    Closed(ConnEvent),
    /// The watched endpoint sent a RST ([`ConnEvent::reset_cause`] says why).
    ResetSent(ConnEvent),
    /// A socket on the reporting node received a RST from the watched endpoint.
    ResetReceived(ConnEvent),
    /// The node's dataplane stopped selecting the endpoint for new connections.
    RulesRemoved(RulesChange),
    /// The node's dataplane (again) selects the endpoint for new connections.
    RulesAdded(RulesChange),
    /// A new flow whose destination after NAT is the watched endpoint.
    NewFlow(NewFlow),
    /// The endpoint's deletion started before the agent read the node's
    /// dataplane (`time`), which did not select the endpoint then, and no
    /// removal was seen: it was removed before the agent's start, when is
    /// unknown.
    RemovedBeforeStart(RulesChange),
}

/// A connection event, from the watched endpoint's point of view: `dst` is
/// always the watched endpoint, `src` the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnEvent {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    #[serde(rename = "time_unix_nano")]
    pub time: UnixNanos,
    /// For `closed`: how the connection ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close: Option<CloseKind>,
    /// For `reset_sent`: the kernel's `sk_rst_reason` name, when the kernel
    /// reports one (an open set that grows with kernel versions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ConnEvent {
    /// Why the endpoint sent a RST, from the kernel's reason.
    pub fn reset_cause(&self) -> ResetCause {
        self.reason
            .as_deref()
            .map_or(ResetCause::Other, ResetCause::from_kernel_reason)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseKind {
    EndpointFin,
    PeerFin,
    Reset,
}

/// Why the endpoint sent a RST.
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
    /// From the kernel's `sk_rst_reason` name. A socket that closed first
    /// and whose FIN was acknowledged waits as a timewait socket (its
    /// FIN_WAIT2 substate); data arriving there is reset with
    /// `TCP_TIMEWAIT_SOCKET`, and that is the common case of a request on a
    /// keep-alive connection the server closed. `TCP_ABORT_ON_DATA` is the
    /// same request arriving before the FIN was acknowledged.
    pub fn from_kernel_reason(reason: &str) -> Self {
        if reason.eq_ignore_ascii_case("no_socket") {
            Self::Refused
        } else if reason.eq_ignore_ascii_case("tcp_abort_on_data")
            || reason.eq_ignore_ascii_case("tcp_timewait_socket")
        {
            Self::DataAfterClose
        } else {
            Self::Other
        }
    }
}

/// The dataplane whose rules changed, as the agent's detector knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// nftables netlink notifications, kube-proxy nftables mode.
    Nftables,
    /// nftables netlink notifications carrying xtables rules (iptables-nft).
    IptablesNft,
    /// Change-triggered re-read of iptables-legacy tables.
    IptablesLegacy,
    /// Cilium's service maps (kube-proxy replacement), timed by the
    /// cilium-agent's bpf() syscall or by a read-only poll.
    Cilium,
}

impl Detector {
    pub const ALL: [Detector; 4] = [
        Self::Nftables,
        Self::IptablesNft,
        Self::IptablesLegacy,
        Self::Cilium,
    ];

    /// The name in JSON, metric labels and the store.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::IptablesNft => "iptables_nft",
            Self::IptablesLegacy => "iptables_legacy",
            Self::Cilium => "cilium",
        }
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`Detector`]'s.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown detector {0:?} (known: nftables, iptables_nft, iptables_legacy, cilium)")]
pub struct UnknownDetector(pub String);

impl FromStr for Detector {
    type Err = UnknownDetector;

    fn from_str(s: &str) -> Result<Self, UnknownDetector> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDetector(s.to_owned()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RulesChange {
    pub endpoint: SocketAddr,
    pub detector: Detector,
    #[serde(rename = "time_unix_nano")]
    pub time: UnixNanos,
    /// Upper bound of the error of `time`, in nanoseconds.
    pub precision_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewFlow {
    /// Source of the flow (a local pod or the node itself).
    pub src: SocketAddr,
    /// Destination after NAT: the watched endpoint.
    pub dst: SocketAddr,
    /// Destination the client chose (for example the Service's ClusterIP).
    pub original_dst: SocketAddr,
    #[serde(rename = "time_unix_nano")]
    pub time: UnixNanos,
}

impl Observation {
    /// When it happened, by the reporting agent's clock.
    pub fn time(&self) -> UnixNanos {
        match self {
            Self::Accepted(c)
            | Self::Connected(c)
            | Self::Closed(c)
            | Self::ResetSent(c)
            | Self::ResetReceived(c) => c.time,
            Self::RulesRemoved(r) | Self::RulesAdded(r) | Self::RemovedBeforeStart(r) => r.time,
            Self::NewFlow(f) => f.time,
        }
    }

    /// The watched endpoint it concerns.
    pub fn endpoint(&self) -> SocketAddr {
        match self {
            Self::Accepted(c)
            | Self::Connected(c)
            | Self::Closed(c)
            | Self::ResetSent(c)
            | Self::ResetReceived(c) => c.dst,
            Self::RulesRemoved(r) | Self::RulesAdded(r) | Self::RemovedBeforeStart(r) => r.endpoint,
            Self::NewFlow(f) => f.dst,
        }
    }

    /// Whether the endpoint's own sockets made it: only the kernel the pod
    /// runs in sees it, so only the agent of the pod's node reports it
    /// (unless agents share a kernel, as the lab's do).
    pub fn at_endpoint(&self) -> bool {
        matches!(
            self,
            Self::Accepted(_) | Self::Closed(_) | Self::ResetSent(_)
        )
    }

    /// The other side of a connection, where there is one.
    pub fn peer(&self) -> Option<IpAddr> {
        match self {
            Self::Accepted(c)
            | Self::Connected(c)
            | Self::Closed(c)
            | Self::ResetSent(c)
            | Self::ResetReceived(c) => Some(c.src.ip()),
            Self::RulesRemoved(_) | Self::RulesAdded(_) | Self::RemovedBeforeStart(_) => None,
            Self::NewFlow(f) => Some(f.src.ip()),
        }
    }

    /// The kind's name, as in the JSON form and metric labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Accepted(_) => "accepted",
            Self::Connected(_) => "connected",
            Self::Closed(_) => "closed",
            Self::ResetSent(_) => "reset_sent",
            Self::ResetReceived(_) => "reset_received",
            Self::RulesRemoved(_) => "rules_removed",
            Self::RulesAdded(_) => "rules_added",
            Self::NewFlow(_) => "new_flow",
            Self::RemovedBeforeStart(_) => "removed_before_start",
        }
    }
}

/// A wire observation that does not decode; names the field and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadObservation {
    #[error("kind is not set")]
    NoKind,
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field}.ip {value:?} is not an IP address")]
    Ip { field: &'static str, value: String },
    #[error("{field}.port {value} is above 65535")]
    Port { field: &'static str, value: u32 },
    #[error("time_unix_nanos {0} is beyond the year 2262")]
    Time(u64),
    #[error("close {0} is not a CloseKind")]
    Close(i32),
    #[error("detector {0} is not a known Detector")]
    Detector(i32),
}

fn addr(a: SocketAddr) -> Option<v1::SocketAddress> {
    Some(v1::SocketAddress {
        ip: a.ip().to_string(),
        port: u32::from(a.port()),
    })
}

fn socket(a: Option<v1::SocketAddress>, field: &'static str) -> Result<SocketAddr, BadObservation> {
    let a = a.ok_or(BadObservation::Missing(field))?;
    let ip = a.ip.parse().map_err(|_| BadObservation::Ip {
        field,
        value: a.ip.clone(),
    })?;
    let port = u16::try_from(a.port).map_err(|_| BadObservation::Port {
        field,
        value: a.port,
    })?;
    Ok(SocketAddr::new(ip, port))
}

fn time(nanos: u64) -> Result<UnixNanos, BadObservation> {
    if nanos == 0 {
        return Err(BadObservation::Missing("time_unix_nanos"));
    }
    UnixNanos::from_wire(nanos).ok_or(BadObservation::Time(nanos))
}

impl From<CloseKind> for v1::CloseKind {
    fn from(c: CloseKind) -> Self {
        match c {
            CloseKind::EndpointFin => Self::EndpointFin,
            CloseKind::PeerFin => Self::PeerFin,
            CloseKind::Reset => Self::Reset,
        }
    }
}

impl From<Detector> for v1::Detector {
    fn from(d: Detector) -> Self {
        match d {
            Detector::Nftables => Self::Nftables,
            Detector::IptablesNft => Self::IptablesNft,
            Detector::IptablesLegacy => Self::IptablesLegacy,
            Detector::Cilium => Self::Cilium,
        }
    }
}

impl From<ConnEvent> for v1::ConnEvent {
    fn from(c: ConnEvent) -> Self {
        v1::ConnEvent {
            src: addr(c.src),
            dst: addr(c.dst),
            time_unix_nanos: c.time.to_wire().unwrap_or_default(),
            close: c
                .close
                .map_or(v1::CloseKind::Unspecified, v1::CloseKind::from) as i32,
            reason: c.reason.unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::ConnEvent> for ConnEvent {
    type Error = BadObservation;

    fn try_from(c: v1::ConnEvent) -> Result<Self, BadObservation> {
        let close = match v1::CloseKind::try_from(c.close) {
            Ok(v1::CloseKind::Unspecified) => None,
            Ok(v1::CloseKind::EndpointFin) => Some(CloseKind::EndpointFin),
            Ok(v1::CloseKind::PeerFin) => Some(CloseKind::PeerFin),
            Ok(v1::CloseKind::Reset) => Some(CloseKind::Reset),
            Err(_) => return Err(BadObservation::Close(c.close)),
        };
        Ok(ConnEvent {
            src: socket(c.src, "src")?,
            dst: socket(c.dst, "dst")?,
            time: time(c.time_unix_nanos)?,
            close,
            reason: Some(c.reason).filter(|r| !r.is_empty()),
        })
    }
}

impl From<RulesChange> for v1::RulesChange {
    fn from(r: RulesChange) -> Self {
        v1::RulesChange {
            endpoint: addr(r.endpoint),
            detector: v1::Detector::from(r.detector) as i32,
            time_unix_nanos: r.time.to_wire().unwrap_or_default(),
            precision_ns: r.precision_ns,
        }
    }
}

impl TryFrom<v1::RulesChange> for RulesChange {
    type Error = BadObservation;

    fn try_from(r: v1::RulesChange) -> Result<Self, BadObservation> {
        let detector = match v1::Detector::try_from(r.detector) {
            Ok(v1::Detector::Nftables) => Detector::Nftables,
            Ok(v1::Detector::IptablesNft) => Detector::IptablesNft,
            Ok(v1::Detector::IptablesLegacy) => Detector::IptablesLegacy,
            Ok(v1::Detector::Cilium) => Detector::Cilium,
            Ok(v1::Detector::Unspecified) | Err(_) => {
                return Err(BadObservation::Detector(r.detector));
            }
        };
        Ok(RulesChange {
            endpoint: socket(r.endpoint, "endpoint")?,
            detector,
            time: time(r.time_unix_nanos)?,
            precision_ns: r.precision_ns,
        })
    }
}

impl From<NewFlow> for v1::NewFlow {
    fn from(f: NewFlow) -> Self {
        v1::NewFlow {
            src: addr(f.src),
            dst: addr(f.dst),
            original_dst: addr(f.original_dst),
            time_unix_nanos: f.time.to_wire().unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::NewFlow> for NewFlow {
    type Error = BadObservation;

    fn try_from(f: v1::NewFlow) -> Result<Self, BadObservation> {
        Ok(NewFlow {
            src: socket(f.src, "src")?,
            dst: socket(f.dst, "dst")?,
            original_dst: socket(f.original_dst, "original_dst")?,
            time: time(f.time_unix_nanos)?,
        })
    }
}

impl From<Observation> for v1::Observation {
    fn from(o: Observation) -> Self {
        use v1::observation::Kind;
        let kind = match o {
            Observation::Accepted(c) => Kind::Accepted(c.into()),
            Observation::Connected(c) => Kind::Connected(c.into()),
            Observation::Closed(c) => Kind::Closed(c.into()),
            Observation::ResetSent(c) => Kind::ResetSent(c.into()),
            Observation::ResetReceived(c) => Kind::ResetReceived(c.into()),
            Observation::RulesRemoved(r) => Kind::RulesRemoved(r.into()),
            Observation::RulesAdded(r) => Kind::RulesAdded(r.into()),
            Observation::NewFlow(f) => Kind::NewFlow(f.into()),
            Observation::RemovedBeforeStart(r) => Kind::RemovedBeforeStart(r.into()),
        };
        v1::Observation { kind: Some(kind) }
    }
}

impl TryFrom<v1::Observation> for Observation {
    type Error = BadObservation;

    fn try_from(o: v1::Observation) -> Result<Self, BadObservation> {
        use v1::observation::Kind;
        Ok(match o.kind.ok_or(BadObservation::NoKind)? {
            Kind::Accepted(c) => Self::Accepted(c.try_into()?),
            Kind::Connected(c) => Self::Connected(c.try_into()?),
            Kind::Closed(c) => Self::Closed(c.try_into()?),
            Kind::ResetSent(c) => Self::ResetSent(c.try_into()?),
            Kind::ResetReceived(c) => Self::ResetReceived(c.try_into()?),
            Kind::RulesRemoved(r) => Self::RulesRemoved(r.try_into()?),
            Kind::RulesAdded(r) => Self::RulesAdded(r.try_into()?),
            Kind::NewFlow(f) => Self::NewFlow(f.try_into()?),
            Kind::RemovedBeforeStart(r) => Self::RemovedBeforeStart(r.try_into()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(close: Option<CloseKind>, reason: Option<&str>) -> ConnEvent {
        ConnEvent {
            src: "10.0.0.1:4000".parse().unwrap(),
            dst: "[fd00::2]:80".parse().unwrap(),
            time: UnixNanos::from_nanos(1_700_000_000_000_000_007),
            close,
            reason: reason.map(str::to_owned),
        }
    }

    fn every_kind() -> Vec<Observation> {
        let rules = |detector| RulesChange {
            endpoint: "10.0.0.2:8080".parse().unwrap(),
            detector,
            time: UnixNanos::from_nanos(9),
            precision_ns: 3,
        };
        vec![
            Observation::Accepted(conn(None, None)),
            Observation::Connected(conn(None, None)),
            Observation::Closed(conn(Some(CloseKind::EndpointFin), None)),
            Observation::Closed(conn(Some(CloseKind::PeerFin), None)),
            Observation::Closed(conn(Some(CloseKind::Reset), None)),
            Observation::ResetSent(conn(None, Some("NO_SOCKET"))),
            Observation::ResetReceived(conn(None, None)),
            Observation::RulesRemoved(rules(Detector::Nftables)),
            Observation::RulesRemoved(rules(Detector::IptablesNft)),
            Observation::RulesAdded(rules(Detector::IptablesLegacy)),
            Observation::RemovedBeforeStart(rules(Detector::Nftables)),
            Observation::NewFlow(NewFlow {
                src: "10.0.0.1:1".parse().unwrap(),
                dst: "10.0.0.2:2".parse().unwrap(),
                original_dst: "10.96.0.1:3".parse().unwrap(),
                time: UnixNanos::from_nanos(11),
            }),
        ]
    }

    #[test]
    fn every_kind_survives_the_wire() {
        for o in every_kind() {
            let wire = v1::Observation::from(o.clone());
            assert_eq!(Observation::try_from(wire), Ok(o));
        }
    }

    #[test]
    fn a_bad_field_is_named_with_its_value() {
        let wire = |o: Observation| match v1::Observation::from(o).kind {
            Some(v1::observation::Kind::Accepted(c)) => c,
            _ => unreachable!(),
        };
        let accepted = |c| v1::Observation {
            kind: Some(v1::observation::Kind::Accepted(c)),
        };
        let good = wire(Observation::Accepted(conn(None, None)));
        let cases = [
            (
                v1::ConnEvent {
                    src: Some(v1::SocketAddress {
                        ip: "10.0.0".into(),
                        port: 1,
                    }),
                    ..good.clone()
                },
                r#"src.ip "10.0.0" is not an IP address"#,
            ),
            (
                v1::ConnEvent {
                    dst: Some(v1::SocketAddress {
                        ip: "10.0.0.2".into(),
                        port: 70_000,
                    }),
                    ..good.clone()
                },
                "dst.port 70000 is above 65535",
            ),
            (
                v1::ConnEvent {
                    dst: None,
                    ..good.clone()
                },
                "dst is required",
            ),
            (
                v1::ConnEvent {
                    time_unix_nanos: 0,
                    ..good.clone()
                },
                "time_unix_nanos is required",
            ),
            (
                v1::ConnEvent {
                    time_unix_nanos: u64::MAX,
                    ..good.clone()
                },
                "time_unix_nanos 18446744073709551615 is beyond the year 2262",
            ),
            (
                v1::ConnEvent { close: 9, ..good },
                "close 9 is not a CloseKind",
            ),
        ];
        for (c, message) in cases {
            let err = Observation::try_from(accepted(c)).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert_eq!(
            Observation::try_from(v1::Observation { kind: None }).unwrap_err(),
            BadObservation::NoKind
        );
        let unspecified = v1::Observation {
            kind: Some(v1::observation::Kind::RulesRemoved(v1::RulesChange {
                endpoint: Some(v1::SocketAddress {
                    ip: "10.0.0.2".into(),
                    port: 80,
                }),
                detector: v1::Detector::Unspecified as i32,
                time_unix_nanos: 5,
                precision_ns: 0,
            })),
        };
        assert_eq!(
            Observation::try_from(unspecified).unwrap_err().to_string(),
            "detector 0 is not a known Detector"
        );
    }

    #[test]
    fn reset_causes_come_from_the_kernel_reason() {
        let cause = |r| conn(None, r).reset_cause();
        assert_eq!(cause(Some("NO_SOCKET")), ResetCause::Refused);
        assert_eq!(cause(Some("no_socket")), ResetCause::Refused);
        assert_eq!(cause(Some("TCP_ABORT_ON_DATA")), ResetCause::DataAfterClose);
        assert_eq!(
            cause(Some("TCP_TIMEWAIT_SOCKET")),
            ResetCause::DataAfterClose
        );
        assert_eq!(cause(Some("NOT_SPECIFIED")), ResetCause::Other);
        assert_eq!(cause(None), ResetCause::Other);
    }

    #[test]
    fn detector_names_round_trip() {
        for d in Detector::ALL {
            assert_eq!(d.as_str().parse::<Detector>(), Ok(d));
            assert_eq!(
                serde_json::to_value(d).unwrap(),
                serde_json::Value::from(d.as_str())
            );
        }
        assert_eq!(
            "ipvs".parse::<Detector>().unwrap_err().to_string(),
            r#"unknown detector "ipvs" (known: nftables, iptables_nft, iptables_legacy, cilium)"#
        );
    }

    #[test]
    fn the_json_form_is_the_observe_line_format() {
        let v =
            serde_json::to_value(Observation::ResetSent(conn(None, Some("NO_SOCKET")))).unwrap();
        assert_eq!(v["kind"], "reset_sent");
        assert_eq!(v["src"], "10.0.0.1:4000");
        assert_eq!(v["dst"], "[fd00::2]:80");
        assert_eq!(v["time_unix_nano"], 1_700_000_000_000_000_007_i64);
        assert_eq!(v["reason"], "NO_SOCKET");
        assert!(v.get("close").is_none());
        for o in every_kind() {
            assert_eq!(serde_json::to_value(&o).unwrap()["kind"], o.kind_name());
        }
    }
}
