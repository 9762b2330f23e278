//! Rolling updates through the lab's dataplane alone (no observer): the
//! injected propagation delay makes a rollout without preStop delay lose
//! requests, and a preStop delay longer than every injected delay makes it
//! lose none.

use std::{path::PathBuf, process::Stdio, time::Duration};

use lab::{
    kubeproxy::Mode,
    scenario::{Lab, LabConfig, RolloutConfig},
    server::ShutdownMode,
};

fn config(delay: &str, server_mode: ShutdownMode) -> LabConfig {
    LabConfig {
        nodes: 3,
        pods: 3,
        modes: Mode::ALL.to_vec(),
        delay: delay.parse().unwrap(),
        seed: 42,
        pod_server: PathBuf::from(env!("CARGO_BIN_EXE_lab-pod-server")),
        server_mode,
        start: Default::default(),
        termination: Default::default(),
    }
}

fn rollout(pre_stop: Duration) -> RolloutConfig {
    RolloutConfig {
        deletions: 3,
        spacing: Duration::from_millis(800),
        pre_stop,
        grace: pre_stop + Duration::from_secs(2),
        rate: 60.0,
        keep_alive_connections: 3,
        drain: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestop_shorter_than_propagation_loses_requests_and_longer_loses_none() {
    if !lab::root::root_or_skip(
        "prestop_shorter_than_propagation_loses_requests_and_longer_loses_none",
    ) {
        return;
    }
    let mut lab = Lab::start(config("300ms..900ms", ShutdownMode::Graceful))
        .await
        .expect("lab");
    let zero = lab
        .rollout(&rollout(Duration::ZERO), |p| eprintln!("{p}"))
        .await
        .expect("rollout");
    eprintln!("preStop 0: {:?} {:?}", zero.new_connection, zero.keep_alive);
    assert_eq!(zero.deletions.len(), 3);
    for d in &zero.deletions {
        assert_eq!(d.removals.len(), 3, "{d:?}");
        for r in &d.removals {
            let after_ms = (r.applied_finished_unix_nano - d.requested_unix_nano) as f64 / 1e6;
            assert!(
                after_ms >= r.injected_delay_ms && after_ms < r.injected_delay_ms + 500.0,
                "{r:?}"
            );
        }
    }
    assert!(
        zero.new_connection.failed_total() > 0,
        "preStop 0 lost nothing: {zero:?}"
    );
    assert!(
        zero.new_connection
            .failed
            .contains_key(&lab::client::FailureCause::Refused)
    );

    let covered = lab
        .rollout(&rollout(Duration::from_secs(2)), |p| eprintln!("{p}"))
        .await
        .expect("rollout");
    eprintln!(
        "preStop 2: {:?} {:?}",
        covered.new_connection, covered.keep_alive
    );
    assert!(covered.requests() > 1000, "{covered:?}");
    assert_eq!(
        covered.failed(),
        0,
        "a preStop covering every delay lost requests: {covered:?}"
    );
    lab.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_fail_with_a_server_that_ignores_sigterm_despite_the_prestop() {
    if !lab::root::root_or_skip(
        "keep_alive_requests_fail_with_a_server_that_ignores_sigterm_despite_the_prestop",
    ) {
        return;
    }
    let mut lab = Lab::start(config("100ms..300ms", ShutdownMode::IgnoreSigterm))
        .await
        .expect("lab");
    let mut settings = rollout(Duration::from_secs(1));
    settings.grace = Duration::from_secs(2);
    let bad = lab
        .rollout(&settings, |p| eprintln!("{p}"))
        .await
        .expect("rollout");
    eprintln!("bad server: {:?} {:?}", bad.new_connection, bad.keep_alive);
    assert!(
        bad.deletions
            .iter()
            .all(|d| d.ending == Some(lab::workload::Ending::Killed))
    );
    assert_eq!(bad.new_connection.failed_total(), 0, "{bad:?}");
    assert!(bad.keep_alive.failed_total() > 0, "{bad:?}");
    lab.shutdown().await.expect("shutdown");
}

/// What `hey` printed: responses with status 200 (`[200]\tN responses`),
/// and failed requests (`[N]\tGet ...` under "Error distribution").
fn hey_counts(text: &str) -> (u64, u64) {
    let ok = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("[200]")?
                .trim()
                .strip_suffix(" responses")?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let errors = text
        .lines()
        .skip_while(|l| !l.starts_with("Error distribution"))
        .skip(1)
        .filter_map(|l| {
            l.trim()
                .strip_prefix('[')?
                .split_once(']')?
                .0
                .parse::<u64>()
                .ok()
        })
        .sum();
    (ok, errors)
}

/// `hey` (Debian's hey, installed by `cargo xtask setup`) from every node of
/// `lab` against the Service VIP, one new connection per request.
fn start_hey(lab: &Lab, seconds: u64) -> Vec<(String, tokio::process::Child)> {
    let url = format!(
        "http://{}:{}/",
        lab::api::SERVICE_IP,
        lab::api::SERVICE_PORT
    );
    lab.cluster
        .nodes
        .iter()
        .map(|node| {
            let mut cmd: tokio::process::Command = node.ns.command("hey").into();
            cmd.args([
                "-z",
                &format!("{seconds}s"),
                "-c",
                "2",
                "-q",
                "40",
                "-t",
                "2",
            ])
            .arg("-disable-keepalive")
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
            let child = cmd.spawn().expect("run hey (Debian package hey)");
            (node.name.clone(), child)
        })
        .collect()
}

/// Waits for every `hey`; (node, OKs, errors, output) each.
async fn finish_hey(heys: Vec<(String, tokio::process::Child)>) -> Vec<(String, u64, u64, String)> {
    let mut results = Vec::new();
    for (node, child) in heys {
        let out = child.wait_with_output().await.expect("hey");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "hey on {node}: {text}");
        let (ok, errors) = hey_counts(&text);
        results.push((node, ok, errors, text));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hey_from_every_node_of_a_lab_fails_without_prestop_and_not_with_it() {
    if !lab::root::root_or_skip(
        "hey_from_every_node_of_a_lab_fails_without_prestop_and_not_with_it",
    ) {
        return;
    }
    let mut lab = Lab::start(config("300ms..900ms", ShutdownMode::Graceful))
        .await
        .expect("lab");
    // While idle: every node's dataplane mode serves the VIP.
    for (node, ok, errors, text) in finish_hey(start_hey(&lab, 2)).await {
        assert!(ok > 40 && errors == 0, "hey on {node}, idle lab:\n{text}");
    }

    // During rollouts, covering the deletions (1 s in, 0.8 s apart).
    let heys = start_hey(&lab, 4);
    let zero = lab
        .rollout(&rollout(Duration::ZERO), |p| eprintln!("{p}"))
        .await
        .expect("rollout");
    let results = finish_hey(heys).await;
    for (node, ok, errors, _) in &results {
        eprintln!("preStop 0, hey on {node}: {ok} OK, {errors} failed");
    }
    assert!(
        zero.failed() > 0,
        "the lab's own clients lost nothing: {zero:?}"
    );
    assert!(
        results.iter().map(|r| r.2).sum::<u64>() > 0,
        "hey lost nothing during a rollout without preStop:\n{}",
        results
            .iter()
            .map(|r| r.3.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );

    let heys = start_hey(&lab, 4);
    let covered = lab
        .rollout(&rollout(Duration::from_secs(2)), |p| eprintln!("{p}"))
        .await
        .expect("rollout");
    assert_eq!(covered.failed(), 0, "{covered:?}");
    for (node, ok, errors, text) in finish_hey(heys).await {
        eprintln!("preStop 2 s, hey on {node}: {ok} OK, {errors} failed");
        assert!(
            ok > 80 && errors == 0,
            "hey on {node}, covered rollout:\n{text}"
        );
    }
    lab.shutdown().await.expect("shutdown");
}
