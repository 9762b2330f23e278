//! Reconnect storm: AGENTS agents (default 5000), each the agent's real
//! reporter (`observer_agent::report::run`: register, subscribe, report
//! stream, jittered exponential backoff) on its own loopback connection,
//! connect to an aggregator process; the aggregator is restarted (SIGTERM,
//! then a new process on the same store and port) and every agent comes
//! back. Prints how long until all were registered and subscribed (the
//! aggregator's `prestop_agents_connected`), and the aggregator's peak RSS
//! (VmHWM) in both runs, as Markdown for docs/benchmarks.md.
//!
//! Needs the release aggregator binary:
//! `cargo build --release -p aggregator && cargo bench -p observer-agent --bench reconnect_storm`
//! (or AGGREGATOR_BIN=path). Each agent holds one socket in this process
//! and one in the aggregator's: the soft file limit is raised to the hard
//! one, which must exceed AGENTS plus a few hundred.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use observer_agent::report::{self, ReporterConfig};
use tokio::sync::{mpsc, watch};

/// Bounds every wait: the bench fails rather than hangs.
const DEADLINE: Duration = Duration::from_secs(180);

fn aggregator_bin() -> PathBuf {
    let bin = std::env::var_os("AGGREGATOR_BIN").map_or_else(
        || {
            // target/release/deps/reconnect_storm-* -> target/release/aggregator
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("aggregator")
        },
        PathBuf::from,
    );
    assert!(
        bin.exists(),
        "{}: build it first (cargo build --release -p aggregator) or set AGGREGATOR_BIN",
        bin.display()
    );
    bin
}

/// Raises the soft open-file limit to the hard one; returns it.
fn raise_file_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = l.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
    }
    l.rlim_cur
}

/// An aggregator process, killed when dropped.
struct Aggregator(Child);

impl Aggregator {
    fn start(bin: &PathBuf, store: &std::path::Path, grpc: SocketAddr, http: SocketAddr) -> Self {
        let child = Command::new(bin)
            .args(["--no-kube", "--grpc-addr", &grpc.to_string()])
            .args(["--http-addr", &http.to_string()])
            .arg("--store")
            .arg(store)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// VmHWM: the process's peak resident set.
    fn peak_rss(&self) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// SIGTERM and wait for the graceful exit.
    fn stop(mut self) {
        // SAFETY: plain syscall; the pid is our child's, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap();
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, then released for the aggregator).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `prestop_agents_connected` from the aggregator's /metrics, or `None`
/// while it does not answer.
async fn connected(http: SocketAddr) -> Option<u64> {
    let r = lab::http_client::HttpClient::default()
        .get(&format!("http://{http}/metrics"))
        .await
        .ok()?;
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix("prestop_agents_connected "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until `agents` agents are connected; the time it took.
async fn all_connected(http: SocketAddr, agents: u64) -> Duration {
    let t = Instant::now();
    loop {
        if connected(http).await == Some(agents) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < DEADLINE,
            "not all {agents} agents connected within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() {
    let agents: usize = std::env::var("AGENTS")
        .ok()
        .map_or(5000, |v| v.parse().expect("AGENTS: a number"));
    let files = raise_file_limit();
    assert!(
        files > agents as u64 + 500,
        "open-file limit {files} is too low for {agents} agents"
    );
    let bin = aggregator_bin();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let (grpc, http) = (free_port(), free_port());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let first = Aggregator::start(&bin, &store, grpc, http);
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut keep = Vec::new();
            let mut tasks = Vec::new();
            for i in 0..agents {
                let cfg = ReporterConfig::new(format!("http://{grpc}"), format!("node-{i}"));
                // Held open (no observations); the watch updates are kept
                // unread (there are no deletions).
                let (obs_tx, obs_rx) = mpsc::channel(1);
                let (watch_tx, watch_rx) = mpsc::channel(16);
                keep.push((obs_tx, watch_rx));
                let mut stop = stop_rx.clone();
                tasks.push(tokio::spawn(report::run(cfg, obs_rx, watch_tx, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })));
            }
            let start = all_connected(http, agents as u64).await;
            let first_peak = first.peak_rss();
            let t = Instant::now();
            first.stop();
            let stopped = t.elapsed();
            let second = Aggregator::start(&bin, &store, grpc, http);
            let back = all_connected(http, agents as u64).await;
            // Settled: the peak after the storm, not during a transient.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let second_peak = second.peak_rss();
            let _ = stop_tx.send(true);
            for task in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
            }
            drop(keep);
            println!(
                "| agents | first start: all connected | aggregator peak RSS | graceful stop | restart: all reconnected | aggregator peak RSS after the storm |"
            );
            println!("|---|---|---|---|---|---|");
            println!(
                "| {agents} | {:.1} s | {first_peak} | {:.1} s | {:.1} s | {second_peak} |",
                start.as_secs_f64(),
                stopped.as_secs_f64(),
                back.as_secs_f64()
            );
            second.stop();
        });
}
