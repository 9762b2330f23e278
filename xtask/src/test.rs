//! `cargo xtask test`: every test of the workspace, the root-only kernel
//! tests included (they fail rather than skip when run through here).

use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::{build::ensure_setup, cmd};

/// Tests that need root read this and fail instead of skipping.
pub const REQUIRE_ROOT_ENV: &str = "OBSERVER_REQUIRE_ROOT_TESTS";

#[derive(Args, Default)]
pub struct TestArgs {
    /// Skip tests that need root (they are reported as skipped, never as passed).
    #[arg(long)]
    pub no_root: bool,
    /// Extra arguments for `cargo test` (after `--`), for example a test name filter.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    if !args.no_root && !cmd::is_root() {
        bail!(
            "the kernel tests need root (eBPF load, network namespaces): run `sudo cargo xtask test`, or `cargo xtask test --no-root` to skip them"
        );
    }
    ensure_setup()?;
    // The end-to-end tests run the agent, the aggregator and the lab's pod
    // server as processes from the test profile's target directory.
    cmd::run(
        Command::new(env!("CARGO"))
            .current_dir(cmd::workspace_root())
            .args([
                "build",
                "--workspace",
                "--exclude",
                "observer-ebpf",
                "--bins",
            ]),
    )?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(cmd::workspace_root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "observer-ebpf",
            "--no-fail-fast",
        ])
        .args(&args.cargo_args);
    if !args.no_root {
        cargo.env(REQUIRE_ROOT_ENV, "1");
    }
    cmd::run(&mut cargo)
}
