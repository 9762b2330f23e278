//! End to end, the startup side: the real agents and aggregator watch the
//! pods a rollout starts. A server marked ready before it listens refuses
//! the connections the nodes already route to it: counted, attributed to
//! the nodes that sent them, and the aggregator's finding names the
//! workload; a server that listens before it is ready yields none. Each
//! node's addition of a new pod is measured within the same bounds as
//! removals.

mod common;

use std::time::Duration;

use lab::{
    kubeproxy::Mode,
    scenario::{LabConfig, RolloutResult},
    server::ShutdownMode,
    startup::{self, NewPodReport, StartBehaviour},
};
use observer_proto::api::startup::StartupReport;

/// The lab's Service pods belong to the Deployment `web`.
const WORKLOAD: &str = "default/web";

async fn run(test: &str, start: StartBehaviour, seed: u64) -> (RolloutResult, StartupReport) {
    let (mut lab, observer) = common::start(
        test,
        LabConfig {
            start,
            ..common::lab_config("100ms..700ms", ShutdownMode::Graceful, seed)
        },
        Duration::from_secs(10),
    )
    .await;
    let run = lab
        .rollout(&common::rollout(3, Duration::from_secs(2)), |p| {
            eprintln!("{p}")
        })
        .await
        .expect("rollout");
    let measured = startup::wait_measured(&observer, &run.new_pods)
        .await
        .expect("startup windows");
    common::stop(observer, lab).await;
    (run, measured)
}

fn reports(run: &RolloutResult, measured: &StartupReport) -> Vec<NewPodReport> {
    let section = startup::StartupSection::new(&[("e2e".into(), run.new_pods.clone())], measured);
    let mut text = String::new();
    section.write(&mut text);
    eprintln!("{text}");
    section.new_pods
}

/// Every node's addition of every new pod outside the bound of its mode.
fn inaccurate(pods: &[NewPodReport]) -> Vec<String> {
    pods.iter()
        .flat_map(|p| p.per_node.iter().map(move |n| (p, n)))
        .filter(|(_, n)| {
            common::outside_bound(
                &n.mode,
                n.error_ms,
                n.clock_uncertainty_ms,
                n.injected_ms,
                n.injected_started_ms,
                None,
            )
        })
        .map(|(p, n)| {
            format!(
                "{} on {} ({}): added measured {:?} ms, injected {:.1} ms (transaction began {:.1} ms), clock uncertainty {:?} ms",
                p.pod,
                n.node,
                n.mode,
                n.measured_ms,
                n.injected_ms,
                n.injected_started_ms,
                n.clock_uncertainty_ms
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_listening_after_ready_refuses_and_the_finding_names_its_workload() {
    if !lab::root::root_or_skip(
        "a_server_listening_after_ready_refuses_and_the_finding_names_its_workload",
    ) {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let slow = StartBehaviour::SlowStart(Duration::from_secs(3));
    let (run, measured) = run("slow-start", slow, 23).await;
    let pods = reports(&run, &measured);
    assert_eq!(pods.len(), 3);
    for p in &pods {
        assert!(p.measured, "{} has no startup record", p.pod);
        assert!(
            p.refused_after_ready > 0,
            "{} refused nothing though it listened 3 s after ready",
            p.pod
        );
        assert!(
            !p.refused_by.is_empty() && p.refused_by.iter().all(|r| r.starts_with("node/")),
            "{}: refusals attributed to {:?}, not to the nodes whose clients sent them",
            p.pod,
            p.refused_by
        );
    }
    let finding = measured
        .findings
        .iter()
        .find(|f| f.workload == WORKLOAD)
        .unwrap_or_else(|| panic!("no finding for {WORKLOAD}: {:?}", measured.findings));
    assert_eq!((finding.pods_refusing, finding.new_pods), (3, 3));
    assert!(finding.message.contains(WORKLOAD), "{}", finding.message);
    assert!(
        finding.refusing_for_seconds < 3.5,
        "refusals after the server listened: {finding:?}"
    );
    let off = inaccurate(&pods);
    assert!(
        off.is_empty(),
        "additions off the injected truth:\n{}",
        off.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_listening_before_ready_yields_no_finding() {
    if !lab::root::root_or_skip("a_server_listening_before_ready_yields_no_finding") {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let (run, measured) = run("graceful-start", StartBehaviour::Immediate, 29).await;
    let pods = reports(&run, &measured);
    assert_eq!(pods.len(), 3);
    for p in &pods {
        assert!(p.measured, "{} has no startup record", p.pod);
        assert_eq!(p.refused_after_ready, 0, "{} refused connections", p.pod);
        assert!(
            p.ready_to_first_accepted_ms.is_some(),
            "{} accepted nothing in its window",
            p.pod
        );
    }
    assert!(measured.findings.is_empty(), "{:?}", measured.findings);
    // The lab's rollout deletes an old pod as soon as its replacement is
    // ready, before any node's proxy (100-700 ms) routes to it.
    let rollout = measured
        .rollout_findings
        .iter()
        .find(|f| f.workload == WORKLOAD)
        .unwrap_or_else(|| panic!("no rollout finding: {:?}", measured.rollout_findings));
    assert!(
        rollout.pods_affected >= 1 && rollout.max_nodes_affected >= 1,
        "{rollout:?}"
    );
    assert!(
        rollout.max_nodes_affected <= Mode::ALL.len() as u64,
        "more nodes than the lab has: {rollout:?}"
    );
    let off = inaccurate(&pods);
    assert!(
        off.is_empty(),
        "additions off the injected truth:\n{}",
        off.join("\n")
    );
}

#[test]
fn the_bound_widens_by_the_stated_clock_uncertainty_the_witness_lag_and_a_legacy_precision_only() {
    // An iptables-nft node 13.3 ms late: its agent's offset was off by that
    // much, which its stated uncertainty of 14 ms covers; 0.5 ms does not.
    assert!(!common::outside_bound(
        "iptables-nft",
        Some(13.3),
        Some(14.0),
        400.0,
        395.0,
        None
    ));
    assert!(common::outside_bound(
        "iptables-nft",
        Some(13.3),
        Some(0.5),
        400.0,
        395.0,
        None
    ));
    // An nftables node 3.3 ms before the witness read the commit (the
    // witness woke late), inside the transaction: in; before the
    // transaction began, or 3.5 ms after the witness: out.
    assert!(!common::outside_bound(
        "nftables",
        Some(-3.3),
        Some(0.58),
        778.5,
        669.2,
        None
    ));
    assert!(common::outside_bound(
        "nftables",
        Some(-115.0),
        Some(0.58),
        778.5,
        669.2,
        None
    ));
    assert!(common::outside_bound(
        "nftables",
        Some(3.5),
        Some(0.58),
        778.5,
        669.2,
        None
    ));
    // A legacy node measured 9.7 ms past its writer's exit (400 ms).
    assert!(!common::outside_bound(
        "iptables-legacy",
        Some(9.7),
        Some(8.0),
        400.0,
        395.0,
        None
    ));
    assert!(common::outside_bound(
        "iptables-legacy",
        Some(9.7),
        None,
        400.0,
        395.0,
        None
    ));
    // 21.5 ms past the exit (a late reader) with a stated precision of
    // 26.4 ms: the claimed interval meets the write; 10 ms does not, and
    // no precision excuses a time before the write began.
    assert!(!common::outside_bound(
        "iptables-legacy",
        Some(21.5),
        Some(0.5),
        392.1,
        376.9,
        Some(26.4)
    ));
    assert!(common::outside_bound(
        "iptables-legacy",
        Some(21.5),
        Some(0.5),
        392.1,
        376.9,
        Some(10.0)
    ));
    assert!(common::outside_bound(
        "iptables-legacy",
        Some(-20.0),
        Some(0.5),
        392.1,
        376.9,
        Some(26.4)
    ));
    assert!(common::outside_bound(
        "nftables",
        None,
        Some(1.0),
        400.0,
        395.0,
        None
    ));
}
