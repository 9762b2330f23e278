//! A real Prometheus (Debian's package) scrapes the real aggregator, every
//! real agent's own /metrics and the metrics file of prestop-check, and
//! evaluates the alert and recording rules, while the lab runs rolling
//! updates with real agents on every lab node. Queries run over and over
//! from before the first rollout to after the second: every dashboard
//! query, every rule expression and every metric and recorded series the
//! rules use must be accepted by Prometheus in every round, and return data
//! while the second rollout runs (the first one creates the counters and
//! the recommendation gauges, which the aggregator refreshes every 30 s).
//!
//! The scrape configuration follows deploy/: the aggregator and agents at
//! the paths of the ServiceMonitor and PodMonitor, with the `cluster` (and
//! for agents `node`) labels they add; the metrics file without a cluster
//! label, as node-exporter's textfile collector publishes it, so the
//! preStop rules must join without it.
//!
//! Needs root and the binaries of the workspace next to this test's
//! executable (`cargo test --workspace` builds them; or
//! `cargo build --workspace --exclude observer-ebpf --exclude lab-sock-lb-ebpf --exclude lab-commit-clock-ebpf --bins`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::deploy::{dashboard_queries, dashboards, deploy, instantiate, names, rule_exprs};
use lab::http_client::{HttpClient, HttpClientError};
use lab::kubeproxy::Mode;
use lab::netns::NetNs;
use lab::observer::{AGENT_HEALTH_PORT, Binaries, HTTP_PORT, Observer};
use lab::scenario::{Lab, LabConfig, RolloutConfig};
use lab::server::ShutdownMode;
use lab::topology::CONTROL_PLANE_IP;
use serde_json::Value;

const NAME: &str = "prometheus_scrapes_the_aggregator_during_a_lab_rollout";
const PROMETHEUS_PORT: u16 = 9090;
const TEXTFILE_PORT: u16 = 9101;
/// Node i's agent is scraped through a forwarder on this port + i + 1 (its
/// health endpoint listens on the node's own loopback).
const AGENT_PORT_BASE: u16 = 9200;

/// Counters that only a failing agent (or node) makes the aggregator
/// create; their queries must be accepted but may be empty:
/// - events lost, observations dropped: an agent's ring buffer or its
///   report buffer overflowing (a 40 requests/s rollout does not come near);
/// - nodes missing: a node whose agent never reports a deletion;
/// - nodes still routing: a node whose proxy never applies a removal;
/// - observations rejected: an agent reporting implausible times;
/// - auth refusals: a caller without a valid token (an attacker, a
///   misconfigured agent) or a TokenReview outage.
const NEED_A_FAILING_AGENT: &[&str] = &[
    "prestop_agent_events_lost_total",
    "prestop_agent_observations_dropped_total",
    "prestop_nodes_missing_total",
    // A healthy node that keeps routing past the timeout, and implausible
    // observations: neither happens in a healthy lab.
    "prestop_nodes_still_routing_total",
    "prestop_observations_rejected_total",
    "prestop_auth_refusals_total",
    // New pods refusing after ready and nodes not adding a new pod within
    // its startup window: the lab's pods listen before they are ready and
    // its proxies add them in 2.5 s (lab/tests/startup.rs has the case).
    "prestop_startup_refused_connections_total",
    "prestop_startup_nodes_not_added_total",
    "prestop_startup_not_watched_total",
];

/// Only pods whose preStop runs prestop-drain ask `/v1/drain`; this lab's
/// pods sleep.
const NEED_ADAPTIVE_DRAIN: &[&str] = &["prestop_drains_total", "prestop_drain_wait_seconds"];

/// Needs at least 20 per-node samples in the namespace over 6 h (the
/// threshold of PrestopMeasuredP99ExceedsPreStop); two short rollouts on
/// two nodes give 8. Excused only while the count rule shows fewer.
const NEEDS_20_SAMPLES: &str = "workload:prestop_propagation_latency_seconds:p99_6h";
const SAMPLE_COUNT: &str = "namespace:prestop_propagation_latency_seconds_count:increase6h";

/// The lab's Service `default/web` as a team would ship it: no preStop.
const MANIFEST: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: web:1}]
";

fn binaries() -> Option<PathBuf> {
    let dir = std::env::current_exe()
        .ok()?
        .parent()?
        .parent()?
        .to_path_buf();
    ["aggregator", "observer-agent", "lab-pod-server"]
        .iter()
        .all(|b| dir.join(b).is_file())
        .then_some(dir)
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a thread inside the network namespace at `path` (sockets
/// opened there stay there).
fn in_ns<R: Send>(
    path: &Path,
    f: impl FnOnce() -> std::io::Result<R> + Send,
) -> std::io::Result<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                lab::netns::enter(path)?;
                f()
            })
            .join()
            .expect("closure in namespace panicked")
    })
}

/// The control-plane namespace by name and path: the lab itself stays
/// borrowable for its rollouts.
#[derive(Clone)]
struct ControlPlane {
    name: String,
    path: PathBuf,
}

impl ControlPlane {
    fn of(ns: &NetNs) -> Self {
        Self {
            name: ns.name().to_string(),
            path: ns.path(),
        }
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> std::io::Result<R> + Send) -> std::io::Result<R> {
        in_ns(&self.path, f)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

/// One GET from inside the control plane's namespace: the status and body.
fn get(ns: &ControlPlane, port: u16, path: &str) -> Result<(u16, String), HttpClientError> {
    let r = HttpClient::in_netns(&ns.path)
        .get_blocking(&format!("http://{CONTROL_PLANE_IP}:{port}{path}"))?;
    Ok((r.status, r.text()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `spec.<endpoints>[0].path` of a Prometheus Operator monitor in
/// deploy/components/servicemonitor.
fn monitor_path(file: &str, endpoints: &str) -> String {
    let path = deploy().join("components/servicemonitor").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let doc = &prestop_check::yaml::parse_stream(&text).unwrap()[0];
    doc.get("spec")
        .and_then(|s| s.get(endpoints))
        .and_then(|e| e.items().first())
        .and_then(|e| e.get("path"))
        .and_then(|p| p.as_str())
        .unwrap_or_else(|| panic!("{}: spec.{endpoints}[0].path", path.display()))
        .to_string()
}

/// Prometheus scraping as deploy/ sets it up, every second, with the rules
/// loaded. `agents`: node names, in the order of their forwarders.
fn start_prometheus(ns: &ControlPlane, dir: &Path, agents: &[String]) -> Process {
    let config = dir.join("prometheus.yml");
    let mut text = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [{rules:?}]\n\
         scrape_configs:\n\
         - job_name: prestop-aggregator\n  metrics_path: {aggregator_path}\n  static_configs:\n\
         \x20 - targets: ['{CONTROL_PLANE_IP}:{HTTP_PORT}']\n    labels: {{cluster: lab}}\n\
         - job_name: prestop-check\n  static_configs:\n\
         \x20 - targets: ['{CONTROL_PLANE_IP}:{TEXTFILE_PORT}']\n\
         - job_name: prestop-agent\n  metrics_path: {agent_path}\n  static_configs:\n",
        rules = common::deploy::rules_file().canonicalize().unwrap(),
        aggregator_path = monitor_path("servicemonitor.yaml", "endpoints"),
        agent_path = monitor_path("podmonitor.yaml", "podMetricsEndpoints"),
    );
    for (i, node) in agents.iter().enumerate() {
        text += &format!(
            "  - targets: ['{CONTROL_PLANE_IP}:{}']\n    labels: {{cluster: lab, node: {node}}}\n",
            AGENT_PORT_BASE + 1 + i as u16
        );
    }
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = ns
        .command("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!(
            "--web.listen-address={CONTROL_PLANE_IP}:{PROMETHEUS_PORT}"
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus (Debian package prometheus) must be installed: cargo xtask setup");
    let process = Process(child);
    let targets = 2 + agents.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Target discovery hands its first targets over only after a few
    // seconds: wait until every target has been scraped.
    let scraped = |ns: &ControlPlane| {
        get(
            ns,
            PROMETHEUS_PORT,
            &format!("/api/v1/query?query={}", url_encode("up == 1")),
        )
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .and_then(|v| v["data"]["result"].as_array().map(Vec::len))
            == Some(targets)
    };
    while !scraped(ns) {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape all {targets} targets; see {}",
            dir.join("prometheus.log").display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    process
}

/// Serves `body` as a scrape target from inside `ns`, the way a textfile
/// collector or Pushgateway would expose prestop-check's metrics file.
fn serve_metrics_file(ns: &ControlPlane, body: String) {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(CONTROL_PLANE_IP, TEXTFILE_PORT)))
        .unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// Makes the agent on the node at `node_ns` (health endpoint on the node's
/// loopback) scrapable from the control plane on `port`: each connection
/// is relayed byte for byte to the agent, so Prometheus's own HTTP client
/// talks to the agent's server and nothing here speaks HTTP.
fn forward_agent(ns: &ControlPlane, port: u16, node_ns: PathBuf) {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(CONTROL_PLANE_IP, port)))
        .unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let agent = in_ns(&node_ns, || {
                TcpStream::connect(SocketAddrV4::new(
                    std::net::Ipv4Addr::LOCALHOST,
                    AGENT_HEALTH_PORT,
                ))
            });
            // Without the agent the connection closes: a failed scrape,
            // which the test's `up == 1` wait reports.
            if let Ok(agent) = agent {
                relay(client, agent);
            }
        }
    });
}

/// Copies `a` to `b` and `b` to `a` until each side closes.
fn relay(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// An instant query; the parsed answer, or why Prometheus did not accept
/// it.
fn try_query(ns: &ControlPlane, expr: &str) -> Result<Value, String> {
    let (status, body) = get(
        ns,
        PROMETHEUS_PORT,
        &format!("/api/v1/query?query={}", url_encode(expr)),
    )
    .map_err(|e| format!("{expr}: {e}"))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{expr}: {e}: {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("{expr}: {status} {body}"));
    }
    Ok(v)
}

fn query(ns: &ControlPlane, expr: &str) -> Value {
    try_query(ns, expr).unwrap_or_else(|e| panic!("{e}"))
}

fn has_data(v: &Value) -> bool {
    v["data"]["result"]
        .as_array()
        .is_some_and(|r| !r.is_empty())
}

fn metrics_file(dir: &Path) -> String {
    let manifest = dir.join("web.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let file = dir.join("prestop.prom");
    let out = Command::new(env!("CARGO_BIN_EXE_prestop-check"))
        .args(["--offline-ok", "--metrics-file"])
        .arg(&file)
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::read_to_string(file).unwrap()
}

/// Phases of the test the query rounds are attributed to.
const BEFORE: usize = 0;
const FIRST_ROLLOUT: usize = 1;
const BETWEEN: usize = 2;
const SECOND_ROLLOUT: usize = 3;
const AFTER: usize = 4;
const PHASES: [&str; 5] = [
    "before the rollouts",
    "first rollout",
    "between the rollouts",
    "second rollout",
    "after the rollouts",
];

/// What the query rounds saw: rounds per phase (only rounds that started
/// and ended in the same phase count), per expression the phases in which
/// it returned data, and every answer Prometheus did not accept.
#[derive(Default)]
struct Tally {
    rounds: [usize; 5],
    data: BTreeMap<String, BTreeSet<usize>>,
    rejected: Vec<String>,
}

/// Queries every expression in rounds, twice a second, until `stop`.
fn watch(
    ns: ControlPlane,
    exprs: Vec<String>,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        let mut tally = Tally::default();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let at_start = phase.load(Ordering::Relaxed);
            let mut with_data = Vec::new();
            for expr in &exprs {
                match try_query(&ns, expr) {
                    Ok(v) if has_data(&v) => with_data.push(expr.clone()),
                    Ok(_) => {}
                    Err(e) => tally.rejected.push(format!("{}: {e}", PHASES[at_start])),
                }
            }
            if phase.load(Ordering::Relaxed) == at_start {
                tally.rounds[at_start] += 1;
                for expr in with_data {
                    tally.data.entry(expr).or_default().insert(at_start);
                }
            }
            std::thread::sleep(Duration::from_millis(500).saturating_sub(started.elapsed()));
        }
        tally
    })
}

/// Polls `expr` until it returns data or `within` passes; whether it did.
async fn eventually(ns: &ControlPlane, expr: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if has_data(&tokio::task::block_in_place(|| query(ns, expr))) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[test]
fn prometheus_scrapes_the_aggregator_during_a_lab_rollout() {
    if !lab::root::root_or_skip(NAME) {
        return;
    }
    let Some(bin) = binaries() else {
        assert!(
            std::env::var_os(lab::root::REQUIRE_ROOT_ENV).is_none(),
            "{NAME}: aggregator, observer-agent and lab-pod-server must be built next to the test"
        );
        eprintln!("skipped {NAME}: build the workspace binaries first (cargo build --bins)");
        return;
    };

    // What is queried: every dashboard query, every rule expression, every
    // metric the rules read and every series they record.
    let rules = rule_exprs();
    let alert_exprs: BTreeSet<String> = rules
        .iter()
        .filter(|(record, _)| record.is_none())
        .map(|(_, e)| e.clone())
        .collect();
    let needs_20_samples_expr = rules
        .iter()
        .find(|(record, _)| record.as_deref() == Some(NEEDS_20_SAMPLES))
        .map(|(_, e)| e.clone())
        .expect("the per-workload p99 recording rule");
    let mut exprs: Vec<String> = dashboards()
        .iter()
        .flat_map(|(_, d)| dashboard_queries(d))
        .map(|q| instantiate(&q, "1m"))
        .collect();
    let metrics: BTreeSet<String> = rules
        .iter()
        .flat_map(|(_, e)| names(e))
        .filter(|n| !n.contains(':'))
        .collect();
    exprs.extend(metrics);
    exprs.extend(rules.iter().filter_map(|(record, _)| record.clone()));
    exprs.extend(rules.iter().map(|(_, e)| e.clone()));
    let mut seen = BTreeSet::new();
    exprs.retain(|e| seen.insert(e.clone()));

    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        lab::netns::reap_stale();
        let mut lab = Lab::start(LabConfig {
            nodes: 2,
            pods: 3,
            modes: vec![Mode::Nftables, Mode::IptablesNft],
            // Longer than the grace period: connections still routed to a
            // pod after it was killed are refused.
            delay: "1500ms..2500ms".parse().unwrap(),
            seed: 7,
            pod_server: bin.join("lab-pod-server"),
            // Keep-alive connections die with SIGKILL: the aborted-connection
            // counters get data too.
            server_mode: ShutdownMode::IgnoreSigterm,
            start: Default::default(),
            termination: Default::default(),
        })
        .await
        .unwrap();
        let binaries = Binaries {
            aggregator: bin.join("aggregator"),
            agent: bin.join("observer-agent"),
            completion_timeout: Duration::from_secs(20),
        };
        let observer = Observer::start(&lab, &binaries, dir.path()).await.unwrap();
        let ns = ControlPlane::of(&lab.cluster.control_plane);
        let nodes: Vec<String> = lab.cluster.nodes.iter().map(|n| n.name.clone()).collect();
        let node_paths: Vec<PathBuf> = lab.cluster.nodes.iter().map(|n| n.ns.path()).collect();
        let prometheus = tokio::task::block_in_place(|| {
            serve_metrics_file(&ns, metrics_file(dir.path()));
            for (i, path) in node_paths.into_iter().enumerate() {
                forward_agent(&ns, AGENT_PORT_BASE + 1 + i as u16, path);
            }
            start_prometheus(&ns, dir.path(), &nodes)
        });

        let phase = Arc::new(AtomicUsize::new(BEFORE));
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch(ns.clone(), exprs.clone(), phase.clone(), stop.clone());

        // No preStop and a short grace period: late, refused and aborted
        // connections, as in a careless rollout. Four keep-alive
        // connections per node: some are on the pods deleted.
        let rollout = RolloutConfig {
            deletions: 2,
            spacing: Duration::from_secs(1),
            pre_stop: Duration::ZERO,
            grace: Duration::from_secs(1),
            rate: 40.0,
            keep_alive_connections: 4,
            drain: None,
        };
        phase.store(FIRST_ROLLOUT, Ordering::Relaxed);
        let summary = |r: &lab::scenario::RolloutResult| {
            eprintln!(
                "rollout: {} requests, {} failed ({} on keep-alive connections)",
                r.requests(),
                r.failed(),
                r.keep_alive.failed_total()
            );
        };
        let first = lab.rollout(&rollout, |m| eprintln!("{m}")).await.unwrap();
        summary(&first);
        let records = observer.wait_complete(&first.deletions).await.unwrap();
        aborted_no_more_than_failed(&first, &records);
        phase.store(BETWEEN, Ordering::Relaxed);
        // The aggregator refreshes its recommendation gauges every 30 s.
        let refreshed = r#"prestop_recommendation_seconds{namespace="default",service="web"}"#;
        assert!(
            eventually(&ns, refreshed, Duration::from_secs(75)).await,
            "no recommendation gauge 75 s after the first rollout"
        );

        phase.store(SECOND_ROLLOUT, Ordering::Relaxed);
        let second = lab.rollout(&rollout, |m| eprintln!("{m}")).await.unwrap();
        summary(&second);
        let records = observer.wait_complete(&second.deletions).await.unwrap();
        aborted_no_more_than_failed(&second, &records);
        // Until its measurements have been scraped (every second).
        tokio::time::sleep(Duration::from_secs(3)).await;
        phase.store(AFTER, Ordering::Relaxed);

        // Rules evaluated live: the rollout's refusals fire their alert,
        // and the recommendation above the manifest's missing preStop
        // starts the `for: 1h` of its alert, although the metrics file
        // carries no cluster label and the aggregator's series do.
        let refused_alert = r#"ALERTS{alertname="PrestopRefusedConnectionsDuringRollout",alertstate="firing",cluster="lab",namespace="default"}"#;
        let above_alert = r#"ALERTS{alertname="PrestopRecommendationAbovePreStop",alertstate="pending",cluster="",namespace="default",service="web",workload="Deployment/web",container="web"}"#;
        let mut alerts_missing = Vec::new();
        for alert in [refused_alert, above_alert] {
            if !eventually(&ns, alert, Duration::from_secs(20)).await {
                alerts_missing.push(alert);
            }
        }
        // The rollouts produced every connection counter, not only the
        // refused ones.
        let counters_zero: Vec<&str> = [
            "prestop_late_connections_total",
            "prestop_refused_connections_total",
            "prestop_keepalive_aborted_connections_total",
        ]
        .into_iter()
        .filter(|c| {
            let v = tokio::task::block_in_place(|| {
                query(&ns, &format!("sum({c}{{cluster=\"lab\",namespace=\"default\"}}) > 0"))
            });
            !has_data(&v)
        })
        .collect();
        // The proof behind the per-workload p99's excuse.
        let few_samples = tokio::task::block_in_place(|| {
            has_data(&query(&ns, &format!("{SAMPLE_COUNT}{{namespace=\"default\"}} < 20")))
        });

        stop.store(true, Ordering::Relaxed);
        let tally = tokio::task::block_in_place(|| watcher.join().unwrap());
        drop(prometheus);
        observer.shutdown().await;
        lab.shutdown().await.unwrap();

        assert!(
            tally.rejected.is_empty(),
            "queries Prometheus did not accept:\n{}",
            tally.rejected.join("\n")
        );
        eprintln!(
            "query rounds per phase: {:?}",
            PHASES.iter().zip(tally.rounds).collect::<Vec<_>>()
        );
        assert!(
            tally.rounds[FIRST_ROLLOUT] >= 1 && tally.rounds[SECOND_ROLLOUT] >= 2,
            "too few query rounds while the rollouts ran: {:?}",
            tally.rounds
        );
        let excused = |expr: &String| {
            alert_exprs.contains(expr)
                || NEED_A_FAILING_AGENT.iter().any(|m| expr.contains(m))
                || NEED_ADAPTIVE_DRAIN.iter().any(|m| expr.contains(m))
                || (few_samples && (expr == NEEDS_20_SAMPLES || *expr == needs_20_samples_expr))
        };
        let empty: Vec<&String> = exprs
            .iter()
            .filter(|e| !excused(e))
            .filter(|e| {
                !tally
                    .data
                    .get(*e)
                    .is_some_and(|phases| phases.contains(&SECOND_ROLLOUT))
            })
            .collect();
        assert!(
            empty.is_empty(),
            "queries without data while the second rollout ran:\n{}",
            empty
                .iter()
                .map(|e| format!("{e}  (data {:?})", tally.data.get(*e).map(|p| p.iter().map(|i| PHASES[*i]).collect::<Vec<_>>())))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(alerts_missing.is_empty(), "alerts not raised: {alerts_missing:?}");
        assert!(
            counters_zero.is_empty(),
            "counters the rollouts did not produce: {counters_zero:?}"
        );
    });
}

/// Each reset a pod sends for a request on a connection it closed fails
/// that request on a keep-alive client, once: more aborted connections
/// than failed keep-alive requests means the aggregator counted a kernel
/// event twice (every lab agent shares the pods' kernel).
fn aborted_no_more_than_failed(
    rollout: &lab::scenario::RolloutResult,
    records: &[observer_proto::api::DeletionRecord],
) {
    let aborted: u64 = records
        .iter()
        .flat_map(|r| &r.nodes)
        .map(|n| n.aborted_connections)
        .sum();
    assert!(
        aborted <= rollout.keep_alive.failed_total(),
        "{aborted} aborted connections counted, {} keep-alive requests failed: {:?}",
        rollout.keep_alive.failed_total(),
        rollout.keep_alive.failed
    );
}
