//! A small in-process cluster: the API server double, a real aggregator on
//! real sockets, and simulated agents speaking gRPC.
//!
//! An aggregator started with the double runs as deployed: gRPC over TLS,
//! agents and readers authenticated by the double's TokenReview. Its
//! agents' and reader's credentials are kept by its addresses, so
//! [`Agent::connect`] and `common::get` use them without the tests passing
//! them around.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use aggregator::app::{self, Running};
use aggregator::auth::access::{API_GROUP, DELETIONS, RECOMMENDATIONS};
use aggregator::auth::{AuthSettings, TokenSettings, tls};
use aggregator::config::Settings;
use aggregator::store::Store;
use apiserver_double::ApiServerDouble;
use apiserver_double::objects::{endpoint_slice, node, pod};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use lab::identity;
use lab::tls::LabCa;
use observer_proto::v1 as pb;
use observer_proto::v1::observer_client::ObserverClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// One CA for every aggregator of the test process.
pub static CA: LazyLock<LabCa> =
    LazyLock::new(|| LabCa::generate(&["localhost", "127.0.0.1"]).unwrap());

/// What a secured aggregator's clients present.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// Agents' tokens, by node (the Node list when the aggregator started).
    pub agents: HashMap<String, String>,
    /// A reader allowed to get deletions and recommendations.
    pub reader: String,
}

static SECURED: LazyLock<Mutex<HashMap<SocketAddr, Arc<Credentials>>>> =
    LazyLock::new(Mutex::default);

/// The credentials of the secured aggregator listening on `addr` (gRPC or HTTP).
pub fn credentials(addr: SocketAddr) -> Option<Arc<Credentials>> {
    SECURED.lock().unwrap().get(&addr).cloned()
}

/// `settings` with TLS (the files under `dir`) and token checks, as deploy/
/// runs the aggregator.
pub fn secured(settings: Settings, dir: &Path) -> Settings {
    let files = CA.write(dir).unwrap();
    let agents = format!(
        "{}:{}",
        identity::NAMESPACE,
        identity::AGENT_SERVICE_ACCOUNT
    );
    Settings {
        auth: AuthSettings {
            tokens: Some(TokenSettings::new(
                identity::AUDIENCE,
                agents.parse().unwrap(),
                identity::NAMESPACE,
            )),
            tls: Some(tls::TlsFiles {
                cert: files.cert,
                key: files.key,
            }),
        },
        ..settings
    }
}

/// Starts the aggregator; with a double, secured ([`secured`], files next
/// to the store) unless `settings` already say how.
pub async fn start_aggregator(
    settings: Settings,
    store: &PathBuf,
    double: Option<&ApiServerDouble>,
) -> Running {
    let settings = match double {
        Some(_) if settings.auth.tokens.is_none() => {
            secured(settings, store.parent().expect("store in a directory"))
        }
        _ => settings,
    };
    start_as_configured(settings, store, double).await
}

/// Starts the aggregator with `settings` as they are: without tokens and
/// TLS unless they say so (`--insecure-no-auth`), also with a double.
pub async fn start_as_configured(
    settings: Settings,
    store: &PathBuf,
    double: Option<&ApiServerDouble>,
) -> Running {
    let secure = settings.auth.tokens.is_some();
    let store = Arc::new(Store::open(store).unwrap());
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let kube = double.map(ApiServerDouble::kube_config);
    let running = app::start(settings, store, grpc, http, kube).unwrap();
    wait_until("aggregator ready", || {
        let r = running.http.ready.clone();
        async move { r.get() }
    })
    .await;
    if let (Some(d), true) = (double, secure) {
        let creds = Arc::new(mint(d).await);
        let mut secured = SECURED.lock().unwrap();
        secured.insert(running.grpc_addr, Arc::clone(&creds));
        secured.insert(running.http_addr, creds);
    }
    running
}

/// Tokens for every node's agent and for a reader.
async fn mint(double: &ApiServerDouble) -> Credentials {
    let nodes: kube::Api<Node> = kube::Api::all(double.client().unwrap());
    let mut agents = HashMap::new();
    for n in nodes.list(&Default::default()).await.unwrap() {
        let name = n.metadata.name.unwrap();
        let token = identity::agent_token_requested(double, &name, identity::AUDIENCE)
            .await
            .unwrap();
        agents.insert(name, token);
    }
    let reader = identity::reader_token(double, API_GROUP, &[DELETIONS, RECOMMENDATIONS]).unwrap();
    Credentials { agents, reader }
}

/// Sends `authorization: Bearer <token>` with every call (none: no header).
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = ObserverClient<InterceptedService<Channel, Bearer>>;

/// A gRPC client of the aggregator on `grpc`: over TLS (verified against
/// [`CA`]) when it is secured, with `token` if any.
pub async fn client(grpc: SocketAddr, token: Option<&str>) -> Client {
    let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()));
    ObserverClient::with_interceptor(channel(grpc).await, bearer)
}

/// A channel to the aggregator on `grpc`, over TLS when it is secured.
pub async fn channel(grpc: SocketAddr) -> Channel {
    if credentials(grpc).is_some() {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&CA.ca_pem))
            .domain_name("localhost");
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", grpc.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    } else {
        tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

/// The token of `node`'s agent for the secured aggregator on `grpc`.
pub fn agent_token(grpc: SocketAddr, node: &str) -> Option<String> {
    credentials(grpc).map(|c| {
        c.agents
            .get(node)
            .unwrap_or_else(|| panic!("no agent token for {node}: not in the Node list at start"))
            .clone()
    })
}

/// Polls `cond` every 20 ms for up to 10 s.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

pub struct Cluster {
    pub double: ApiServerDouble,
    pub web1: Pod,
}

/// Two nodes; pod web-1 (10.244.0.5) on node-a behind service shop/web.
pub async fn cluster() -> Cluster {
    let double = ApiServerDouble::start().await.unwrap();
    double
        .create(&node("node-a", "192.168.0.1", "10.244.0.0/24"))
        .unwrap();
    double
        .create(&node("node-b", "192.168.0.2", "10.244.1.0/24"))
        .unwrap();
    let web1 = double
        .create(&pod("shop", "web-1", "10.244.0.5", "node-a"))
        .unwrap();
    double
        .create(&endpoint_slice("shop", "web", &[(&web1, true, false)]))
        .unwrap();
    Cluster { double, web1 }
}

/// Pod web-2 (10.244.1.5) on node-b, not behind the Service.
pub fn add_web2(double: &ApiServerDouble) -> Pod {
    double
        .create(&pod("shop", "web-2", "10.244.1.5", "node-b"))
        .unwrap()
}

pub struct Agent {
    pub id: String,
    pub client: Client,
    pub watch: tonic::Streaming<pb::WatchEvent>,
    pub seq: u64,
    /// What `Register` acknowledged (batches up to it need no resend).
    pub acknowledged: u64,
}

impl Agent {
    pub async fn connect(grpc: SocketAddr, node: &str) -> Self {
        Self::connect_as(grpc, node, &format!("{node}/test")).await
    }

    /// An agent process of `node` with its own `id` (a restarted agent
    /// registers under a new one).
    pub async fn connect_as(grpc: SocketAddr, node: &str, id: &str) -> Self {
        let token = agent_token(grpc, node);
        Self::try_connect(grpc, node, id, token.as_deref())
            .await
            .unwrap()
    }

    /// Registers as `node` with `token` and subscribes; the refusal if any.
    pub async fn try_connect(
        grpc: SocketAddr,
        node: &str,
        id: &str,
        token: Option<&str>,
    ) -> Result<Self, tonic::Status> {
        let mut client = client(grpc, token).await;
        let id = id.to_owned();
        let acknowledged = client
            .register(registration(&id, node))
            .await?
            .into_inner()
            .acknowledged_sequence;
        let watch = client
            .watch_endpoints(pb::WatchEndpointsRequest {
                agent_id: id.clone(),
            })
            .await?
            .into_inner();
        Ok(Self {
            id,
            client,
            watch,
            seq: 0,
            acknowledged,
        })
    }

    /// The next add or remove (skipping the snapshot marker), within 5 s.
    pub async fn next_event(&mut self) -> pb::watch_event::Event {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), self.watch.next())
                .await
                .expect("no watch event within 5 s")
                .expect("watch stream ended")
                .expect("watch stream error")
                .event
                .expect("empty watch event");
            if e != pb::watch_event::Event::Synced(pb::Synced {}) {
                return e;
            }
        }
    }

    pub async fn next_add(&mut self) -> pb::WatchedEndpoint {
        match self.next_event().await {
            pb::watch_event::Event::Add(e) => e,
            e => panic!("expected an add, got {e:?}"),
        }
    }

    /// Sends a new batch; returns (request, response) so a test can resend it.
    pub async fn report(
        &mut self,
        observations: Vec<pb::Observation>,
    ) -> (pb::ReportRequest, pb::ReportResponse) {
        self.seq += 1;
        let req = pb::ReportRequest {
            agent_id: self.id.clone(),
            sequence: self.seq,
            observations,
            counters: Some(pb::AgentCounters::default()),
            clock: Some(pb::ClockEstimate {
                offset_ns: 0,
                uncertainty_ns: 50_000,
            }),
            sent_unix_nanos: now_on_the_wire(),
        };
        let resp = self.client.report(req.clone()).await.unwrap().into_inner();
        (req, resp)
    }
}

pub fn registration(id: &str, node: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        agent_id: id.into(),
        node_name: node.into(),
        kernel_release: "6.18.0".into(),
        capabilities: vec![pb::Capability {
            name: "tracepoint".into(),
            available: true,
            detail: String::new(),
        }],
        agent_version: "test".into(),
    }
}

/// The wall clock now, as the protocol carries it.
pub fn now_on_the_wire() -> u64 {
    observer_proto::UnixNanos::now().to_wire().unwrap()
}

pub fn addr(ip: &str, port: u32) -> Option<pb::SocketAddress> {
    Some(pb::SocketAddress {
        ip: ip.into(),
        port,
    })
}

/// An nftables rules change of `ip`'s endpoint at `t`.
fn rules_change(ip: &str, t: u64, precision_ns: u64) -> pb::RulesChange {
    pb::RulesChange {
        endpoint: addr(ip, 8080),
        detector: pb::Detector::Nftables as i32,
        time_unix_nanos: t,
        precision_ns,
    }
}

pub fn rules_removed(ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::RulesRemoved(rules_change(
            ip, t, 1_000,
        ))),
    }
}

pub fn accepted(src: &str, ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::Accepted(pb::ConnEvent {
            src: addr(src, 40000),
            dst: addr(ip, 8080),
            time_unix_nanos: t,
            ..Default::default()
        })),
    }
}

/// The pod refused a connection from `src` (no socket listened any more).
pub fn refused(src: &str, ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::ResetSent(pb::ConnEvent {
            src: addr(src, 40003),
            dst: addr(ip, 8080),
            time_unix_nanos: t,
            reason: "NO_SOCKET".into(),
            ..Default::default()
        })),
    }
}

pub fn closed_reset(src: &str, ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::Closed(pb::ConnEvent {
            src: addr(src, 40001),
            dst: addr(ip, 8080),
            time_unix_nanos: t,
            close: pb::CloseKind::Reset as i32,
            ..Default::default()
        })),
    }
}

pub fn new_flow(src: &str, ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::NewFlow(pb::NewFlow {
            src: addr(src, 40002),
            dst: addr(ip, 8080),
            original_dst: addr("10.96.0.10", 80),
            time_unix_nanos: t,
        })),
    }
}

/// A new flow from `src` to the pod address `ip` itself (no DNAT: a client
/// that picked the pod IP, as an ingress controller does).
pub fn direct_flow(src: &str, ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::NewFlow(pb::NewFlow {
            src: addr(src, 40004),
            dst: addr(ip, 8080),
            original_dst: addr(ip, 8080),
            time_unix_nanos: t,
        })),
    }
}

/// A restarted agent found `ip` no longer in its dataplane at `t` (its
/// first read) with the deletion already under way.
pub fn removed_before_start(ip: &str, t: u64) -> pb::Observation {
    pb::Observation {
        kind: Some(pb::observation::Kind::RemovedBeforeStart(rules_change(
            ip, t, 0,
        ))),
    }
}
