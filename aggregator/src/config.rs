//! Recommendation and correlation settings shared by the HTTP API, the
//! correlator and the binary's flags.

use std::time::Duration;

use crate::limits::Limits;

#[derive(Clone, Debug)]
pub struct Settings {
    /// Reported as `scope.cluster`.
    pub cluster_name: String,
    /// Default quantile of full-propagation latency to cover.
    pub quantile: f64,
    /// Default confidence of the upper bound on that quantile.
    pub confidence: f64,
    /// Added to the bound before rounding up.
    pub margin_seconds: f64,
    /// Measurements older than this are neither used nor kept.
    pub retention: Duration,
    /// A deletion whose nodes have not all reported by then is finished as
    /// incomplete, listing the missing nodes.
    pub completion_timeout: Duration,
    /// How long a deletion stays open after its pod is gone, so that what
    /// happens at shutdown (requests on keep-alive connections the pod
    /// closed, refused connections) is still attributed to it.
    pub shutdown_linger: Duration,
    /// How often the in-flight state (node accumulators, agents' batch
    /// sequences) is written to the store. Agents are acknowledged only up
    /// to the last checkpoint, so they keep this long of batches more.
    /// At least 10 ms.
    pub checkpoint_interval: Duration,
    /// Below this share of expected node-deletions measured, a
    /// recommendation is low-confidence.
    pub min_coverage: f64,
    /// How far agents' corrected times may err beyond their stated clock
    /// uncertainty before an observation is refused as implausible.
    pub clock_tolerance: Duration,
    /// An agent whose clock offset exceeds this has its observations refused.
    pub max_clock_offset: Duration,
    /// What agents and drains may make the aggregator hold or do.
    pub limits: Limits,
    /// How the adaptive drain's quiet period is derived.
    pub drain: crate::drain::DrainSettings,
    /// Tokens and TLS; none by default.
    pub auth: crate::auth::AuthSettings,
    /// New pods' startup windows.
    pub startup: crate::startup::StartupSettings,
}

impl Settings {
    pub fn clock_tolerance_ns(&self) -> i64 {
        i64::try_from(self.clock_tolerance.as_nanos()).unwrap_or(i64::MAX)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cluster_name: "default".into(),
            quantile: 0.99,
            confidence: 0.95,
            margin_seconds: 1.0,
            retention: Duration::from_secs(7 * 24 * 3600),
            completion_timeout: Duration::from_secs(120),
            shutdown_linger: Duration::from_secs(3),
            checkpoint_interval: Duration::from_secs(1),
            min_coverage: 0.9,
            clock_tolerance: Duration::from_secs(2),
            max_clock_offset: Duration::from_secs(60),
            limits: Limits::DEFAULT,
            drain: crate::drain::DrainSettings::DEFAULT,
            auth: crate::auth::AuthSettings::default(),
            startup: crate::startup::StartupSettings::default(),
        }
    }
}

/// Checks a quantile or confidence parameter: strictly between 0 and 1.
pub fn check_probability(name: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!("{name} must be strictly between 0 and 1, got {v}"))
    }
}
