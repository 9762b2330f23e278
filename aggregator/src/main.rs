//! The aggregator service. See docs/api.md for its APIs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aggregator::auth::agent::ServiceAccount;
use aggregator::auth::review::ReviewSettings;
use aggregator::auth::tls::TlsFiles;
use aggregator::auth::{AuthSettings, CacheSettings, TokenSettings};
use aggregator::config::{Settings, check_probability};
use aggregator::drain::DrainSettings;
use aggregator::limits::Limits;
use aggregator::startup::{StartupSettings, Thresholds};
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
    /// Needs --insecure-no-auth: tokens are checked by the API server.
    #[arg(long, env = "AGGREGATOR_NO_KUBE", value_parser = clap::builder::BoolishValueParser::new())]
    no_kube: bool,
    #[command(flatten, next_help_heading = "Limits on agents and drains")]
    limits: Limits,
    #[command(flatten, next_help_heading = "Adaptive drain (/v1/drain)")]
    drain: DrainSettings,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten, next_help_heading = "New pods' startup")]
    startup: StartupArgs,
}

/// New pods' startup windows: see docs/api.md (`GET /v1/startup`).
#[derive(Debug, clap::Args)]
struct StartupArgs {
    /// How long after an endpoint turns ready (T_ready) its refused
    /// connections count and nodes' additions are awaited; agents watch it
    /// that long plus --startup-settle.
    #[arg(long, env = "AGGREGATOR_STARTUP_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    startup_window: Duration,
    /// How long a window stays open past its end for reports in flight, and
    /// how far before T_ready a node's addition may lie.
    #[arg(long, env = "AGGREGATOR_STARTUP_SETTLE", default_value = "2s", value_parser = humantime::parse_duration)]
    startup_settle: Duration,
    /// Startup windows open at once at most; further new pods are not
    /// watched (prestop_startup_not_watched_total). Agents' watched-address
    /// map holds 16384 addresses, shared with terminating pods.
    #[arg(long, env = "AGGREGATOR_STARTUP_MAX_WATCHED", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(0..=16384))]
    startup_max_watched: u64,
    /// A workload gets a startup finding when at least this many of its new
    /// pods refused connections after ready...
    #[arg(
        long,
        env = "AGGREGATOR_STARTUP_MIN_REFUSING_PODS",
        default_value_t = 1
    )]
    startup_min_refusing_pods: u64,
    /// ...and they refused at least this many connections in all.
    #[arg(
        long,
        env = "AGGREGATOR_STARTUP_MIN_REFUSED_CONNECTIONS",
        default_value_t = 1
    )]
    startup_min_refused_connections: u64,
}

impl StartupArgs {
    fn settings(&self) -> anyhow::Result<StartupSettings> {
        anyhow::ensure!(
            !self.startup_window.is_zero(),
            "--startup-window must be positive"
        );
        Ok(StartupSettings {
            window: self.startup_window,
            settle: self.startup_settle,
            max_watched: usize::try_from(self.startup_max_watched)?,
            thresholds: Thresholds {
                min_refusing_pods: self.startup_min_refusing_pods,
                min_refused_connections: self.startup_min_refused_connections,
            },
            ..StartupSettings::default()
        })
    }
}

/// Who may connect: see docs/deploy.md ("Tokens and certificates").
#[derive(Debug, clap::Args)]
struct AuthArgs {
    /// PEM certificate (chain) of the gRPC server, e.g. a mounted
    /// kubernetes.io/tls Secret's tls.crt. Required unless --insecure-no-auth.
    #[arg(long, env = "AGGREGATOR_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file (the Secret's tls.key).
    #[arg(long, env = "AGGREGATOR_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Audience agents' and readers' tokens must be issued for (the
    /// projected token volume's `audience`); checked by TokenReview.
    #[arg(
        long,
        env = "AGGREGATOR_TOKEN_AUDIENCE",
        default_value = "prestop-aggregator"
    )]
    token_audience: String,
    /// The agents' ServiceAccount, NAMESPACE:NAME: only its tokens may
    /// register, and each only for the node of the pod it is bound to.
    #[arg(
        long,
        env = "AGGREGATOR_AGENT_SERVICE_ACCOUNT",
        default_value = "prestop-system:prestop-agent"
    )]
    agent_service_account: ServiceAccount,
    /// Namespace of the access checks of HTTP readers: `get` on
    /// `deletions` (and `recommendations`) of API group
    /// observer.prestop.dev in this namespace (grant it with a Role).
    #[arg(long, env = "AGGREGATOR_NAMESPACE", default_value = "prestop-system")]
    namespace: String,
    /// Require a token with `get recommendations` for /v1/recommendations
    /// too (by default it is open to anyone who can reach the port).
    #[arg(long, env = "AGGREGATOR_PROTECT_RECOMMENDATIONS", value_parser = clap::builder::BoolishValueParser::new())]
    protect_recommendations: bool,
    /// A TokenReview or SubjectAccessReview not answered by then refuses
    /// the caller (Unavailable / 503): an API server outage never lets
    /// anyone in.
    #[arg(long, env = "AGGREGATOR_TOKEN_REVIEW_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    token_review_timeout: Duration,
    /// How long a review's answer is reused (well under the tokens'
    /// lifetime: a deleted agent pod's token works at most this long).
    #[arg(long, env = "AGGREGATOR_TOKEN_CACHE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    token_cache_ttl: Duration,
    /// Accept every caller without a token (and gRPC without TLS when no
    /// certificate is given): local development only; logged loudly.
    #[arg(long, env = "AGGREGATOR_INSECURE_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_no_auth: bool,
}

impl AuthArgs {
    fn settings(self) -> anyhow::Result<AuthSettings> {
        let tls = match (self.tls_cert_file, self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        if self.insecure_no_auth {
            tracing::warn!("--insecure-no-auth: agents and readers are NOT authenticated");
            return Ok(AuthSettings { tokens: None, tls });
        }
        anyhow::ensure!(
            tls.is_some(),
            "--tls-cert-file and --tls-key-file are required (agents send their tokens only over TLS); --insecure-no-auth for local development"
        );
        anyhow::ensure!(
            !self.token_cache_ttl.is_zero() && self.token_cache_ttl < Duration::from_secs(600),
            "--token-cache-ttl must be between 0 and 10 minutes (the shortest token lifetime), got {:?}",
            self.token_cache_ttl
        );
        Ok(AuthSettings {
            tokens: Some(TokenSettings {
                review: ReviewSettings {
                    audience: self.token_audience,
                    timeout: self.token_review_timeout,
                    cache: CacheSettings {
                        ttl: self.token_cache_ttl,
                        ..CacheSettings::default()
                    },
                },
                agents: self.agent_service_account,
                namespace: self.namespace,
                protect_recommendations: self.protect_recommendations,
            }),
            tls,
        })
    }
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
            kube::Config::infer()
                .await
                .context("Kubernetes configuration (in-cluster or KUBECONFIG)")?,
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
        drain: a.drain,
        auth: a.auth.settings()?,
        startup: a.startup.settings()?,
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
