//! The aggregator service. See docs/api.md for its APIs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aggregator::config::{Settings, check_probability};
use aggregator::limits::Limits;
use aggregator::store::Store;
use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Correlates agent reports with Kubernetes pod deletions and recommends a preStop delay"
)]
struct Args {
    /// Address of the agent gRPC service (prestop.observer.v1 and grpc.health.v1).
    #[arg(long, env = "AGGREGATOR_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    grpc_addr: String,
    /// Address of the HTTP API: /v1/recommendations, /v1/deletions, /healthz, /readyz, /metrics, /openapi.json.
    #[arg(long, env = "AGGREGATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: String,
    /// SQLite file holding finished deletions (created if missing).
    #[arg(
        long,
        env = "AGGREGATOR_STORE",
        default_value = "/var/lib/prestop-aggregator/store.db"
    )]
    store: PathBuf,
    /// Cluster name reported in recommendations.
    #[arg(long, env = "AGGREGATOR_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
    /// How long measurements are kept and used (e.g. 7d, 12h).
    #[arg(long, env = "AGGREGATOR_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// A deletion whose nodes have not all reported by then is finished: a
    /// node whose agent was healthy and saw no removal is still routing
    /// (the deletion ranks above every measured one in the bound), a node
    /// without information is unknown (it lowers coverage).
    #[arg(long, env = "AGGREGATOR_COMPLETION_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    completion_timeout: Duration,
    /// How long a deletion stays open after its pod is gone, to catch
    /// requests lost at shutdown (keep-alive connections the pod closed).
    #[arg(long, env = "AGGREGATOR_SHUTDOWN_LINGER", default_value = "3s", value_parser = humantime::parse_duration)]
    shutdown_linger: Duration,
    /// How often the in-flight state (per-node observations of deletions in
    /// flight, agents' batch sequences) is checkpointed to the store; agents
    /// are acknowledged up to the last checkpoint and resend the rest after
    /// a crash.
    #[arg(long, env = "AGGREGATOR_CHECKPOINT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    checkpoint_interval: Duration,
    /// Seconds added to the latency bound before rounding up.
    #[arg(long, env = "AGGREGATOR_MARGIN_SECONDS", default_value_t = 1.0)]
    margin_seconds: f64,
    /// Default quantile of full-propagation latency to cover (0..1).
    #[arg(long, env = "AGGREGATOR_QUANTILE", default_value_t = 0.99)]
    quantile: f64,
    /// Default confidence of the upper bound on that quantile (0..1).
    #[arg(long, env = "AGGREGATOR_CONFIDENCE", default_value_t = 0.95)]
    confidence: f64,
    /// Below this share of expected node-deletions measured (0..1), a
    /// recommendation is low-confidence and says why.
    #[arg(long, env = "AGGREGATOR_MIN_COVERAGE", default_value_t = 0.9)]
    min_coverage: f64,
    /// How far agents' clock-corrected times may err beyond their measured
    /// uncertainty before an observation is refused as implausible (in the
    /// future, or before its deletion's start minus the grace period).
    #[arg(long, env = "AGGREGATOR_CLOCK_TOLERANCE", default_value = "2s", value_parser = humantime::parse_duration)]
    clock_tolerance: Duration,
    /// Agents whose clock offset from the aggregator exceeds this have their
    /// observations refused (counted in prestop_observations_rejected_total).
    #[arg(long, env = "AGGREGATOR_MAX_CLOCK_OFFSET", default_value = "60s", value_parser = humantime::parse_duration)]
    max_clock_offset: Duration,
    /// Run without Kubernetes (no watchers; useful with a store only).
    #[arg(long, env = "AGGREGATOR_NO_KUBE", value_parser = clap::builder::BoolishValueParser::new())]
    no_kube: bool,
    #[command(flatten, next_help_heading = "Limits on agents")]
    limits: Limits,
}

fn main() -> anyhow::Result<()> {
    aggregator::app::runtime()
        .context("starting the tokio runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    check_probability("--quantile", a.quantile).map_err(anyhow::Error::msg)?;
    check_probability("--confidence", a.confidence).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        a.margin_seconds.is_finite() && a.margin_seconds >= 0.0,
        "--margin-seconds must be a non-negative number"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.min_coverage),
        "--min-coverage must be between 0 and 1, got {}",
        a.min_coverage
    );
    anyhow::ensure!(
        !a.checkpoint_interval.is_zero(),
        "--checkpoint-interval must be positive"
    );
    if let Some(dir) = a.store.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Held until the process exits.
    let _lock = aggregator::store_lock::lock(&a.store)?;
    let store =
        Store::open(&a.store).with_context(|| format!("opening store {}", a.store.display()))?;
    let grpc = tokio::net::TcpListener::bind(&a.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", a.grpc_addr))?;
    let http = tokio::net::TcpListener::bind(&a.http_addr)
        .await
        .with_context(|| format!("binding --http-addr {}", a.http_addr))?;
    let kube = if a.no_kube {
        None
    } else {
        Some(
            kube::Client::try_default()
                .await
                .context("Kubernetes client (in-cluster config or KUBECONFIG)")?,
        )
    };
    let settings = Settings {
        cluster_name: a.cluster_name,
        quantile: a.quantile,
        confidence: a.confidence,
        margin_seconds: a.margin_seconds,
        retention: a.retention,
        completion_timeout: a.completion_timeout,
        shutdown_linger: a.shutdown_linger,
        checkpoint_interval: a.checkpoint_interval,
        min_coverage: a.min_coverage,
        clock_tolerance: a.clock_tolerance,
        max_clock_offset: a.max_clock_offset,
        limits: a.limits,
    };
    let running = aggregator::app::start(settings, Arc::new(store), grpc, http, kube)
        .with_context(|| format!("starting with store {}", a.store.display()))?;
    tracing::info!(grpc = %running.grpc_addr, http = %running.http_addr, "aggregator started");
    shutdown_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
