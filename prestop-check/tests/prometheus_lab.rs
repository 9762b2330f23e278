//! A real Prometheus (Debian's package) scrapes the real aggregator, and
//! the metrics file of prestop-check, while the lab runs a rolling update
//! with real agents on every lab node: every dashboard query and every
//! metric the alert rules use is accepted by Prometheus and returns data.
//!
//! Needs root and the binaries of the workspace next to this test's
//! executable (`cargo test --workspace` builds them; or
//! `cargo build --bins -p observer-agent -p aggregator -p lab`).

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::kubeproxy::Mode;
use lab::netns::NetNs;
use lab::observer::{Binaries, HTTP_PORT, Observer};
use lab::scenario::{Lab, LabConfig, RolloutConfig};
use lab::server::ShutdownMode;
use lab::topology::CONTROL_PLANE_IP;
use serde_json::Value;
use support::{dashboard_queries, dashboards, instantiate, names, rule_exprs};

const NAME: &str = "prometheus_scrapes_the_aggregator_during_a_lab_rollout";
const PROMETHEUS_PORT: u16 = 9090;
const TEXTFILE_PORT: u16 = 9101;

/// Counters the aggregator creates only when they first count something,
/// which this rollout does not make happen; their queries must be accepted
/// but may be empty:
/// - events lost and nodes missing need a failing agent;
/// - keep-alive resets need unread requests in a socket when its process
///   dies (the lab's e2e keep-alive test covers them);
/// - late connections: in this lab run the deletion records carry
///   `lastConnectionUnixNanos` after T0 but `lateConnections: 0` (the
///   agents report no accepted-after-T0 events yet), so the counter never
///   appears. Remove it from this list once they do.
const NOT_PRODUCED: &[&str] = &[
    "prestop_agent_events_lost_total",
    "prestop_nodes_missing_total",
    "prestop_keepalive_aborted_connections_total",
    "prestop_late_connections_total",
];

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

/// The control-plane namespace by name and path: the lab itself stays
/// borrowable for its rollout.
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

    /// Runs `f` on a thread inside the namespace (sockets opened there stay
    /// there).
    fn run<R: Send>(&self, f: impl FnOnce() -> std::io::Result<R> + Send) -> std::io::Result<R> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    lab::netns::enter(&self.path)?;
                    f()
                })
                .join()
                .expect("closure in namespace panicked")
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

/// One HTTP/1.0 GET from inside `ns`; the status and body.
fn get(ns: &ControlPlane, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    ns.run(move || {
        let mut s = TcpStream::connect(SocketAddrV4::new(CONTROL_PLANE_IP, port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {CONTROL_PLANE_IP}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        Ok((status, body))
    })
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

fn start_prometheus(ns: &ControlPlane, dir: &Path) -> Process {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n\
             - job_name: prestop-aggregator\n  static_configs:\n\
             \x20 - targets: ['{CONTROL_PLANE_IP}:{HTTP_PORT}']\n    labels: {{cluster: lab}}\n\
             - job_name: prestop-check\n  static_configs:\n\
             \x20 - targets: ['{CONTROL_PLANE_IP}:{TEXTFILE_PORT}']\n    labels: {{cluster: lab}}\n"
        ),
    )
    .unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(30);
    // Target discovery hands its first targets over only after a few
    // seconds: wait until both targets have been scraped.
    let scraped = |ns: &ControlPlane| {
        get(
            ns,
            PROMETHEUS_PORT,
            &format!("/api/v1/query?query={}", url_encode("up == 1")),
        )
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .and_then(|v| v["data"]["result"].as_array().map(Vec::len))
            == Some(2)
    };
    while !scraped(ns) {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both targets; see {}",
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

fn query(ns: &ControlPlane, expr: &str) -> Value {
    let (status, body) = get(
        ns,
        PROMETHEUS_PORT,
        &format!("/api/v1/query?query={}", url_encode(expr)),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        (status, &v["status"]),
        (200, &Value::from("success")),
        "{expr}: {body}"
    );
    v
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
        })
        .await
        .unwrap();
        let binaries = Binaries {
            aggregator: bin.join("aggregator"),
            agent: bin.join("observer-agent"),
            completion_timeout: Duration::from_secs(20),
        };
        let observer = Observer::start(&lab, &binaries, dir.path()).await.unwrap();
        let ns = &ControlPlane::of(&lab.cluster.control_plane);
        let prometheus = tokio::task::block_in_place(|| {
            serve_metrics_file(ns, metrics_file(dir.path()));
            start_prometheus(ns, dir.path())
        });

        // No preStop and a short grace period: late, refused and aborted
        // connections, as in a careless rollout.
        let rollout = RolloutConfig {
            deletions: 2,
            spacing: Duration::from_secs(1),
            pre_stop: Duration::ZERO,
            grace: Duration::from_secs(1),
            rate: 40.0,
            keep_alive_connections: 2,
        };
        let result = lab.rollout(&rollout, |m| eprintln!("{m}")).await.unwrap();
        observer.wait_complete(&result.deletions).await.unwrap();
        // The aggregator refreshes its recommendation gauges every 30 s.
        let deadline = Instant::now() + Duration::from_secs(75);
        let refreshed = r#"prestop_recommendation_seconds{namespace="default",service="web"}"#;
        while !has_data(&tokio::task::block_in_place(|| query(ns, refreshed))) {
            assert!(
                Instant::now() < deadline,
                "no recommendation gauge after 75 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        let mut empty = Vec::new();
        let mut exprs: Vec<String> = dashboards()
            .iter()
            .flat_map(|(_, d)| dashboard_queries(d))
            .map(|q| instantiate(&q, "1m"))
            .collect();
        let metrics: BTreeSet<String> = rule_exprs()
            .iter()
            .flat_map(|(_, e)| names(e))
            .filter(|n| !n.contains(':'))
            .collect();
        exprs.extend(metrics.iter().map(|m| format!("{m}{{cluster=\"lab\"}}")));
        exprs.extend(rule_exprs().into_iter().map(|(_, e)| e));
        let whole_rules: BTreeSet<String> = rule_exprs().into_iter().map(|(_, e)| e).collect();
        for expr in &exprs {
            let v = tokio::task::block_in_place(|| query(ns, expr));
            // Alert expressions are conditions: empty means "not firing".
            let must_have_data =
                !whole_rules.contains(expr) && !NOT_PRODUCED.iter().any(|m| expr.contains(m));
            if must_have_data && !has_data(&v) {
                empty.push(expr.clone());
            }
        }
        drop(prometheus);
        observer.shutdown().await;
        lab.shutdown().await.unwrap();
        assert!(
            empty.is_empty(),
            "queries without data after a rollout:\n{}",
            empty.join("\n")
        );
    });
}
