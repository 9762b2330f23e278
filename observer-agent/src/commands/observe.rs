//! `observer-agent observe`: standalone observation of given addresses,
//! printed as they happen. Needs no aggregator; scripts and tests use it.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    clock::WallClock,
    endpoint_record::EndpointRecords,
    kernel::{Kernel, LoadOptions, Stats, conn_events},
    output::{Format, Printer, now_unix_nanos},
    realtime::{self, TimingPriority},
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
}

/// Capacity of the channel from the sources to the printer: a burst beyond
/// it backs up into the ring buffer, whose overflow the kernel counts.
const CHANNEL_CAPACITY: usize = 4096;

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let mut kernel = Kernel::load(LoadOptions {
        log_events: args.log_kernel_events,
        ..LoadOptions::default()
    })
    .context("loading the eBPF programs")?;

    let mut ips: Vec<IpAddr> = args.watch_ip.clone();
    ips.extend(args.watch_endpoint.iter().map(SocketAddr::ip));
    ips.sort();
    ips.dedup();
    for ip in &ips {
        kernel
            .watch_ip(*ip)
            .with_context(|| format!("watching {ip}"))?;
    }

    let (tx, mut rx) = mpsc::channel(CHANNEL_CAPACITY);
    let ring = kernel
        .take_conn_events()
        .context("connection event ring buffer already taken")?;
    let decoder = conn_events::ConnDecoder::new(WallClock::new(), kernel.reset_reasons().clone());
    let reader = tokio::spawn(conn_events::forward(ring, decoder, tx.clone()));
    // No deletion is known here: flows from now on count as late.
    let mut records = EndpointRecords::new();
    let since = now_unix_nanos();
    // Source side: this node's dataplane rules and new flows towards the endpoints.
    let _source_side = if args.watch_endpoint.is_empty() {
        drop(tx);
        None
    } else {
        let timing = TimingPriority::from_level(args.timing_priority);
        let dataplane =
            realtime::spawn_inheriting(timing, "dataplane", || crate::dataplane::spawn(tx.clone()))
                .context("starting the dataplane detectors")?;
        for endpoint in &args.watch_endpoint {
            let presence = dataplane.watch(*endpoint);
            records.watch(*endpoint, since, presence);
        }
        match crate::dataplane::commit_kprobe::load(kernel.ebpf_mut()) {
            Ok(setup) => {
                if let Some(probe) = setup.kprobe {
                    dataplane.use_commit_kprobe(probe);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ruleset commit probes not loaded"),
        }
        let ebpf = kernel.ebpf_mut();
        let flows = realtime::spawn_inheriting(timing, "flows", || crate::flows::spawn(ebpf, tx))
            .context("starting the conntrack new-flow watch")?;
        Some((dataplane, flows))
    };

    let mut printer = Printer::new(args.output, std::io::stdout().lock());
    let watched: Vec<String> = ips.iter().map(ToString::to_string).collect();
    printer.started(now_unix_nanos(), kernel.hooks(), &watched)?;
    tracing::info!(watched = ?watched, "observing");

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
                    if !records.observe(&obs) {
                        continue;
                    }
                    if let Err(e) = printer.observation(&obs) {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            break;
                        }
                        return Err(e).context("writing output");
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
    reader.abort();
    // Events already in the channel were observed: print them before the summary.
    while let Ok(obs) = rx.try_recv() {
        if records.observe(&obs) {
            printer.observation(&obs)?;
        }
    }
    for record in records.watched() {
        printer.endpoint_record(&record)?;
    }
    let stats = kernel.stats()?;
    printer.stopped(now_unix_nanos(), stats)?;
    Ok(())
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
