mod common;

use std::sync::Arc;

use aggregator::config::Settings;
use aggregator::http::{self, HttpState};
use aggregator::store::Store;
use common::{deletion, get, get_json};
use observer_proto::UnixNanos;

async fn start(store: Arc<Store>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = HttpState::new(
        store,
        Settings {
            cluster_name: "lab".into(),
            ..Settings::default()
        },
    );
    tokio::spawn(http::serve(listener, state));
    addr
}

#[tokio::test]
async fn recommendation_over_a_real_socket() {
    let store = Arc::new(Store::in_memory().unwrap());
    let now = UnixNanos::now();
    for i in 0..10 {
        store
            .record_deletion(&deletion(
                "shop",
                "web",
                &format!("web-{i}"),
                0.2 * f64::from(i + 1),
                now,
            ))
            .unwrap();
    }
    store
        .record_deletion(&deletion("other", "db", "db-0", 30.0, now))
        .unwrap();
    let addr = start(store).await;

    let (status, r) = get_json(addr, "/v1/recommendations?namespace=shop&service=web").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["scope"]["cluster"], "lab");
    assert_eq!(r["scope"]["namespace"], "shop");
    assert_eq!(r["scope"]["service"], "web");
    assert_eq!(r["samples"], 10);
    assert_eq!(r["lowConfidence"], true);
    assert_eq!(r["samplesNeeded"], 289);
    assert_eq!(r["preStopSeconds"], 3); // ceil(2.0 + 1.0)
    assert_eq!(r["lifecycle"]["preStop"]["sleep"]["seconds"], 3);
    assert_eq!(r["observedMaxSeconds"], 2.0);
    assert_eq!(r["quantile"], 0.99);
    assert_eq!(r["keepAlive"]["finding"], serde_json::Value::Null);

    // Cluster-wide includes the other namespace; a low quantile gets a real bound.
    let (_, r) = get_json(addr, "/v1/recommendations?quantile=0.5&confidence=0.9").await;
    assert_eq!(r["samples"], 11);
    assert_eq!(r["lowConfidence"], false);
    assert_eq!(r["scope"]["namespace"], serde_json::Value::Null);

    let (_, r) = get_json(addr, "/v1/recommendations?namespace=empty").await;
    assert_eq!(r["preStopSeconds"], serde_json::Value::Null);
    assert_eq!(r["samples"], 0);
}

#[tokio::test]
async fn a_recorded_or_pruned_deletion_shows_in_the_next_answer() {
    let store = Arc::new(Store::in_memory().unwrap());
    let now = UnixNanos::now();
    let addr = start(Arc::clone(&store)).await;
    let query = "/v1/recommendations?namespace=shop&service=web";
    let (_, r) = get_json(addr, query).await;
    assert_eq!(r["samples"], 0);

    // Answers are reused between changes of the store, never across one.
    store
        .record_deletion(&deletion("shop", "web", "web-0", 1.5, now))
        .unwrap();
    let (_, r) = get_json(addr, query).await;
    assert_eq!(r["samples"], 1, "a stale answer after a new deletion: {r}");
    assert_eq!(r["observedMaxSeconds"], 1.5);
    store
        .record_deletion(&deletion("shop", "web", "web-1", 4.0, now + 1))
        .unwrap();
    let (_, r) = get_json(addr, query).await;
    assert_eq!(r["samples"], 2, "{r}");
    assert_eq!(r["observedMaxSeconds"], 4.0);

    assert_eq!(store.prune(now + 1).unwrap(), 1);
    let (_, r) = get_json(addr, query).await;
    assert_eq!(r["samples"], 1, "a stale answer after pruning: {r}");
    assert_eq!(r["observedMaxSeconds"], 4.0);
}

#[tokio::test]
async fn bad_parameters_get_400_with_a_message() {
    let addr = start(Arc::new(Store::in_memory().unwrap())).await;
    for q in [
        "/v1/recommendations?quantile=1.5",
        "/v1/recommendations?quantile=abc",
        "/v1/recommendations?confidence=0",
        "/v1/recommendations?service=web",
        "/v1/recommendations?namspace=typo",
        "/v1/recommendations?excludeExternal=yes",
        "/v1/deletions?excludeExternal=true",
        "/v1/deletions?outcome=maybe",
        "/v1/deletions?limit=0",
    ] {
        let (status, body) = get_json(addr, q).await;
        assert_eq!(status, 400, "{q}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{q}: {body}"
        );
    }
}

#[tokio::test]
async fn deletions_health_and_metrics() {
    let store = Arc::new(Store::in_memory().unwrap());
    let now = UnixNanos::now();
    store
        .record_deletion(&deletion("shop", "web", "web-1", 1.0, now - 1))
        .unwrap();
    store
        .record_deletion(&deletion("shop", "api", "api-1", 2.0, now))
        .unwrap();
    let addr = start(store).await;

    let (status, d) = get_json(addr, "/v1/deletions?namespace=shop&service=web").await;
    assert_eq!(status, 200);
    let items = d["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["podName"], "web-1");
    assert_eq!(items[0]["nodes"][0]["node"], "node-a");
    let (_, d) = get_json(addr, "/v1/deletions?limit=1").await;
    assert_eq!(d["items"][0]["podName"], "api-1");

    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (status, m) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(m.contains("prestop_store_deletions 2"), "{m}");
    // Labelled families appear once they have a series; these have none.
    assert!(m.contains("prestop_agents_connected 0"), "{m}");
    assert!(
        m.contains("# TYPE prestop_report_lag_seconds histogram"),
        "{m}"
    );
}

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let addr = start(Arc::new(Store::in_memory().unwrap())).await;
    let (status, doc) = get_json(addr, "/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut served = http::ROUTES.to_vec();
    documented.sort_unstable();
    served.sort_unstable();
    assert_eq!(documented, served);
    for path in served {
        assert_ne!(
            get(addr, path).await.0,
            404,
            "{path} is documented but not served"
        );
    }
    assert_eq!(get(addr, "/v1/nothing").await.0, 404);
}
