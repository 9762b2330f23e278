//! `cargo xtask build`: the agent's build script compiles the eBPF programs
//! (aya-build), so building the workspace builds everything.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

#[derive(Args, Default)]
pub struct BuildArgs {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn run(args: &BuildArgs) -> Result<()> {
    ensure_setup()?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(cmd::workspace_root()).args([
        "build",
        "--workspace",
        "--exclude",
        "observer-ebpf",
        "--exclude",
        "lab-sock-lb-ebpf",
        "--exclude",
        "lab-commit-clock-ebpf",
        "--bins",
    ]);
    if args.release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)
}

/// Runs `setup` first when anything it installs is missing.
pub fn ensure_setup() -> Result<()> {
    if !setup::missing().is_empty() {
        setup::run(&setup::SetupArgs::default())?;
    }
    Ok(())
}
