//! Inject mode with the adaptive drain (`/mutate/adaptive-drain`) over
//! HTTPS with real AdmissionReview v1 requests: the JSONPatch applied to
//! every kind gives the init container, volumes, mounts, environment, exec
//! hook and grace period; a second admission adds nothing; names that are
//! taken stop the injection with a warning.

mod common;

use common::{Env, KINDS, Options, WHY, mutated, request, routed, spec_of, warnings};
use prestop_admission::inject;
use serde_json::{Value, json};

const PATH: &str = "/mutate/adaptive-drain";

/// What the webhook of [`env`] adds to a pod spec.
fn init_container() -> Value {
    json!({
        "name": "prestop-drain",
        "image": "registry.example/prestop-drain:1",
        "args": ["--copy-to", "/opt/prestop-drain/prestop-drain"],
        "volumeMounts": [{"name": "prestop-drain", "mountPath": "/opt/prestop-drain"}],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "32Mi"}
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    })
}

fn volumes() -> Value {
    json!([
        {"name": "prestop-drain", "emptyDir": {"sizeLimit": "16Mi"}},
        {"name": "prestop-drain-token", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "prestop-aggregator", "expirationSeconds": 600, "path": "token"}}
        ]}}
    ])
}

fn mounts() -> Value {
    json!([
        {"name": "prestop-drain", "mountPath": "/opt/prestop-drain", "readOnly": true},
        {"name": "prestop-drain-token", "mountPath": "/var/run/secrets/prestop-drain", "readOnly": true}
    ])
}

fn env_vars() -> Value {
    json!([
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ])
}

/// The hook: the recommendation (7 s) as fallback, `max` as set.
fn hook(max: &str) -> Value {
    json!({"preStop": {"exec": {"command": [
        "/opt/prestop-drain/prestop-drain",
        "--aggregator", "http://prestop-aggregator.prestop-system.svc:8080",
        "--token-file", "/var/run/secrets/prestop-drain/token",
        "--fallback", "7s",
        "--max", max
    ]}}})
}

/// The webhook on a cluster without the sleep action (1.29): the drain
/// needs neither it nor a shell in the image. Apps need 30 s after SIGTERM.
fn env() -> Env {
    Env::start(Options {
        settings: inject::Settings {
            sleep_action: false,
            drain_seconds: 30.0,
            ..Options::default().settings
        },
        ..Options::default()
    })
}

fn spec_mut(object: &mut Value) -> &mut Value {
    if object["kind"] == "Pod" {
        &mut object["spec"]
    } else {
        &mut object["spec"]["template"]["spec"]
    }
}

/// The admission left `object` alone: no patch, and these warnings.
fn left_alone(env: &Env, operation: &str, object: &Value) -> Vec<String> {
    let r = env.review(PATH, &request(operation, object));
    assert!(r.allowed);
    assert!(r.patch.is_none(), "{:?}", r.patch.map(String::from_utf8));
    warnings(&r)
}

#[test]
fn every_kind_gets_the_init_container_volumes_mounts_identity_and_exec_hook() {
    let env = env();
    for (_, _, kind, _) in KINDS {
        let obj = routed(kind, None, None);
        let (out, w) = mutated(&env, PATH, "CREATE", &obj);
        let mut expected = obj.clone();
        let spec = spec_mut(&mut expected);
        spec["initContainers"] = json!([init_container()]);
        spec["volumes"] = volumes();
        let app = &mut spec["containers"][0];
        app["volumeMounts"] = mounts();
        app["env"] = env_vars();
        app["lifecycle"] = hook("60s");
        // max 60 s + 5 s for the answer to arrive, + 30 s of the app's drain.
        spec["terminationGracePeriodSeconds"] = json!(95);
        let summary = "app: preStop prestop-drain (fallback 7s, max 60s); terminationGracePeriodSeconds 30 -> 95";
        expected["metadata"]["annotations"] = json!({
            "observer.prestop.dev/injected": summary,
            "observer.prestop.dev/injected-why": WHY,
        });
        assert_eq!(
            out, expected,
            "{kind}: the sidecar no Service routes to is untouched"
        );
        assert_eq!(
            w,
            [format!(
                "prestop: injected into {kind} shop/web: {summary} ({WHY})"
            )]
        );
    }
}

#[test]
fn the_validating_webhook_has_nothing_to_say_about_an_injected_object() {
    let env = env();
    for (_, _, kind, _) in KINDS {
        let (injected, _) = mutated(&env, PATH, "CREATE", &routed(kind, None, None));
        let r = env.review("/validate", &request("CREATE", &injected));
        assert!(r.allowed, "{kind}");
        assert_eq!(
            warnings(&r),
            Vec::<String>::new(),
            "{kind}: the drain's fallback is the recommendation and the grace period holds its max"
        );
    }
}

#[test]
fn a_second_admission_adds_nothing_and_a_removed_hook_comes_back_alone() {
    let env = env();
    for (_, _, kind, _) in KINDS {
        let (mut injected, _) = mutated(&env, PATH, "CREATE", &routed(kind, None, None));
        // As the API server stores it: defaulted fields the webhook never
        // wrote must not hide its own pieces.
        let spec = spec_mut(&mut injected);
        spec["initContainers"][0]["imagePullPolicy"] = json!("IfNotPresent");
        spec["initContainers"][0]["terminationMessagePath"] = json!("/dev/termination-log");
        spec["volumes"][1]["projected"]["defaultMode"] = json!(420);
        // A Pod is never updated: the same manifest is created again.
        let operation = if *kind == "Pod" { "CREATE" } else { "UPDATE" };
        assert_eq!(
            left_alone(&env, operation, &injected),
            Vec::<String>::new(),
            "{kind}"
        );

        // The hook edited away, the rest kept: only the hook comes back.
        let mut edited = injected.clone();
        spec_mut(&mut edited)["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("lifecycle");
        let (again, w) = mutated(&env, PATH, operation, &edited);
        assert_eq!(spec_of(&again), spec_of(&injected), "{kind}");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(&format!(
                "prestop: injected into {kind} shop/web: app: preStop prestop-drain (fallback 7s, max 60s) ("
            )),
            "{kind}: the grace period is already enough: {w:?}"
        );
    }
}

#[test]
fn existing_lists_are_appended_to_and_an_identity_from_the_downward_api_is_reused() {
    let env = env();
    let mut obj = routed("Deployment", None, Some(300));
    let spec = spec_mut(&mut obj);
    spec["initContainers"] = json!([{"name": "migrate", "image": "registry.example/migrate:1"}]);
    spec["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    spec["containers"][0]["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    spec["containers"][0]["env"] = json!([
        {"name": "MODE", "value": "prod"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]);
    let (out, w) = mutated(&env, PATH, "CREATE", &obj);
    let spec = spec_of(&out);
    assert_eq!(
        spec["initContainers"],
        json!([{"name": "migrate", "image": "registry.example/migrate:1"}, init_container()])
    );
    let mut all_volumes = vec![json!({"name": "data", "emptyDir": {}})];
    all_volumes.extend(volumes().as_array().unwrap().iter().cloned());
    assert_eq!(spec["volumes"], Value::Array(all_volumes));
    let app = &spec["containers"][0];
    let mut all_mounts = vec![json!({"name": "data", "mountPath": "/data"})];
    all_mounts.extend(mounts().as_array().unwrap().iter().cloned());
    assert_eq!(app["volumeMounts"], Value::Array(all_mounts));
    assert_eq!(
        app["env"],
        json!([
            {"name": "MODE", "value": "prod"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
        ]),
        "POD_NAME is not added twice"
    );
    assert_eq!(app["lifecycle"], hook("60s"));
    assert_eq!(
        spec["terminationGracePeriodSeconds"], 300,
        "an explicit longer grace period is never lowered"
    );
    assert_eq!(
        out["metadata"]["annotations"]["observer.prestop.dev/injected"],
        "app: preStop prestop-drain (fallback 7s, max 60s)"
    );
    assert_eq!(w.len(), 1);
}

#[test]
fn the_grace_period_holds_the_fallback_when_it_is_longer_than_max() {
    let env = Env::start(Options {
        settings: inject::Settings {
            adaptive_drain: inject::AdaptiveDrain {
                max_seconds: 1,
                ..common::adaptive_drain()
            },
            ..Options::default().settings
        },
        ..Options::default()
    });
    // max 1 s + 5 s is less than the 7 s fallback the hook never ends
    // before without a `drained` answer.
    let (out, _) = mutated(&env, PATH, "CREATE", &routed("StatefulSet", None, Some(5)));
    assert_eq!(spec_of(&out)["terminationGracePeriodSeconds"], 7);
    assert_eq!(spec_of(&out)["containers"][0]["lifecycle"], hook("1s"));
}

#[test]
fn containers_with_their_own_pre_stop_are_left_alone() {
    let env = env();
    for lifecycle in [
        json!({"preStop": {"sleep": {"seconds": 2}}}),
        json!({"preStop": {"exec": {"command": ["sh", "-c", "nginx -s quit"]}}}),
        json!({"preStop": {"httpGet": {"path": "/drain", "port": 8080}}}),
    ] {
        let obj = routed("Deployment", Some(lifecycle.clone()), None);
        assert_eq!(
            left_alone(&env, "CREATE", &obj),
            Vec::<String>::new(),
            "{lifecycle}"
        );
    }
}

#[test]
fn names_taken_by_something_else_stop_the_injection_with_a_warning() {
    let env = env();
    let pod_level = |field: &str, value: Value| {
        let mut obj = routed("Deployment", None, None);
        spec_mut(&mut obj)[field] = value;
        obj
    };
    let mut container_named = routed("Deployment", None, None);
    spec_mut(&mut container_named)["containers"][1]["name"] = json!("prestop-drain");
    let cases = [
        (
            pod_level(
                "volumes",
                json!([{"name": "prestop-drain", "configMap": {"name": "scripts"}}]),
            ),
            "a volume named prestop-drain is not an emptyDir",
        ),
        (
            pod_level(
                "volumes",
                json!([{"name": "prestop-drain-token", "secret": {"secretName": "t"}}]),
            ),
            "a volume named prestop-drain-token is not a projected token for audience prestop-aggregator",
        ),
        (
            pod_level(
                "initContainers",
                json!([{"name": "prestop-drain", "image": "registry.example/other:1"}]),
            ),
            "an init container named prestop-drain does not run `--copy-to /opt/prestop-drain/prestop-drain`",
        ),
        (container_named, "a container is named prestop-drain"),
    ];
    for (obj, conflict) in cases {
        assert_eq!(
            left_alone(&env, "CREATE", &obj),
            [format!(
                "prestop: nothing injected into Deployment shop/web: {conflict}; the adaptive drain needs these names (rename yours, or label the namespace observer.prestop.dev/inject=true for the fixed sleep)"
            )]
        );
    }

    let container_level = |key: &str, value: Value| {
        let mut obj = routed("Deployment", None, None);
        spec_mut(&mut obj)["containers"][0][key] = value;
        obj
    };
    let cases = [
        (
            container_level(
                "volumeMounts",
                json!([{"name": "tools", "mountPath": "/opt/prestop-drain"}]),
            ),
            "it mounts volume \"tools\" at /opt/prestop-drain, where the adaptive drain mounts prestop-drain",
        ),
        (
            container_level("env", json!([{"name": "POD_NAME", "value": "web"}])),
            "it sets POD_NAME otherwise than from metadata.name, and prestop-drain reads the pod's identity from it",
        ),
    ];
    for (obj, conflict) in cases {
        assert_eq!(
            left_alone(&env, "CREATE", &obj),
            [format!(
                "prestop: nothing injected into Deployment shop/web container app: {conflict}"
            )]
        );
    }
}
