//! A deletion's T0 is when its watch event arrived, also while the
//! aggregator's main runtime (`SCHED_IDLE`) is saturated and starves on a
//! busy node: the watch is read and stamped on a thread of its own at the
//! caller's priority, as the API server's TokenReview answers that gate
//! every caller are. Its own test binary: the busy loops would slow other tests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aggregator::config::Settings;
use apiserver_double::objects::endpoint_slice;
use common::lab::*;
use k8s_openapi::api::core::v1::Pod;
use observer_proto::UnixNanos;

/// How long every core is kept busy.
const BUSY: Duration = Duration::from_secs(4);
/// When, within that, the pod is deleted.
const DELETE_AFTER: Duration = Duration::from_millis(300);
/// T0 after the deletion request, at most. Starved, the main runtime would
/// read the event only once the busy loops end (about 3.7 s later).
const MAX_LAG: Duration = Duration::from_secs(1);

fn busy_threads(n: usize, until: Instant) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
        })
        .collect()
}

#[test]
fn t0_is_the_receipt_while_every_core_is_busy() {
    // The double and the simulated agent at normal priority, the
    // aggregator on its own runtime, started from this (normal) thread as
    // the binary's main thread starts it.
    let normal = tokio::runtime::Runtime::new().unwrap();
    let idle = aggregator::app::runtime().unwrap();
    let c = normal.block_on(cluster());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let settings = Settings {
        completion_timeout: Duration::from_secs(30),
        ..Settings::default()
    };
    let agg = idle.block_on(start_aggregator(settings, &store, Some(&c.double)));
    let mut agent = normal.block_on(Agent::connect(agg.grpc_addr, "node-a"));

    // The main runtime's workers busy, as agent reports keep them on a busy
    // node (started first: under SCHED_IDLE they get no core once the
    // other loops run), then every core.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinning = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let hard_stop = Instant::now() + 3 * BUSY;
    for _ in 0..cores {
        let (spinning, stop) = (Arc::clone(&spinning), Arc::clone(&stop));
        idle.spawn(async move {
            spinning.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                std::hint::spin_loop();
            }
        });
    }
    // One spinning task per worker (tokio's default count), all running.
    let deadline = Instant::now() + BUSY;
    while spinning.load(Ordering::SeqCst) < cores {
        assert!(
            Instant::now() < deadline,
            "the runtime's workers did not all start spinning"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let busy = busy_threads(2 * cores, Instant::now() + BUSY);
    std::thread::sleep(DELETE_AFTER);
    let requested = UnixNanos::now();
    c.double.delete::<Pod>("shop", "web-1", 30).unwrap();
    c.double
        .update(&endpoint_slice("shop", "web", &[(&c.web1, false, true)]))
        .unwrap();
    // A reader's first query needs the API server's TokenReview: answered
    // while the main runtime starves.
    let asked = Instant::now();
    let (status, body) = normal.block_on(common::get(agg.http_addr, "/v1/deletions"));
    let review = asked.elapsed();
    let answered_while_busy = busy.iter().any(|t| !t.is_finished());
    for t in busy {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);

    let ep = normal
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), agent.next_add()).await })
        .expect("the deletion reached the agent");
    let t0 = UnixNanos::from_wire(ep.deletion_start_unix_nanos).expect("T0 on the wire");
    let lag = t0 - requested;
    assert!(
        (0..MAX_LAG.as_nanos() as i64).contains(&lag),
        "T0 {lag} ns after the deletion request (at most {MAX_LAG:?}; the busy loops ran {BUSY:?})"
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        answered_while_busy && review < MAX_LAG,
        "a reader's first query took {review:?} (the busy loops ran {BUSY:?})"
    );
    drop(agent);
    idle.block_on(agg.shutdown());
}
