//! `cargo xtask lab`: builds the agent, the aggregator and the lab's
//! binaries, then replaces itself with `lab-run` (so Ctrl-C reaches the
//! lab directly), which runs the lab (it needs root) and writes
//! target/lab/report.json. The lab's end-to-end tests run the same
//! `lab-run`.

use std::{ffi::OsString, os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{build::ensure_setup, cmd};

#[derive(Args, Debug)]
pub struct XtaskLabArgs {
    /// Build and run release binaries (default: debug, as `cargo build`).
    #[arg(long)]
    pub release: bool,
    #[command(flatten)]
    pub lab: lab::LabArgs,
}

/// The arguments after `lab` on xtask's command line, minus the flags
/// xtask handles itself; clap has already checked them.
fn lab_flags() -> Vec<OsString> {
    std::env::args_os()
        .skip(1)
        .skip_while(|a| a != "lab")
        .skip(1)
        .filter(|a| a != "--release")
        .collect()
}

pub fn run(args: &XtaskLabArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the lab creates network namespaces and loads eBPF programs: run `sudo cargo xtask lab`"
        );
    }
    ensure_setup()?;
    let profile = if args.release { "release" } else { "debug" };
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(cmd::workspace_root()).args([
        "build",
        "--bins",
        "-p",
        "observer-agent",
        "-p",
        "aggregator",
        "-p",
        "lab",
    ]);
    if args.release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let bin = cmd::target_dir().join(profile);
    let mut lab = Command::new(bin.join("lab-run"));
    lab.arg("--bin-dir")
        .arg(&bin)
        .args(["--profile", profile])
        .args(lab_flags());
    if args.lab.report.is_none() {
        lab.arg("--report")
            .arg(cmd::workspace_root().join("target/lab/report.json"));
    }
    // exec only returns on failure.
    Err(lab.exec()).with_context(|| format!("running {}", bin.join("lab-run").display()))
}
