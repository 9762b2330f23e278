//! Whether the service is ready for traffic, as `/readyz` reports it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared flag: the binary clears it until the Kubernetes watchers have
/// listed once.
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
