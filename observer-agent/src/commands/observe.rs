//! `observer-agent observe`: standalone observation of given addresses,
//! printed as they happen. Needs no aggregator; scripts and tests use it.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use observer_proto::{Observation, UnixNanos};

use super::cilium_args::CiliumArgs;
use super::dataplane_args::DataplaneArgs;
use super::start::{self, SourceSide, Sources, StartOptions};
use crate::{
    kernel::{Kernel, Stats},
    output::{Format, Printer},
    realtime,
    watched::WatchedSet,
};

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("targets").required(true).multiple(true))]
pub struct ObserveArgs {
    /// Addresses whose connections to observe (pod IPs), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        group = "targets",
        env = "OBSERVER_WATCH_IP"
    )]
    pub watch_ip: Vec<IpAddr>,
    /// Endpoints (pod IP:port) to observe, comma-separated: their connections,
    /// and this node's dataplane rules and new flows towards them.
    #[arg(
        long,
        value_delimiter = ',',
        group = "targets",
        env = "OBSERVER_WATCH_ENDPOINT"
    )]
    pub watch_endpoint: Vec<SocketAddr>,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, env = "OBSERVER_DURATION")]
    pub duration: Option<u64>,
    /// Output format: human-readable lines or one JSON object per line.
    #[arg(long, value_enum, default_value_t, env = "OBSERVER_OUTPUT")]
    pub output: Format,
    /// Log every kernel event through aya-log at debug level (slow; for debugging).
    #[arg(long, env = "OBSERVER_LOG_KERNEL_EVENTS")]
    pub log_kernel_events: bool,
    /// SCHED_FIFO priority (1-99) of the threads that time dataplane
    /// changes and new flows, so that a busy node does not delay their
    /// times; 0 keeps the normal policy. Needs CAP_SYS_NICE; without it
    /// they run at normal priority, with a warning.
    #[arg(long, default_value_t = realtime::DEFAULT_TIMING_PRIORITY, value_parser = clap::value_parser!(u8).range(0..=99), env = "OBSERVER_TIMING_PRIORITY")]
    pub timing_priority: u8,
    /// How often to check the kernel's counters for lost events, in seconds.
    #[arg(long, default_value_t = 5, env = "OBSERVER_STATS_INTERVAL")]
    pub stats_interval: u64,
    #[command(flatten)]
    pub cilium: CiliumArgs,
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let mut ips: Vec<IpAddr> = args.watch_ip.clone();
    ips.extend(args.watch_endpoint.iter().map(SocketAddr::ip));
    ips.sort();
    ips.dedup();
    let mut watched = WatchedSet::new();
    for endpoint in &args.watch_endpoint {
        watched.watch(*endpoint);
    }
    // Source side: this node's dataplane rules and new flows towards the endpoints.
    let source_side = if args.watch_endpoint.is_empty() {
        SourceSide::Off
    } else {
        SourceSide::Required
    };
    let Sources {
        kernel,
        observations: mut rx,
        conn_reader,
        dataplane: _dataplane,
        flows: _flows,
    } = start::start(StartOptions {
        log_kernel_events: args.log_kernel_events,
        timing_priority: args.timing_priority,
        source_side,
        watch_ips: ips.clone(),
        watch_endpoints: args.watch_endpoint.clone(),
        cilium: args.cilium.options(),
        dataplane: args.dataplane.limits(),
    })?;

    let mut printer = Printer::new(args.output, std::io::stdout().lock());
    let names: Vec<String> = ips.iter().map(ToString::to_string).collect();
    printer.started(UnixNanos::now(), kernel.hooks(), &names)?;
    tracing::info!(watched = ?names, "observing");

    let deadline = async {
        match args.duration {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut stats_tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    let mut last = Stats::default();
    loop {
        tokio::select! {
            obs = rx.recv() => match obs {
                Some(obs) => {
                    if !print(&mut printer, &mut watched, &obs)? {
                        break;
                    }
                }
                None => break,
            },
            _ = stats_tick.tick() => last = report_stats(&kernel, last),
            _ = &mut deadline => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    conn_reader.abort();
    // Events already in the channel were observed: print them before the summary.
    while let Ok(obs) = rx.try_recv() {
        if !print(&mut printer, &mut watched, &obs)? {
            break;
        }
    }
    let stats = kernel.stats()?;
    printer.stopped(UnixNanos::now(), stats)?;
    Ok(())
}

/// Prints `obs` if the watched set passes it; false when the reader of the
/// output is gone (a closed pipe ends `observe` quietly).
fn print(
    printer: &mut Printer<impl std::io::Write>,
    watched: &mut WatchedSet,
    obs: &Observation,
) -> anyhow::Result<bool> {
    if !watched.passes(obs) {
        return Ok(true);
    }
    match printer.observation(obs) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing output"),
    }
}

/// Logs lost events as soon as the counter moves: a full ring buffer means
/// missing evidence, which must never go unnoticed.
fn report_stats(kernel: &Kernel, last: Stats) -> Stats {
    match kernel.stats() {
        Ok(now) => {
            if now.lost > last.lost {
                tracing::warn!(
                    lost = now.lost - last.lost,
                    total_lost = now.lost,
                    "ring buffer full: connection events lost"
                );
            }
            tracing::debug!(
                emitted = now.emitted,
                filtered = now.filtered,
                lost = now.lost,
                "kernel counters"
            );
            now
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read kernel counters");
            last
        }
    }
}
