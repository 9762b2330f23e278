//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod lab;

use std::net::SocketAddr;
use std::time::Duration;

use observer_proto::api::{DeletionRecord, Mode, NodeMeasurement};
use observer_proto::{Detector, UnixNanos};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET (Connection: close): (status, body).
pub async fn get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("GET {path_and_query} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("HTTP GET timed out")
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
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
    }
}
