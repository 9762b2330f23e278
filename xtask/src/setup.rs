//! `cargo xtask setup`: installs only what is missing, the same way on a
//! developer machine and in CI.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::cmd::{self, is_root};

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
];

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
    if !cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        missing.push(Missing::BpfLinker);
    }
    missing
}

fn apt_installed(pkg: &str, probe: Option<&str>) -> bool {
    match probe {
        Some(path) if path.starts_with('/') => Path::new(path).exists(),
        Some(command) => {
            cmd::succeeds(Command::new("sh").args(["-c", &format!("command -v {command}")]))
        }
        None => cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
            .map(|s| s.contains("install ok installed"))
            .unwrap_or(false),
    }
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

pub fn run(args: &SetupArgs) -> Result<()> {
    let started = Instant::now();
    let missing = missing();
    if missing.is_empty() {
        eprintln!(
            "setup: nothing missing ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if args.check {
        for m in &missing {
            eprintln!("setup: missing {m:?}");
        }
        bail!(
            "setup --check: {} item(s) missing; run `cargo xtask setup`",
            missing.len()
        );
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
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
}
