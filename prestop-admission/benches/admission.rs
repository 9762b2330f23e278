//! Admission answer latency for docs/benchmarks.md:
//! `cargo bench -p prestop-admission`.
//!
//! The webhook over HTTPS on loopback, knowing 2000 Services in 40
//! namespaces, its cache refreshed from the real aggregator (300 deletions
//! of shop/web); CONCURRENCY clients on keep-alive connections post
//! AdmissionReview v1 requests for a routed Deployment whose preStop is
//! short (so every answer carries findings and the fix) to `/validate`,
//! then `/mutate`, for BENCH_SECONDS (default 5) each: first back to back
//! (saturation: the throughput, and latency that is mostly queueing behind
//! the other 15 clients), then paced, each client one request every
//! BENCH_PACE_MS (default 100: 160 requests/s in all, above the admission
//! rate of a busy cluster's API server). The latency is the client's: request written to
//! answer read.

#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Env, Options, request, routed, service, services};

const CONCURRENCY: usize = 16;
const NAMESPACES: usize = 40;
const SERVICES_PER_NAMESPACE: usize = 50;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let pace = Duration::from_millis(
        std::env::var("BENCH_PACE_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100),
    );
    let mut known = services();
    for ns in 0..NAMESPACES {
        for s in 0..SERVICES_PER_NAMESPACE {
            known.push(service(
                &format!("ns-{ns}"),
                &format!("svc-{s}"),
                &format!("app-{s}"),
            ));
        }
    }
    let env = Env::start(Options {
        services: known,
        ..Options::default()
    });
    let obj = routed("Deployment", None, None);
    let review = request("CREATE", &obj);
    println!(
        "{} Services known, {CONCURRENCY} concurrent clients over HTTPS, {seconds} s per path, paced every {pace:?}",
        NAMESPACES * SERVICES_PER_NAMESPACE + 2
    );
    for (path, paced) in [
        ("/validate", false),
        ("/mutate", false),
        ("/validate", true),
        ("/mutate", true),
    ] {
        // Warm-up: connections and handshakes.
        for _ in 0..CONCURRENCY {
            env.review(path, &review);
        }
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..CONCURRENCY)
                .map(|_| {
                    scope.spawn(|| {
                        let mut own = Vec::new();
                        let mut next = Instant::now();
                        while Instant::now() < until {
                            if paced {
                                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                                next += pace;
                            }
                            let start = Instant::now();
                            let r = env.review(path, &review);
                            own.push(start.elapsed());
                            assert!(r.warnings.is_some(), "every answer has findings");
                        }
                        own
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        latencies.sort();
        let at =
            |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)];
        println!(
            "{path} {}: {} answers, {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            if paced { "paced" } else { "saturating" },
            latencies.len(),
            latencies.len() as f64 / seconds as f64,
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
        );
    }
}
