//! Compiles observer-ebpf for bpfel-unknown-none with aya-build and leaves the
//! object in OUT_DIR, where the loader embeds it. Checks the toolchain first
//! so a machine without it gets one clear message instead of a linker or
//! include error.

use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::{Package, Toolchain};

const SETUP_HINT: &str =
    "run `cargo xtask setup` (installs nightly rust-src and bpf-linker), then build again";

fn main() -> anyhow::Result<()> {
    check_toolchain()?;
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("agent crate has a parent")?
        .join("observer-ebpf");
    let ebpf = Package {
        name: "observer-ebpf",
        root_dir: root_dir.to_str().context("path is UTF-8")?,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .map_err(|e| anyhow!("building the eBPF programs failed: {e:#}\nhint: {SETUP_HINT}"))
}

fn check_toolchain() -> anyhow::Result<()> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        bail!("bpf-linker is not on PATH; {SETUP_HINT}");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let has_rust_src = sysroot.is_some_and(|s| {
        Path::new(&s)
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
    });
    if !has_rust_src {
        bail!("the nightly toolchain with rust-src is missing; {SETUP_HINT}");
    }
    Ok(())
}
