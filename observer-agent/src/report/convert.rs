//! Observation -> protocol message.

use std::net::SocketAddr;

use observer_proto::v1 as pb;

use crate::observation::{CloseKind, ConnObservation, Detector, Observation};

fn addr(a: SocketAddr) -> Option<pb::SocketAddress> {
    Some(pb::SocketAddress {
        ip: a.ip().to_string(),
        port: u32::from(a.port()),
    })
}

fn conn(c: &ConnObservation) -> pb::ConnEvent {
    pb::ConnEvent {
        src: addr(c.src),
        dst: addr(c.dst),
        time_unix_nanos: c.time_unix_nano,
        close: match c.close {
            None => pb::CloseKind::Unspecified,
            Some(CloseKind::EndpointFin) => pb::CloseKind::EndpointFin,
            Some(CloseKind::PeerFin) => pb::CloseKind::PeerFin,
            Some(CloseKind::Reset) => pb::CloseKind::Reset,
        } as i32,
        reason: c.reason.clone().unwrap_or_default(),
    }
}

fn detector(d: Detector) -> pb::Detector {
    match d {
        Detector::Nftables => pb::Detector::Nftables,
        Detector::IptablesNft => pb::Detector::IptablesNft,
        Detector::IptablesLegacy => pb::Detector::IptablesLegacy,
    }
}

pub fn observation(o: &Observation) -> pb::Observation {
    use pb::observation::Kind;
    let rules = |r: &crate::observation::RulesChange| pb::RulesChange {
        endpoint: addr(r.endpoint),
        detector: detector(r.detector) as i32,
        time_unix_nanos: r.time_unix_nano,
        precision_ns: r.precision_ns,
    };
    let kind = match o {
        Observation::Accepted(c) => Kind::Accepted(conn(c)),
        Observation::Connected(c) => Kind::Connected(conn(c)),
        Observation::Closed(c) => Kind::Closed(conn(c)),
        Observation::ResetSent(c) => Kind::ResetSent(conn(c)),
        Observation::ResetReceived(c) => Kind::ResetReceived(conn(c)),
        Observation::RulesRemoved(r) => Kind::RulesRemoved(rules(r)),
        Observation::RulesAdded(r) => Kind::RulesAdded(rules(r)),
        Observation::NewFlow(f) => Kind::NewFlow(pb::NewFlow {
            src: addr(f.src),
            dst: addr(f.dst),
            original_dst: addr(f.original_dst),
            time_unix_nanos: f.time_unix_nano,
        }),
    };
    pb::Observation { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::{NewFlow, RulesChange};

    #[test]
    fn converts_every_field() {
        let c = ConnObservation {
            src: "10.0.0.1:4000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            time_unix_nano: 7,
            close: Some(CloseKind::Reset),
            reason: Some("NOT_SPECIFIED".into()),
            old_state: Some("TCP_ESTABLISHED"),
            new_state: Some("TCP_CLOSE"),
        };
        let pb::Observation {
            kind: Some(pb::observation::Kind::Closed(e)),
        } = observation(&Observation::Closed(c))
        else {
            panic!("wrong kind");
        };
        assert_eq!(e.src.unwrap().port, 4000);
        assert_eq!(e.dst.unwrap().ip, "10.0.0.2");
        assert_eq!(e.close, pb::CloseKind::Reset as i32);
        assert_eq!((e.time_unix_nanos, e.reason.as_str()), (7, "NOT_SPECIFIED"));

        let r = observation(&Observation::RulesRemoved(RulesChange {
            endpoint: "[fd00::1]:8080".parse().unwrap(),
            detector: Detector::IptablesLegacy,
            time_unix_nano: 9,
            precision_ns: 3,
        }));
        let Some(pb::observation::Kind::RulesRemoved(r)) = r.kind else {
            panic!("wrong kind");
        };
        assert_eq!(r.endpoint.unwrap().ip, "fd00::1");
        assert_eq!(r.detector, pb::Detector::IptablesLegacy as i32);
        assert_eq!(r.precision_ns, 3);

        let f = observation(&Observation::NewFlow(NewFlow {
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:2".parse().unwrap(),
            original_dst: "10.96.0.1:3".parse().unwrap(),
            time_unix_nano: 11,
        }));
        let Some(pb::observation::Kind::NewFlow(f)) = f.kind else {
            panic!("wrong kind");
        };
        assert_eq!(f.original_dst.unwrap().port, 3);
    }
}
