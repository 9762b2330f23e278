//! Which endpoints (IP:port) this agent watches, and the filter that
//! follows from it. The kernel filters conntrack events by watched address
//! only, so a new flow to another port of a watched address (or to an
//! address watched for its connections only, `observe --watch-ip`) reaches
//! user space and is dropped here, counted. Every other observation passes:
//! connection events are watched by address, and the dataplane detectors
//! report changes of watched endpoints only. What the observations mean for
//! a deletion is the aggregator's fold, not the agent's.

use std::{collections::HashMap, net::SocketAddr};

use observer_proto::Observation;
use tracing::debug;

#[derive(Debug, Default)]
pub struct WatchedSet {
    /// Watched endpoints, with how many watches name each (two terminating
    /// pods may share an endpoint when an address is reused).
    endpoints: HashMap<SocketAddr, usize>,
    flows_not_watched: u64,
}

impl WatchedSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one watch of `endpoint`; true when it was not watched before.
    pub fn watch(&mut self, endpoint: SocketAddr) -> bool {
        let count = self.endpoints.entry(endpoint).or_default();
        *count += 1;
        *count == 1
    }

    /// Ends one watch of `endpoint`; true when no watch of it is left.
    pub fn unwatch(&mut self, endpoint: SocketAddr) -> bool {
        let Some(count) = self.endpoints.get_mut(&endpoint) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.endpoints.remove(&endpoint);
        true
    }

    pub fn contains(&self, endpoint: &SocketAddr) -> bool {
        self.endpoints.contains_key(endpoint)
    }

    /// Whether `obs` is reported: false for a new flow whose destination
    /// after NAT (port included) is no watched endpoint, which is counted
    /// and logged at debug level.
    pub fn passes(&mut self, obs: &Observation) -> bool {
        let Observation::NewFlow(flow) = obs else {
            return true;
        };
        if self.contains(&flow.dst) {
            return true;
        }
        self.flows_not_watched += 1;
        debug!(
            dst = %flow.dst,
            src = %flow.src,
            dropped = self.flows_not_watched,
            "new flow to a watched address but no watched endpoint dropped"
        );
        false
    }

    /// New flows dropped by [`Self::passes`] so far.
    pub fn flows_not_watched(&self) -> u64 {
        self.flows_not_watched
    }
}

#[cfg(test)]
mod tests {
    use observer_proto::{ConnEvent, Detector, NewFlow, RulesChange, UnixNanos};

    use super::*;

    fn ep() -> SocketAddr {
        "10.180.0.2:8080".parse().unwrap()
    }

    fn flow_to(dst: SocketAddr) -> Observation {
        Observation::NewFlow(NewFlow {
            src: "10.0.0.5:1000".parse().unwrap(),
            dst,
            original_dst: "172.30.0.10:80".parse().unwrap(),
            time: UnixNanos::from_nanos(1),
        })
    }

    #[test]
    fn flows_pass_only_to_a_watched_endpoint_port_included() {
        let mut set = WatchedSet::new();
        assert!(set.watch(ep()));
        let other_port: SocketAddr = "10.180.0.2:9090".parse().unwrap();
        let other_ip: SocketAddr = "10.180.0.9:8080".parse().unwrap();
        assert!(set.passes(&flow_to(ep())));
        assert!(
            !set.passes(&flow_to(other_port)),
            "same address, another port"
        );
        assert!(
            !set.passes(&flow_to(other_ip)),
            "same port, another address"
        );
        assert_eq!(set.flows_not_watched(), 2);
        assert!(set.unwatch(ep()));
        assert!(!set.passes(&flow_to(ep())), "no longer watched");
        assert_eq!(set.flows_not_watched(), 3);
    }

    #[test]
    fn other_observations_always_pass() {
        let mut set = WatchedSet::new();
        let elsewhere: SocketAddr = "10.180.0.2:9090".parse().unwrap();
        let time = UnixNanos::from_nanos(1);
        let conn = ConnEvent {
            src: "10.0.0.5:4".parse().unwrap(),
            dst: elsewhere,
            time,
            close: None,
            reason: None,
        };
        let rules = RulesChange {
            endpoint: elsewhere,
            detector: Detector::Nftables,
            time,
            precision_ns: 1,
        };
        for obs in [
            Observation::Accepted(conn.clone()),
            Observation::ResetSent(conn),
            Observation::RulesRemoved(rules.clone()),
            Observation::RulesAdded(rules),
        ] {
            assert!(set.passes(&obs), "{obs:?}");
        }
        assert_eq!(set.flows_not_watched(), 0);
    }

    #[test]
    fn an_endpoint_stays_watched_while_any_watch_names_it() {
        let mut set = WatchedSet::new();
        assert!(set.watch(ep()));
        assert!(!set.watch(ep()), "already watched");
        assert!(!set.unwatch(ep()), "one watch left");
        assert!(set.passes(&flow_to(ep())));
        assert!(set.unwatch(ep()));
        assert!(!set.contains(&ep()));
        assert!(!set.unwatch(ep()), "not watched: nothing to end");
    }
}
