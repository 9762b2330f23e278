//! A small in-process cluster: the API server double, a real aggregator on
//! real sockets, and simulated agents speaking gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aggregator::app::{self, Running};
use aggregator::config::Settings;
use aggregator::store::Store;
use apiserver_double::ApiServerDouble;
use futures::StreamExt;
use observer_proto::v1 as pb;
use observer_proto::v1::observer_client::ObserverClient;
use tonic::transport::Channel;

pub async fn start_aggregator(
    settings: Settings,
    store: &PathBuf,
    double: Option<&ApiServerDouble>,
) -> Running {
    let store = Arc::new(Store::open(store).unwrap());
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let kube = double.map(|d| d.client().unwrap());
    let running = app::start(settings, store, grpc, http, kube).unwrap();
    wait_until("aggregator ready", || {
        let r = running.http.ready.clone();
        async move { r.get() }
    })
    .await;
    running
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

pub struct Agent {
    pub id: String,
    pub client: ObserverClient<Channel>,
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
        let mut client = ObserverClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let id = id.to_owned();
        let acknowledged = client
            .register(pb::RegisterRequest {
                agent_id: id.clone(),
                node_name: node.into(),
                kernel_release: "6.18.0".into(),
                capabilities: vec![pb::Capability {
                    name: "tracepoint".into(),
                    available: true,
                    detail: String::new(),
                }],
                agent_version: "test".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .acknowledged_sequence;
        let watch = client
            .watch_endpoints(pb::WatchEndpointsRequest {
                agent_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        Self {
            id,
            client,
            watch,
            seq: 0,
            acknowledged,
        }
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
