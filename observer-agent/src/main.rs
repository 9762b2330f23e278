use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use observer_agent::commands::{observe, probe, run};
use tracing_subscriber::EnvFilter;

/// Node agent of the endpoint-propagation observer: watches, with eBPF, when
/// this node stops sending new connections to terminating pods.
#[derive(Parser, Debug)]
#[command(name = "observer-agent", version)]
struct Cli {
    /// Network namespace to work in (the node's), as a namespace file such as
    /// /run/netns/NAME or /proc/PID/ns/net. Entered before anything else.
    #[arg(long, global = true, env = "OBSERVER_NETNS")]
    netns: Option<PathBuf>,
    /// Log filter, tracing-subscriber EnvFilter syntax (e.g. `info`, `observer_agent=debug`).
    #[arg(long, global = true, default_value = "info", env = "OBSERVER_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Observe connections to given addresses and print them (no aggregator needed).
    Observe(observe::ObserveArgs),
    /// Print which kernel features and hooks work here; exit 1 if a required one is missing.
    Probe(probe::ProbeArgs),
    /// DaemonSet mode: watch the endpoints the aggregator names and report to it.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Before the runtime starts any thread: threads created later inherit it.
    if let Some(netns) = &cli.netns {
        lab_free_setns(netns)
            .with_context(|| format!("entering network namespace {}", netns.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Observe(args) => runtime
            .block_on(observe::run(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Run(args) => runtime.block_on(run::run(args)).map(|()| ExitCode::SUCCESS),
        Command::Probe(args) => {
            let ok = runtime.block_on(async { probe::run(&args) })?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn lab_free_setns(path: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}
