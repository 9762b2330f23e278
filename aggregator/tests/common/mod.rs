//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod lab;

use std::net::SocketAddr;

use ::lab::http_client::HttpClient;
use observer_proto::api::{Coverage, DeletionRecord, Mode, NodeClass, NodeMeasurement};
use observer_proto::{Detector, UnixNanos};

/// GET `http://{addr}{path_and_query}` with the lab's HTTP client: (status,
/// body). A secured aggregator's API is read with its reader's token.
pub async fn get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let client = match lab::credentials(addr) {
        Some(c) => HttpClient::default().with_bearer(&c.reader),
        None => HttpClient::default(),
    };
    let r = client
        .get(&format!("http://{addr}{path_and_query}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (r.status, r.text())
}

pub async fn get_json(addr: SocketAddr, path_and_query: &str) -> (u16, serde_json::Value) {
    let (status, body) = get(addr, path_and_query).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

/// A complete deletion of `pod` in `ns`/`svc` whose slowest node took `latency` seconds.
pub fn deletion(
    ns: &str,
    svc: &str,
    pod: &str,
    latency: f64,
    finished: UnixNanos,
) -> DeletionRecord {
    DeletionRecord {
        pod_uid: format!("uid-{ns}-{pod}"),
        namespace: ns.into(),
        pod_name: pod.into(),
        services: vec![svc.into()],
        pod_ip: "10.0.0.1".into(),
        host_node: Some("node-a".into()),
        deletion_start_unix_nanos: finished - 5_000_000_000,
        api_deletion_start_unix_nanos: Some(finished - 5_000_000_000),
        grace_period_seconds: Some(30),
        control_plane_seconds: Some(0.05),
        complete: true,
        propagation_seconds: Some(latency),
        finished_unix_nanos: finished,
        nodes: vec![NodeMeasurement {
            node: "node-a".into(),
            latency_seconds: Some(latency),
            mode: Some(Mode::Rules(Detector::Nftables)),
            ..Default::default()
        }],
        missing_nodes: vec![],
        propagation_upper_seconds: Some(latency),
        coverage: one_node_measured(),
        ..Default::default()
    }
}

/// One expected node, measured.
pub fn one_node_measured() -> Coverage {
    let mut c = Coverage::default();
    c.add(NodeClass::Measured);
    c
}
