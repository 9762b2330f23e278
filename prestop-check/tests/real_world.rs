//! prestop-check on what real repositories and pipelines contain: wrong
//! URLs, inputs it cannot check, custom kinds, schema mistakes, hooks that
//! stop the app midway, YAML anchors, symlink loops, charts and Kustomize
//! trees, CRLF and binary files. Against the real aggregator on a loopback
//! socket, or a test server for error statuses.

mod common;

use std::path::Path;

use common::cli::*;

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A Service `web` in namespace shop (the seeded 5 s recommendation)
/// selecting `tier: web` on port 8080.
const WEB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
spec:\n  selector: {tier: web}\n  ports: [{port: 80, targetPort: 8080}]\n";

/// A Deployment in shop labelled `tier: web` whose one container `app` has
/// `lifecycle` (YAML at the container's indentation, 8 spaces).
fn deployment(name: &str, lifecycle: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  \
         selector: {{matchLabels: {{tier: web}}}}\n  template:\n    metadata: {{labels: {{tier: web}}}}\n    \
         spec:\n      containers:\n      - name: app\n        image: a:1\n{lifecycle}"
    )
}

/// WEB_SERVICE and a Deployment without preStop that it routes to.
fn plain_web() -> String {
    format!("{WEB_SERVICE}---\n{}", deployment("web", ""))
}

/// Runs the check against the aggregator at `url` with `args` in `dir`,
/// and asserts its exit code.
fn expect(wanted: i32, url: &str, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--aggregator", url];
    all.extend(args);
    let out = run(&all, dir, None);
    assert_eq!(code(&out), wanted, "{args:?}: {}", stdout(&out));
    out
}

fn exec_hook(script: &str) -> String {
    format!(
        "        lifecycle:\n          preStop:\n            exec:\n              command: [\"sh\", \"-c\", \"{script}\"]\n"
    )
}

fn checked_seconds(report: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    report["checked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                format!(
                    "{}/{}",
                    c["workload"].as_str().unwrap(),
                    c["container"].as_str().unwrap()
                ),
                c["preStopSeconds"].clone(),
            )
        })
        .collect()
}

fn problems(report: &serde_json::Value, problem: &str) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["problem"] == problem)
        .map(|f| f["object"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_404_or_any_other_error_status_is_never_no_data() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "m.yaml", &plain_web());
    // The real aggregator under a wrong path prefix answers 404.
    let wrong = format!("{}/prestop", agg.url);
    let out = run(&["--aggregator", &wrong, "m.yaml"], dir.path(), None);
    assert_eq!(code(&out), 4, "{}", stdout(&out));
    assert!(stdout(&out).contains("answered 404"), "{}", stdout(&out));
    // So does a proxy in front of it.
    let proxy = answering("404 Not Found");
    let out = run(&["--aggregator", &proxy, "m.yaml"], dir.path(), None);
    assert_eq!(code(&out), 4, "{}", stdout(&out));
    assert!(
        !stdout(&out).contains("knows no deletions"),
        "{}",
        stdout(&out)
    );
    // The aggregator's own "no measurements" answer is a 200.
    let empty = start(&[]);
    let out = expect(0, &empty.url, dir.path(), &["--format", "json", "m.yaml"]);
    assert_eq!(
        problems(&json(&out), "noMeasurements"),
        ["Deployment shop/web"]
    );
}

#[test]
fn a_protected_aggregator_answers_with_the_token_file_only() {
    let records: Vec<_> = (0..300)
        .map(|i| deletion(i, "shop", "web", 1.0 + i as f64 * 0.01))
        .collect();
    let agg = start_protected(&records);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "m.yaml", &plain_web());
    let out = run(&["--aggregator", &agg.url, "m.yaml"], dir.path(), None);
    assert_eq!(code(&out), 4, "{}", stdout(&out));
    assert!(stdout(&out).contains("answered 401"), "{}", stdout(&out));
    let token = agg.token_file.as_ref().unwrap().to_str().unwrap();
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--token-file",
            token,
            "--format",
            "json",
            "m.yaml",
        ],
        dir.path(),
        None,
    );
    let report = json(&out);
    assert_eq!(checked_seconds(&report).len(), 1, "{report}");
    let missing = run(
        &[
            "--aggregator",
            &agg.url,
            "--token-file",
            "/nonexistent",
            "m.yaml",
        ],
        dir.path(),
        None,
    );
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("--token-file /nonexistent"),
        "{missing:?}"
    );
}

#[test]
fn usage_errors_exit_2_whatever_offline_ok_says() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "m.yaml", &plain_web());
    let host = agg.url.strip_prefix("http://").unwrap();
    let cases: [&[&str]; 10] = [
        &["--aggregator", host],
        &["--aggregator", "http://"],
        &["--aggregator", &agg.url, "--quantile", "1.5"],
        &["--aggregator", &agg.url, "--quantile", "0"],
        &["--aggregator", &agg.url, "--confidence", "nan"],
        &["--aggregator", &agg.url, "--timeout-seconds=-1"],
        &["--aggregator", &agg.url, "--timeout-seconds", "nan"],
        &["--aggregator", &agg.url, "--timeout-seconds", "1e30"],
        &["--aggregator", &agg.url, "--drain-seconds", "nan"],
        &["--aggregator", &agg.url, "--drain-seconds=-3"],
    ];
    for args in cases {
        let mut args = args.to_vec();
        args.extend(["--offline-ok", "m.yaml"]);
        let out = run(&args, dir.path(), None);
        assert_eq!(
            code(&out),
            2,
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The same flags, valid, reach the aggregator.
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--quantile",
            "0.99",
            "--timeout-seconds",
            "5",
            "m.yaml",
        ],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 1, "{}", stdout(&out));
}

#[test]
fn a_run_that_checked_nothing_says_so_and_can_fail() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "only/config.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
    );
    write(dir.path(), "only/README.md", "# notes\n");
    for (args, stdin, mentions) in [
        (vec!["only"], None, "v1 ConfigMap (1)"),
        (vec!["-"], Some(""), "1 input(s) read, 0 object(s)"),
    ] {
        let mut args = args;
        args.extend(["--aggregator", &agg.url]);
        let out = run(&args, dir.path(), stdin);
        assert_eq!(code(&out), 0, "{}", stdout(&out));
        let text = stdout(&out);
        assert!(text.contains("warning: nothing was checked"), "{text}");
        assert!(text.contains(mentions), "{text}");
        args.push("--fail-if-nothing-checked");
        let out = run(&args, dir.path(), stdin);
        assert_eq!(code(&out), 7, "{}", stdout(&out));
        assert!(
            stdout(&out).contains("error: nothing was checked"),
            "{}",
            stdout(&out)
        );
    }
    assert!(
        stdout(&run(&["--aggregator", &agg.url, "only"], dir.path(), None))
            .contains("1 file(s) in the directories skipped"),
    );
    // Upper-case extensions are manifests too.
    write(dir.path(), "upper/APP.YAML", &plain_web());
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--format",
            "json",
            "--fail-if-nothing-checked",
            "upper",
        ],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert_eq!(
        checked_seconds(&json(&out)),
        [("web/app".to_string(), 0.0.into())]
    );
}

#[test]
fn argo_rollouts_are_checked_like_deployments_and_fixed() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    let rollout = "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: web, namespace: shop}\n\
spec:\n  replicas: 3\n  strategy:\n    canary:\n      stableService: web\n      steps: [{setWeight: 20}, {pause: {}}]\n  \
selector: {matchLabels: {tier: web}}\n  template:\n    metadata: {labels: {tier: web}}\n    spec:\n      \
containers:\n      - name: app\n        image: a:1\n        lifecycle:\n          preStop:\n            sleep:\n              seconds: 2\n";
    // A Rollout that borrows a Deployment's template is that Deployment's.
    let by_ref = "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: ref, namespace: shop}\n\
spec:\n  workloadRef: {apiVersion: apps/v1, kind: Deployment, name: web}\n";
    write(
        dir.path(),
        "m.yaml",
        &format!("{WEB_SERVICE}---\n{rollout}---\n{by_ref}"),
    );
    let out = expect(1, &agg.url, dir.path(), &["--format", "json", "m.yaml"]);
    let report = json(&out);
    assert_eq!(
        checked_seconds(&report),
        [("web/app".to_string(), 2.0.into())]
    );
    assert_eq!(report["checked"][0]["kind"], "Rollout");
    assert_eq!(
        problems(&report, "preStopBelowRecommendation"),
        ["Rollout shop/web"]
    );

    expect(0, &agg.url, dir.path(), &["--fix", "m.yaml"]);
    let after = std::fs::read_to_string(dir.path().join("m.yaml")).unwrap();
    assert!(after.contains("              seconds: 5\n"), "{after}");
    let text = stdout(&run(
        &["--aggregator", &agg.url, "m.yaml"],
        dir.path(),
        None,
    ));
    assert!(
        text.contains("argoproj.io/v1alpha1 Rollout without a template (workloadRef) (1)"),
        "{text}"
    );
}

#[test]
fn objects_are_matched_by_group_and_other_groups_are_named() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    // A Knative Service has no `ports`/`selector` of a core Service.
    let knative = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: hello, namespace: shop}\n\
spec:\n  template:\n    spec:\n      containers:\n      - image: ghcr.io/knative/helloworld-go:latest\n";
    let old = "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: old, namespace: shop}\nspec: {}\n";
    write(
        dir.path(),
        "m.yaml",
        &format!(
            "{knative}---\n{old}---\n{WEB_SERVICE}---\n{}",
            deployment("web", "")
        ),
    );
    let out = expect(1, &agg.url, dir.path(), &["--format", "json", "m.yaml"]);
    assert_eq!(
        checked_seconds(&json(&out)),
        [("web/app".to_string(), 0.0.into())]
    );
    let out = run(
        &["--aggregator", &agg.url, "--format", "github", "m.yaml"],
        dir.path(),
        None,
    );
    let notice = stdout(&out)
        .lines()
        .find(|l| l.starts_with("::notice "))
        .unwrap_or_default()
        .to_string();
    assert!(
        notice.contains("extensions/v1beta1 Deployment (1)"),
        "{}",
        stdout(&out)
    );
    assert!(
        notice.contains("serving.knative.dev/v1 Service (1)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn schema_mistakes_exit_3_at_their_line() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    let typo = deployment("typo", "").replace("      containers:", "      contaienrs:");
    let no_selector =
        deployment("loose", "").replace("  selector: {matchLabels: {tier: web}}\n", "");
    let nameless =
        deployment("nameless", "").replace("      - name: app\n        image", "      - image");
    write(dir.path(), "typo.yaml", &typo);
    write(
        dir.path(),
        "more.yaml",
        &format!("{no_selector}---\n{nameless}"),
    );
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--offline-ok",
            "--format",
            "github",
            ".",
        ],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 3, "{}", stdout(&out));
    let text = stdout(&out);
    for expected in [
        "::error file=./typo.yaml,line=9,title=prestop-check::invalid Deployment: unknown field `spec.template.spec.contaienrs`",
        "::error file=./typo.yaml,line=8,title=prestop-check::invalid Deployment: missing required field `spec.template.spec.containers`",
        "::error file=./more.yaml,line=4,title=prestop-check::invalid Deployment: missing required field `spec.selector`",
        "::error file=./more.yaml,line=21,title=prestop-check::invalid Deployment: missing required field `spec.template.spec.containers[0].name`",
    ] {
        assert!(text.contains(expected), "{expected}\n{text}");
    }
}

/// 300 deletions in shop/web between 10 s and 12.99 s: a recommendation
/// of 14 s.
fn slow() -> Aggregator {
    let records: Vec<_> = (0..300)
        .map(|i| deletion(i, "shop", "web", 10.0 + i as f64 * 0.01))
        .collect();
    let agg = start(&records);
    let web = recommendation(&agg, "namespace=shop&service=web");
    assert_eq!(web["preStopSeconds"], 14, "{web}");
    agg
}

#[test]
fn a_delay_ends_at_the_first_command_that_can_stop_the_app() {
    let agg = slow();
    let dir = tempfile::tempdir().unwrap();
    let nginx = "sleep 10 && nginx -s reload && sleep 1 && nginx -s quit && sleep 5";
    let docs = [
        WEB_SERVICE.to_string(),
        deployment("nginx", &exec_hook(nginx)),
        deployment("killer", &exec_hook("sleep 5 && kill -TERM 1 && sleep 30")),
        deployment("marker", &exec_hook("rm /tmp/online && sleep 20")),
        deployment(
            "script",
            &exec_hook("touch /tmp/drain; sleep 15; /drain.sh; sleep 60"),
        ),
    ];
    write(dir.path(), "m.yaml", &docs.join("---\n"));
    let out = expect(1, &agg.url, dir.path(), &["--format", "json", "m.yaml"]);
    let report = json(&out);
    assert_eq!(
        checked_seconds(&report),
        [
            ("nginx/app".to_string(), 11.0.into()),
            ("killer/app".to_string(), 5.0.into()),
            ("marker/app".to_string(), 20.0.into()),
            ("script/app".to_string(), 15.0.into()),
        ]
    );
    assert_eq!(
        problems(&report, "preStopBelowRecommendation"),
        ["Deployment shop/nginx", "Deployment shop/killer"]
    );
    assert!(problems(&report, "unknownPreStop").is_empty());
    // --fix changes the sleep before the kill, the one the app waits for.
    let out = run(
        &["--aggregator", &agg.url, "--fix", "m.yaml"],
        dir.path(),
        None,
    );
    assert_eq!(
        code(&out),
        1,
        "the nginx hook sleeps twice: {}",
        stdout(&out)
    );
    let after = std::fs::read_to_string(dir.path().join("m.yaml")).unwrap();
    assert!(
        after.contains("sleep 14 && kill -TERM 1 && sleep 30"),
        "{after}"
    );
    assert!(after.contains(nginx), "{after}");
}

#[test]
fn anchors_and_merge_keys_are_read_and_a_shared_value_is_fixed_once() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    let slow =
        "        lifecycle:\n          preStop:\n            sleep:\n              seconds: 15\n";
    let manifest = format!(
        "{WEB_SERVICE}---\napiVersion: v1\nkind: List\nitems:\n{}",
        [
            deployment("slow", slow)
                .replace("      - name: app\n", "      - &slow\n        name: app\n"),
            deployment("merged", "").replace(
                "      - name: app\n        image: a:1\n",
                "      - <<: *slow\n        image: b:1\n",
            ),
            deployment("fast", &exec_hook("sleep 2"))
                .replace("      - name: app\n", "      - &fast\n        name: app\n"),
            deployment("aliased", "")
                .replace("      - name: app\n        image: a:1\n", "      - *fast\n"),
            deployment("fastmerged", "").replace(
                "      - name: app\n        image: a:1\n",
                "      - <<: *fast\n        image: c:1\n",
            ),
        ]
        .iter()
        .map(|d| format!("- {}", d.trim_end().replace('\n', "\n  ")))
        .collect::<Vec<_>>()
        .join("\n")
            + "\n"
    );
    write(dir.path(), "m.yaml", &manifest);
    let out = expect(1, &agg.url, dir.path(), &["--format", "json", "m.yaml"]);
    assert_eq!(
        checked_seconds(&json(&out)),
        [
            ("slow/app".to_string(), 15.0.into()),
            ("merged/app".to_string(), 15.0.into()),
            ("fast/app".to_string(), 2.0.into()),
            ("aliased/app".to_string(), 2.0.into()),
            ("fastmerged/app".to_string(), 2.0.into()),
        ]
    );
    expect(0, &agg.url, dir.path(), &["--fix", "m.yaml"]);
    let after = std::fs::read_to_string(dir.path().join("m.yaml")).unwrap();
    assert_eq!(after, manifest.replace("sleep 2", "sleep 5"));
    expect(0, &agg.url, dir.path(), &["m.yaml"]);
}

#[test]
fn a_named_target_port_nobody_declares_routes_nowhere() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, labels: {tier: web}}\nspec:\n  \
containers:\n  - name: app\n    image: a:1\n    ports: [{name: http, containerPort: 8080}]\n  \
- name: sidecar\n    image: s:1\n";
    let service = |target: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec:\n  selector: {{tier: web}}\n  ports: [{{port: 80, targetPort: {target}}}]\n"
        )
    };
    write(
        dir.path(),
        "metrics.yaml",
        &format!("{}---\n{pod}", service("metrics")),
    );
    let before = std::fs::read_to_string(dir.path().join("metrics.yaml")).unwrap();
    let out = run(
        &[
            "--aggregator",
            &agg.url,
            "--format",
            "json",
            "--fix",
            "metrics.yaml",
        ],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(checked_seconds(&json(&out)).is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.yaml")).unwrap(),
        before
    );

    write(
        dir.path(),
        "http.yaml",
        &format!("{}---\n{pod}", service("http")),
    );
    let out = run(
        &["--aggregator", &agg.url, "--format", "json", "http.yaml"],
        dir.path(),
        None,
    );
    assert_eq!(
        checked_seconds(&json(&out)),
        [("p/app".to_string(), 0.0.into())]
    );
}

#[test]
fn keep_alive_advice_shows_only_where_it_was_measured() {
    // shop/api's pods reset keep-alive connections; shop/web's did not, and
    // shop/db has too few deletions of its own (its answer falls back to
    // the namespace, which includes api's).
    let mut records: Vec<_> = (0..300)
        .map(|i| deletion(i, "shop", "web", 1.0 + i as f64 * 0.01))
        .collect();
    records.extend((0..300).map(|i| {
        let mut d = deletion(i, "shop", "api", 1.0);
        d.nodes[0].aborted_connections = 1;
        d
    }));
    records.extend((0..5).map(|i| deletion(i, "shop", "db", 0.5)));
    let agg = start(&records);
    assert!(recommendation(&agg, "namespace=shop")["keepAlive"]["finding"].is_string());
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> = ["web", "api", "db"]
        .iter()
        .flat_map(|name| {
            [
                WEB_SERVICE.replace("web", name),
                deployment(name, "").replace("tier: web", &format!("tier: {name}")),
            ]
        })
        .collect();
    write(dir.path(), "m.yaml", &docs.join("---\n"));
    let out = run(
        &["--aggregator", &agg.url, "--format", "json", "m.yaml"],
        dir.path(),
        None,
    );
    let report = json(&out);
    assert_eq!(checked_seconds(&report).len(), 3, "{report}");
    assert_eq!(problems(&report, "keepAlive"), ["Deployment shop/api"]);
}

#[test]
fn low_confidence_prints_the_aggregators_samples_still_needed() {
    let records: Vec<_> = (0..40).map(|i| deletion(i, "shop", "web", 1.0)).collect();
    let agg = start(&records);
    let needed = recommendation(&agg, "namespace=shop&service=web")["samplesNeeded"]
        .as_u64()
        .unwrap();
    assert_eq!(needed, 259);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "m.yaml", &plain_web());
    let text = stdout(&run(
        &["--aggregator", &agg.url, "m.yaml"],
        dir.path(),
        None,
    ));
    assert!(text.contains("(40 samples, 259 more needed)"), "{text}");
    assert!(
        text.contains("LOW CONFIDENCE: 259 more samples needed"),
        "{text}"
    );
}

#[test]
fn a_symlink_loop_is_read_once_and_reported() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "k8s/m.yaml", &plain_web());
    std::os::unix::fs::symlink(".", dir.path().join("k8s/loop")).unwrap();
    let out = expect(1, &agg.url, dir.path(), &["--format", "json", "k8s"]);
    let report = json(&out);
    assert_eq!(report["checked"].as_array().unwrap().len(), 1, "{report}");
    let findings = report["findings"].as_array().unwrap();
    let other = findings
        .iter()
        .filter(|f| f["problem"] != "noReadinessProbe");
    assert_eq!(other.count(), 1, "{report}");
    let failure = &report["failures"][0];
    assert_eq!(failure["severity"], "warning");
    assert_eq!(failure["file"], "k8s/loop");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("already read"),
        "{failure}"
    );
}

#[test]
fn charts_and_kustomize_trees_are_named_and_kustomize_can_be_rendered() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "chart/Chart.yaml",
        "apiVersion: v2\nname: web\nversion: 0.1.0\n",
    );
    write(
        dir.path(),
        "chart/templates/deployment.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\n",
    );
    let out = expect(3, &agg.url, dir.path(), &["chart"]);
    let text = stdout(&out);
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    assert!(
        text.contains("chart: error: a Helm chart (Chart.yaml)"),
        "{text}"
    );
    assert!(text.contains("helm template"), "{text}");
    // Its templates given directly: the parse error says what they are.
    let out = run(
        &["--aggregator", &agg.url, "chart/templates"],
        dir.path(),
        None,
    );
    assert_eq!(code(&out), 3);
    assert!(
        stdout(&out).contains("an unrendered Helm template?"),
        "{}",
        stdout(&out)
    );

    // Rendered output may hold `{{` in strings: a mistake elsewhere is not
    // blamed on templating.
    let rule = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: rules}\ndata:\n  \
                summary: \"{{ $labels.pod }} restarts\"\n";
    let typo = deployment("typo", "").replace("image: a:1", "imgae: a:1");
    write(dir.path(), "rendered.yaml", &format!("{rule}---\n{typo}"));
    let out = expect(3, &agg.url, dir.path(), &["rendered.yaml"]);
    assert!(stdout(&out).contains("unknown field"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("Helm template?"), "{}", stdout(&out));

    // preStop only in the overlay's patch, as in most repositories.
    write(
        dir.path(),
        "kust/base/kustomization.yaml",
        "resources: [web.yaml]\n",
    );
    write(dir.path(), "kust/base/web.yaml", &plain_web());
    write(
        dir.path(),
        "kust/overlays/prod/kustomization.yaml",
        "resources: [../../base]\npatches:\n- path: prestop.yaml\n",
    );
    write(
        dir.path(),
        "kust/overlays/prod/prestop.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  template:\n    \
         spec:\n      containers:\n      - name: app\n        lifecycle: {preStop: {sleep: {seconds: 7}}}\n",
    );
    let out = expect(3, &agg.url, dir.path(), &["kust"]);
    assert!(
        stdout(&out).contains("kubectl kustomize kust/base"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("kubectl kustomize kust/overlays/prod"),
        "{}",
        stdout(&out)
    );

    let mut cmd = command(
        &[
            "--aggregator",
            &agg.url,
            "--format",
            "json",
            "--kustomize",
            "kust/overlays/prod",
        ],
        dir.path(),
    );
    cmd.env("PATH", std::env::var_os("PATH").unwrap());
    let out = finish(cmd, None);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let report = json(&out);
    assert_eq!(
        checked_seconds(&report),
        [("web/app".to_string(), 7.0.into())]
    );
    assert_eq!(
        report["checked"][0]["file"],
        "kust/overlays/prod (kubectl kustomize)"
    );
    // Rendered output has no file to write back.
    let mut cmd = command(
        &[
            "--aggregator",
            &agg.url,
            "--kustomize",
            "--fix",
            "kust/base",
        ],
        dir.path(),
    );
    cmd.env("PATH", std::env::var_os("PATH").unwrap());
    let out = finish(cmd, None);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stdout(&out).contains("kust/base (kubectl kustomize): warning: cannot fix rendered output"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn fix_writes_lines_with_the_files_line_endings() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!("{WEB_SERVICE}---\n{}", deployment("web", "")).replace('\n', "\r\n");
    write(dir.path(), "m.yaml", &manifest);
    expect(0, &agg.url, dir.path(), &["--fix", "m.yaml"]);
    let after = std::fs::read_to_string(dir.path().join("m.yaml")).unwrap();
    assert!(after.contains("preStop:\r\n"), "{after:?}");
    assert_eq!(
        after.matches('\n').count(),
        after.matches("\r\n").count(),
        "{after:?}"
    );
    expect(0, &agg.url, dir.path(), &["m.yaml"]);
}

#[test]
fn every_file_that_is_not_text_is_reported() {
    let agg = seeded();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "k8s/good.yaml", &plain_web());
    std::fs::write(
        dir.path().join("k8s/image.yaml"),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("k8s/latin1.yml"),
        b"kind: ConfigMap\ndata: {a: caf\xe9}\n",
    )
    .unwrap();
    let out = expect(3, &agg.url, dir.path(), &["--format", "github", "k8s"]);
    let text = stdout(&out);
    assert!(
        text.contains("::error file=k8s/image.yaml,title=prestop-check::not a text manifest: binary data (a NUL byte at offset 8)"),
        "{text}"
    );
    assert!(
        text.contains("::error file=k8s/latin1.yml,title=prestop-check::not a text manifest: not UTF-8 (byte offset 29)"),
        "{text}"
    );
}

/// Peak resident memory of one run, in bytes, from the kernel's
/// accounting of that child alone.
// wait4 reaps the child, which `Child` cannot see.
#[allow(clippy::zombie_processes)]
fn peak_rss(mut cmd: std::process::Command) -> (i32, u64) {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for our own child; status and usage outlive the call.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "{}", std::io::Error::last_os_error());
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64 * 1024)
}

#[test]
fn memory_stays_a_small_multiple_of_a_large_input() {
    // 200 Deployments with large pod specs (as `helm template` of big
    // charts produces), about 6 MB, in one file.
    let env: String = (0..280)
        .map(|i| {
            format!(
                "        - name: SETTING_{i}\n          value: \"configuration value number {i}\"\n"
            )
        })
        .collect();
    let mut text = WEB_SERVICE.to_string();
    for n in 0..200 {
        let with_env = deployment(&format!("web-{n}"), &format!("        env:\n{env}"));
        text += &format!("---\n{with_env}");
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "big.yaml", &text);
    let (code, peak) = peak_rss(command(&["--offline-ok", "big.yaml"], dir.path()));
    assert_eq!(code, 0);
    // The text itself, plus the binary's own baseline; a tree of every
    // document, or their typed copies, would take several times the input.
    let size = text.len() as u64;
    assert!(
        peak < 2 * size + 32 * 1024 * 1024,
        "peak {peak} bytes for {size} bytes of input"
    );
}
