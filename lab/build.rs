//! Compiles lab-sock-lb-ebpf (the `cilium` node's connect4 program) for
//! bpfel-unknown-none with aya-build and leaves the object in OUT_DIR, where
//! `cilium::sock_lb` embeds it. A crate of its own, not a program in
//! observer-ebpf: the agent never carries or loads the lab's datapath.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sock-lb-ebpf");
    let ebpf = Package {
        name: "lab-sock-lb-ebpf",
        root_dir: root_dir.to_str().context("path is UTF-8")?,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default()).map_err(|e| {
        anyhow!(
            "building the lab's eBPF program failed: {e:#}\n\
             hint: run `cargo xtask setup` (installs nightly rust-src and bpf-linker), then build again"
        )
    })
}
