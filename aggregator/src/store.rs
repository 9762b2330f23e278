//! Embedded persistence (SQLite): finished deletions survive restarts and are
//! pruned after the retention window. One row per deletion holds the whole
//! record as JSON; the columns and side tables beside it exist only to select
//! rows (by time, namespace, service, node, outcome) without parsing JSON.
//!
//! The correlator's in-flight state is kept here too, so a restart loses
//! nothing and counts nothing twice: each deletion in flight
//! (`pending_deletions`, written when it starts), its per-node accumulators
//! (`pending_nodes`) and each agent's last applied batch sequence (`agents`),
//! both written by periodic [`Store::checkpoint`]s.
//!
//! Finished startup windows (`startup_records`) are kept the same way as
//! finished deletions: the whole record as JSON, selected by T_ready for
//! the retention and the cap on kept records (`StartupSettings::kept`).

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{
    Connection, OptionalExtension, TransactionBehavior, params, params_from_iter, types::Value,
};

use observer_proto::api::startup::StartupRecord;
use observer_proto::api::{Coverage, DeletionRecord, RouterKind, RouterMeasurement, RouterRef};
use observer_proto::{ClockEstimate, UnixNanos};

use crate::model::{DeletionStart, NodeAccumulator, RouterAccumulator, RulesRemoval};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored record is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("store file {path} has schema version {found}, this build knows {expected}")]
    Schema {
        path: String,
        found: i64,
        expected: i64,
    },
    /// A persisted row that cannot be read back (wrong type, bad value).
    #[error("corrupt row in table {table} ({key}): {reason}")]
    Corrupt {
        table: &'static str,
        /// The row's key, e.g. `pod_uid "abc"`.
        key: String,
        reason: String,
    },
}

/// 2 added the in-flight tables, 3 the detector's precision of a rules
/// removal, 4 what the bound needs, 5 the routers and removals before an
/// agent's start, 6 the finished startup windows; older files are upgraded
/// in place.
const SCHEMA_VERSION: i64 = 6;

/// Columns added since version 2 files: (table, column, declaration).
/// `SCHEMA` creates the tables of older files whole; an upgrade adds what
/// an existing table lacks (version 3: the detector's precision; version
/// 4: what the bound needs of a finished deletion, older rows reading as
/// uncensored with their coverage unknown; version 5: the routers, older
/// rows having none, so that excluding external routers falls back to
/// their whole bound, and a node's removal before its agent's start).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("pending_nodes", "rules_precision_ns", "INTEGER"),
    ("deletions", "bound_seconds", "REAL"),
    ("deletions", "censored_after_seconds", "REAL"),
    ("deletions", "nodes_expected", "INTEGER NOT NULL DEFAULT 0"),
    ("deletions", "nodes_measured", "INTEGER NOT NULL DEFAULT 0"),
    (
        "deletions",
        "nodes_still_routing",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("deletions", "nodes_unknown", "INTEGER NOT NULL DEFAULT 0"),
    ("deletions", "internal_bound_seconds", "REAL"),
    ("deletions", "limiting_router", "TEXT"),
    ("deletions", "limiting_internal_router", "TEXT"),
    ("deletions", "node_router_seconds", "REAL"),
    ("deletions", "workload_router_seconds", "REAL"),
    ("deletions", "external_router_seconds", "REAL"),
    ("pending_deletions", "routers", "TEXT"),
    (
        "pending_nodes",
        "removed_before_start_unix_nanos",
        "INTEGER",
    ),
];

/// Adds the [`ADDED_COLUMNS`] a table of an older file lacks.
fn upgrade(conn: &Connection) -> Result<(), StoreError> {
    for (table, column, declaration) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration};"
            ))?;
        }
    }
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deletions (
    pod_uid TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    finished_unix_nanos INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    propagation_seconds REAL,
    aborted_connections INTEGER NOT NULL,
    record TEXT NOT NULL,
    bound_seconds REAL,
    censored_after_seconds REAL,
    nodes_expected INTEGER NOT NULL DEFAULT 0,
    nodes_measured INTEGER NOT NULL DEFAULT 0,
    nodes_still_routing INTEGER NOT NULL DEFAULT 0,
    nodes_unknown INTEGER NOT NULL DEFAULT 0,
    internal_bound_seconds REAL,
    limiting_router TEXT,
    limiting_internal_router TEXT,
    node_router_seconds REAL,
    workload_router_seconds REAL,
    external_router_seconds REAL
);
CREATE INDEX IF NOT EXISTS deletions_finished ON deletions(finished_unix_nanos);
CREATE INDEX IF NOT EXISTS deletions_namespace ON deletions(namespace, finished_unix_nanos);
CREATE TABLE IF NOT EXISTS deletion_services (
    pod_uid TEXT NOT NULL REFERENCES deletions(pod_uid) ON DELETE CASCADE,
    namespace TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (pod_uid, service)
);
CREATE INDEX IF NOT EXISTS deletion_services_service ON deletion_services(namespace, service);
CREATE TABLE IF NOT EXISTS deletion_nodes (
    pod_uid TEXT NOT NULL REFERENCES deletions(pod_uid) ON DELETE CASCADE,
    node TEXT NOT NULL,
    PRIMARY KEY (pod_uid, node)
);
CREATE INDEX IF NOT EXISTS deletion_nodes_node ON deletion_nodes(node);
CREATE TABLE IF NOT EXISTS pending_deletions (
    pod_uid TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    pod_name TEXT NOT NULL,
    services TEXT NOT NULL,
    ip TEXT NOT NULL,
    ports TEXT NOT NULL,
    host_node TEXT,
    received_unix_nanos INTEGER,
    api_start_unix_nanos INTEGER,
    grace_period_seconds INTEGER,
    t0_unix_nanos INTEGER NOT NULL,
    tracked_since_unix_nanos INTEGER NOT NULL,
    terminating_unix_nanos INTEGER,
    expected_nodes TEXT NOT NULL,
    pod_gone_unix_nanos INTEGER,
    routers TEXT
);
CREATE TABLE IF NOT EXISTS pending_nodes (
    pod_uid TEXT NOT NULL REFERENCES pending_deletions(pod_uid) ON DELETE CASCADE,
    node TEXT NOT NULL,
    rules_removed_unix_nanos INTEGER,
    rules_mode TEXT,
    rules_precision_ns INTEGER,
    last_connection_unix_nanos INTEGER,
    late_flows INTEGER NOT NULL,
    late_accepted INTEGER NOT NULL,
    refused INTEGER NOT NULL,
    aborted INTEGER NOT NULL,
    clock_uncertainty_ns INTEGER,
    removed_before_start_unix_nanos INTEGER,
    PRIMARY KEY (pod_uid, node)
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    last_sequence INTEGER NOT NULL,
    clock_offset_ns INTEGER,
    clock_uncertainty_ns INTEGER,
    seen_unix_nanos INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_seen ON agents(seen_unix_nanos);
CREATE TABLE IF NOT EXISTS startup_records (
    pod_uid TEXT PRIMARY KEY,
    ready_unix_nanos INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS startup_records_ready ON startup_records(ready_unix_nanos);
";

/// A deletion in flight as persisted: what the correlator needs to carry it
/// on after a restart with the same T0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRow {
    /// With the latest known `terminating_unix_nanos`.
    pub start: DeletionStart,
    pub t0_unix_nanos: UnixNanos,
    pub tracked_since_unix_nanos: UnixNanos,
    /// Nodes expected to report (empty: those live when it finishes).
    pub expected_nodes: Vec<String>,
    pub pod_gone_unix_nanos: Option<UnixNanos>,
    /// What each router sent the pod so far.
    pub routers: Vec<RouterAccumulator>,
}

/// The parts of a pending deletion that change after it started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpdate {
    pub pod_uid: String,
    pub terminating_unix_nanos: Option<UnixNanos>,
    pub pod_gone_unix_nanos: Option<UnixNanos>,
    /// The routers, when they changed.
    pub routers: Option<Vec<RouterAccumulator>>,
}

/// One node's accumulator of a deletion in flight (its rules removal
/// stored with the detector's name, `Detector::as_str`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAccRow {
    pub node: String,
    pub acc: NodeAccumulator,
}

/// Changed node accumulators of one deletion in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingNodes {
    pub pod_uid: String,
    pub nodes: Vec<NodeAccRow>,
}

/// An agent's batch dedupe state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRow {
    pub agent_id: String,
    pub node: String,
    /// Highest batch sequence applied (stored bit for bit as an SQLite
    /// integer: any u64 round-trips).
    pub last_sequence: u64,
    pub clock: Option<ClockEstimate>,
    /// Aggregator time the row was last written.
    pub seen_unix_nanos: UnixNanos,
}

/// What changed since the previous checkpoint, written in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Deletions whose start row is not stored yet (its first write failed).
    pub started: Vec<PendingRow>,
    pub updated: Vec<PendingUpdate>,
    pub nodes: Vec<PendingNodes>,
    pub agents: Vec<AgentRow>,
}

impl Checkpoint {
    pub fn is_empty(&self) -> bool {
        self.started.is_empty()
            && self.updated.is_empty()
            && self.nodes.is_empty()
            && self.agents.is_empty()
    }
}

/// The in-flight state as last persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Each deletion with its node accumulators, by pod UID.
    pub pending: Vec<(PendingRow, Vec<NodeAccRow>)>,
    pub agents: Vec<AgentRow>,
}

/// Which deletions a recommendation draws on, and which of their routers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub namespace: Option<String>,
    /// Only with a namespace.
    pub service: Option<String>,
    /// Each deletion's latency over its node and workload routers only
    /// (external load balancers and clients left out).
    pub exclude_external: bool,
}

/// What a recommendation needs from the store for one scope and window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    /// Upper end (latency plus its error) of the full propagation of each
    /// deletion no node was still routing at its end, ascending.
    pub latencies: Vec<f64>,
    /// The router that set each latency (`None` for rows without routers).
    pub limiting_routers: Vec<Option<RouterRef>>,
    /// Right-censored deletions: how long after T0 some node was still
    /// routing when they finished, ascending. Each exceeds every latency.
    pub censored: Vec<f64>,
    /// A router still routing in each censored deletion.
    pub censored_limiting_routers: Vec<Option<RouterRef>>,
    /// Per router kind with any measured, each deletion's largest upper
    /// latency of a router of that kind, ascending.
    pub by_router_kind: Vec<(RouterKind, Vec<f64>)>,
    /// Node-deletions by class over the same deletions.
    pub coverage: Coverage,
    /// The largest error added to a latency above.
    pub max_error_seconds: Option<f64>,
    /// Keep-alive connections aborted at shutdown, over all deletions.
    pub aborted_connections: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Incomplete,
}

/// Selection for [`Store::deletions`]; newest first.
#[derive(Clone, Debug, Default)]
pub struct DeletionFilter {
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub node: Option<String>,
    pub outcome: Option<Outcome>,
    pub since: Option<UnixNanos>,
    /// Only deletions after this one in the order (the previous page's last).
    pub after: Option<DeletionPosition>,
    pub limit: usize,
}

/// Where a finished deletion stands in the listing order: newest finish
/// first, ties by the order they were stored (newest first). Stored
/// deletions never move, so a listing continued from a position neither
/// skips nor repeats any, whatever is stored meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeletionPosition {
    pub finished: UnixNanos,
    /// SQLite's rowid of the stored deletion.
    pub row: i64,
}

/// A finished deletion and its place in the listing order.
#[derive(Clone, Debug)]
pub struct StoredDeletion {
    pub position: DeletionPosition,
    pub record: DeletionRecord,
}

pub struct Store {
    conn: Mutex<Connection>,
    /// Writes of the in-flight state on a connection of their own: a
    /// checkpoint can hold its transaction for a while, and queries keep
    /// reading meanwhile (WAL). `None` in memory, where each connection
    /// would be a database of its own.
    writer: Option<Mutex<Connection>>,
    /// Read-only queries (the HTTP API's) on a connection of their own, so
    /// that they never wait for the lock of a write in progress (WAL lets
    /// them read meanwhile). `None` in memory.
    reader: Option<Mutex<Connection>>,
    /// Bumped after every change of the finished deletions, so that answers
    /// computed from them can be reused until the next change.
    generation: AtomicU64,
}

/// A panic while holding the lock cannot leave SQLite inconsistent
/// (transactions roll back), so a poisoned lock is still usable.
fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-connection settings (WAL mode itself is kept by the file).
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Two connections write (serialised by the correlator; housekeeping
    // may overlap): wait for the other rather than fail.
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let conn = Connection::open(path)?;
        // WAL + NORMAL: a crash loses at most the last transactions, never
        // corrupts, and writers do not block readers.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        configure(&conn)?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        // 0: new file; 1: finished deletions only (the new tables are
        // added); 2: without rules_precision_ns; 3: without what the bound
        // needs of a finished deletion; 5: without startup records (the
        // table is created).
        if !(0..=SCHEMA_VERSION).contains(&found) {
            return Err(StoreError::Schema {
                path: path.display().to_string(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        upgrade(&conn)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let another = || -> Result<Option<Mutex<Connection>>, StoreError> {
            if path.as_os_str() == ":memory:" {
                return Ok(None);
            }
            let c = Connection::open(path)?;
            configure(&c)?;
            Ok(Some(Mutex::new(c)))
        };
        Ok(Self {
            conn: Mutex::new(conn),
            writer: another()?,
            reader: another()?,
            generation: AtomicU64::new(0),
        })
    }

    /// Opens a private in-memory store (benchmarks, tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::open(":memory:")
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.writer.as_ref().map_or_else(|| self.conn(), lock)
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.as_ref().map_or_else(|| self.conn(), lock)
    }

    /// Records a finished deletion. Idempotent: recording the same pod UID
    /// again replaces the earlier record.
    pub fn record_deletion(&self, rec: &DeletionRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec)?;
        let aborted: u64 = rec.nodes.iter().map(|n| n.aborted_connections).sum();
        let routers = RouterColumns::of(rec)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM deletions WHERE pod_uid = ?1", [&rec.pod_uid])?;
        // No longer in flight: in the same transaction, so a restart finds
        // the deletion either pending or finished, never both or neither.
        tx.prepare_cached("DELETE FROM pending_nodes WHERE pod_uid = ?1")?
            .execute([&rec.pod_uid])?;
        tx.prepare_cached("DELETE FROM pending_deletions WHERE pod_uid = ?1")?
            .execute([&rec.pod_uid])?;
        tx.execute(
            "INSERT INTO deletions (pod_uid, namespace, finished_unix_nanos, complete,
                propagation_seconds, aborted_connections, record, bound_seconds,
                censored_after_seconds, nodes_expected, nodes_measured,
                nodes_still_routing, nodes_unknown, internal_bound_seconds, limiting_router,
                limiting_internal_router, node_router_seconds, workload_router_seconds,
                external_router_seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                ?17, ?18, ?19)",
            params![
                rec.pod_uid,
                rec.namespace,
                rec.finished_unix_nanos.as_nanos(),
                rec.complete,
                rec.propagation_seconds,
                aborted as i64,
                json,
                rec.propagation_upper_seconds,
                rec.censored_after_seconds,
                rec.coverage.expected as i64,
                rec.coverage.measured as i64,
                rec.coverage.still_routing as i64,
                rec.coverage.unknown as i64,
                routers.internal_bound,
                routers.limiting,
                routers.limiting_internal,
                routers.by_kind[0],
                routers.by_kind[1],
                routers.by_kind[2],
            ],
        )?;
        for s in &rec.services {
            tx.execute(
                "INSERT OR IGNORE INTO deletion_services (pod_uid, namespace, service) VALUES (?1, ?2, ?3)",
                params![rec.pod_uid, rec.namespace, s],
            )?;
        }
        for n in rec.nodes.iter().map(|n| &n.node).chain(&rec.missing_nodes) {
            tx.execute(
                "INSERT OR IGNORE INTO deletion_nodes (pod_uid, node) VALUES (?1, ?2)",
                params![rec.pod_uid, n],
            )?;
        }
        tx.commit()?;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes whenever the finished deletions change (a record, a prune).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Latencies of complete deletions in `scope` finished at or after `since`.
    pub fn samples(&self, scope: &Scope, since: UnixNanos) -> Result<Samples, StoreError> {
        // Rows of version 3 files have no bound: their propagation, which
        // they only kept for complete deletions, is the best there is.
        // Rows without routers (version 4) keep their whole bound when
        // external routers are excluded: never lower.
        let (bound, limiting, external) = if scope.exclude_external {
            (
                "COALESCE(d.internal_bound_seconds, d.bound_seconds, d.propagation_seconds)",
                "COALESCE(d.limiting_internal_router, d.limiting_router)",
                "NULL",
            )
        } else {
            (
                "COALESCE(d.bound_seconds, d.propagation_seconds)",
                "d.limiting_router",
                "d.external_router_seconds",
            )
        };
        let (sql, args) = scoped_query(
            &format!(
                "SELECT {bound}, d.censored_after_seconds,
                    d.aborted_connections, d.nodes_expected, d.nodes_measured,
                    d.nodes_still_routing, d.nodes_unknown, d.propagation_seconds,
                    COALESCE(d.bound_seconds, d.propagation_seconds), {limiting},
                    d.node_router_seconds, d.workload_router_seconds, {external}
                 FROM deletions d"
            ),
            scope,
            since,
        );
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(args))?;
        let mut out = Samples::default();
        let (mut measured, mut censored) = (Vec::new(), Vec::new());
        let mut by_kind: [Vec<f64>; 3] = Default::default();
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        while let Some(row) = rows.next()? {
            let limiting = row
                .get::<_, Option<String>>(9)?
                .map(|j| serde_json::from_str::<RouterRef>(&j))
                .transpose()?;
            match (row.get::<_, Option<f64>>(0)?, row.get::<_, Option<f64>>(1)?) {
                (_, Some(after)) => censored.push((after, limiting)),
                (Some(bound), None) => {
                    measured.push((bound, limiting));
                    if let (Some(raw), Some(whole)) =
                        (row.get::<_, Option<f64>>(7)?, row.get::<_, Option<f64>>(8)?)
                    {
                        let error = whole - raw;
                        out.max_error_seconds =
                            Some(out.max_error_seconds.map_or(error, |e| e.max(error)));
                    }
                }
                (None, None) => {}
            }
            for (i, v) in by_kind.iter_mut().enumerate() {
                v.extend(row.get::<_, Option<f64>>(10 + i)?);
            }
            out.aborted_connections += count(row.get(2)?);
            out.coverage.merge(&Coverage {
                expected: count(row.get(3)?),
                measured: count(row.get(4)?),
                still_routing: count(row.get(5)?),
                unknown: count(row.get(6)?),
                ratio: None,
            });
        }
        measured.sort_by(|a, b| a.0.total_cmp(&b.0));
        censored.sort_by(|a, b| a.0.total_cmp(&b.0));
        (out.latencies, out.limiting_routers) = measured.into_iter().unzip();
        (out.censored, out.censored_limiting_routers) = censored.into_iter().unzip();
        for v in &mut by_kind {
            v.sort_by(f64::total_cmp);
        }
        out.by_router_kind = RouterKind::ALL
            .into_iter()
            .zip(by_kind)
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Ok(out)
    }

    /// Finished deletions matching `filter`, newest first.
    pub fn deletions(&self, filter: &DeletionFilter) -> Result<Vec<StoredDeletion>, StoreError> {
        let mut sql = String::from(
            "SELECT d.finished_unix_nanos, d.rowid, d.record FROM deletions d WHERE 1 = 1",
        );
        let mut args: Vec<Value> = Vec::new();
        if let Some(ns) = &filter.namespace {
            sql.push_str(" AND d.namespace = ?");
            args.push(ns.clone().into());
        }
        if let Some(svc) = &filter.service {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM deletion_services s WHERE s.pod_uid = d.pod_uid AND s.service = ?)",
            );
            args.push(svc.clone().into());
        }
        if let Some(node) = &filter.node {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM deletion_nodes n WHERE n.pod_uid = d.pod_uid AND n.node = ?)",
            );
            args.push(node.clone().into());
        }
        if let Some(o) = filter.outcome {
            sql.push_str(" AND d.complete = ?");
            args.push(i64::from(o == Outcome::Complete).into());
        }
        if let Some(since) = filter.since {
            sql.push_str(" AND d.finished_unix_nanos >= ?");
            args.push(since.as_nanos().into());
        }
        if let Some(after) = filter.after {
            sql.push_str(
                " AND (d.finished_unix_nanos < ? OR (d.finished_unix_nanos = ? AND d.rowid < ?))",
            );
            args.push(after.finished.as_nanos().into());
            args.push(after.finished.as_nanos().into());
            args.push(after.row.into());
        }
        sql.push_str(" ORDER BY d.finished_unix_nanos DESC, d.rowid DESC LIMIT ?");
        args.push((filter.limit as i64).into());
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (finished, row, json) = row?;
            out.push(StoredDeletion {
                position: DeletionPosition {
                    finished: UnixNanos::from_nanos(finished),
                    row,
                },
                record: serde_json::from_str(&json)?,
            });
        }
        Ok(out)
    }

    /// One deletion by pod UID.
    pub fn deletion(&self, pod_uid: &str) -> Result<Option<DeletionRecord>, StoreError> {
        let conn = self.reader();
        let json: Option<String> = conn
            .query_row(
                "SELECT record FROM deletions WHERE pod_uid = ?1",
                [pod_uid],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// (namespace, service) pairs with deletions finished since `since`.
    pub fn services(&self, since: UnixNanos) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT s.namespace, s.service FROM deletion_services s
             JOIN deletions d ON d.pod_uid = s.pod_uid
             WHERE d.finished_unix_nanos >= ?1 ORDER BY 1, 2",
        )?;
        let rows = stmt.query_map([since.as_nanos()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes everything finished before `before`; returns how many.
    pub fn prune(&self, before: UnixNanos) -> Result<usize, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM deletions WHERE finished_unix_nanos < ?1",
            [before.as_nanos()],
        )?;
        if n > 0 {
            self.generation.fetch_add(1, Ordering::Release);
        }
        Ok(n)
    }

    /// Persists a deletion that just started. Ignored when the deletion is
    /// already pending or finished.
    pub fn insert_pending(&self, row: &PendingRow) -> Result<(), StoreError> {
        let conn = self.writer();
        insert_pending(&conn, row)
    }

    /// Writes a checkpoint in one transaction. Rows of deletions that are no
    /// longer pending (finished meanwhile) are skipped.
    pub fn checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for row in &c.started {
            insert_pending(&tx, row)?;
        }
        {
            let mut update = tx.prepare_cached(
                "UPDATE pending_deletions SET terminating_unix_nanos = ?2, pod_gone_unix_nanos = ?3
                 WHERE pod_uid = ?1",
            )?;
            let mut routers =
                tx.prepare_cached("UPDATE pending_deletions SET routers = ?2 WHERE pod_uid = ?1")?;
            for u in &c.updated {
                update.execute(params![
                    u.pod_uid,
                    u.terminating_unix_nanos.map(UnixNanos::as_nanos),
                    u.pod_gone_unix_nanos.map(UnixNanos::as_nanos)
                ])?;
                if let Some(r) = &u.routers {
                    routers.execute(params![u.pod_uid, serde_json::to_string(r)?])?;
                }
            }
            let mut exists =
                tx.prepare_cached("SELECT 1 FROM pending_deletions WHERE pod_uid = ?1")?;
            let mut upsert = tx.prepare_cached(
                "INSERT INTO pending_nodes (pod_uid, node, rules_removed_unix_nanos, rules_mode,
                    rules_precision_ns, last_connection_unix_nanos, late_flows, late_accepted,
                    refused, aborted, clock_uncertainty_ns, removed_before_start_unix_nanos)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (pod_uid, node) DO UPDATE SET
                    rules_removed_unix_nanos = excluded.rules_removed_unix_nanos,
                    rules_mode = excluded.rules_mode,
                    rules_precision_ns = excluded.rules_precision_ns,
                    last_connection_unix_nanos = excluded.last_connection_unix_nanos,
                    late_flows = excluded.late_flows,
                    late_accepted = excluded.late_accepted,
                    refused = excluded.refused,
                    aborted = excluded.aborted,
                    clock_uncertainty_ns = excluded.clock_uncertainty_ns,
                    removed_before_start_unix_nanos = excluded.removed_before_start_unix_nanos",
            )?;
            for p in &c.nodes {
                if !exists.exists([&p.pod_uid])? {
                    continue;
                }
                for NodeAccRow { node, acc: a } in &p.nodes {
                    let rules = a.rules_removed.as_ref();
                    upsert.execute(params![
                        p.pod_uid,
                        node,
                        rules.map(|r| r.time.as_nanos()),
                        rules.map(|r| r.detector.as_str()),
                        rules.and_then(|r| r.precision_ns).map(count),
                        a.last_connection.map(UnixNanos::as_nanos),
                        count(a.late_flows),
                        count(a.late_accepted),
                        count(a.refused),
                        count(a.aborted),
                        a.clock_uncertainty_ns.map(count),
                        a.removed_before_start.map(UnixNanos::as_nanos),
                    ])?;
                }
            }
            let mut agent = tx.prepare_cached(
                "INSERT OR REPLACE INTO agents (agent_id, node, last_sequence, clock_offset_ns,
                    clock_uncertainty_ns, seen_unix_nanos)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for a in &c.agents {
                agent.execute(params![
                    a.agent_id,
                    a.node,
                    a.last_sequence as i64,
                    a.clock.map(|c| c.offset_ns),
                    a.clock.map(|c| count(c.uncertainty_ns)),
                    a.seen_unix_nanos.as_nanos(),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The in-flight state as last persisted. Pending rows of deletions that
    /// are also recorded as finished are dropped (the record wins).
    pub fn in_flight(&self) -> Result<InFlight, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM pending_deletions WHERE pod_uid IN (SELECT pod_uid FROM deletions)",
            [],
        )?;
        let mut out = InFlight::default();
        let mut index = std::collections::HashMap::new();
        {
            let mut stmt = tx.prepare(
                "SELECT pod_uid, namespace, pod_name, services, ip, ports, host_node,
                    received_unix_nanos, api_start_unix_nanos, grace_period_seconds,
                    t0_unix_nanos, tracked_since_unix_nanos, terminating_unix_nanos,
                    expected_nodes, pod_gone_unix_nanos, routers
                 FROM pending_deletions ORDER BY pod_uid",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let row = pending_row(r)?;
                index.insert(row.start.pod_uid.clone(), out.pending.len());
                out.pending.push((row, Vec::new()));
            }
            let mut stmt = tx.prepare(
                "SELECT pod_uid, node, rules_removed_unix_nanos, rules_mode, rules_precision_ns,
                    last_connection_unix_nanos, late_flows, late_accepted, refused, aborted,
                    clock_uncertainty_ns, removed_before_start_unix_nanos
                 FROM pending_nodes ORDER BY pod_uid, node",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (uid, acc) = node_row(r)?;
                if let Some(&i) = index.get(&uid) {
                    out.pending[i].1.push(acc);
                }
            }
            let mut stmt = tx.prepare(
                "SELECT agent_id, node, last_sequence, clock_offset_ns, clock_uncertainty_ns,
                    seen_unix_nanos
                 FROM agents ORDER BY agent_id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                out.agents.push(agent_row(r)?);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Forgets agents not written since `before`; returns how many.
    pub fn prune_agents(&self, before: UnixNanos) -> Result<usize, StoreError> {
        Ok(self.writer().execute(
            "DELETE FROM agents WHERE seen_unix_nanos < ?1",
            [before.as_nanos()],
        )?)
    }

    /// Records a finished startup window. Idempotent: recording the same
    /// pod UID again replaces the earlier record.
    pub fn record_startup(&self, rec: &StartupRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec)?;
        self.conn()
            .prepare_cached(
                "INSERT OR REPLACE INTO startup_records (pod_uid, ready_unix_nanos, record)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![rec.pod_uid, rec.ready_unix_nanos.as_nanos(), json])?;
        Ok(())
    }

    /// The newest `limit` finished startup windows ready at or after
    /// `since`, oldest first (the order the startup log keeps).
    pub fn startups(
        &self,
        since: UnixNanos,
        limit: usize,
    ) -> Result<Vec<StartupRecord>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT record FROM (
                 SELECT rowid, ready_unix_nanos, record FROM startup_records
                 WHERE ready_unix_nanos >= ?1
                 ORDER BY ready_unix_nanos DESC, rowid DESC LIMIT ?2)
             ORDER BY ready_unix_nanos, rowid",
        )?;
        let rows = stmt.query_map(params![since.as_nanos(), limit as i64], |r| {
            r.get::<_, String>(0)
        })?;
        let mut out = Vec::new();
        for json in rows {
            out.push(serde_json::from_str(&json?)?);
        }
        Ok(out)
    }

    /// Deletes the startup windows ready before `before` and all but the
    /// newest `kept`; returns how many.
    pub fn prune_startups(&self, before: UnixNanos, kept: usize) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM startup_records WHERE ready_unix_nanos < ?1 OR rowid NOT IN (
                 SELECT rowid FROM startup_records
                 ORDER BY ready_unix_nanos DESC, rowid DESC LIMIT ?2)",
            params![before.as_nanos(), kept as i64],
        )?)
    }

    /// Number of stored deletions.
    pub fn len(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .reader()
            .query_row("SELECT COUNT(*) FROM deletions", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

/// What a finished deletion's row keeps of its routers, to select samples
/// without parsing records.
struct RouterColumns {
    /// The bound over node and workload routers: `None` when censored (the
    /// censoring stands) or when none was measured.
    internal_bound: Option<f64>,
    /// JSON [`RouterRef`]s: the limiting router, and the limiting one of
    /// the node and workload routers.
    limiting: Option<String>,
    limiting_internal: Option<String>,
    /// The largest upper latency of each kind, in [`RouterKind::ALL`] order.
    by_kind: [Option<f64>; 3],
}

impl RouterColumns {
    fn of(rec: &DeletionRecord) -> Result<Self, serde_json::Error> {
        let largest = |keep: &dyn Fn(&RouterMeasurement) -> bool| {
            rec.routers
                .iter()
                .filter(|r| keep(r))
                .filter_map(|r| Some((r.upper_seconds()?, r)))
                .reduce(|a, b| if b.0 > a.0 { b } else { a })
        };
        let internal = largest(&|r| r.router.kind != RouterKind::External);
        let limiting_internal = if rec.censored {
            rec.limiting_router.clone()
        } else {
            internal.map(|(_, r)| r.router.clone())
        };
        let json = |r: Option<&RouterRef>| r.map(serde_json::to_string).transpose();
        Ok(Self {
            internal_bound: internal.filter(|_| !rec.censored).map(|(v, _)| v),
            limiting: json(rec.limiting_router.as_ref())?,
            limiting_internal: json(limiting_internal.as_ref())?,
            by_kind: RouterKind::ALL.map(|k| largest(&|r| r.router.kind == k).map(|(v, _)| v)),
        })
    }
}

/// A count as an SQLite integer (saturating; counts never get near).
fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn insert_pending(conn: &Connection, row: &PendingRow) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO pending_deletions (pod_uid, namespace, pod_name, services, ip,
            ports, host_node, received_unix_nanos, api_start_unix_nanos, grace_period_seconds,
            t0_unix_nanos, tracked_since_unix_nanos, terminating_unix_nanos, expected_nodes,
            pod_gone_unix_nanos, routers)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16
         WHERE NOT EXISTS (SELECT 1 FROM deletions WHERE pod_uid = ?1)",
    )?
    .execute(params![
        row.start.pod_uid,
        row.start.namespace,
        row.start.pod_name,
        serde_json::to_string(&row.start.services)?,
        row.start.ip.to_string(),
        serde_json::to_string(&row.start.ports)?,
        row.start.host_node,
        row.start.received_unix_nanos.map(UnixNanos::as_nanos),
        row.start.api_start_unix_nanos.map(UnixNanos::as_nanos),
        row.start.grace_period_seconds,
        row.t0_unix_nanos.as_nanos(),
        row.tracked_since_unix_nanos.as_nanos(),
        row.start.terminating_unix_nanos.map(UnixNanos::as_nanos),
        serde_json::to_string(&row.expected_nodes)?,
        row.pod_gone_unix_nanos.map(UnixNanos::as_nanos),
        serde_json::to_string(&row.routers)?,
    ])?;
    Ok(())
}

/// Reads persisted rows, turning every failure into [`StoreError::Corrupt`]
/// naming the table and the row.
struct RowReader<'a, 'r> {
    row: &'a rusqlite::Row<'r>,
    table: &'static str,
    key: String,
}

impl<'a, 'r> RowReader<'a, 'r> {
    /// Keyed by the first column (a TEXT key).
    fn new(row: &'a rusqlite::Row<'r>, table: &'static str, key: &str) -> Self {
        let key = match row.get_ref(0) {
            Ok(rusqlite::types::ValueRef::Text(t)) => {
                format!("{key} {:?}", String::from_utf8_lossy(t))
            }
            Ok(v) => format!("{key} {v:?}"),
            Err(e) => format!("{key} unreadable: {e}"),
        };
        Self { row, table, key }
    }

    fn corrupt(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            table: self.table,
            key: self.key.clone(),
            reason: reason.to_string(),
        }
    }

    fn get<T: rusqlite::types::FromSql>(&self, i: usize) -> Result<T, StoreError> {
        self.row.get(i).map_err(|e| self.corrupt(e))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, i: usize) -> Result<T, StoreError> {
        let text: String = self.get(i)?;
        serde_json::from_str(&text).map_err(|e| {
            let column = self.row.as_ref().column_name(i).unwrap_or("?");
            self.corrupt(format_args!("{column}: {e}"))
        })
    }

    fn count(&self, i: usize) -> Result<u64, StoreError> {
        let v: i64 = self.get(i)?;
        u64::try_from(v).map_err(|_| {
            let column = self.row.as_ref().column_name(i).unwrap_or("?");
            self.corrupt(format_args!("{column}: negative count {v}"))
        })
    }

    fn opt_count(&self, i: usize) -> Result<Option<u64>, StoreError> {
        match self.get::<Option<i64>>(i)? {
            None => Ok(None),
            Some(_) => self.count(i).map(Some),
        }
    }

    fn time(&self, i: usize) -> Result<UnixNanos, StoreError> {
        self.get(i).map(UnixNanos::from_nanos)
    }

    fn opt_time(&self, i: usize) -> Result<Option<UnixNanos>, StoreError> {
        Ok(self.get::<Option<i64>>(i)?.map(UnixNanos::from_nanos))
    }
}

fn pending_row(r: &rusqlite::Row<'_>) -> Result<PendingRow, StoreError> {
    let r = RowReader::new(r, "pending_deletions", "pod_uid");
    let ip: String = r.get(4)?;
    Ok(PendingRow {
        start: DeletionStart {
            pod_uid: r.get(0)?,
            namespace: r.get(1)?,
            pod_name: r.get(2)?,
            services: r.json(3)?,
            ip: ip
                .parse()
                .map_err(|_| r.corrupt(format_args!("ip {ip:?} is not an IP address")))?,
            ports: r.json(5)?,
            host_node: r.get(6)?,
            received_unix_nanos: r.opt_time(7)?,
            api_start_unix_nanos: r.opt_time(8)?,
            grace_period_seconds: r.get(9)?,
            terminating_unix_nanos: r.opt_time(12)?,
        },
        t0_unix_nanos: r.time(10)?,
        tracked_since_unix_nanos: r.time(11)?,
        expected_nodes: r.json(13)?,
        pod_gone_unix_nanos: r.opt_time(14)?,
        // Rows of version 4 files have none.
        routers: match r.get::<Option<String>>(15)? {
            Some(_) => r.json(15)?,
            None => Vec::new(),
        },
    })
}

fn node_row(row: &rusqlite::Row<'_>) -> Result<(String, NodeAccRow), StoreError> {
    let mut r = RowReader::new(row, "pending_nodes", "pod_uid");
    let node: String = r.get(1)?;
    r.key = format!("{}, node {node:?}", r.key);
    let rules_removed = match (r.opt_time(2)?, r.get::<Option<String>>(3)?) {
        (Some(time), Some(detector)) => Some(RulesRemoval {
            time,
            detector: detector
                .parse()
                .map_err(|e| r.corrupt(format_args!("rules_mode: {e}")))?,
            precision_ns: r.opt_count(4)?,
        }),
        (None, None) => None,
        _ => return Err(r.corrupt("rules_removed_unix_nanos and rules_mode must both be set")),
    };
    Ok((
        r.get(0)?,
        NodeAccRow {
            node,
            acc: NodeAccumulator {
                rules_removed,
                last_connection: r.opt_time(5)?,
                late_flows: r.count(6)?,
                late_accepted: r.count(7)?,
                refused: r.count(8)?,
                aborted: r.count(9)?,
                clock_uncertainty_ns: r.opt_count(10)?,
                removed_before_start: r.opt_time(11)?,
            },
        },
    ))
}

fn agent_row(r: &rusqlite::Row<'_>) -> Result<AgentRow, StoreError> {
    let r = RowReader::new(r, "agents", "agent_id");
    let clock = match (r.get::<Option<i64>>(3)?, r.opt_count(4)?) {
        (Some(offset_ns), Some(uncertainty_ns)) => Some(ClockEstimate {
            offset_ns,
            uncertainty_ns,
        }),
        (None, None) => None,
        _ => return Err(r.corrupt("clock_offset_ns and clock_uncertainty_ns must both be set")),
    };
    Ok(AgentRow {
        agent_id: r.get(0)?,
        node: r.get(1)?,
        last_sequence: r.get::<i64>(2)? as u64,
        clock,
        seen_unix_nanos: r.time(5)?,
    })
}

/// Each scope starts from the index that narrows it most: the service
/// index, the (namespace, time) index, or the time index.
fn scoped_query(select: &str, scope: &Scope, since: UnixNanos) -> (String, Vec<Value>) {
    match (&scope.namespace, &scope.service) {
        (Some(ns), Some(svc)) => (
            format!(
                "{select} JOIN deletion_services s ON s.pod_uid = d.pod_uid
                 WHERE s.namespace = ? AND s.service = ? AND d.finished_unix_nanos >= ?"
            ),
            vec![
                ns.clone().into(),
                svc.clone().into(),
                since.as_nanos().into(),
            ],
        ),
        (Some(ns), None) => (
            format!("{select} WHERE d.namespace = ? AND d.finished_unix_nanos >= ?"),
            vec![ns.clone().into(), since.as_nanos().into()],
        ),
        (None, _) => (
            format!("{select} WHERE d.finished_unix_nanos >= ?"),
            vec![since.as_nanos().into()],
        ),
    }
}
