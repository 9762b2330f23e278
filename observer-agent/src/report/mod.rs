//! The agent's client of the aggregator (`prestop.observer.v1`): registers
//! with the node's kernel and capability table, subscribes to the set of
//! endpoints to watch (forwarded as [`WatchUpdate`]s), reports observations
//! in numbered batches, and runs clock exchanges so the aggregator can
//! correct this node's timestamps.
//!
//! While the aggregator is away, observations wait in a bounded buffer
//! (overflow is dropped, counted and reported) and the client reconnects
//! with exponential backoff. A batch keeps its sequence number until
//! acknowledged, so a resend after a lost reply is not counted twice.

mod buffer;
mod credentials;
mod watches;

pub use credentials::{Credentials, CredentialsError};

use crate::clock::ExchangeFilter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use watches::Watches;

use observer_proto::v1 as pb;
use observer_proto::v1::observer_client::ObserverClient;
use observer_proto::{
    AgentCounters, ClockEstimate, Endpoint, NewEndpoint, Observation, Report, UnixNanos,
};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{self, Channel};

use crate::kernel::capabilities::Capability;
use buffer::Buffer;
use credentials::Bearer;

/// A client of the aggregator that sends the agent's token with every call.
type Client = ObserverClient<InterceptedService<Channel, Bearer>>;

/// Counters the kernel side keeps and the reporter forwards (cumulative).
#[derive(Debug, Default)]
pub struct KernelCounters {
    /// Events the kernel could not hand over (ring buffer full, conntrack
    /// socket overflow).
    pub events_lost: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct ReporterConfig {
    /// gRPC URL of the aggregator, e.g. `https://prestop-aggregator:50051`.
    pub aggregator: String,
    /// The token sent and the CA verified.
    pub credentials: Credentials,
    pub node_name: String,
    pub kernel_release: String,
    /// The `observer-agent probe` table.
    pub capabilities: Vec<Capability>,
    /// Unique per agent process; batch sequence numbers are scoped to it.
    /// The node's identity across restarts is `node_name`; a new id shows
    /// the aggregator that this process knows nothing of its predecessor's.
    pub agent_id: String,
    /// Observations held at most while the aggregator is unreachable.
    pub buffer_capacity: usize,
    /// Observations per report at most (the aggregator may lower it).
    pub batch_max: usize,
    /// How often buffered observations are sent.
    pub flush_interval: Duration,
    /// Deadline of each call, and of connecting.
    pub call_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub counters: Arc<KernelCounters>,
}

impl ReporterConfig {
    /// Defaults: 100k buffered observations, 1000 per batch, flush every
    /// 200 ms, 10 s call deadline, backoff 100 ms doubling to 30 s.
    pub fn new(aggregator: impl Into<String>, node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        let nonce = UnixNanos::now().as_nanos() ^ i64::from(std::process::id()).rotate_left(32);
        Self {
            aggregator: aggregator.into(),
            credentials: Credentials::default(),
            agent_id: format!("{node_name}/{nonce:016x}"),
            node_name,
            kernel_release: String::new(),
            capabilities: Vec::new(),
            buffer_capacity: 100_000,
            batch_max: 1000,
            flush_interval: Duration::from_millis(200),
            call_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            counters: Arc::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    Add(Endpoint),
    Remove(Endpoint),
    /// A new endpoint's startup window opened / ended.
    AddNew(NewEndpoint),
    RemoveNew(NewEndpoint),
}

/// What a reporter did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Sessions that registered successfully.
    pub sessions: u64,
    pub batches_acknowledged: u64,
    pub observations_dropped: u64,
    /// Observations still buffered at shutdown (not delivered).
    pub observations_unsent: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("invalid aggregator URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("TLS for the aggregator {url:?}: {reason}")]
    Tls { url: String, reason: String },
    #[error("the receiver of watch updates is gone")]
    WatchReceiverClosed,
}

/// Reports sent on one stream at most before their acks (back-pressure
/// beyond that waits for the next flush).
const REPORTS_IN_FLIGHT: usize = 64;

/// The report stream of one session.
struct Reports {
    tx: mpsc::Sender<pb::ReportRequest>,
    acks: tonic::Streaming<pb::ReportResponse>,
    /// Highest sequence put on this stream.
    sent_upto: u64,
}

/// Why a session ended.
enum End {
    Shutdown,
    Lost(String),
}

/// Runs until `shutdown` completes or the observation channel closes; then
/// makes one last attempt to deliver what is buffered.
pub async fn run(
    cfg: ReporterConfig,
    observations: mpsc::Receiver<Observation>,
    watch_tx: mpsc::Sender<WatchUpdate>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, ReportError> {
    let endpoint = transport::Endpoint::from_shared(cfg.aggregator.clone())
        .map_err(|e| ReportError::InvalidUrl {
            url: cfg.aggregator.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(cfg.call_timeout)
        .timeout(cfg.call_timeout)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let endpoint = match cfg.credentials.tls(&cfg.aggregator)? {
        Some(tls) => endpoint.tls_config(tls).map_err(|e| ReportError::Tls {
            url: cfg.aggregator.clone(),
            reason: e.to_string(),
        })?,
        None => endpoint,
    };
    let mut r = Reporter {
        buffer: Buffer::new(cfg.batch_max, cfg.buffer_capacity),
        cfg,
        rx: observations,
        rx_open: true,
        watch_tx,
        watched: Watches::default(),
        watched_new: Watches::default(),
        clock: None,
        exchanges: ExchangeFilter::default(),
        summary: Summary::default(),
        shutdown: Box::pin(shutdown),
    };
    let mut backoff = r.cfg.backoff_initial;
    loop {
        let (end, registered) = r.session(&endpoint).await?;
        match end {
            End::Shutdown => return Ok(r.finish(&endpoint).await),
            End::Lost(why) => {
                tracing::warn!(aggregator = %r.cfg.aggregator, reason = %why, retry_in = ?backoff,
                    buffered = r.buffer.len(), "aggregator connection lost");
            }
        }
        if registered {
            backoff = r.cfg.backoff_initial;
        }
        // Jitter (50..150 %) so a fleet of agents does not reconnect in step.
        let spread = u16::try_from(UnixNanos::now().as_nanos().rem_euclid(1000)).unwrap_or(0);
        let jitter = 0.5 + f64::from(spread) / 1000.0;
        if r.buffering(tokio::time::sleep(backoff.mul_f64(jitter)))
            .await
            .is_none()
        {
            return Ok(r.finish(&endpoint).await);
        }
        backoff = (backoff * 2).min(r.cfg.backoff_max);
    }
}

struct Reporter<S> {
    cfg: ReporterConfig,
    rx: mpsc::Receiver<Observation>,
    rx_open: bool,
    watch_tx: mpsc::Sender<WatchUpdate>,
    watched: Watches<Endpoint>,
    watched_new: Watches<NewEndpoint>,
    buffer: Buffer,
    clock: Option<ClockEstimate>,
    exchanges: ExchangeFilter,
    summary: Summary,
    shutdown: Pin<Box<S>>,
}

impl<S: Future<Output = ()> + Send> Reporter<S> {
    fn push(&mut self, o: Observation) {
        if !self.buffer.push(o, UnixNanos::now()) {
            let d = self.buffer.dropped();
            if d.is_power_of_two() {
                tracing::warn!(
                    dropped = d,
                    capacity = self.cfg.buffer_capacity,
                    "report buffer full: dropping observations"
                );
            }
        }
    }

    /// Awaits `fut` while still taking observations into the buffer; `None`
    /// when shutdown came first (or the observation channel closed).
    async fn buffering<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.as_mut() => return None,
                r = &mut fut => return Some(r),
                o = self.rx.recv(), if self.rx_open => match o {
                    Some(o) => self.push(o),
                    None => {
                        self.rx_open = false;
                        return None;
                    }
                },
            }
        }
    }

    /// One connection: register, subscribe, then report until something
    /// fails. Returns how it ended and whether it got as far as registering.
    async fn session(
        &mut self,
        endpoint: &transport::Endpoint,
    ) -> Result<(End, bool), ReportError> {
        macro_rules! step {
            ($fut:expr, $what:literal) => {
                match self.buffering($fut).await {
                    None => return Ok((End::Shutdown, false)),
                    Some(Err(e)) => {
                        return Ok((End::Lost(format!(concat!($what, ": {}"), e)), false))
                    }
                    Some(Ok(v)) => v,
                }
            };
        }
        let channel = step!(endpoint.connect(), "connect");
        let mut client = self.client(channel);
        let reg = step!(client.register(self.register_request()), "register").into_inner();
        self.buffer.acknowledge(reg.acknowledged_sequence);
        self.buffer
            .limit_batch(reg.max_observations_per_report as usize);
        let mut stream = step!(
            client.watch_endpoints(pb::WatchEndpointsRequest {
                agent_id: self.cfg.agent_id.clone()
            }),
            "subscribe"
        )
        .into_inner();
        self.summary.sessions += 1;
        tracing::info!(aggregator = %self.cfg.aggregator, agent_id = %self.cfg.agent_id, "connected to the aggregator");
        // Reports go on one stream per session; acks come back in order.
        let (report_tx, report_rx) = mpsc::channel(REPORTS_IN_FLIGHT);
        let acks = step!(
            client.report_stream(tokio_stream::wrappers::ReceiverStream::new(report_rx)),
            "open report stream"
        )
        .into_inner();
        let end = self
            .connected(
                &mut client,
                &mut stream,
                Reports {
                    tx: report_tx,
                    acks,
                    sent_upto: 0,
                },
                reg.clock_sync_interval_seconds,
            )
            .await?;
        Ok((end, true))
    }

    async fn connected(
        &mut self,
        client: &mut Client,
        stream: &mut tonic::Streaming<pb::WatchEvent>,
        mut reports: Reports,
        clock_interval_seconds: u32,
    ) -> Result<End, ReportError> {
        self.watched.subscribed();
        self.watched_new.subscribed();
        let mut flush = tokio::time::interval(self.cfg.flush_interval);
        let interval = Duration::from_secs(u64::from(clock_interval_seconds.max(1)));
        let clock = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(clock);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.as_mut() => return Ok(End::Shutdown),
                ev = stream.message() => match ev {
                    Ok(Some(ev)) => self.watch_event(ev).await?,
                    Ok(None) => return Ok(End::Lost("endpoint stream ended".into())),
                    Err(s) => return Ok(End::Lost(format!("endpoint stream: {s}"))),
                },
                () = &mut clock => {
                    for _ in 0..ExchangeFilter::BURST {
                        if let Err(s) = self.sync_clock(client).await {
                            return Ok(End::Lost(format!("clock exchange: {s}")));
                        }
                    }
                    let wait = self
                        .clock
                        .map_or(interval, |best| self.exchanges.next_burst(best, interval));
                    clock.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                o = self.rx.recv(), if self.rx_open => match o {
                    Some(o) => self.push(o),
                    None => {
                        self.rx_open = false;
                        return Ok(End::Shutdown);
                    }
                },
                ack = reports.acks.message() => match ack {
                    Ok(Some(r)) => {
                        self.buffer.acknowledge(r.acknowledged_sequence);
                        self.summary.batches_acknowledged += 1;
                    }
                    Ok(None) => return Ok(End::Lost("report stream ended".into())),
                    // The aggregator will never take the first unacknowledged
                    // batch: drop it rather than block every later one behind
                    // it; the rest is resent on the next session.
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        if let Some(seq) = self.buffer.front().map(|b| b.sequence) {
                            tracing::error!(sequence = seq, error = %s.message(), "aggregator rejected a report; dropping it");
                            self.buffer.acknowledge(seq);
                        }
                        return Ok(End::Lost(format!("report stream: {s}")));
                    }
                    Err(s) => return Ok(End::Lost(format!("report stream: {s}"))),
                },
                _ = flush.tick() => {
                    self.buffer.seal(UnixNanos::now());
                    if let Err(why) = self.send_new(&mut reports) {
                        return Ok(End::Lost(why));
                    }
                }
            }
        }
    }

    async fn watch_event(&mut self, ev: pb::WatchEvent) -> Result<(), ReportError> {
        use pb::watch_event::Event;
        let update = match ev.event {
            Some(Event::Add(e)) => endpoint(e)
                .and_then(|e| self.watched.add(&e.pod_uid.clone(), e))
                .map(WatchUpdate::Add)
                .into_iter()
                .collect(),
            Some(Event::Remove(e)) => self
                .watched
                .remove(&e.pod_uid)
                .map(WatchUpdate::Remove)
                .into_iter()
                .collect(),
            Some(Event::AddNew(e)) => new_endpoint(e)
                .and_then(|e| self.watched_new.add(&e.pod_uid.clone(), e))
                .map(WatchUpdate::AddNew)
                .into_iter()
                .collect(),
            Some(Event::RemoveNew(e)) => self
                .watched_new
                .remove(&e.pod_uid)
                .map(WatchUpdate::RemoveNew)
                .into_iter()
                .collect(),
            // Watched before the reconnect, absent now: finished meanwhile.
            Some(Event::Synced(_)) => {
                let gone = self.watched.synced().into_iter().map(WatchUpdate::Remove);
                let ended = self.watched_new.synced().into_iter();
                gone.chain(ended.map(WatchUpdate::RemoveNew)).collect()
            }
            None => Vec::new(),
        };
        for u in update {
            self.watch_tx
                .send(u)
                .await
                .map_err(|_| ReportError::WatchReceiverClosed)?;
        }
        Ok(())
    }

    fn register_request(&self) -> pb::RegisterRequest {
        pb::RegisterRequest {
            agent_id: self.cfg.agent_id.clone(),
            node_name: self.cfg.node_name.clone(),
            kernel_release: self.cfg.kernel_release.clone(),
            capabilities: self
                .cfg
                .capabilities
                .iter()
                .map(|c| pb::Capability {
                    name: c.name.clone(),
                    available: c.available,
                    detail: c.detail.clone(),
                })
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    async fn sync_clock(&mut self, client: &mut Client) -> Result<(), tonic::Status> {
        let t1 = UnixNanos::now();
        let r = client
            .sync_clock(pb::ClockSyncRequest {
                agent_id: self.cfg.agent_id.clone(),
                t1_unix_nanos: t1.to_wire().unwrap_or_default(),
            })
            .await?
            .into_inner();
        let t4 = UnixNanos::now();
        let aggregator_time = |nanos: u64, field: &str| {
            UnixNanos::from_wire(nanos).ok_or_else(|| {
                tonic::Status::invalid_argument(format!("{field} {nanos} is beyond the year 2262"))
            })
        };
        let e = ClockEstimate::from_exchange(
            t1,
            aggregator_time(r.t2_unix_nanos, "t2_unix_nanos")?,
            aggregator_time(r.t3_unix_nanos, "t3_unix_nanos")?,
            t4,
        );
        tracing::debug!(
            offset_ns = e.offset_ns,
            uncertainty_ns = e.uncertainty_ns,
            "clock exchange"
        );
        self.clock = Some(self.exchanges.add(t4, e));
        Ok(())
    }

    /// Puts the sealed batches not yet sent in this session on the report
    /// stream, as far as it has room; the rest go at the next flush.
    fn send_new(&mut self, reports: &mut Reports) -> Result<(), String> {
        let pending: Vec<pb::ReportRequest> = self
            .buffer
            .sealed_after(reports.sent_upto)
            .take(reports.tx.capacity())
            .map(|b| self.request(b))
            .collect();
        for req in pending {
            let seq = req.sequence;
            match reports.tx.try_send(req) {
                Ok(()) => reports.sent_upto = seq,
                Err(mpsc::error::TrySendError::Full(_)) => break,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err("report stream closed".into());
                }
            }
        }
        Ok(())
    }

    fn request(&self, b: &buffer::Batch) -> pb::ReportRequest {
        pb::ReportRequest::from(Report {
            agent_id: self.cfg.agent_id.clone(),
            sequence: b.sequence,
            observations: b.observations.clone(),
            counters: AgentCounters {
                events_lost: self.cfg.counters.events_lost.load(Ordering::Relaxed),
                observations_dropped: self.buffer.dropped(),
            },
            clock: self.clock,
            sent: b.sealed,
        })
    }

    fn next_request(&self) -> Option<pb::ReportRequest> {
        self.buffer.front().map(|b| self.request(b))
    }

    fn client(&self, channel: Channel) -> Client {
        ObserverClient::with_interceptor(channel, self.cfg.credentials.bearer())
    }

    /// Last delivery attempt at shutdown, bounded by one call deadline.
    async fn finish(mut self, endpoint: &transport::Endpoint) -> Summary {
        while let Ok(o) = self.rx.try_recv() {
            self.push(o);
        }
        self.buffer.seal(UnixNanos::now());
        if !self.buffer.is_empty() {
            let deadline = self.cfg.call_timeout;
            let attempt = async {
                let mut client = self.client(endpoint.connect().await.map_err(|e| e.to_string())?);
                client
                    .register(self.register_request())
                    .await
                    .map_err(|e| e.to_string())?;
                while let Some(req) = self.next_request() {
                    let seq = req.sequence;
                    let ack = client.report(req).await.map_err(|e| e.to_string())?;
                    self.buffer
                        .acknowledge(ack.into_inner().acknowledged_sequence.max(seq));
                    self.summary.batches_acknowledged += 1;
                }
                Ok::<(), String>(())
            };
            match tokio::time::timeout(deadline, attempt).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "final report delivery failed"),
                Err(_) => tracing::warn!("final report delivery timed out"),
            }
        }
        self.summary.observations_dropped = self.buffer.dropped();
        self.summary.observations_unsent = self.buffer.len() as u64;
        self.summary
    }
}

/// A wire endpoint the agent can watch, or `None` (logged) when it does not
/// decode: one bad endpoint must not end the subscription of the others.
fn endpoint(e: pb::WatchedEndpoint) -> Option<Endpoint> {
    Endpoint::try_from(e)
        .inspect_err(|e| tracing::warn!(error = %e, "aggregator sent an endpoint that does not decode; ignored"))
        .ok()
}

fn new_endpoint(e: pb::NewEndpoint) -> Option<NewEndpoint> {
    NewEndpoint::try_from(e)
        .inspect_err(|e| tracing::warn!(error = %e, "aggregator sent a new endpoint that does not decode; ignored"))
        .ok()
}
