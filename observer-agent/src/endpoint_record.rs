//! Per watched endpoint, what this node's dataplane did with it after its
//! deletion started: when the rules stopped selecting it, and the new
//! connections this node still sent it afterwards (and from where). Built
//! from [`Observation`]s; the aggregator report carries these records.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::observation::{Detector, Observation, UnixNanos};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointRecord {
    pub endpoint: SocketAddr,
    /// When the deletion started (from the control plane; the watch time when
    /// nothing better is known). Flows after it are "late".
    pub deletion_started_unix_nano: UnixNanos,
    /// First time this agent saw the endpoint become a NAT target.
    pub first_seen_in_rules_unix_nano: Option<UnixNanos>,
    /// The latest time the rules stopped selecting it (cleared if re-added).
    pub rules_removed_unix_nano: Option<UnixNanos>,
    pub rules_removed_detector: Option<Detector>,
    pub rules_removed_precision_ns: Option<u64>,
    /// The last new flow routed to it after the deletion started.
    pub last_new_flow_unix_nano: Option<UnixNanos>,
    pub late_flows: u64,
    /// Late flows per local source address (a pod or the node).
    pub late_sources: BTreeMap<IpAddr, u64>,
}

impl EndpointRecord {
    fn new(endpoint: SocketAddr, deletion_started_unix_nano: UnixNanos) -> Self {
        EndpointRecord {
            endpoint,
            deletion_started_unix_nano,
            first_seen_in_rules_unix_nano: None,
            rules_removed_unix_nano: None,
            rules_removed_detector: None,
            rules_removed_precision_ns: None,
            last_new_flow_unix_nano: None,
            late_flows: 0,
            late_sources: BTreeMap::new(),
        }
    }

    /// When this node stopped sending new connections there: the later of the
    /// rule removal and the last late flow (None while still selected).
    pub fn propagated_unix_nano(&self) -> Option<UnixNanos> {
        let removed = self.rules_removed_unix_nano?;
        Some(removed.max(self.last_new_flow_unix_nano.unwrap_or(0)))
    }
}

/// The records of every watched endpoint.
#[derive(Debug, Default)]
pub struct EndpointRecords {
    records: HashMap<SocketAddr, EndpointRecord>,
}

impl EndpointRecords {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or restarts the deletion time of) a record.
    pub fn watch(&mut self, endpoint: SocketAddr, deletion_started_unix_nano: UnixNanos) {
        self.records
            .entry(endpoint)
            .and_modify(|r| r.deletion_started_unix_nano = deletion_started_unix_nano)
            .or_insert_with(|| EndpointRecord::new(endpoint, deletion_started_unix_nano));
    }

    /// Ends a record and hands it back (for the final report).
    pub fn unwatch(&mut self, endpoint: &SocketAddr) -> Option<EndpointRecord> {
        self.records.remove(endpoint)
    }

    pub fn get(&self, endpoint: &SocketAddr) -> Option<&EndpointRecord> {
        self.records.get(endpoint)
    }

    pub fn iter(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.records.values()
    }

    /// Updates the record the observation concerns; others are ignored.
    pub fn observe(&mut self, obs: &Observation) {
        match obs {
            Observation::RulesRemoved(c) => {
                if let Some(r) = self.records.get_mut(&c.endpoint) {
                    r.rules_removed_unix_nano = Some(c.time_unix_nano);
                    r.rules_removed_detector = Some(c.detector);
                    r.rules_removed_precision_ns = Some(c.precision_ns);
                }
            }
            Observation::RulesAdded(c) => {
                if let Some(r) = self.records.get_mut(&c.endpoint) {
                    r.first_seen_in_rules_unix_nano
                        .get_or_insert(c.time_unix_nano);
                    r.rules_removed_unix_nano = None;
                    r.rules_removed_detector = None;
                    r.rules_removed_precision_ns = None;
                }
            }
            Observation::NewFlow(f) => {
                if let Some(r) = self.records.get_mut(&f.dst)
                    && f.time_unix_nano >= r.deletion_started_unix_nano
                {
                    r.late_flows += 1;
                    *r.late_sources.entry(f.src.ip()).or_default() += 1;
                    r.last_new_flow_unix_nano = Some(
                        r.last_new_flow_unix_nano
                            .map_or(f.time_unix_nano, |t| t.max(f.time_unix_nano)),
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::{NewFlow, RulesChange};

    fn ep() -> SocketAddr {
        "10.180.0.2:8080".parse().unwrap()
    }

    fn flow(src: &str, t: u64) -> Observation {
        Observation::NewFlow(NewFlow {
            src: src.parse().unwrap(),
            dst: ep(),
            original_dst: "172.30.0.10:80".parse().unwrap(),
            time_unix_nano: t,
        })
    }

    fn change(t: u64) -> RulesChange {
        RulesChange {
            endpoint: ep(),
            detector: Detector::Nftables,
            time_unix_nano: t,
            precision_ns: 1000,
        }
    }

    #[test]
    fn counts_only_flows_after_the_deletion_started() {
        let mut records = EndpointRecords::new();
        records.watch(ep(), 100);
        records.observe(&flow("10.0.0.5:1000", 50));
        records.observe(&flow("10.0.0.5:1001", 150));
        records.observe(&flow("10.0.0.6:1002", 120));
        records.observe(&Observation::RulesRemoved(change(130)));
        let r = records.get(&ep()).unwrap();
        assert_eq!(r.late_flows, 2);
        assert_eq!(r.last_new_flow_unix_nano, Some(150));
        assert_eq!(r.late_sources.len(), 2);
        assert_eq!(r.rules_removed_unix_nano, Some(130));
        assert_eq!(r.propagated_unix_nano(), Some(150));
    }

    #[test]
    fn re_adding_clears_the_removal_and_unwatched_endpoints_are_ignored() {
        let mut records = EndpointRecords::new();
        records.observe(&Observation::RulesRemoved(change(10)));
        assert!(records.get(&ep()).is_none());
        records.watch(ep(), 0);
        records.observe(&Observation::RulesAdded(change(5)));
        records.observe(&Observation::RulesRemoved(change(10)));
        records.observe(&Observation::RulesAdded(change(20)));
        let r = records.unwatch(&ep()).unwrap();
        assert_eq!(r.first_seen_in_rules_unix_nano, Some(5));
        assert_eq!(r.rules_removed_unix_nano, None);
        assert_eq!(r.propagated_unix_nano(), None);
    }
}
