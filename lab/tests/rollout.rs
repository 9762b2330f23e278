//! Rolling updates through the lab's dataplane alone (no observer): the
//! injected propagation delay makes a rollout without preStop delay lose
//! requests, and a preStop delay longer than every injected delay makes it
//! lose none.

use std::{path::PathBuf, time::Duration};

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
