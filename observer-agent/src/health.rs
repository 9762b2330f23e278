//! The agent's health endpoint: `/healthz` (the main loop is turning),
//! `/startedz` (programs loaded, sources started: the startup probe's, so a
//! node missing a required capability is not restarted in a loop),
//! `/readyz` (started, and every required capability there) and `/metrics`
//! (Prometheus text format).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use observer_proto::Observation;

use crate::{clock::monotonic_now_ns, kernel::Stats, locks};

/// Port of the health endpoint when `--health-addr` is a bare IP.
pub const DEFAULT_PORT: u16 = 9464;

/// `--health-addr`: a socket address, or a bare IP on [`DEFAULT_PORT`] (so
/// the downward API's pod IP works as is for IPv4 and IPv6).
pub fn parse_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().or_else(|_| {
        s.parse::<std::net::IpAddr>()
            .map(|ip| (ip, DEFAULT_PORT).into())
            .map_err(|_| format!("{s:?} is neither IP:PORT, [IPv6]:PORT nor an IP address"))
    })
}

/// The main loop must beat at least this often to count as alive.
const LIVENESS_WINDOW: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: String,
}

/// Shared between the agent's tasks and the HTTP handlers.
pub struct Health {
    registry: Registry,
    kernel_events: Family<OutcomeLabel, Counter>,
    observations: Family<KindLabel, Counter>,
    hooks: Family<HookLabel, Gauge>,
    watched: Gauge,
    flows_not_watched: Counter,
    poisoned_locks: Counter,
    last_kernel: std::sync::Mutex<Stats>,
    started: AtomicBool,
    ready: AtomicBool,
    heartbeat_mono_ns: AtomicU64,
}

impl Health {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("prestop_agent");
        let kernel_events = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "kernel_events",
            "Connection events in the kernel programs: emitted, lost (ring buffer full), filtered (not watched)",
            kernel_events.clone(),
        );
        let observations = Family::<KindLabel, Counter>::default();
        registry.register(
            "observations",
            "Observations produced, by kind",
            observations.clone(),
        );
        let hooks = Family::<HookLabel, Gauge>::default();
        registry.register(
            "hook_attached",
            "1 when the kernel hook is attached",
            hooks.clone(),
        );
        let watched = Gauge::default();
        registry.register(
            "watched_endpoints",
            "Endpoint addresses being watched",
            watched.clone(),
        );
        let flows_not_watched = Counter::default();
        registry.register(
            "flows_not_watched",
            "New flows to a watched address but no watched endpoint (another port), dropped",
            flows_not_watched.clone(),
        );
        let poisoned_locks = Counter::default();
        registry.register(
            "poisoned_locks",
            "Locks found poisoned (a thread panicked holding them) and taken anyway; any is a bug",
            poisoned_locks.clone(),
        );
        Arc::new(Health {
            registry,
            kernel_events,
            observations,
            hooks,
            watched,
            flows_not_watched,
            poisoned_locks,
            last_kernel: std::sync::Mutex::new(Stats::default()),
            started: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            heartbeat_mono_ns: AtomicU64::new(monotonic_now_ns()),
        })
    }

    /// Start-up is over: the programs are loaded and the sources run.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn beat(&self) {
        self.heartbeat_mono_ns
            .store(monotonic_now_ns(), Ordering::Relaxed);
    }

    pub fn set_hook(&self, hook: &str, attached: bool) {
        self.hooks
            .get_or_create(&HookLabel {
                hook: hook.to_owned(),
            })
            .set(i64::from(attached));
    }

    pub fn set_watched(&self, count: usize) {
        self.watched.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn observed(&self, obs: &Observation) {
        let kind = obs.kind_name();
        self.observations.get_or_create(&KindLabel { kind }).inc();
    }

    /// A new flow the watched set dropped (see [`crate::watched`]).
    pub fn flow_not_watched(&self) {
        self.flows_not_watched.inc();
    }

    /// Takes the kernel's absolute counters; returns how many events were
    /// lost since the previous call.
    pub fn kernel_stats(&self, now: Stats) -> u64 {
        let mut last = locks::lock(&self.last_kernel, "health kernel stats");
        for (outcome, before, after) in [
            ("emitted", last.emitted, now.emitted),
            ("lost", last.lost, now.lost),
            ("filtered", last.filtered, now.filtered),
        ] {
            self.kernel_events
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(after.saturating_sub(before));
        }
        let lost = now.lost.saturating_sub(last.lost);
        *last = now;
        lost
    }

    fn alive(&self) -> bool {
        let last = self.heartbeat_mono_ns.load(Ordering::Relaxed);
        monotonic_now_ns().saturating_sub(last) < LIVENESS_WINDOW.as_nanos() as u64
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/startedz", get(startedz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    axum::serve(listener, router(health)).await
}

async fn healthz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "main loop stalled\n")
    }
}

async fn startedz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.started.load(Ordering::Relaxed) {
        (StatusCode::OK, "started\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    // The process-wide count (crate::locks), brought up to date per scrape.
    let poisoned = locks::poisoned_total();
    h.poisoned_locks
        .inc_by(poisoned.saturating_sub(h.poisoned_locks.get()));
    let mut body = String::new();
    match encode(&mut body, &h.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_addr_takes_a_socket_address_or_a_bare_ip() {
        let ok = |s: &str| parse_addr(s).unwrap().to_string();
        assert_eq!(ok("10.0.0.7"), "10.0.0.7:9464");
        assert_eq!(ok("fd00::7"), "[fd00::7]:9464");
        assert_eq!(ok("[fd00::7]:1234"), "[fd00::7]:1234");
        assert_eq!(ok("127.0.0.1:1234"), "127.0.0.1:1234");
        let e = parse_addr("node-a:9464").unwrap_err();
        assert!(e.contains("\"node-a:9464\" is neither"), "{e}");
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let r = lab::http_client::HttpClient::default()
            .get(&format!("http://{addr}{path}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (r.status, r.text())
    }

    #[tokio::test]
    async fn health_over_a_real_socket() {
        let health = Health::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, health.clone()));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/startedz").await.0, 503);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        // Started without a required capability: not ready, but started,
        // so the startup probe does not restart it.
        health.set_started();
        health.set_ready(false);
        assert_eq!(get(addr, "/startedz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);

        let lost = health.kernel_stats(Stats {
            emitted: 10,
            lost: 3,
            filtered: 7,
        });
        assert_eq!(lost, 3);
        let lost = health.kernel_stats(Stats {
            emitted: 12,
            lost: 3,
            filtered: 9,
        });
        assert_eq!(lost, 0);
        health.set_hook("tracepoint/sock/inet_sock_set_state", true);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("prestop_agent_kernel_events_total{outcome=\"emitted\"} 12"),
            "{body}"
        );
        assert!(
            body.contains("prestop_agent_kernel_events_total{outcome=\"lost\"} 3"),
            "{body}"
        );
        assert!(body.contains(
            "prestop_agent_hook_attached{hook=\"tracepoint/sock/inet_sock_set_state\"} 1"
        ));
        health.flow_not_watched();
        let (_, body) = get(addr, "/metrics").await;
        assert!(
            body.contains("prestop_agent_flows_not_watched_total 1"),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "prestop_agent_poisoned_locks_total {}",
                locks::poisoned_total()
            )),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
        assert_eq!(
            get(addr, "/endpoints").await.0,
            404,
            "health reports health"
        );
    }
}
