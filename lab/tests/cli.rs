//! The lab's command line, run the way `cargo xtask lab` runs it once the
//! binaries are built (`lab-run --bin-dir target/<profile> ...`), with small
//! parameters: the report it writes, the three-rollout story, a third-party
//! client against the lab, and that nothing of the lab is left afterwards,
//! whether it finished, was interrupted or failed.

mod common;

use std::{
    fs,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Marks every process of one lab run (inherited by all its children) so
/// leftovers can be found whatever their parent has become.
const TAG_ENV: &str = "LAB_CLI_TEST_TAG";

/// Small enough for a few tens of seconds per run; one node per mode (the
/// default run's), with delays under the folklore 5 s, so the baseline
/// rollout runs with preStop 0.
const SMALL: &[&str] = &[
    "--nodes",
    "4",
    "--pods",
    "3",
    "--deletions",
    "2",
    "--delay",
    "300ms..800ms",
    "--duration",
    "2s",
    "--rate",
    "40",
    "--measure-prestop",
    "2",
    "--seed",
    "7",
    "--routers",
    "kube-proxy",
];

struct LabRun {
    child: Child,
    tag: String,
    dir: PathBuf,
}

impl LabRun {
    fn start(test: &str, extra: &[&str]) -> Self {
        Self::start_with(test, SMALL, extra)
    }

    /// With `base` instead of [`SMALL`] (flags that take one value may be
    /// given once only).
    fn start_with(test: &str, base: &[&str], extra: &[&str]) -> Self {
        let dir = common::work_dir(test);
        let tag = format!("{}-{test}", std::process::id());
        let bin_dir = common::pod_server()
            .parent()
            .expect("target dir")
            .to_owned();
        let child = Command::new(env!("CARGO_BIN_EXE_lab-run"))
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(base)
            .args(extra)
            .arg("--report")
            .arg(dir.join("report.json"))
            .env(TAG_ENV, &tag)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("stdout")).expect("stdout file"))
            .stderr(fs::File::create(dir.join("stderr")).expect("stderr file"))
            // Its own process group, as a shell job: a terminal's Ctrl-C
            // goes to the whole group.
            .process_group(0)
            .spawn()
            .expect("start lab-run");
        LabRun { child, tag, dir }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn output(&self, stream: &str) -> String {
        fs::read_to_string(self.dir.join(stream)).unwrap_or_default()
    }

    fn outputs(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.output("stdout"),
            self.output("stderr")
        )
    }

    /// Waits until `stream` contains `needle`; panics (with the output) if
    /// the process ends first or `timeout` passes.
    fn wait_for(&mut self, stream: &str, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output(stream).contains(needle) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "lab-run ended ({status}) before printing `{needle}`\n{}",
                    self.outputs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` within {timeout:?}\n{}",
                self.outputs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "lab-run still running after {timeout:?}\n{}",
                    self.outputs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn report(&self) -> Value {
        let text = fs::read_to_string(self.dir.join("report.json"))
            .unwrap_or_else(|e| panic!("report.json: {e}\n{}", self.outputs()));
        serde_json::from_str(&text).expect("report.json is JSON")
    }
}

/// Live processes carrying `tag` in their environment: (pid, command).
fn tagged_processes(tag: &str) -> Vec<(u32, String)> {
    let needle = format!("{TAG_ENV}={tag}");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        // Zombies and kernel threads have no environment to read.
        let Ok(environ) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            let cmd = fs::read(entry.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, cmd));
        }
    }
    found
}

/// The lab's rules, anywhere in the host's own netfilter: the Service VIP
/// or kube-proxy's chains.
fn host_lab_rules() -> Vec<String> {
    let mut found = Vec::new();
    for (program, args) in [
        ("nft", &["list", "ruleset"][..]),
        ("iptables-legacy-save", &[][..]),
        ("iptables-nft-save", &[][..]),
    ] {
        let Ok(out) = Command::new(program).args(args).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains(&lab::api::SERVICE_IP.to_string())
                || line.contains("KUBE-")
                || line.contains("kube-proxy")
            {
                found.push(format!("{program}: {line}"));
            }
        }
    }
    found
}

/// The namespaces lab run `pid` created (named after its process id).
fn lab_namespaces(pid: i32) -> Vec<String> {
    let prefix = format!("{}-{pid}-", lab::netns::PREFIX);
    fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that nothing of the lab run `pid` (tagged `tag`) is left: no
/// namespace named after it, no process of it, no lab rule in the host
/// namespace (the nodes' rules lived in their namespaces), no link it
/// created in the host namespace. Processes killed during the teardown may
/// take a moment to be gone; they get a short grace.
fn assert_nothing_left(pid: i32, tag: &str) {
    let namespaces = lab_namespaces(pid);
    assert!(namespaces.is_empty(), "namespaces left: {namespaces:?}");

    let deadline = Instant::now() + Duration::from_secs(2);
    let mut processes = tagged_processes(tag);
    while !processes.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        processes = tagged_processes(tag);
    }
    assert!(processes.is_empty(), "processes left: {processes:?}");

    let rules = host_lab_rules();
    assert!(
        rules.is_empty(),
        "lab rules in the host namespace: {rules:?}"
    );

    // A cilium node's bpffs is mounted in the host's mount namespace,
    // under a directory named after the node's namespace.
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let bpffs: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&format!("lab-bpffs-obslab-{pid}-")))
        .collect();
    assert!(bpffs.is_empty(), "bpffs mounts left: {bpffs:?}");

    // Veth pairs are created in the host namespace under these temporary
    // names before they move (see lab::topology and lab::netns::link).
    let short = pid % 100_000;
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    let left: Vec<&str> = links
        .lines()
        .filter(|l| {
            l.split(':').nth(1).is_some_and(|name| {
                let name = name.trim();
                name.starts_with(&format!("l{short}a"))
                    || name.starts_with(&format!("l{short}b"))
                    || name.starts_with(&format!("v{short}a"))
                    || name.starts_with(&format!("v{short}b"))
            })
        })
        .collect();
    assert!(
        left.is_empty(),
        "links left in the host namespace: {left:?}"
    );
}

fn field<'a>(v: &'a Value, name: &str, context: &str) -> &'a Value {
    v.get(name)
        .unwrap_or_else(|| panic!("{context} has no `{name}`: {v}"))
}

fn string(v: &Value, name: &str, context: &str) -> String {
    field(v, name, context)
        .as_str()
        .unwrap_or_else(|| panic!("{context}.{name} is not a string: {v}"))
        .to_owned()
}

fn number(v: &Value, name: &str, context: &str) -> f64 {
    field(v, name, context)
        .as_f64()
        .unwrap_or_else(|| panic!("{context}.{name} is not a number: {v}"))
}

fn count(v: &Value, name: &str, context: &str) -> u64 {
    field(v, name, context)
        .as_u64()
        .unwrap_or_else(|| panic!("{context}.{name} is not a count: {v}"))
}

fn array<'a>(v: &'a Value, name: &str, context: &str) -> &'a Vec<Value> {
    field(v, name, context)
        .as_array()
        .unwrap_or_else(|| panic!("{context}.{name} is not an array: {v}"))
}

#[test]
fn lab_run_reports_the_three_rollouts_and_leaves_nothing_behind() {
    if !lab::root::root_or_skip("lab_run_reports_the_three_rollouts_and_leaves_nothing_behind") {
        return;
    }
    let _serial = common::SERIAL.blocking_lock();
    let test = "cli-report";
    let hey_out = common::work_dir("cli-report-hey").join("hey.txt");
    let exec = format!("hey -n 200 -c 4 -t 5 \"$LAB_URL\" > {}", hey_out.display());
    let mut run = LabRun::start(test, &["--exec", &exec]);
    let status = run.wait(Duration::from_secs(300));
    assert!(status.success(), "lab-run: {status}\n{}", run.outputs());
    eprintln!("{}", run.outputs());

    // --exec ran `hey` inside a node against the Service VIP.
    let hey = fs::read_to_string(&hey_out).expect("hey output");
    assert!(
        hey.contains("[200]\t200 responses"),
        "hey through --exec:\n{hey}"
    );

    let report = run.report();
    let nodes = array(&report, "nodes", "report");
    let mut node_names = Vec::new();
    let mut modes = Vec::new();
    for n in nodes {
        node_names.push(string(n, "name", "nodes[]"));
        modes.push(string(n, "mode", "nodes[]"));
    }
    // The default modes, one node each.
    assert_eq!(
        modes,
        ["nftables", "iptables-nft", "iptables-legacy", "cilium"],
        "{report}"
    );

    let deletions = array(&report, "deletions", "report");
    assert_eq!(
        deletions.len(),
        3 * 2,
        "two deletions in each of three rollouts"
    );
    for d in deletions {
        string(d, "pod", "deletions[]");
        let per_node = array(d, "perNode", "deletions[]");
        let covered: Vec<String> = per_node
            .iter()
            .map(|n| string(n, "node", "perNode[]"))
            .collect();
        assert_eq!(covered, node_names, "{d}");
        for n in per_node {
            let measured = number(n, "measuredMs", "perNode[]");
            let injected = number(n, "injectedMs", "perNode[]");
            assert!(
                measured > 0.0 && injected > 0.0,
                "a deletion takes time to propagate: {n}"
            );
        }
    }

    let recommendation = field(&report, "recommendation", "report");
    let pre_stop = count(recommendation, "preStopSeconds", "recommendation");
    let samples = count(recommendation, "samples", "recommendation");
    assert!(
        field(recommendation, "lowConfidence", "recommendation").is_boolean(),
        "{recommendation}"
    );
    // The recommendation used for the third rollout rests on the first two.
    assert_eq!(samples, 4, "{recommendation}");

    let runs = array(&report, "runs", "report");
    assert_eq!(runs.len(), 3, "{report}");
    let pre_stops: Vec<f64> = runs
        .iter()
        .map(|r| number(r, "preStopSeconds", "runs[]"))
        .collect();
    let requests: Vec<u64> = runs
        .iter()
        .map(|r| count(r, "requests", "runs[]"))
        .collect();
    let failed: Vec<u64> = runs.iter().map(|r| count(r, "failed", "runs[]")).collect();
    // Measuring with preStop 2 s, then preStop 0 (every injected delay is
    // under the folklore 5 s), then the recommendation.
    assert_eq!(pre_stops, [2.0, 0.0, pre_stop as f64], "{report}");
    assert!(requests.iter().all(|r| *r > 300), "{requests:?}");
    assert!(
        failed[1] > 0,
        "the baseline (preStop 0) lost nothing: {report}"
    );
    assert_eq!(
        failed[2], 0,
        "the recommended preStop lost requests: {report}"
    );

    // The agent CPU figure is over the rollouts' traffic.
    let cost = field(&report, "agentCost", "report");
    assert_eq!(string(cost, "buildProfile", "agentCost"), "debug");
    assert!(number(cost, "trafficSeconds", "agentCost") > 5.0, "{cost}");
    assert!(count(cost, "connections", "agentCost") > 300, "{cost}");
    assert!(
        number(cost, "cpuMsPer10kConnections", "agentCost") > 0.0,
        "{cost}"
    );

    assert_nothing_left(run.pid(), &run.tag);
}

#[test]
fn lab_run_interrupted_mid_rollout_tears_everything_down() {
    if !lab::root::root_or_skip("lab_run_interrupted_mid_rollout_tears_everything_down") {
        return;
    }
    let _serial = common::SERIAL.blocking_lock();
    let mut run = LabRun::start("cli-interrupt", &[]);
    // Mid-rollout: clients running on every node, a pod terminating.
    run.wait_for("stderr", "step 1/", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    let tagged = tagged_processes(&run.tag);
    assert!(
        tagged.len() > 3 + 3,
        "agents, aggregator and pods should run: {tagged:?}"
    );
    // Switch, control plane, 4 nodes, pods.
    let namespaces = lab_namespaces(run.pid());
    assert!(namespaces.len() > 5, "{namespaces:?}");
    // SIGINT to lab-run alone (as `kill -INT`): everything else must be
    // ended by the lab itself.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(run.pid(), libc::SIGINT) }, 0);
    let status = run.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "{status}\n{}", run.outputs());
    assert!(run.output("stderr").contains("interrupted by SIGINT"));
    assert!(!run.dir.join("report.json").exists());
    assert_nothing_left(run.pid(), &run.tag);
}

#[test]
fn lab_run_failing_mid_run_tears_everything_down() {
    if !lab::root::root_or_skip("lab_run_failing_mid_run_tears_everything_down") {
        return;
    }
    let _serial = common::SERIAL.blocking_lock();
    let mut run = LabRun::start("cli-failure", &[]);
    run.wait_for("stderr", "step 1/", Duration::from_secs(120));
    // The injected failure: the aggregator dies, so the lab cannot read its
    // measurements after the rollout.
    let aggregator: Vec<u32> = tagged_processes(&run.tag)
        .into_iter()
        .filter(|(pid, _)| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "aggregator"))
        })
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(aggregator.len(), 1, "{:?}", tagged_processes(&run.tag));
    // SAFETY: kill(2) on a process of our own child's lab.
    assert_eq!(
        unsafe { libc::kill(aggregator[0] as i32, libc::SIGKILL) },
        0
    );
    let status = run.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(1), "{status}\n{}", run.outputs());
    assert!(
        run.output("stderr").contains("aggregator"),
        "the failure names the aggregator\n{}",
        run.outputs()
    );
    assert_nothing_left(run.pid(), &run.tag);
}

/// The `ip netns exec NODE hey -z 5s http://VIP/` lines `--hold` prints.
fn hey_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| Some(l.split_once("): ")?.1.trim().to_owned()))
        .filter(|c| c.starts_with("ip netns exec ") && c.contains(" hey "))
        .collect()
}

/// The printed `ip netns exec CP kubectl --kubeconfig ... get pods -o wide`.
fn kubectl_line(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ip netns exec ") && l.contains(" kubectl "))
        .map(str::to_owned)
}

#[test]
fn lab_run_hold_prints_hey_commands_that_work_against_the_lab() {
    if !lab::root::root_or_skip("lab_run_hold_prints_hey_commands_that_work_against_the_lab") {
        return;
    }
    let _serial = common::SERIAL.blocking_lock();
    let mut run = LabRun::start("cli-hold", &["--hold", "120s"]);
    run.wait_for("stderr", "holding the lab", Duration::from_secs(120));
    let lines = hey_lines(&run.output("stdout"));
    assert_eq!(
        lines.len(),
        4,
        "one per node (the default)\n{}",
        run.outputs()
    );
    // Exactly the printed commands, from every node at once.
    let heys: Vec<_> = lines
        .iter()
        .map(|line| {
            Command::new("sh")
                .args(["-c", line])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run the printed hey line")
        })
        .collect();
    for (line, hey) in lines.iter().zip(heys) {
        let out = hey.wait_with_output().expect("hey");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{line}: {text}");
        let ok: u64 = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("[200]")?
                    .trim()
                    .strip_suffix(" responses")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        assert!(ok > 100, "{line}: too few OKs\n{text}");
        assert!(!text.contains("Error distribution"), "{line}:\n{text}");
    }
    // The printed kubectl line lists the lab's pods as they run.
    let stdout = run.output("stdout");
    let line = kubectl_line(&stdout).unwrap_or_else(|| panic!("no kubectl line\n{stdout}"));
    let out = Command::new("sh")
        .args(["-c", &line])
        .stdin(Stdio::null())
        .output()
        .expect("run the printed kubectl line");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{line}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("web-") && l.contains(" Running "))
            .count(),
        3,
        "{line}:\n{text}"
    );
    assert!(
        stdout.contains("/v1/deletions"),
        "--hold does not say where kubectl's deletions are measured\n{stdout}"
    );
    // Ctrl-C in a terminal: SIGINT to the whole process group.
    // SAFETY: kill(2) on our own child's process group.
    assert_eq!(unsafe { libc::kill(-run.pid(), libc::SIGINT) }, 0);
    let status = run.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "{status}\n{}", run.outputs());
    assert_nothing_left(run.pid(), &run.tag);
}

#[test]
fn lab_run_with_every_router_reports_each_and_the_folklore_loses_through_the_slow_one() {
    if !lab::root::root_or_skip(
        "lab_run_with_every_router_reports_each_and_the_folklore_loses_through_the_slow_one",
    ) {
        return;
    }
    let _serial = common::SERIAL.blocking_lock();
    // Appended to SMALL's kube-proxy: every router. The ingress reloads
    // after the folklore 5 s, so the baseline uses it.
    // SMALL (all its flags take one value) but for its measuring preStop,
    // which must outlast the ingress.
    let base: Vec<&str> = SMALL
        .chunks(2)
        .filter(|flag| flag[0] != "--measure-prestop")
        .flatten()
        .copied()
        .collect();
    let mut run = LabRun::start_with(
        "cli-routers",
        &base,
        &[
            "--routers",
            "ingress,client-side,external",
            "--ingress-delay",
            "5500ms..6s",
            "--client-side-refresh",
            "1s",
            "--external-delay",
            "500ms..1s",
            "--measure-prestop",
            "7",
        ],
    );
    let status = run.wait(Duration::from_secs(300));
    assert!(status.success(), "lab-run: {status}\n{}", run.outputs());
    eprintln!("{}", run.outputs());
    let report = run.report();

    let routers = array(&report, "routers", "report");
    let described: Vec<(String, String)> = routers
        .iter()
        .map(|r| {
            (
                string(r, "type", "routers[]"),
                string(r, "kind", "routers[]"),
            )
        })
        .collect();
    // Every node's proxy (cilium's included), then the other routers.
    let nodes = array(&report, "nodes", "report").len();
    assert_eq!(nodes, 4, "the default lab: one node per mode");
    let expected: Vec<(String, String)> = std::iter::repeat_n(("kube-proxy", "node"), nodes)
        .chain([
            ("ingress", "workload"),
            ("client-side", "workload"),
            ("external", "external"),
        ])
        .map(|(t, k)| (t.to_string(), k.to_string()))
        .collect();
    assert_eq!(described, expected, "{report}");
    let names: Vec<String> = routers
        .iter()
        .map(|r| string(r, "name", "routers[]"))
        .collect();

    for d in array(&report, "deletions", "report") {
        let per_router = array(d, "perRouter", "deletions[]");
        let covered: Vec<String> = per_router
            .iter()
            .map(|p| string(p, "router", "perRouter[]"))
            .collect();
        assert_eq!(covered, names, "{d}");
        // From the aggregator's T0, its receipt of the deletion: a
        // balancer refreshing right after the API changed the slice can
        // drop the pod a moment before that.
        for p in per_router {
            assert!(number(p, "injectedMs", "perRouter[]") > -100.0, "{p}");
        }
    }

    let runs = array(&report, "runs", "report");
    let pre_stops: Vec<f64> = runs
        .iter()
        .map(|r| number(r, "preStopSeconds", "runs[]"))
        .collect();
    assert_eq!(pre_stops[..2], [7.0, 5.0], "{report}");
    for r in runs {
        let by_router = field(r, "byRouter", "runs[]");
        for name in &names {
            assert!(
                count(field(by_router, name, "byRouter"), "requests", "byRouter") > 50,
                "{name} carried too little traffic: {r}"
            );
        }
    }
    let ingress_failed = |r: &Value| {
        count(
            field(r, "failedByType", "runs[]"),
            "ingress",
            "failedByType",
        )
    };
    assert!(
        ingress_failed(&runs[1]) > 0,
        "the folklore 5 s lost nothing through an ingress reloading after 5.5 s: {report}"
    );
    assert_eq!(count(&runs[2], "failed", "runs[]"), 0, "{report}");
    let types: Vec<String> = array(&report, "routerAccuracy", "report")
        .iter()
        .map(|a| string(a, "type", "routerAccuracy[]"))
        .collect();
    assert_eq!(types, ["kube-proxy", "ingress", "client-side", "external"]);

    assert_nothing_left(run.pid(), &run.tag);
}

/// Issue 18's lab case: node-0 turns slower than anything measured before
/// the last two rollouts. The fixed recommendation loses requests through
/// it; the adaptive drain (the real prestop-drain in each deleted pod,
/// asking the real aggregator with the pod's own token) waits for it and
/// loses none.
#[test]
fn lab_run_adaptive_drain_waits_for_a_slow_node_the_recommendation_misses() {
    if !lab::root::root_or_skip(
        "lab_run_adaptive_drain_waits_for_a_slow_node_the_recommendation_misses",
    ) {
        return;
    }
    let _serial = common::SERIAL.blocking_lock();
    let mut run = LabRun::start(
        "cli-drain",
        &[
            "--adaptive-drain",
            "--slow-node",
            "5s",
            "--drain-max",
            "20s",
        ],
    );
    let status = run.wait(Duration::from_secs(300));
    assert!(status.success(), "lab-run: {status}\n{}", run.outputs());
    eprintln!("{}", run.outputs());
    let report = run.report();
    let runs = array(&report, "runs", "report");
    let names: Vec<String> = runs.iter().map(|r| string(r, "name", "runs[]")).collect();
    assert_eq!(
        names,
        ["measure", "baseline", "recommended", "adaptive"],
        "{report}"
    );
    let (recommended, adaptive) = (&runs[2], &runs[3]);
    let fixed = number(recommended, "preStopSeconds", "runs[]");
    assert!(
        field(adaptive, "adaptiveDrain", "runs[]").as_bool() == Some(true),
        "{adaptive}"
    );
    // The slow node removes a pod 5.3-5.8 s after its deletion, after the
    // recommendation (the measured 0.3-0.8 s plus the margin, rounded up).
    assert!(fixed < 5.3, "recommendation {fixed} s: {report}");
    assert!(
        count(recommended, "failed", "runs[]") > 0,
        "the fixed recommendation lost nothing through the slow node: {recommended}"
    );
    assert_eq!(
        count(adaptive, "failed", "runs[]"),
        0,
        "the adaptive drain lost requests: {adaptive}"
    );
    let time = field(adaptive, "preStopTime", "runs[]");
    let per_pod = field(time, "perPod", "preStopTime")
        .as_object()
        .expect("perPod is an object");
    assert_eq!(per_pod.len(), 2, "{time}");
    for (pod, seconds) in per_pod {
        let seconds = seconds.as_f64().unwrap();
        // Longer than the fixed delay (it waited for the slow node), far
        // shorter than its max: the aggregator answered drained.
        assert!(
            seconds > fixed && seconds < 15.0,
            "{pod}: preStop {seconds} s against the fixed {fixed} s: {adaptive}"
        );
    }
    let hooks = fs::read_to_string(run.dir.join("drain-hooks.log")).expect("drain-hooks.log");
    assert_eq!(hooks.matches("drained after").count(), 2, "{hooks}");
    assert_nothing_left(run.pid(), &run.tag);
}
