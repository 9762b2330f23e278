//! `GET /v1/drain?namespace=&pod=&max=`: the adaptive drain's long-poll.
//! A deleted pod's preStop hook (`prestop-drain`) asks it and stops
//! waiting as soon as the aggregator has seen every expected node remove
//! the pod and no router send it a new connection for the quiet period its
//! own rate calls for (`correlate::drain`), or at `max`. The answer says
//! which, and how long it took. Only the pod itself may ask (its projected
//! token, [`crate::auth::pod`]); waits are bounded in number
//! (`--max-drain-waits`) and length (`--max-drain-seconds`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use observer_proto::UnixNanos;
use observer_proto::api::{DrainAnswer, DrainOutcome};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::pod::PodAuth;
use crate::correlate::{Correlator, DrainView, PodRef, QuietRule};
use crate::http::{ApiError, HttpState, Params};

/// How often a waiting drain looks at its deletion again.
pub const POLL: Duration = Duration::from_millis(100);

/// How the quiet period is derived (see `correlate::drain`), as flags of
/// the aggregator with environment fallbacks.
#[derive(Clone, Debug, clap::Args)]
pub struct DrainSettings {
    /// Probability that a router still routing to a deleted pod at its
    /// measured connection rate sends nothing for the whole quiet period
    /// (0..1): the quiet period is ln(1/P) connection intervals.
    #[arg(long, env = "AGGREGATOR_DRAIN_MISS_PROBABILITY", default_value_t = DrainSettings::DEFAULT.drain_miss_probability, value_parser = parse_probability)]
    pub drain_miss_probability: f64,
    /// Shortest quiet period: covers the agents' report batching, and is
    /// the quiet period of a pod no router sent anything since T0.
    #[arg(long, env = "AGGREGATOR_DRAIN_MIN_QUIET", default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_min_quiet: Duration,
    /// Longest quiet period, however sparse a router's connections.
    #[arg(long, env = "AGGREGATOR_DRAIN_MAX_QUIET", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_max_quiet: Duration,
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    crate::config::check_probability("--drain-miss-probability", v)
}

impl DrainSettings {
    pub const DEFAULT: Self = Self {
        drain_miss_probability: 0.001,
        drain_min_quiet: Duration::from_secs(1),
        drain_max_quiet: Duration::from_secs(30),
    };

    pub fn rule(&self) -> QuietRule {
        QuietRule {
            miss_probability: self.drain_miss_probability,
            min: self.drain_min_quiet,
            max: self.drain_max_quiet.max(self.drain_min_quiet),
        }
    }
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What the drain endpoint needs besides the HTTP state: the deletions in
/// flight, who may ask, and the bound on waiting requests.
pub struct Drains {
    correlator: Arc<Correlator>,
    /// `None`: any caller may ask about any pod (`--insecure-no-auth`).
    pods: Option<Arc<PodAuth>>,
    waits: Arc<Semaphore>,
}

impl Drains {
    pub fn new(correlator: Arc<Correlator>, pods: Option<Arc<PodAuth>>, max_waits: usize) -> Self {
        Self {
            correlator,
            pods,
            waits: Arc::new(Semaphore::new(max_waits)),
        }
    }
}

/// The handler of `GET /v1/drain`.
pub async fn drain(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<axum::Json<DrainAnswer>, ApiError> {
    let started = Instant::now();
    let drains = state.drain.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server tracks no deletions: the drain needs the running aggregator",
        )
    })?;
    let p = Params::new(raw, &["namespace", "pod", "max"])?;
    let required = |name: &str| {
        p.text(name)
            .ok_or_else(|| ApiError::bad_request(format!("{name} is required")))
    };
    let (namespace, name) = (required("namespace")?, required("pod")?);
    let max = p
        .number::<f64>("max")?
        .ok_or_else(|| ApiError::bad_request("max is required (seconds)"))?;
    if !(max.is_finite() && max > 0.0) {
        return Err(ApiError::bad_request(format!(
            "max must be a number of seconds above 0, got {max}"
        )));
    }
    let limit = Duration::from_secs(state.settings.limits.max_drain_seconds);
    let max = Duration::from_secs_f64(max).min(limit);
    let count = |outcome: &str| state.metrics.drain_answered(outcome, started.elapsed());
    let uid = match &drains.pods {
        Some(pods) => {
            let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            match pods.authorize(authorization, &namespace, &name).await {
                Ok(identity) => identity.uid,
                Err(e) => {
                    count("refused");
                    return Err(e.into());
                }
            }
        }
        None => None,
    };
    let Ok(_permit) = Arc::clone(&drains.waits).try_acquire_owned() else {
        count("busy");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} drains are waiting already (--max-drain-waits): sleep the recommendation instead",
                state.settings.limits.max_drain_waits
            ),
        ));
    };
    let pod = PodRef {
        namespace,
        name,
        uid,
    };
    let answer = wait(&state, &drains, &pod, started, max).await;
    count(match answer.outcome {
        DrainOutcome::Drained => "drained",
        DrainOutcome::Timeout => "timeout",
    });
    tracing::info!(
        namespace = %pod.namespace, pod = %pod.name, outcome = ?answer.outcome,
        waited_seconds = answer.waited_seconds, reason = %answer.reason, "drain answered"
    );
    Ok(axum::Json(answer))
}

/// Polls the deletion every [`POLL`] until it is drained or `max` passed.
async fn wait(
    state: &HttpState,
    drains: &Drains,
    pod: &PodRef,
    started: Instant,
    max: Duration,
) -> DrainAnswer {
    let rule = state.settings.drain.rule();
    let deadline = started + max;
    loop {
        let now = UnixNanos::now();
        let view = drains.correlator.drain_view(pod, &rule, now);
        let waited = started.elapsed();
        match &view {
            Some(v) if v.drained => {
                return answer(DrainOutcome::Drained, Some(v), pod, waited, max, now);
            }
            None => {
                if let Some(done) = finished(state, pod, waited) {
                    return done;
                }
            }
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return answer(DrainOutcome::Timeout, view.as_ref(), pod, waited, max, now);
        }
        tokio::time::sleep_until((Instant::now() + POLL).min(deadline)).await;
    }
}

/// The answer for a deletion the aggregator already finished (its pod UID
/// is known only from a token): drained when it was complete.
fn finished(state: &HttpState, pod: &PodRef, waited: Duration) -> Option<DrainAnswer> {
    let record = match state.store.deletion(pod.uid.as_deref()?) {
        Ok(r) => r?,
        Err(e) => {
            tracing::warn!(error = %e, "reading a finished deletion for a drain failed");
            return None;
        }
    };
    let (outcome, reason) = if record.complete {
        (
            DrainOutcome::Drained,
            "the deletion is finished: every node reported".to_owned(),
        )
    } else {
        (
            DrainOutcome::Timeout,
            format!(
                "the deletion was finished incomplete (missing nodes: {})",
                record.missing_nodes.join(", ")
            ),
        )
    };
    Some(DrainAnswer {
        outcome,
        waited_seconds: waited.as_secs_f64(),
        since_deletion_seconds: Some(
            UnixNanos::now().seconds_since(record.deletion_start_unix_nanos),
        ),
        missing_nodes: record.missing_nodes,
        reason,
        ..DrainAnswer::default()
    })
}

fn answer(
    outcome: DrainOutcome,
    view: Option<&DrainView>,
    pod: &PodRef,
    waited: Duration,
    max: Duration,
    now: UnixNanos,
) -> DrainAnswer {
    let Some(v) = view else {
        return DrainAnswer {
            outcome,
            waited_seconds: waited.as_secs_f64(),
            reason: format!(
                "max ({:.1} s) reached: no deletion of pod {}/{} was seen",
                max.as_secs_f64(),
                pod.namespace,
                pod.name
            ),
            ..DrainAnswer::default()
        };
    };
    let quiet = v.quiet.as_secs_f64();
    let limiting = v
        .limiting
        .as_ref()
        .map_or_else(String::new, |r| format!("{} {}", r.kind.as_str(), r.name));
    let reason = match outcome {
        DrainOutcome::Drained => format!(
            "all {} expected nodes reported the removal and no router sent a new connection for its quiet period (longest {quiet:.1} s; last condition met: {limiting})",
            v.nodes_expected
        ),
        DrainOutcome::Timeout if v.nodes_removed < v.nodes_expected || v.nodes_expected == 0 => {
            format!(
                "max ({:.1} s) reached: {} of {} expected nodes reported the removal (missing: {})",
                max.as_secs_f64(),
                v.nodes_removed,
                v.nodes_expected,
                v.missing_nodes.join(", ")
            )
        }
        DrainOutcome::Timeout => format!(
            "max ({:.1} s) reached: {limiting} still sent new connections within its quiet period",
            max.as_secs_f64()
        ),
    };
    DrainAnswer {
        outcome,
        waited_seconds: waited.as_secs_f64(),
        since_deletion_seconds: Some(now.seconds_since(v.t0)),
        nodes_expected: v.nodes_expected as u64,
        nodes_removed: v.nodes_removed as u64,
        missing_nodes: v.missing_nodes.clone(),
        quiet_seconds: quiet,
        last_connection_seconds_ago: v.last_connection.map(|t| now.seconds_since(t)),
        limiting_router: v.limiting.clone(),
        reason,
    }
}
