//! prestop-admission: see the library's documentation and docs/admission.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use prestop_admission::cache::{self, Recommendations};
use prestop_admission::inject;
use prestop_admission::routes::Routes;
use prestop_admission::server::{self, Webhook};
use prestop_admission::tls::{self, TlsListener};
use prestop_check::recommendation::{Access, HttpSource};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of the HTTPS endpoint the API server calls.
    #[arg(
        long,
        env = "PRESTOP_ADMISSION_LISTEN_ADDR",
        default_value = "0.0.0.0:8443"
    )]
    listen_addr: SocketAddr,

    /// PEM serving certificate chain (a kubernetes.io/tls Secret's tls.crt);
    /// its CA is the webhook configurations' caBundle.
    #[arg(long, env = "PRESTOP_ADMISSION_TLS_CERT_FILE")]
    tls_cert_file: PathBuf,

    /// PEM private key of --tls-cert-file (the Secret's tls.key).
    #[arg(long, env = "PRESTOP_ADMISSION_TLS_KEY_FILE")]
    tls_key_file: PathBuf,

    /// Base URL of the aggregator's HTTP API.
    #[arg(long, env = "PRESTOP_AGGREGATOR")]
    aggregator: String,

    /// PEM CA certificates an https:// --aggregator must chain to.
    #[arg(long, env = "PRESTOP_AGGREGATOR_CA_FILE")]
    aggregator_ca_file: Option<PathBuf>,

    /// A ServiceAccount token for the aggregator (--protect-recommendations),
    /// read again at every refresh: projected tokens rotate.
    #[arg(long, env = "PRESTOP_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// How often the recommendations are copied from the aggregator.
    #[arg(long, env = "PRESTOP_ADMISSION_REFRESH_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    refresh_interval: Duration,

    /// Timeout of each request to the aggregator.
    #[arg(long, env = "PRESTOP_AGGREGATOR_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    aggregator_timeout: Duration,

    /// Quantile of propagation latency to cover, in (0, 1) (aggregator
    /// default when unset).
    #[arg(long, env = "PRESTOP_QUANTILE")]
    quantile: Option<f64>,

    /// Confidence of the bound, in (0, 1) (aggregator default when unset).
    #[arg(long, env = "PRESTOP_CONFIDENCE")]
    confidence: Option<f64>,

    /// Seconds the apps need after SIGTERM to finish in-flight work; grace
    /// periods must hold preStop plus this.
    #[arg(long, env = "PRESTOP_DRAIN_SECONDS", default_value_t = 0.0)]
    drain_seconds: f64,

    /// Whether the cluster has the preStop sleep action (Kubernetes 1.30
    /// and later): `auto` asks the API server's version at start; without
    /// it inject mode writes `exec sleep` where the image has a shell.
    #[arg(long, env = "PRESTOP_SLEEP_ACTION", value_enum, default_value = "auto")]
    sleep_action: SleepAction,

    /// The prestop-drain image whose init container copies the binary into
    /// pods of namespaces labelled observer.prestop.dev/inject=adaptive-drain
    /// (path /mutate/adaptive-drain).
    #[arg(long, env = "PRESTOP_ADAPTIVE_DRAIN_IMAGE", default_value = DRAIN_IMAGE)]
    adaptive_drain_image: String,

    /// The aggregator's HTTP API as those pods reach it (plain http://, as
    /// prestop-drain speaks it).
    #[arg(
        long,
        env = "PRESTOP_ADAPTIVE_DRAIN_AGGREGATOR",
        default_value = "http://prestop-aggregator.prestop-system.svc:8080"
    )]
    adaptive_drain_aggregator: String,

    /// Audience of the pods' projected token: the aggregator's
    /// --token-audience.
    #[arg(
        long,
        env = "PRESTOP_ADAPTIVE_DRAIN_AUDIENCE",
        default_value = "prestop-aggregator"
    )]
    adaptive_drain_audience: String,

    /// prestop-drain --max: the longest the aggregator may hold a pod's
    /// preStop (whole seconds); grace periods are raised to hold it.
    #[arg(long, env = "PRESTOP_ADAPTIVE_DRAIN_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    adaptive_drain_max: Duration,
}

/// The prestop-drain image of this release.
const DRAIN_IMAGE: &str = concat!(
    "ghcr.io/prestop-observer/prestop-drain:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SleepAction {
    Auto,
    Available,
    Unavailable,
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
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
    anyhow::ensure!(
        a.drain_seconds.is_finite() && a.drain_seconds >= 0.0,
        "--drain-seconds must be a non-negative number, got {}",
        a.drain_seconds
    );
    anyhow::ensure!(
        !a.refresh_interval.is_zero(),
        "--refresh-interval must be positive"
    );
    anyhow::ensure!(
        a.adaptive_drain_max.as_secs() > 0 && a.adaptive_drain_max.subsec_nanos() == 0,
        "--adaptive-drain-max must be whole seconds, at least 1s, got {:?}",
        a.adaptive_drain_max
    );
    anyhow::ensure!(
        a.adaptive_drain_aggregator.starts_with("http://"),
        "--adaptive-drain-aggregator must be an http:// URL (prestop-drain speaks plain HTTP), got {}",
        a.adaptive_drain_aggregator
    );
    let tls = tls::server_config(&a.tls_cert_file, &a.tls_key_file)?;
    let ca_pem = a
        .aggregator_ca_file
        .as_ref()
        .map(|p| {
            std::fs::read(p)
                .with_context(|| format!("reading --aggregator-ca-file {}", p.display()))
        })
        .transpose()?;
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let sleep_action = match a.sleep_action {
        SleepAction::Available => true,
        SleepAction::Unavailable => false,
        SleepAction::Auto => {
            let v = client
                .apiserver_version()
                .await
                .context("asking the API server's version for --sleep-action auto")?;
            let has = has_sleep_action(&v.major, &v.minor);
            tracing::info!(version = %v.git_version, sleep_action = has, "API server version");
            has
        }
    };
    let routes = Routes::default();
    let recommendations = Recommendations::default();
    let watching = routes.clone();
    tokio::spawn(async move { watching.watch(client).await });
    let refresher = Refresher {
        routes: routes.clone(),
        recommendations: recommendations.clone(),
        aggregator: a.aggregator.clone(),
        ca_pem,
        token_file: a.token_file.clone(),
        timeout: a.aggregator_timeout,
        quantile: a.quantile,
        confidence: a.confidence,
    };
    tokio::spawn(refresher.run(a.refresh_interval));
    let listener = tokio::net::TcpListener::bind(a.listen_addr)
        .await
        .with_context(|| format!("binding --listen-addr {}", a.listen_addr))?;
    let listener = TlsListener::new(listener, tls)?;
    tracing::info!(addr = %a.listen_addr, aggregator = %a.aggregator, "serving admission reviews");
    let webhook = Webhook {
        routes,
        recommendations,
        settings: inject::Settings {
            sleep_action,
            drain_seconds: a.drain_seconds,
            adaptive_drain: inject::AdaptiveDrain {
                image: a.adaptive_drain_image,
                aggregator: a.adaptive_drain_aggregator,
                audience: a.adaptive_drain_audience,
                max_seconds: a.adaptive_drain_max.as_secs(),
            },
        },
    };
    server::serve(listener, webhook, shutdown_signal())
        .await
        .context("serving HTTPS")
}

/// 1.30 and later ("1", "30+" on some distributions).
fn has_sleep_action(major: &str, minor: &str) -> bool {
    let number = |s: &str| -> u32 {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap_or(0)
    };
    (number(major), number(minor)) >= (1, 30)
}

struct Refresher {
    routes: Routes,
    recommendations: Recommendations,
    aggregator: String,
    ca_pem: Option<Vec<u8>>,
    token_file: Option<PathBuf>,
    timeout: Duration,
    quantile: Option<f64>,
    confidence: Option<f64>,
}

impl Refresher {
    async fn run(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let this = std::sync::Arc::new(self);
        loop {
            tick.tick().await;
            let round = std::sync::Arc::clone(&this);
            match tokio::task::spawn_blocking(move || round.once()).await {
                Ok(Ok(n)) => tracing::debug!(answers = n, "recommendations refreshed"),
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    age = ?this.recommendations.age(),
                    "refreshing recommendations failed; answering from the previous ones"
                ),
                Err(e) => tracing::error!(error = %e, "refresh task failed"),
            }
        }
    }

    fn once(&self) -> anyhow::Result<usize> {
        let source = self
            .source()
            .inspect_err(|e| self.recommendations.failed(format!("{e:#}")))?;
        let scopes = cache::scopes(&self.routes.all());
        Ok(self.recommendations.refresh(&source, scopes)?)
    }

    fn source(&self) -> anyhow::Result<HttpSource> {
        let token = self
            .token_file
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|t| t.trim().to_string())
                    .with_context(|| format!("reading --token-file {}", p.display()))
            })
            .transpose()?;
        HttpSource::new(
            &self.aggregator,
            self.quantile,
            self.confidence,
            self.timeout,
            Access {
                token,
                ca_pem: self.ca_pem.clone(),
            },
        )
        .context("--aggregator-ca-file")
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sleep_action_arrived_in_1_30() {
        assert!(has_sleep_action("1", "30"));
        assert!(has_sleep_action("1", "34+"));
        assert!(!has_sleep_action("1", "29"));
        assert!(!has_sleep_action("1", "x"));
    }
}
