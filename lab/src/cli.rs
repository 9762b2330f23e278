//! `cargo xtask lab`: build the lab, measure a rolling update with the real
//! agents and aggregator, then repeat it without and with the recommended
//! preStop delay, and report.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use observer_proto::api::Recommendation;

use crate::{
    api,
    cost::{self, LabCost},
    delay::{DelayDistribution, parse_duration_arg},
    drain::DrainHook,
    identity,
    kubeproxy::Mode,
    netns,
    observer::{Binaries, Observer},
    report::{self, AgentCost, Report, RunReport},
    routers::{self, Choice, Routers, RoutersConfig},
    scenario::{Lab, LabConfig, RolloutConfig, RolloutResult},
    server::ShutdownMode,
    startup::{self, ServerSpec, StartupSection},
};

/// The folklore delay, used as the comparison when the injected delays can
/// exceed it (a preStop of 0 would make that comparison pointless).
const FOLKLORE_SECONDS: u64 = 5;
/// The measuring rollout's default preStop: above the default routers'
/// largest lag (the ingress's 7 s).
const MEASURE_SECONDS: u64 = 10;

#[derive(Args, Debug, Clone)]
pub struct LabArgs {
    /// Nodes (network namespaces with their own dataplane and agent); the
    /// default gives each default mode one.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Replicas of the Service `default/web`.
    #[arg(long, default_value_t = 8)]
    pub pods: usize,
    /// Pod deletions (each with a replacement) per rollout, at most --pods
    /// (a rollout replaces each pod once). The first two rollouts are the
    /// recommendation's samples: with the default delay's 15 % outliers,
    /// fewer deletions often miss the slow tail entirely.
    #[arg(long, default_value_t = 8)]
    pub deletions: usize,
    /// Injected per-node programming delay: MIN..MAX[,outliers=P@MIN..MAX].
    #[arg(long, default_value_t = DelayDistribution::default())]
    pub delay: DelayDistribution,
    /// Dataplane modes, given to the nodes in turn: kube-proxy's
    /// `nftables`, `iptables-nft`, `iptables-legacy`, or `cilium` (Cilium's
    /// kube-proxy replacement imitated: its service maps and socket-LB).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nftables,iptables-nft,iptables-legacy,cilium"
    )]
    pub modes: Vec<Mode>,
    /// Requests per second of each client; every node runs one client that
    /// opens a connection per request and one keep-alive client.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// How long a rollout spreads its deletions over (e.g. 6s).
    #[arg(long, default_value = "6s", value_parser = parse_duration_arg)]
    pub duration: Duration,
    /// preStop delay of the first (measuring) rollout, seconds. Longer
    /// than every default router's lag, so each router's last connection
    /// to a deleted pod is an accepted one.
    #[arg(long, default_value_t = MEASURE_SECONDS)]
    pub measure_prestop: u64,
    /// Grace period beyond the preStop delay, seconds.
    #[arg(long, default_value_t = 2)]
    pub grace_extra: u64,
    /// The pods' servers: how they shut down (graceful, ignore-sigterm,
    /// nginx), or how they start, shutting down gracefully:
    /// slow-start=DURATION (marked ready at once, listening only after
    /// DURATION: refused connections after ready), warm-up=DURATION
    /// (listening at once, answering 300 ms late for DURATION).
    #[arg(long, default_value = "graceful")]
    pub server: ServerSpec,
    /// Seed of the injected delays (same seed, same delays).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Routers that send to the Service's pods: `kube-proxy` (a client on
    /// every node to the VIP), `ingress` (real nginx in a pod proxying to
    /// pod IPs, its client on another node), `client-side` (a pod listing
    /// the EndpointSlices on an interval and connecting to pod IPs),
    /// `external` (a load balancer on the underlay outside every node).
    #[arg(
        long,
        env = "LAB_ROUTERS",
        value_enum,
        value_delimiter = ',',
        default_value = "kube-proxy,ingress,client-side,external"
    )]
    pub routers: Vec<Choice>,
    /// The ingress controller's delay from an endpoint turning not ready to
    /// `nginx -s reload` without it (same syntax as --delay). The default's
    /// outliers pass the folklore 5 s.
    #[arg(
        long,
        env = "LAB_INGRESS_DELAY",
        default_value = "500ms..2500ms,outliers=0.35@5500ms..7s"
    )]
    pub ingress_delay: DelayDistribution,
    /// The client-side balancer's refresh interval (e.g. 30s, Eureka's
    /// default): it drops a deleted pod up to this long after.
    #[arg(long, env = "LAB_CLIENT_SIDE_REFRESH", default_value = "3s", value_parser = parse_duration_arg)]
    pub client_side_refresh: Duration,
    /// The external load balancer's deregistration delay (same syntax as
    /// --delay).
    #[arg(long, env = "LAB_EXTERNAL_DELAY", default_value = "1s..4s")]
    pub external_delay: DelayDistribution,
    /// After the rollout with the recommended fixed preStop, one more with
    /// the adaptive drain: each deleted pod's preStop runs the real
    /// `prestop-drain` against the aggregator, falling back to the
    /// recommendation. The report compares their preStop time and failures.
    #[arg(long, env = "LAB_ADAPTIVE_DRAIN")]
    pub adaptive_drain: bool,
    /// The adaptive drain's `--max` (its pods' grace period is this plus
    /// --grace-extra): how long a slow node may hold a pod.
    #[arg(long, env = "LAB_DRAIN_MAX", default_value = "60s", value_parser = parse_duration_arg)]
    pub drain_max: Duration,
    /// Before the rollout with the recommendation, make the first node's
    /// kube-proxy apply every change this much later (e.g. 8s): a node
    /// slower than anything measured. The fixed recommendation then loses
    /// requests through it; the adaptive drain waits for it.
    #[arg(long, env = "LAB_SLOW_NODE", value_parser = parse_duration_arg)]
    pub slow_node: Option<Duration>,
    /// Where to write report.json (default: target/lab/report.json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Keep the lab up this long (e.g. 60s) once pods and agents run,
    /// before the rollouts, printing the Service VIP and a ready-to-paste
    /// client command per node (`ip netns exec NODE hey ...`). Ctrl-C ends
    /// the lab at any time.
    #[arg(long, value_parser = parse_duration_arg)]
    pub hold: Option<Duration>,
    /// Run this shell command (`sh -c`) inside the first node's network
    /// namespace once pods and agents run, before the rollouts, with
    /// LAB_VIP, LAB_URL, LAB_NODE and LAB_NETNS set, e.g.
    /// `--exec 'hey -n 500 $LAB_URL'`. The lab fails if it fails.
    #[arg(long)]
    pub exec: Option<String>,
}

impl LabArgs {
    /// The routers besides kube-proxy that `--routers` selects.
    pub fn routers_config(&self) -> RoutersConfig {
        let on = |c| self.routers.contains(&c);
        RoutersConfig {
            ingress: on(Choice::Ingress).then_some(self.ingress_delay),
            client_side: on(Choice::ClientSide).then_some(self.client_side_refresh),
            external: on(Choice::External).then_some(self.external_delay),
            rate: self.rate,
            seed: self.seed,
        }
    }

    /// The longest any selected router can take to let go of a pod.
    pub fn slowest_router(&self) -> Duration {
        let c = self.routers_config();
        [
            self.routers
                .contains(&Choice::KubeProxy)
                .then(|| self.delay.max()),
            c.ingress.map(|d| d.max()),
            c.client_side,
            c.external.map(|d| d.max()),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_default()
    }
}

/// Every binary the lab runs.
#[derive(Debug, Clone)]
pub struct LabBinaries {
    pub pod_server: PathBuf,
    /// The adaptive drain's preStop hook.
    pub drain: PathBuf,
    pub observer: Binaries,
    /// The profile they were built with (reported with the agent's CPU).
    pub profile: String,
}

impl LabBinaries {
    /// `aggregator`, `observer-agent` and `lab-pod-server` from one target
    /// directory (e.g. target/debug).
    pub fn in_dir(dir: &Path, profile: &str) -> Self {
        LabBinaries {
            pod_server: dir.join("lab-pod-server"),
            drain: dir.join("prestop-drain"),
            observer: Binaries {
                aggregator: dir.join("aggregator"),
                agent: dir.join("observer-agent"),
                completion_timeout: Duration::from_secs(20),
            },
            profile: profile.to_owned(),
        }
    }
}

/// The lab was stopped by SIGINT or SIGTERM (and torn down).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}; the lab was torn down")]
pub struct Interrupted(pub &'static str);

/// How long the agents' idle CPU is sampled before the first rollout.
const IDLE_SAMPLE: Duration = Duration::from_secs(3);

fn progress(started: Instant, msg: &str) {
    eprintln!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());
}

/// Runs the whole lab; tears everything down on return, on failure, on
/// Ctrl-C (SIGINT) and on SIGTERM: every namespace (with its rules and the
/// processes inside), the agents, the aggregator and the pods. An
/// interruption is an [`Interrupted`] error.
pub fn run(args: &LabArgs, binaries: &LabBinaries, report_path: &Path) -> Result<Report> {
    if !crate::root::is_root() {
        bail!("the lab creates network namespaces and loads eBPF programs: run it as root");
    }
    validate(args)?;
    netns::reap_stale();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed before anything is created, so no signal can end the
        // process between creating a namespace and owning it.
        let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        // The lab lives inside `execute`: when a signal wins, dropping that
        // future drops the lab, the observer's processes and the clients.
        tokio::select! {
            result = execute(args, binaries, report_path) => result,
            _ = interrupt.recv() => Err(Interrupted("SIGINT").into()),
            _ = terminate.recv() => Err(Interrupted("SIGTERM").into()),
        }
    })
}

/// Refuses flags that cannot make a lab, saying which.
fn validate(args: &LabArgs) -> Result<()> {
    if args.nodes == 0 || args.pods < 2 || args.deletions == 0 {
        bail!("the lab needs at least 1 node, 2 pods and 1 deletion");
    }
    if args.deletions > args.pods {
        bail!(
            "--deletions {} exceeds --pods {}: a rolling update replaces each of the Service's pods once; raise --pods",
            args.deletions,
            args.pods
        );
    }
    if args.routers.contains(&Choice::ClientSide) && args.client_side_refresh.is_zero() {
        bail!("--client-side-refresh 0s: the client-side balancer needs an interval above 0");
    }
    Ok(())
}

/// Prints how to reach the lab's Service from each node, and how to drive
/// the lab with kubectl.
fn print_access(lab: &Lab, observer: &Observer) {
    let vip = format!("http://{}:{}/", api::SERVICE_IP, api::SERVICE_PORT);
    println!(
        "lab up: Service {}/{} at {vip} (ClusterIP {}), reachable from every node's namespace:",
        api::NAMESPACE,
        api::SERVICE,
        api::SERVICE_IP
    );
    for (node, info) in lab.cluster.nodes.iter().zip(lab.nodes()) {
        println!(
            "  {} ({}): ip netns exec {} hey -z 5s {vip}",
            node.name,
            info.mode,
            node.ns.name()
        );
    }
    let kubeconfig = observer.api().kubeconfig();
    let kubeconfig = std::path::absolute(kubeconfig).unwrap_or_else(|_| kubeconfig.to_owned());
    let cp = lab.cluster.control_plane.name();
    println!(
        "kubectl, against the lab's API in the control-plane namespace (get, describe, get -w, delete pod):"
    );
    println!(
        "  ip netns exec {cp} kubectl --kubeconfig {} get pods -o wide",
        kubeconfig.display()
    );
    println!(
        "  pods deleted there go the rollouts' way (preStop, SIGTERM, EndpointSlice, every node's proxy) and are measured: ip netns exec {cp} curl -s -H \"Authorization: Bearer $(cat {})\" {}/v1/deletions",
        observer.security().reader_file.display(),
        observer.aggregator.http_url()
    );
}

/// `--exec`: runs `command` with `sh -c` inside the first node's namespace.
async fn exec_in_node(lab: &Lab, command: &str) -> Result<()> {
    let node = lab.cluster.nodes.first().context("the lab has no node")?;
    let vip = format!("http://{}:{}/", api::SERVICE_IP, api::SERVICE_PORT);
    let status = tokio::process::Command::from(node.ns.command("sh"))
        .args(["-c", command])
        .env("LAB_VIP", api::SERVICE_IP.to_string())
        .env("LAB_URL", &vip)
        .env("LAB_NODE", &node.name)
        .env("LAB_NETNS", node.ns.name())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("starting `{command}` in {}", node.name))?;
    if !status.success() {
        bail!("--exec `{command}` in {} failed: {status}", node.name);
    }
    Ok(())
}

fn rollout_config(
    args: &LabArgs,
    pre_stop_seconds: u64,
    drain: Option<Arc<DrainHook>>,
) -> RolloutConfig {
    let longest = match &drain {
        Some(hook) => hook.max.max(hook.fallback),
        None => Duration::from_secs(pre_stop_seconds),
    };
    RolloutConfig {
        deletions: args.deletions,
        spacing: args.duration / args.deletions.max(1) as u32,
        pre_stop: Duration::from_secs(pre_stop_seconds),
        grace: longest + Duration::from_secs(args.grace_extra),
        rate: args.rate,
        keep_alive_connections: 2,
        drain,
    }
}

/// `--adaptive-drain`: the hook every deleted pod runs, falling back to
/// `fallback_seconds`; tokens bound to each pod are minted by the API
/// double as the kubelet's TokenRequest would, into `dir`.
fn drain_hook(
    args: &LabArgs,
    binaries: &LabBinaries,
    observer: &Observer,
    dir: &Path,
    fallback_seconds: u64,
) -> Arc<DrainHook> {
    let double = observer.api().shared_double();
    let token_dir = dir.to_owned();
    Arc::new(DrainHook {
        binary: binaries.drain.clone(),
        aggregator: observer.aggregator.http_url(),
        fallback: Duration::from_secs(fallback_seconds),
        max: args.drain_max,
        tokens: Arc::new(move |pod| {
            let token = identity::pod_token(&double, api::NAMESPACE, &pod.name)
                .map_err(|e| e.to_string())?;
            let file = token_dir.join(format!("drain-token-{}", pod.name));
            std::fs::write(&file, token).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok(file)
        }),
        log: dir.join("drain-hooks.log"),
    })
}

async fn execute(args: &LabArgs, binaries: &LabBinaries, report_path: &Path) -> Result<Report> {
    let started = Instant::now();
    let say = |msg: &str| progress(started, msg);
    let dir = report_path
        .parent()
        .context("report path has no directory")?
        .to_owned();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // nginx reads the paths of its configuration relative to its prefix,
    // not to our working directory: a relative --report must not reach it.
    let dir =
        std::path::absolute(&dir).with_context(|| format!("making {} absolute", dir.display()))?;
    let (mut lab, observer) = start(args, binaries, &dir, say).await?;
    before_rollouts(args, &lab, &observer, say).await?;
    let idle_ms_per_second = idle_cpu_ms_per_second(&observer).await;
    let mut rollouts = Rollouts::new();

    let measured = rollouts
        .run(
            &mut lab,
            &observer,
            args,
            "measure",
            args.measure_prestop,
            say,
        )
        .await?;
    observer.wait_complete(&measured.deletions).await?;
    recommendation(&observer, "after rollout 1", say).await?;

    let baseline = if args.slowest_router() > Duration::from_secs(FOLKLORE_SECONDS) {
        FOLKLORE_SECONDS
    } else {
        0
    };
    let run = rollouts
        .run(&mut lab, &observer, args, "baseline", baseline, say)
        .await?;
    // The baseline's deletions are measured too: the recommendation used
    // for the last rollout rests on both.
    observer.wait_complete(&run.deletions).await?;
    let recommendation = recommendation(&observer, "for rollout 3", say).await?;
    let Some(recommended) = recommendation.pre_stop_seconds else {
        bail!(
            "the aggregator gave no recommendation: {}",
            recommendation.reason
        );
    };
    if let Some(extra) = args.slow_node {
        say(&format!(
            "{} turns slow: every change {} s later than drawn",
            lab.cluster.nodes[0].name,
            extra.as_secs_f64()
        ));
        lab.slow_down(0, extra);
    }
    rollouts
        .run(&mut lab, &observer, args, "recommended", recommended, say)
        .await?;
    if args.adaptive_drain {
        let _ = std::fs::remove_file(dir.join("drain-hooks.log"));
        let hook = drain_hook(args, binaries, &observer, &dir, recommended);
        rollouts
            .run_drained(&mut lab, &observer, args, hook, say)
            .await?;
    }

    let report = rollouts
        .report(
            &lab,
            args,
            &observer,
            binaries,
            idle_ms_per_second,
            recommendation,
        )
        .await?;
    std::fs::write(report_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("{}", report.text());
    let last = observer
        .aggregator
        .recommendation(api::NAMESPACE, api::SERVICE)
        .await?;
    if let Some(f) = &last.keep_alive.finding {
        println!("Keep-alive finding after all rollouts: {f}");
        if args.server.shutdown == ShutdownMode::Nginx {
            println!("{}", nginx_keep_alive_fix(&report, recommended));
        }
    }
    println!("report: {}", report_path.display());
    say("tearing down");
    observer.shutdown().await;
    lab.shutdown().await?;
    Ok(report)
}

/// What the keep-alive finding means for nginx pods, with the lab's own
/// count of requests it cost.
fn nginx_keep_alive_fix(report: &Report, pre_stop: u64) -> String {
    let lost: u64 = report
        .runs
        .last()
        .map_or(0, |r| r.keep_alive.failed_total());
    format!(
        "nginx pods: SIGTERM is nginx's fast shutdown, which closes its keep-alive connections under the clients \
         ({lost} keep-alive requests failed in the last rollout despite its preStop). Stop it gracefully at the end \
         of the preStop instead, so idle connections close and answers in flight carry `Connection: close` before \
         the kill:\n  lifecycle: {{preStop: {{exec: {{command: [\"sh\", \"-c\", \"sleep {pre_stop}; nginx -s quit; \
         while pgrep -x nginx >/dev/null; do sleep 1; done\"]}}}}}}\n  \
         (not measured here: the lab's kubelet runs sleep hooks only)"
    )
}

/// Creates the cluster, then the API double, the aggregator and the agents.
async fn start(
    args: &LabArgs,
    binaries: &LabBinaries,
    dir: &Path,
    say: impl Fn(&str),
) -> Result<(Lab, Observer)> {
    let modes: Vec<_> = args.modes.iter().map(|m| m.as_str()).collect();
    say(&format!(
        "creating {} nodes ({}), {} pods; injected delay {}",
        args.nodes,
        modes.join(", "),
        args.pods,
        args.delay
    ));
    let lab = Lab::start(LabConfig {
        nodes: args.nodes,
        pods: args.pods,
        modes: args.modes.clone(),
        delay: args.delay,
        seed: args.seed,
        pod_server: binaries.pod_server.clone(),
        server_mode: args.server.shutdown,
        start: args.server.start,
        termination: api::PodTermination {
            pre_stop: Duration::from_secs(args.measure_prestop),
            grace: Duration::from_secs(args.measure_prestop + args.grace_extra),
        },
    })
    .await?;
    say("starting the API double, the aggregator and one agent per node");
    let observer = Observer::start(&lab, &binaries.observer, dir).await?;
    say(&format!("agents registered; logs in {}", dir.display()));
    let routers = Routers::start(
        &lab,
        observer.api(),
        &args.routers_config(),
        args.routers.contains(&Choice::KubeProxy),
        dir,
    )
    .await?;
    say(&format!(
        "routers: {}",
        args.routers
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut lab = lab;
    lab.set_routers(routers);
    Ok((lab, observer))
}

/// `--hold` and `--exec`: what the user asked to do with the lab up.
async fn before_rollouts(
    args: &LabArgs,
    lab: &Lab,
    observer: &Observer,
    say: impl Fn(&str),
) -> Result<()> {
    if let Some(hold) = args.hold {
        print_access(lab, observer);
        say(&format!(
            "holding the lab for {} s before the rollouts (Ctrl-C ends it)",
            hold.as_secs_f64()
        ));
        tokio::time::sleep(hold).await;
    }
    if let Some(command) = &args.exec {
        say(&format!(
            "--exec in {}: {command}",
            lab.cluster.nodes[0].name
        ));
        exec_in_node(lab, command).await?;
    }
    Ok(())
}

/// The agents' CPU without traffic, ms per second: the floor the traffic's
/// cost is read against. `None` when an agent's CPU could not be read.
async fn idle_cpu_ms_per_second(observer: &Observer) -> Option<f64> {
    let before = observer.agent_cpu();
    tokio::time::sleep(IDLE_SAMPLE).await;
    let mut idle = BTreeMap::new();
    report::add_cpu_delta(&mut idle, &before, &observer.agent_cpu());
    (idle.len() == observer.agents.len())
        .then(|| idle.values().sum::<f64>() * 1000.0 / IDLE_SAMPLE.as_secs_f64())
}

/// Asks the aggregator for the Service's recommendation and says what it is.
async fn recommendation(
    observer: &Observer,
    when: &str,
    say: impl Fn(&str),
) -> Result<Recommendation> {
    let r = observer
        .aggregator
        .recommendation(api::NAMESPACE, api::SERVICE)
        .await?;
    say(&format!(
        "recommendation {when}: preStop {} from {} samples{}",
        r.pre_stop_seconds
            .map_or_else(|| "none".into(), |s| format!("{s} s")),
        r.samples,
        if r.low_confidence {
            " (low confidence)"
        } else {
            ""
        }
    ));
    Ok(r)
}

/// The rollouts run so far, with the agents' CPU over their traffic and
/// what every part of the lab cost meanwhile.
struct Rollouts {
    runs: Vec<(String, RolloutResult)>,
    traffic_cpu: BTreeMap<String, f64>,
    sampler: cost::Sampler,
    cost: LabCost,
}

impl Rollouts {
    fn new() -> Self {
        Rollouts {
            runs: Vec::new(),
            traffic_cpu: BTreeMap::new(),
            sampler: cost::Sampler::start(),
            cost: LabCost::default(),
        }
    }

    /// One rolling update with `pre_stop_seconds`. The agents' CPU is
    /// counted while its traffic runs (clients start with it and stop when
    /// it returns), never over their start-up.
    async fn run(
        &mut self,
        lab: &mut Lab,
        observer: &Observer,
        args: &LabArgs,
        name: &str,
        pre_stop_seconds: u64,
        say: impl Fn(&str),
    ) -> Result<&RolloutResult> {
        say(&format!(
            "rollout {} ({name}), preStop {pre_stop_seconds} s",
            self.runs.len() + 1
        ));
        self.run_config(
            lab,
            observer,
            name,
            rollout_config(args, pre_stop_seconds, None),
            say,
        )
        .await
    }

    /// One rolling update whose pods run the adaptive drain `hook`.
    async fn run_drained(
        &mut self,
        lab: &mut Lab,
        observer: &Observer,
        args: &LabArgs,
        hook: Arc<DrainHook>,
        say: impl Fn(&str),
    ) -> Result<&RolloutResult> {
        say(&format!(
            "rollout {} (adaptive), prestop-drain falling back to {} s, max {} s",
            self.runs.len() + 1,
            hook.fallback.as_secs(),
            hook.max.as_secs_f64()
        ));
        let fallback = hook.fallback.as_secs();
        let config = rollout_config(args, fallback, Some(hook));
        self.run_config(lab, observer, "adaptive", config, say)
            .await
    }

    async fn run_config(
        &mut self,
        lab: &mut Lab,
        observer: &Observer,
        name: &str,
        config: RolloutConfig,
        say: impl Fn(&str),
    ) -> Result<&RolloutResult> {
        let before = observer.agent_cpu();
        let (parts_before, machine_before) = (self.sampler.totals(), cost::machine_cpu_seconds());
        let result = lab.rollout(&config, &say).await?;
        report::add_cpu_delta(&mut self.traffic_cpu, &before, &observer.agent_cpu());
        let machine = machine_before
            .zip(cost::machine_cpu_seconds())
            .map(|(b, a)| a - b);
        self.cost.add(
            &cost::delta(&parts_before, &self.sampler.totals()),
            result.seconds,
            machine,
        );
        self.runs.push((name.to_owned(), result));
        Ok(&self.runs[self.runs.len() - 1].1)
    }

    /// Waits for every deletion to be measured and joins the aggregator's
    /// records with the lab's truth.
    async fn report(
        mut self,
        lab: &Lab,
        args: &LabArgs,
        observer: &Observer,
        binaries: &LabBinaries,
        idle_ms_per_second: Option<f64>,
        recommendation: Recommendation,
    ) -> Result<Report> {
        let all: Vec<_> = self
            .runs
            .iter()
            .flat_map(|(_, r)| r.deletions.iter().cloned())
            .collect();
        let records = observer.wait_complete(&all).await?;
        let new_pods: Vec<_> = self
            .runs
            .iter()
            .map(|(name, r)| (name.clone(), r.new_pods.clone()))
            .collect();
        let all_new: Vec<_> = new_pods.iter().flat_map(|(_, p)| p.clone()).collect();
        let startup = StartupSection::new(
            &new_pods,
            &startup::wait_measured(observer, &all_new).await?,
        );
        let node_names: Vec<String> = lab.nodes().into_iter().map(|n| n.name).collect();
        let routers = routers::report::infos(&node_names, lab.routers());
        let mut deletions = Vec::new();
        for (name, run) in &self.runs {
            for truth in &run.deletions {
                let record = records.iter().find(|r| r.pod_uid == truth.uid);
                deletions.push(report::deletion_report(name, truth, record, &routers));
            }
        }
        // A router's list holds the ready pods and those it has not let go
        // of yet: at most pods + deletions.
        let gap_ms = routers::report::connection_gap_ms(args.pods + args.deletions, args.rate);
        let connections = self
            .runs
            .iter()
            .map(|(_, r)| r.new_connection.connections + r.keep_alive.connections)
            .sum();
        let traffic_seconds = self.runs.iter().map(|(_, r)| r.seconds).sum();
        self.cost.aggregator_peak_rss_mib = observer.aggregator.peak_rss_mib();
        Ok(Report {
            lab_cost: self.cost,
            agent_cost: AgentCost::new(
                &binaries.profile,
                self.traffic_cpu,
                traffic_seconds,
                connections,
                idle_ms_per_second,
            ),
            nodes: lab.nodes(),
            startup,
            accuracy: report::accuracy(&deletions),
            folklore: routers::report::folklore(&deletions, FOLKLORE_SECONDS),
            folklore_seconds: FOLKLORE_SECONDS,
            rollout_pods: args.deletions,
            router_accuracy: routers::report::accuracy(
                deletions.iter().flat_map(|d| &d.per_router),
                gap_ms,
            ),
            deletions,
            recommendation: Some(recommendation),
            runs: self
                .runs
                .iter()
                .map(|(name, r)| RunReport::new(name, r, &routers))
                .collect(),
            routers,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lab: LabArgs,
    }

    fn args(flags: &[&str]) -> LabArgs {
        Cli::parse_from(std::iter::once("lab-run").chain(flags.iter().copied())).lab
    }

    #[test]
    fn more_deletions_than_pods_is_refused_with_both_numbers() {
        let e = validate(&args(&["--pods", "20", "--deletions", "100"])).unwrap_err();
        assert!(
            e.to_string().contains("--deletions 100 exceeds --pods 20"),
            "{e}"
        );
        validate(&args(&[
            "--nodes",
            "10",
            "--pods",
            "100",
            "--deletions",
            "100",
        ]))
        .unwrap();
        validate(&args(&[])).unwrap();
    }
}
