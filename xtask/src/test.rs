//! `cargo xtask test`: every test of the workspace, the root-only kernel
//! tests included (they fail rather than skip when run through here), on
//! the host's kernel and, in a QEMU guest, on the other kernels asked for.

use std::{fmt, process::Command, str::FromStr};

use anyhow::{Result, bail};
use clap::Args;

use lab_netns::root::{REQUIRE_ROOT_ENV, is_root};

use crate::{build::ensure_setup, cmd, vm};

/// A kernel to test on.
#[derive(Clone, Debug)]
pub enum TestKernel {
    /// The running kernel: every test of the workspace.
    Host,
    /// A Debian kernel in a QEMU guest: the kernel-facing root tests.
    Debian(vm::DebianKernel),
}

impl FromStr for TestKernel {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" => Ok(TestKernel::Host),
            _ => Ok(TestKernel::Debian(s.parse()?)),
        }
    }
}

impl fmt::Display for TestKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestKernel::Host => f.write_str("host"),
            TestKernel::Debian(k) => k.fmt(f),
        }
    }
}

#[derive(Args)]
pub struct TestArgs {
    /// Skip tests that need root on the host (they are reported as
    /// skipped, never as passed). Guest runs need no root on the host.
    #[arg(long)]
    pub no_root: bool,
    /// Kernels to test on, comma-separated or repeated: `host` (every test
    /// of the workspace on the running kernel) and Debian kernels booted
    /// under QEMU, which run the kernel-facing root tests: `debian-6.1`
    /// (the newest 6.1 generic build apt knows), `debian-6.1-rt`,
    /// `debian-6.12`. Downloaded once into target/kernels/.
    #[arg(
        long = "kernel",
        value_name = "KERNEL",
        value_delimiter = ',',
        env = "OBSERVER_TEST_KERNELS",
        default_values = ["host", "debian-6.1"]
    )]
    pub kernels: Vec<TestKernel>,
    /// Extra arguments for the host's `cargo test` (after `--`), for example a
    /// test name filter. The guest runs its fixed set (README "Kernels tested").
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    ensure_setup()?;
    let mut failed = Vec::new();
    for kernel in &args.kernels {
        let result = match kernel {
            TestKernel::Host => run_host(args),
            TestKernel::Debian(k) => vm::run(k),
        };
        if let Err(e) = result {
            eprintln!("error: tests on kernel {kernel}: {e:#}");
            failed.push(kernel.to_string());
        }
    }
    if !failed.is_empty() {
        bail!("tests failed on: {}", failed.join(", "));
    }
    Ok(())
}

/// Every test of the workspace on the running kernel.
fn run_host(args: &TestArgs) -> Result<()> {
    if !args.no_root && !is_root() {
        bail!(
            "the kernel tests need root (eBPF load, network namespaces): run `sudo cargo xtask test`, or `cargo xtask test --no-root` to skip them"
        );
    }
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
                "--exclude",
                "lab-sock-lb-ebpf",
                "--exclude",
                "lab-commit-clock-ebpf",
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
            "--exclude",
            "lab-sock-lb-ebpf",
            "--exclude",
            "lab-commit-clock-ebpf",
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
