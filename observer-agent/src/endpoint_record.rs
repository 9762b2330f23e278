//! Per watched endpoint, what this node's dataplane did with it: when the
//! agent first saw it as a NAT target, when the rules stopped selecting it,
//! and the new connections this node still sent it after its deletion
//! started (how many, the last one, and from which local source).
//!
//! Built from the agent's [`Observation`]s and the dataplane's
//! [`RulesPresence`] at the start of a watch. `observer-agent run` keeps them
//! live and serves them as JSON on its health server (`GET /endpoints`);
//! `observer-agent observe` prints one `endpoint_record` per endpoint when it
//! stops. They are not sent to the aggregator yet: the protocol carries the
//! observations themselves, from which the aggregator builds its own view
//! (wiring these records into the report is another issue's work).
//!
//! The records also decide which new flows are reported at all: the kernel
//! filters conntrack events by watched address only, so a flow to another
//! port of a watched address (or to an address watched for its connections
//! only, `observe --watch-ip`) reaches user space and is dropped here.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;
use tracing::debug;

use crate::{
    dataplane::RulesPresence,
    observation::{Detector, NewFlow, Observation, UnixNanos},
};

/// Finished records kept for `GET /endpoints` after their watch ended.
pub const FINISHED_KEPT: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointRecord {
    pub endpoint: SocketAddr,
    /// When the deletion started: the aggregator's T0 in `run` (its clock,
    /// not this node's), the start of the command in `observe`. Flows at or
    /// after it are "late".
    pub deletion_started_unix_nano: UnixNanos,
    /// When this agent first saw the endpoint as a NAT target (None: never,
    /// for example removed more than 15 minutes before the watch).
    pub first_seen_in_rules_unix_nano: Option<UnixNanos>,
    /// The endpoint was already a target when the agent's detectors
    /// started; `first_seen_in_rules_unix_nano` is that start, not the
    /// moment the rules added it.
    pub in_rules_at_agent_start: bool,
    /// The latest time the rules stopped selecting it (cleared if re-added).
    pub rules_removed_unix_nano: Option<UnixNanos>,
    pub rules_removed_detector: Option<Detector>,
    pub rules_removed_precision_ns: Option<u64>,
    /// The last new flow routed to it at or after the deletion start, and
    /// its source.
    pub last_new_flow_unix_nano: Option<UnixNanos>,
    pub last_new_flow_src: Option<SocketAddr>,
    /// New flows at or after the deletion start.
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
            in_rules_at_agent_start: false,
            rules_removed_unix_nano: None,
            rules_removed_detector: None,
            rules_removed_precision_ns: None,
            last_new_flow_unix_nano: None,
            last_new_flow_src: None,
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

    fn seen_in_rules(&mut self, time: UnixNanos, at_start: bool) {
        if self
            .first_seen_in_rules_unix_nano
            .is_none_or(|first| time < first)
        {
            self.first_seen_in_rules_unix_nano = Some(time);
            self.in_rules_at_agent_start = at_start;
        }
    }

    fn new_flow(&mut self, f: &NewFlow) {
        if f.time_unix_nano < self.deletion_started_unix_nano {
            return;
        }
        self.late_flows += 1;
        *self.late_sources.entry(f.src.ip()).or_default() += 1;
        if self
            .last_new_flow_unix_nano
            .is_none_or(|last| f.time_unix_nano >= last)
        {
            self.last_new_flow_unix_nano = Some(f.time_unix_nano);
            self.last_new_flow_src = Some(f.src);
        }
    }
}

/// What `GET /endpoints` serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Records of the endpoints watched now, by endpoint.
    pub watched: Vec<EndpointRecord>,
    /// Records whose watch ended, oldest first (the last [`FINISHED_KEPT`]).
    pub finished: Vec<EndpointRecord>,
    /// New flows to a watched address but no watched endpoint, dropped.
    pub flows_not_watched: u64,
}

/// The records of every watched endpoint, and the last finished ones.
#[derive(Debug, Default)]
pub struct EndpointRecords {
    records: HashMap<SocketAddr, EndpointRecord>,
    finished: VecDeque<EndpointRecord>,
    flows_not_watched: u64,
}

impl EndpointRecords {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or restarts the deletion time of) a record. `presence` is
    /// what the dataplane knew when the watch started
    /// ([`crate::dataplane::DataplaneWatch::watch`]): it fills "first seen
    /// in rules" for an endpoint that already was a target.
    pub fn watch(
        &mut self,
        endpoint: SocketAddr,
        deletion_started_unix_nano: UnixNanos,
        presence: Option<RulesPresence>,
    ) {
        let record = self
            .records
            .entry(endpoint)
            .and_modify(|r| r.deletion_started_unix_nano = deletion_started_unix_nano)
            .or_insert_with(|| EndpointRecord::new(endpoint, deletion_started_unix_nano));
        if let Some(p) = presence {
            record.seen_in_rules(p.first_seen_unix_nano, p.at_start);
        }
    }

    /// Ends a record, keeps it among the finished ones and hands it back.
    pub fn unwatch(&mut self, endpoint: &SocketAddr) -> Option<EndpointRecord> {
        let record = self.records.remove(endpoint)?;
        if self.finished.len() == FINISHED_KEPT {
            self.finished.pop_front();
        }
        self.finished.push_back(record.clone());
        Some(record)
    }

    pub fn get(&self, endpoint: &SocketAddr) -> Option<&EndpointRecord> {
        self.records.get(endpoint)
    }

    /// The records of the endpoints watched now, by endpoint.
    pub fn watched(&self) -> Vec<EndpointRecord> {
        let mut records: Vec<EndpointRecord> = self.records.values().cloned().collect();
        records.sort_by_key(|r| r.endpoint);
        records
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            watched: self.watched(),
            finished: self.finished.iter().cloned().collect(),
            flows_not_watched: self.flows_not_watched,
        }
    }

    /// Whether a new flow is reported: only when its destination after NAT
    /// (the reply tuple's source, `dst`) is a watched endpoint, port
    /// included.
    pub fn reports_flow(&self, flow: &NewFlow) -> bool {
        self.records.contains_key(&flow.dst)
    }

    /// Updates the record the observation concerns. Returns false for a new
    /// flow to no watched endpoint, which the caller drops (counted, logged
    /// at debug level); every other observation is kept, even when it
    /// concerns no record (connection events are watched by address).
    pub fn observe(&mut self, obs: &Observation) -> bool {
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
                    r.seen_in_rules(c.time_unix_nano, false);
                    r.rules_removed_unix_nano = None;
                    r.rules_removed_detector = None;
                    r.rules_removed_precision_ns = None;
                }
            }
            Observation::NewFlow(f) => match self.records.get_mut(&f.dst) {
                Some(r) => r.new_flow(f),
                None => {
                    self.flows_not_watched += 1;
                    debug!(
                        dst = %f.dst,
                        src = %f.src,
                        dropped = self.flows_not_watched,
                        "new flow to a watched address but no watched endpoint dropped"
                    );
                    return false;
                }
            },
            _ => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::RulesChange;

    fn ep() -> SocketAddr {
        "10.180.0.2:8080".parse().unwrap()
    }

    fn flow_to(dst: SocketAddr, src: &str, t: u64) -> Observation {
        Observation::NewFlow(NewFlow {
            src: src.parse().unwrap(),
            dst,
            original_dst: "172.30.0.10:80".parse().unwrap(),
            time_unix_nano: t,
        })
    }

    fn flow(src: &str, t: u64) -> Observation {
        flow_to(ep(), src, t)
    }

    fn change(t: u64) -> RulesChange {
        RulesChange {
            endpoint: ep(),
            detector: Detector::Nftables,
            time_unix_nano: t,
            precision_ns: 1000,
        }
    }

    fn presence(t: u64, at_start: bool) -> Option<RulesPresence> {
        Some(RulesPresence {
            first_seen_unix_nano: t,
            at_start,
            selected: true,
        })
    }

    #[test]
    fn counts_only_flows_after_the_deletion_started() {
        let mut records = EndpointRecords::new();
        records.watch(ep(), 100, None);
        assert!(records.observe(&flow("10.0.0.5:1000", 50)));
        assert!(records.observe(&flow("10.0.0.5:1001", 150)));
        assert!(records.observe(&flow("10.0.0.6:1002", 120)));
        assert!(records.observe(&Observation::RulesRemoved(change(130))));
        let r = records.get(&ep()).unwrap();
        assert_eq!(r.late_flows, 2);
        assert_eq!(r.last_new_flow_unix_nano, Some(150));
        assert_eq!(r.last_new_flow_src, Some("10.0.0.5:1001".parse().unwrap()));
        assert_eq!(
            r.late_sources,
            BTreeMap::from([
                ("10.0.0.5".parse().unwrap(), 1),
                ("10.0.0.6".parse().unwrap(), 1)
            ])
        );
        assert_eq!(r.rules_removed_unix_nano, Some(130));
        assert_eq!(r.propagated_unix_nano(), Some(150));
    }

    #[test]
    fn re_adding_clears_the_removal_and_unwatched_endpoints_are_ignored() {
        let mut records = EndpointRecords::new();
        records.observe(&Observation::RulesRemoved(change(10)));
        assert!(records.get(&ep()).is_none());
        records.watch(ep(), 0, None);
        records.observe(&Observation::RulesAdded(change(5)));
        records.observe(&Observation::RulesRemoved(change(10)));
        records.observe(&Observation::RulesAdded(change(20)));
        let r = records.unwatch(&ep()).unwrap();
        assert_eq!(r.first_seen_in_rules_unix_nano, Some(5));
        assert!(!r.in_rules_at_agent_start);
        assert_eq!(r.rules_removed_unix_nano, None);
        assert_eq!(r.propagated_unix_nano(), None);
    }

    #[test]
    fn presence_at_the_watch_fills_first_seen_without_an_event() {
        let mut records = EndpointRecords::new();
        records.watch(ep(), 500, presence(100, true));
        let r = records.get(&ep()).unwrap();
        assert_eq!(r.first_seen_in_rules_unix_nano, Some(100));
        assert!(r.in_rules_at_agent_start);
        assert_eq!(r.rules_removed_unix_nano, None);
        // A later re-add keeps the first sighting.
        records.observe(&Observation::RulesRemoved(change(600)));
        records.observe(&Observation::RulesAdded(change(700)));
        let r = records.get(&ep()).unwrap();
        assert_eq!(r.first_seen_in_rules_unix_nano, Some(100));
        assert!(r.in_rules_at_agent_start);
        // Never seen: stays empty until an addition is observed.
        let other: SocketAddr = "10.180.0.3:8080".parse().unwrap();
        records.watch(other, 500, None);
        assert_eq!(
            records.get(&other).unwrap().first_seen_in_rules_unix_nano,
            None
        );
        // An earlier sighting given at a re-watch wins.
        records.watch(other, 500, presence(300, false));
        records.watch(other, 500, presence(400, true));
        let r = records.get(&other).unwrap();
        assert_eq!(r.first_seen_in_rules_unix_nano, Some(300));
        assert!(!r.in_rules_at_agent_start);
    }

    #[test]
    fn flows_to_other_ports_of_a_watched_address_are_not_reported() {
        let mut records = EndpointRecords::new();
        records.watch(ep(), 0, None);
        let other_port: SocketAddr = "10.180.0.2:9090".parse().unwrap();
        let other_ip: SocketAddr = "10.180.0.9:8080".parse().unwrap();
        let decision = |dst| {
            records.reports_flow(&NewFlow {
                src: "10.0.0.5:1".parse().unwrap(),
                dst,
                original_dst: "172.30.0.10:80".parse().unwrap(),
                time_unix_nano: 1,
            })
        };
        assert!(decision(ep()));
        assert!(!decision(other_port), "same address, another port");
        assert!(!decision(other_ip), "same port, another address");
        assert!(!records.observe(&flow_to(other_port, "10.0.0.5:1", 10)));
        assert!(!records.observe(&flow_to(other_ip, "10.0.0.5:2", 11)));
        assert!(records.observe(&flow("10.0.0.5:3", 12)));
        let snapshot = records.snapshot();
        assert_eq!(snapshot.flows_not_watched, 2);
        assert_eq!(snapshot.watched[0].late_flows, 1);
        // Connection events are watched by address: always kept.
        let conn = Observation::Accepted(crate::observation::ConnObservation {
            src: "10.0.0.5:4".parse().unwrap(),
            dst: other_port,
            time_unix_nano: 13,
            close: None,
            reason: None,
            old_state: None,
            new_state: None,
        });
        assert!(records.observe(&conn));
        // Once unwatched, flows to the endpoint are dropped too.
        records.unwatch(&ep());
        assert!(!records.observe(&flow("10.0.0.5:5", 14)));
    }

    #[test]
    fn finished_records_are_kept_and_bounded() {
        let mut records = EndpointRecords::new();
        for port in 0..(FINISHED_KEPT as u16 + 2) {
            let e = SocketAddr::new(ep().ip(), port);
            records.watch(e, 0, None);
            assert_eq!(records.unwatch(&e).unwrap().endpoint, e);
        }
        let snapshot = records.snapshot();
        assert!(snapshot.watched.is_empty());
        assert_eq!(snapshot.finished.len(), FINISHED_KEPT);
        assert_eq!(snapshot.finished[0].endpoint.port(), 2, "oldest dropped");
        assert_eq!(records.unwatch(&ep()), None);
    }

    #[test]
    fn serializes_with_string_keys() {
        let mut records = EndpointRecords::new();
        records.watch(ep(), 0, presence(1, true));
        records.observe(&flow("10.0.0.5:1000", 5));
        let v = serde_json::to_value(records.snapshot()).unwrap();
        let r = &v["watched"][0];
        assert_eq!(r["endpoint"], "10.180.0.2:8080");
        assert_eq!(r["first_seen_in_rules_unix_nano"], 1);
        assert_eq!(r["in_rules_at_agent_start"], true);
        assert_eq!(r["late_sources"]["10.0.0.5"], 1);
        assert_eq!(r["last_new_flow_src"], "10.0.0.5:1000");
        assert_eq!(r["rules_removed_unix_nano"], serde_json::Value::Null);
    }
}
