//! Alert rules and dashboards: promtool accepts and unit-tests the rules,
//! every dashboard query is PromQL that promtool parses, and every metric
//! they name is one that the real aggregator's or agent's `/metrics` (both
//! scraped over loopback sockets here) or `prestop-check --metrics-file`
//! actually exposes.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::deploy::{
    dashboard_queries, dashboards, deploy, instantiate, names, rule_exprs, rules_file,
};
use prestop_check::textfile;
use serde_json::Value;

/// A GET over a real loopback socket; the body of a 2xx answer.
fn get_body(addr: std::net::SocketAddr, path: &str) -> String {
    let r = lab::http_client::HttpClient::default()
        .get_blocking(&format!("http://{addr}{path}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.text()
}

/// prometheus-client leaves label families out of a scrape until they have
/// a member: give every one of the aggregator's a sample. The pattern lists
/// every field, so a metric added to the registry must be added here too.
fn populate_aggregator(m: &aggregator::metrics::Metrics) {
    use aggregator::metrics::*;
    let Metrics {
        registry: _,
        propagation_latency,
        control_plane_latency,
        late_connections,
        refused_connections,
        keepalive_aborted,
        agents_connected,
        agent_events_lost,
        report_lag,
        store_deletions,
        recommendation_seconds,
        recommendation_samples,
        deletions,
        nodes_missing,
        nodes_still_routing,
        observations_rejected,
        agent_observations_dropped,
        router_latency,
        token_reviews,
        auth_refusals,
        startup,
        drains: _,
        drain_wait: _,
    } = m;
    m.drain_answered("drained", std::time::Duration::from_secs(2));
    let (node, namespace) = ("n1".to_string(), "shop".to_string());
    propagation_latency
        .get_or_create(&NodeNamespaceMode {
            node: node.clone(),
            namespace: namespace.clone(),
            mode: "nftables".into(),
        })
        .observe(1.0);
    control_plane_latency
        .get_or_create(&NamespaceLabel {
            namespace: namespace.clone(),
        })
        .observe(0.1);
    for family in [late_connections, refused_connections, keepalive_aborted] {
        family
            .get_or_create(&NodeNamespace {
                node: node.clone(),
                namespace: namespace.clone(),
            })
            .inc();
    }
    agents_connected.set(1);
    agent_events_lost
        .get_or_create(&NodeLabel { node: node.clone() })
        .inc();
    agent_observations_dropped
        .get_or_create(&NodeLabel { node: node.clone() })
        .inc();
    nodes_still_routing
        .get_or_create(&NodeLabel { node: node.clone() })
        .inc();
    nodes_missing.get_or_create(&NodeLabel { node }).inc();
    for (family, reason) in [
        (observations_rejected, "future"),
        (token_reviews, "authenticated"),
        (auth_refusals, "forbidden"),
    ] {
        family
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
    router_latency.observe(
        &observer_proto::api::RouterRef {
            kind: observer_proto::api::RouterKind::Workload,
            name: "ingress/nginx".into(),
            node: None,
        },
        2.0,
    );
    startup.finished(&observer_proto::api::startup::StartupRecord {
        namespace: namespace.clone(),
        refused_connections: 3,
        nodes: vec![
            observer_proto::api::startup::NodeAddition {
                node: "n1".into(),
                propagation_seconds: Some(0.5),
                ..Default::default()
            },
            observer_proto::api::startup::NodeAddition {
                node: "n2".into(),
                not_added: true,
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    startup.not_watched();
    report_lag.observe(0.01);
    store_deletions.set(1);
    let scope = NamespaceService {
        namespace: namespace.clone(),
        service: "web".into(),
    };
    recommendation_seconds.get_or_create(&scope).set(5.0);
    recommendation_samples.get_or_create(&scope).set(100);
    deletions
        .get_or_create(&NamespaceOutcome {
            namespace,
            outcome: "complete".into(),
        })
        .inc();
}

/// An agent's health state with a member in every label family (its
/// fields are private; these are the calls the agent itself makes).
fn populated_agent() -> std::sync::Arc<observer_agent::health::Health> {
    use observer_proto::{NewFlow, Observation, UnixNanos};
    let health = observer_agent::health::Health::new();
    health.set_hook("sock/inet_sock_set_state", true);
    health.set_watched(1);
    health.kernel_stats(observer_agent::kernel::Stats::default());
    let addr: std::net::SocketAddr = "10.0.0.1:80".parse().unwrap();
    health.observed(&Observation::NewFlow(NewFlow {
        src: addr,
        dst: addr,
        original_dst: addr,
        time: UnixNanos::from_nanos(0),
    }));
    health
}

/// What the real aggregator's and a real agent's `/metrics` endpoints
/// serve, scraped over loopback sockets: the aggregator's HTTP server on a
/// fresh store, the agent's health server (no kernel needed).
fn scrapes() -> Vec<(&'static str, String)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = aggregator::store::Store::open(dir.path().join("store.db")).unwrap();
    let state = aggregator::http::HttpState::new(
        std::sync::Arc::new(store),
        aggregator::config::Settings::default(),
    );
    let (aggregator, agent) = runtime.block_on(async {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (a, b)
    });
    let (aggregator_addr, agent_addr) = (
        aggregator.local_addr().unwrap(),
        agent.local_addr().unwrap(),
    );
    populate_aggregator(&state.metrics);
    runtime.spawn(aggregator::http::serve(aggregator, state));
    runtime.spawn(observer_agent::health::serve(agent, populated_agent()));
    vec![
        ("aggregator", get_body(aggregator_addr, "/metrics")),
        ("agent", get_body(agent_addr, "/metrics")),
        // No workload: the file still declares its metrics.
        ("prestop-check --metrics-file", textfile::render(&[], None)),
    ]
}

/// The series names a scrape of `exposition` yields, from its `# TYPE`
/// lines: counters with `_total`, histograms as their `_bucket`, `_count`
/// and `_sum` series. Families without samples yet are declared too.
fn series_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        else {
            continue;
        };
        match kind.trim() {
            "counter" => {
                out.insert(format!("{}_total", name.trim_end_matches("_total")));
            }
            "histogram" => {
                for suffix in ["_bucket", "_count", "_sum"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            "gauge" | "untyped" | "unknown" => {
                out.insert(name.to_string());
            }
            other => panic!("unexpected metric type {other} of {name}"),
        }
    }
    out
}

/// Every series name the aggregator, the agents and the metrics file
/// expose, from their real registries: a renamed metric fails the checks
/// below.
fn known_metrics() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (source, text) in scrapes() {
        let names = series_names(&text);
        assert!(
            names.len() >= 2 && names.iter().all(|n| n.starts_with("prestop_")),
            "{source}: {names:?}"
        );
        out.extend(names);
    }
    out
}

#[test]
fn every_aggregator_metric_is_on_the_dashboard() {
    let (_, text) = scrapes().remove(0);
    let used: Vec<String> = dashboards()
        .iter()
        .flat_map(|(_, d)| dashboard_queries(d))
        .flat_map(|q| names(&q))
        .collect();
    for line in text.lines() {
        let Some((family, _)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) else {
            continue;
        };
        assert!(
            used.iter().any(|u| u.starts_with(family)),
            "the aggregator exposes {family} but no dashboard panel shows it"
        );
    }
}

#[test]
fn the_scrapes_declare_what_the_dashboards_rely_on() {
    let known = known_metrics();
    // A sample of each source, so an empty or unparsed scrape cannot pass
    // the name checks vacuously.
    for name in [
        "prestop_propagation_latency_seconds_bucket",
        "prestop_late_connections_total",
        "prestop_recommendation_seconds",
        "prestop_agent_hook_attached",
        "prestop_agent_kernel_events_total",
        textfile::PRE_STOP,
        textfile::GRACE,
    ] {
        assert!(known.contains(name), "{name} not in {known:?}");
    }
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus) must be installed: cargo xtask setup");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_rules() {
    let (ok, out) = promtool(&["check", "rules", rules_file().to_str().unwrap()]);
    assert!(ok, "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let tests = deploy().join("prometheus/tests/prestop-rules.test.yaml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn rules_name_only_exposed_metrics() {
    let known = known_metrics();
    let recorded: BTreeSet<String> = rule_exprs().into_iter().filter_map(|(r, _)| r).collect();
    for (_, expr) in rule_exprs() {
        for name in names(&expr) {
            assert!(
                known.contains(&name) || recorded.contains(&name),
                "unknown metric {name} in {expr}"
            );
        }
    }
}

/// promtool has no PromQL-only checker: each query becomes a recording rule
/// in a temporary rule file.
fn promtool_parses(exprs: &[String]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yaml");
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        text += &format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&instantiate(e, "5m")).unwrap()
        );
    }
    std::fs::write(&path, text).unwrap();
    promtool(&["check", "rules", path.to_str().unwrap()])
}

#[test]
fn dashboard_queries_parse_and_name_only_exposed_metrics() {
    let known = known_metrics();
    for (path, dashboard) in dashboards() {
        let queries = dashboard_queries(&dashboard);
        assert!(
            queries.len() >= 15,
            "{}: {} queries",
            path.display(),
            queries.len()
        );
        let (ok, out) = promtool_parses(&queries);
        assert!(ok, "{}: {out}", path.display());
        for q in &queries {
            for name in names(q) {
                assert!(
                    known.contains(&name),
                    "{}: unknown metric {name} in {q}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_query_check_rejects_bad_promql() {
    let (ok, _) = promtool_parses(&["sum(rate(prestop_deletions_total[5m])".to_string()]);
    assert!(!ok);
}

#[test]
fn dashboards_are_provisionable_with_cluster_namespace_node_variables() {
    for (path, d) in dashboards() {
        let name = path.display();
        assert!(
            d["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{name}: uid"
        );
        assert!(
            d.get("id").is_none_or(Value::is_null),
            "{name}: provisioned dashboards carry no id"
        );
        let vars: BTreeSet<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for v in ["datasource", "cluster", "namespace", "node"] {
            assert!(vars.contains(v), "{name}: variable {v}");
        }
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{name}: duplicate panel id"
            );
            assert!(p["gridPos"]["w"].as_u64().is_some(), "{name}: gridPos");
            if p["type"] != "row" {
                assert!(!p["title"].as_str().unwrap().is_empty());
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "{name}: {}",
                    p["title"]
                );
            }
        }
    }
}

/// The queries of the panel titled `title`, by refId, with Grafana's
/// variables set: every namespace, clusters matching `cluster`.
fn panel_queries(title: &str, cluster: &str) -> Vec<(String, String)> {
    let (_, d) = dashboards()
        .into_iter()
        .find(|(_, d)| {
            d["panels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["title"] == title)
        })
        .unwrap_or_else(|| panic!("no panel {title}"));
    let panel = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == title)
        .unwrap()
        .clone();
    panel["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let expr = t["expr"].as_str().unwrap().replace("$cluster", cluster);
            (
                t["refId"].as_str().unwrap().to_string(),
                instantiate(&expr, "5m"),
            )
        })
        .collect()
}

/// Runs `promtool test rules` on one test group: `inputs` as input series,
/// each `(expr, expected samples)` evaluated at 1m.
fn promtool_expect(
    inputs: &[(&str, &str)],
    cases: &[(String, Vec<(&str, f64)>)],
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("panel.test.yaml");
    let mut text = format!(
        "rule_files: [{}]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n",
        serde_json::to_string(rules_file().to_str().unwrap()).unwrap()
    );
    for (series, values) in inputs {
        text += &format!("      - series: '{series}'\n        values: '{values}'\n");
    }
    text += "    promql_expr_test:\n";
    for (expr, samples) in cases {
        text += &format!(
            "      - expr: {}\n        eval_time: 1m\n        exp_samples:{}\n",
            serde_json::to_string(expr).unwrap(),
            if samples.is_empty() { " []" } else { "" }
        );
        for (labels, value) in samples {
            text += &format!("          - labels: '{labels}'\n            value: {value}\n");
        }
    }
    std::fs::write(&path, text).unwrap();
    promtool(&["test", "rules", path.to_str().unwrap()])
}

/// "Recommended vs configured preStop per workload": evaluated by promtool
/// on synthetic series, each query gives one row per workload container
/// (Grafana merges the rows of A, B and C on their labels): its own
/// configured preStop, its Service's recommendation and samples. A
/// metrics file without a cluster label (node-exporter's textfile
/// collector) still gets its Service's recommendation: the highest among
/// the selected clusters.
#[test]
fn the_recommendation_panel_has_a_row_per_workload_container() {
    const TITLE: &str = "Recommended vs configured preStop per workload";
    let inputs = [
        (
            r#"prestop_recommendation_seconds{cluster="c",namespace="shop",service="web",job="prestop"}"#,
            "5x2",
        ),
        (
            r#"prestop_recommendation_samples{cluster="c",namespace="shop",service="web",job="prestop"}"#,
            "300x2",
        ),
        (
            r#"prestop_recommendation_seconds{cluster="d",namespace="shop",service="web",job="prestop"}"#,
            "9x2",
        ),
        (
            r#"prestop_recommendation_samples{cluster="d",namespace="shop",service="web",job="prestop"}"#,
            "40x2",
        ),
        (
            r#"prestop_check_configured_prestop_seconds{cluster="c",namespace="shop",service="web",workload="Deployment/web",container="app",job="pushgateway"}"#,
            "2x2",
        ),
        (
            r#"prestop_check_configured_prestop_seconds{namespace="shop",service="web",workload="Deployment/web-canary",container="app",job="node-exporter"}"#,
            "6x2",
        ),
        (
            r#"prestop_check_configured_prestop_seconds{cluster="c",namespace="shop",service="api",workload="StatefulSet/api",container="api",job="pushgateway"}"#,
            "3x2",
        ),
    ];
    let web =
        r#"{cluster="c",namespace="shop",service="web",workload="Deployment/web",container="app"}"#;
    let canary =
        r#"{namespace="shop",service="web",workload="Deployment/web-canary",container="app"}"#;
    let api = r#"{cluster="c",namespace="shop",service="api",workload="StatefulSet/api",container="api"}"#;
    // All clusters: the unlabelled canary gets the higher of c and d.
    let all = panel_queries(TITLE, ".*");
    let expected = |q: &str| -> Vec<(&str, f64)> {
        match q {
            "A" => vec![(web, 5.0), (canary, 9.0)],
            "B" => vec![(web, 2.0), (canary, 6.0), (api, 3.0)],
            "C" => vec![(web, 300.0), (canary, 40.0)],
            other => panic!("unexpected query {other}"),
        }
    };
    let cases: Vec<(String, Vec<(&str, f64)>)> = all
        .iter()
        .map(|(id, e)| (e.clone(), expected(id)))
        .collect();
    assert_eq!(cases.len(), 3);
    let (ok, out) = promtool_expect(&inputs, &cases);
    assert!(ok, "{out}");

    // Cluster c selected: d's series drop out, the unlabelled canary stays.
    let only_c = panel_queries(TITLE, "c");
    let expected_c = |q: &str| -> Vec<(&str, f64)> {
        match q {
            "A" => vec![(web, 5.0), (canary, 5.0)],
            "B" => vec![(web, 2.0), (canary, 6.0), (api, 3.0)],
            "C" => vec![(web, 300.0), (canary, 300.0)],
            other => panic!("unexpected query {other}"),
        }
    };
    let cases: Vec<(String, Vec<(&str, f64)>)> = only_c
        .iter()
        .map(|(id, e)| (e.clone(), expected_c(id)))
        .collect();
    let (ok, out) = promtool_expect(&inputs, &cases);
    assert!(ok, "{out}");
}
