//! `cargo xtask`: the project's tasks, runnable on a fresh machine.

mod build;
#[cfg(test)]
mod checks;
mod cmd;
mod image;
mod lab;
mod setup;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks for the endpoint-propagation observer"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and test (Debian packages, nightly
    /// rust-src, bpf-linker). Idempotent; needs root for apt.
    Setup(setup::SetupArgs),
    /// Build the eBPF programs and every binary of the workspace.
    Build(build::BuildArgs),
    /// Run every test of the workspace, including the root-only kernel tests,
    /// on the host kernel and, in QEMU guests, on other kernels (`--kernel`).
    Test(test::TestArgs),
    /// Run the lab: a cluster in network namespaces, a rolling update measured
    /// by the real agents and aggregator, then repeated with preStop 0 (the
    /// folklore 5 s when the injected delays can exceed it) and with the
    /// recommended delay. Needs root. Writes target/lab/report.json.
    Lab(lab::XtaskLabArgs),
    /// Build the OCI images of the agent, the aggregator and prestop-check
    /// with buildah (from deploy/images/*/Containerfile), as OCI archives
    /// with a CycloneDX SBOM each in target/images/.
    Image(image::ImageArgs),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup(args) => setup::run(&args),
        Task::Build(args) => build::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Lab(args) => lab::run(&args),
        Task::Image(args) => image::run(&args),
    }
}
