//! The lab's command line, as `cargo xtask lab` runs it once it has built
//! the binaries: `lab-run --bin-dir target/debug [LAB FLAGS]`. Needs root.
//! Exits 0 when the lab ran, 130 when interrupted (Ctrl-C / SIGTERM), 1 on
//! failure; every namespace, process and rule is gone in all three cases.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use lab::cli::{self, Interrupted, LabArgs, LabBinaries};

#[derive(Parser)]
#[command(
    name = "lab-run",
    about = "Run the lab: a cluster in network namespaces, a rolling update measured by the real agents and aggregator, then repeated without and with the recommended preStop delay"
)]
struct Cli {
    /// Directory holding `aggregator`, `observer-agent` and
    /// `lab-pod-server` (e.g. target/debug).
    #[arg(long)]
    bin_dir: PathBuf,
    /// The profile those binaries were built with (reported with the
    /// agent's CPU time).
    #[arg(long, default_value = "debug")]
    profile: String,
    #[command(flatten)]
    lab: LabArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let binaries = LabBinaries::in_dir(&cli.bin_dir, &cli.profile);
    // Default: target/lab/report.json next to target/<profile>.
    let report = cli.lab.report.clone().unwrap_or_else(|| {
        cli.bin_dir
            .parent()
            .unwrap_or(&cli.bin_dir)
            .join("lab/report.json")
    });
    match cli::run(&cli.lab, &binaries, &report) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e:#}");
            if e.downcast_ref::<Interrupted>().is_some() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
