//! The lab's control plane with the real aggregator: deletions reach it
//! through the API double with Kubernetes' fields, and survive its restart.

mod common;

use std::time::Duration;

use lab::{observer::Observer, scenario::Lab, server::ShutdownMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sees_lab_deletions_through_the_api_double() {
    if !lab::root::root_or_skip("aggregator_sees_lab_deletions_through_the_api_double") {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let dir = common::work_dir("control-plane");
    let binaries = common::binaries(Duration::from_secs(3));
    let mut lab = Lab::start(common::lab_config("50ms..100ms", ShutdownMode::Graceful, 3))
        .await
        .expect("lab");
    let mut observer = Observer::start_control_plane(&lab, &binaries, &dir)
        .await
        .expect("observer");

    let run = lab
        .rollout(&common::rollout(2, Duration::from_secs(1)), |p| {
            eprintln!("{p}")
        })
        .await
        .expect("rollout");
    let records = observer
        .wait_complete(&run.deletions)
        .await
        .expect("deletions finished");
    for (truth, record) in run.deletions.iter().zip(&records) {
        assert_eq!(record.pod_name, truth.pod);
        // T0 is the aggregator's receipt of the watch event that showed the
        // deletion: a few milliseconds after the lab asked.
        let lag_ms = (record.deletion_start_unix_nanos - truth.requested_unix_nano) as f64 / 1e6;
        assert!(
            (0.0..200.0).contains(&lag_ms),
            "{}: T0 {lag_ms} ms after the request",
            truth.pod
        );
    }
    let api_pod = observer
        .api()
        .double()
        .get::<k8s_openapi::api::core::v1::Pod>(lab::api::NAMESPACE, &run.deletions[0].pod);
    assert!(
        api_pod.is_none(),
        "a pod whose process ended must be gone from the API"
    );

    observer.aggregator.kill().await;
    observer.aggregator.restart().await.expect("restart");
    let after = observer
        .aggregator
        .deletions(lab::api::NAMESPACE, lab::api::SERVICE)
        .await
        .expect("deletions");
    for truth in &run.deletions {
        assert!(
            after.iter().any(|r| r.pod_uid == truth.uid),
            "{} lost across a restart",
            truth.pod
        );
    }
    common::stop(observer, lab).await;
}
