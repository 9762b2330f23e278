//! Compiles the lab's eBPF programs for bpfel-unknown-none with aya-build
//! and leaves the objects in OUT_DIR: lab-sock-lb-ebpf (the `cilium` node's
//! connect4 program, embedded by `cilium::sock_lb`) and
//! lab-commit-clock-ebpf (the writers' sendmsg times, embedded by
//! `commit_clock::SyscallClock`). Crates of their own, not programs in
//! observer-ebpf: the agent never carries or loads the lab's programs.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let lab = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sock_lb = lab.join("sock-lb-ebpf");
    let commit_clock = lab.join("commit-clock-ebpf");
    let packages = [
        Package {
            name: "lab-sock-lb-ebpf",
            root_dir: sock_lb.to_str().context("path is UTF-8")?,
            ..Default::default()
        },
        Package {
            name: "lab-commit-clock-ebpf",
            root_dir: commit_clock.to_str().context("path is UTF-8")?,
            ..Default::default()
        },
    ];
    aya_build::build_ebpf(packages, Toolchain::default()).map_err(|e| {
        anyhow!(
            "building the lab's eBPF programs failed: {e:#}\n\
             hint: run `cargo xtask setup` (installs nightly rust-src and bpf-linker), then build again"
        )
    })
}
