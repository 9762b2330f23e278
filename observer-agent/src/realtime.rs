//! Scheduling of the threads that time what they receive: the dataplane
//! detectors (a rules change is timed when the commit's first notification
//! reaches its thread) and the conntrack new-flow reader. Their error is
//! their thread's wake-up delay: at normal priority on a node whose cores
//! are all busy that is the scheduler's, tens of milliseconds (up to 24 ms
//! measured here, docs/benchmarks.md); under SCHED_FIFO the thread runs
//! as soon as it is woken, ahead of ordinary work. These threads sleep in
//! `recv` and spend little CPU (a 10k-rule resync is ~30 ms), and the
//! kernel's real-time throttling keeps a share of every second for
//! ordinary threads whatever happens.

use std::io;

/// The agent's default SCHED_FIFO priority for the timing threads: above
/// ordinary threads, below the kernel's own real-time threads (50 and up
/// for threaded interrupts).
pub const DEFAULT_TIMING_PRIORITY: u8 = 10;

/// SCHED_FIFO priority of the timing threads, or their normal policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingPriority {
    Normal,
    Fifo(u8),
}

impl TimingPriority {
    /// From the command line's priority: 0 keeps the normal policy.
    pub fn from_level(level: u8) -> Self {
        match level {
            0 => TimingPriority::Normal,
            n => TimingPriority::Fifo(n),
        }
    }
}

/// Runs `start` on a short-lived thread with `priority`, so that the threads
/// it spawns inherit that policy (glibc creates threads with
/// PTHREAD_INHERIT_SCHED) while the caller's own threads keep theirs. When
/// the policy cannot be set (no CAP_SYS_NICE) `start` runs anyway, at normal
/// priority, and the reason is logged: the measurements then carry the
/// scheduler's delay on a busy node.
pub fn spawn_inheriting<T: Send>(
    priority: TimingPriority,
    what: &str,
    start: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let TimingPriority::Fifo(level) = priority {
                    match set_current_thread_fifo(level) {
                        Ok(()) => tracing::debug!(what, level, "timing threads under SCHED_FIFO"),
                        Err(e) => tracing::warn!(
                            what,
                            level,
                            error = %e,
                            "cannot run the timing threads under SCHED_FIFO (needs CAP_SYS_NICE): on a busy node their times can be late by the scheduler's delay"
                        ),
                    }
                }
                start()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Puts the calling thread under SCHED_FIFO at `level`.
pub fn set_current_thread_fifo(level: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(level),
    };
    // SAFETY: pid 0 is the calling thread; param is valid.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's (SCHED_* policy, priority).
    fn current_policy() -> io::Result<(i32, i32)> {
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; param is valid for writing.
        let policy = unsafe { libc::sched_getscheduler(0) };
        if policy < 0 || unsafe { libc::sched_getparam(0, &mut param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((policy, param.sched_priority))
    }

    #[test]
    fn spawned_threads_inherit_the_priority_and_the_caller_keeps_its_own() {
        let before = current_policy().unwrap();
        let inner = spawn_inheriting(TimingPriority::Fifo(3), "test", || {
            std::thread::spawn(|| current_policy().unwrap())
                .join()
                .unwrap()
        });
        assert_eq!(
            current_policy().unwrap(),
            before,
            "the caller's policy changed"
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(inner, (libc::SCHED_FIFO, 3));
        } else {
            // Without CAP_SYS_NICE: started anyway, at normal priority.
            assert_eq!(inner, before);
        }
        let normal = spawn_inheriting(TimingPriority::Normal, "test", || {
            std::thread::spawn(|| current_policy().unwrap())
                .join()
                .unwrap()
        });
        assert_eq!(normal, before);
    }

    #[test]
    fn level_zero_is_the_normal_policy() {
        assert_eq!(TimingPriority::from_level(0), TimingPriority::Normal);
        assert_eq!(TimingPriority::from_level(10), TimingPriority::Fifo(10));
    }
}
