//! The aggregator's recommendations, copied in the background so that an
//! admission answer is a memory lookup.
//!
//! Every `--refresh-interval` the refresher asks the aggregator's API
//! (`GET /v1/recommendations`, the questions prestop-check asks) for the
//! cluster, every namespace with a routing Service and every routing
//! Service, and swaps the answers in at once. A failed round keeps the
//! previous answers (recommendations move slowly; the age is reported) and
//! records the error. A Service created since the last round has no answer
//! of its own yet: the lookup falls back to its namespace and the cluster,
//! as prestop-check's resolver does for a Service with few deletions.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use observer_proto::api::Recommendation;
use prestop_check::recommendation::{QueryError, Source};

/// A scope: `(namespace, service)`, both `None` for the cluster.
pub type ScopeKey = (Option<String>, Option<String>);

#[derive(Default)]
struct State {
    answers: HashMap<ScopeKey, Recommendation>,
    /// When the answers were last replaced; `None` until the first success.
    refreshed: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Clone, Default)]
pub struct Recommendations {
    inner: Arc<RwLock<State>>,
}

/// Why an answer cannot be checked against a recommendation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl Recommendations {
    /// A cache holding `answers` as if just refreshed (tests, benchmarks).
    pub fn of(answers: impl IntoIterator<Item = Recommendation>) -> Self {
        let cache = Self::default();
        cache.replace(
            answers
                .into_iter()
                .map(|r| ((r.scope.namespace.clone(), r.scope.service.clone()), r))
                .collect(),
        );
        cache
    }

    /// `Err` until a refresh has succeeded once: then nothing can be said
    /// about any workload, which is not the same as "no measurements".
    pub fn available(&self) -> Result<(), Unavailable> {
        let s = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match (&s.refreshed, &s.last_error) {
            (Some(_), _) => Ok(()),
            (None, Some(e)) => Err(Unavailable(format!(
                "no recommendation from the aggregator yet ({e})"
            ))),
            (None, None) => Err(Unavailable(
                "no recommendation from the aggregator yet (first refresh pending)".into(),
            )),
        }
    }

    /// Age of the answers, `None` before the first refresh.
    pub fn age(&self) -> Option<Duration> {
        let s = self.inner.read().unwrap_or_else(|e| e.into_inner());
        s.refreshed.map(|t| t.elapsed())
    }

    fn replace(&self, answers: HashMap<ScopeKey, Recommendation>) {
        let mut s = self.inner.write().unwrap_or_else(|e| e.into_inner());
        s.answers = answers;
        s.refreshed = Some(Instant::now());
        s.last_error = None;
    }

    /// Records why a refresh failed; the previous answers stay.
    pub fn failed(&self, why: String) {
        let mut s = self.inner.write().unwrap_or_else(|e| e.into_inner());
        s.last_error = Some(why);
    }

    /// One refresh round: every scope asked of `source`, swapped in only
    /// when all answered.
    pub fn refresh(
        &self,
        source: &dyn Source,
        scopes: impl IntoIterator<Item = ScopeKey>,
    ) -> Result<usize, QueryError> {
        let round = || -> Result<HashMap<ScopeKey, Recommendation>, QueryError> {
            let mut answers = HashMap::new();
            for (ns, svc) in scopes {
                if let Some(r) = source.query(ns.as_deref(), svc.as_deref())? {
                    answers.insert((ns, svc), r);
                }
            }
            Ok(answers)
        };
        match round() {
            Ok(answers) => {
                let n = answers.len();
                self.replace(answers);
                Ok(n)
            }
            Err(e) => {
                self.failed(e.to_string());
                Err(e)
            }
        }
    }
}

/// The scopes a refresh asks for: the cluster, each namespace with a
/// routing Service, each routing Service.
pub fn scopes(services: &[(String, String)]) -> Vec<ScopeKey> {
    let mut namespaces: Vec<&String> = services.iter().map(|(ns, _)| ns).collect();
    namespaces.sort();
    namespaces.dedup();
    std::iter::once((None, None))
        .chain(namespaces.into_iter().map(|ns| (Some(ns.clone()), None)))
        .chain(
            services
                .iter()
                .map(|(ns, svc)| (Some(ns.clone()), Some(svc.clone()))),
        )
        .collect()
}

/// Lookups never fail: a scope without an answer is `None`, and the
/// resolver falls back to a broader one.
impl Source for Recommendations {
    fn query(
        &self,
        namespace: Option<&str>,
        service: Option<&str>,
    ) -> Result<Option<Recommendation>, QueryError> {
        let s = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.map(str::to_string), service.map(str::to_string));
        Ok(s.answers.get(&key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use observer_proto::api::ScopeView;

    use super::*;

    struct Failing;

    impl Source for Failing {
        fn query(
            &self,
            _: Option<&str>,
            _: Option<&str>,
        ) -> Result<Option<Recommendation>, QueryError> {
            Err(QueryError::Unreachable {
                url: "http://aggregator/v1/recommendations".into(),
                message: "connection refused".into(),
            })
        }
    }

    fn cluster(seconds: u64) -> Recommendation {
        Recommendation {
            scope: ScopeView {
                cluster: "c".into(),
                ..ScopeView::default()
            },
            pre_stop_seconds: Some(seconds),
            ..Recommendation::default()
        }
    }

    #[test]
    fn a_failed_round_keeps_the_previous_answers_and_says_why_before_any() {
        let cache = Recommendations::default();
        assert!(cache.refresh(&Failing, scopes(&[])).is_err());
        let Unavailable(why) = cache.available().unwrap_err();
        assert!(why.contains("connection refused"), "{why}");
        cache
            .refresh(&Recommendations::of([cluster(7)]), scopes(&[]))
            .unwrap();
        assert!(cache.refresh(&Failing, scopes(&[])).is_err());
        assert_eq!(cache.available(), Ok(()));
        let kept = cache.query(None, None).unwrap().unwrap();
        assert_eq!(kept.pre_stop_seconds, Some(7));
        assert_eq!(cache.query(Some("shop"), None).unwrap(), None);
    }

    #[test]
    fn scopes_cover_the_cluster_namespaces_and_services_once() {
        let services = [
            ("shop".to_string(), "web".to_string()),
            ("shop".to_string(), "api".to_string()),
        ];
        assert_eq!(
            scopes(&services),
            [
                (None, None),
                (Some("shop".into()), None),
                (Some("shop".into()), Some("web".into())),
                (Some("shop".into()), Some("api".into())),
            ]
        );
    }
}
