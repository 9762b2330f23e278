//! The HTTP API: recommendations for CI, recent deletions, the adaptive
//! drain ([`crate::drain`]), health, metrics and the OpenAPI document. See
//! docs/api.md.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use observer_proto::UnixNanos;
use observer_proto::api::startup::StartupReport;
use observer_proto::api::{
    DeletionList, DeletionRecord, DeletionSummary, NodeClass, Recommendation,
};
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::AuthError;
use crate::auth::access::{self, HttpAccess};
use crate::config::{Settings, check_probability};
use crate::deletion_pages::{DetailFilter, continue_token, parse_continue_token};
use crate::metrics::Metrics;
use crate::openapi;
use crate::readiness::Readiness;
use crate::recommend::service::Recommender;
use crate::startup;
use crate::store::{DeletionFilter, Outcome, Scope, Store, StoreError};

/// Everything the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<Store>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
    pub recommender: Arc<Recommender>,
    /// `None`: every route is open (`--insecure-no-auth`).
    pub access: Option<Arc<HttpAccess>>,
    /// New pods' finished startup windows (`/v1/startup`).
    pub startup: Arc<startup::Log>,
    /// `None`: no deletions are tracked here, `/v1/drain` answers 503.
    pub drain: Option<Arc<crate::drain::Drains>>,
}

impl HttpState {
    /// State with fresh metrics, ready from the start.
    pub fn new(store: Arc<Store>, settings: Settings) -> Self {
        let settings = Arc::new(settings);
        Self {
            startup: Arc::new(startup::Log::new(
                settings.startup.clone(),
                settings.retention,
            )),
            recommender: Arc::new(Recommender::new(Arc::clone(&store), Arc::clone(&settings))),
            store,
            settings,
            metrics: Arc::new(Metrics::new()),
            ready: Readiness::new(true),
            access: None,
            drain: None,
        }
    }
}

/// Every route, for the OpenAPI consistency test.
pub const ROUTES: &[&str] = &[
    "/v1/recommendations",
    "/v1/deletions",
    "/v1/deletions/{podUid}",
    "/v1/startup",
    "/v1/drain",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/recommendations", get(recommendations))
        .route("/v1/deletions", get(deletions))
        .route("/v1/deletions/{podUid}", get(deletion))
        .route("/v1/startup", get(startup_report))
        .route("/v1/drain", get(crate::drain::drain))
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
    pub(crate) fn new(code: StatusCode, msg: impl Into<String>) -> Self {
        Self(code, msg.into())
    }

    pub(crate) fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store query failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"))
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match e.reason() {
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "review_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        };
        Self(code, e.to_string())
    }
}

impl HttpState {
    /// Refuses a reader of `resource` whose token does not allow it.
    async fn authorize(&self, headers: &HeaderMap, resource: &str) -> Result<(), ApiError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let value = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        Ok(access.authorize(value, resource).await?)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(json!({ "error": self.1 }));
        if self.0 == StatusCode::UNAUTHORIZED {
            return (self.0, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (self.0, body).into_response()
    }
}

/// Query parameters as given; unknown names are rejected so a typo
/// (`namspace=`) does not silently widen the scope to the whole cluster.
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn new(raw: HashMap<String, String>, allowed: &[&str]) -> Result<Self, ApiError> {
        if let Some(k) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::bad_request(format!(
                "unknown parameter {k:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        Ok(Self(raw))
    }

    /// A non-empty string parameter.
    pub(crate) fn text(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.is_empty()).cloned()
    }

    pub(crate) fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
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
    let exclude_external = match p.text("excludeExternal").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "excludeExternal must be true or false, got {v:?}"
            )));
        }
    };
    Ok(Scope {
        namespace,
        service,
        exclude_external,
    })
}

async fn recommendations(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<axum::Json<Recommendation>, ApiError> {
    state.authorize(&headers, access::RECOMMENDATIONS).await?;
    let p = Params::new(
        raw,
        &[
            "namespace",
            "service",
            "quantile",
            "confidence",
            "excludeExternal",
        ],
    )?;
    let scope = scope(&p)?;
    let quantile = p.number("quantile")?.unwrap_or(state.settings.quantile);
    let confidence = p.number("confidence")?.unwrap_or(state.settings.confidence);
    check_probability("quantile", quantile).map_err(ApiError::bad_request)?;
    check_probability("confidence", confidence).map_err(ApiError::bad_request)?;
    let answer = state
        .recommender
        .answer(scope, quantile, confidence, UnixNanos::now())?;
    Ok(axum::Json(answer))
}

const MAX_DELETIONS: usize = 1000;

async fn deletions(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    state.authorize(&headers, access::DELETIONS).await?;
    let p = Params::new(
        raw,
        &[
            "namespace",
            "service",
            "node",
            "outcome",
            "sinceSeconds",
            "limit",
            "continue",
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
        .map(|s| UnixNanos::now() - std::time::Duration::from_secs(s));
    let after = p
        .text("continue")
        .map(|t| parse_continue_token(&t))
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // One more than the page: whether another page follows.
    let mut found = state.store.deletions(&DeletionFilter {
        namespace: scope.namespace,
        service: scope.service,
        node: p.text("node"),
        outcome,
        since,
        after,
        limit: limit + 1,
    })?;
    let more = found.len() > limit;
    found.truncate(limit);
    let continue_token = found
        .last()
        .filter(|_| more)
        .map(|last| continue_token(last.position));
    let items = found
        .iter()
        .map(|d| DeletionSummary::from(&d.record))
        .collect();
    Ok(axum::Json(DeletionList {
        items,
        continue_token,
    })
    .into_response())
}

/// One deletion's detail, filtered (see `DetailFilter`).
async fn deletion(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(pod_uid): Path<String>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<axum::Json<DeletionRecord>, ApiError> {
    state.authorize(&headers, access::DELETIONS).await?;
    let p = Params::new(raw, &["slowest", "node", "class"])?;
    let slowest = p.number::<usize>("slowest")?;
    if slowest == Some(0) {
        return Err(ApiError::bad_request("slowest must be at least 1"));
    }
    let class = p
        .text("class")
        .map(|c| {
            serde_json::from_value::<NodeClass>(c.clone().into()).map_err(|_| {
                ApiError::bad_request(format!(
                    "class must be measured, stillRouting or unknown, got {c:?}"
                ))
            })
        })
        .transpose()?;
    let mut record = state.store.deletion(&pod_uid)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no finished deletion of pod UID {pod_uid:?}"),
        )
    })?;
    DetailFilter {
        slowest,
        node: p.text("node"),
        class,
    }
    .apply(&mut record);
    Ok(axum::Json(record))
}

/// New pods' startup findings; names pods, so read as deletions are.
async fn startup_report(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<axum::Json<StartupReport>, ApiError> {
    state.authorize(&headers, access::DELETIONS).await?;
    let p = Params::new(raw, &["namespace", "service", "workload", "limit"])?;
    let scope = scope(&p)?;
    let limit = p.number::<usize>("limit")?.unwrap_or(20);
    if limit > MAX_DELETIONS {
        return Err(ApiError::bad_request(format!(
            "limit must be between 0 and {MAX_DELETIONS}"
        )));
    }
    let query = startup::Query {
        namespace: scope.namespace,
        service: scope.service,
        workload: p.text("workload"),
        limit,
    };
    Ok(axum::Json(
        state.startup.report(&query, &state.settings.cluster_name),
    ))
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
