//! `observer-agent run`: the DaemonSet mode. Learns from the aggregator
//! which endpoints are terminating or new (in their startup window), keeps
//! the kernel map and the dataplane detectors in sync with that set, and
//! reports every observation.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use observer_proto::{Endpoint, NewEndpoint, Observation};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::cilium_args::CiliumArgs;
use super::dataplane_args::DataplaneArgs;
use super::start::{self, CHANNEL_CAPACITY, SourceSide, Sources, StartOptions};
use crate::{
    dataplane::DataplaneWatch,
    flows::FlowWatch,
    health::{self, Health},
    kernel::{Kernel, capabilities},
    realtime,
    report::{self, KernelCounters, ReporterConfig, WatchUpdate},
    watched::WatchedSet,
};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// gRPC URL of the aggregator; `https://` verifies its certificate
    /// against --ca-file.
    #[arg(long, env = "OBSERVER_AGGREGATOR")]
    pub aggregator: String,
    /// Projected ServiceAccount token (audience: the aggregator's
    /// --token-audience) sent with every call; re-read at each call, as the
    /// kubelet rotates it. Without it no token is sent (an aggregator with
    /// --insecure-no-auth only).
    #[arg(long, env = "OBSERVER_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM CA certificate the aggregator's TLS certificate must chain to.
    #[arg(long, env = "OBSERVER_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// This node's Kubernetes name (downward API `spec.nodeName`).
    #[arg(long, env = "OBSERVER_NODE_NAME")]
    pub node_name: String,
    /// Address of /healthz, /readyz and /metrics: IP:PORT, [IPv6]:PORT, or
    /// a bare IP (port 9464). With the host network, the kubelet's probes
    /// and Prometheus reach the pod IP (the node's), so the DaemonSet binds
    /// `$(POD_IP)` from the downward API; the default keeps it off every
    /// other interface.
    #[arg(long, default_value = "127.0.0.1:9464", env = "OBSERVER_HEALTH_ADDR", value_parser = health::parse_addr)]
    pub health_addr: SocketAddr,
    /// Observations kept at most while the aggregator is unreachable; beyond
    /// that the oldest are dropped and counted.
    #[arg(long, default_value_t = 100_000, env = "OBSERVER_BUFFER_CAPACITY")]
    pub buffer_capacity: usize,
    /// How often to read the kernel's counters, in seconds.
    #[arg(long, default_value_t = 5, env = "OBSERVER_STATS_INTERVAL")]
    pub stats_interval: u64,
    #[command(flatten)]
    pub cilium: CiliumArgs,
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
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

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let health = Health::new();
    let listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .with_context(|| format!("binding the health endpoint on {}", args.health_addr))?;
    tokio::spawn(health::serve(listener, health.clone()));

    let Sources {
        mut kernel,
        observations: mut obs_rx,
        conn_reader,
        dataplane,
        flows,
    } = start::start(StartOptions {
        log_kernel_events: args.log_kernel_events,
        timing_priority: args.timing_priority,
        source_side: SourceSide::Degraded,
        watch_ips: Vec::new(),
        watch_endpoints: Vec::new(),
        cilium: args.cilium.options(),
        dataplane: args.dataplane.limits(),
    })?;
    for hook in kernel.hooks() {
        health.set_hook(&hook.name, hook.attached);
    }

    let table = capability_table(&kernel, dataplane.as_ref());
    let complete = log_missing_capabilities(&table);
    let Reporter {
        counters,
        observations: report_tx,
        mut watch_updates,
        stop: stop_tx,
        task: reporter,
    } = start_reporter(&args, table);
    health.set_started();
    health.set_ready(complete);
    tracing::info!(node = %args.node_name, aggregator = %args.aggregator, "agent running");

    let mut watched = Watched::default();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    loop {
        tokio::select! {
            obs = obs_rx.recv() => match obs {
                Some(obs) => {
                    if !watched.endpoints.passes(&obs) {
                        health.flow_not_watched();
                        continue;
                    }
                    health.observed(&obs);
                    if report_tx.send(obs).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            update = watch_updates.recv() => match update {
                Some(update) => {
                    watched.apply(&update, &mut kernel, dataplane.as_ref());
                    health.set_watched(watched.len());
                }
                None => break,
            },
            _ = tick.tick() => {
                health.beat();
                read_kernel_counters(&kernel, flows.as_ref(), &health, &counters);
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

/// The running client of the aggregator and its channels.
struct Reporter {
    counters: Arc<KernelCounters>,
    observations: mpsc::Sender<Observation>,
    watch_updates: mpsc::Receiver<WatchUpdate>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<report::Summary, report::ReportError>>,
}

fn start_reporter(args: &RunArgs, capabilities: Vec<capabilities::Capability>) -> Reporter {
    let counters = Arc::new(KernelCounters::default());
    let mut cfg = ReporterConfig::new(args.aggregator.clone(), args.node_name.clone());
    cfg.credentials = report::Credentials {
        token_file: args.token_file.clone(),
        ca_file: args.ca_file.clone(),
    };
    cfg.kernel_release = kernel_release();
    cfg.capabilities = capabilities;
    cfg.buffer_capacity = args.buffer_capacity;
    cfg.counters = counters.clone();
    let (observations, report_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (watch_tx, watch_updates) = mpsc::channel(1024);
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(report::run(cfg, report_rx, watch_tx, async {
        let _ = stop_rx.await;
    }));
    Reporter {
        counters,
        observations,
        watch_updates,
        stop,
        task,
    }
}

/// What `observer-agent probe` would print, with this run's hooks and
/// delivery: registered with the aggregator.
fn capability_table(
    kernel: &Kernel,
    dataplane: Option<&DataplaneWatch>,
) -> Vec<capabilities::Capability> {
    let mut table = capabilities::probe_kernel();
    table.extend(capabilities::hook_capabilities(kernel.hooks()));
    if let Some(dataplane) = dataplane {
        table.extend(capabilities::commit_timing_capabilities(
            dataplane.commit_timing(),
        ));
    }
    table.push(capabilities::resets_without_socket_capability(
        kernel.layout(),
    ));
    table.push(capabilities::delivery_capability(kernel.delivery()));
    table
}

/// Logs each missing capability with what it costs; returns whether every
/// required one is there. Readiness follows it: a required capability
/// missing keeps the pod not ready (`observer-agent probe` names it), while
/// the agent still reports what it can.
fn log_missing_capabilities(table: &[capabilities::Capability]) -> bool {
    for c in table.iter().filter(|c| !c.available) {
        if c.required {
            tracing::error!(capability = %c.name, reason = %c.detail, cost = c.cost, "required capability missing: the agent stays not ready");
        } else {
            tracing::warn!(capability = %c.name, reason = %c.detail, cost = c.cost, "capability missing");
        }
    }
    capabilities::all_required_available(table)
}

/// Moves the kernel's counters into the health metrics and the reports:
/// the events lost are the ring buffer's and the conntrack socket's
/// overflows, either of which leaves a gap in this node's evidence.
fn read_kernel_counters(
    kernel: &Kernel,
    flows: Option<&FlowWatch>,
    health: &Health,
    counters: &KernelCounters,
) {
    let conntrack = flows.map_or(0, FlowWatch::overflows);
    match kernel.stats() {
        Ok(stats) => {
            let lost = health.kernel_stats(stats);
            if lost > 0 {
                tracing::warn!(
                    lost,
                    total_lost = stats.lost,
                    "ring buffer full: connection events lost"
                );
            }
            counters
                .events_lost
                .store(stats.lost + conntrack, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read kernel counters"),
    }
}

/// The watched endpoints: an address stays in the kernel map while any
/// terminating or new pod of it is watched, an endpoint in the dataplane
/// detectors and the [`WatchedSet`] while any of them names it.
#[derive(Default)]
struct Watched {
    by_pod: HashMap<String, Endpoint>,
    /// New pods in their startup window.
    new_by_pod: HashMap<String, NewEndpoint>,
    ip_refs: HashMap<IpAddr, usize>,
    endpoints: WatchedSet,
}

impl Watched {
    fn len(&self) -> usize {
        self.by_pod.len() + self.new_by_pod.len()
    }

    fn apply(
        &mut self,
        update: &WatchUpdate,
        kernel: &mut Kernel,
        dataplane: Option<&DataplaneWatch>,
    ) {
        match update {
            WatchUpdate::Add(ep) => {
                if self.by_pod.insert(ep.pod_uid.clone(), ep.clone()).is_none() {
                    self.watch(ep.ip, &ep.ports, kernel, dataplane, |dp, endpoint| {
                        dp.watch_deleted(endpoint, ep.deletion_start);
                    });
                    tracing::info!(pod = %ep.pod_name, namespace = %ep.namespace, ip = %ep.ip, "watching terminating endpoint");
                }
            }
            WatchUpdate::Remove(ep) => {
                if let Some(ep) = self.by_pod.remove(&ep.pod_uid) {
                    self.unwatch(ep.ip, &ep.ports, kernel, dataplane);
                    tracing::info!(pod = %ep.pod_name, namespace = %ep.namespace, ip = %ep.ip, "endpoint no longer watched");
                }
            }
            WatchUpdate::AddNew(ep) => {
                if self
                    .new_by_pod
                    .insert(ep.pod_uid.clone(), ep.clone())
                    .is_none()
                {
                    self.watch(ep.ip, &ep.ports, kernel, dataplane, |dp, endpoint| {
                        dp.watch_added(endpoint);
                    });
                    tracing::info!(pod = %ep.pod_name, namespace = %ep.namespace, ip = %ep.ip, "watching new endpoint's startup");
                }
            }
            WatchUpdate::RemoveNew(ep) => {
                if let Some(ep) = self.new_by_pod.remove(&ep.pod_uid) {
                    self.unwatch(ep.ip, &ep.ports, kernel, dataplane);
                    tracing::info!(pod = %ep.pod_name, namespace = %ep.namespace, ip = %ep.ip, "new endpoint's startup window ended");
                }
            }
        }
    }

    /// One more watch of `ip` and its `ports`; `first` tells the detectors
    /// of each endpoint no other watch names yet.
    fn watch(
        &mut self,
        ip: IpAddr,
        ports: &[u16],
        kernel: &mut Kernel,
        dataplane: Option<&DataplaneWatch>,
        first: impl Fn(&DataplaneWatch, SocketAddr),
    ) {
        let refs = self.ip_refs.entry(ip).or_default();
        *refs += 1;
        if *refs == 1
            && let Err(e) = kernel.watch_ip(ip)
        {
            tracing::error!(error = %e, %ip, "cannot watch endpoint in the kernel");
        }
        for port in ports {
            let endpoint = SocketAddr::new(ip, *port);
            if self.endpoints.watch(endpoint)
                && let Some(dp) = dataplane
            {
                first(dp, endpoint);
            }
        }
    }

    fn unwatch(
        &mut self,
        ip: IpAddr,
        ports: &[u16],
        kernel: &mut Kernel,
        dataplane: Option<&DataplaneWatch>,
    ) {
        if let Some(refs) = self.ip_refs.get_mut(&ip) {
            *refs -= 1;
            if *refs == 0 {
                self.ip_refs.remove(&ip);
                if let Err(e) = kernel.unwatch_ip(ip) {
                    tracing::warn!(error = %e, %ip, "cannot unwatch endpoint in the kernel");
                }
            }
        }
        for port in ports {
            let endpoint = SocketAddr::new(ip, *port);
            if self.endpoints.unwatch(endpoint)
                && let Some(dp) = dataplane
            {
                dp.unwatch(endpoint);
            }
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
