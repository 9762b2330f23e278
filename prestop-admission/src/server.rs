//! The webhook's HTTPS endpoints: `/validate` (warn), `/validate/enforce`,
//! `/mutate` (inject the fixed sleep), `/mutate/adaptive-drain` (inject
//! prestop-drain), and `/healthz`, `/readyz` for the kubelet.

use std::future::Future;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use prestop_check::check::{self, HookStyle, LowConfidence, Options, WorkloadOutcome};
use prestop_check::recommendation::{QueryError, Resolver};
use prestop_check::workload::{RoutingService, Workload};

use crate::cache::Recommendations;
use crate::inject;
use crate::review::{self, Subject};
use crate::routes::Routes;
use crate::tls::TlsListener;
use crate::verdict;

/// The API server sends objects of up to etcd's limit (1.5 MiB) as JSON,
/// with the old object on updates.
const BODY_LIMIT: usize = 4 << 20;

#[derive(Clone)]
pub struct Webhook {
    pub routes: Routes,
    pub recommendations: Recommendations,
    pub settings: inject::Settings,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Warn,
    Enforce,
    Inject(inject::Delay),
}

pub fn router(webhook: Webhook) -> Router {
    Router::new()
        .route("/validate", post(|s, r| answer(s, r, Mode::Warn)))
        .route(
            "/validate/enforce",
            post(|s, r| answer(s, r, Mode::Enforce)),
        )
        .route(
            "/mutate",
            post(|s, r| answer(s, r, Mode::Inject(inject::Delay::FixedSleep))),
        )
        .route(
            "/mutate/adaptive-drain",
            post(|s, r| answer(s, r, Mode::Inject(inject::Delay::AdaptiveDrain))),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(webhook)
}

/// Serves HTTPS on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TlsListener,
    webhook: Webhook,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(webhook))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Ready once the Services are listed: before that every workload would
/// look unrouted.
async fn readyz(State(w): State<Webhook>) -> (StatusCode, &'static str) {
    if w.routes.synced() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Services not listed yet\n")
    }
}

async fn answer(
    State(webhook): State<Webhook>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
    mode: Mode,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return Json(
                AdmissionResponse::invalid(format!("not an AdmissionReview request: {e}"))
                    .into_review(),
            );
        }
    };
    Json(webhook.respond(&req, mode).into_review())
}

impl Webhook {
    fn options(&self) -> Options {
        Options {
            drain_seconds: self.settings.drain_seconds,
            // Never fail on confidence: a low-confidence number warns.
            low_confidence: LowConfidence::Warn,
            fail_on_unknown: false,
            // Startup findings advise; they never deny a workload.
            fail_on_startup: false,
            hook_style: if self.settings.sleep_action {
                HookStyle::Sleep
            } else {
                HookStyle::Exec
            },
        }
    }

    fn respond(&self, req: &AdmissionRequest<DynamicObject>, mode: Mode) -> AdmissionResponse {
        let response = AdmissionResponse::from(req);
        let (workload, object) = match review::subject(req) {
            Ok(Subject::Check { workload, object }) => (workload, object),
            Ok(Subject::Skip(why)) => {
                tracing::debug!(kind = %req.kind.kind, name = %req.name, why, "left alone");
                return response;
            }
            Err(e) => {
                // Admitting is the safe answer: the API server validates the
                // object's schema itself.
                tracing::warn!(error = %e, "unreadable object admitted unchecked");
                return response;
            }
        };
        let services = self.routes.services_for(&workload);
        if services.is_empty() {
            return response;
        }
        if let Err(e) = self.recommendations.available() {
            return with_warnings(response, vec![verdict::unavailable(&e.0)]);
        }
        let outcome = match self.check(&workload, &services) {
            Ok(o) => o,
            Err(e) => return with_warnings(response, vec![verdict::unavailable(&e.to_string())]),
        };
        let style = self.options().hook_style;
        match mode {
            Mode::Warn => with_warnings(response, verdict::warnings(&workload, &outcome, style)),
            Mode::Enforce => match verdict::denial(&workload, &outcome, style) {
                Some(message) => {
                    let mut denied = response.deny(message);
                    denied.result.code = 403;
                    denied.result.reason = "Forbidden".into();
                    denied
                }
                None => with_warnings(response, verdict::warnings(&workload, &outcome, style)),
            },
            Mode::Inject(delay) => {
                let plan =
                    inject::plan(&workload, &object, &outcome.checked, &self.settings, delay);
                let response = with_warnings(response, plan.warnings);
                if plan.patch.0.is_empty() {
                    return response;
                }
                match response.clone().with_patch(plan.patch) {
                    Ok(patched) => patched,
                    Err(e) => {
                        tracing::error!(error = %e, "serialising a patch");
                        let failed = format!("prestop: nothing injected: {e}");
                        with_warnings(response, vec![failed])
                    }
                }
            }
        }
    }

    /// prestop-check's evaluation, over the cached recommendations (which
    /// answer every lookup: the error is the resolver's type, never seen).
    fn check(
        &self,
        w: &Workload,
        services: &[RoutingService],
    ) -> Result<WorkloadOutcome, QueryError> {
        let services: Vec<&RoutingService> = services.iter().collect();
        let mut resolver = Resolver::new(&self.recommendations);
        let file = "admission".to_string();
        check::workload(w, &services, &file, Some(&mut resolver), &self.options())
    }
}

fn with_warnings(mut response: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    response
}
