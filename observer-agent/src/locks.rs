//! The agent's one policy for a poisoned lock (a thread panicked while
//! holding it): keep going with the data as the panic left it, so that
//! observation and reporting do not stop, and make the panic visible: an
//! error log naming the lock and a counter served as
//! `prestop_agent_poisoned_locks_total` on `/metrics`.

use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicU64, Ordering},
};

static POISONED: AtomicU64 = AtomicU64::new(0);

/// Locks `mutex` (named `name` in the log); a poisoned lock is logged,
/// counted and taken anyway.
pub fn lock<'a, T>(mutex: &'a Mutex<T>, name: &'static str) -> MutexGuard<'a, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        let total = POISONED.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(
            lock = name,
            total,
            "a thread panicked while holding this lock; continuing with its data"
        );
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

/// Poisoned locks taken since the process started.
pub fn poisoned_total() -> u64 {
    POISONED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_counted_once_and_keeps_its_data() {
        let mutex = Mutex::new(7);
        let before = poisoned_total();
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = mutex.lock().unwrap();
                panic!("poison the lock");
            })
            .join()
        });
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex, "test"), 7);
        assert_eq!(poisoned_total(), before + 1);
        // Cleared: the next lock is an ordinary one.
        assert_eq!(*lock(&mutex, "test"), 7);
        assert_eq!(poisoned_total(), before + 1);
    }
}
