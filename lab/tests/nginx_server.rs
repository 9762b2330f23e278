//! End to end with real nginx as the pods' server (seed 002's experiment):
//! keep-alive clients against nginx with its default keepalive_timeout.
//! A preStop covering every node keeps new connections whole, but
//! SIGTERM, nginx's fast shutdown, cuts the keep-alive connections it
//! holds: requests on them fail, and the aggregator reports the finding.

mod common;

use std::time::Duration;

use lab::server::ShutdownMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_pods_cut_keep_alive_connections_at_sigterm_and_the_finding_says_so() {
    if !lab::root::root_or_skip(
        "nginx_pods_cut_keep_alive_connections_at_sigterm_and_the_finding_says_so",
    ) {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let (mut lab, observer) = common::start(
        "nginx-server",
        common::lab_config("100ms..400ms", ShutdownMode::Nginx, 31),
        Duration::from_secs(10),
    )
    .await;
    let run = lab
        .rollout(&common::rollout(3, Duration::from_secs(2)), |p| {
            eprintln!("{p}")
        })
        .await
        .expect("rollout");
    eprintln!(
        "new connections {:?}; keep-alive {:?}",
        run.new_connection, run.keep_alive
    );
    // nginx answered: every backend seen is one of the pods.
    assert!(run.keep_alive.ok > 100, "{:?}", run.keep_alive);
    assert!(
        run.keep_alive
            .backends
            .keys()
            .all(|b| b.starts_with("web-"))
    );
    // A 2 s preStop covers every node's 400 ms; nginx's fast shutdown
    // cuts its keep-alive connections.
    common::assert_only_keep_alive_lost(&observer, &run).await;
    common::stop(observer, lab).await;
}
