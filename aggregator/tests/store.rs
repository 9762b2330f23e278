mod common;

use aggregator::store::{DeletionFilter, Outcome, Scope, Store};
use common::deletion;
use observer_proto::UnixNanos;
use observer_proto::api::{DeletionRecord, NodeClass, RouterKind, RouterMeasurement, RouterRef};

/// A time in nanoseconds.
fn t(nanos: i64) -> UnixNanos {
    UnixNanos::from_nanos(nanos)
}

#[test]
fn records_survive_reopen_and_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let store = Store::open(&path).unwrap();
        store
            .record_deletion(&deletion("shop", "web", "web-1", 1.5, t(1_000)))
            .unwrap();
        store
            .record_deletion(&deletion("shop", "web", "web-1", 1.5, t(1_000)))
            .unwrap();
        store
            .record_deletion(&deletion("shop", "api", "api-1", 0.5, t(2_000)))
            .unwrap();
        assert_eq!(store.len().unwrap(), 2);
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.len().unwrap(), 2);
    let got = store.deletion("uid-shop-web-1").unwrap().unwrap();
    assert_eq!(got, deletion("shop", "web", "web-1", 1.5, t(1_000)));
}

/// A store in `dir` holding `rec`, made an older file by `downgrade`
/// (SQL), then reopened: upgraded.
fn older_file(dir: &tempfile::TempDir, rec: &DeletionRecord, downgrade: &str) -> Store {
    let path = dir.path().join("store.db");
    Store::open(&path).unwrap().record_deletion(rec).unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(downgrade)
        .unwrap();
    Store::open(&path).unwrap()
}

#[test]
fn version_3_files_keep_their_deletions_as_uncensored_samples() {
    let dir = tempfile::tempdir().unwrap();
    let store = older_file(
        &dir,
        &deletion("shop", "web", "web-1", 1.5, t(1_000)),
        "ALTER TABLE deletions DROP COLUMN bound_seconds;
         ALTER TABLE deletions DROP COLUMN censored_after_seconds;
         ALTER TABLE deletions DROP COLUMN nodes_expected;
         ALTER TABLE deletions DROP COLUMN nodes_measured;
         ALTER TABLE deletions DROP COLUMN nodes_still_routing;
         ALTER TABLE deletions DROP COLUMN nodes_unknown;
         PRAGMA user_version = 3;",
    );
    let samples = store.samples(&Scope::default(), t(0)).unwrap();
    // Its propagation is the sample; nothing censored, coverage unknown.
    assert_eq!(samples.latencies, vec![1.5]);
    assert!(samples.censored.is_empty());
    assert_eq!(samples.coverage.expected, 0);
    store
        .record_deletion(&deletion("shop", "web", "web-2", 0.5, t(2_000)))
        .unwrap();
    assert_eq!(
        store.samples(&Scope::default(), t(0)).unwrap().latencies,
        vec![0.5, 1.5]
    );
}

/// `deletion` with a node router and an external router (a cloud load
/// balancer) that was slower.
fn routed_deletion(pod: &str, node: f64, external: f64, finished: UnixNanos) -> DeletionRecord {
    let router = |kind, name: &str, latency| RouterMeasurement {
        router: RouterRef {
            kind,
            name: name.into(),
            node: (kind == RouterKind::Node).then(|| name.into()),
        },
        latency_seconds: Some(latency),
        error_seconds: Some(0.25),
        class: Some(NodeClass::Measured),
        ..RouterMeasurement::default()
    };
    let routers = vec![
        router(RouterKind::Node, "node-a", node),
        router(RouterKind::External, "203.0.113.7", external),
    ];
    DeletionRecord {
        limiting_router: Some(routers[1].router.clone()),
        propagation_upper_seconds: Some(external + 0.25),
        routers,
        ..deletion("shop", "web", pod, external, finished)
    }
}

#[test]
fn excluding_external_routers_bounds_over_nodes_and_workloads() {
    let store = Store::in_memory().unwrap();
    store
        .record_deletion(&routed_deletion("w1", 1.0, 4.0, t(100)))
        .unwrap();
    store
        .record_deletion(&routed_deletion("w2", 2.0, 3.0, t(200)))
        .unwrap();
    let all = store.samples(&Scope::default(), t(0)).unwrap();
    assert_eq!(all.latencies, vec![3.25, 4.25]);
    let external = RouterRef {
        kind: RouterKind::External,
        name: "203.0.113.7".into(),
        node: None,
    };
    assert_eq!(
        all.limiting_routers,
        vec![Some(external.clone()), Some(external)]
    );
    assert_eq!(
        all.by_router_kind,
        vec![
            (RouterKind::Node, vec![1.25, 2.25]),
            (RouterKind::External, vec![3.25, 4.25])
        ]
    );
    let internal = Scope {
        exclude_external: true,
        ..Scope::default()
    };
    let without = store.samples(&internal, t(0)).unwrap();
    assert_eq!(without.latencies, vec![1.25, 2.25]);
    assert_eq!(
        without.limiting_routers[1]
            .as_ref()
            .map(|r| r.name.as_str()),
        Some("node-a")
    );
    assert_eq!(
        without.by_router_kind,
        vec![(RouterKind::Node, vec![1.25, 2.25])]
    );
}

#[test]
fn version_4_files_without_routers_keep_their_whole_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = older_file(
        &dir,
        &routed_deletion("w1", 1.0, 4.0, t(100)),
        "ALTER TABLE deletions DROP COLUMN internal_bound_seconds;
         ALTER TABLE deletions DROP COLUMN limiting_router;
         ALTER TABLE deletions DROP COLUMN limiting_internal_router;
         ALTER TABLE deletions DROP COLUMN node_router_seconds;
         ALTER TABLE deletions DROP COLUMN workload_router_seconds;
         ALTER TABLE deletions DROP COLUMN external_router_seconds;
         ALTER TABLE pending_deletions DROP COLUMN routers;
         ALTER TABLE pending_nodes DROP COLUMN removed_before_start_unix_nanos;
         PRAGMA user_version = 4;",
    );
    let internal = Scope {
        exclude_external: true,
        ..Scope::default()
    };
    // Nothing says which router was external: never lower than the whole.
    let samples = store.samples(&internal, t(0)).unwrap();
    assert_eq!(samples.latencies, vec![4.25]);
    assert_eq!(samples.limiting_routers, vec![None]);
    assert!(samples.by_router_kind.is_empty());
}

#[test]
fn samples_follow_scope_window_and_outcome() {
    let store = Store::in_memory().unwrap();
    store
        .record_deletion(&deletion("a", "web", "w1", 1.0, t(100)))
        .unwrap();
    store
        .record_deletion(&deletion("a", "web", "w2", 3.0, t(200)))
        .unwrap();
    store
        .record_deletion(&deletion("a", "api", "p1", 2.0, t(300)))
        .unwrap();
    store
        .record_deletion(&deletion("b", "web", "w1", 9.0, t(400)))
        .unwrap();
    let mut incomplete = deletion("a", "web", "w3", 0.0, t(500));
    incomplete.complete = false;
    incomplete.propagation_seconds = None;
    incomplete.propagation_upper_seconds = None;
    incomplete.missing_nodes = vec!["node-z".into()];
    store.record_deletion(&incomplete).unwrap();

    let all = store.samples(&Scope::default(), t(0)).unwrap();
    assert_eq!(all.latencies, vec![1.0, 2.0, 3.0, 9.0]);
    let ns = Scope {
        namespace: Some("a".into()),
        ..Scope::default()
    };
    assert_eq!(
        store.samples(&ns, t(0)).unwrap().latencies,
        vec![1.0, 2.0, 3.0]
    );
    let svc = Scope {
        namespace: Some("a".into()),
        service: Some("web".into()),
        ..Scope::default()
    };
    assert_eq!(store.samples(&svc, t(0)).unwrap().latencies, vec![1.0, 3.0]);
    assert_eq!(store.samples(&svc, t(150)).unwrap().latencies, vec![3.0]);

    let f = DeletionFilter {
        outcome: Some(Outcome::Incomplete),
        limit: 10,
        ..Default::default()
    };
    let inc = store.deletions(&f).unwrap();
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0].record.missing_nodes, vec!["node-z".to_string()]);
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
            .map(|d| d.record.finished_unix_nanos)
            .collect::<Vec<_>>(),
        vec![t(500), t(400)]
    );
    assert_eq!(
        store.services(t(0)).unwrap(),
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
        .record_deletion(&deletion("a", "web", "old", 1.0, t(100)))
        .unwrap();
    store
        .record_deletion(&deletion("a", "web", "new", 2.0, t(300)))
        .unwrap();
    assert_eq!(store.prune(t(200)).unwrap(), 1);
    assert_eq!(store.len().unwrap(), 1);
    let svc = Scope {
        namespace: Some("a".into()),
        service: Some("web".into()),
        ..Scope::default()
    };
    assert_eq!(store.samples(&svc, t(0)).unwrap().latencies, vec![2.0]);
}

mod in_flight {
    use aggregator::model::{DeletionStart, NodeAccumulator, RouterAccumulator, RulesRemoval};
    use aggregator::store::{
        AgentRow, Checkpoint, NodeAccRow, PendingNodes, PendingRow, PendingUpdate, Store,
        StoreError,
    };

    use observer_proto::api::{RouterKind, RouterRef};
    use observer_proto::{ClockEstimate, Detector};

    use super::common::deletion;
    use super::t;

    fn terminating(mut row: PendingRow, at: i64) -> PendingRow {
        row.start.terminating_unix_nanos = Some(t(at));
        row
    }

    fn pending(uid: &str) -> PendingRow {
        PendingRow {
            start: DeletionStart {
                pod_uid: uid.into(),
                namespace: "shop".into(),
                pod_name: "web-1".into(),
                services: vec!["web".into(), "web-canary".into()],
                ip: "10.0.0.1".parse().unwrap(),
                ports: vec![8080, 8443],
                host_node: Some("node-a".into()),
                received_unix_nanos: Some(t(1_700_000_000_123_456_789)),
                api_start_unix_nanos: Some(t(1_700_000_000_000_000_000)),
                grace_period_seconds: Some(30),
                terminating_unix_nanos: None,
            },
            t0_unix_nanos: t(1_700_000_000_123_456_789),
            tracked_since_unix_nanos: t(1_700_000_000_200_000_000),
            expected_nodes: vec!["node-a".into(), "node-b".into()],
            pod_gone_unix_nanos: None,
            routers: vec![],
        }
    }

    /// A workload that sent the pod connections.
    fn routed() -> Vec<RouterAccumulator> {
        vec![RouterAccumulator {
            router: RouterRef {
                kind: RouterKind::Workload,
                name: "ingress/nginx".into(),
                node: Some("node-b".into()),
            },
            last_connection: Some(t(1_700_000_003_000_000_000)),
            late_flows: 5,
            late_accepted: 4,
            refused: 2,
            clock_uncertainty_ns: 70_000,
        }]
    }

    fn acc(node: &str, late: u64) -> NodeAccRow {
        NodeAccRow {
            node: node.into(),
            acc: NodeAccumulator {
                rules_removed: Some(RulesRemoval {
                    time: t(1_700_000_001_000_000_000),
                    detector: Detector::IptablesLegacy,
                    precision_ns: Some(250_000_000),
                }),
                last_connection: Some(t(1_700_000_000_900_000_000)),
                late_flows: late,
                late_accepted: 2,
                refused: 3,
                aborted: 4,
                clock_uncertainty_ns: Some(50_000),
                removed_before_start: Some(t(1_700_000_002_500_000_000)),
            },
        }
    }

    /// `acc` after its rules came back.
    fn re_added(node: &str, late: u64) -> NodeAccRow {
        let mut row = acc(node, late);
        row.acc.rules_removed = None;
        row
    }

    fn agent(id: &str, seq: u64) -> AgentRow {
        AgentRow {
            agent_id: id.into(),
            node: "node-a".into(),
            last_sequence: seq,
            clock: Some(ClockEstimate {
                offset_ns: -1_500,
                uncertainty_ns: 50_000,
            }),
            seen_unix_nanos: t(1_700_000_002_000_000_000),
        }
    }

    #[test]
    fn pending_deletions_accumulators_and_agents_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let store = Store::open(&path).unwrap();
            store.insert_pending(&pending("u1")).unwrap();
            // Inserting again (a relist) keeps the first start.
            let mut again = pending("u1");
            again.t0_unix_nanos = again.t0_unix_nanos + 1;
            store.insert_pending(&again).unwrap();
            store
                .checkpoint(&Checkpoint {
                    started: vec![terminating(pending("u2"), 7)],
                    updated: vec![PendingUpdate {
                        pod_uid: "u1".into(),
                        terminating_unix_nanos: Some(t(1_700_000_000_300_000_000)),
                        pod_gone_unix_nanos: Some(t(1_700_000_005_000_000_000)),
                        routers: Some(routed()),
                    }],
                    nodes: vec![
                        PendingNodes {
                            pod_uid: "u1".into(),
                            nodes: vec![acc("node-a", 1), NodeAccRow::default()],
                        },
                        // Not pending (finished meanwhile): skipped.
                        PendingNodes {
                            pod_uid: "gone".into(),
                            nodes: vec![acc("node-a", 1)],
                        },
                    ],
                    agents: vec![agent("node-a/1", 41), agent("node-b/2", u64::MAX)],
                })
                .unwrap();
            // A later checkpoint replaces an accumulator and a sequence.
            store
                .checkpoint(&Checkpoint {
                    nodes: vec![PendingNodes {
                        pod_uid: "u1".into(),
                        nodes: vec![re_added("node-a", 9)],
                    }],
                    agents: vec![agent("node-a/1", 42)],
                    ..Checkpoint::default()
                })
                .unwrap();
        }
        let got = Store::open(&path).unwrap().in_flight().unwrap();
        let u1 = PendingRow {
            pod_gone_unix_nanos: Some(t(1_700_000_005_000_000_000)),
            routers: routed(),
            ..terminating(pending("u1"), 1_700_000_000_300_000_000)
        };
        let u2 = terminating(pending("u2"), 7);
        assert_eq!(
            got.pending,
            [
                (u1, vec![NodeAccRow::default(), re_added("node-a", 9)]),
                (u2, vec![])
            ]
        );
        assert_eq!(
            got.agents,
            [agent("node-a/1", 42), agent("node-b/2", u64::MAX)]
        );
    }

    #[test]
    fn recording_a_deletion_removes_its_pending_rows_in_the_same_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = Store::open(&path).unwrap();
        let rec = deletion("shop", "web", "web-1", 1.5, t(1_000));
        store.insert_pending(&pending(&rec.pod_uid)).unwrap();
        store.insert_pending(&pending("other")).unwrap();
        store
            .checkpoint(&Checkpoint {
                nodes: vec![PendingNodes {
                    pod_uid: rec.pod_uid.clone(),
                    nodes: vec![acc("node-a", 1)],
                }],
                ..Checkpoint::default()
            })
            .unwrap();

        // Make the record's last statement fail: nothing of it may stay,
        // so the deletion is still pending.
        let side = rusqlite::Connection::open(&path).unwrap();
        side.execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON deletion_nodes BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        )
        .unwrap();
        assert!(store.record_deletion(&rec).is_err());
        assert_eq!(store.deletion(&rec.pod_uid).unwrap(), None);
        let got = store.in_flight().unwrap();
        assert_eq!(got.pending.len(), 2);
        assert_eq!(got.pending[1].0.start.pod_uid, rec.pod_uid);
        assert_eq!(got.pending[1].1, [acc("node-a", 1)]);

        side.execute_batch("DROP TRIGGER fail;").unwrap();
        store.record_deletion(&rec).unwrap();
        // Read the tables directly: `in_flight` would also drop them.
        let rows = |table: &str| -> i64 {
            side.query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE pod_uid = ?1"),
                [&rec.pod_uid],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!((rows("pending_deletions"), rows("pending_nodes")), (0, 0));
        let got = store.in_flight().unwrap();
        assert_eq!(got.pending.len(), 1);
        assert_eq!(got.pending[0].0.start.pod_uid, "other");
        // Once finished it is not pending again (a late start is ignored).
        store.insert_pending(&pending(&rec.pod_uid)).unwrap();
        assert_eq!(store.in_flight().unwrap().pending.len(), 1);
    }

    #[test]
    fn corrupt_rows_are_an_error_naming_table_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = Store::open(&path).unwrap();
        store.insert_pending(&pending("u1")).unwrap();
        let side = rusqlite::Connection::open(&path).unwrap();
        let cases = [
            (
                "UPDATE pending_deletions SET ip = 'not-an-ip'",
                "pending_deletions",
                "\"u1\"",
                "not-an-ip",
            ),
            (
                "UPDATE pending_deletions SET ip = '10.0.0.1', services = '{'",
                "pending_deletions",
                "\"u1\"",
                "services",
            ),
            (
                "UPDATE pending_deletions SET services = '[]', t0_unix_nanos = 'soon'",
                "pending_deletions",
                "\"u1\"",
                "",
            ),
            (
                "UPDATE pending_deletions SET t0_unix_nanos = 1;
                 INSERT INTO pending_nodes VALUES ('u1', 'node-a', 5, NULL, NULL, NULL, 0, 0, 0, 0, NULL, NULL)",
                "pending_nodes",
                "node \"node-a\"",
                "rules_mode",
            ),
            (
                "UPDATE pending_nodes SET rules_mode = 'ipvs'",
                "pending_nodes",
                "node \"node-a\"",
                "rules_mode: unknown detector \"ipvs\"",
            ),
            (
                "UPDATE pending_nodes SET rules_removed_unix_nanos = NULL, rules_mode = NULL, late_flows = -1",
                "pending_nodes",
                "node \"node-a\"",
                "negative",
            ),
            (
                "DELETE FROM pending_nodes;
                 INSERT INTO agents VALUES ('node-a/1', 'node-a', 'x', NULL, NULL, 0)",
                "agents",
                "\"node-a/1\"",
                "",
            ),
        ];
        for (sql, table, key, reason) in cases {
            side.execute_batch(sql).unwrap();
            match store.in_flight() {
                Err(StoreError::Corrupt {
                    table: t,
                    key: k,
                    reason: r,
                }) => {
                    assert_eq!(t, table, "{sql}");
                    assert!(k.contains(key), "{k:?} lacks {key:?} ({sql})");
                    assert!(r.contains(reason), "{r:?} lacks {reason:?} ({sql})");
                }
                other => panic!("{sql}: expected a corrupt row error, got {other:?}"),
            }
        }
        let msg = store.in_flight().unwrap_err().to_string();
        assert!(msg.contains("agents") && msg.contains("node-a/1"), "{msg}");
    }

    #[test]
    fn version_1_files_gain_the_in_flight_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            Store::open(&path)
                .unwrap()
                .record_deletion(&deletion("shop", "web", "web-1", 1.5, t(1_000)))
                .unwrap();
            let side = rusqlite::Connection::open(&path).unwrap();
            side.execute_batch(
                "DROP TABLE pending_nodes; DROP TABLE pending_deletions; DROP TABLE agents;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.len().unwrap(), 1);
        store.insert_pending(&pending("u1")).unwrap();
        assert_eq!(store.in_flight().unwrap().pending.len(), 1);
        let side = rusqlite::Connection::open(&path).unwrap();
        side.execute_batch("PRAGMA user_version = 7;").unwrap();
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::Schema { found: 7, .. })
        ));
    }

    #[test]
    fn version_2_files_gain_the_detector_precision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let store = Store::open(&path).unwrap();
            store.insert_pending(&pending("u1")).unwrap();
            let side = rusqlite::Connection::open(&path).unwrap();
            side.execute_batch(
                "ALTER TABLE pending_nodes DROP COLUMN rules_precision_ns;
                 ALTER TABLE pending_nodes DROP COLUMN removed_before_start_unix_nanos;
                 INSERT INTO pending_nodes VALUES ('u1', 'node-b', 5, 'nftables', NULL, 0, 0, 0, 0, NULL);
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        store
            .checkpoint(&Checkpoint {
                nodes: vec![PendingNodes {
                    pod_uid: "u1".into(),
                    nodes: vec![acc("node-a", 1)],
                }],
                ..Checkpoint::default()
            })
            .unwrap();
        let got = store.in_flight().unwrap();
        let nodes = &got.pending[0].1;
        assert_eq!(nodes[0], acc("node-a", 1));
        // Checkpointed before the upgrade: the precision is unknown.
        let old = nodes[1].acc.rules_removed.unwrap();
        assert_eq!((old.detector, old.precision_ns), (Detector::Nftables, None));
    }

    #[test]
    fn agents_not_seen_within_the_window_are_pruned() {
        let store = Store::in_memory().unwrap();
        let old = AgentRow {
            seen_unix_nanos: t(100),
            ..agent("old", 1)
        };
        store
            .checkpoint(&Checkpoint {
                agents: vec![old, agent("new", 2)],
                ..Checkpoint::default()
            })
            .unwrap();
        assert_eq!(store.prune_agents(t(1_000)).unwrap(), 1);
        assert_eq!(store.in_flight().unwrap().agents, [agent("new", 2)]);
    }
}

mod startup {
    use aggregator::store::Store;
    use observer_proto::api::startup::{NodeAddition, StartupRecord};

    use super::t;

    fn record(uid: &str, ready: i64) -> StartupRecord {
        StartupRecord {
            pod_uid: uid.into(),
            namespace: "shop".into(),
            pod_name: format!("web-{uid}"),
            workload: "shop/web".into(),
            services: vec!["web".into()],
            pod_ip: "10.0.0.9".into(),
            ready_unix_nanos: t(ready),
            nodes: vec![NodeAddition {
                node: "node-a".into(),
                rules_added_unix_nanos: Some(t(ready + 300)),
                propagation_seconds: Some(3e-7),
                error_seconds: Some(1e-6),
                clock_uncertainty_seconds: Some(4e-7),
                not_added: false,
            }],
            refused_connections: 2,
            ..StartupRecord::default()
        }
    }

    fn uids(records: &[StartupRecord]) -> Vec<&str> {
        records.iter().map(|r| r.pod_uid.as_str()).collect()
    }

    #[test]
    fn startup_records_survive_reopen_oldest_first_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let store = Store::open(&path).unwrap();
            for r in [record("u2", 200), record("u1", 100), record("u2", 200)] {
                store.record_startup(&r).unwrap();
            }
        }
        let store = Store::open(&path).unwrap();
        let got = store.startups(t(0), 10).unwrap();
        assert_eq!(got, [record("u1", 100), record("u2", 200)]);
        assert_eq!(uids(&store.startups(t(150), 10).unwrap()), ["u2"]);
        assert_eq!(
            uids(&store.startups(t(0), 1).unwrap()),
            ["u2"],
            "the newest within the limit"
        );
    }

    #[test]
    fn pruning_drops_startup_records_past_the_retention_and_the_cap() {
        let store = Store::in_memory().unwrap();
        for (uid, ready) in [("u1", 100), ("u2", 200), ("u3", 300), ("u4", 400)] {
            store.record_startup(&record(uid, ready)).unwrap();
        }
        assert_eq!(store.prune_startups(t(150), 10).unwrap(), 1);
        assert_eq!(store.prune_startups(t(150), 2).unwrap(), 1);
        assert_eq!(uids(&store.startups(t(0), 10).unwrap()), ["u3", "u4"]);
        assert_eq!(store.prune_startups(t(150), 2).unwrap(), 0);
    }

    #[test]
    fn version_5_files_gain_the_startup_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            Store::open(&path).unwrap();
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute_batch("DROP TABLE startup_records; PRAGMA user_version = 5;")
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        store.record_startup(&record("u1", 100)).unwrap();
        assert_eq!(store.startups(t(0), 10).unwrap(), [record("u1", 100)]);
    }
}
