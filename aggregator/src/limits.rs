//! Bounds on what agents can make the aggregator hold or do: the size of
//! what they send, how many of them are held, and how fast they may
//! register and report; and on the adaptive drain's waiting requests. Checked by the gRPC service before anything is
//! handed to the correlator, so a refused request costs a decode and a
//! lookup, never memory that outlives it.
//!
//! Rates use `governor` (GCRA, no background task): one limiter for the
//! whole service and one keyed by node (registrations) or agent id
//! (reports). The keyed maps are swept of idle keys when they grow past
//! twice `--max-agents`, so made-up ids cannot grow them without bound.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use observer_proto::v1 as pb;

/// Longest accepted agent id (a DNS name's length).
pub const MAX_AGENT_ID: usize = 253;
/// Longest Kubernetes object name (a DNS subdomain, RFC 1123).
pub const MAX_NODE_NAME: usize = 253;
/// Largest registration kept in memory: kernel release, version and the
/// capability table together (a real agent's is about 2 KiB).
pub const MAX_REGISTRATION_BYTES: usize = 16 * 1024;
/// Most capabilities in one registration (a real agent has about 20).
pub const MAX_CAPABILITIES: usize = 128;

/// The limits, as flags of the aggregator (each with an environment
/// fallback). Defaults suit a 5000-node cluster.
#[derive(Clone, Debug, clap::Args)]
pub struct Limits {
    /// Largest gRPC message accepted or sent, in bytes (a full report of
    /// 10000 observations is about 1 MiB).
    #[arg(long, env = "AGGREGATOR_GRPC_MAX_MESSAGE_BYTES", default_value_t = Limits::DEFAULT.grpc_max_message_bytes)]
    pub grpc_max_message_bytes: usize,
    /// Most agents held in memory (one per node: a new agent process of a
    /// node replaces the old one). Registrations beyond are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "AGGREGATOR_MAX_AGENTS", default_value_t = Limits::DEFAULT.max_agents)]
    pub max_agents: usize,
    /// Registrations accepted per second from all agents together (twice
    /// as many at once); after an aggregator restart the fleet registers
    /// at this pace, agents retrying with jittered backoff.
    #[arg(long, env = "AGGREGATOR_REGISTRATIONS_PER_SECOND", default_value_t = Limits::DEFAULT.registrations_per_second)]
    pub registrations_per_second: NonZeroU32,
    /// Registrations accepted per minute for one node (as many at once).
    #[arg(long, env = "AGGREGATOR_NODE_REGISTRATIONS_PER_MINUTE", default_value_t = Limits::DEFAULT.node_registrations_per_minute)]
    pub node_registrations_per_minute: NonZeroU32,
    /// Reports accepted per second from all agents together (twice as many
    /// at once).
    #[arg(long, env = "AGGREGATOR_REPORTS_PER_SECOND", default_value_t = Limits::DEFAULT.reports_per_second)]
    pub reports_per_second: NonZeroU32,
    /// Reports accepted per second from one agent (ten times as many at
    /// once: an agent resends its buffer after a reconnect). Unary reports
    /// beyond are refused with RESOURCE_EXHAUSTED; a report stream waits.
    #[arg(long, env = "AGGREGATOR_AGENT_REPORTS_PER_SECOND", default_value_t = Limits::DEFAULT.agent_reports_per_second)]
    pub agent_reports_per_second: NonZeroU32,
    /// Most `/v1/drain` requests waiting at once (each a pod's preStop
    /// hook); beyond, 429 and the hook sleeps its fallback.
    #[arg(long, env = "AGGREGATOR_MAX_DRAIN_WAITS", default_value_t = Limits::DEFAULT.max_drain_waits)]
    pub max_drain_waits: usize,
    /// Longest a `/v1/drain` request waits, seconds: a larger `max` is
    /// lowered to it.
    #[arg(long, env = "AGGREGATOR_MAX_DRAIN_SECONDS", default_value_t = Limits::DEFAULT.max_drain_seconds)]
    pub max_drain_seconds: u64,
}

const fn nz(v: u32) -> NonZeroU32 {
    match NonZeroU32::new(v) {
        Some(v) => v,
        None => panic!("zero"),
    }
}

impl Limits {
    pub const DEFAULT: Self = Self {
        grpc_max_message_bytes: 4 * 1024 * 1024,
        max_agents: 10_000,
        registrations_per_second: nz(500),
        node_registrations_per_minute: nz(12),
        reports_per_second: nz(30_000),
        agent_reports_per_second: nz(20),
        max_drain_waits: 2000,
        max_drain_seconds: 600,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A request over a limit; names the field or the limit and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("agent_id {id:?} is longer than {MAX_AGENT_ID} characters")]
    AgentIdTooLong { id: String },
    #[error("agent_id {id:?}: only ASCII letters, digits and . _ / : - are allowed")]
    AgentIdCharacters { id: String },
    /// Only the start of the name is kept: it may be megabytes long.
    #[error("node_name {start:?}... ({len} bytes) is not a Kubernetes node name: {why}")]
    NodeName {
        start: String,
        len: usize,
        why: &'static str,
    },
    #[error(
        "registration of agent {agent_id:?}: {bytes} bytes of kernel release, version and capabilities; at most {MAX_REGISTRATION_BYTES}"
    )]
    RegistrationTooLarge { agent_id: String, bytes: usize },
    #[error("registration of agent {agent_id:?}: {count} capabilities; at most {MAX_CAPABILITIES}")]
    TooManyCapabilities { agent_id: String, count: usize },
    #[error("registrations arrive faster than {0}/s (--registrations-per-second): retry later")]
    Registrations(NonZeroU32),
    #[error(
        "node {node:?} registers faster than {rate}/min (--node-registrations-per-minute): retry later"
    )]
    NodeRegistrations { node: String, rate: NonZeroU32 },
    #[error("reports arrive faster than {0}/s (--reports-per-second): retry later")]
    Reports(NonZeroU32),
    #[error(
        "agent {agent_id:?} reports faster than {rate}/s (--agent-reports-per-second): retry later"
    )]
    AgentReports { agent_id: String, rate: NonZeroU32 },
}

impl Refused {
    /// Over a rate (retry later) rather than malformed.
    pub fn is_rate(&self) -> bool {
        matches!(
            self,
            Self::Registrations(_)
                | Self::NodeRegistrations { .. }
                | Self::Reports(_)
                | Self::AgentReports { .. }
        )
    }
}

impl From<Refused> for tonic::Status {
    fn from(e: Refused) -> Self {
        if e.is_rate() {
            Self::resource_exhausted(e.to_string())
        } else {
            Self::invalid_argument(e.to_string())
        }
    }
}

/// An agent id: non-empty is checked by the caller; bounded length and
/// characters that cannot forge log lines.
pub fn check_agent_id(id: &str) -> Result<(), Refused> {
    if id.len() > MAX_AGENT_ID {
        return Err(Refused::AgentIdTooLong { id: id.to_owned() });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._/:-".contains(c);
    if !id.chars().all(allowed) {
        return Err(Refused::AgentIdCharacters { id: id.to_owned() });
    }
    Ok(())
}

/// A Kubernetes node name: a DNS subdomain (RFC 1123) of at most 253
/// characters, lowercase alphanumeric labels of at most 63 joined by dots,
/// with inner hyphens.
pub fn check_node_name(name: &str) -> Result<(), Refused> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NODE_NAME {
        Some("longer than 253 characters")
    } else {
        name.split('.').find_map(|label| {
            let inner = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
            let edge =
                |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if label.is_empty() || label.len() > 63 {
                Some("a dot-separated part is empty or longer than 63 characters")
            } else if !label.chars().all(inner) {
                Some("only lowercase letters, digits, '-' and '.' are allowed")
            } else if !edge(label.chars().next()) || !edge(label.chars().last()) {
                Some("each part must start and end with a letter or digit")
            } else {
                None
            }
        })
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Refused::NodeName {
            start: name.chars().take(64).collect(),
            len: name.len(),
            why,
        }),
    }
}

/// The fields of a registration the aggregator keeps: agent id, node name,
/// and at most [`MAX_REGISTRATION_BYTES`] of the rest.
pub fn check_registration(r: &pb::RegisterRequest) -> Result<(), Refused> {
    check_agent_id(&r.agent_id)?;
    check_node_name(&r.node_name)?;
    if r.capabilities.len() > MAX_CAPABILITIES {
        return Err(Refused::TooManyCapabilities {
            agent_id: r.agent_id.clone(),
            count: r.capabilities.len(),
        });
    }
    let bytes = r.kernel_release.len()
        + r.agent_version.len()
        + r.capabilities
            .iter()
            .map(|c| c.name.len() + c.detail.len())
            .sum::<usize>();
    if bytes > MAX_REGISTRATION_BYTES {
        return Err(Refused::RegistrationTooLarge {
            agent_id: r.agent_id.clone(),
            bytes,
        });
    }
    Ok(())
}

/// The rate limiters of one running service.
pub struct Admission {
    limits: Limits,
    registrations: DefaultDirectRateLimiter,
    node_registrations: DefaultKeyedRateLimiter<String>,
    reports: DefaultDirectRateLimiter,
    agent_reports: DefaultKeyedRateLimiter<String>,
}

fn burst(rate: NonZeroU32, times: u32) -> NonZeroU32 {
    rate.saturating_mul(nz(times))
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        let per_node = Quota::per_minute(limits.node_registrations_per_minute);
        Self {
            registrations: RateLimiter::direct(
                Quota::per_second(limits.registrations_per_second)
                    .allow_burst(burst(limits.registrations_per_second, 2)),
            ),
            node_registrations: RateLimiter::keyed(per_node),
            reports: RateLimiter::direct(
                Quota::per_second(limits.reports_per_second)
                    .allow_burst(burst(limits.reports_per_second, 2)),
            ),
            agent_reports: RateLimiter::keyed(
                Quota::per_second(limits.agent_reports_per_second)
                    .allow_burst(burst(limits.agent_reports_per_second, 10)),
            ),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A registration of `node` now, or why not. The node's own limit comes
    /// first, so one noisy node does not spend the fleet's budget.
    pub fn registration(&self, node: &str) -> Result<(), Refused> {
        let key = node.to_owned();
        self.sweep(&self.node_registrations);
        if self.node_registrations.check_key(&key).is_err() {
            return Err(Refused::NodeRegistrations {
                node: key,
                rate: self.limits.node_registrations_per_minute,
            });
        }
        self.registrations
            .check()
            .map_err(|_| Refused::Registrations(self.limits.registrations_per_second))
    }

    /// A unary report of `agent_id` now, or why not.
    pub fn report(&self, agent_id: &str) -> Result<(), Refused> {
        let key = agent_id.to_owned();
        self.sweep(&self.agent_reports);
        if self.agent_reports.check_key(&key).is_err() {
            return Err(Refused::AgentReports {
                agent_id: key,
                rate: self.limits.agent_reports_per_second,
            });
        }
        self.reports
            .check()
            .map_err(|_| Refused::Reports(self.limits.reports_per_second))
    }

    /// Waits until a streamed report of `agent_id` is within both rates: a
    /// stream is slowed, not broken (HTTP/2 flow control holds the sender).
    pub async fn report_ready(&self, agent_id: &str) {
        let key = agent_id.to_owned();
        self.sweep(&self.agent_reports);
        self.agent_reports.until_key_ready(&key).await;
        self.reports.until_ready().await;
    }

    /// Forgets idle keys once a keyed limiter holds more than twice
    /// `--max-agents` of them.
    fn sweep(&self, keyed: &DefaultKeyedRateLimiter<String>) {
        if keyed.len() > self.limits.max_agents.saturating_mul(2) {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_subdomains() {
        for ok in ["node-a", "ip-10-0-0-1.ec2.internal", "a", &"a".repeat(63)] {
            assert_eq!(check_node_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("Node-A", "only lowercase"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            ("a..b", "empty or longer"),
            (&"a".repeat(64), "empty or longer"),
            (&"a.".repeat(127), "longer than 253"),
            ("a\nb", "only lowercase"),
        ] {
            let e = check_node_name(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_huge_node_name_is_not_copied_into_the_error() {
        let e = check_node_name(&"a".repeat(1 << 20))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("1048576 bytes"), "{e}");
    }

    #[test]
    fn agent_ids_are_bounded_printable() {
        assert_eq!(check_agent_id("node-a/00ff"), Ok(()));
        assert!(matches!(
            check_agent_id("a\u{1b}[2J"),
            Err(Refused::AgentIdCharacters { .. })
        ));
        assert!(matches!(
            check_agent_id(&"a".repeat(254)),
            Err(Refused::AgentIdTooLong { .. })
        ));
    }

    #[test]
    fn per_node_registrations_are_limited_before_the_fleet() {
        let a = Admission::new(Limits {
            node_registrations_per_minute: nz(2),
            registrations_per_second: nz(1),
            ..Limits::DEFAULT
        });
        assert_eq!(a.registration("n1"), Ok(()));
        assert_eq!(a.registration("n2"), Ok(()));
        // n1 has one more of its own, but the fleet's burst (2) is spent.
        assert_eq!(a.registration("n1"), Err(Refused::Registrations(nz(1))));
        // n1 spent its own two: refused for the node, not the fleet.
        assert!(matches!(
            a.registration("n1"),
            Err(Refused::NodeRegistrations { .. })
        ));
    }
}
