//! `observer-agent run`: the DaemonSet mode. Learns from the aggregator
//! which endpoints are terminating, keeps the kernel map and the dataplane
//! detectors in sync with that set, and reports every observation.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use observer_proto::Endpoint;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    clock::WallClock,
    dataplane::{self, DataplaneWatch},
    flows::{self, FlowWatch},
    health::{self, Health},
    kernel::{Kernel, LoadOptions, conn_events, probe},
    observation::Observation,
    realtime::{self, TimingPriority},
    report::{self, KernelCounters, ReporterConfig, WatchUpdate},
};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// gRPC URL of the aggregator.
    #[arg(long, env = "OBSERVER_AGGREGATOR")]
    pub aggregator: String,
    /// This node's Kubernetes name (downward API `spec.nodeName`).
    #[arg(long, env = "OBSERVER_NODE_NAME")]
    pub node_name: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9464", env = "OBSERVER_HEALTH_ADDR")]
    pub health_addr: SocketAddr,
    /// Observations kept at most while the aggregator is unreachable; beyond
    /// that the oldest are dropped and counted.
    #[arg(long, default_value_t = 100_000, env = "OBSERVER_BUFFER_CAPACITY")]
    pub buffer_capacity: usize,
    /// How often to read the kernel's counters, in seconds.
    #[arg(long, default_value_t = 5, env = "OBSERVER_STATS_INTERVAL")]
    pub stats_interval: u64,
    /// Log every kernel event through aya-log at debug level (slow; for debugging).
    #[arg(long, env = "OBSERVER_LOG_KERNEL_EVENTS")]
    pub log_kernel_events: bool,
    /// SCHED_FIFO priority (1-99) of the threads that time dataplane
    /// changes and new flows, so that a busy node does not delay their
    /// times; 0 keeps the normal policy. Needs CAP_SYS_NICE; without it
    /// they run at normal priority, with a warning.
    #[arg(long, default_value_t = realtime::DEFAULT_TIMING_PRIORITY, value_parser = clap::value_parser!(u8).range(0..=99), env = "OBSERVER_TIMING_PRIORITY")]
    pub timing_priority: u8,
}

const CHANNEL_CAPACITY: usize = 4096;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let health = Health::new();
    let listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .with_context(|| format!("binding the health endpoint on {}", args.health_addr))?;
    tokio::spawn(health::serve(listener, health.clone()));

    let mut kernel = Kernel::load(LoadOptions {
        log_events: args.log_kernel_events,
        ..LoadOptions::default()
    })
    .context("loading the eBPF programs")?;
    for hook in kernel.hooks() {
        health.set_hook(&hook.name, hook.attached);
    }
    let mut capabilities = probe::probe_kernel();
    capabilities.extend(probe::hook_capabilities(kernel.hooks()));
    capabilities.push(probe::resets_without_socket_capability(kernel.layout()));
    capabilities.push(probe::delivery_capability(kernel.delivery()));
    for c in capabilities.iter().filter(|c| !c.available) {
        if c.required {
            tracing::error!(capability = %c.name, reason = %c.detail, cost = c.cost, "required capability missing: the agent stays not ready");
        } else {
            tracing::warn!(capability = %c.name, reason = %c.detail, cost = c.cost, "capability missing");
        }
    }
    // Readiness says whether this node is measured at all: a required
    // capability missing keeps the pod not ready (`observer-agent probe`
    // names it), while the agent still reports what it can.
    let complete = probe::all_required_available(&capabilities);

    let (obs_tx, mut obs_rx) = mpsc::channel::<Observation>(CHANNEL_CAPACITY);
    let ring = kernel
        .take_conn_events()
        .context("connection event ring buffer already taken")?;
    let decoder = conn_events::ConnDecoder::new(WallClock::new(), kernel.reset_reasons().clone());
    let conn_reader = tokio::spawn(conn_events::forward(ring, decoder, obs_tx.clone()));
    // Source-side detectors degrade rather than stop the agent: the
    // destination side still works without them.
    let timing = TimingPriority::from_level(args.timing_priority);
    let dataplane = match realtime::spawn_inheriting(timing, "dataplane", || {
        dataplane::spawn(obs_tx.clone())
    }) {
        Ok(watch) => {
            // Exact kernel commit times where kprobes exist; the netlink
            // path times changes otherwise.
            match dataplane::commit_probe::load(kernel.ebpf_mut()) {
                Ok(setup) => {
                    if let Some(probe) = setup.probe {
                        watch.use_commit_probe(probe);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ruleset commit probes not loaded"),
            }
            Some(watch)
        }
        Err(e) => {
            tracing::error!(error = %e, "dataplane rule detection unavailable on this node");
            None
        }
    };
    let ebpf = kernel.ebpf_mut();
    let _flows: Option<FlowWatch> =
        match realtime::spawn_inheriting(timing, "flows", || flows::spawn(ebpf, obs_tx.clone())) {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::error!(error = %e, "new-flow observation unavailable on this node");
                None
            }
        };
    drop(obs_tx);

    let counters = Arc::new(KernelCounters::default());
    let mut cfg = ReporterConfig::new(args.aggregator.clone(), args.node_name.clone());
    cfg.kernel_release = kernel_release();
    cfg.capabilities = capabilities;
    cfg.buffer_capacity = args.buffer_capacity;
    cfg.counters = counters.clone();
    let (report_tx, report_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (watch_tx, mut watch_rx) = mpsc::channel(1024);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let reporter = tokio::spawn(report::run(cfg, report_rx, watch_tx, async {
        let _ = stop_rx.await;
    }));
    health.set_ready(complete);
    tracing::info!(node = %args.node_name, aggregator = %args.aggregator, "agent running");

    let mut watched = Watched::default();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    loop {
        tokio::select! {
            obs = obs_rx.recv() => match obs {
                Some(obs) => {
                    // Updates the endpoint's record; false: a flow to no watched endpoint.
                    if !health.records().observe(&obs) {
                        continue;
                    }
                    health.observed(&obs);
                    if report_tx.send(obs).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            update = watch_rx.recv() => match update {
                Some(update) => {
                    watched.apply(&update, &mut kernel, dataplane.as_ref(), &health);
                    health.set_watched(watched.len());
                }
                None => break,
            },
            _ = tick.tick() => {
                health.beat();
                match kernel.stats() {
                    Ok(stats) => {
                        let lost = health.kernel_stats(stats);
                        if lost > 0 {
                            tracing::warn!(lost, total_lost = stats.lost, "ring buffer full: connection events lost");
                        }
                        counters.events_lost.store(stats.lost, Ordering::Relaxed);
                        counters.events_filtered.store(stats.filtered, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read kernel counters"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    health.set_ready(false);
    conn_reader.abort();
    drop(report_tx);
    let _ = stop_tx.send(());
    let summary = reporter
        .await
        .context("reporter task failed")?
        .context("reporter")?;
    tracing::info!(?summary, "agent stopped");
    Ok(())
}

/// The watched endpoints: an address stays in the kernel map while any of
/// its endpoints is watched.
#[derive(Default)]
struct Watched {
    by_pod: HashMap<String, Endpoint>,
    ip_refs: HashMap<IpAddr, usize>,
}

impl Watched {
    fn len(&self) -> usize {
        self.by_pod.len()
    }

    fn apply(
        &mut self,
        update: &WatchUpdate,
        kernel: &mut Kernel,
        dataplane: Option<&DataplaneWatch>,
        health: &Health,
    ) {
        match update {
            WatchUpdate::Add(ep) => {
                if self.by_pod.insert(ep.pod_uid.clone(), ep.clone()).is_some() {
                    return;
                }
                let refs = self.ip_refs.entry(ep.ip).or_default();
                *refs += 1;
                if *refs == 1
                    && let Err(e) = kernel.watch_ip(ep.ip)
                {
                    tracing::error!(error = %e, pod = %ep.pod_name, "cannot watch endpoint in the kernel");
                }
                for port in &ep.ports {
                    let endpoint = SocketAddr::new(ep.ip, *port);
                    let presence = dataplane.and_then(|dp| dp.watch(endpoint));
                    let t0 = ep.deletion_start_unix_nanos;
                    health.records().watch(endpoint, t0, presence);
                }
                tracing::info!(pod = %ep.pod_name, namespace = %ep.namespace, ip = %ep.ip, "watching terminating endpoint");
            }
            WatchUpdate::Remove(ep) => {
                let Some(ep) = self.by_pod.remove(&ep.pod_uid) else {
                    return;
                };
                if let Some(refs) = self.ip_refs.get_mut(&ep.ip) {
                    *refs -= 1;
                    if *refs == 0 {
                        self.ip_refs.remove(&ep.ip);
                        if let Err(e) = kernel.unwatch_ip(ep.ip) {
                            tracing::warn!(error = %e, ip = %ep.ip, "cannot unwatch endpoint in the kernel");
                        }
                    }
                }
                for port in &ep.ports {
                    let endpoint = SocketAddr::new(ep.ip, *port);
                    if let Some(dp) = dataplane {
                        dp.unwatch(endpoint);
                    }
                    if let Some(r) = health.records().unwatch(&endpoint) {
                        tracing::info!(record = ?r, "endpoint record finished");
                    }
                }
            }
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
