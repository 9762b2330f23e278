//! prestop-check as a pipeline runs it: the binary, and the real
//! aggregator HTTP API on a loopback socket seeded with measurements.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use aggregator::auth::TokenSettings;
use aggregator::auth::access::{API_GROUP, HttpAccess, RECOMMENDATIONS};
use aggregator::auth::review::TokenReviewer;
use aggregator::config::Settings;
use aggregator::http::{self, HttpState};
use aggregator::store::Store;
use apiserver_double::ApiServerDouble;
use lab::identity;
use observer_proto::api::startup::StartupRecord;
use observer_proto::api::{Coverage, DeletionRecord, Mode, NodeClass, NodeMeasurement};
use observer_proto::{Detector, UnixNanos};

pub struct Aggregator {
    pub url: String,
    /// With [`start_protected`]: a file holding a reader's token.
    pub token_file: Option<PathBuf>,
    _double: Option<ApiServerDouble>,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

/// One complete deletion in `namespace`, routed by `service`, whose slowest
/// node took `seconds`.
pub fn deletion(i: usize, namespace: &str, service: &str, seconds: f64) -> DeletionRecord {
    let now = UnixNanos::now();
    let mut coverage = Coverage::default();
    coverage.add(NodeClass::Measured);
    DeletionRecord {
        pod_uid: format!("{namespace}-{service}-{i}"),
        namespace: namespace.into(),
        pod_name: format!("{service}-{i}"),
        services: vec![service.into()],
        pod_ip: "10.0.0.1".into(),
        host_node: Some("node-a".into()),
        deletion_start_unix_nanos: now - 60_000_000_000,
        api_deletion_start_unix_nanos: None,
        grace_period_seconds: Some(30),
        control_plane_seconds: Some(0.05),
        complete: true,
        propagation_seconds: Some(seconds),
        propagation_upper_seconds: Some(seconds),
        coverage,
        finished_unix_nanos: now - 1_000_000_000,
        nodes: vec![NodeMeasurement {
            node: "node-a".into(),
            latency_seconds: Some(seconds),
            mode: Some(Mode::Rules(Detector::Nftables)),
            class: Some(NodeClass::Measured),
            ..Default::default()
        }],
        missing_nodes: vec![],
        ..Default::default()
    }
}

pub fn start(records: &[DeletionRecord]) -> Aggregator {
    serve(records, &[], false)
}

/// [`start`] whose `/v1/startup` has these new pods' finished windows.
pub fn start_with_startups(records: &[DeletionRecord], startups: &[StartupRecord]) -> Aggregator {
    serve(records, startups, false)
}

/// [`start`] with `--protect-recommendations`: readers need a token the
/// double's TokenReview and SubjectAccessReview accept.
pub fn start_protected(records: &[DeletionRecord]) -> Aggregator {
    serve(records, &[], true)
}

fn serve(records: &[DeletionRecord], startups: &[StartupRecord], protected: bool) -> Aggregator {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store.db")).unwrap();
    for r in records {
        store.record_deletion(r).unwrap();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let settings = Settings {
        cluster_name: "test".into(),
        ..Settings::default()
    };
    let mut state = HttpState::new(Arc::new(store), settings);
    for s in startups {
        state.startup.push(s.clone(), UnixNanos::now());
    }
    let (double, token_file) = if protected {
        let double = runtime.block_on(ApiServerDouble::start()).unwrap();
        let client = runtime.block_on(async { double.client() }).unwrap();
        let mut tokens = TokenSettings::new(
            identity::AUDIENCE,
            "prestop-system:prestop-agent".parse().unwrap(),
            identity::NAMESPACE,
        );
        tokens.protect_recommendations = true;
        let reviewer = Arc::new(TokenReviewer::new(
            client.clone(),
            tokens.review.clone(),
            Arc::clone(&state.metrics),
        ));
        state.access = Some(Arc::new(HttpAccess::new(reviewer, client, &tokens)));
        let token = identity::reader_token(&double, API_GROUP, &[RECOMMENDATIONS]).unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, token).unwrap();
        (Some(double), Some(path))
    } else {
        (None, None)
    };
    runtime.spawn(http::serve(listener, state));
    Aggregator {
        url,
        token_file,
        _double: double,
        _runtime: runtime,
        _dir: dir,
    }
}

/// 300 deletions in shop/web between 1.0 s and 3.99 s: enough for a
/// confident p99 bound; and 5 in shop/db: too few on their own.
pub fn seeded() -> Aggregator {
    let mut records: Vec<_> = (0..300)
        .map(|i| deletion(i, "shop", "web", 1.0 + i as f64 * 0.01))
        .collect();
    records.extend((0..5).map(|i| deletion(i, "shop", "db", 0.5)));
    start(&records)
}

/// The aggregator's answer, read independently of the binary's client
/// (with the lab's).
pub fn recommendation(agg: &Aggregator, query: &str) -> serde_json::Value {
    let url = format!("{}/v1/recommendations?{query}", agg.url);
    let r = lab::http_client::HttpClient::default()
        .get_blocking(&url)
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn command(args: &[&str], dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prestop-check"));
    cmd.args(args).current_dir(dir).env_clear();
    cmd
}

pub fn run(args: &[&str], dir: &Path, stdin: Option<&str>) -> Output {
    finish(command(args, dir), stdin)
}

pub fn finish(mut cmd: Command, stdin: Option<&str>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// The premise of the expectations below: the seeded measurements make the
/// aggregator recommend 5 s for shop/web and for namespace shop.
pub fn premise(agg: &Aggregator) {
    let web = recommendation(agg, "namespace=shop&service=web");
    assert_eq!(web["preStopSeconds"], 5, "{web}");
    assert_eq!(web["lowConfidence"], false, "{web}");
    let db = recommendation(agg, "namespace=shop&service=db");
    assert_eq!(db["lowConfidence"], true, "{db}");
    assert_eq!(recommendation(agg, "namespace=shop")["preStopSeconds"], 5);
}

/// An HTTP server on a loopback socket that answers every request with
/// `status`, as an ingress or proxy in front of a restarting aggregator
/// does; returns its URL.
pub fn answering(status: &'static str) -> String {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = "upstream connect error";
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}
