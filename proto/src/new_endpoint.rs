//! The endpoint of a pod that just became ready, as the aggregator
//! announces it for its startup window and an agent watches it: typed on
//! both sides, converted to and from its wire form ([`v1::NewEndpoint`])
//! here only.

use std::net::IpAddr;

use crate::endpoint::{address, wire_time};
use crate::{BadEndpoint, UnixNanos, v1};

/// One pod whose endpoint became ready, with the addresses agents watch
/// until its startup window ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEndpoint {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    /// Services whose EndpointSlices list the pod ready.
    pub services: Vec<String>,
    pub ip: IpAddr,
    pub ports: Vec<u16>,
    /// T_ready: the aggregator's receipt of the EndpointSlice change that
    /// showed the endpoint ready.
    pub ready: UnixNanos,
}

impl From<NewEndpoint> for v1::NewEndpoint {
    fn from(e: NewEndpoint) -> Self {
        v1::NewEndpoint {
            pod_uid: e.pod_uid,
            namespace: e.namespace,
            pod_name: e.pod_name,
            services: e.services,
            ip: e.ip.to_string(),
            ports: e.ports.into_iter().map(u32::from).collect(),
            // Wall-clock times since 1970: never before the epoch.
            ready_unix_nanos: e.ready.to_wire().unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::NewEndpoint> for NewEndpoint {
    type Error = BadEndpoint;

    fn try_from(e: v1::NewEndpoint) -> Result<Self, BadEndpoint> {
        let bad = |problem: String| BadEndpoint {
            namespace: e.namespace.clone(),
            pod_name: e.pod_name.clone(),
            problem,
        };
        let (ip, ports) = address(&e.ip, &e.ports).map_err(bad)?;
        if e.ready_unix_nanos == 0 {
            return Err(bad("ready_unix_nanos is required".into()));
        }
        let ready = wire_time("ready_unix_nanos", e.ready_unix_nanos).map_err(bad)?;
        Ok(NewEndpoint {
            pod_uid: e.pod_uid,
            namespace: e.namespace,
            pod_name: e.pod_name,
            services: e.services,
            ip,
            ports,
            ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> NewEndpoint {
        NewEndpoint {
            pod_uid: "u1".into(),
            namespace: "shop".into(),
            pod_name: "web-2".into(),
            services: vec!["web".into()],
            ip: "10.244.1.9".parse().unwrap(),
            ports: vec![8080],
            ready: UnixNanos::from_nanos(1_700_000_000_123_456_789),
        }
    }

    #[test]
    fn a_new_endpoint_survives_the_wire() {
        let wire = v1::NewEndpoint::from(endpoint());
        assert_eq!(wire.ip, "10.244.1.9");
        assert_eq!(NewEndpoint::try_from(wire), Ok(endpoint()));
    }

    #[test]
    fn a_bad_field_names_the_pod_the_field_and_the_value() {
        let wire = v1::NewEndpoint::from(endpoint());
        let cases = [
            (
                v1::NewEndpoint {
                    ip: "10.244.1".into(),
                    ..wire.clone()
                },
                r#"endpoint of pod shop/web-2: ip "10.244.1" is not an IP address"#,
            ),
            (
                v1::NewEndpoint {
                    ports: vec![65_536],
                    ..wire.clone()
                },
                "endpoint of pod shop/web-2: port 65536 is above 65535",
            ),
            (
                v1::NewEndpoint {
                    ready_unix_nanos: 0,
                    ..wire.clone()
                },
                "endpoint of pod shop/web-2: ready_unix_nanos is required",
            ),
            (
                v1::NewEndpoint {
                    ready_unix_nanos: u64::MAX,
                    ..wire
                },
                "endpoint of pod shop/web-2: ready_unix_nanos 18446744073709551615 is beyond the year 2262",
            ),
        ];
        for (wire, message) in cases {
            assert_eq!(
                NewEndpoint::try_from(wire).unwrap_err().to_string(),
                message
            );
        }
    }
}
