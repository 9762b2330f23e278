//! The startup checks against the real aggregator HTTP API on a loopback
//! socket: a routed container without a readinessProbe, and the measured
//! finding of `/v1/startup` when the workload's new pods refused
//! connections after being marked ready. Warnings by default, errors (exit
//! 1) with `--fail-on-startup`.

mod common;

use observer_proto::UnixNanos;
use observer_proto::api::startup::StartupRecord;
use observer_proto::api::{RouterKind, RouterRef};

use common::cli::*;

/// Service `web` in shop routing to Deployment `web`, whose container has
/// a preStop above the seeded 5 s recommendation and a grace period that
/// holds it: only the startup checks can find anything.
fn manifest(readiness: bool) -> String {
    let probe = if readiness {
        "        readinessProbe:\n          tcpSocket: {port: 8080}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  selector: {{tier: web}}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: shop}}\nspec:\n  \
         selector: {{matchLabels: {{tier: web}}}}\n  template:\n    metadata: {{labels: {{tier: web}}}}\n    \
         spec:\n      terminationGracePeriodSeconds: 60\n      containers:\n      - name: app\n        image: a:1\n\
         {probe}        lifecycle:\n          preStop:\n            sleep: {{seconds: 10}}\n"
    )
}

/// A new pod of shop/web that refused `refused` connections after ready.
fn startup(i: usize, refused: u64) -> StartupRecord {
    StartupRecord {
        pod_uid: format!("new-{i}"),
        namespace: "shop".into(),
        pod_name: format!("web-{i}"),
        workload: "shop/web".into(),
        // Within the aggregator's retention: the log keeps it.
        ready_unix_nanos: UnixNanos::now(),
        services: vec!["web".into()],
        refused_connections: refused,
        last_refusal_seconds: (refused > 0).then_some(1.5),
        routers: vec![observer_proto::api::startup::RouterStartup {
            router: RouterRef {
                kind: RouterKind::Node,
                name: "node-a".into(),
                node: Some("node-a".into()),
            },
            refused_connections: refused,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn seeded_with(startups: &[StartupRecord]) -> Aggregator {
    let records: Vec<_> = (0..300)
        .map(|i| deletion(i, "shop", "web", 1.0 + i as f64 * 0.01))
        .collect();
    start_with_startups(&records, startups)
}

fn check(agg: &Aggregator, manifest: &str, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.yaml"), manifest).unwrap();
    let mut args = vec!["--aggregator", &agg.url, "--format", "json"];
    args.extend(extra);
    args.push("m.yaml");
    run(&args, dir.path(), None)
}

fn problems(out: &std::process::Output) -> Vec<(String, String, String)> {
    json(out)["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["problem"].as_str().unwrap().to_owned(),
                f["severity"].as_str().unwrap().to_owned(),
                f["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn refusals_after_ready_and_a_missing_probe_warn_and_fail_with_the_flag() {
    let agg = seeded_with(&[startup(1, 7), startup(2, 0), startup(3, 3)]);
    let out = check(&agg, &manifest(false), &[]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let found = problems(&out);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        (found[0].0.as_str(), found[0].1.as_str()),
        ("noReadinessProbe", "warning")
    );
    assert_eq!(
        (found[1].0.as_str(), found[1].1.as_str()),
        ("refusedAfterReady", "warning")
    );
    assert_eq!(
        found[1].2,
        "measured: 2 of 3 new pods of workload shop/web refused 10 connections within 1.5 s of \
         becoming ready: the readiness probe passes before the server listens"
    );

    let out = check(&agg, &manifest(false), &["--fail-on-startup"]);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(problems(&out).iter().all(|p| p.1 == "error"));
}

#[test]
fn a_probe_and_clean_startups_find_nothing() {
    let agg = seeded_with(&[startup(1, 0), startup(2, 0)]);
    let out = check(&agg, &manifest(true), &["--fail-on-startup"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(problems(&out), []);
}

#[test]
fn a_measured_finding_of_another_workload_is_not_this_ones() {
    let mut other = startup(1, 9);
    other.workload = "shop/api".into();
    let agg = seeded_with(&[other]);
    let out = check(&agg, &manifest(true), &["--fail-on-startup"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(problems(&out), []);
}
