mod common;

use aggregator::store::{DeletionFilter, Outcome, Scope, Store};
use common::deletion;

#[test]
fn records_survive_reopen_and_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let store = Store::open(&path).unwrap();
        store
            .record_deletion(&deletion("shop", "web", "web-1", 1.5, 1_000))
            .unwrap();
        store
            .record_deletion(&deletion("shop", "web", "web-1", 1.5, 1_000))
            .unwrap();
        store
            .record_deletion(&deletion("shop", "api", "api-1", 0.5, 2_000))
            .unwrap();
        assert_eq!(store.len().unwrap(), 2);
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.len().unwrap(), 2);
    let got = store.deletion("uid-shop-web-1").unwrap().unwrap();
    assert_eq!(got, deletion("shop", "web", "web-1", 1.5, 1_000));
}

#[test]
fn samples_follow_scope_window_and_outcome() {
    let store = Store::in_memory().unwrap();
    store
        .record_deletion(&deletion("a", "web", "w1", 1.0, 100))
        .unwrap();
    store
        .record_deletion(&deletion("a", "web", "w2", 3.0, 200))
        .unwrap();
    store
        .record_deletion(&deletion("a", "api", "p1", 2.0, 300))
        .unwrap();
    store
        .record_deletion(&deletion("b", "web", "w1", 9.0, 400))
        .unwrap();
    let mut incomplete = deletion("a", "web", "w3", 0.0, 500);
    incomplete.complete = false;
    incomplete.propagation_seconds = None;
    incomplete.missing_nodes = vec!["node-z".into()];
    store.record_deletion(&incomplete).unwrap();

    let all = store.samples(&Scope::default(), 0).unwrap();
    assert_eq!(all.latencies, vec![1.0, 2.0, 3.0, 9.0]);
    let ns = Scope {
        namespace: Some("a".into()),
        service: None,
    };
    assert_eq!(
        store.samples(&ns, 0).unwrap().latencies,
        vec![1.0, 2.0, 3.0]
    );
    let svc = Scope {
        namespace: Some("a".into()),
        service: Some("web".into()),
    };
    assert_eq!(store.samples(&svc, 0).unwrap().latencies, vec![1.0, 3.0]);
    assert_eq!(store.samples(&svc, 150).unwrap().latencies, vec![3.0]);

    let f = DeletionFilter {
        outcome: Some(Outcome::Incomplete),
        limit: 10,
        ..Default::default()
    };
    let inc = store.deletions(&f).unwrap();
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0].missing_nodes, vec!["node-z".to_string()]);
    let by_node = DeletionFilter {
        node: Some("node-z".into()),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(store.deletions(&by_node).unwrap().len(), 1);
    let newest = store
        .deletions(&DeletionFilter {
            limit: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        newest
            .iter()
            .map(|d| d.finished_unix_nanos)
            .collect::<Vec<_>>(),
        vec![500, 400]
    );
    assert_eq!(
        store.services(0).unwrap(),
        vec![
            ("a".into(), "api".into()),
            ("a".into(), "web".into()),
            ("b".into(), "web".into())
        ]
    );
}

#[test]
fn prune_drops_old_rows_only() {
    let store = Store::in_memory().unwrap();
    store
        .record_deletion(&deletion("a", "web", "old", 1.0, 100))
        .unwrap();
    store
        .record_deletion(&deletion("a", "web", "new", 2.0, 300))
        .unwrap();
    assert_eq!(store.prune(200).unwrap(), 1);
    assert_eq!(store.len().unwrap(), 1);
    let svc = Scope {
        namespace: Some("a".into()),
        service: Some("web".into()),
    };
    assert_eq!(store.samples(&svc, 0).unwrap().latencies, vec![2.0]);
}
