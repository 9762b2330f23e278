//! `cargo xtask lab`: builds the agent, the aggregator and the lab's
//! binaries, then replaces itself with `lab-run` (so Ctrl-C reaches the
//! lab directly), which runs the lab (it needs root) and writes
//! target/lab/report.json (its default next to target/<profile>). The lab's flags are defined once, by `lab-run`:
//! xtask passes them through unread (`cargo xtask lab --help` shows them
//! after the build). The lab's end-to-end tests run the same `lab-run`.

use std::{ffi::OsString, os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{build::ensure_setup, cmd};

#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct XtaskLabArgs {
    /// Build and run release binaries (default: debug, as `cargo build`).
    #[arg(long)]
    pub release: bool,
    /// The lab's own flags, passed to `lab-run` (`--help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub lab: Vec<OsString>,
}

/// Whether the user only asks for the lab's help: no root needed for that.
fn asks_help(flags: &[OsString]) -> bool {
    flags.iter().any(|f| f == "--help" || f == "-h")
}

pub fn run(args: &XtaskLabArgs) -> Result<()> {
    if !lab_netns::root::is_root() && !asks_help(&args.lab) {
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
        "-p",
        "prestop-drain",
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
        .args(&args.lab);
    // exec only returns on failure.
    Err(lab.exec()).with_context(|| format!("running {}", bin.join("lab-run").display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_help_flag_is_a_request_for_help() {
        let flags = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(asks_help(&flags(&["--nodes", "5", "--help"])));
        assert!(!asks_help(&flags(&["--hold", "60s"])));
    }
}
