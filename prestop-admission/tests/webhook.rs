//! The webhook over HTTPS with real AdmissionReview v1 requests for every
//! workload kind and hook form: warnings, denials and JSONPatches, the
//! patches applied to the objects.

mod common;

use common::{
    Env, KINDS, Options, WHY, deletions, mutated, object, pod_spec, request, routed, spec_of,
    warnings,
};
use prestop_admission::inject;
use serde_json::{Value, json};

/// The hook forms a serving container may have, and whether 7 s (the
/// recommendation of `shop/web`) is more than it waits.
fn hook_forms() -> Vec<(&'static str, Option<Value>, bool)> {
    vec![
        ("no hook", None, true),
        (
            "sleep 3",
            Some(json!({"preStop": {"sleep": {"seconds": 3}}})),
            true,
        ),
        (
            "exec sleep 3",
            Some(json!({"preStop": {"exec": {"command": ["sleep", "3"]}}})),
            true,
        ),
        (
            "shell script",
            Some(
                json!({"preStop": {"exec": {"command": ["sh", "-c", "sleep 3 && nginx -s quit"]}}}),
            ),
            true,
        ),
        (
            "sleep 7",
            Some(json!({"preStop": {"sleep": {"seconds": 7}}})),
            false,
        ),
        (
            "exec sleep 10",
            Some(json!({"preStop": {"exec": {"command": ["/bin/sleep", "10s"]}}})),
            false,
        ),
    ]
}

#[test]
fn warn_mode_names_every_short_hook_of_every_kind_with_the_number_its_confidence_and_the_patch() {
    let env = Env::start(Options::default());
    for (group, _, kind, _) in KINDS {
        for (form, lifecycle, short) in hook_forms() {
            let obj = routed(kind, lifecycle, None);
            let r = env.review("/validate", &request("CREATE", &obj));
            assert!(r.allowed, "{kind} {form}: warn mode never denies");
            assert!(
                r.patch.is_none(),
                "{kind} {form}: validating answers carry no patch"
            );
            let w = warnings(&r);
            if !short {
                assert!(w.is_empty(), "{kind}.{group} {form}: {w:?}");
                continue;
            }
            assert_eq!(w.len(), 2, "{kind} {form}: one finding and the fix: {w:?}");
            assert!(
                w[0].starts_with(&format!("prestop: {kind} shop/web container app: ")),
                "{kind} {form}: {}",
                w[0]
            );
            assert!(
                w[0].ends_with(&format!(
                    " is below the 7s needed to outlast the measured endpoint propagation; needs preStop sleep 7s ({WHY})"
                )),
                "{kind} {form}: {}",
                w[0]
            );
            let fix = w[1]
                .strip_prefix(&format!(
                    "prestop: fix {kind} shop/web: merge into the manifest "
                ))
                .unwrap_or_else(|| panic!("{kind} {form}: {}", w[1]));
            let patch: Value = serde_json::from_str(fix).unwrap();
            let mut fixed = obj.clone();
            json_patch::merge(&mut fixed, &patch);
            let container = &spec_of(&fixed)["containers"][0];
            assert_eq!(container["name"], "app");
            // A merge patch replaces the list; the strategic merge the
            // message names merges by name: the serving container is the
            // one patched either way.
            let pre_stop = &container["lifecycle"]["preStop"];
            assert!(
                pre_stop["sleep"]["seconds"] == 7
                    || pre_stop["exec"]["command"] == json!(["sleep", "7"]),
                "{kind} {form}: {pre_stop}"
            );
        }
    }
}

#[test]
fn the_documented_warning_text() {
    let env = Env::start(Options::default());
    let obj = routed("Deployment", None, Some(5));
    let w = warnings(&env.review("/validate", &request("CREATE", &obj)));
    assert_eq!(
        w,
        [
            format!(
                "prestop: Deployment shop/web container app: no preStop hook (0s) is below the 7s needed to outlast the measured endpoint propagation; needs preStop sleep 7s ({WHY})"
            ),
            r#"prestop: fix Deployment shop/web: merge into the manifest {"spec":{"template":{"spec":{"containers":[{"lifecycle":{"preStop":{"sleep":{"seconds":7}}},"name":"app"}],"terminationGracePeriodSeconds":7}}}}"#.to_string(),
        ]
    );
}

#[test]
fn a_grace_period_shorter_than_the_hook_is_named() {
    let env = Env::start(Options::default());
    let long = json!({"preStop": {"sleep": {"seconds": 10}}});
    let obj = routed("DaemonSet", Some(long), Some(5));
    let w = warnings(&env.review("/validate", &request("CREATE", &obj)));
    assert_eq!(
        w,
        [
            "prestop: DaemonSet shop/web container app: terminationGracePeriodSeconds 5 cannot hold the 10s preStop plus 0s drain; the app is killed mid-drain; needs terminationGracePeriodSeconds: 10",
            r#"prestop: fix DaemonSet shop/web: merge into the manifest {"spec":{"template":{"spec":{"terminationGracePeriodSeconds":10}}}}"#,
        ]
    );
}

#[test]
fn hooks_of_unknown_length_are_warned_about_never_taken_as_zero() {
    let env = Env::start(Options::default());
    let http = json!({"preStop": {"httpGet": {"path": "/drain", "port": 8080}}});
    let obj = routed("Deployment", Some(http), None);
    for path in ["/validate", "/validate/enforce"] {
        let r = env.review(path, &request("CREATE", &obj));
        assert!(r.allowed, "{path}: an unknown hook is a warning");
        assert_eq!(
            warnings(&r),
            [
                "prestop: Deployment shop/web container app: cannot tell how long the preStop hook delays SIGTERM: preStop of unknown duration (httpGet hook: its duration is whatever the handler does)"
            ]
        );
    }
}

#[test]
fn enforce_denies_with_what_to_fix_and_admits_what_is_enough() {
    let env = Env::start(Options::default());
    for (_, _, kind, _) in KINDS {
        let short = routed(kind, None, None);
        let r = env.review("/validate/enforce", &request("CREATE", &short));
        assert!(!r.allowed, "{kind}: denied");
        assert_eq!(r.result.code, 403);
        let message = &r.result.message;
        assert!(
            message.starts_with(&format!(
                "{kind} shop/web would lose requests at shutdown (namespace label observer.prestop.dev/admission=enforce):\nprestop: {kind} shop/web container app: no preStop hook (0s) is below the 7s needed"
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!(
                "\nprestop: fix {kind} shop/web: merge into the manifest {{"
            )),
            "{message}"
        );
        assert!(
            message.ends_with("to be warned instead of denied, remove the namespace label."),
            "{message}"
        );
        let enough = routed(
            kind,
            Some(json!({"preStop": {"sleep": {"seconds": 8}}})),
            None,
        );
        let r = env.review("/validate/enforce", &request("UPDATE", &enough));
        assert!(r.allowed && r.warnings.is_none(), "{kind}: {r:?}");
    }
}

#[test]
fn low_confidence_recommendations_never_deny() {
    let env = Env::start(Options {
        records: deletions(3, "shop", "web", 2.0),
        ..Options::default()
    });
    let obj = routed("Deployment", None, None);
    let r = env.review("/validate/enforce", &request("CREATE", &obj));
    assert!(r.allowed, "{:?}", r.result);
    let w = warnings(&r);
    assert!(
        w[0].starts_with("prestop: Deployment shop/web: the recommendation of 3s is low confidence (3 samples, 296 more needed)"),
        "{w:?}"
    );
    assert!(
        w[1].contains("no preStop hook (0s) is below the 3s needed")
            && w[1].contains("LOW CONFIDENCE"),
        "{w:?}"
    );
}

#[test]
fn unrouted_workloads_jobs_owned_objects_and_pod_updates_are_left_alone() {
    let env = Env::start(Options::default());
    let unrouted = object(
        "Deployment",
        "shop",
        json!({"app": "other"}),
        pod_spec(None, None),
    );
    let other_namespace = object(
        "Deployment",
        "elsewhere",
        json!({"app": "web"}),
        pod_spec(None, None),
    );
    let job = routed("Job", None, None);
    let mut owned = routed("ReplicaSet", None, None);
    owned["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u", "controller": true
    }]);
    let pod = routed("Pod", None, None);
    let cases = [
        ("unrouted", "CREATE", &unrouted),
        ("another namespace", "CREATE", &other_namespace),
        ("a Job", "CREATE", &job),
        ("owned by a Deployment", "CREATE", &owned),
        ("a Pod update", "UPDATE", &pod),
    ];
    for (what, op, obj) in cases {
        for path in [
            "/validate",
            "/validate/enforce",
            "/mutate",
            "/mutate/adaptive-drain",
        ] {
            let r = env.review(path, &request(op, obj));
            assert!(r.allowed, "{what} {path}");
            assert!(
                r.warnings.is_none() && r.patch.is_none(),
                "{what} {path}: {r:?}"
            );
        }
    }
}

#[test]
fn aggregator_down_warns_once_and_never_denies_or_injects() {
    let env = Env::start(Options {
        aggregator_up: false,
        ..Options::default()
    });
    let obj = routed("Deployment", None, None);
    for path in [
        "/validate",
        "/validate/enforce",
        "/mutate",
        "/mutate/adaptive-drain",
    ] {
        let r = env.review(path, &request("CREATE", &obj));
        assert!(r.allowed && r.patch.is_none(), "{path}");
        let w = warnings(&r);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("prestop-admission: no recommendation from the aggregator yet (aggregator unreachable at http://127.0.0.1:")
                && w[0].ends_with("; preStop delays were not checked"),
            "{w:?}"
        );
    }
}

#[test]
fn inject_sets_the_sleep_on_routed_containers_without_a_hook_and_raises_the_grace_period() {
    let env = Env::start(Options {
        settings: inject::Settings {
            sleep_action: true,
            drain_seconds: 30.0,
            ..Options::default().settings
        },
        ..Options::default()
    });
    for (_, _, kind, _) in KINDS {
        let obj = routed(kind, None, None);
        let (out, w) = mutated(&env, "/mutate", "CREATE", &obj);
        let mut expected = obj.clone();
        let spec = if *kind == "Pod" {
            &mut expected["spec"]
        } else {
            &mut expected["spec"]["template"]["spec"]
        };
        spec["containers"][0]["lifecycle"] = json!({"preStop": {"sleep": {"seconds": 7}}});
        spec["terminationGracePeriodSeconds"] = json!(37);
        expected["metadata"]["annotations"] = json!({
            "observer.prestop.dev/injected": "app: preStop sleep 7s; terminationGracePeriodSeconds 30 -> 37",
            "observer.prestop.dev/injected-why": WHY,
        });
        assert_eq!(
            out, expected,
            "{kind}: the sidecar no Service routes to is untouched"
        );
        assert_eq!(
            w,
            [format!(
                "prestop: injected into {kind} shop/web: app: preStop sleep 7s; terminationGracePeriodSeconds 30 -> 37 ({WHY})"
            )]
        );
    }
}

#[test]
fn inject_keeps_existing_hooks_and_annotations_and_never_lowers_the_grace_period() {
    let env = Env::start(Options::default());
    // An explicit long grace period stays; other annotations stay; an
    // existing lifecycle keeps its postStart.
    let mut obj = routed(
        "Deployment",
        Some(json!({"postStart": {"exec": {"command": ["touch", "/ready"]}}})),
        Some(120),
    );
    obj["metadata"]["annotations"] = json!({"team": "checkout"});
    let (out, _) = mutated(&env, "/mutate", "CREATE", &obj);
    let spec = spec_of(&out);
    assert_eq!(spec["terminationGracePeriodSeconds"], 120);
    assert_eq!(
        spec["containers"][0]["lifecycle"],
        json!({"postStart": {"exec": {"command": ["touch", "/ready"]}}, "preStop": {"sleep": {"seconds": 7}}})
    );
    assert_eq!(out["metadata"]["annotations"]["team"], "checkout");
    assert_eq!(
        out["metadata"]["annotations"]["observer.prestop.dev/injected"],
        "app: preStop sleep 7s"
    );
    // A short hook is the validating webhook's to warn about, not replaced.
    let short = routed(
        "Deployment",
        Some(json!({"preStop": {"sleep": {"seconds": 2}}})),
        None,
    );
    let r = env.review("/mutate", &request("CREATE", &short));
    assert!(
        r.allowed && r.patch.is_none() && r.warnings.is_none(),
        "{r:?}"
    );
}

#[test]
fn without_the_sleep_action_inject_writes_exec_sleep_only_where_the_image_has_a_shell() {
    let env = Env::start(Options {
        settings: inject::Settings {
            sleep_action: false,
            drain_seconds: 0.0,
            ..Options::default().settings
        },
        ..Options::default()
    });
    // Unknown image: nothing injected, and a warning says how to declare it.
    let plain = routed("StatefulSet", None, None);
    let r = env.review("/mutate", &request("CREATE", &plain));
    assert!(r.patch.is_none());
    assert_eq!(
        warnings(&r),
        [
            "prestop: nothing injected into StatefulSet shop/web container app: this cluster has no preStop sleep action (Kubernetes before 1.30) and the image is not known to have a shell for `exec sleep`; annotate the pod template observer.prestop.dev/image-has-shell: \"app\" if it has one"
        ]
    );
    // Declared by annotation, or seen running a shell.
    let mut annotated = plain.clone();
    annotated["spec"]["template"]["metadata"]["annotations"] =
        json!({"observer.prestop.dev/image-has-shell": "app"});
    let mut runs_sh = plain.clone();
    runs_sh["spec"]["template"]["spec"]["containers"][0]["command"] =
        json!(["/bin/sh", "-c", "exec web"]);
    for obj in [annotated, runs_sh] {
        let (out, _) = mutated(&env, "/mutate", "CREATE", &obj);
        assert_eq!(
            spec_of(&out)["containers"][0]["lifecycle"],
            json!({"preStop": {"exec": {"command": ["sleep", "7"]}}})
        );
        assert!(spec_of(&out)["containers"][1].get("lifecycle").is_none());
    }
}
