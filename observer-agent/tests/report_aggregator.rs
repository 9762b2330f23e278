//! observer_agent::report against the real aggregator over real sockets,
//! with the Kubernetes API double as the cluster: TLS verified against the
//! lab's CA, the agent's token from the double's TokenRequest in a file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aggregator::app::{self, Running};
use aggregator::config::Settings;
use aggregator::store::Store;
use apiserver_double::{ApiServerDouble, objects};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lab::identity;
use observer_agent::report::{self, Credentials, ReporterConfig, Summary, WatchUpdate};
use observer_proto::{Detector, Observation, RulesChange, UnixNanos};
use tokio::sync::{mpsc, oneshot};

mod common;

use common::secured::{Files, secured};

fn pod(name: &str, ip: &str) -> Pod {
    objects::pod("shop", name, ip, "node-a")
}

fn slice(pods: &[&Pod], terminating: bool) -> EndpointSlice {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|p| (*p, !terminating, terminating))
        .collect();
    objects::endpoint_slice("shop", "web", &endpoints)
}

async fn aggregator_on(addr: SocketAddr, files: &Files, double: &ApiServerDouble) -> Running {
    let store = Arc::new(Store::open(files.store()).unwrap());
    let grpc = tokio::net::TcpListener::bind(addr).await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = secured(Settings::default(), files);
    let running = app::start(settings, store, grpc, http, Some(double.kube_config())).unwrap();
    for _ in 0..250 {
        if running.http.ready.get() {
            return running;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("aggregator not ready");
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn rules_removed(ip: &str, time: UnixNanos) -> Observation {
    Observation::RulesRemoved(RulesChange {
        endpoint: format!("{ip}:8080").parse().unwrap(),
        detector: Detector::Nftables,
        time,
        precision_ns: 1000,
    })
}

struct Reporter {
    obs: mpsc::Sender<Observation>,
    watch: mpsc::Receiver<WatchUpdate>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<Summary, report::ReportError>>,
}

fn start_reporter(addr: SocketAddr, files: &Files) -> Reporter {
    let mut cfg = ReporterConfig::new(format!("https://localhost:{}", addr.port()), "node-a");
    cfg.credentials = Credentials {
        token_file: Some(files.token()),
        ca_file: Some(files.tls.ca.clone()),
    };
    cfg.kernel_release = "6.18.0".into();
    cfg.flush_interval = Duration::from_millis(50);
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(400);
    let (obs, obs_rx) = mpsc::channel(1024);
    let (watch_tx, watch) = mpsc::channel(64);
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(report::run(cfg, obs_rx, watch_tx, async move {
        let _ = stop_rx.await;
    }));
    Reporter {
        obs,
        watch,
        stop,
        task,
    }
}

async fn next_update(r: &mut Reporter) -> WatchUpdate {
    tokio::time::timeout(Duration::from_secs(10), r.watch.recv())
        .await
        .expect("no watch update within 10 s")
        .expect("watch channel closed")
}

async fn wait_for_deletion(store: &Path, uid: &str) -> observer_proto::api::DeletionRecord {
    for _ in 0..500 {
        if let Some(d) = Store::open(store).unwrap().deletion(uid).unwrap() {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("deletion {uid} never stored");
}

#[tokio::test]
async fn reports_a_deletion_end_to_end() {
    let double = ApiServerDouble::start().await.unwrap();
    double
        .create(&objects::node("node-a", "192.168.0.1", "10.244.0.0/24"))
        .unwrap();
    let web1 = double.create(&pod("web-1", "10.244.0.5")).unwrap();
    double.create(&slice(&[&web1], false)).unwrap();
    let files = Files::new();
    files.node_a_token(&double).await;
    let store = files.store();
    let addr = free_addr();
    let agg = aggregator_on(addr, &files, &double).await;
    let mut r = start_reporter(addr, &files);
    // Registered and subscribed once the aggregator counts the agent.
    for _ in 0..250 {
        if agg.http.metrics.agents_connected.get() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(agg.http.metrics.agents_connected.get(), 1);

    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    double.update(&slice(&[&web1], true)).unwrap();
    let WatchUpdate::Add(ep) = next_update(&mut r).await else {
        panic!("expected add")
    };
    assert_eq!(ep.pod_name, "web-1");
    assert_eq!(ep.ip.to_string(), "10.244.0.5");
    assert_eq!(ep.ports, [8080]);

    r.obs
        .send(rules_removed("10.244.0.5", ep.deletion_start + 700_000_000))
        .await
        .unwrap();
    double.finish_deletion::<Pod>("shop", "web-1").unwrap();
    let uid = web1.metadata.uid.clone().unwrap();
    let d = wait_for_deletion(&store, &uid).await;
    assert!(d.complete, "{d:?}");
    assert_eq!(d.nodes[0].node, "node-a");
    // 0.7 s, corrected by the measured clock offset (same host: tiny).
    let p = d.propagation_seconds.unwrap();
    assert!((p - 0.7).abs() < 0.01, "{p}");
    assert!(
        d.nodes[0]
            .clock_uncertainty_seconds
            .is_some_and(|u| u < 0.01)
    );
    let WatchUpdate::Remove(gone) = next_update(&mut r).await else {
        panic!("expected remove")
    };
    assert_eq!(gone.pod_uid, uid);

    r.stop.send(()).unwrap();
    let s = r.task.await.unwrap().unwrap();
    assert_eq!(s.sessions, 1);
    assert!(s.batches_acknowledged >= 1);
    assert_eq!((s.observations_dropped, s.observations_unsent), (0, 0));
    agg.shutdown().await;
}

#[tokio::test]
async fn buffers_while_the_aggregator_restarts_and_reconnects() {
    let double = ApiServerDouble::start().await.unwrap();
    double
        .create(&objects::node("node-a", "192.168.0.1", "10.244.0.0/24"))
        .unwrap();
    let web1 = double.create(&pod("web-1", "10.244.0.5")).unwrap();
    let web2 = double.create(&pod("web-2", "10.244.0.6")).unwrap();
    double.create(&slice(&[&web1, &web2], false)).unwrap();
    let files = Files::new();
    files.node_a_token(&double).await;
    let store = files.store();
    let addr = free_addr();

    // The agent starts first: nothing listens yet, it keeps retrying.
    let mut r = start_reporter(addr, &files);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agg = aggregator_on(addr, &files, &double).await;
    double.delete::<Pod>("shop", "web-1", 30).unwrap();
    double.delete::<Pod>("shop", "web-2", 30).unwrap();
    let mut added = Vec::new();
    for _ in 0..2 {
        let WatchUpdate::Add(ep) = next_update(&mut r).await else {
            panic!("expected add")
        };
        added.push(ep);
    }
    added.sort_by(|a, b| a.pod_name.cmp(&b.pod_name));

    // The aggregator goes away; the agent observes meanwhile.
    agg.shutdown().await;
    let t0 = added[0].deletion_start;
    r.obs
        .send(rules_removed("10.244.0.5", t0 + 400_000_000))
        .await
        .unwrap();
    r.obs
        .send(rules_removed("10.244.0.6", t0 + 500_000_000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // web-2 finishes while the aggregator is down.
    double.finish_deletion::<Pod>("shop", "web-2").unwrap();
    // The agent pod is replaced meanwhile: its old token is void, the
    // kubelet writes a token of the new pod, which the agent must read.
    double
        .finish_deletion::<Pod>(identity::NAMESPACE, &identity::agent_pod_name("node-a"))
        .unwrap();
    files.node_a_token(&double).await;

    // Back on the same port and store: the relist finds web-1 still
    // terminating; the agent re-registers, must not be told to add web-1
    // again, must be told web-2 is gone, and delivers its buffer.
    let agg = aggregator_on(addr, &files, &double).await;
    let WatchUpdate::Remove(gone) = next_update(&mut r).await else {
        panic!("expected remove of web-2")
    };
    assert_eq!(gone.pod_name, "web-2");
    double.finish_deletion::<Pod>("shop", "web-1").unwrap();
    let d = wait_for_deletion(&store, web1.metadata.uid.as_deref().unwrap()).await;
    assert!(d.complete, "{d:?}");
    assert!(d.nodes[0].rules_removed_unix_nanos.is_some());
    let WatchUpdate::Remove(gone) = next_update(&mut r).await else {
        panic!("expected remove of web-1")
    };
    assert_eq!(gone.pod_name, "web-1");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), r.watch.recv())
            .await
            .is_err(),
        "unexpected extra watch update"
    );

    r.stop.send(()).unwrap();
    let s = r.task.await.unwrap().unwrap();
    assert!(s.sessions >= 2, "{s:?}");
    assert_eq!(s.observations_unsent, 0);
    agg.shutdown().await;
}

#[tokio::test]
async fn bounded_buffer_counts_drops_and_bad_url_is_an_error() {
    let mut cfg = ReporterConfig::new("http://127.0.0.1:1", "node-a");
    cfg.buffer_capacity = 3;
    cfg.call_timeout = Duration::from_millis(200);
    cfg.backoff_initial = Duration::from_millis(20);
    let (obs, obs_rx) = mpsc::channel(16);
    let (watch_tx, _watch) = mpsc::channel(1);
    for i in 0..5 {
        obs.send(rules_removed("10.0.0.1", UnixNanos::from_nanos(i + 1)))
            .await
            .unwrap();
    }
    drop(obs); // the agent stops: the reporter gives up after one last try
    let s = report::run(cfg, obs_rx, watch_tx, std::future::pending())
        .await
        .unwrap();
    assert_eq!(s.observations_dropped, 2);
    assert_eq!(s.observations_unsent, 3);
    assert_eq!(s.sessions, 0);

    let (_o, rx) = mpsc::channel(1);
    let (w, _wr) = mpsc::channel(1);
    let err = report::run(
        ReporterConfig::new("not a url", "n"),
        rx,
        w,
        std::future::pending(),
    )
    .await;
    assert!(matches!(err, Err(report::ReportError::InvalidUrl { .. })));
}
