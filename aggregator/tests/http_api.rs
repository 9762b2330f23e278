mod common;

use std::sync::Arc;

use aggregator::config::Settings;
use aggregator::http::{self, HttpState};
use aggregator::store::Store;
use common::{deletion, get, get_json};
use observer_proto::UnixNanos;
use observer_proto::api::{NodeClass, NodeMeasurement};

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
        "/v1/deletions?limit=1001",
        "/v1/deletions?limit=-1",
        "/v1/deletions?continue=garbage",
        "/v1/deletions?continue=d1.zz.1",
        "/v1/deletions/uid-x?slowest=0",
        "/v1/deletions/uid-x?slowest=two",
        "/v1/deletions/uid-x?class=fast",
        "/v1/deletions/uid-x?nodes=typo",
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
    assert!(items[0].get("nodes").is_none(), "a summary: {d}");
    let (_, detail) = get_json(addr, "/v1/deletions/uid-shop-web-1").await;
    assert_eq!(detail["nodes"][0]["node"], "node-a");
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
        // A path parameter's 404 names what is missing; a route's has no body.
        let (status, body) = get(addr, &path.replace("{podUid}", "no-such-pod")).await;
        assert!(
            status != 404 || body.contains("no-such-pod"),
            "{path} is documented but not served"
        );
    }
    assert_eq!(get(addr, "/v1/nothing").await.0, 404);
}

/// Pages in order, each deletion once, while newer deletions (and one
/// stored late with an older finish) arrive between the requests; finish
/// ties are ordered too.
#[tokio::test]
async fn deletion_pages_neither_skip_nor_repeat_while_new_ones_arrive() {
    let store = Arc::new(Store::in_memory().unwrap());
    let base = UnixNanos::now() - 3_600_000_000_000;
    let second = |i: i64| base + i * 1_000_000_000;
    for i in 0..7 {
        store
            .record_deletion(&deletion(
                "shop",
                "web",
                &format!("old-{i}"),
                1.0,
                second(10 + i),
            ))
            .unwrap();
    }
    // Same finish as old-3.
    store
        .record_deletion(&deletion("shop", "web", "tie", 1.0, second(13)))
        .unwrap();
    let addr = start(Arc::clone(&store)).await;

    let mut seen = Vec::new();
    let mut next = "/v1/deletions?limit=3".to_owned();
    for page in 0.. {
        assert!(page < 10, "pages never ended: {seen:?}");
        let (status, d) = get_json(addr, &next).await;
        assert_eq!(status, 200, "{d}");
        let items = d["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        let finished: Vec<i64> = items
            .iter()
            .map(|i| i["finishedUnixNanos"].as_i64().unwrap())
            .collect();
        assert!(finished.is_sorted_by(|a, b| a >= b), "newest first: {d}");
        seen.extend(
            items
                .iter()
                .map(|i| i["podName"].as_str().unwrap().to_owned()),
        );
        // Arrivals: a newer deletion, and one finished before the listing's position.
        store
            .record_deletion(&deletion(
                "shop",
                "web",
                &format!("new-{page}"),
                1.0,
                UnixNanos::now(),
            ))
            .unwrap();
        if page == 0 {
            store
                .record_deletion(&deletion("shop", "web", "late", 1.0, second(1)))
                .unwrap();
        }
        match d["continue"].as_str() {
            Some(token) => next = format!("/v1/deletions?limit=3&continue={token}"),
            None => break,
        }
    }
    // old-3 and tie share a finish: the one stored later comes first; the
    // newer arrivals belong to a new listing, the late one to this one.
    let expected = [
        "old-6", "old-5", "old-4", "tie", "old-3", "old-2", "old-1", "old-0", "late",
    ];
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_deletions_detail_filters_its_nodes() {
    let store = Arc::new(Store::in_memory().unwrap());
    let mut d = deletion("shop", "web", "web-1", 3.0, UnixNanos::now());
    let node = |name: &str, class: NodeClass, latency: Option<f64>| NodeMeasurement {
        node: name.into(),
        class: Some(class),
        latency_seconds: latency,
        ..NodeMeasurement::default()
    };
    d.nodes = vec![
        node("fast", NodeClass::Measured, Some(0.5)),
        node("gone", NodeClass::Unknown, None),
        node("slow", NodeClass::Measured, Some(3.0)),
        node("stuck", NodeClass::StillRouting, None),
    ];
    store.record_deletion(&d).unwrap();
    let addr = start(store).await;
    let nodes = |q: &'static str| async move {
        let (status, d) = get_json(addr, &format!("/v1/deletions/uid-shop-web-1{q}")).await;
        assert_eq!(status, 200, "{q}: {d}");
        d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(nodes("").await, ["fast", "gone", "slow", "stuck"]);
    assert_eq!(nodes("?slowest=2").await, ["stuck", "slow"]);
    assert_eq!(nodes("?node=gone").await, ["gone"]);
    assert_eq!(nodes("?class=measured").await, ["fast", "slow"]);
    assert_eq!(nodes("?class=measured&slowest=1").await, ["slow"]);
    let (_, summary) = get_json(addr, "/v1/deletions").await;
    assert_eq!(summary["items"][0]["limitingNode"], "slow");

    let (status, body) = get_json(addr, "/v1/deletions/no-such-uid").await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("no-such-uid"),
        "{body}"
    );
}
