//! Recommendations reused until the data under them changes. CI asks the
//! same question many times during a rollout, and the answer changes only
//! when a deletion is recorded or pruned ([`Store::generation`]), or when
//! old samples leave the window as time passes (bounded by [`MAX_AGE`]).
//!
//! [`Store::generation`]: crate::store::Store::generation

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use observer_proto::api::Recommendation;

use crate::store::Scope;

/// Longest an answer is reused while nothing was recorded: samples older
/// than the window drop out with time alone.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// Distinct questions kept; past it the cache starts over.
const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Question {
    scope: Scope,
    quantile_bits: u64,
    confidence_bits: u64,
}

struct Answer {
    generation: u64,
    computed: Instant,
    recommendation: Recommendation,
}

#[derive(Default)]
pub struct RecommendationCache {
    answers: Mutex<HashMap<Question, Answer>>,
}

impl RecommendationCache {
    /// The answer for this question at store `generation`, computed by
    /// `compute` when none is fresh. The lock is not held while computing.
    pub fn get_or_compute<E>(
        &self,
        scope: Scope,
        quantile: f64,
        confidence: f64,
        generation: u64,
        compute: impl FnOnce(Scope) -> Result<Recommendation, E>,
    ) -> Result<Recommendation, E> {
        let question = Question {
            scope,
            quantile_bits: quantile.to_bits(),
            confidence_bits: confidence.to_bits(),
        };
        let now = Instant::now();
        if let Some(a) = self.lock().get(&question)
            && a.generation == generation
            && now.duration_since(a.computed) < MAX_AGE
        {
            return Ok(a.recommendation.clone());
        }
        let recommendation = compute(question.scope.clone())?;
        let mut answers = self.lock();
        if answers.len() >= MAX_ENTRIES {
            answers.clear();
        }
        answers.insert(
            question,
            Answer {
                generation,
                computed: now,
                recommendation: recommendation.clone(),
            },
        );
        Ok(recommendation)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Question, Answer>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::recommend::{Request, recommend};
    use crate::store::Samples;

    fn answer(scope: Scope, quantile: f64, samples: usize) -> Recommendation {
        let request = Request {
            cluster: "c".into(),
            scope,
            quantile,
            confidence: 0.95,
            margin_seconds: 1.0,
            window_seconds: 3600,
            min_coverage: 0.9,
        };
        let latencies = (1..=samples).map(|i| i as f64 / 10.0).collect();
        recommend(
            &request,
            &Samples {
                latencies,
                ..Samples::default()
            },
        )
    }

    fn ask(
        cache: &RecommendationCache,
        calls: &Cell<usize>,
        quantile: f64,
        generation: u64,
    ) -> Recommendation {
        cache
            .get_or_compute::<()>(Scope::default(), quantile, 0.95, generation, |scope| {
                calls.set(calls.get() + 1);
                Ok(answer(scope, quantile, calls.get()))
            })
            .unwrap()
    }

    #[test]
    fn the_same_question_at_the_same_generation_is_computed_once() {
        let (cache, calls) = (RecommendationCache::default(), Cell::new(0));
        let first = ask(&cache, &calls, 0.99, 7);
        let again = ask(&cache, &calls, 0.99, 7);
        assert_eq!(calls.get(), 1);
        assert_eq!(first, again);
    }

    #[test]
    fn a_new_generation_or_another_question_is_computed_again() {
        let (cache, calls) = (RecommendationCache::default(), Cell::new(0));
        ask(&cache, &calls, 0.99, 7);
        let newer = ask(&cache, &calls, 0.99, 8);
        assert_eq!(calls.get(), 2);
        assert_eq!(
            newer.samples, 2,
            "the answer computed for the new generation"
        );
        ask(&cache, &calls, 0.9, 8);
        assert_eq!(calls.get(), 3, "another quantile is another question");
    }

    #[test]
    fn failures_are_not_kept() {
        let cache = RecommendationCache::default();
        let failed: Result<Recommendation, &str> =
            cache.get_or_compute(Scope::default(), 0.99, 0.95, 1, |_| Err("store down"));
        assert_eq!(failed, Err("store down"));
        let calls = Cell::new(0);
        ask(&cache, &calls, 0.99, 1);
        assert_eq!(calls.get(), 1, "the failure was reused");
    }

    #[test]
    fn answers_expire_with_time_alone() {
        let (cache, calls) = (RecommendationCache::default(), Cell::new(0));
        ask(&cache, &calls, 0.99, 1);
        std::thread::sleep(MAX_AGE + Duration::from_millis(50));
        ask(&cache, &calls, 0.99, 1);
        assert_eq!(calls.get(), 2);
    }
}
