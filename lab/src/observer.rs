//! The system under test as processes: the real `aggregator` in the
//! control-plane namespace and one real `observer-agent run` per node, and
//! the aggregator's HTTP API as the lab reads it.
//!
//! The aggregator listens on the underlay address of the control plane, so
//! agents reach it from their nodes the way a DaemonSet reaches a Service;
//! the lab reads its HTTP API from a thread inside the control-plane
//! namespace. Nothing listens in the host namespace.
//!
//! Security is on as deployed: the aggregator serves gRPC with a
//! certificate of the lab's own CA ([`crate::tls`]), each agent verifies it
//! and sends a token of its node's agent pod ([`crate::identity`]), and the
//! lab reads `/v1/deletions` with a reader's token.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use apiserver_double::ApiServerDouble;

use observer_proto::api::{DeletionList, DeletionRecord, DeletionSummary, Recommendation};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::process::{Child, Command};

use crate::{
    cgroup::CpuGroup,
    http_client::{Bearer, HttpClient, HttpClientError},
    identity,
    kube::ApiServer,
    kubeproxy::CiliumNode,
    netns::NetNs,
    scenario::{DeletionTruth, Lab},
    topology::{CONTROL_PLANE_IP, Node},
};

pub const GRPC_PORT: u16 = 50051;
pub const HTTP_PORT: u16 = 8080;
/// Summaries per page the lab asks for: the API's largest page.
const PAGE: usize = 1000;
/// Agents' health endpoints, on each node's loopback.
pub const AGENT_HEALTH_PORT: u16 = 9101;

#[derive(Debug, Error)]
pub enum ObserverError {
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} exited: {status}; see {log}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("aggregator HTTP {path}: {reason}")]
    Api { path: String, reason: String },
    #[error("aggregator HTTP API: {0}")]
    Http(#[from] HttpClientError),
    #[error("agent on {node}: {source}")]
    Agent {
        node: String,
        source: HttpClientError,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("credentials: {0}")]
    Credentials(String),
}

/// The API group the aggregator's access checks name (its
/// `observer.prestop.dev`, as deploy/'s reader Role grants it).
const ACCESS_GROUP: &str = "observer.prestop.dev";

/// Files a cluster would mount: the aggregator's certificate Secret, the
/// CA agents verify with.
#[derive(Clone, Debug)]
pub struct Security {
    pub tls: crate::tls::TlsFiles,
    /// A token allowed to read the HTTP API (renewed while the lab runs),
    /// and the file holding it (for curl in `--hold`).
    pub reader: Bearer,
    pub reader_file: PathBuf,
}

/// What an agent presents: its token file and the CA file.
#[derive(Clone, Debug)]
pub struct AgentCredentials {
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

/// The binaries under test and how the aggregator is run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub aggregator: PathBuf,
    pub agent: PathBuf,
    /// The aggregator's `--completion-timeout`: how long it waits for a
    /// node's report before it finishes a deletion with that node missing.
    pub completion_timeout: Duration,
}

/// A child process that is killed when dropped, with its output in a log
/// file.
#[derive(Debug)]
struct Managed {
    what: String,
    log: PathBuf,
    child: Child,
}

impl Managed {
    fn spawn(what: String, mut cmd: Command, log: PathBuf) -> Result<Self, ObserverError> {
        let spawn_err = |source| ObserverError::Spawn {
            what: what.clone(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        Ok(Managed { what, log, child })
    }

    /// Fails if the process has exited.
    fn check(&mut self) -> Result<(), ObserverError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ObserverError::Exited {
                what: self.what.clone(),
                status,
                log: self.log.display().to_string(),
            }),
            _ => Ok(()),
        }
    }

    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The aggregator process.
#[derive(Debug)]
pub struct Aggregator {
    binary: PathBuf,
    completion_timeout: Duration,
    http: HttpClient,
    netns_name: String,
    kubeconfig: PathBuf,
    store: PathBuf,
    log: PathBuf,
    tls: crate::tls::TlsFiles,
    process: Option<Managed>,
    /// Its own CPU share, as its pod's cgroup gives it (`crate::cgroup`);
    /// after the process, which is dropped (killed) first.
    cgroup: Option<CpuGroup>,
}

impl Aggregator {
    /// The agents' view of the aggregator.
    pub fn grpc_url() -> String {
        format!("https://{CONTROL_PLANE_IP}:{GRPC_PORT}")
    }

    /// Its HTTP API (recommendations, deletions), from any lab namespace.
    pub fn http_url(&self) -> String {
        format!("http://{CONTROL_PLANE_IP}:{HTTP_PORT}")
    }

    /// Starts the aggregator in `control_plane`, watching the API described
    /// by `kubeconfig`, keeping its store in `dir`.
    pub async fn start(
        binary: &Path,
        control_plane: &NetNs,
        kubeconfig: &Path,
        dir: &Path,
        completion_timeout: Duration,
        security: &Security,
    ) -> Result<Self, ObserverError> {
        let mut aggregator = Aggregator {
            binary: binary.to_owned(),
            completion_timeout,
            http: HttpClient::in_netns(&control_plane.path()).with_shared_bearer(&security.reader),
            tls: security.tls.clone(),
            netns_name: control_plane.name().to_owned(),
            kubeconfig: kubeconfig.to_owned(),
            store: dir.join("aggregator.sqlite"),
            log: dir.join("aggregator.log"),
            cgroup: CpuGroup::create(&format!("lab-{}-aggregator", std::process::id()))
                .map_err(|e| {
                    eprintln!(
                        "lab: the aggregator shares the lab's cgroup ({e}): on a saturated machine its SCHED_IDLE threads may starve"
                    )
                })
                .ok(),
            process: None,
        };
        aggregator.restart().await?;
        Ok(aggregator)
    }

    /// Starts the process again (after [`Aggregator::kill`]) on the same
    /// store, and waits until its HTTP API answers.
    pub async fn restart(&mut self) -> Result<(), ObserverError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns_name])
            .arg(&self.binary)
            .args([
                "--grpc-addr",
                &format!("{CONTROL_PLANE_IP}:{GRPC_PORT}"),
                "--http-addr",
                &format!("{CONTROL_PLANE_IP}:{HTTP_PORT}"),
                "--cluster-name",
                "lab",
                "--completion-timeout",
                &format!("{}ms", self.completion_timeout.as_millis()),
                "--store",
            ])
            .arg(&self.store)
            .arg("--tls-cert-file")
            .arg(&self.tls.cert)
            .arg("--tls-key-file")
            .arg(&self.tls.key)
            .env("KUBECONFIG", &self.kubeconfig);
        let mut process = Managed::spawn("aggregator".into(), cmd, self.log.clone())?;
        // `ip netns exec` execs the aggregator: the same process.
        if let (Some(group), Some(pid)) = (&self.cgroup, process.child.id())
            && let Err(e) = group.add(pid)
        {
            eprintln!("lab: the aggregator stays in the lab's cgroup: {e}");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            process.check()?;
            if self.get("/readyz").await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ObserverError::Timeout(format!(
                    "aggregator not ready after 20 s; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.process = Some(process);
        Ok(())
    }

    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().await;
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Peak resident memory of the running process, MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        crate::cost::peak_rss_mib(self.process.as_ref()?.child.id()?)
    }

    /// GET `path` from the HTTP API; the body of a 2xx answer.
    pub async fn get(&self, path: &str) -> Result<String, ObserverError> {
        let url = format!("{}{path}", self.http_url());
        Ok(self.http.get_ok(&url).await?.text())
    }

    /// GET `path` from the HTTP API and decode its JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ObserverError> {
        let url = format!("{}{path}", self.http_url());
        Ok(self.http.get_json(&url).await?)
    }

    pub async fn recommendation(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Recommendation, ObserverError> {
        self.get_json(&format!(
            "/v1/recommendations?namespace={namespace}&service={service}"
        ))
        .await
    }

    /// Every finished deletion of the service, as summaries: every page of
    /// `/v1/deletions`, newest first.
    pub async fn summaries(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Vec<DeletionSummary>, ObserverError> {
        let first = format!("/v1/deletions?namespace={namespace}&service={service}&limit={PAGE}");
        let mut page: DeletionList = self.get_json(&first).await?;
        let mut summaries = Vec::new();
        loop {
            summaries.append(&mut page.items);
            let Some(token) = page.continue_token else {
                return Ok(summaries);
            };
            page = self.get_json(&format!("{first}&continue={token}")).await?;
        }
    }

    /// One deletion with its per-node and per-router detail.
    pub async fn deletion(&self, pod_uid: &str) -> Result<DeletionRecord, ObserverError> {
        self.get_json(&format!("/v1/deletions/{pod_uid}")).await
    }

    /// Every finished deletion of the service with its detail: the pages
    /// of summaries, then each one's `/v1/deletions/{podUid}`.
    pub async fn deletions(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Vec<DeletionRecord>, ObserverError> {
        let mut records = Vec::new();
        for summary in self.summaries(namespace, service).await? {
            records.push(self.deletion(&summary.pod_uid).await?);
        }
        Ok(records)
    }
}

/// One node's agent process.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    binary: PathBuf,
    netns: PathBuf,
    http: HttpClient,
    log: PathBuf,
    credentials: AgentCredentials,
    /// cilium nodes: the maps and writer the Cilium detector follows.
    cilium: Option<CiliumNode>,
    process: Option<Managed>,
}

impl Agent {
    /// Starts `observer-agent run` for `node`, inside its namespace.
    pub fn start(
        binary: &Path,
        node: &Node,
        dir: &Path,
        credentials: AgentCredentials,
        cilium: Option<CiliumNode>,
    ) -> Result<Self, ObserverError> {
        let mut agent = Agent {
            credentials,
            cilium,
            node: node.name.clone(),
            binary: binary.to_owned(),
            netns: node.ns.path(),
            http: HttpClient::in_netns(&node.ns.path()),
            log: dir.join(format!("agent-{}.log", node.name)),
            process: None,
        };
        agent.restart()?;
        Ok(agent)
    }

    pub fn restart(&mut self) -> Result<(), ObserverError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--netns").arg(&self.netns).args([
            "run",
            "--aggregator",
            &Aggregator::grpc_url(),
            "--node-name",
            &self.node,
            "--health-addr",
            &format!("127.0.0.1:{AGENT_HEALTH_PORT}"),
        ]);
        cmd.arg("--token-file")
            .arg(&self.credentials.token_file)
            .arg("--ca-file")
            .arg(&self.credentials.ca_file);
        if let Some(cilium) = &self.cilium {
            cmd.arg("--cilium-pin-dir")
                .arg(&cilium.pin_dir)
                .args(["--cilium-writer-comm", &cilium.writer_comm])
                .args(["--cilium-writer-pid", &cilium.writer_pid.to_string()]);
        }
        self.process = Some(Managed::spawn(
            format!("agent on {}", self.node),
            cmd,
            self.log.clone(),
        )?);
        Ok(())
    }

    /// Fails if the agent process has exited.
    pub fn check(&mut self) -> Result<(), ObserverError> {
        match &mut self.process {
            Some(p) => p.check(),
            None => Ok(()),
        }
    }

    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().await;
        }
    }

    /// GET `path` from the agent's health endpoint (on its node's
    /// loopback); the body of a 200 answer.
    pub async fn get(&self, path: &str) -> Result<String, ObserverError> {
        let url = format!("http://127.0.0.1:{AGENT_HEALTH_PORT}{path}");
        let answer = self.http.get_ok(&url).await;
        answer.map(|r| r.text()).map_err(|e| ObserverError::Agent {
            node: self.node.clone(),
            source: e,
        })
    }

    /// One sample of the agent's Prometheus metrics: the value of the line
    /// starting with `series` (name and labels, e.g.
    /// `prestop_agent_observations_total{kind="rules_removed"}`); 0 when the
    /// series has no sample yet.
    pub async fn metric(&self, series: &str) -> Result<f64, ObserverError> {
        let metrics = self.get("/metrics").await?;
        Ok(metrics
            .lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse::<f64>().ok())?
            })
            .unwrap_or(0.0))
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU time (user + system) the running agent process has used.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.process.as_ref()?.child.id()?;
        crate::cost::ProcStat::read(Path::new(&format!("/proc/{pid}/stat"))).map(|s| s.cpu_seconds)
    }
}

/// The observer under test, running against the lab: API double,
/// aggregator, agents.
pub struct Observer {
    pub aggregator: Aggregator,
    pub agents: Vec<Agent>,
    api: ApiServer,
    security: Security,
    renewal: Option<TokenRenewal>,
}

/// Resources of the aggregator's API group the lab's reader may `get`.
const READER_RESOURCES: &[&str] = &["deletions", "recommendations"];

/// The kubelet renews a projected token at 80 % of its lifetime.
const TOKEN_RENEWAL: Duration =
    Duration::from_secs(identity::TOKEN_SECONDS.unsigned_abs() * 8 / 10);

/// Renews the agents' token files and the reader's token as the kubelet
/// renews projected tokens (runs longer than a token's 10 minutes were
/// refused), until dropped.
struct TokenRenewal(tokio::task::JoinHandle<()>);

impl Drop for TokenRenewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TokenRenewal {
    fn start(
        double: Arc<ApiServerDouble>,
        agents: Vec<(String, PathBuf)>,
        reader: Bearer,
        reader_file: PathBuf,
    ) -> Self {
        Self(tokio::spawn(async move {
            let start = tokio::time::Instant::now() + TOKEN_RENEWAL;
            let mut every = tokio::time::interval_at(start, TOKEN_RENEWAL);
            loop {
                every.tick().await;
                for (node, file) in &agents {
                    let renewed = identity::agent_token(&double, node, identity::AUDIENCE)
                        .map_err(|e| e.to_string())
                        .and_then(|t| replace_file(file, &t));
                    if let Err(e) = renewed {
                        eprintln!("lab: renewing the token of node {node}'s agent: {e}");
                    }
                }
                match identity::reader_token(&double, ACCESS_GROUP, READER_RESOURCES) {
                    Ok(t) => {
                        reader.set(&t);
                        if let Err(e) = replace_file(&reader_file, &t) {
                            eprintln!("lab: {e}");
                        }
                    }
                    Err(e) => eprintln!("lab: renewing the reader's token: {e}"),
                }
            }
        }))
    }
}

/// Writes `contents` to `path` at once (a reader never sees half a token),
/// as the kubelet swaps a projected volume's files.
fn replace_file(path: &Path, contents: &str) -> Result<(), String> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// How long past its completion timeout the aggregator may take to show a
/// finished deletion.
const COMPLETION_SLACK: Duration = Duration::from_secs(10);

impl Observer {
    /// Starts the API double (seeded with the lab's nodes, pods and
    /// EndpointSlice), the aggregator and one agent per node, and waits
    /// until every agent is connected.
    pub async fn start(lab: &Lab, binaries: &Binaries, dir: &Path) -> Result<Self, ObserverError> {
        let mut observer = Self::start_control_plane(lab, binaries, dir).await?;
        observer.start_agents(lab, binaries, dir).await?;
        Ok(observer)
    }

    /// The API double and the aggregator, no agent yet.
    pub async fn start_control_plane(
        lab: &Lab,
        binaries: &Binaries,
        dir: &Path,
    ) -> Result<Self, ObserverError> {
        let api = ApiServer::start(&lab.cluster.control_plane, dir, &lab.nodes())
            .await
            .map_err(|e| ObserverError::Api {
                path: "API double".into(),
                reason: e.to_string(),
            })?;
        lab.mirror_to(api.mirror());
        api.serve_deletions(lab.kubelet());
        // A fresh store and logs per lab; restarts within it append.
        let mut stale = vec![dir.join("aggregator.sqlite"), dir.join("aggregator.log")];
        stale.extend(
            lab.cluster
                .nodes
                .iter()
                .map(|n| dir.join(format!("agent-{}.log", n.name))),
        );
        for file in stale {
            let _ = std::fs::remove_file(file);
        }
        let reader = identity::reader_token(api.double(), ACCESS_GROUP, READER_RESOURCES)
            .map_err(|e| ObserverError::Credentials(e.to_string()))?;
        let reader_file = dir.join("reader-token");
        std::fs::write(&reader_file, &reader).map_err(|e| {
            ObserverError::Credentials(format!("writing {}: {e}", reader_file.display()))
        })?;
        let security = Security {
            tls: crate::tls::LabCa::generate(&[&CONTROL_PLANE_IP.to_string()])
                .and_then(|ca| ca.write(dir))
                .map_err(|e| ObserverError::Credentials(e.to_string()))?,
            reader: Bearer::new(&reader),
            reader_file,
        };
        let aggregator = Aggregator::start(
            &binaries.aggregator,
            &lab.cluster.control_plane,
            api.kubeconfig(),
            dir,
            binaries.completion_timeout,
            &security,
        )
        .await?;
        Ok(Observer {
            aggregator,
            agents: Vec::new(),
            api,
            security,
            renewal: None,
        })
    }

    /// One agent per node; waits until all are connected.
    pub async fn start_agents(
        &mut self,
        lab: &Lab,
        binaries: &Binaries,
        dir: &Path,
    ) -> Result<(), ObserverError> {
        for (index, node) in lab.cluster.nodes.iter().enumerate() {
            let token = identity::agent_token(self.api.double(), &node.name, identity::AUDIENCE)
                .map_err(|e| ObserverError::Credentials(e.to_string()))?;
            let token_file = dir.join(format!("token-{}", node.name));
            replace_file(&token_file, &token).map_err(ObserverError::Credentials)?;
            let credentials = AgentCredentials {
                token_file,
                ca_file: self.security.tls.ca.clone(),
            };
            self.agents.push(Agent::start(
                &binaries.agent,
                node,
                dir,
                credentials,
                lab.cilium_node(index).cloned(),
            )?);
        }
        self.renewal = Some(TokenRenewal::start(
            self.api.shared_double(),
            self.agents
                .iter()
                .map(|a| (a.node.clone(), a.credentials.token_file.clone()))
                .collect(),
            self.security.reader.clone(),
            self.security.reader_file.clone(),
        ));
        self.wait_connected(lab.cluster.nodes.len()).await
    }

    /// CPU seconds each agent has used so far.
    pub fn agent_cpu(&self) -> crate::report::CpuSample {
        self.agents
            .iter()
            .map(|a| (a.node.clone(), a.cpu_seconds()))
            .collect()
    }

    /// The certificates and the reader's token of this run.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// The Kubernetes API the aggregator watches.
    pub fn api(&self) -> &ApiServer {
        &self.api
    }

    /// Agents the aggregator counts as connected (its metrics).
    pub async fn connected_agents(&self) -> Result<u64, ObserverError> {
        let metrics = self.aggregator.get("/metrics").await?;
        Ok(metrics
            .lines()
            .filter(|l| l.starts_with("prestop_agents_connected"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    pub async fn wait_connected(&self, agents: usize) -> Result<(), ObserverError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.connected_agents().await.unwrap_or(0) >= agents as u64 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ObserverError::Timeout(format!(
                    "{agents} agents did not all connect within 30 s; see the agent logs next to {}",
                    self.aggregator.log().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the aggregator has finished every one of `deletions`
    /// (complete, or timed out with missing nodes), then reads their
    /// detail. It polls the pages of summaries, whose size does not grow
    /// with the nodes, and reads each detail once: at a hundred deletions
    /// per rollout, re-reading every detail on each poll was the lab's
    /// largest load on the aggregator.
    pub async fn wait_complete(
        &self,
        deletions: &[DeletionTruth],
    ) -> Result<Vec<DeletionRecord>, ObserverError> {
        let wait = self.aggregator.completion_timeout + COMPLETION_SLACK;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let finished: std::collections::HashSet<String> = self
                .aggregator
                .summaries(crate::api::NAMESPACE, crate::api::SERVICE)
                .await?
                .into_iter()
                .map(|s| s.pod_uid)
                .collect();
            let found = deletions
                .iter()
                .filter(|d| finished.contains(&d.uid))
                .count();
            if found == deletions.len() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ObserverError::Timeout(format!(
                    "the aggregator finished {found} of {} deletions within {wait:?}",
                    deletions.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut records = Vec::with_capacity(deletions.len());
        for d in deletions {
            records.push(self.aggregator.deletion(&d.uid).await?);
        }
        Ok(records)
    }

    pub async fn shutdown(mut self) {
        for agent in &mut self.agents {
            agent.kill().await;
        }
        self.aggregator.kill().await;
    }
}
