//! The HTTP API: recommendations for CI, recent deletions, health, metrics
//! and the OpenAPI document. See docs/api.md.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::{Settings, check_probability};
use crate::metrics::Metrics;
use crate::model::UnixNanos;
use crate::openapi;
use crate::recommend::{self, Recommendation};
use crate::recommendation_cache::RecommendationCache;
use crate::store::{DeletionFilter, Outcome, Scope, Store, StoreError};

/// Whether the service is ready for traffic (the binary clears it until the
/// Kubernetes watchers have listed once).
#[derive(Clone, Debug)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new(ready: bool) -> Self {
        Self(Arc::new(AtomicBool::new(ready)))
    }
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<Store>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
    pub recommendations: Arc<RecommendationCache>,
}

impl HttpState {
    /// State with fresh metrics, ready from the start.
    pub fn new(store: Arc<Store>, settings: Settings) -> Self {
        Self {
            store,
            settings: Arc::new(settings),
            metrics: Arc::new(Metrics::new()),
            ready: Readiness::new(true),
            recommendations: Arc::default(),
        }
    }
}

/// Every route, for the OpenAPI consistency test.
pub const ROUTES: &[&str] = &[
    "/v1/recommendations",
    "/v1/deletions",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/recommendations", get(recommendations))
        .route("/v1/deletions", get(deletions))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .with_state(state)
}

/// Serves the HTTP API on `listener` until the task is dropped or fails.
pub async fn serve(listener: TcpListener, state: HttpState) -> std::io::Result<()> {
    axum::serve(nodelay(listener), router(state)).await
}

/// Small JSON answers: without TCP_NODELAY a response split over two
/// writes can wait for the client's delayed ACK.
fn nodelay(listener: TcpListener) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}

/// Like [`serve`], stopping gracefully when `shutdown` completes.
pub async fn serve_with_shutdown(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(nodelay(listener), router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A 400/500 answer with a JSON `{"error": ...}` body.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store query failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn now_unix_nanos() -> UnixNanos {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Query parameters as given; unknown names are rejected so a typo
/// (`namspace=`) does not silently widen the scope to the whole cluster.
struct Params(HashMap<String, String>);

impl Params {
    fn new(raw: HashMap<String, String>, allowed: &[&str]) -> Result<Self, ApiError> {
        if let Some(k) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::bad_request(format!(
                "unknown parameter {k:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        Ok(Self(raw))
    }

    /// A non-empty string parameter.
    fn text(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.is_empty()).cloned()
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.text(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::bad_request(format!("{name} must be a number, got {v:?}"))
                })
            })
            .transpose()
    }
}

fn scope(p: &Params) -> Result<Scope, ApiError> {
    let namespace = p.text("namespace");
    let service = p.text("service");
    if service.is_some() && namespace.is_none() {
        return Err(ApiError::bad_request(
            "service needs a namespace (services are namespaced)",
        ));
    }
    Ok(Scope { namespace, service })
}

/// Computes the recommendation for one scope with the given (or default)
/// quantile and confidence; also used to refresh the recommendation gauges.
pub fn recommendation(
    state: &HttpState,
    scope: Scope,
    quantile: f64,
    confidence: f64,
) -> Result<Recommendation, StoreError> {
    let s = &state.settings;
    let since = now_unix_nanos() - s.retention.as_nanos() as i64;
    let samples = state.store.samples(&scope, since)?;
    Ok(recommend::recommend(
        &recommend::Request {
            cluster: s.cluster_name.clone(),
            scope,
            quantile,
            confidence,
            margin_seconds: s.margin_seconds,
            window_seconds: s.retention.as_secs(),
        },
        &samples,
    ))
}

async fn recommendations(
    State(state): State<HttpState>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<axum::Json<Recommendation>, ApiError> {
    let p = Params::new(raw, &["namespace", "service", "quantile", "confidence"])?;
    let scope = scope(&p)?;
    let quantile = p.number("quantile")?.unwrap_or(state.settings.quantile);
    let confidence = p.number("confidence")?.unwrap_or(state.settings.confidence);
    check_probability("quantile", quantile).map_err(ApiError::bad_request)?;
    check_probability("confidence", confidence).map_err(ApiError::bad_request)?;
    let generation = state.store.generation();
    let answer =
        state
            .recommendations
            .get_or_compute(scope, quantile, confidence, generation, |scope| {
                recommendation(&state, scope, quantile, confidence)
            })?;
    Ok(axum::Json(answer))
}

const MAX_DELETIONS: usize = 1000;

async fn deletions(
    State(state): State<HttpState>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = Params::new(
        raw,
        &[
            "namespace",
            "service",
            "node",
            "outcome",
            "sinceSeconds",
            "limit",
        ],
    )?;
    let scope = scope(&p)?;
    let outcome = match p.text("outcome").as_deref() {
        None => None,
        Some("complete") => Some(Outcome::Complete),
        Some("incomplete") => Some(Outcome::Incomplete),
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "outcome must be complete or incomplete, got {o:?}"
            )));
        }
    };
    let limit = p.number::<usize>("limit")?.unwrap_or(100);
    if limit == 0 || limit > MAX_DELETIONS {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_DELETIONS}"
        )));
    }
    let since = p
        .number::<u64>("sinceSeconds")?
        .map(|s| now_unix_nanos() - (s as i64).saturating_mul(1_000_000_000));
    let items = state.store.deletions(&DeletionFilter {
        namespace: scope.namespace,
        service: scope.service,
        node: p.text("node"),
        outcome,
        since,
        limit,
    })?;
    Ok(axum::Json(json!({ "items": items })).into_response())
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if !state.ready.get() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Kubernetes watchers have not synced\n",
        )
            .into_response();
    }
    match state.store.len() {
        Ok(_) => "ok\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    if let Ok(n) = state.store.len() {
        state.metrics.store_deletions.set(n as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
