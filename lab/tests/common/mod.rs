//! What the end-to-end tests share: the binaries under test, lab presets
//! and the accuracy bounds. Each test crate uses a part of it.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use lab::{
    kubeproxy::Mode,
    observer::{Binaries, Observer},
    report::{DeletionReport, PerNode},
    scenario::{Lab, LabConfig, RolloutConfig},
    server::ShutdownMode,
};

/// The end-to-end tests each run a whole cluster with agents: on two cores
/// they run one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn pod_server() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lab-pod-server"))
}

/// The agent and aggregator binaries of this workspace, from the target
/// directory of this test. `cargo test --workspace` (and so `cargo xtask
/// test`) builds them; a nested cargo build here would wait forever on the
/// lock of the running `cargo test`. When one is missing, starting it fails
/// with its path: `cargo build --bins -p observer-agent -p aggregator`.
pub fn binaries(completion_timeout: Duration) -> Binaries {
    let dir = pod_server().parent().expect("target dir").to_owned();
    Binaries {
        aggregator: dir.join("aggregator"),
        agent: dir.join("observer-agent"),
        completion_timeout,
    }
}

pub fn lab_config(delay: &str, server_mode: ShutdownMode, seed: u64) -> LabConfig {
    LabConfig {
        // One node per mode.
        nodes: Mode::ALL.len(),
        pods: 3,
        modes: Mode::ALL.to_vec(),
        delay: delay.parse().expect("delay spec"),
        seed,
        pod_server: pod_server(),
        server_mode,
        start: Default::default(),
        termination: Default::default(),
    }
}

pub fn rollout(deletions: usize, pre_stop: Duration) -> RolloutConfig {
    RolloutConfig {
        deletions,
        spacing: Duration::from_millis(1200),
        pre_stop,
        grace: pre_stop + Duration::from_secs(2),
        rate: 40.0,
        keep_alive_connections: 2,
        drain: None,
    }
}

/// Starts `config`'s cluster, then its agents and aggregator (deletions
/// finished after `completion_timeout` at the latest), with logs in a fresh
/// work directory for `test`.
pub async fn start(test: &str, config: LabConfig, completion_timeout: Duration) -> (Lab, Observer) {
    start_in(&work_dir(test), config, completion_timeout).await
}

/// [`start`] with logs in `dir`.
pub async fn start_in(
    dir: &Path,
    config: LabConfig,
    completion_timeout: Duration,
) -> (Lab, Observer) {
    let lab = Lab::start(config).await.expect("lab");
    let observer = Observer::start(&lab, &binaries(completion_timeout), dir)
        .await
        .expect("observer");
    (lab, observer)
}

/// Stops the agents and the aggregator, then tears the cluster down.
pub async fn stop(observer: Observer, lab: Lab) {
    observer.shutdown().await;
    lab.shutdown().await.expect("shutdown");
}

/// A fresh directory for one test's logs, store and kubeconfig.
pub fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lab-e2e-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    dir
}

/// How much later than the injected truth a node whose rules change
/// through nftables netlink notifications (nftables and iptables-nft
/// modes) may be measured, past the agent's stated clock uncertainty (see
/// [`outside_bound`]). The agent times them by the kernel stamps of the
/// notifications (`observer_agent::stamps`): docs/benchmarks.md measured
/// them within 0.13-0.86 ms of the commit at p99 and 1.65 ms at most, with
/// the machine busy; this leaves half as much again. An agent that fell
/// back to timing at receipt (the filter did not attach) can fail it: it is
/// late by its thread's wait for a core, which it claims as its precision. Earlier than the
/// truth is bounded by the writer's transaction instead: the truth is the
/// witness thread's read of the commit's first notification, which on a
/// loaded machine wakes milliseconds after the kernel queued it (3.3 ms
/// seen in a CI run), while a kernel stamp cannot precede the commit,
/// inside the transaction (the agent's tests hold the stamp to the commit:
/// observer-agent `dataplane_rules`, `kernel_stamps`).
pub const NETLINK_BOUND_MS: f64 = 2.5;
/// iptables-legacy announces nothing: the truth known outside the kernel is
/// the writer's transaction (iptables-restore from start to exit), and the
/// table is swapped somewhere inside it; on a loaded machine the writer
/// exits tens of milliseconds after the swap. The agent times the change
/// when it reads the lock's release, late by its own wait for a core when
/// ten agents share two (26 ms seen), and states the lock's hold since it
/// last read it as the precision. The measurement, reaching back by that
/// precision, must meet that window, give or take this much for the clock
/// conversion (monotonic to wall clock in the agent) and the stated clock
/// uncertainty.
pub const LEGACY_SLACK_MS: f64 = 2.0;
/// The cilium mode's truth is the writer's bpf() syscall that rewrote the
/// master, timed from user space just before and just after it (the
/// writer thread can be preempted in between, widening the window to
/// milliseconds); the agent stamps the same syscall's exit in the kernel
/// (`sys_exit_bpf`). The measurement must fall inside that window, give or
/// take this much for the clock conversion (0.13-0.18 ms measured,
/// docs/benchmarks.md).
pub const CILIUM_SLACK_MS: f64 = 1.0;

/// Whether a rules change measured `error_ms` off its truth (`None`:
/// missing), with the detector's stated `precision_ms`, is outside the
/// bound of `mode`. The truth is on the agents'
/// clock (the lab's), the measurement on the aggregator's: converted with
/// the agent's estimated offset, which may be off by up to the stated
/// `clock_uncertainty_ms` (half the round trip of the agent's best clock
/// exchange; a missing one counts as none). That much is added to the
/// detector's bound on both sides.
pub fn outside_bound(
    mode: &str,
    error_ms: Option<f64>,
    clock_uncertainty_ms: Option<f64>,
    injected_ms: f64,
    injected_started_ms: f64,
    precision_ms: Option<f64>,
) -> bool {
    let clock = clock_uncertainty_ms.unwrap_or(0.0);
    match error_ms {
        None => true,
        Some(error) if mode == "iptables-legacy" => {
            let slack = clock + LEGACY_SLACK_MS;
            let measured = injected_ms + error;
            let earliest = measured - precision_ms.unwrap_or(0.0);
            measured < injected_started_ms - slack || earliest > injected_ms + slack
        }
        Some(error) if mode == "cilium" => {
            let slack = clock + CILIUM_SLACK_MS;
            let measured = injected_ms + error;
            measured < injected_started_ms - slack || measured > injected_ms + slack
        }
        Some(error) => {
            let measured = injected_ms + error;
            let slack = NETLINK_BOUND_MS + clock;
            measured < injected_started_ms - slack || error > slack
        }
    }
}

/// Every node of `deletions` whose measurement is missing or outside the
/// bound of its mode, described.
pub fn inaccurate(deletions: &[DeletionReport]) -> Vec<String> {
    let mut out = Vec::new();
    for d in deletions {
        for n in &d.per_node {
            if outside_bound(
                &n.mode,
                n.error_ms,
                n.clock_uncertainty_ms,
                n.injected_ms,
                n.injected_started_ms,
                n.detector_precision_ms,
            ) {
                out.push(describe(d, n));
            }
        }
    }
    out
}

/// One node's measurement of one deletion against the injected truth.
pub fn describe(d: &DeletionReport, n: &PerNode) -> String {
    format!(
        "{} on {} ({}): measured {:?} ms (T_rules {:?}, stated precision {:?} ms), injected {:.1} ms (transaction began {:.1} ms), clock uncertainty {:?} ms",
        d.pod,
        n.node,
        n.mode,
        n.measured_ms,
        n.measured_rules_ms,
        n.detector_precision_ms,
        n.injected_ms,
        n.injected_started_ms,
        n.clock_uncertainty_ms
    )
}

/// A rollout whose preStop covered every node but whose server cut its
/// keep-alive connections at shutdown: no new connection failed, some
/// keep-alive requests did, and once the aggregator has the deletions its
/// recommendation reports aborted connections with the keep-alive finding.
pub async fn assert_only_keep_alive_lost(
    observer: &lab::observer::Observer,
    run: &lab::scenario::RolloutResult,
) {
    assert_eq!(
        run.new_connection.failed_total(),
        0,
        "new connections are covered by the preStop: {:?}",
        run.new_connection
    );
    assert!(
        run.keep_alive.failed_total() > 0,
        "keep-alive requests must fail at the server's shutdown: {:?}",
        run.keep_alive
    );
    observer
        .wait_complete(&run.deletions)
        .await
        .expect("measurements");
    let recommendation = observer
        .aggregator
        .recommendation(lab::api::NAMESPACE, lab::api::SERVICE)
        .await
        .expect("recommendation");
    assert!(
        recommendation.keep_alive.aborted_connections > 0,
        "{recommendation:?}"
    );
    assert!(
        recommendation.keep_alive.finding.is_some(),
        "{recommendation:?}"
    );
}

/// The lab's truth of each deletion joined with the aggregator's record.
pub fn joined(
    truths: &[lab::scenario::DeletionTruth],
    records: &[observer_proto::api::DeletionRecord],
) -> Vec<DeletionReport> {
    truths
        .iter()
        .map(|t| {
            lab::report::deletion_report("e2e", t, records.iter().find(|r| r.pod_uid == t.uid), &[])
        })
        .collect()
}

/// The aggregator's recommended preStop, asserted to cover the slowest
/// injected node of `deletions`, with the recommendation.
pub async fn covering_recommendation(
    observer: &lab::observer::Observer,
    deletions: &[DeletionReport],
) -> (u64, observer_proto::api::Recommendation) {
    let recommendation = observer
        .aggregator
        .recommendation(lab::api::NAMESPACE, lab::api::SERVICE)
        .await
        .expect("recommendation");
    let pre_stop = recommendation
        .pre_stop_seconds
        .expect("a recommended preStop");
    let worst_ms = deletions
        .iter()
        .flat_map(|d| &d.per_node)
        .map(|n| n.injected_ms)
        .fold(0.0, f64::max);
    assert!(
        pre_stop as f64 * 1000.0 >= worst_ms,
        "preStop {pre_stop} s does not cover the slowest node ({worst_ms:.0} ms)"
    );
    (pre_stop, recommendation)
}

/// Asserts every deletion complete. An incomplete one's message shows what
/// the aggregator made of each missing node, and what that node's agent
/// and the aggregator logged about the pod's address or as warnings: a
/// loaded CI machine keeps no files, only this message.
pub fn assert_complete(
    observer: &mut lab::observer::Observer,
    deletions: &[DeletionReport],
    records: &[observer_proto::api::DeletionRecord],
) {
    let Some(d) = deletions.iter().find(|d| !d.complete) else {
        return;
    };
    let record = records.iter().find(|r| r.pod_name == d.pod);
    let ip = record.map(|r| r.pod_ip.clone()).unwrap_or_default();
    let mut why = Vec::new();
    for node in &d.missing_nodes {
        let measured = record.and_then(|r| r.nodes.iter().find(|n| &n.node == node));
        why.push(format!("{node} in the record: {measured:?}"));
        if let Some(agent) = observer.agents.iter_mut().find(|a| &a.node == node) {
            if let Err(e) = agent.check() {
                why.push(format!("{node}'s agent: {e}"));
            }
            why.push(log_excerpt(
                &agent.log_text(),
                &ip,
                &format!("{node}'s agent"),
            ));
        }
    }
    let aggregator = std::fs::read_to_string(observer.aggregator.log()).unwrap_or_default();
    why.push(log_excerpt(&aggregator, &ip, "aggregator"));
    panic!(
        "{} incomplete, missing {:?}\n{}",
        d.pod,
        d.missing_nodes,
        why.join("\n")
    );
}

/// The last lines of `log` naming `ip` (as an address, not a prefix of
/// another) or warning.
fn log_excerpt(log: &str, ip: &str, whose: &str) -> String {
    const LINES: usize = 30;
    let names_ip = |l: &str| {
        l.match_indices(ip)
            .any(|(at, _)| !l[at + ip.len()..].starts_with(|c: char| c.is_ascii_digit()))
    };
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            (!ip.is_empty() && names_ip(l)) || l.contains(" WARN ") || l.contains(" ERROR ")
        })
        .collect();
    let tail = &lines[lines.len().saturating_sub(LINES)..];
    format!(
        "{whose}, {} of {} such lines:\n  {}",
        tail.len(),
        lines.len(),
        tail.join("\n  ")
    )
}
