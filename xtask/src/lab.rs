//! `cargo xtask lab`: builds the agent, the aggregator and the lab's pod
//! server, then runs the lab in this process (it needs root) and writes
//! target/lab/report.json.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{build::ensure_setup, cmd};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace_root().join("target"))
}

pub fn run(args: &lab::LabArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the lab creates network namespaces and loads eBPF programs: run `sudo cargo xtask lab`"
        );
    }
    ensure_setup()?;
    cmd::run(
        Command::new(env!("CARGO"))
            .current_dir(cmd::workspace_root())
            .args([
                "build",
                "--bins",
                "-p",
                "observer-agent",
                "-p",
                "aggregator",
                "-p",
                "lab",
            ]),
    )?;
    let bin = target_dir().join("debug");
    let binaries = lab::cli::LabBinaries {
        pod_server: bin.join("lab-pod-server"),
        observer: lab::observer::Binaries {
            aggregator: bin.join("aggregator"),
            agent: bin.join("observer-agent"),
            completion_timeout: std::time::Duration::from_secs(20),
        },
        profile: "debug".into(),
    };
    let report = args
        .report
        .clone()
        .unwrap_or_else(|| cmd::workspace_root().join("target/lab/report.json"));
    lab::cli::run(args, &binaries, &report)?;
    Ok(())
}
