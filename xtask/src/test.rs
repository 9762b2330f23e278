//! `cargo xtask test`: every test of the workspace, the root-only kernel
//! tests included (they fail rather than skip when run through here).

use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use lab_netns::root::{REQUIRE_ROOT_ENV, is_root};

use crate::{build::ensure_setup, cmd};

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
    if !args.no_root && !is_root() {
        bail!(
            "the kernel tests need root (eBPF load, network namespaces): run `sudo cargo xtask test`, or `cargo xtask test --no-root` to skip them"
        );
    }
    ensure_setup()?;
    warn_if_disk_low();
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

/// Space a full test build takes in the target directory (3.6 GiB measured
/// from a fresh clone), with some room.
const TEST_BUILD_BYTES: u64 = 5 << 30;

/// Says so before the build fails half-way with "No space left on device".
fn warn_if_disk_low() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.exists())
        .unwrap_or_else(cmd::workspace_root);
    let Ok(fs) = nix::sys::statvfs::statvfs(&dir) else {
        return;
    };
    let free = fs.blocks_available() * fs.fragment_size();
    if free < TEST_BUILD_BYTES {
        eprintln!(
            "warning: {:.1} GiB free under {}; a full test build needs about {} GiB and may fail with \"No space left on device\"",
            free as f64 / f64::from(1 << 30),
            dir.display(),
            TEST_BUILD_BYTES >> 30
        );
    }
}
