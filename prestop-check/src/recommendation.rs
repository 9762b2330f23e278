//! The aggregator's recommendation API (docs/api.md) and the fallback from
//! a Service's own measurements to broader scopes.
//!
//! The JSON is read into the types the aggregator writes it with
//! (`observer_proto::api`): one declaration, every field defaulted so an
//! aggregator a version ahead or behind still reads; the protocol crate
//! builds no Kubernetes client and no SQLite. tests/cli.rs reads the real
//! aggregator's answers over HTTP.

use std::collections::HashMap;
use std::time::Duration;

pub use observer_proto::api::startup::StartupReport;
pub use observer_proto::api::{KeepAlive, Recommendation, ScopeView as Scope};

/// What a scope is, in words.
pub fn describe(scope: &Scope) -> String {
    match (&scope.namespace, &scope.service) {
        (Some(ns), Some(svc)) => format!("service {ns}/{svc}"),
        (Some(ns), None) => format!("namespace {ns}"),
        _ => "the whole cluster".to_string(),
    }
}

/// One line a reviewer can check: where the number comes from.
pub fn why(r: &Recommendation) -> String {
    let mut s = format!(
        "p{} at {}% confidence over {} deletions of {}",
        percent(r.quantile),
        percent(r.confidence),
        r.samples,
        describe(&r.scope)
    );
    if r.window_seconds > 0 {
        s += &format!(" in the last {}", fmt_window(r.window_seconds));
    }
    if let (Some(p50), Some(p99), Some(max)) = (
        r.observed_p50_seconds,
        r.observed_p99_seconds,
        r.observed_max_seconds,
    ) {
        s += &format!(" (observed p50 {p50:.2}s, p99 {p99:.2}s, max {max:.2}s)");
    }
    if r.margin_seconds > 0.0 {
        s += &format!(", margin {}s", r.margin_seconds);
    }
    if r.at_least {
        s += &format!(
            "; AT LEAST: {} deletions were still routed to when they timed out, so the delay must be at least this long",
            r.censored
        );
    } else if r.low_confidence {
        s += &format!("; LOW CONFIDENCE: {} more samples needed", r.samples_needed);
    }
    s
}

/// 0.9 * 100.0 is 90.00000000000001 in binary floating point.
fn percent(fraction: f64) -> f64 {
    (fraction * 100.0 * 1e6).round() / 1e6
}

fn fmt_window(seconds: u64) -> String {
    match seconds {
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("aggregator unreachable at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("aggregator at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("aggregator at {url} sent an unreadable answer: {message}")]
    Body { url: String, message: String },
}

/// Asks one scope; `Ok(None)` when the source has no answer for it.
pub trait Source {
    fn query(
        &self,
        namespace: Option<&str>,
        service: Option<&str>,
    ) -> Result<Option<Recommendation>, QueryError>;

    /// New pods' startup findings of one workload (`namespace/owner`);
    /// `Ok(None)` when the source has none to give.
    fn startup(
        &self,
        _namespace: &str,
        _workload: &str,
    ) -> Result<Option<StartupReport>, QueryError> {
        Ok(None)
    }
}

pub struct HttpSource {
    base: String,
    quantile: Option<f64>,
    confidence: Option<f64>,
    /// Sent as a bearer token (an aggregator with
    /// --protect-recommendations checks it).
    token: Option<String>,
    agent: ureq::Agent,
}

/// How prestop-check shows itself to the aggregator.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// A ServiceAccount token for the aggregator's audience.
    pub token: Option<String>,
    /// PEM CA certificates an `https://` aggregator must chain to (default:
    /// the Mozilla roots).
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[error("--ca-file: {0}")]
pub struct CaError(String);

impl HttpSource {
    pub fn new(
        base: &str,
        quantile: Option<f64>,
        confidence: Option<f64>,
        timeout: Duration,
        access: Access,
    ) -> Result<Self, CaError> {
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false);
        if let Some(pem) = &access.ca_pem {
            let certs = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(CaError(e.to_string()))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if certs.is_empty() {
                return Err(CaError("no PEM certificate in it".into()));
            }
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            quantile,
            confidence,
            token: access.token,
            agent: config.build().into(),
        })
    }
}

impl HttpSource {
    /// GET `path` with the parameters that are set: the status and body.
    fn get(
        &self,
        path: &str,
        params: &[(&str, Option<String>)],
    ) -> Result<(String, u16, String), QueryError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (k, v) in params {
            if let Some(v) = v {
                request = request.query(*k, v);
            }
        }
        let mut response = request.call().map_err(|e| QueryError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| QueryError::Body {
                url: url.clone(),
                message: e.to_string(),
            })?;
        Ok((url, status, body))
    }
}

fn decode<T: serde::de::DeserializeOwned>(url: String, body: &str) -> Result<T, QueryError> {
    serde_json::from_str(body).map_err(|e| QueryError::Body {
        url,
        message: e.to_string(),
    })
}

impl Source for HttpSource {
    fn query(
        &self,
        namespace: Option<&str>,
        service: Option<&str>,
    ) -> Result<Option<Recommendation>, QueryError> {
        let (url, status, body) = self.get(
            "/v1/recommendations",
            &[
                ("namespace", namespace.map(str::to_string)),
                ("service", service.map(str::to_string)),
                ("quantile", self.quantile.map(|q| q.to_string())),
                ("confidence", self.confidence.map(|c| c.to_string())),
            ],
        )?;
        // The aggregator says "no measurements" with a 200 and a null
        // `preStopSeconds`; any other status (a 404 from a wrong path or a
        // proxy included) is an error, never "no data".
        match status {
            200 => decode(url, &body).map(Some),
            _ => Err(QueryError::Status { url, status, body }),
        }
    }

    /// Reading startup findings needs `get deletions` (they name pods): a
    /// caller without it (401, 403) or an aggregator without the endpoint
    /// (404) gets none, which `prestop-check` says.
    fn startup(
        &self,
        namespace: &str,
        workload: &str,
    ) -> Result<Option<StartupReport>, QueryError> {
        let (url, status, body) = self.get(
            "/v1/startup",
            &[
                ("namespace", Some(namespace.to_string())),
                ("workload", Some(workload.to_string())),
                ("limit", Some("0".to_string())),
            ],
        )?;
        match status {
            200 => decode(url, &body).map(Some),
            401 | 403 | 404 => Ok(None),
            _ => Err(QueryError::Status { url, status, body }),
        }
    }
}

/// Per-service lookups with caching, falling back from the Service to its
/// namespace to the cluster: propagation latency is mostly a property of
/// the nodes, so a broader measured scope is a sound stand-in for a Service
/// with few deletions of its own.
pub struct Resolver<'s> {
    source: &'s dyn Source,
    cache: HashMap<(Option<String>, Option<String>), Option<Recommendation>>,
}

impl<'s> Resolver<'s> {
    pub fn new(source: &'s dyn Source) -> Self {
        Self {
            source,
            cache: HashMap::new(),
        }
    }

    /// The first confident recommendation among the scopes, else the first
    /// one with a number (low confidence), else the narrowest answer (no
    /// samples at all).
    pub fn resolve(
        &mut self,
        namespace: &str,
        service: &str,
    ) -> Result<Option<Recommendation>, QueryError> {
        let scopes = [
            (Some(namespace), Some(service)),
            (Some(namespace), None),
            (None, None),
        ];
        let mut answers = Vec::new();
        for (ns, svc) in scopes {
            let rec = self.cached(ns, svc)?;
            if let Some(r) = &rec
                && r.pre_stop_seconds.is_some()
                && !r.low_confidence
            {
                return Ok(rec);
            }
            answers.extend(rec);
        }
        let with_number = answers.iter().position(|r| r.pre_stop_seconds.is_some());
        Ok(match with_number {
            Some(i) => Some(answers.swap_remove(i)),
            None => answers.into_iter().next(),
        })
    }

    /// New pods' startup findings of `namespace/owner` (see
    /// [`Source::startup`]).
    pub fn startup(
        &self,
        namespace: &str,
        workload: &str,
    ) -> Result<Option<StartupReport>, QueryError> {
        self.source.startup(namespace, workload)
    }

    /// The Service's own answer, whatever its confidence.
    pub fn own(
        &mut self,
        namespace: &str,
        service: &str,
    ) -> Result<Option<Recommendation>, QueryError> {
        self.cached(Some(namespace), Some(service))
    }

    fn cached(
        &mut self,
        ns: Option<&str>,
        svc: Option<&str>,
    ) -> Result<Option<Recommendation>, QueryError> {
        let key = (ns.map(str::to_string), svc.map(str::to_string));
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit.clone());
        }
        let rec = self.source.query(ns, svc)?;
        self.cache.insert(key, rec.clone());
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<Recommendation>);

    impl Source for Fixed {
        fn query(
            &self,
            ns: Option<&str>,
            svc: Option<&str>,
        ) -> Result<Option<Recommendation>, QueryError> {
            Ok(self
                .0
                .iter()
                .find(|r| r.scope.namespace.as_deref() == ns && r.scope.service.as_deref() == svc)
                .cloned())
        }
    }

    fn rec(ns: Option<&str>, svc: Option<&str>, secs: Option<u64>, low: bool) -> Recommendation {
        Recommendation {
            scope: Scope {
                cluster: "c".into(),
                namespace: ns.map(Into::into),
                service: svc.map(Into::into),
            },
            pre_stop_seconds: secs,
            low_confidence: low,
            ..Default::default()
        }
    }

    #[test]
    fn confident_service_scope_wins() {
        let src = Fixed(vec![
            rec(Some("a"), Some("s"), Some(4), false),
            rec(None, None, Some(9), false),
        ]);
        let r = Resolver::new(&src).resolve("a", "s").unwrap().unwrap();
        assert_eq!(r.pre_stop_seconds, Some(4));
    }

    #[test]
    fn falls_back_to_confident_cluster_scope() {
        let src = Fixed(vec![
            rec(Some("a"), Some("s"), Some(2), true),
            rec(None, None, Some(6), false),
        ]);
        let r = Resolver::new(&src).resolve("a", "s").unwrap().unwrap();
        assert_eq!(r.scope.namespace, None);
        assert_eq!(r.pre_stop_seconds, Some(6));
    }

    #[test]
    fn low_confidence_number_beats_no_samples() {
        let src = Fixed(vec![
            rec(Some("a"), Some("s"), None, true),
            rec(None, None, Some(3), true),
        ]);
        let r = Resolver::new(&src).resolve("a", "s").unwrap().unwrap();
        assert_eq!((r.pre_stop_seconds, r.low_confidence), (Some(3), true));
    }

    #[test]
    fn parses_the_api_document() {
        let json = r#"{"scope":{"cluster":"prod","namespace":"shop","service":"web"},
            "preStopSeconds":7,"quantile":0.99,"confidence":0.95,"marginSeconds":1,
            "samples":412,"samplesNeeded":299,"windowSeconds":604800,
            "observedP50Seconds":1.2,"observedP99Seconds":5.8,"observedMaxSeconds":6.3,
            "lowConfidence":false,"reason":"ok",
            "lifecycle":{"preStop":{"sleep":{"seconds":7}}},
            "keepAlive":{"abortedConnections":0,"finding":null}}"#;
        let r: Recommendation = serde_json::from_str(json).unwrap();
        assert_eq!(r.pre_stop_seconds, Some(7));
        assert!(
            why(&r).contains("412 deletions of service shop/web in the last 7d"),
            "{}",
            why(&r)
        );
        let r = Recommendation {
            quantile: 0.9,
            confidence: 0.999,
            ..r
        };
        assert!(
            why(&r).starts_with("p90 at 99.9% confidence"),
            "{}",
            why(&r)
        );
    }
}
