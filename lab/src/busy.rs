//! Every core busy, for tests and benches that measure timing on a loaded
//! node: one spinning thread per CPU at normal priority, bounded in time,
//! stopped when dropped.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub struct BusyCores {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl BusyCores {
    /// Starts `per_cpu` spinning threads per CPU (at least one), each
    /// stopping on its own after `max`.
    pub fn start(per_cpu: usize, max: Duration) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cpus * per_cpu.max(1))
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let began = Instant::now();
                    let mut spins = 0u64;
                    while !stop.load(Ordering::Relaxed) && began.elapsed() < max {
                        spins = std::hint::black_box(spins.wrapping_add(1));
                    }
                    spins
                })
            })
            .collect();
        BusyCores { stop, threads }
    }

    /// How many spinning threads run.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for BusyCores {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
