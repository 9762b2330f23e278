//! End to end at ten nodes: a rolling update of 50 pods measured by the
//! real agents and aggregator, held to the same accuracy bounds as the
//! default end-to-end test, and a second rollout with the recommended
//! preStop that loses nothing. It guards what breaks first as the lab
//! grows: the aggregator's answers (pages of summaries, per-deletion
//! detail), the lab's own bookkeeping, and the agents at ten nodes. The
//! nodes cycle through the four dataplane modes (node-3 and node-7 are
//! cilium).

mod common;

use std::time::Duration;

use lab::{
    scenario::{LabConfig, RolloutConfig},
    server::ShutdownMode,
};

const NODES: usize = 10;
const DELETIONS: usize = 50;

fn rollout(pre_stop: Duration) -> RolloutConfig {
    RolloutConfig {
        spacing: Duration::from_millis(200),
        ..common::rollout(DELETIONS, pre_stop)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_deletions_at_ten_nodes_are_measured_within_bounds_and_the_recommendation_loses_nothing()
 {
    if !lab::root::root_or_skip("fifty_deletions_at_ten_nodes") {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let (mut lab, mut observer) = common::start(
        "scale",
        LabConfig {
            nodes: NODES,
            pods: DELETIONS,
            ..common::lab_config(
                "100ms..700ms,outliers=0.25@1500ms..2500ms",
                ShutdownMode::Graceful,
                21,
            )
        },
        Duration::from_secs(10),
    )
    .await;

    let measure = lab
        .rollout(&rollout(Duration::from_secs(3)), |p| eprintln!("{p}"))
        .await
        .expect("measuring rollout");
    assert_eq!(measure.deletions.len(), DELETIONS);
    let records = observer
        .wait_complete(&measure.deletions)
        .await
        .expect("measurements");
    let deletions = common::joined(&measure.deletions, &records);
    common::assert_complete(&mut observer, &deletions, &records);
    for d in &deletions {
        assert_eq!(d.per_node.len(), NODES, "{}", d.pod);
    }
    let inaccurate = common::inaccurate(&deletions);
    for line in &inaccurate {
        eprintln!("{line}");
    }
    // Where the agents' clock exchanges stand: every process shares one
    // clock here, so an agent's estimated offset is all error, within
    // this uncertainty; a failure below is read against it.
    let clocks = clock_uncertainty_ms(&records);

    let (pre_stop, recommendation) = common::covering_recommendation(&observer, &deletions).await;
    assert_eq!(
        recommendation.samples, DELETIONS as u64,
        "{recommendation:?}"
    );

    let covered = lab
        .rollout(&rollout(Duration::from_secs(pre_stop)), |p| {
            eprintln!("{p}")
        })
        .await
        .expect("rollout with the recommendation");
    eprintln!(
        "recommended: preStop {pre_stop} s, {} requests, {} failed",
        covered.requests(),
        covered.failed()
    );
    assert!(covered.requests() > 5000, "{}", covered.requests());
    assert_eq!(
        covered.failed(),
        0,
        "the recommended preStop lost requests: new connections {:?}, keep-alive {:?}",
        covered.new_connection.failed,
        covered.keep_alive.failed
    );
    assert!(
        inaccurate.is_empty(),
        "{} of {} measurements off the injected truth:\n{}\nagents' clock uncertainty (ms): {clocks:?}",
        inaccurate.len(),
        NODES * DELETIONS,
        inaccurate.join("\n")
    );
    common::stop(observer, lab).await;
}

/// The largest clock uncertainty the aggregator applied to each node.
fn clock_uncertainty_ms(
    records: &[observer_proto::api::DeletionRecord],
) -> std::collections::BTreeMap<String, f64> {
    let mut by_node = std::collections::BTreeMap::new();
    for n in records.iter().flat_map(|r| &r.nodes) {
        if let Some(u) = n.clock_uncertainty_seconds {
            let max: &mut f64 = by_node.entry(n.node.clone()).or_default();
            *max = max.max(u * 1000.0);
        }
    }
    by_node
}
