//! Aggregator numbers for docs/benchmarks.md: `cargo bench -p aggregator`.
//!
//! - ingest: node-reports per second over real gRPC sockets from 500 and
//!   5000 simulated agents (multiplexed over a few connections), each report
//!   carrying observations for deletions in flight; and the correlator alone
//!   (no gRPC) for comparison;
//! - recommendation query latency (HTTP, p50/p99) idle and under that load,
//!   with 10k deletions in the store, the same question again and again (as
//!   CI asks it; answered from the cache) and every time another one;
//! - resident memory with 5000 nodes, 10k stored deletions and deletions in
//!   flight that every node reported on;
//! - the deletion API's answers, size and latency: pages of summaries over
//!   the 10k stored deletions, and the detail of one deletion that 5000
//!   nodes reported on, whole and filtered.
//!
//! BENCH_SECONDS (default 3) sets each load phase's length.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aggregator::app;
use aggregator::config::Settings;
use aggregator::correlate::{DeletionStart, Registration};
use aggregator::http::HttpState;
use aggregator::limits::Limits;
use aggregator::nodes::NodeInfo;
use aggregator::store::{Scope, Store};
use lab::http_client::HttpClient;
use observer_proto::api::{DeletionList, DeletionRecord, Mode, NodeClass, NodeMeasurement};
use observer_proto::v1 as pb;
use observer_proto::v1::observer_client::ObserverClient;
use observer_proto::{Detector, NewFlow, Observation, Report, RulesChange, UnixNanos};

const CONNECTIONS: usize = 16;
const QUERY_EVERY: Duration = Duration::from_millis(2);
const TASKS_PER_CONNECTION: usize = 8;
const IN_FLIGHT_DELETIONS: usize = 200;
const OBSERVATIONS_PER_REPORT: usize = 4;

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let secs: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // The aggregator's own runtime: its threads run under SCHED_IDLE, below
    // the HTTP API's thread.
    let rt = aggregator::app::runtime().unwrap();
    rt.block_on(run(Duration::from_secs(secs)));
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

fn deletion_start(i: usize) -> DeletionStart {
    DeletionStart {
        pod_uid: format!("bench-{i}"),
        namespace: "bench".into(),
        pod_name: format!("pod-{i}"),
        services: vec!["svc".into()],
        ip: pod_ip(i).parse().unwrap(),
        ports: vec![8080],
        host_node: Some("node-0".into()),
        received_unix_nanos: Some(UnixNanos::now()),
        api_start_unix_nanos: None,
        grace_period_seconds: Some(30),
        terminating_unix_nanos: None,
    }
}

fn stored(i: usize, now: UnixNanos) -> DeletionRecord {
    DeletionRecord {
        pod_uid: format!("stored-{i}"),
        namespace: format!("ns-{}", i % 10),
        pod_name: format!("pod-{i}"),
        services: vec![format!("svc-{}", i % 50)],
        pod_ip: pod_ip(i),
        host_node: Some(format!("node-{}", i % 5000)),
        deletion_start_unix_nanos: now - 10_000_000_000,
        api_deletion_start_unix_nanos: None,
        grace_period_seconds: Some(30),
        control_plane_seconds: Some(0.02),
        complete: true,
        propagation_seconds: Some(0.2 + (i % 97) as f64 / 40.0),
        propagation_upper_seconds: Some(0.2 + (i % 97) as f64 / 40.0),
        finished_unix_nanos: now - i64::try_from(i).unwrap(),
        nodes: (0..3)
            .map(|n| NodeMeasurement {
                node: format!("node-{n}"),
                latency_seconds: Some(0.5),
                mode: Some(Mode::Rules(Detector::Nftables)),
                ..Default::default()
            })
            .collect(),
        missing_nodes: vec![],
        ..Default::default()
    }
}

/// One node's report on the endpoint of in-flight deletion `k`: its rules
/// removal and new flows to it.
fn observations(k: usize, now: UnixNanos) -> Vec<Observation> {
    let ip = pod_ip(k % IN_FLIGHT_DELETIONS).parse().unwrap();
    let endpoint = SocketAddr::new(ip, 8080);
    (0..OBSERVATIONS_PER_REPORT)
        .map(|j| {
            if j == 0 {
                Observation::RulesRemoved(RulesChange {
                    endpoint,
                    detector: Detector::Nftables,
                    time: now,
                    precision_ns: 1000,
                })
            } else {
                Observation::NewFlow(NewFlow {
                    src: SocketAddr::new("10.1.0.7".parse().unwrap(), 40000 + j as u16),
                    dst: endpoint,
                    original_dst: "10.96.0.1:80".parse().unwrap(),
                    time: now,
                })
            }
        })
        .collect()
}

fn report(agent: &str, seq: u64, k: usize) -> pb::ReportRequest {
    let now = UnixNanos::now();
    Report {
        agent_id: agent.into(),
        sequence: seq,
        observations: observations(k, now),
        counters: Default::default(),
        clock: Some(observer_proto::ClockEstimate {
            offset_ns: 0,
            uncertainty_ns: 10_000,
        }),
        sent: now,
    }
    .into()
}

async fn run(phase: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("bench.db")).unwrap());
    let now = UnixNanos::now();
    let t = Instant::now();
    for i in 0..10_000 {
        store.record_deletion(&stored(i, now)).unwrap();
    }
    println!(
        "store: 10000 deletions recorded in {:.2?} ({:.0}/s)",
        t.elapsed(),
        10_000.0 / t.elapsed().as_secs_f64()
    );

    let direct = HttpState::new(Arc::clone(&store), Settings::default());
    let now = UnixNanos::now();
    let mut calls = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let scope = Scope {
            namespace: Some("ns-3".into()),
            service: Some("svc-3".into()),
            ..Scope::default()
        };
        let r = direct.recommender.compute(scope, 0.99, 0.95, now).unwrap();
        assert_eq!(r.samples, 200);
        calls.push(t.elapsed());
    }
    println!(
        "recommendation in-process (store query + bound, 200 samples): {}",
        summary(&calls)
    );

    // Throughput of the service itself: rates far above what it serves.
    let fast = std::num::NonZeroU32::new(1_000_000_000).unwrap();
    let settings = Settings {
        completion_timeout: Duration::from_secs(3600),
        limits: Limits {
            registrations_per_second: fast,
            node_registrations_per_minute: fast,
            reports_per_second: fast,
            agent_reports_per_second: fast,
            ..Limits::DEFAULT
        },
        ..Settings::default()
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agg = app::start(settings, Arc::clone(&store), grpc, http, None).unwrap();
    for i in 0..IN_FLIGHT_DELETIONS {
        agg.correlator
            .deletion_started(deletion_start(i), UnixNanos::now());
    }
    for n in 0..5000 {
        agg.correlator.set_node(
            format!("node-{n}"),
            NodeInfo {
                addresses: vec![format!("192.168.{}.{}", n / 256, n % 256).parse().unwrap()],
                pod_cidrs: vec![],
            },
        );
    }

    let idle = query_latencies(agg.http_addr, phase / 2, false).await;
    println!("query idle: {}", summary(&idle));
    let idle = query_latencies(agg.http_addr, phase / 2, true).await;
    println!(
        "query idle, every query another question: {}",
        summary(&idle)
    );
    deletion_api(agg.http_addr, &store).await;

    let channels: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..CONNECTIONS {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", agg.grpc_addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
            v.push(ObserverClient::new(ch));
        }
        v
    };
    // (agents, paced rate in reports/s or None for as fast as possible,
    // streaming ReportStream instead of unary Report)
    let phases = [
        (500usize, None, false),
        (5000, None, false),
        (5000, Some(5000.0), false),
        (500, None, true),
        (5000, None, true),
    ];
    let mut seq_base = 0u64;
    for (agents, pace, streaming) in phases {
        let ids: Vec<String> = (0..agents)
            .map(|i| format!("node-{i}/bench-{agents}"))
            .collect();
        let t = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let r = channels[i % CONNECTIONS]
                .clone()
                .register(pb::RegisterRequest {
                    agent_id: id.clone(),
                    node_name: format!("node-{i}"),
                    kernel_release: "6.18".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            // Acknowledged is durable only (up to the last checkpoint):
            // sequences continue from what the workers sent.
            seq_base = seq_base.max(r.acknowledged_sequence);
        }
        println!("{agents} agents: registered in {:.2?}", t.elapsed());
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let ids = Arc::new(ids);
        let mut tasks = Vec::new();
        let workers = CONNECTIONS * TASKS_PER_CONNECTION;
        for w in 0..workers {
            let mut client = channels[w % CONNECTIONS].clone();
            let (stop, count, ids) = (Arc::clone(&stop), Arc::clone(&count), Arc::clone(&ids));
            tasks.push(tokio::spawn(async move {
                // Worker w owns agents w, w + workers, ...: sequences stay
                // per agent (and continue after earlier phases).
                let mine: Vec<usize> = (w..ids.len()).step_by(workers).collect();
                let mut seq = vec![seq_base; mine.len()];
                let mut pacer = pace.map(|rate: f64| {
                    let mut i =
                        tokio::time::interval(Duration::from_secs_f64(workers as f64 / rate));
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                if streaming {
                    return stream_reports(&mut client, &ids, &mine, seq, &stop, &count).await;
                }
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(p) = pacer.as_mut() {
                        p.tick().await;
                    }
                    let j = k % mine.len();
                    seq[j] += 1;
                    let r = client
                        .report(report(&ids[mine[j]], seq[j], k))
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(!r.duplicate);
                    count.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
                seq.into_iter().max().unwrap_or(0)
            }));
        }
        let t = Instant::now();
        let under_load = if agents == 5000 {
            Some((
                query_latencies(agg.http_addr, phase / 2, false).await,
                query_latencies(agg.http_addr, phase / 2, true).await,
            ))
        } else {
            tokio::time::sleep(phase).await;
            None
        };
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            seq_base = seq_base.max(t.await.unwrap());
        }
        let n = count.load(Ordering::Relaxed);
        let secs = t.elapsed().as_secs_f64();
        let how = match (streaming, pace) {
            (true, _) => "ReportStream, as fast as possible".to_string(),
            (false, None) => "unary Report, as fast as possible".to_string(),
            (false, Some(r)) => format!("unary Report, paced at {r:.0}/s"),
        };
        println!(
            "ingest {agents} agents over gRPC, {how}: {n} reports in {secs:.2}s = {:.0} node-reports/s ({:.0} observations/s)",
            n as f64 / secs,
            (n as usize * OBSERVATIONS_PER_REPORT) as f64 / secs
        );
        if let Some((same, distinct)) = under_load {
            println!("query during that ingest: {}", summary(&same));
            println!(
                "query during that ingest, every query another question: {}",
                summary(&distinct)
            );
        }
    }

    // The correlator alone: the ceiling without gRPC and HTTP/2.
    let c = &agg.correlator;
    for i in 0..5000 {
        let reg = Registration {
            agent_id: format!("direct-{i}"),
            node_name: format!("node-{i}"),
            ..Registration::default()
        };
        c.register(reg, UnixNanos::now()).unwrap();
    }
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < phase {
        for i in 0..5000 {
            let tn = UnixNanos::now();
            let b = Report {
                agent_id: format!("direct-{i}"),
                sequence: n / 5000 + 1,
                observations: observations(n as usize + i, tn),
                counters: Default::default(),
                clock: None,
                sent: tn,
            };
            c.report(b, tn).unwrap();
        }
        n += 5000;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ingest 5000 agents, correlator only (no gRPC): {:.0} node-reports/s",
        n as f64 / secs
    );
    // What the last second of that left for a checkpoint (the periodic one
    // runs meanwhile, so this holds what changed since it).
    let cp = c.checkpoint(UnixNanos::now()).unwrap();
    println!(
        "checkpoint after that ingest: {} node accumulators, {} agents; snapshot (state lock held) {:.2?}, write {:.2?}",
        cp.node_accumulators, cp.agents, cp.snapshot, cp.write
    );

    // Memory: every one of 5000 nodes has reported on every deletion in flight.
    println!(
        "memory: 5000 nodes registered, {} stored deletions, {} deletions in flight x 5000 node reports: VmRSS {} (peak {})",
        store.len().unwrap(),
        c.pending(),
        proc_status("VmRSS"),
        proc_status("VmHWM"),
    );
    drop(channels);
    agg.shutdown().await;
}

/// One ReportStream per worker: reports are pipelined (up to the channel's
/// capacity in flight) and acknowledged in order on the response stream.
async fn stream_reports(
    client: &mut ObserverClient<tonic::transport::Channel>,
    ids: &Arc<Vec<String>>,
    mine: &[usize],
    mut seq: Vec<u64>,
    stop: &Arc<AtomicBool>,
    count: &Arc<AtomicU64>,
) -> u64 {
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    let mut responses = client
        .report_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (ids, mine, stop) = (Arc::clone(ids), mine.to_vec(), Arc::clone(stop));
    let producer = tokio::spawn(async move {
        let mut k = 0;
        while !stop.load(Ordering::Relaxed) {
            let j = k % mine.len();
            seq[j] += 1;
            if tx.send(report(&ids[mine[j]], seq[j], k)).await.is_err() {
                break;
            }
            k += 1;
        }
        seq.into_iter().max().unwrap_or(0)
    });
    while let Some(r) = responses.message().await.unwrap() {
        assert!(!r.duplicate);
        count.fetch_add(1, Ordering::Relaxed);
    }
    producer.await.unwrap()
}

/// Answers of the deletion API, idle: one more stored deletion, reported
/// on by 5000 nodes, then each question asked 50 times on one connection.
async fn deletion_api(addr: SocketAddr, store: &Store) {
    let mut wide = stored(10_000, UnixNanos::now());
    wide.pod_uid = "wide".into();
    wide.nodes = (0..5000)
        .map(|n| NodeMeasurement {
            node: format!("node-{n}"),
            latency_seconds: Some(0.2 + (n % 1000) as f64 / 1000.0),
            error_seconds: Some(0.001),
            class: Some(NodeClass::Measured),
            mode: Some(Mode::Rules(Detector::Nftables)),
            ..Default::default()
        })
        .collect();
    store.record_deletion(&wide).unwrap();
    let client = HttpClient::default();
    let first = format!("http://{addr}/v1/deletions?limit=100");
    let page: DeletionList = client.get_json(&first).await.unwrap();
    let token = page
        .continue_token
        .expect("10k deletions: more than a page");
    for (what, url) in [
        ("first page, 100 summaries", first.clone()),
        ("next page (continue)", format!("{first}&continue={token}")),
        (
            "detail, 5000 nodes",
            format!("http://{addr}/v1/deletions/wide"),
        ),
        (
            "detail, slowest=10 of 5000",
            format!("http://{addr}/v1/deletions/wide?slowest=10"),
        ),
    ] {
        let mut latencies = Vec::new();
        let mut bytes = 0;
        for _ in 0..50 {
            let t = Instant::now();
            bytes = client.get_ok(&url).await.unwrap().body.len();
            latencies.push(t.elapsed());
        }
        println!(
            "deletion API, {what}: {bytes} bytes, {}",
            summary(&latencies)
        );
    }
}

fn proc_status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len() + 1..].trim().to_string())
        .unwrap_or_default()
}

fn summary(l: &[Duration]) -> String {
    let mut v = l.to_vec();
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "{} queries, p50 {:.3?}, p99 {:.3?}, max {:.3?}",
        v.len(),
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    )
}

/// Sequential recommendation queries on one keep-alive connection, from a
/// thread of its own at normal priority (spawned by `run`, which runs on the
/// main thread), as CI asks from another machine: the runtime's threads,
/// which also run the simulated agents, are under `SCHED_IDLE`.
/// With `distinct`, every query asks another question (another confidence),
/// so none is answered from the recommendation cache. Paced at one query per
/// [`QUERY_EVERY`]: a closed loop would take a core from the ingest it
/// measures against.
async fn query_latencies(addr: SocketAddr, for_: Duration, distinct: bool) -> Vec<Duration> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(blocking_query_latencies(addr, for_, distinct));
    });
    rx.await.expect("query thread")
}

fn blocking_query_latencies(addr: SocketAddr, for_: Duration, distinct: bool) -> Vec<Duration> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("query runtime");
    runtime.block_on(async {
        // One client, so every query after the first reuses its connection.
        let client = HttpClient::default();
        let start = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < for_ {
            let confidence = if distinct {
                format!("&confidence=0.5{:07}", out.len())
            } else {
                String::new()
            };
            let url = format!(
                "http://{addr}/v1/recommendations?namespace=ns-3&service=svc-3{confidence}"
            );
            let t = Instant::now();
            client.get_ok(&url).await.unwrap_or_else(|e| panic!("{e}"));
            out.push(t.elapsed());
            if let Some(rest) = QUERY_EVERY.checked_sub(t.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        out
    })
}
