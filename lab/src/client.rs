//! Bounded HTTP traffic from inside a namespace, every failure counted with
//! its cause.
//!
//! Two client shapes, because they fail differently during a rollout:
//! `NewConnection` opens a connection per request (fails while a node still
//! routes new connections to a pod that stopped listening); `KeepAlive`
//! reuses a few persistent connections and, like many simple clients, does
//! not probe a pooled connection before sending on it (fails when a server
//! drops idle keep-alive connections instead of closing them gracefully).

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddrV4,
    path::PathBuf,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    sync::{Semaphore, watch},
};

use crate::{
    http::{self, HttpError, Next, Reader},
    netns,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureCause {
    /// RST in answer to the SYN: nothing listens at the backend.
    Refused,
    /// RST on an established connection, or a write to a closed one.
    Reset,
    /// The connection closed before the response arrived.
    Closed,
    /// No answer within the request timeout.
    Timeout,
    /// No route or no neighbour: the backend address is gone.
    Unreachable,
    /// A response that is not `200`, or malformed.
    BadResponse,
}

impl FailureCause {
    fn of_io(e: &io::Error) -> Self {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => FailureCause::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::NotConnected => {
                FailureCause::Reset
            }
            K::TimedOut => FailureCause::Timeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                FailureCause::Unreachable
            }
            K::UnexpectedEof => FailureCause::Closed,
            _ => FailureCause::BadResponse,
        }
    }

    fn of_http(e: &HttpError) -> Self {
        match e {
            HttpError::Io(e) => FailureCause::of_io(e),
            HttpError::Malformed("connection closed mid-message") => FailureCause::Closed,
            _ => FailureCause::BadResponse,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    NewConnection,
    KeepAlive,
}

/// Where a client sends.
#[derive(Debug, Clone)]
pub enum Target {
    /// One address (a Service VIP, a pod, an ingress).
    Fixed(SocketAddrV4),
    /// Backends a router picks from in turn, as it currently knows them
    /// (a client-side or external balancer sending to pod IPs directly).
    RoundRobin(watch::Receiver<Vec<SocketAddrV4>>),
}

impl From<SocketAddrV4> for Target {
    fn from(addr: SocketAddrV4) -> Self {
        Target::Fixed(addr)
    }
}

impl Target {
    /// The address of request number `n`; None while the list is empty.
    fn pick(&self, n: usize) -> Option<SocketAddrV4> {
        match self {
            Target::Fixed(addr) => Some(*addr),
            Target::RoundRobin(list) => {
                let list = list.borrow();
                (!list.is_empty()).then(|| list[n % list.len()])
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub target: Target,
    pub kind: ClientKind,
    /// Requests per second over the whole client.
    pub rate: f64,
    pub duration: Duration,
    /// Keep-alive: connections in the pool; new-connection: most requests in flight.
    pub concurrency: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientReport {
    pub requests: u64,
    /// Connections attempted (each one a new flow the agents observe).
    pub connections: u64,
    pub ok: u64,
    pub failed: BTreeMap<FailureCause, u64>,
    /// Successful responses per answering backend (the body is the pod name).
    pub backends: BTreeMap<String, u64>,
}

impl ClientReport {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn merge(&mut self, other: &ClientReport) {
        self.requests += other.requests;
        self.connections += other.connections;
        self.ok += other.ok;
        for (cause, n) in &other.failed {
            *self.failed.entry(*cause).or_default() += n;
        }
        for (backend, n) in &other.backends {
            *self.backends.entry(backend.clone()).or_default() += n;
        }
    }

    fn record(&mut self, outcome: Result<String, FailureCause>) {
        self.requests += 1;
        match outcome {
            Ok(backend) => {
                self.ok += 1;
                *self.backends.entry(backend).or_default() += 1;
            }
            Err(cause) => *self.failed.entry(cause).or_default() += 1,
        }
    }
}

/// A client running on its own thread inside a namespace.
pub struct Client {
    stop: watch::Sender<bool>,
    thread: JoinHandle<io::Result<ClientReport>>,
}

impl Client {
    /// Starts `config` inside the namespace at `netns` (None: the caller's).
    pub fn start(netns: Option<PathBuf>, config: ClientConfig) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        // Named, so the lab's cost counts the clients apart.
        let thread = std::thread::Builder::new()
            .name(crate::cost::CLIENT_THREAD.into())
            .spawn(move || {
                if let Some(path) = netns {
                    netns::enter(&path)?;
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(run(config, stop_rx))
            })
            .expect("spawning a client thread");
        Client { stop, thread }
    }

    /// Stops sending now (requests in flight finish) and returns the counts.
    pub fn finish(self) -> io::Result<ClientReport> {
        let _ = self.stop.send(true);
        self.wait()
    }

    /// Waits until the configured duration has passed and returns the counts.
    pub fn wait(self) -> io::Result<ClientReport> {
        let result = self.thread.join();
        drop(self.stop);
        result.map_err(|_| io::Error::other("client thread panicked"))?
    }
}

/// Runs until `duration` passed or `stop` is set.
pub async fn run(config: ClientConfig, stop: watch::Receiver<bool>) -> io::Result<ClientReport> {
    let config = Arc::new(config);
    let deadline = Instant::now() + config.duration;
    match config.kind {
        ClientKind::NewConnection => new_connections(config, deadline, stop).await,
        ClientKind::KeepAlive => {
            let workers: Vec<_> = (0..config.concurrency.max(1))
                .map(|_| tokio::spawn(keep_alive(config.clone(), deadline, stop.clone())))
                .collect();
            let mut report = ClientReport::default();
            for worker in workers {
                report.merge(&worker.await.map_err(io::Error::other)?);
            }
            Ok(report)
        }
    }
}

fn interval(rate: f64, share: usize) -> Duration {
    Duration::from_secs_f64(share.max(1) as f64 / rate.max(0.001))
}

async fn sleep_or_stop(until: tokio::time::Instant, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => !*stop.borrow(),
        // A stop (the only value ever sent) or the sender gone.
        _ = stop.changed() => false,
    }
}

/// Open loop: requests start on schedule whatever earlier ones do, as
/// independent users would; `concurrency` bounds those in flight.
async fn new_connections(
    config: Arc<ClientConfig>,
    deadline: Instant,
    mut stop: watch::Receiver<bool>,
) -> io::Result<ClientReport> {
    let every = interval(config.rate, 1);
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = tokio::time::Instant::now();
    let mut sent = 0;
    while Instant::now() < deadline && !*stop.borrow() {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let config = config.clone();
        let target = config.target.pick(sent);
        sent += 1;
        tasks.spawn(async move {
            let outcome = match target {
                Some(target) => one_shot(&config, target).await,
                None => Err(FailureCause::Unreachable),
            };
            drop(slot);
            outcome
        });
        next = (next + every).max(tokio::time::Instant::now());
        if !sleep_or_stop(next, &mut stop).await {
            break;
        }
    }
    let mut report = ClientReport::default();
    while let Some(outcome) = tasks.join_next().await {
        report.connections += 1;
        report.record(outcome.map_err(io::Error::other)?);
    }
    Ok(report)
}

async fn one_shot(config: &ClientConfig, target: SocketAddrV4) -> Result<String, FailureCause> {
    let exchange = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|e| FailureCause::of_io(&e))?;
        let mut reader = Reader::default();
        request(&mut stream, &mut reader, target, true)
            .await
            .map(|(name, _)| name)
    };
    tokio::time::timeout(config.timeout, exchange)
        .await
        .unwrap_or(Err(FailureCause::Timeout))
}

/// Sends one GET and reads the answer: (backend name, server closes).
async fn request(
    stream: &mut TcpStream,
    reader: &mut Reader,
    target: SocketAddrV4,
    close: bool,
) -> Result<(String, bool), FailureCause> {
    let host = target.to_string();
    stream
        .write_all(&http::get(&host, "/", close))
        .await
        .map_err(|e| FailureCause::of_io(&e))?;
    match reader.next(stream, false).await {
        Ok(Next::Message(head, body)) if head.first == "200" => {
            Ok((String::from_utf8_lossy(&body).trim().to_owned(), head.close))
        }
        Ok(Next::Message(..)) => Err(FailureCause::BadResponse),
        Ok(Next::Closed) => Err(FailureCause::Closed),
        Err(e) => Err(FailureCause::of_http(&e)),
    }
}

/// One persistent connection, re-opened after the server closes it or a
/// request on it fails.
async fn keep_alive(
    config: Arc<ClientConfig>,
    deadline: Instant,
    mut stop: watch::Receiver<bool>,
) -> ClientReport {
    let every = interval(config.rate, config.concurrency);
    let mut report = ClientReport::default();
    let mut conn: Option<(TcpStream, Reader, SocketAddrV4)> = None;
    let mut next = tokio::time::Instant::now();
    let mut opened = 0;
    while Instant::now() < deadline && !*stop.borrow() {
        if conn.is_none() {
            report.connections += 1;
        }
        let attempt = async {
            let (stream, reader, target) = match &mut conn {
                Some(c) => c,
                None => {
                    let target = config
                        .target
                        .pick(opened)
                        .ok_or(FailureCause::Unreachable)?;
                    opened += 1;
                    let stream = TcpStream::connect(target)
                        .await
                        .map_err(|e| FailureCause::of_io(&e))?;
                    conn.insert((stream, Reader::default(), target))
                }
            };
            request(stream, reader, *target, false).await
        };
        let outcome = tokio::time::timeout(config.timeout, attempt)
            .await
            .unwrap_or(Err(FailureCause::Timeout));
        match outcome {
            Ok((backend, server_closes)) => {
                if server_closes {
                    conn = None;
                }
                report.record(Ok(backend));
            }
            Err(cause) => {
                conn = None;
                report.record(Err(cause));
            }
        }
        next = (next + every).max(tokio::time::Instant::now());
        if !sleep_or_stop(next, &mut stop).await {
            break;
        }
    }
    report
}
