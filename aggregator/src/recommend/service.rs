//! Recommendations as the service gives them: the samples of the retention
//! window read from the store, the configured defaults, and answers reused
//! until the data under them changes.

use std::sync::Arc;

use observer_proto::UnixNanos;
use observer_proto::api::Recommendation;

use super::cache::RecommendationCache;
use super::{Request, recommend};
use crate::config::Settings;
use crate::store::{Scope, Store, StoreError};

pub struct Recommender {
    store: Arc<Store>,
    settings: Arc<Settings>,
    cache: RecommendationCache,
}

impl Recommender {
    pub fn new(store: Arc<Store>, settings: Arc<Settings>) -> Self {
        Self {
            store,
            settings,
            cache: RecommendationCache::default(),
        }
    }

    /// The recommendation for one scope, computed from the deletions
    /// finished in the retention window before `now`.
    pub fn compute(
        &self,
        scope: Scope,
        quantile: f64,
        confidence: f64,
        now: UnixNanos,
    ) -> Result<Recommendation, StoreError> {
        let s = &self.settings;
        let samples = self.store.samples(&scope, now - s.retention)?;
        Ok(recommend(
            &Request {
                cluster: s.cluster_name.clone(),
                scope,
                quantile,
                confidence,
                margin_seconds: s.margin_seconds,
                window_seconds: s.retention.as_secs(),
                min_coverage: s.min_coverage,
            },
            &samples,
        ))
    }

    /// Like [`Recommender::compute`], reusing an answer while the store has
    /// not changed (see [`RecommendationCache`]).
    pub fn answer(
        &self,
        scope: Scope,
        quantile: f64,
        confidence: f64,
        now: UnixNanos,
    ) -> Result<Recommendation, StoreError> {
        let generation = self.store.generation();
        self.cache
            .get_or_compute(scope, quantile, confidence, generation, |scope| {
                self.compute(scope, quantile, confidence, now)
            })
    }
}
