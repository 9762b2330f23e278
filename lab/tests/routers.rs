//! End to end, one test per router kind besides kube-proxy (real nginx
//! ingress, client-side balancer, external balancer): its traffic flows
//! through it to the pods, its injected lag is applied, a rollout with a
//! preStop covering the lag loses nothing through it, one shorter than the
//! lag loses requests through it, and the aggregator's per-router
//! measurement lies within the bound stated for its kind.

mod common;

use std::time::Duration;

use lab::{
    observer::Observer,
    report,
    routers::{
        Choice, Routers, RoutersConfig,
        report::{PerRouter, bound_ms, connection_gap_ms},
    },
    scenario::{Lab, LabConfig, RolloutResult},
    server::ShutdownMode,
};
use observer_proto::api::DeletionRecord;

const PODS: usize = 4;
const RATE: f64 = 40.0;

/// A lab of three nodes and four pods whose kube-proxies are quick (the
/// router under test is the slow one), with the aggregator and agents, and
/// the one router `config` selects; no VIP client.
async fn lab_with(
    test: &str,
    config: RoutersConfig,
    seed: u64,
) -> (Lab, Observer, std::path::PathBuf) {
    let dir = common::work_dir(test);
    let (mut lab, observer) = common::start_in(
        &dir,
        LabConfig {
            pods: PODS,
            ..common::lab_config("50ms..200ms", ShutdownMode::Graceful, seed)
        },
        Duration::from_secs(10),
    )
    .await;
    let routers = Routers::start(&lab, observer.api(), &config, false, &dir)
        .await
        .expect("routers");
    lab.set_routers(routers);
    (lab, observer, dir)
}

fn config(seed: u64) -> RoutersConfig {
    RoutersConfig {
        ingress: None,
        client_side: None,
        external: None,
        rate: RATE,
        seed,
    }
}

fn log_run(name: &str, run: &RolloutResult) {
    eprintln!(
        "{name}: preStop {} s, {} requests, {} failed; by router {:?}",
        run.pre_stop_seconds,
        run.requests(),
        run.failed(),
        run.by_router
    );
}

async fn rollout(lab: &mut Lab, deletions: usize, pre_stop_s: u64) -> RolloutResult {
    let run = lab
        .rollout(
            &common::rollout(deletions, Duration::from_secs(pre_stop_s)),
            |p| eprintln!("{p}"),
        )
        .await
        .expect("rollout");
    log_run(&format!("preStop {pre_stop_s} s"), &run);
    run
}

/// The one router's requests of `run`: (requests, failed).
fn through_router(lab: &Lab, run: &RolloutResult) -> (u64, u64) {
    let name = &lab.routers().routers[0].info.name;
    let r = run.by_router.get(name).expect("the router's client ran");
    (r.requests, r.failed_total())
}

/// Every drop of the router came at least its drawn delay after the
/// deletion, and within `max_lag` (+ scheduling slack) of it.
fn assert_lag_applied(run: &RolloutResult, max_lag: Duration) {
    for d in &run.deletions {
        assert_eq!(d.router_drops.len(), 1, "{d:?}");
        let drop = &d.router_drops[0];
        let lag_ms = (drop.dropped_unix_nano - d.requested_unix_nano) as f64 / 1e6;
        if let Some(drawn) = drop.drawn_delay_ms {
            assert!(
                lag_ms >= drawn,
                "{}: dropped after {lag_ms} ms, drawn {drawn} ms",
                d.pod
            );
        }
        assert!(
            lag_ms <= max_lag.as_secs_f64() * 1000.0 + 500.0,
            "{}: dropped after {lag_ms} ms, max lag {max_lag:?}",
            d.pod
        );
    }
}

/// Measures `run` and checks the aggregator's view of the router: its
/// latency within the bound of its kind (once the aggregator reports
/// routers), and a recommendation covering every injected lag.
async fn check_measurements(lab: &Lab, observer: &Observer, run: &RolloutResult) -> u64 {
    let records: Vec<DeletionRecord> = observer
        .wait_complete(&run.deletions)
        .await
        .expect("measurements");
    let nodes: Vec<String> = lab.nodes().into_iter().map(|n| n.name).collect();
    let infos = lab::routers::report::infos(&nodes, lab.routers());
    let router = &lab.routers().routers[0];
    let rows: Vec<PerRouter> = run
        .deletions
        .iter()
        .flat_map(|t| {
            let record = records.iter().find(|r| r.pod_uid == t.uid);
            report::deletion_report("routers", t, record, &infos).per_router
        })
        .filter(|p| p.router == router.info.name)
        .collect();
    assert_eq!(rows.len(), run.deletions.len(), "{rows:?}");
    // Four ready pods plus those the router has not let go of yet.
    let gap_ms = connection_gap_ms(PODS + run.deletions.len(), RATE);
    let (low, high) = bound_ms(router.choice, gap_ms);
    for p in &rows {
        eprintln!(
            "{} {:?}: measured {:?} ms, injected {:.1} ms, bound {low:.0}..{high:.0} ms",
            p.router, p.choice, p.measured_ms, p.injected_ms
        );
    }
    for p in &rows {
        let error = p
            .error_ms
            .unwrap_or_else(|| panic!("no measurement: {p:?}"));
        assert!(
            (low..=high).contains(&error),
            "{} off by {error:.1} ms, outside {low:.0}..{high:.0}: {p:?}",
            p.router
        );
    }
    let pre_stop = observer
        .aggregator
        .recommendation(lab::api::NAMESPACE, lab::api::SERVICE)
        .await
        .expect("recommendation")
        .pre_stop_seconds
        .expect("a recommended preStop");
    let worst = rows.iter().map(|p| p.injected_ms).fold(0.0, f64::max);
    eprintln!("recommendation {pre_stop} s; slowest injected lag {worst:.0} ms");
    assert!(
        pre_stop as f64 * 1000.0 >= worst,
        "preStop {pre_stop} s does not cover the router's lag ({worst:.0} ms)"
    );
    pre_stop
}

/// The story for one router: measured with a long preStop (nothing lost,
/// lag applied, measurement within bound), then a preStop shorter than
/// every lag loses requests through it, then the recommendation loses
/// nothing.
async fn router_story(
    test: &str,
    config: RoutersConfig,
    max_lag: Duration,
    measure_s: u64,
    short_s: u64,
    seed: u64,
) {
    let (mut lab, observer, _dir) = lab_with(test, config, seed).await;
    assert_eq!(lab.routers().routers.len(), 1);

    let measure = rollout(&mut lab, 2, measure_s).await;
    let (requests, failed) = through_router(&lab, &measure);
    assert!(
        requests > 200,
        "too little traffic through the router: {requests}"
    );
    assert_eq!(
        failed, 0,
        "preStop {measure_s} s covers the lag, yet requests failed"
    );
    assert_lag_applied(&measure, max_lag);
    let pre_stop = check_measurements(&lab, &observer, &measure).await;

    let short = rollout(&mut lab, 2, short_s).await;
    assert_lag_applied(&short, max_lag);
    let (_, failed) = through_router(&lab, &short);
    assert!(
        failed > 0,
        "preStop {short_s} s is shorter than every lag, yet nothing failed"
    );

    let covered = rollout(&mut lab, 2, pre_stop).await;
    let (requests, failed) = through_router(&lab, &covered);
    assert!(requests > 200, "{requests}");
    assert_eq!(
        failed, 0,
        "the recommended preStop {pre_stop} s lost requests"
    );
    common::stop(observer, lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_nginx_reloads_late_and_the_folklore_loses_requests_through_it() {
    if !lab::root::root_or_skip(
        "ingress_nginx_reloads_late_and_the_folklore_loses_requests_through_it",
    ) {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    // Every reload comes after the folklore 5 s.
    let delay = "5500ms..6500ms".parse().expect("delay");
    let config = RoutersConfig {
        ingress: Some(delay),
        ..config(21)
    };
    router_story(
        "router-ingress",
        config,
        Duration::from_millis(6500),
        8,
        5,
        21,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_balancer_refreshing_every_3s_is_covered_by_the_recommendation() {
    if !lab::root::root_or_skip(
        "client_side_balancer_refreshing_every_3s_is_covered_by_the_recommendation",
    ) {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let refresh = Duration::from_secs(3);
    let config = RoutersConfig {
        client_side: Some(refresh),
        ..config(22)
    };
    // preStop 0: the pod stops at once, the balancer sends to it until its
    // next refresh.
    router_story("router-client-side", config, refresh, 5, 0, 22).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_balancer_deregistering_late_is_covered_by_the_recommendation() {
    if !lab::root::root_or_skip(
        "external_balancer_deregistering_late_is_covered_by_the_recommendation",
    ) {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let delay = "2s..3s".parse().expect("delay");
    let config = RoutersConfig {
        external: Some(delay),
        ..config(23)
    };
    router_story("router-external", config, Duration::from_secs(3), 5, 0, 23).await;
}

/// The router types are named as the report and `--routers` name them.
#[test]
fn router_types_are_named_as_the_flag_names_them() {
    let names: Vec<String> = Choice::ALL
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["kube-proxy", "ingress", "client-side", "external"]);
    let shown: Vec<String> = Choice::ALL.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, names);
}
