use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use prestop_check::check::{self, HookStyle, LowConfidence, Options, Problem, Severity};
use prestop_check::exit::{self, Exit};
use prestop_check::recommendation::{Access, HttpSource, Resolver};
use prestop_check::report::{self, Failure, Format, Report};
use prestop_check::source::{self, SourceFile, Walk};
use prestop_check::workload::{self, Inventory};
use prestop_check::{fix, textfile, yaml};

/// Fails a pipeline when a workload's preStop delay is shorter than the
/// endpoint-propagation delay measured in the cluster.
///
/// Reads Kubernetes manifests (files, directories, stdin; multi-document
/// YAML such as `helm template` or `kubectl kustomize` output), finds every
/// container a Service routes to, reads its preStop delay and
/// terminationGracePeriodSeconds, and compares them with the aggregator's
/// recommendation for that Service (falling back to its namespace, then
/// the whole cluster).
#[derive(Debug, Parser)]
#[command(name = "prestop-check", version, after_help = exit::HELP)]
struct Cli {
    /// Manifest files or directories (searched for *.yaml, *.yml, *.json
    /// in any case); `-` or none reads stdin. Helm charts and Kustomize
    /// directories must be rendered first (see --kustomize).
    paths: Vec<PathBuf>,

    /// Base URL of the aggregator's HTTP API, e.g.
    /// http://prestop-aggregator.prestop-system.svc:8080
    #[arg(long, env = "PRESTOP_AGGREGATOR_URL", value_parser = base_url)]
    aggregator: Option<String>,

    /// File holding a bearer token for the aggregator (a projected
    /// ServiceAccount token with its audience, `prestop-aggregator`), for an
    /// aggregator run with --protect-recommendations.
    #[arg(long, env = "PRESTOP_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// PEM CA certificate an https:// --aggregator must chain to (default:
    /// the public web roots).
    #[arg(long, env = "PRESTOP_CA_FILE")]
    ca_file: Option<PathBuf>,

    /// Pass with a warning when the aggregator cannot be reached; the local
    /// checks (grace period, unknown hooks) still run.
    #[arg(long, env = "PRESTOP_OFFLINE_OK")]
    offline_ok: bool,

    /// Namespace of objects whose manifests name none.
    #[arg(
        long,
        short = 'n',
        env = "PRESTOP_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,

    /// Seconds the app itself needs after SIGTERM to finish in-flight work;
    /// the grace period must hold preStop plus this.
    #[arg(long, env = "PRESTOP_DRAIN_SECONDS", default_value_t = 0.0, value_parser = seconds)]
    drain_seconds: f64,

    /// Quantile of propagation latency to cover, in (0, 1) (aggregator
    /// default: 0.99).
    #[arg(long, env = "PRESTOP_QUANTILE", value_parser = fraction)]
    quantile: Option<f64>,

    /// Confidence of the upper bound, in (0, 1) (aggregator default: 0.95).
    #[arg(long, env = "PRESTOP_CONFIDENCE", value_parser = fraction)]
    confidence: Option<f64>,

    /// What a low-confidence recommendation (too few samples) means.
    #[arg(
        long,
        value_enum,
        env = "PRESTOP_LOW_CONFIDENCE",
        default_value = "warn"
    )]
    low_confidence: LowConfidence,

    /// Treat a preStop hook of unknown duration as an error, not a warning.
    #[arg(long, env = "PRESTOP_FAIL_ON_UNKNOWN")]
    fail_on_unknown: bool,

    /// Treat the startup findings as errors, not warnings: a container a
    /// Service routes to without a readinessProbe, and new pods the
    /// aggregator measured refusing connections after being marked ready
    /// (GET /v1/startup; needs a --token-file allowed to `get deletions`,
    /// else only the readinessProbe check runs).
    #[arg(long, env = "PRESTOP_FAIL_ON_STARTUP")]
    fail_on_startup: bool,

    /// Exit 7 when no container a Service routes to was found (no
    /// workload kind this reads, no Service selecting one, empty input);
    /// without it that is a warning.
    #[arg(long, env = "PRESTOP_FAIL_IF_NOTHING_CHECKED")]
    fail_if_nothing_checked: bool,

    /// Render Kustomize directories (a kustomization.yaml) with
    /// `kubectl kustomize` and check the output; without it they are
    /// reported as unreadable (exit 3). Rendered output cannot be --fix'ed.
    #[arg(long, env = "PRESTOP_KUSTOMIZE")]
    kustomize: bool,

    #[arg(long, value_enum, env = "PRESTOP_FORMAT", default_value = "human")]
    format: Format,

    /// Rewrite the manifest files in place (not stdin), changing only the
    /// affected values and lines.
    #[arg(long)]
    fix: bool,

    /// Hook form that --fix inserts and patches show.
    #[arg(long, value_enum, env = "PRESTOP_HOOK_STYLE", default_value = "sleep")]
    hook_style: HookStyle,

    /// Also write the configured preStop of each routed container in the
    /// Prometheus text format (for node-exporter's textfile collector).
    #[arg(long, env = "PRESTOP_METRICS_FILE")]
    metrics_file: Option<PathBuf>,

    /// `cluster` label written on every --metrics-file series: the value
    /// the aggregator's series carry in Prometheus (the ServiceMonitor's
    /// `cluster` relabeling), for publishers that add none themselves
    /// (node-exporter's textfile collector).
    #[arg(long, env = "PRESTOP_CLUSTER", value_parser = non_empty)]
    cluster: Option<String>,

    /// Timeout of each aggregator request, in seconds (at most a day).
    #[arg(long, env = "PRESTOP_TIMEOUT_SECONDS", default_value_t = 10.0, value_parser = timeout)]
    timeout_seconds: f64,
}

/// An http(s) URL with a host: anything else would only fail later as
/// "unreachable", which `--offline-ok` turns into a pass.
fn base_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default()
        .is_empty()
    {
        return Err("has no host".into());
    }
    Ok(s.to_string())
}

fn number(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("`{s}` is not a finite number"))
}

fn fraction(s: &str) -> Result<f64, String> {
    Some(number(s)?)
        .filter(|v| *v > 0.0 && *v < 1.0)
        .ok_or_else(|| "must be strictly between 0 and 1".into())
}

fn seconds(s: &str) -> Result<f64, String> {
    Some(number(s)?)
        .filter(|v| *v >= 0.0)
        .ok_or_else(|| "must not be negative".into())
}

fn timeout(s: &str) -> Result<f64, String> {
    Some(number(s)?)
        .filter(|v| *v > 0.0 && *v <= 86_400.0)
        .ok_or_else(|| "must be above 0 and at most 86400".into())
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            eprintln!("prestop-check: {e:#}");
            ExitCode::from(Exit::Usage.code())
        }
    }
}

fn print(
    format: Format,
    exit: Exit,
    failures: &[Failure],
    outcome: Option<(&check::Outcome, &Inventory)>,
) -> Exit {
    let none = BTreeMap::new();
    let (findings, checked, skipped) = outcome.map_or((&[][..], &[][..], &none), |(o, i)| {
        (&o.findings[..], &o.checked[..], &i.skipped)
    });
    let report = Report {
        exit_code: exit.code(),
        failures,
        findings,
        checked,
        skipped,
    };
    print!("{}", report::render(format, &report));
    exit
}

fn failure(
    severity: Severity,
    file: Option<String>,
    line: Option<usize>,
    message: String,
) -> Failure {
    Failure {
        severity,
        file,
        line,
        message,
    }
}

fn run(cli: &Cli) -> anyhow::Result<Exit> {
    if cli.fix && (cli.paths.is_empty() || cli.paths.iter().any(|p| p.as_os_str() == "-")) {
        anyhow::bail!("--fix rewrites files and cannot be used with stdin");
    }
    if cli.aggregator.is_none() && !cli.offline_ok {
        anyhow::bail!(
            "--aggregator URL (or PRESTOP_AGGREGATOR_URL) is required unless --offline-ok"
        );
    }
    let inputs = source::read_inputs(
        &cli.paths,
        Walk {
            kustomize: cli.kustomize,
        },
    );
    let files = inputs.files;
    let names: Vec<String> = files.iter().map(SourceFile::display).collect();
    let (inventory, invalid) = Inventory::collect(&files, &cli.namespace);
    let (mut failures, unreadable) = input_failures(&inputs.problems, &invalid, &files, &names);
    if unreadable {
        return Ok(print(cli.format, Exit::Unparsable, &failures, None));
    }

    let mut outcome = match check_all(cli, &inventory, &names, &mut failures)? {
        Ok(outcome) => outcome,
        Err(unreachable) => {
            return Ok(print(
                cli.format,
                Exit::AggregatorUnreachable,
                &[unreachable],
                None,
            ));
        }
    };
    if cli.aggregator.is_none() {
        failures.push(failure(
            Severity::Warning,
            None,
            None,
            "no --aggregator given; only local checks ran".into(),
        ));
    }
    let nothing_checked = outcome.checked.is_empty();
    if nothing_checked {
        let severity = if cli.fail_if_nothing_checked {
            Severity::Error
        } else {
            Severity::Warning
        };
        let message = nothing_checked_message(&inventory, files.len(), inputs.skipped);
        failures.push(failure(severity, None, None, message));
    }

    let write_failed = write_outputs(cli, &files, &inventory, &mut outcome, &mut failures);
    let exit = exit_code(
        &outcome,
        write_failed,
        nothing_checked && cli.fail_if_nothing_checked,
    );
    Ok(print(
        cli.format,
        exit,
        &failures,
        Some((&outcome, &inventory)),
    ))
}

/// The inputs' problems and the manifests that do not parse, as failures;
/// whether any of them makes the run unparsable.
fn input_failures(
    problems: &[source::InputProblem],
    invalid: &[workload::ManifestError],
    files: &[SourceFile],
    names: &[String],
) -> (Vec<Failure>, bool) {
    let mut unreadable = false;
    let mut failures = Vec::new();
    for p in problems {
        let severity = if p.is_error() {
            unreadable = true;
            Severity::Error
        } else {
            Severity::Warning
        };
        failures.push(failure(
            severity,
            Some(p.path().to_string()),
            None,
            p.to_string(),
        ));
    }
    for e in invalid {
        unreadable = true;
        let mut message = e.message.clone();
        if templated_near(&files[e.file].text, e.line) {
            message += " (it contains `{{`: an unrendered Helm template? render it with `helm template` first)";
        }
        failures.push(failure(
            Severity::Error,
            Some(names[e.file].clone()),
            Some(e.line),
            message,
        ));
    }
    (failures, unreadable)
}

/// The checks against the aggregator's recommendations, or the local ones
/// alone with `--offline-ok` when it cannot be asked; `Ok(Err(failure))`
/// when it cannot be asked and that is an error.
fn check_all(
    cli: &Cli,
    inventory: &Inventory,
    names: &[String],
    failures: &mut Vec<Failure>,
) -> anyhow::Result<Result<check::Outcome, Failure>> {
    let opts = Options {
        drain_seconds: cli.drain_seconds,
        low_confidence: cli.low_confidence,
        fail_on_unknown: cli.fail_on_unknown,
        fail_on_startup: cli.fail_on_startup,
        hook_style: cli.hook_style,
    };
    let http = match cli.aggregator.as_deref() {
        Some(url) => Some(HttpSource::new(
            url,
            cli.quantile,
            cli.confidence,
            Duration::from_secs_f64(cli.timeout_seconds),
            access(cli)?,
        )?),
        None => None,
    };
    let mut resolver = http.as_ref().map(|h| Resolver::new(h));
    match check::run(inventory, names, resolver.as_mut(), &opts) {
        Ok(outcome) => Ok(Ok(outcome)),
        Err(e) if cli.offline_ok => {
            failures.push(failure(
                Severity::Warning,
                None,
                None,
                format!("{e}; only local checks ran (--offline-ok)"),
            ));
            Ok(Ok(
                check::run(inventory, names, None, &opts).context("local checks")?
            ))
        }
        Err(e) => Ok(Err(failure(Severity::Error, None, None, e.to_string()))),
    }
}

/// The token and CA files' contents.
fn access(cli: &Cli) -> anyhow::Result<Access> {
    let token = match &cli.token_file {
        Some(path) => {
            let raw = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            let token = raw.trim().to_owned();
            anyhow::ensure!(
                !token.is_empty(),
                "--token-file {} is empty",
                path.display()
            );
            Some(token)
        }
        None => None,
    };
    let ca_pem = match &cli.ca_file {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("reading --ca-file {}", path.display()))?,
        ),
        None => None,
    };
    Ok(Access { token, ca_pem })
}

/// `--fix` and `--metrics-file`: output that could not be written is
/// reported (and the rest of the report still printed); whether any was.
fn write_outputs(
    cli: &Cli,
    files: &[SourceFile],
    inventory: &Inventory,
    outcome: &mut check::Outcome,
    failures: &mut Vec<Failure>,
) -> bool {
    let mut write_failed = false;
    if cli.fix {
        write_failed |= !apply_fixes(files, inventory, outcome, cli.hook_style, failures);
    }
    if let Some(path) = &cli.metrics_file {
        let text = textfile::render(&outcome.checked, cli.cluster.as_deref());
        if let Err(e) = std::fs::write(path, text) {
            write_failed = true;
            failures.push(failure(
                Severity::Error,
                Some(path.display().to_string()),
                None,
                format!("cannot write the --metrics-file: {e}"),
            ));
        }
    }
    write_failed
}

/// The exit code: what could not be written, then open findings, then
/// low-confidence ones, then nothing checked when that is to fail.
fn exit_code(outcome: &check::Outcome, write_failed: bool, fail_nothing_checked: bool) -> Exit {
    let open_errors = |low: bool| {
        outcome.findings.iter().any(|f| {
            f.severity == Severity::Error
                && !f.fixed
                && low == matches!(f.problem, Problem::LowConfidence | Problem::NoMeasurements)
        })
    };
    if write_failed {
        Exit::WriteFailed
    } else if open_errors(false) {
        Exit::Findings
    } else if open_errors(true) {
        Exit::LowConfidence
    } else if fail_nothing_checked {
        Exit::NothingChecked
    } else {
        Exit::Ok
    }
}

/// Whether the line of an error, or the one before (YAML reports some
/// errors where the next token starts), holds a `{{ }}` template action.
/// Rendered output may carry `{{` inside strings (alerting rules), so only
/// the error's own place counts.
fn templated_near(text: &str, line: usize) -> bool {
    text.lines()
        .skip(line.saturating_sub(2))
        .take(2)
        .any(|l| l.contains("{{"))
}

/// Why a run checked nothing, from what it did read.
fn nothing_checked_message(inventory: &Inventory, files: usize, skipped_files: usize) -> String {
    let mut parts = vec![format!(
        "{files} input(s) read, {} object(s) in them",
        inventory.objects
    )];
    if !inventory.workloads.is_empty() {
        parts.push(format!(
            "{} workload(s), none selected by a Service in these manifests through a port a container serves",
            inventory.workloads.len()
        ));
    }
    if !inventory.skipped.is_empty() {
        parts.push(format!(
            "kinds not read: {}",
            report::kinds_list(&inventory.skipped)
        ));
    }
    if skipped_files > 0 {
        parts.push(format!(
            "{skipped_files} file(s) in the directories skipped: not *.yaml, *.yml or *.json"
        ));
    }
    format!(
        "nothing was checked: no container that a Service routes to ({})",
        parts.join("; ")
    )
}

/// Edits each file once with all its workloads' changes, and writes it only
/// if the result still parses. False when a file could not be written.
fn apply_fixes(
    files: &[SourceFile],
    inventory: &Inventory,
    outcome: &mut check::Outcome,
    style: HookStyle,
    failures: &mut Vec<Failure>,
) -> bool {
    let mut written = true;
    let mut per_file: BTreeMap<usize, Vec<&check::Change>> = BTreeMap::new();
    for change in &outcome.changes {
        let w = &inventory.workloads[change.workload];
        per_file.entry(w.file).or_default().push(change);
    }
    for (index, changes) in per_file {
        let file = &files[index];
        // Workloads keep lines, not trees: the file is parsed again, once.
        let Ok(docs) = yaml::parse_stream(&file.text) else {
            continue;
        };
        let mut edits = Vec::new();
        let mut objects = Vec::new();
        for change in changes {
            let w = &inventory.workloads[change.workload];
            let result = workload::find_object(&docs, w.at)
                .ok_or_else(|| format!("{} not found again in the file", w.object()))
                .and_then(|node| {
                    fix::edits(&file.text, w, node, change, style).map_err(|e| e.to_string())
                });
            match result {
                Ok(e) => {
                    edits.extend(e);
                    objects.push(w.object());
                }
                Err(e) => failures.push(failure(
                    Severity::Warning,
                    Some(file.display()),
                    Some(w.line),
                    format!("cannot fix: {e}"),
                )),
            }
        }
        let text = match fix::apply(&file.text, edits) {
            Ok(text) => text,
            Err(e) => {
                failures.push(failure(
                    Severity::Warning,
                    Some(file.display()),
                    None,
                    format!("cannot fix: {e}; left unchanged, apply the patches by hand"),
                ));
                continue;
            }
        };
        if let Err(e) = yaml::parse_stream(&text) {
            failures.push(failure(
                Severity::Warning,
                Some(file.display()),
                Some(e.line),
                format!("cannot fix: the edited file would not parse ({e}); left unchanged"),
            ));
            continue;
        }
        let Some(path) = &file.path else {
            failures.push(failure(
                Severity::Warning,
                Some(file.display()),
                None,
                "cannot fix rendered output: apply the patches to its sources".into(),
            ));
            continue;
        };
        if let Err(e) = std::fs::write(path, text) {
            written = false;
            failures.push(failure(
                Severity::Error,
                Some(file.display()),
                None,
                format!(
                    "cannot write the fixed manifest: {e}; its findings stay open \
                     (a write that failed midway can leave the file incomplete)"
                ),
            ));
            continue;
        }
        for f in outcome.findings.iter_mut().filter(|f| {
            f.file_index == index
                && objects.contains(&f.object)
                && matches!(
                    f.problem,
                    Problem::PreStopBelowRecommendation | Problem::GracePeriodTooShort
                )
        }) {
            f.fixed = true;
        }
    }
    written
}
