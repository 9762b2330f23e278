//! The endpoint of a terminating pod, as the aggregator announces it and an
//! agent watches it: typed on both sides, and converted to and from its wire
//! form ([`v1::WatchedEndpoint`]) here only.

use std::net::IpAddr;

use crate::{UnixNanos, v1};

/// One pod whose deletion started, with the addresses agents must watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    /// Services whose EndpointSlices listed the pod.
    pub services: Vec<String>,
    pub ip: IpAddr,
    pub ports: Vec<u16>,
    /// T0, the deletion's start, by the aggregator's clock.
    pub deletion_start: UnixNanos,
    pub grace_period_seconds: Option<i64>,
}

/// A wire endpoint that does not decode; names the pod and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("endpoint of pod {namespace}/{pod_name}: {problem}")]
pub struct BadEndpoint {
    pub namespace: String,
    pub pod_name: String,
    pub problem: String,
}

impl From<Endpoint> for v1::WatchedEndpoint {
    fn from(e: Endpoint) -> Self {
        v1::WatchedEndpoint {
            pod_uid: e.pod_uid,
            namespace: e.namespace,
            pod_name: e.pod_name,
            services: e.services,
            ip: e.ip.to_string(),
            ports: e.ports.into_iter().map(u32::from).collect(),
            // Wall-clock times since 1970: never before the epoch.
            deletion_start_unix_nanos: e.deletion_start.to_wire().unwrap_or_default(),
            grace_period_seconds: e.grace_period_seconds,
        }
    }
}

impl TryFrom<v1::WatchedEndpoint> for Endpoint {
    type Error = BadEndpoint;

    fn try_from(e: v1::WatchedEndpoint) -> Result<Self, BadEndpoint> {
        let bad = |problem: String| BadEndpoint {
            namespace: e.namespace.clone(),
            pod_name: e.pod_name.clone(),
            problem,
        };
        let (ip, ports) = address(&e.ip, &e.ports).map_err(bad)?;
        let deletion_start =
            wire_time("deletion_start_unix_nanos", e.deletion_start_unix_nanos).map_err(bad)?;
        Ok(Endpoint {
            pod_uid: e.pod_uid,
            namespace: e.namespace,
            pod_name: e.pod_name,
            services: e.services,
            ip,
            ports,
            deletion_start,
            grace_period_seconds: e.grace_period_seconds,
        })
    }
}

/// A watched endpoint's address and ports from the wire; the problem
/// names the field and the value.
pub(crate) fn address(ip: &str, ports: &[u32]) -> Result<(IpAddr, Vec<u16>), String> {
    let ip = ip
        .parse()
        .map_err(|_| format!("ip {ip:?} is not an IP address"))?;
    let ports = ports
        .iter()
        .map(|&p| u16::try_from(p).map_err(|_| format!("port {p} is above 65535")))
        .collect::<Result<_, _>>()?;
    Ok((ip, ports))
}

/// A time of a watched endpoint from the wire.
pub(crate) fn wire_time(field: &str, nanos: u64) -> Result<UnixNanos, String> {
    UnixNanos::from_wire(nanos).ok_or_else(|| format!("{field} {nanos} is beyond the year 2262"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            pod_uid: "u1".into(),
            namespace: "shop".into(),
            pod_name: "web-1".into(),
            services: vec!["web".into()],
            ip: "fd00::5".parse().unwrap(),
            ports: vec![80, 8443],
            deletion_start: UnixNanos::from_nanos(1_700_000_000_123_456_789),
            grace_period_seconds: Some(30),
        }
    }

    #[test]
    fn an_endpoint_survives_the_wire() {
        for grace in [Some(30), Some(0), None] {
            let sent = Endpoint {
                grace_period_seconds: grace,
                ..endpoint()
            };
            let wire = v1::WatchedEndpoint::from(sent.clone());
            assert_eq!(wire.ip, "fd00::5");
            assert_eq!(Endpoint::try_from(wire), Ok(sent));
        }
    }

    #[test]
    fn a_bad_address_or_port_names_the_pod_and_the_field() {
        let wire = v1::WatchedEndpoint::from(endpoint());
        let err = Endpoint::try_from(v1::WatchedEndpoint {
            ip: "10.0.0".into(),
            ..wire.clone()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"endpoint of pod shop/web-1: ip "10.0.0" is not an IP address"#
        );
        let err = Endpoint::try_from(v1::WatchedEndpoint {
            ports: vec![80, 70_000],
            ..wire
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoint of pod shop/web-1: port 70000 is above 65535"
        );
        let err = Endpoint::try_from(v1::WatchedEndpoint {
            deletion_start_unix_nanos: u64::MAX,
            ..v1::WatchedEndpoint::from(endpoint())
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoint of pod shop/web-1: deletion_start_unix_nanos 18446744073709551615 is beyond the year 2262"
        );
    }
}
