//! prestop-check as a pipeline runs it, against the real aggregator HTTP
//! API on a loopback socket seeded with measurements.

mod common;

use common::cli::*;

/// The findings of a report but the startup checks' (tests/startup.rs).
fn prestop_findings(report: &serde_json::Value) -> Vec<&serde_json::Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["problem"] != "noReadinessProbe")
        .collect()
}

#[test]
fn every_workload_kind_and_hook_form_is_read_and_compared() {
    let agg = seeded();
    premise(&agg);
    let out = run(
        &["--aggregator", &agg.url, "--format", "json", "kinds"],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    let report = json(&out);
    let mut checked: Vec<(String, String, String, serde_json::Value)> = report["checked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_string(),
                c["workload"].as_str().unwrap().to_string(),
                c["container"].as_str().unwrap().to_string(),
                c["preStopSeconds"].clone(),
            )
        })
        .collect();
    checked.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = [
        ("CronJob", "report", "job", 0.0),
        ("DaemonSet", "edge", "proxy", 30.0),
        ("Deployment", "web", "app", 2.0),
        // ["/bin/busybox", "sleep", "3"] and ["sleep", "1", "2.5"].
        ("Job", "migrate", "migrate", 3.0),
        ("Job", "reindex", "reindex", 3.5),
        ("Pod", "debug", "app", 8.0),
        ("ReplicaSet", "legacy", "app", 0.0),
        ("ReplicationController", "old", "app", 12.0),
        ("StatefulSet", "db", "postgres", 5.0),
    ];
    let got: Vec<(&str, &str, &str, f64)> = checked
        .iter()
        .map(|(k, w, c, s)| (k.as_str(), w.as_str(), c.as_str(), s.as_f64().unwrap()))
        .collect();
    // The log shipper serves no Service port and batch-worker has no
    // Service: neither is checked.
    assert_eq!(got, expected);

    let errors: Vec<(String, u64, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error")
        .map(|f| {
            assert_eq!(f["problem"], "preStopBelowRecommendation");
            (
                f["file"].as_str().unwrap().to_string(),
                f["line"].as_u64().unwrap(),
                f["container"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            ("kinds/shop.yaml".to_string(), 17, "app".to_string()),
            ("kinds/shop.yaml".to_string(), 87, "app".to_string()),
            ("kinds/shop.yaml".to_string(), 145, "job".to_string()),
            ("kinds/tasks.yaml".to_string(), 16, "migrate".to_string()),
            ("kinds/tasks.yaml".to_string(), 36, "reindex".to_string()),
        ]
    );
    // shop/db has too few samples of its own: the namespace scope answers.
    let db = report["checked"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["workload"] == "db")
        .unwrap();
    assert_eq!(
        db["recommendation"]["scope"]["service"],
        serde_json::Value::Null
    );
    assert_eq!(db["recommendation"]["scope"]["namespace"], "shop");
}

#[test]
fn human_output_names_file_object_container_reason_and_patch() {
    let agg = seeded();
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "kinds/shop.yaml",
            "kinds/services.yaml",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 1);
    let text = stdout(&out);
    let expected = "kinds/shop.yaml:17: error: Deployment shop/web container app: preStop sleep 2s is below the \
                    5s needed to outlast the measured endpoint propagation\n    has:         preStop sleep 2s\n    \
                    recommended: preStop sleep 5s\n    why:         p99 at 95% confidence over 300 deletions of \
                    service shop/web in the last 7d";
    assert!(text.contains(expected), "{text}");
    let patch = "    patch:\n      spec:\n        template:\n          spec:\n            containers:\n            \
                 - name: app\n              lifecycle:\n                preStop:\n                  sleep:\n                    \
                 seconds: 5\n";
    assert!(text.contains(patch), "{text}");
}

#[test]
fn github_format_emits_one_annotation_per_finding() {
    let agg = seeded();
    let out = run(
        &["--aggregator", &agg.url, "--format", "github", "kinds"],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 1);
    let text = stdout(&out);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("::error ")).collect();
    assert_eq!(errors.len(), 5, "{text}");
    assert!(
        errors[0].starts_with(
            "::error file=kinds/shop.yaml,line=17,title=prestop-check%3A PreStopBelowRecommendation::\
             Deployment shop/web container app: preStop sleep 2s"
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("%0Apatch:%0Aspec:%0A  template:"),
        "{}",
        errors[0]
    );
}

#[test]
fn helm_template_output_on_stdin_with_drain_time() {
    let agg = seeded();
    let manifest = std::fs::read_to_string(fixtures().join("helm-template.yaml")).unwrap();
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--drain-seconds",
            "8",
            "--format",
            "json",
            "-",
        ],
        &fixtures(),
        Some(&manifest),
    );
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    let report = json(&out);
    let findings = prestop_findings(&report);
    let problems: Vec<(&str, u64)> = findings
        .iter()
        .map(|f| (f["problem"].as_str().unwrap(), f["line"].as_u64().unwrap()))
        .collect();
    // Namespace default has no samples of its own: the cluster answers (5 s).
    // No preStop (a postStart only) and a 10 s grace period that cannot hold
    // 0 s + 8 s drain... it can, but not the recommended 5 s + 8 s.
    assert_eq!(problems, [("preStopBelowRecommendation", 41)]);
    assert_eq!(findings[0]["file"], "<stdin>");
    let patch = findings[0]["patch"].as_str().unwrap();
    assert!(
        patch.contains("terminationGracePeriodSeconds: 13\n"),
        "{patch}"
    );
    assert_eq!(
        report["checked"][0]["recommendation"]["scope"]["namespace"],
        serde_json::Value::Null
    );

    let out = run(
        &["--offline-ok", "--drain-seconds", "12", "-"],
        &fixtures(),
        Some(&manifest),
    );
    assert_eq!(code(&out), 1);
    assert!(
        stdout(&out).contains(
            "<stdin>:39: error: Deployment default/api container api: terminationGracePeriodSeconds 10 cannot hold \
             the 0s preStop plus 12s drain"
        ),
        "{}",
        stdout(&out)
    );
}

#[test]
fn unknown_hooks_are_reported_never_taken_as_zero() {
    let agg = seeded();
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--format",
            "json",
            "unknown-hooks.yaml",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let report = json(&out);
    let findings = prestop_findings(&report);
    assert_eq!(findings.len(), 3);
    assert!(
        findings
            .iter()
            .all(|f| f["problem"] == "unknownPreStop" && f["severity"] == "warning")
    );
    assert!(
        report["checked"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["preStopSeconds"].is_null())
    );

    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--fail-on-unknown",
            "unknown-hooks.yaml",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 1);
}

#[test]
fn unreachable_aggregator_exits_4_unless_offline_ok() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = run(&["--aggregator", &url, "kinds"], &fixtures(), None);
    assert_eq!(code(&out), 4);
    assert!(
        stdout(&out).contains("error: aggregator unreachable at"),
        "{}",
        stdout(&out)
    );

    let out = run(
        &[
            "--aggregator",
            &url,
            "--offline-ok",
            "--format",
            "github",
            "kinds",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("::warning title=prestop-check::aggregator unreachable"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn low_confidence_policy_decides_the_exit_code() {
    let few: Vec<_> = (0..10).map(|i| deletion(i, "shop", "web", 3.0)).collect();
    let agg = start(&few);
    assert_eq!(recommendation(&agg, "")["lowConfidence"], true);
    let args = |policy: &'static str| {
        [
            "--aggregator",
            &agg.url,
            "--low-confidence",
            policy,
            "kinds",
        ]
        .map(String::from)
    };
    let exit = |policy| {
        let a = args(policy);
        code(&run(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &fixtures(),
            None,
        ))
    };
    assert_eq!(exit("warn"), 0);
    assert_eq!(exit("fail"), 5);
    assert_eq!(exit("ignore"), 1);
}

#[test]
fn no_measurements_at_all_is_not_a_pass_under_fail() {
    let agg = start(&[]);
    let out = run(&["--aggregator", &agg.url, "kinds"], &fixtures(), None);
    assert_eq!(code(&out), 0);
    assert!(
        stdout(&out).contains("no propagation measurements"),
        "{}",
        stdout(&out)
    );
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--low-confidence",
            "fail",
            "kinds",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 5);
}

#[test]
fn unparsable_manifests_exit_3_with_file_and_line() {
    let out = run(&["--offline-ok", "bad"], &fixtures(), None);
    assert_eq!(code(&out), 3);
    let text = stdout(&out);
    assert!(
        text.contains("bad/syntax.yaml:7: error: unparsable YAML: line 7"),
        "{text}"
    );
    assert!(
        text.contains(
            "bad/types.yaml:9: error: invalid Deployment: spec.replicas: invalid type: string \"three\""
        ),
        "{text}"
    );

    let out = run(
        &["--offline-ok", "--format", "github", "bad/syntax.yaml"],
        &fixtures(),
        None,
    );
    assert!(
        stdout(&out).starts_with("::error file=bad/syntax.yaml,line=7,"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        code(&run(&["--offline-ok", "missing.yaml"], &fixtures(), None)),
        3
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        code(&run(&["--format", "xml", "kinds"], &fixtures(), None)),
        2
    );
    assert_eq!(
        code(&run(&["kinds"], &fixtures(), None)),
        2,
        "no aggregator and not offline"
    );
    assert_eq!(
        code(&run(&["--offline-ok", "--fix", "-"], &fixtures(), Some(""))),
        2
    );
}

#[test]
fn fix_edits_only_the_located_values_and_the_result_passes() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("kinds")).unwrap();
    for f in [
        "kinds/shop.yaml",
        "kinds/services.yaml",
        "helm-template.yaml",
    ] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).unwrap();
    }
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--drain-seconds",
            "3",
            "--fix",
            ".",
        ],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(
        stdout(&out).contains("kinds/shop.yaml:17: fixed: Deployment shop/web"),
        "{}",
        stdout(&out)
    );

    let before = std::fs::read_to_string(fixtures().join("kinds/shop.yaml")).unwrap();
    let after = std::fs::read_to_string(dir.path().join("kinds/shop.yaml")).unwrap();
    let changed: Vec<(&str, &str)> = diff(&before, &after);
    assert_eq!(
        changed,
        [
            ("              seconds: 2 # folklore", ""),
            ("", "              seconds: 5 # folklore"),
            ("", "      terminationGracePeriodSeconds: 33"), // DaemonSet: 30 s preStop + 3 s
            ("", "        lifecycle:"), // ReplicaSet: inserted after `- name: app`
            ("", "          preStop:"),
            ("", "            sleep:"),
            ("", "              seconds: 5"),
            ("", "            lifecycle:"), // CronJob, deeper
            ("", "              preStop:"),
            ("", "                sleep:"),
            ("", "                  seconds: 5"),
        ]
    );
    let helm = std::fs::read_to_string(dir.path().join("helm-template.yaml")).unwrap();
    assert!(
        helm.contains(
            "      terminationGracePeriodSeconds: 10\n      containers:\n        - name: api\n          image: \"api:1.0.0\"\n          ports:\n            - name: http\n              containerPort: 8080\n              protocol: TCP\n          lifecycle:\n            preStop:\n              sleep:\n                seconds: 5\n            postStart:\n"
        ),
        "{helm}"
    );

    let again = run(
        &[
            "--aggregator",
            &agg.url,
            "--drain-seconds",
            "3",
            "--format",
            "json",
            ".",
        ],
        dir.path(),
        None,
    );
    assert_eq!(code(&again), 0, "{}", stdout(&again));
    assert!(
        json(&again)["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] != "error")
    );
}

#[test]
fn fix_rewrites_exec_sleeps_in_place() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    let manifest = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  selector: {app: s}\n---\n\
                    apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: s}\nspec:\n  selector: {matchLabels: {app: s}}\n  \
                    template:\n    metadata: {labels: {app: s}}\n    spec:\n      containers:\n      - name: a\n        image: a\n        \
                    lifecycle: {preStop: {exec: {command: ['/bin/sleep', '2s']}}}\n      - name: b\n        image: b\n        \
                    lifecycle:\n          preStop:\n            exec:\n              command: [\"sh\", \"-c\", \"sleep 1 && kill 1\"]\n";
    std::fs::write(dir.path().join("m.yaml"), manifest).unwrap();
    let out = run(
        &["--aggregator", &agg.url, "--fix", "m.yaml"],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let after = std::fs::read_to_string(dir.path().join("m.yaml")).unwrap();
    assert_eq!(
        after,
        manifest
            .replace("['/bin/sleep', '2s']", "['/bin/sleep', '5']")
            .replace("sleep 1 && kill 1", "sleep 5 && kill 1")
    );
}

#[test]
fn metrics_file_exports_configured_prestop_per_service() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prestop.prom");
    let out = run(
        &[
            "--offline-ok",
            "--metrics-file",
            path.to_str().unwrap(),
            "kinds",
            "unknown-hooks.yaml",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(
        "prestop_check_configured_prestop_seconds{namespace=\"shop\",service=\"web\",workload=\"Deployment/web\",container=\"app\"} 2\n"
    ), "{text}");
    assert!(text.contains("prestop_check_termination_grace_period_seconds{namespace=\"shop\",workload=\"StatefulSet/db\"} 60\n"));
    assert!(
        !text.contains("mystery\",workload"),
        "unknown hooks are not exported as a number: {text}"
    );
    assert!(
        !text.contains("cluster="),
        "no cluster label unless asked: {text}"
    );

    // --cluster (or PRESTOP_CLUSTER) labels every series, for publishers
    // that add no cluster label of their own.
    let mut cmd = command(
        &[
            "--offline-ok",
            "--metrics-file",
            path.to_str().unwrap(),
            "kinds",
        ],
        &fixtures(),
    );
    cmd.env("PRESTOP_CLUSTER", "prod-eu");
    for out in [
        run(
            &[
                "--offline-ok",
                "--cluster",
                "prod-eu",
                "--metrics-file",
                path.to_str().unwrap(),
                "kinds",
            ],
            &fixtures(),
            None,
        ),
        finish(cmd, None),
    ] {
        assert_eq!(code(&out), 0, "{}", stdout(&out));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(
            "prestop_check_configured_prestop_seconds{cluster=\"prod-eu\",namespace=\"shop\",service=\"web\",workload=\"Deployment/web\",container=\"app\"} 2\n"
        ), "{text}");
        assert!(text.contains(
            "prestop_check_termination_grace_period_seconds{cluster=\"prod-eu\",namespace=\"shop\",workload=\"StatefulSet/db\"} 60\n"
        ), "{text}");
        let series = text.lines().filter(|l| !l.starts_with('#'));
        assert!(series.clone().count() > 5);
        assert!(
            series.clone().all(|l| l.contains("{cluster=\"prod-eu\",")),
            "{text}"
        );
    }
    let out = run(
        &["--offline-ok", "--cluster", "", "kinds"],
        &fixtures(),
        None,
    );
    assert_eq!(code(&out), 2, "an empty cluster name is a usage error");
}

#[test]
fn aggregator_answering_5xx_exits_4_unless_offline_ok() {
    for status in ["500 Internal Server Error", "503 Service Unavailable"] {
        let url = answering(status);
        let out = run(&["--aggregator", &url, "kinds"], &fixtures(), None);
        assert_eq!(code(&out), 4, "{status}: {}", stdout(&out));
        let code_only = &status[..3];
        assert!(
            stdout(&out).contains(&format!(
                "error: aggregator at {url}/v1/recommendations answered {code_only}: upstream connect error"
            )),
            "{}",
            stdout(&out)
        );
        // Nothing was compared: no finding is printed.
        assert!(
            !stdout(&out).contains("kinds/shop.yaml:"),
            "{}",
            stdout(&out)
        );

        let out = run(
            &["--aggregator", &url, "--offline-ok", "kinds"],
            &fixtures(),
            None,
        );
        assert_eq!(code(&out), 0, "{status}: {}", stdout(&out));
        assert!(
            stdout(&out).starts_with(&format!(
                "warning: aggregator at {url}/v1/recommendations answered {code_only}"
            )),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn jobs_with_busybox_and_multi_argument_sleeps_are_checked_and_fixed() {
    let agg = seeded();
    premise(&agg);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("kinds/tasks.yaml"),
        dir.path().join("tasks.yaml"),
    )
    .unwrap();
    let out = run(
        &["--aggregator", &agg.url, "--format", "json", "tasks.yaml"],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    let report = json(&out);
    let checked: Vec<(&str, &str, f64, &str)> = report["checked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap(),
                c["container"].as_str().unwrap(),
                c["preStopSeconds"].as_f64().unwrap(),
                c["recommendation"]["scope"]["namespace"].as_str().unwrap(),
            )
        })
        .collect();
    // Service shop/batch has no measurements: namespace shop answers 5 s.
    assert_eq!(
        checked,
        [
            ("Job", "migrate", 3.0, "shop"),
            ("Job", "reindex", 3.5, "shop")
        ]
    );

    let before = std::fs::read_to_string(dir.path().join("tasks.yaml")).unwrap();
    let out = run(
        &["--aggregator", &agg.url, "--fix", "tasks.yaml"],
        dir.path(),
        None,
    );
    let text = stdout(&out);
    // The busybox argument is rewritten; `sleep 1 2.5` has two arguments
    // to choose from, so its patch is printed and its finding stays open.
    assert_eq!(code(&out), 1, "{text}");
    assert!(
        text.contains("tasks.yaml:16: fixed: Job shop/migrate container migrate"),
        "{text}"
    );
    assert!(
        text.contains(
            ": warning: cannot fix: Job shop/reindex container reindex: sleep has several arguments"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "tasks.yaml:36: error: Job shop/reindex container reindex: preStop exec sleep 3.5s"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "    patch:\n      spec:\n        template:\n          spec:\n            containers:\n            \
             - name: reindex\n"
        ),
        "{text}"
    );
    let after = std::fs::read_to_string(dir.path().join("tasks.yaml")).unwrap();
    assert_eq!(
        after,
        before.replace(
            r#"["/bin/busybox", "sleep", "3"]"#,
            r#"["/bin/busybox", "sleep", "5"]"#
        )
    );
}

/// Whether this test process runs as root, whom file permissions do not stop.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn unwritable_outputs_exit_6_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();

    // A --metrics-file in a directory that does not exist (fails for root
    // too). The findings are still reported, but 6 wins over 1.
    let missing = dir.path().join("no-such-dir/prestop.prom");
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--metrics-file",
            missing.to_str().unwrap(),
            "kinds",
        ],
        &fixtures(),
        None,
    );
    let text = stdout(&out);
    assert_eq!(code(&out), 6, "{text}");
    assert!(
        text.starts_with(&format!(
            "{}: error: cannot write the --metrics-file: No such file or directory",
            missing.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("kinds/shop.yaml:17: error: Deployment shop/web"),
        "{text}"
    );
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--format",
            "json",
            "--metrics-file",
            missing.to_str().unwrap(),
            "kinds",
        ],
        &fixtures(),
        None,
    );
    assert_eq!(json(&out)["exitCode"], 6);

    // --fix on a read-only manifest (run as nobody when the test is root).
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::copy(fixtures().join("kinds/tasks.yaml"), work.join("tasks.yaml")).unwrap();
    let before = std::fs::read_to_string(work.join("tasks.yaml")).unwrap();
    for (path, mode) in [
        (dir.path(), 0o755),
        (&work, 0o755),
        (&work.join("tasks.yaml"), 0o444),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut cmd = command(&["--aggregator", &agg.url, "--fix", "tasks.yaml"], &work);
    if is_root() {
        cmd.uid(65534).gid(65534);
    }
    let out = finish(cmd, None);
    let text = stdout(&out);
    assert_eq!(code(&out), 6, "{text}");
    assert!(
        text.contains(
            "tasks.yaml: error: cannot write the fixed manifest: Permission denied (os error 13); its findings stay open"
        ),
        "{text}"
    );
    // Not written, so not reported as fixed.
    assert!(
        text.contains("tasks.yaml:16: error: Job shop/migrate container migrate"),
        "{text}"
    );
    assert!(!text.contains(": fixed:"), "{text}");
    assert_eq!(
        std::fs::read_to_string(work.join("tasks.yaml")).unwrap(),
        before
    );
}

/// Lines only in `before` as `(line, "")`, lines only in `after` as
/// `("", line)`, in file order (longest-common-subsequence line diff).
fn diff<'a>(before: &'a str, after: &'a str) -> Vec<(&'a str, &'a str)> {
    let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    let mut lcs = vec![vec![0usize; a.len() + 1]; b.len() + 1];
    for i in (0..b.len()).rev() {
        for j in (0..a.len()).rev() {
            lcs[i][j] = if b[i] == a[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < b.len() || j < a.len() {
        if i < b.len() && j < a.len() && b[i] == a[j] {
            i += 1;
            j += 1;
        } else if j < a.len() && (i == b.len() || lcs[i][j + 1] > lcs[i + 1][j]) {
            out.push(("", a[j]));
            j += 1;
        } else {
            out.push((b[i], ""));
            i += 1;
        }
    }
    out
}
