//! The agent-facing gRPC service (`prestop.observer.v1.Observer`): checks
//! who calls and which node it speaks for ([`AgentAuth`]), converts and
//! validates protocol messages, then hands them to the [`Correlator`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use observer_proto::v1 as pb;
use observer_proto::v1::observer_server::{Observer, ObserverServer};
use observer_proto::{BadReport, Report, UnixNanos};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::auth::Guards;
use crate::auth::agent::{AgentAuth, Claim};
use crate::correlate::{CorrelateError, Correlator, Registration, WatchChange};
use crate::limits::{self, Admission, Refused};

/// Largest number of observations accepted in one report.
pub const MAX_OBSERVATIONS_PER_REPORT: u32 = 10_000;
/// How often agents are asked to run a clock exchange.
pub const CLOCK_SYNC_INTERVAL_SECONDS: u32 = 30;
/// Concurrent HTTP/2 streams on one agent connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Server-side deadline for unary calls (agents also set their own).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ObserverService {
    correlator: Arc<Correlator>,
    admission: Arc<Admission>,
    /// `None`: every caller may speak for any node (`--insecure-no-auth`).
    auth: Option<Arc<AgentAuth>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl ObserverService {
    /// `shutdown` ends the open endpoint streams when it turns true, so a
    /// graceful server shutdown does not wait for them forever.
    pub fn new(
        correlator: Arc<Correlator>,
        admission: Arc<Admission>,
        auth: Option<Arc<AgentAuth>>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            correlator,
            admission,
            auth,
            shutdown,
        }
    }

    /// Refuses the call unless its token speaks for what `claim` names;
    /// nothing of a refused call reaches the correlator.
    /// Returns the node the token speaks for (`None` without checks).
    async fn authorize<T>(
        &self,
        req: &Request<T>,
        claim: Claim<'_>,
    ) -> Result<Option<String>, Status> {
        match &self.auth {
            Some(auth) => auth
                .authorize(req.metadata(), &self.correlator, claim)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    pub fn into_server(self) -> ObserverServer<Self> {
        let max = self.admission.limits().grpc_max_message_bytes;
        ObserverServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }
}

fn correlate_status(e: CorrelateError) -> Status {
    match e {
        CorrelateError::UnknownAgent(_) => Status::not_found(e.to_string()),
        CorrelateError::TooManyAgents { .. } => Status::resource_exhausted(e.to_string()),
        CorrelateError::Replaced { .. } | CorrelateError::UnlistedNode { .. } => {
            Status::failed_precondition(e.to_string())
        }
    }
}

fn require_agent_id(id: &str) -> Result<(), BadRequest> {
    if id.is_empty() {
        return Err(BadRequest::NoAgentId);
    }
    Ok(limits::check_agent_id(id)?)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type ReportStream = Pin<Box<dyn Stream<Item = Result<pb::ReportResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for ObserverService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        require_agent_id(&req.get_ref().agent_id)?;
        if req.get_ref().node_name.is_empty() {
            return Err(BadRequest::NoNodeName.into());
        }
        let claim = Claim::Register {
            agent_id: &req.get_ref().agent_id,
            node: &req.get_ref().node_name,
        };
        // Sizes before the token (cheap, and a review is not), the rate
        // after it: an unauthenticated caller cannot use up a node's rate.
        limits::check_registration(req.get_ref())?;
        self.authorize(&req, claim).await?;
        let r = req.into_inner();
        self.admission.registration(&r.node_name)?;
        tracing::info!(
            agent = %r.agent_id, node = %r.node_name, kernel = %r.kernel_release,
            version = %r.agent_version, "agent registered"
        );
        let registration = Registration {
            agent_id: r.agent_id,
            node_name: r.node_name,
            kernel_release: r.kernel_release,
            agent_version: r.agent_version,
            capabilities: r
                .capabilities
                .into_iter()
                .map(|c| (c.name, c.available, c.detail))
                .collect(),
        };
        let acknowledged_sequence = self
            .correlator
            .register(registration, UnixNanos::now())
            .map_err(correlate_status)?;
        Ok(Response::new(pb::RegisterResponse {
            acknowledged_sequence,
            max_observations_per_report: MAX_OBSERVATIONS_PER_REPORT,
            clock_sync_interval_seconds: CLOCK_SYNC_INTERVAL_SECONDS,
        }))
    }

    type WatchEndpointsStream = WatchStream;

    async fn watch_endpoints(
        &self,
        req: Request<pb::WatchEndpointsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        require_agent_id(&req.get_ref().agent_id)?;
        self.authorize(&req, Claim::Agent(&req.get_ref().agent_id))
            .await?;
        let agent_id = req.into_inner().agent_id;
        let sub = self
            .correlator
            .subscribe(&agent_id)
            .map_err(correlate_status)?;
        let mut shutdown = self.shutdown.clone();
        let stop = async move {
            // Ends on true or when the sender is gone.
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let stream = sub
            .into_stream()
            .map(|r| match r {
                Ok(change) => Ok(watch_event(change)),
                Err(e) => Err(Status::aborted(format!("{e}; subscribe again"))),
            })
            .take_until(stop);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        require_agent_id(&req.get_ref().agent_id)?;
        self.authorize(&req, Claim::Agent(&req.get_ref().agent_id))
            .await?;
        let req = req.into_inner();
        self.admission.report(&req.agent_id)?;
        let report = decode_report(req)?;
        let out = self
            .correlator
            .report(report, UnixNanos::now())
            .map_err(correlate_status)?;
        Ok(Response::new(pb::ReportResponse {
            acknowledged_sequence: out.acknowledged_sequence,
            duplicate: out.duplicate,
        }))
    }

    type ReportStreamStream = ReportStream;

    async fn report_stream(
        &self,
        req: Request<tonic::Streaming<pb::ReportRequest>>,
    ) -> Result<Response<ReportStream>, Status> {
        // The stream's token is checked once, when it opens: the node it
        // speaks for, then every batch's agent id against that node.
        let owner = self.authorize(&req, Claim::AnyNode).await?;
        let correlator = Arc::clone(&self.correlator);
        let admission = Arc::clone(&self.admission);
        let checker = self.auth.clone();
        let mut shutdown = self.shutdown.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let mut failed = false;
        let stream = req
            .into_inner()
            .then(move |r| {
                let (correlator, admission) = (Arc::clone(&correlator), Arc::clone(&admission));
                let (checker, owner) = (checker.clone(), owner.clone());
                async move {
                    let r = r?;
                    require_agent_id(&r.agent_id)?;
                    if let (Some(a), Some(node)) = (&checker, &owner) {
                        a.owns(&correlator, node, &r.agent_id)?;
                    }
                    admission.report_ready(&r.agent_id).await;
                    let report = decode_report(r)?;
                    let out = correlator
                        .report(report, UnixNanos::now())
                        .map_err(correlate_status)?;
                    Ok(pb::ReportResponse {
                        acknowledged_sequence: out.acknowledged_sequence,
                        duplicate: out.duplicate,
                    })
                }
            })
            // The first error ends the stream: later batches are not applied.
            .take_while(move |r: &Result<pb::ReportResponse, Status>| {
                let pass = !failed;
                failed |= r.is_err();
                futures::future::ready(pass)
            })
            .take_until(stop);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn sync_clock(
        &self,
        req: Request<pb::ClockSyncRequest>,
    ) -> Result<Response<pb::ClockSyncResponse>, Status> {
        let t2 = UnixNanos::now();
        require_agent_id(&req.get_ref().agent_id)?;
        self.authorize(&req, Claim::AnyNode).await?;
        Ok(Response::new(pb::ClockSyncResponse {
            t2_unix_nanos: t2.to_wire().unwrap_or_default(),
            t3_unix_nanos: UnixNanos::now().to_wire().unwrap_or_default(),
        }))
    }
}

fn watch_event(change: WatchChange) -> pb::WatchEvent {
    use pb::watch_event::Event;
    pb::WatchEvent {
        event: Some(match change {
            WatchChange::Add(e) => Event::Add(e.into()),
            WatchChange::Remove(e) => Event::Remove(e.into()),
            WatchChange::AddNew(e) => Event::AddNew(e.into()),
            WatchChange::RemoveNew(e) => Event::RemoveNew(e.into()),
            WatchChange::Synced => Event::Synced(pb::Synced {}),
        }),
    }
}

/// A request the aggregator refuses; names the field and its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("agent_id is required")]
    NoAgentId,
    #[error("node_name is required")]
    NoNodeName,
    #[error(
        "report {sequence} of agent {agent_id:?}: {count} observations; at most {MAX_OBSERVATIONS_PER_REPORT}"
    )]
    TooManyObservations {
        agent_id: String,
        sequence: u64,
        count: usize,
    },
    #[error(transparent)]
    Report(#[from] BadReport),
    #[error(transparent)]
    Limit(#[from] Refused),
}

impl From<BadRequest> for Status {
    fn from(e: BadRequest) -> Self {
        match e {
            BadRequest::Limit(r) => r.into(),
            e => Status::invalid_argument(e.to_string()),
        }
    }
}

/// Decodes a report and applies the aggregator's own limits to it.
pub fn decode_report(r: pb::ReportRequest) -> Result<Report, BadRequest> {
    require_agent_id(&r.agent_id)?;
    if r.observations.len() > MAX_OBSERVATIONS_PER_REPORT as usize {
        return Err(BadRequest::TooManyObservations {
            agent_id: r.agent_id,
            sequence: r.sequence,
            count: r.observations.len(),
        });
    }
    Ok(Report::try_from(r)?)
}

/// Serves the agent protocol and gRPC health on `listener` until `shutdown`
/// turns true, with TLS and token checks as `guards` say.
pub async fn serve(
    listener: TcpListener,
    correlator: Arc<Correlator>,
    admission: Arc<Admission>,
    guards: Guards,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ObserverServer<ObserverService>>()
        .await;
    let mut stop = shutdown.clone();
    let stop = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = guards.tls {
        server = server.tls_config(tls)?;
    }
    server
        .timeout(CALL_TIMEOUT)
        // Detects vanished agents so their nodes stop being expected.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        // An agent uses three streams at once; each may buffer a message.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(health_service)
        .add_service(
            ObserverService::new(correlator, admission, guards.agents, shutdown).into_server(),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await
}
