//! A batch of observations as an agent reports it, typed, with the clock
//! estimate and counters it carries; converted to and from its wire form
//! ([`v1::ReportRequest`]) here only.

use crate::{BadObservation, Observation, UnixNanos, v1};

/// Result of an agent's latest clock exchange: add `offset_ns` to an agent
/// timestamp to get aggregator time; the true offset lies within
/// +- `uncertainty_ns` (half the round trip, the part of the exchange whose
/// asymmetry cannot be known).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockEstimate {
    pub offset_ns: i64,
    pub uncertainty_ns: u64,
}

impl ClockEstimate {
    /// One NTP-style exchange. t1: agent sends, t2: aggregator receives,
    /// t3: aggregator replies, t4: agent receives (t1, t4 agent clock; t2,
    /// t3 aggregator clock).
    pub fn from_exchange(t1: UnixNanos, t2: UnixNanos, t3: UnixNanos, t4: UnixNanos) -> Self {
        let [t1, t2, t3, t4] = [t1, t2, t3, t4].map(|t| i128::from(t.as_nanos()));
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        let round_trip = ((t4 - t1) - (t3 - t2)).max(0);
        ClockEstimate {
            offset_ns: offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            uncertainty_ns: u64::try_from(round_trip / 2).unwrap_or(u64::MAX),
        }
    }

    /// An agent's time on the aggregator's clock.
    pub fn to_aggregator(self, agent_time: UnixNanos) -> UnixNanos {
        agent_time + self.offset_ns
    }
}

/// Cumulative since the agent process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Kernel events lost before the agent read them (ring buffer full,
    /// conntrack netlink socket overflow): a gap in the node's evidence.
    pub events_lost: u64,
    /// Observations the agent dropped while the aggregator was away.
    pub observations_dropped: u64,
}

/// One numbered batch of an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub agent_id: String,
    /// Starts at 1 and grows by one per new batch; a resend reuses it.
    pub sequence: u64,
    pub observations: Vec<Observation>,
    pub counters: AgentCounters,
    pub clock: Option<ClockEstimate>,
    /// When the agent first sent the batch, by its clock.
    pub sent: UnixNanos,
}

/// A wire report that does not decode; names the agent and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadReport {
    #[error("agent_id is required")]
    NoAgentId,
    #[error("report {sequence} of agent {agent_id:?}: sequence must start at 1")]
    Sequence { agent_id: String, sequence: u64 },
    #[error("report {sequence} of agent {agent_id:?}: sent_unix_nanos {value} is not a time")]
    Sent {
        agent_id: String,
        sequence: u64,
        value: u64,
    },
    #[error("report {sequence} of agent {agent_id:?}: observations[{index}]: {problem}")]
    Observation {
        agent_id: String,
        sequence: u64,
        index: usize,
        problem: BadObservation,
    },
}

impl From<ClockEstimate> for v1::ClockEstimate {
    fn from(c: ClockEstimate) -> Self {
        v1::ClockEstimate {
            offset_ns: c.offset_ns,
            uncertainty_ns: c.uncertainty_ns,
        }
    }
}

impl From<Report> for v1::ReportRequest {
    fn from(r: Report) -> Self {
        v1::ReportRequest {
            agent_id: r.agent_id,
            sequence: r.sequence,
            observations: r.observations.into_iter().map(Into::into).collect(),
            counters: Some(v1::AgentCounters {
                events_lost: r.counters.events_lost,
                observations_dropped: r.counters.observations_dropped,
            }),
            clock: r.clock.map(Into::into),
            sent_unix_nanos: r.sent.to_wire().unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::ReportRequest> for Report {
    type Error = BadReport;

    fn try_from(r: v1::ReportRequest) -> Result<Self, BadReport> {
        if r.agent_id.is_empty() {
            return Err(BadReport::NoAgentId);
        }
        let (agent_id, sequence) = (r.agent_id, r.sequence);
        if sequence == 0 {
            return Err(BadReport::Sequence { agent_id, sequence });
        }
        let Some(sent) = UnixNanos::from_wire(r.sent_unix_nanos).filter(|t| t.as_nanos() > 0)
        else {
            return Err(BadReport::Sent {
                agent_id,
                sequence,
                value: r.sent_unix_nanos,
            });
        };
        let mut observations = Vec::with_capacity(r.observations.len());
        for (index, o) in r.observations.into_iter().enumerate() {
            match Observation::try_from(o) {
                Ok(o) => observations.push(o),
                Err(problem) => {
                    return Err(BadReport::Observation {
                        agent_id,
                        sequence,
                        index,
                        problem,
                    });
                }
            }
        }
        let c = r.counters.unwrap_or_default();
        Ok(Report {
            agent_id,
            sequence,
            observations,
            counters: AgentCounters {
                events_lost: c.events_lost,
                observations_dropped: c.observations_dropped,
            },
            clock: r.clock.map(|c| ClockEstimate {
                offset_ns: c.offset_ns,
                uncertainty_ns: c.uncertainty_ns,
            }),
            sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnEvent, observation::BadObservation};

    fn report() -> Report {
        Report {
            agent_id: "node-1/00ff".into(),
            sequence: 4,
            observations: vec![Observation::Accepted(ConnEvent {
                src: "10.0.0.1:4000".parse().unwrap(),
                dst: "10.0.0.2:80".parse().unwrap(),
                time: UnixNanos::from_nanos(5),
                close: None,
                reason: None,
            })],
            counters: AgentCounters {
                events_lost: 2,
                observations_dropped: 3,
            },
            clock: Some(ClockEstimate {
                offset_ns: -40,
                uncertainty_ns: 7,
            }),
            sent: UnixNanos::from_nanos(1_700_000_000_000_000_000),
        }
    }

    #[test]
    fn a_report_survives_the_wire() {
        for clock in [None, report().clock] {
            let sent = Report { clock, ..report() };
            assert_eq!(
                Report::try_from(v1::ReportRequest::from(sent.clone())),
                Ok(sent)
            );
        }
    }

    #[test]
    fn a_bad_report_names_the_agent_the_batch_and_the_field() {
        let wire = v1::ReportRequest::from(report());
        let err = |w: v1::ReportRequest| Report::try_from(w).unwrap_err().to_string();
        assert_eq!(
            err(v1::ReportRequest {
                sequence: 0,
                ..wire.clone()
            }),
            r#"report 0 of agent "node-1/00ff": sequence must start at 1"#
        );
        assert_eq!(
            err(v1::ReportRequest {
                sent_unix_nanos: 0,
                ..wire.clone()
            }),
            r#"report 4 of agent "node-1/00ff": sent_unix_nanos 0 is not a time"#
        );
        let mut bad = wire.clone();
        bad.observations.push(v1::Observation { kind: None });
        assert_eq!(
            Report::try_from(bad).unwrap_err(),
            BadReport::Observation {
                agent_id: "node-1/00ff".into(),
                sequence: 4,
                index: 1,
                problem: BadObservation::NoKind
            }
        );
        assert_eq!(
            err(v1::ReportRequest {
                agent_id: String::new(),
                ..wire
            }),
            "agent_id is required"
        );
    }

    #[test]
    fn a_symmetric_exchange_gives_the_offset_and_half_the_round_trip() {
        let s = 1_000_000_000;
        let t = UnixNanos::from_nanos;
        // Aggregator 1 s ahead; 10 ms each way; 1 ms processing.
        let e = ClockEstimate::from_exchange(
            t(100 * s),
            t(101 * s + 10_000_000),
            t(101 * s + 11_000_000),
            t(100 * s + 21_000_000),
        );
        assert_eq!(
            e,
            ClockEstimate {
                offset_ns: 1_000_000_000,
                uncertainty_ns: 10_000_000
            }
        );
        assert_eq!(e.to_aggregator(t(5)), t(1_000_000_005));
        let behind = ClockEstimate::from_exchange(t(2_000), t(1_000), t(1_000), t(2_000));
        assert_eq!(behind.offset_ns, -1_000);
        assert_eq!(behind.uncertainty_ns, 0);
    }
}
