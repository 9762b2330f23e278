//! Embedded persistence (SQLite): finished deletions survive restarts and are
//! pruned after the retention window. One row per deletion holds the whole
//! record as JSON; the columns and side tables beside it exist only to select
//! rows (by time, namespace, service, node, outcome) without parsing JSON.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params, params_from_iter, types::Value};

use crate::model::{DeletionRecord, UnixNanos};

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
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deletions (
    pod_uid TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    finished_unix_nanos INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    propagation_seconds REAL,
    aborted_connections INTEGER NOT NULL,
    record TEXT NOT NULL
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
";

/// Which deletions a recommendation draws on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub namespace: Option<String>,
    /// Only with a namespace.
    pub service: Option<String>,
}

/// What a recommendation needs from the store for one scope and window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    /// Full-propagation latency of each complete deletion, ascending.
    pub latencies: Vec<f64>,
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
    pub limit: usize,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let conn = Connection::open(path)?;
        // WAL + NORMAL: a crash loses at most the last transactions, never
        // corrupts, and writers do not block readers.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found != 0 && found != SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path: path.display().to_string(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Opens a private in-memory store (benchmarks, tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::open(":memory:")
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a finished deletion. Idempotent: recording the same pod UID
    /// again replaces the earlier record.
    pub fn record_deletion(&self, rec: &DeletionRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec)?;
        let aborted: u64 = rec.nodes.iter().map(|n| n.aborted_connections).sum();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM deletions WHERE pod_uid = ?1", [&rec.pod_uid])?;
        tx.execute(
            "INSERT INTO deletions (pod_uid, namespace, finished_unix_nanos, complete,
                propagation_seconds, aborted_connections, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                rec.pod_uid,
                rec.namespace,
                rec.finished_unix_nanos,
                rec.complete,
                rec.propagation_seconds,
                aborted as i64,
                json
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
        Ok(())
    }

    /// Latencies of complete deletions in `scope` finished at or after `since`.
    pub fn samples(&self, scope: &Scope, since: UnixNanos) -> Result<Samples, StoreError> {
        let (sql, args) = scoped_query(
            "SELECT d.propagation_seconds, d.aborted_connections FROM deletions d",
            scope,
            since,
        );
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(args))?;
        let mut out = Samples::default();
        while let Some(row) = rows.next()? {
            if let Some(l) = row.get::<_, Option<f64>>(0)? {
                out.latencies.push(l);
            }
            out.aborted_connections += row.get::<_, i64>(1)? as u64;
        }
        out.latencies.sort_by(f64::total_cmp);
        Ok(out)
    }

    /// Finished deletions matching `filter`, newest first.
    pub fn deletions(&self, filter: &DeletionFilter) -> Result<Vec<DeletionRecord>, StoreError> {
        let mut sql = String::from("SELECT d.record FROM deletions d WHERE 1 = 1");
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
            args.push(since.into());
        }
        sql.push_str(" ORDER BY d.finished_unix_nanos DESC LIMIT ?");
        args.push((filter.limit as i64).into());
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for json in rows {
            out.push(serde_json::from_str(&json?)?);
        }
        Ok(out)
    }

    /// One deletion by pod UID.
    pub fn deletion(&self, pod_uid: &str) -> Result<Option<DeletionRecord>, StoreError> {
        let conn = self.conn();
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
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT s.namespace, s.service FROM deletion_services s
             JOIN deletions d ON d.pod_uid = s.pod_uid
             WHERE d.finished_unix_nanos >= ?1 ORDER BY 1, 2",
        )?;
        let rows = stmt.query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes everything finished before `before`; returns how many.
    pub fn prune(&self, before: UnixNanos) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM deletions WHERE finished_unix_nanos < ?1",
            [before],
        )?)
    }

    /// Number of stored deletions.
    pub fn len(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM deletions", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
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
            vec![ns.clone().into(), svc.clone().into(), since.into()],
        ),
        (Some(ns), None) => (
            format!("{select} WHERE d.namespace = ? AND d.finished_unix_nanos >= ?"),
            vec![ns.clone().into(), since.into()],
        ),
        (None, _) => (
            format!("{select} WHERE d.finished_unix_nanos >= ?"),
            vec![since.into()],
        ),
    }
}
