//! `prestop-drain`: a pod's preStop hook that waits exactly as long as its
//! deletion needs. It asks the aggregator's `GET /v1/drain` with the pod's
//! identity (downward API) and projected token, and returns as soon as the
//! aggregator says every node let go of the pod. On any failure (the
//! aggregator unreachable, no answer in time, the token refused, a bad
//! answer) and after a `timeout` answer it sleeps until the fixed
//! recommendation (`--fallback`) has passed since the hook started, so it
//! is never shorter than the fixed delay unless the aggregator vouched.

mod http;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use observer_proto::api::{self, DrainAnswer, DrainOutcome};

use http::BaseUrl;

/// How much longer than `--max` an answer may take to arrive.
const ANSWER_SLACK: Duration = Duration::from_secs(api::DRAIN_ANSWER_SLACK_SECONDS);

/// Waits until the aggregator says this deleted pod is drained (every
/// node removed it, no router sends it new connections), else sleeps the
/// fixed recommendation.
///
/// Exit status: 0 when the aggregator answered (drained, or timeout after
/// the rest of the fallback); 1 after the fallback sleep when the
/// aggregator could not be asked (the kubelet then records a
/// FailedPreStopHook event with the message); 2 for bad flags.
#[derive(Debug, Parser)]
#[command(name = "prestop-drain", version)]
struct Args {
    /// Base URL of the aggregator's HTTP API.
    #[arg(
        long,
        env = "PRESTOP_DRAIN_AGGREGATOR",
        default_value = "http://prestop-aggregator.prestop-system.svc:8080"
    )]
    aggregator: BaseUrl,
    /// The pod's namespace (downward API: metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", required_unless_present = "copy_to")]
    namespace: Option<String>,
    /// The pod's name (downward API: metadata.name).
    #[arg(long, env = "POD_NAME", required_unless_present = "copy_to")]
    pod: Option<String>,
    /// The pod's projected ServiceAccount token for the aggregator's
    /// audience (`prestop-aggregator`).
    #[arg(
        long,
        env = "PRESTOP_DRAIN_TOKEN_FILE",
        default_value = "/var/run/secrets/prestop-drain/token"
    )]
    token_file: PathBuf,
    /// The service's fixed recommendation (e.g. 12s): the least the hook
    /// waits unless the aggregator answers drained.
    #[arg(long, env = "PRESTOP_DRAIN_FALLBACK", value_parser = humantime::parse_duration, required_unless_present = "copy_to")]
    fallback: Option<Duration>,
    /// The longest the aggregator may make the hook wait; keep it below
    /// terminationGracePeriodSeconds minus the app's own shutdown time.
    #[arg(long, env = "PRESTOP_DRAIN_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    max: Duration,
    /// How long connecting to the aggregator may take.
    #[arg(long, env = "PRESTOP_DRAIN_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Copy this binary to PATH (mode 0755) and exit: the init container
    /// that puts it into the emptyDir the app container's preStop runs it
    /// from (the image has no shell or cp).
    #[arg(long, value_name = "PATH", exclusive = true)]
    copy_to: Option<PathBuf>,
}

/// What the hook asks about and how long it waits at least.
struct Hook<'a> {
    args: &'a Args,
    namespace: &'a str,
    pod: &'a str,
    fallback: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    if let Some(to) = &args.copy_to {
        return match copy_self(to) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("prestop-drain: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(namespace), Some(pod), Some(fallback)) = (&args.namespace, &args.pod, args.fallback)
    else {
        // clap requires them without --copy-to; a usage error, as clap's.
        eprintln!("prestop-drain: --namespace, --pod and --fallback are required");
        return ExitCode::from(2);
    };
    let hook = Hook {
        args: &args,
        namespace,
        pod,
        fallback,
    };
    hook.run(started)
}

/// `--copy-to`: this executable to `to`, executable by everyone.
fn copy_self(to: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("finding this executable")?;
    std::fs::copy(&me, to)
        .with_context(|| format!("copying {} to {}", me.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", to.display()))?;
    println!("prestop-drain: copied to {}", to.display());
    Ok(())
}

impl Hook<'_> {
    /// Asks, then sleeps what is left of the fallback unless drained.
    fn run(&self, started: Instant) -> ExitCode {
        let outcome = self.ask(started);
        let code = match &outcome {
            Ok(a) if a.outcome == DrainOutcome::Drained => {
                println!(
                    "prestop-drain: drained after {:.2} s: {}",
                    started.elapsed().as_secs_f64(),
                    a.reason
                );
                return ExitCode::SUCCESS;
            }
            Ok(a) => {
                println!("prestop-drain: not drained: {}", a.reason);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("prestop-drain: asking the aggregator failed: {e:#}");
                ExitCode::FAILURE
            }
        };
        let rest = self.fallback.saturating_sub(started.elapsed());
        println!(
            "prestop-drain: sleeping the rest of the {:.1} s fallback: {:.2} s",
            self.fallback.as_secs_f64(),
            rest.as_secs_f64()
        );
        std::thread::sleep(rest);
        code
    }

    /// One `GET /v1/drain`: the answer, or why there is none.
    fn ask(&self, started: Instant) -> Result<DrainAnswer> {
        let args = self.args;
        let token_file = &args.token_file;
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the token {}", token_file.display()))?;
        let token = token.trim();
        if token.is_empty() {
            bail!("the token file {} is empty", token_file.display());
        }
        let query = format!(
            "/v1/drain?namespace={}&pod={}&max={:.3}",
            http::encode(self.namespace),
            http::encode(self.pod),
            args.max.as_secs_f64()
        );
        let deadline = started + args.max + ANSWER_SLACK;
        let r = http::get(
            &args.aggregator,
            &query,
            token,
            args.connect_timeout,
            deadline,
        )
        .with_context(|| {
            format!(
                "GET http://{}:{}{}/v1/drain",
                args.aggregator.host, args.aggregator.port, args.aggregator.prefix
            )
        })?;
        let body = String::from_utf8_lossy(&r.body);
        if r.status != 200 {
            bail!("the aggregator answered {}: {}", r.status, body.trim());
        }
        serde_json::from_str(&body).with_context(|| format!("reading the answer {body:?}"))
    }
}
