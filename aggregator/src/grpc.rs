//! The agent-facing gRPC service (`prestop.observer.v1.Observer`): converts
//! and validates protocol messages, then hands them to the [`Correlator`].

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use observer_proto::v1 as pb;
use observer_proto::v1::observer_server::{Observer, ObserverServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::correlate::{
    AgentCounters, Batch, ClockEstimate, CorrelateError, Correlator, Mode, Obs, ObsKind,
    Registration, ResetCause, WatchChange,
};
use crate::http::now_unix_nanos;

/// Largest number of observations accepted in one report.
pub const MAX_OBSERVATIONS_PER_REPORT: u32 = 10_000;
/// Largest accepted message (a full report is about 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How often agents are asked to run a clock exchange.
pub const CLOCK_SYNC_INTERVAL_SECONDS: u32 = 30;
/// Server-side deadline for unary calls (agents also set their own).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ObserverService {
    correlator: Arc<Correlator>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl ObserverService {
    /// `shutdown` ends the open endpoint streams when it turns true, so a
    /// graceful server shutdown does not wait for them forever.
    pub fn new(correlator: Arc<Correlator>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            correlator,
            shutdown,
        }
    }

    pub fn into_server(self) -> ObserverServer<Self> {
        ObserverServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn unknown_agent(e: CorrelateError) -> Status {
    Status::not_found(e.to_string())
}

fn require_agent_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 253 {
        return Err(Status::invalid_argument(
            "agent_id must be 1 to 253 characters",
        ));
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type ReportStream = Pin<Box<dyn Stream<Item = Result<pb::ReportResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for ObserverService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        require_agent_id(&r.agent_id)?;
        if r.node_name.is_empty() {
            return Err(Status::invalid_argument("node_name is required"));
        }
        tracing::info!(agent = %r.agent_id, node = %r.node_name, kernel = %r.kernel_release, "agent registered");
        let acknowledged_sequence = self.correlator.register(Registration {
            agent_id: r.agent_id,
            node_name: r.node_name,
            kernel_release: r.kernel_release,
            capabilities: r
                .capabilities
                .into_iter()
                .map(|c| (c.name, c.available, c.detail))
                .collect(),
        });
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
        let agent_id = req.into_inner().agent_id;
        require_agent_id(&agent_id)?;
        let sub = self
            .correlator
            .subscribe(&agent_id)
            .map_err(unknown_agent)?;
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
        let batch = batch_from_proto(req.into_inner()).map_err(Status::invalid_argument)?;
        let out = self
            .correlator
            .report(batch, now_unix_nanos())
            .map_err(unknown_agent)?;
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
        let correlator = Arc::clone(&self.correlator);
        let mut shutdown = self.shutdown.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let mut failed = false;
        let stream = req
            .into_inner()
            .map(move |r| {
                let batch = batch_from_proto(r?).map_err(Status::invalid_argument)?;
                let out = correlator
                    .report(batch, now_unix_nanos())
                    .map_err(unknown_agent)?;
                Ok(pb::ReportResponse {
                    acknowledged_sequence: out.acknowledged_sequence,
                    duplicate: out.duplicate,
                })
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
        let t2 = now_unix_nanos() as u64;
        require_agent_id(&req.get_ref().agent_id)?;
        Ok(Response::new(pb::ClockSyncResponse {
            t2_unix_nanos: t2,
            t3_unix_nanos: now_unix_nanos() as u64,
        }))
    }
}

fn watch_event(change: WatchChange) -> pb::WatchEvent {
    use pb::watch_event::Event;
    pb::WatchEvent {
        event: Some(match change {
            WatchChange::Add(e) => Event::Add(e.into()),
            WatchChange::Remove(e) => Event::Remove(e.into()),
            WatchChange::Synced => Event::Synced(pb::Synced {}),
        }),
    }
}

/// Validates a report; the error names the first bad field.
pub fn batch_from_proto(r: pb::ReportRequest) -> Result<Batch, String> {
    require_agent_id(&r.agent_id).map_err(|s| s.message().to_string())?;
    if r.sequence == 0 {
        return Err("sequence must start at 1".into());
    }
    if r.observations.len() > MAX_OBSERVATIONS_PER_REPORT as usize {
        return Err(format!(
            "{} observations in one report; at most {MAX_OBSERVATIONS_PER_REPORT}",
            r.observations.len()
        ));
    }
    let observations = r
        .observations
        .into_iter()
        .enumerate()
        .map(|(i, o)| obs_from_proto(o).map_err(|e| format!("observations[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    let c = r.counters.unwrap_or_default();
    Ok(Batch {
        agent_id: r.agent_id,
        sequence: r.sequence,
        observations,
        counters: AgentCounters {
            events_lost: c.events_lost,
            observations_dropped: c.observations_dropped,
        },
        clock: r.clock.map(|c| ClockEstimate {
            offset_ns: c.offset_ns,
            uncertainty_ns: c.uncertainty_ns,
        }),
        sent_unix_nanos: time(r.sent_unix_nanos).unwrap_or_else(|_| now_unix_nanos()),
    })
}

fn time(t: u64) -> Result<i64, String> {
    if t == 0 {
        return Err("time_unix_nanos is required".into());
    }
    i64::try_from(t).map_err(|_| format!("time_unix_nanos {t} out of range"))
}

fn ip(a: Option<&pb::SocketAddress>, field: &str) -> Result<IpAddr, String> {
    let a = a.ok_or_else(|| format!("{field} is required"))?;
    a.ip.parse()
        .map_err(|_| format!("{field}.ip {:?} is not an IP address", a.ip))
}

fn obs_from_proto(o: pb::Observation) -> Result<Obs, String> {
    use pb::observation::Kind;
    let kind = o.kind.ok_or("kind is not set")?;
    let conn = |c: &pb::ConnEvent, kind: ObsKind| -> Result<Obs, String> {
        Ok(Obs {
            kind,
            endpoint: ip(c.dst.as_ref(), "dst")?,
            peer: Some(ip(c.src.as_ref(), "src")?),
            time_unix_nanos: time(c.time_unix_nanos)?,
        })
    };
    let rules = |r: &pb::RulesChange, kind: ObsKind| -> Result<Obs, String> {
        Ok(Obs {
            kind,
            endpoint: ip(r.endpoint.as_ref(), "endpoint")?,
            peer: None,
            time_unix_nanos: time(r.time_unix_nanos)?,
        })
    };
    match &kind {
        Kind::Accepted(c) => conn(c, ObsKind::Accepted),
        Kind::Connected(c) => conn(c, ObsKind::Connected),
        Kind::Closed(c) => {
            let close = pb::CloseKind::try_from(c.close)
                .map_err(|_| format!("close {} is not a CloseKind", c.close))?;
            conn(
                c,
                ObsKind::Closed {
                    reset: close == pb::CloseKind::Reset,
                },
            )
        }
        Kind::ResetSent(c) => conn(
            c,
            ObsKind::ResetSent {
                cause: ResetCause::from_reason(&c.reason),
            },
        ),
        Kind::ResetReceived(c) => conn(c, ObsKind::ResetReceived),
        Kind::RulesRemoved(r) => {
            let d = pb::Detector::try_from(r.detector)
                .map_err(|_| format!("detector {} is not a Detector", r.detector))?;
            let mode = match d {
                pb::Detector::Nftables => Mode::Nftables,
                pb::Detector::IptablesNft => Mode::IptablesNft,
                pb::Detector::IptablesLegacy => Mode::IptablesLegacy,
                pb::Detector::Unspecified => Mode::Unknown,
            };
            rules(r, ObsKind::RulesRemoved(mode))
        }
        Kind::RulesAdded(r) => rules(r, ObsKind::RulesAdded),
        Kind::NewFlow(f) => Ok(Obs {
            kind: ObsKind::NewFlow,
            endpoint: ip(f.dst.as_ref(), "dst")?,
            peer: Some(ip(f.src.as_ref(), "src")?),
            time_unix_nanos: time(f.time_unix_nanos)?,
        }),
    }
}

/// Serves the agent protocol and gRPC health on `listener` until `shutdown`
/// turns true.
pub async fn serve(
    listener: TcpListener,
    correlator: Arc<Correlator>,
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
    tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        // Detects vanished agents so their nodes stop being expected.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(ObserverService::new(correlator, shutdown).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await
}
