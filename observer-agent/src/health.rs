//! The agent's health endpoint: `/healthz` (the main loop is turning),
//! `/readyz` (programs loaded, sources started), `/metrics` (Prometheus
//! text format) and `/endpoints` (the per-endpoint records, JSON: see
//! [`crate::endpoint_record`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    clock::monotonic_now_ns, endpoint_record::EndpointRecords, kernel::Stats,
    observation::Observation,
};

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
    last_kernel: std::sync::Mutex<Stats>,
    records: std::sync::Mutex<EndpointRecords>,
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
        Arc::new(Health {
            registry,
            kernel_events,
            observations,
            hooks,
            watched,
            last_kernel: std::sync::Mutex::new(Stats::default()),
            records: std::sync::Mutex::new(EndpointRecords::new()),
            ready: AtomicBool::new(false),
            heartbeat_mono_ns: AtomicU64::new(monotonic_now_ns()),
        })
    }

    /// The per-endpoint records, kept by the main loop, served on `/endpoints`.
    pub fn records(&self) -> std::sync::MutexGuard<'_, EndpointRecords> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let kind = match obs {
            Observation::Accepted(_) => "accepted",
            Observation::Connected(_) => "connected",
            Observation::Closed(_) => "closed",
            Observation::ResetSent(_) => "reset_sent",
            Observation::ResetReceived(_) => "reset_received",
            Observation::RulesRemoved(_) => "rules_removed",
            Observation::RulesAdded(_) => "rules_added",
            Observation::NewFlow(_) => "new_flow",
        };
        self.observations.get_or_create(&KindLabel { kind }).inc();
    }

    /// Takes the kernel's absolute counters; returns how many events were
    /// lost since the previous call.
    pub fn kernel_stats(&self, now: Stats) -> u64 {
        let mut last = self.last_kernel.lock().expect("stats lock");
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
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/endpoints", get(endpoints))
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

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn endpoints(State(h): State<Arc<Health>>) -> impl IntoResponse {
    Json(h.records().snapshot())
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
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

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (status, out)
    }

    #[tokio::test]
    async fn endpoints_over_a_real_socket() {
        let health = Health::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, health.clone()));

        assert_eq!(get(addr, "/healthz").await.0, 200);
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
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    #[tokio::test]
    async fn endpoint_records_over_a_real_socket() {
        use crate::observation::{Detector, NewFlow, RulesChange};

        let health = Health::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, health.clone()));
        let body = |response: &str| -> serde_json::Value {
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/json"),
                "{head}"
            );
            serde_json::from_str(body).unwrap()
        };

        let (status, response) = get(addr, "/endpoints").await;
        assert_eq!(status, 200);
        assert_eq!(
            body(&response),
            serde_json::json!({"watched": [], "finished": [], "flows_not_watched": 0})
        );

        let ep: std::net::SocketAddr = "10.180.0.2:8080".parse().unwrap();
        let gone: std::net::SocketAddr = "10.180.0.3:8080".parse().unwrap();
        {
            let mut records = health.records();
            records.watch(
                ep,
                1_000,
                Some(crate::dataplane::RulesPresence {
                    first_seen_unix_nano: 500,
                    at_start: true,
                    selected: true,
                }),
            );
            records.watch(gone, 1_000, None);
            records.observe(&Observation::RulesRemoved(RulesChange {
                endpoint: ep,
                detector: Detector::IptablesNft,
                time_unix_nano: 2_000,
                precision_ns: 1_000_000,
            }));
            for (dst, t) in [(ep, 2_500), ("10.180.0.2:9090".parse().unwrap(), 2_600)] {
                records.observe(&Observation::NewFlow(NewFlow {
                    src: "10.244.1.5:40000".parse().unwrap(),
                    dst,
                    original_dst: "172.30.0.10:80".parse().unwrap(),
                    time_unix_nano: t,
                }));
            }
            records.unwatch(&gone);
        }
        let (status, response) = get(addr, "/endpoints").await;
        assert_eq!(status, 200);
        let v = body(&response);
        assert_eq!(v["flows_not_watched"], 1);
        assert_eq!(v["finished"][0]["endpoint"], "10.180.0.3:8080");
        let r = &v["watched"][0];
        assert_eq!(v["watched"].as_array().unwrap().len(), 1);
        assert_eq!(r["endpoint"], "10.180.0.2:8080");
        assert_eq!(r["deletion_started_unix_nano"], 1_000);
        assert_eq!(r["first_seen_in_rules_unix_nano"], 500);
        assert_eq!(r["in_rules_at_agent_start"], true);
        assert_eq!(r["rules_removed_unix_nano"], 2_000);
        assert_eq!(r["rules_removed_detector"], "iptables_nft");
        assert_eq!(r["last_new_flow_unix_nano"], 2_500);
        assert_eq!(r["last_new_flow_src"], "10.244.1.5:40000");
        assert_eq!(r["late_flows"], 1);
        assert_eq!(r["late_sources"]["10.244.1.5"], 1);
    }
}
