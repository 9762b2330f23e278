//! An in-process Kubernetes API server double for tests and the lab, never
//! for production paths. It speaks the real wire format for what the
//! aggregator reads: JSON of k8s-openapi types, list and watch (a chunked
//! stream of newline-separated `WatchEvent`s) with resourceVersion,
//! `allowWatchBookmarks` / BOOKMARK events, `410 Gone` (an ERROR event with an
//! `Expired` Status) when a watch resumes from a compacted resourceVersion,
//! and equality label / field selectors. Objects are created, updated and
//! deleted through the Rust API; deletions of pods follow Kubernetes:
//! `deletionTimestamp = now + grace` (whole seconds) and
//! `deletionGracePeriodSeconds`, and the object stays until the "kubelet"
//! ([`ApiServerDouble::finish_deletion`]) removes it.
//!
//! kubectl works against it too: discovery ([`discovery`]), server-side
//! Tables ([`table`]), and `DELETE` of pods, carried out by a
//! [`PodDeleter`] (the lab's kubelet) when one is set. Errors are `Status`
//! objects with the API server's reasons and codes.
//!
//! Components authenticate and authorize through it as through the real
//! one ([`auth`]): `TokenRequest` for ServiceAccount tokens bound to a pod,
//! `TokenReview` and `SubjectAccessReview`. Requests to the double itself
//! are not authenticated.
//!
//! Not implemented: other writes over HTTP (`POST`, `PUT`, `PATCH` answer
//! 405 MethodNotAllowed), list paging (`limit` is ignored: every list is
//! one page), set-based label selectors, `sendInitialEvents`, dry runs.

pub mod auth;
mod deletion;
pub mod discovery;
pub mod kubectl;
pub mod objects;
mod selector;
mod server;
mod status;
pub mod table;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::broadcast;

pub use server::ServeError;

#[derive(Debug, thiserror::Error)]
pub enum DoubleError {
    #[error("{kind} {key} already exists")]
    AlreadyExists { kind: String, key: String },
    #[error("{kind} {key} not found")]
    NotFound { kind: String, key: String },
    #[error("object has no metadata.name")]
    NoName,
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A request the API server would refuse as invalid.
    #[error("{0}")]
    Invalid(String),
    #[error("kube config: {0}")]
    Kube(String),
    /// A [`PodDeleter`] could not carry out a deletion.
    #[error("deleting pod {namespace}/{name}: {reason}")]
    Deletion {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Carries out a pod `DELETE` received over HTTP, as the kubelet and the
/// EndpointSlice controller would: the lab's own deletion path. It must
/// start the deletion through [`ApiServerDouble::delete`] (which sets
/// `deletionTimestamp` and `deletionGracePeriodSeconds`) and end it with
/// [`ApiServerDouble::finish_deletion`] once the pod's processes ended.
pub trait PodDeleter: Send + Sync {
    /// Deletes the pod `namespace/name` with this grace period (already
    /// resolved from the request or the pod's
    /// `terminationGracePeriodSeconds`); for a pod already terminating, a
    /// shorter grace period shortens its termination (a second `kubectl
    /// delete`, `--now`). [`DoubleError::NotFound`] when it runs no such
    /// pod.
    fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        grace_seconds: i64,
    ) -> Result<(), DoubleError>;
}

/// Where a resource type lives in the API: the `api/v1` or
/// `apis/<group>/<version>` prefix and the plural path segment.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Kind {
    pub prefix: String,
    pub plural: String,
    pub api_version: String,
    pub kind: String,
}

impl Kind {
    fn of<K: k8s_openapi::Resource>() -> Self {
        let prefix = if K::GROUP.is_empty() {
            format!("api/{}", K::VERSION)
        } else {
            format!("apis/{}/{}", K::GROUP, K::VERSION)
        };
        Self {
            prefix,
            plural: K::URL_PATH_SEGMENT.into(),
            api_version: K::API_VERSION.into(),
            kind: K::KIND.into(),
        }
    }
}

/// (kind, namespace or "", name)
type Key = (Kind, String, String);

#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: Kind,
    pub namespace: String,
    pub typ: &'static str,
    pub object: Value,
}

pub(crate) struct State {
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    /// Events after `compacted`, oldest first.
    pub history: VecDeque<Event>,
    /// Watches may resume from resourceVersions >= this one only.
    pub compacted: u64,
    pub history_limit: usize,
    pub uid_counter: u64,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub events: broadcast::Sender<Control>,
    pub watches: AtomicU64,
    pub deleter: Mutex<Option<Arc<dyn PodDeleter>>>,
    pub auth: Mutex<auth::Auth>,
}

#[derive(Clone, Debug)]
pub(crate) enum Control {
    Event(Event),
    /// Every watcher that asked for bookmarks gets one at this version.
    Bookmark(u64),
    /// Every open watch stream ends (the client reconnects).
    Disconnect,
    /// Every open watch stream gets an ERROR 410 Expired and ends.
    Expire,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn deleter(&self) -> Option<Arc<dyn PodDeleter>> {
        self.deleter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// See [`ApiServerDouble::delete`].
    pub fn delete(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        grace_seconds: i64,
    ) -> Result<(), DoubleError> {
        if grace_seconds <= 0 {
            return self.finish_deletion(kind, namespace, name);
        }
        let mut st = self.state();
        let key = (kind.clone(), namespace.to_string(), name.to_string());
        let mut v = st
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| DoubleError::NotFound {
                kind: kind.kind.clone(),
                key: format!("{namespace}/{name}"),
            })?;
        let now = Timestamp::now().as_second();
        let existing = v["metadata"]["deletionGracePeriodSeconds"].as_i64();
        if let Some(g) = existing {
            if grace_seconds >= g {
                return Ok(());
            }
            // The request time stays deletionTimestamp - old grace; the new
            // deadline is request time + new grace.
            let old_ts = v["metadata"]["deletionTimestamp"]
                .as_str()
                .unwrap_or_default();
            let start = old_ts
                .parse::<Timestamp>()
                .map_or(now, |t| t.as_second() - g);
            v["metadata"]["deletionTimestamp"] = timestamp_json(start + grace_seconds)?;
        } else {
            v["metadata"]["deletionTimestamp"] = timestamp_json(now + grace_seconds)?;
        }
        v["metadata"]["deletionGracePeriodSeconds"] = grace_seconds.into();
        self.commit(&mut st, key, v, "MODIFIED");
        Ok(())
    }

    /// See [`ApiServerDouble::finish_deletion`].
    pub fn finish_deletion(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
    ) -> Result<(), DoubleError> {
        let mut st = self.state();
        let key = (kind.clone(), namespace.to_string(), name.to_string());
        let v = st
            .objects
            .remove(&key)
            .ok_or_else(|| DoubleError::NotFound {
                kind: kind.kind.clone(),
                key: format!("{namespace}/{name}"),
            })?;
        st.objects.insert(key.clone(), v.clone());
        self.commit(&mut st, key.clone(), v, "DELETED");
        st.objects.remove(&key);
        Ok(())
    }

    /// Stores `v` at a new resourceVersion and tells the watchers.
    pub fn commit(&self, st: &mut State, key: Key, mut v: Value, typ: &'static str) -> Value {
        st.rv += 1;
        let rv = st.rv;
        v["apiVersion"] = key.0.api_version.clone().into();
        v["kind"] = key.0.kind.clone().into();
        v["metadata"]["resourceVersion"] = rv.to_string().into();
        st.objects.insert(key.clone(), v.clone());
        let ev = Event {
            rv,
            kind: key.0,
            namespace: key.1,
            typ,
            object: v.clone(),
        };
        st.history.push_back(ev.clone());
        while st.history.len() > st.history_limit {
            if let Some(old) = st.history.pop_front() {
                st.compacted = old.rv;
            }
        }
        let _ = self.events.send(Control::Event(ev));
        v
    }
}

/// A running double. Dropping it stops the server.
pub struct ApiServerDouble {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServerDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

impl ApiServerDouble {
    /// Serves on 127.0.0.1 on a free port.
    pub async fn start() -> Result<Self, ServeError> {
        Self::start_on("127.0.0.1:0".parse().expect("literal address")).await
    }

    /// Serves on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> Result<Self, ServeError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 1,
                history_limit: 10_000,
                uid_counter: 0,
            }),
            events: broadcast::channel(16_384).0,
            watches: AtomicU64::new(0),
            deleter: Mutex::new(None),
            auth: Mutex::default(),
        });
        let (addr, task) = server::spawn(addr, Arc::clone(&shared)).await?;
        Ok(Self { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration pointing at the double.
    pub fn kube_config(&self) -> kube::Config {
        let mut c = kube::Config::new(self.url().parse().expect("valid URL"));
        c.default_namespace = "default".into();
        c.read_timeout = Some(Duration::from_secs(300));
        c
    }

    pub fn client(&self) -> Result<kube::Client, DoubleError> {
        kube::Client::try_from(self.kube_config()).map_err(|e| DoubleError::Kube(e.to_string()))
    }

    /// A kubeconfig file body for processes (the lab's aggregator binary).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {url}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\ncurrent-context: double\nusers:\n- name: double\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// Creates an object: assigns uid, creationTimestamp and resourceVersion.
    pub fn create<K>(&self, obj: &K) -> Result<K, DoubleError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let kind = Kind::of::<K>();
        let mut v = serde_json::to_value(obj)?;
        let (ns, name) = names(&v)?;
        let mut st = self.shared.state();
        let key = (kind.clone(), ns, name);
        if st.objects.contains_key(&key) {
            return Err(DoubleError::AlreadyExists {
                kind: kind.kind,
                key: format!("{}/{}", key.1, key.2),
            });
        }
        if v.pointer("/metadata/uid").is_none_or(Value::is_null) {
            st.uid_counter += 1;
            v["metadata"]["uid"] = format!("00000000-0000-4000-8000-{:012}", st.uid_counter).into();
        }
        v["metadata"]["creationTimestamp"] = serde_json::to_value(now_time())?;
        let v = self.shared.commit(&mut st, key, v, "ADDED");
        Ok(serde_json::from_value(v)?)
    }

    /// Replaces an existing object (keeps its uid and creationTimestamp).
    pub fn update<K>(&self, obj: &K) -> Result<K, DoubleError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let kind = Kind::of::<K>();
        let mut v = serde_json::to_value(obj)?;
        let (ns, name) = names(&v)?;
        let mut st = self.shared.state();
        let key = (kind.clone(), ns, name);
        let old = st.objects.get(&key).ok_or_else(|| DoubleError::NotFound {
            kind: kind.kind.clone(),
            key: format!("{}/{}", key.1, key.2),
        })?;
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            if let Some(x) = old["metadata"].get(f) {
                v["metadata"][f] = x.clone();
            }
        }
        let v = self.shared.commit(&mut st, key, v, "MODIFIED");
        Ok(serde_json::from_value(v)?)
    }

    /// Creates the object, or replaces it if it exists.
    pub fn apply<K>(&self, obj: &K) -> Result<K, DoubleError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        match self.update(obj) {
            Err(DoubleError::NotFound { .. }) => self.create(obj),
            r => r,
        }
    }

    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let st = self.shared.state();
        let v = st
            .objects
            .get(&(Kind::of::<K>(), namespace.into(), name.into()))?;
        serde_json::from_value(v.clone()).ok()
    }

    /// Starts a graceful deletion as the API server does: sets
    /// `deletionTimestamp = now + grace` (whole seconds) and
    /// `deletionGracePeriodSeconds = grace`; the object stays until
    /// [`Self::finish_deletion`]. A grace of 0 removes it at once. A second
    /// call may only shorten the grace period.
    pub fn delete<K>(
        &self,
        namespace: &str,
        name: &str,
        grace_seconds: i64,
    ) -> Result<(), DoubleError>
    where
        K: k8s_openapi::Resource,
    {
        self.shared
            .delete(&Kind::of::<K>(), namespace, name, grace_seconds)
    }

    /// Removes the object (the kubelet confirming a pod is gone, or a
    /// deletion without grace): a DELETED event.
    pub fn finish_deletion<K>(&self, namespace: &str, name: &str) -> Result<(), DoubleError>
    where
        K: k8s_openapi::Resource,
    {
        self.shared
            .finish_deletion(&Kind::of::<K>(), namespace, name)
    }

    /// Hands every pod `DELETE` received over HTTP to `deleter` from now
    /// on. Without one, the double only marks the pod deleted, as an API
    /// server with no kubelet would.
    pub fn serve_pod_deletions(&self, deleter: Arc<dyn PodDeleter>) {
        *self
            .shared
            .deleter
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(deleter);
    }

    /// Forgets all history: a watch resuming from any earlier
    /// resourceVersion now gets 410 Gone and must relist.
    pub fn compact(&self) {
        let mut st = self.shared.state();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Compacts and sends every open watch an ERROR event with a 410 Expired
    /// Status, as an API server does when its watch cache drops a
    /// watcher's window: the client must relist.
    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.shared.events.send(Control::Expire);
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that
    /// asked for bookmarks.
    pub fn bookmark(&self) {
        let rv = self.shared.state().rv;
        let _ = self.shared.events.send(Control::Bookmark(rv));
    }

    /// Ends every open watch stream, as an API server restart or a load
    /// balancer timeout would.
    pub fn disconnect_watches(&self) {
        let _ = self.shared.events.send(Control::Disconnect);
    }

    /// Issues a ServiceAccount token as `TokenRequest` does (the Rust API
    /// also allows lifetimes under ten minutes, for tests of expiry).
    pub fn token(&self, grant: &auth::TokenGrant<'_>) -> Result<String, DoubleError> {
        self.shared.issue(grant).map(|(token, _)| token)
    }

    /// Replaces the rule table `SubjectAccessReview` decides by (empty:
    /// everything is denied).
    pub fn set_access_rules(&self, rules: Vec<auth::AccessRule>) {
        self.shared.auth().set_rules(rules);
    }

    /// While `down`, token and access reviews answer 503, as an API server
    /// whose authenticator webhook or etcd is failing does.
    pub fn set_reviews_unavailable(&self, down: bool) {
        self.shared.auth().set_unavailable(down);
    }

    /// Number of TokenReviews answered so far (to check caching).
    pub fn token_reviews(&self) -> u64 {
        self.shared.auth().reviews()
    }

    /// Number of watch requests served so far (to check reconnects).
    pub fn watch_requests(&self) -> u64 {
        self.shared.watches.load(Ordering::Relaxed)
    }
}

fn names(v: &Value) -> Result<(String, String), DoubleError> {
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .ok_or(DoubleError::NoName)?;
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok((ns.to_string(), name.to_string()))
}

fn timestamp_json(unix_seconds: i64) -> Result<Value, DoubleError> {
    let t = Timestamp::from_second(unix_seconds).unwrap_or(Timestamp::UNIX_EPOCH);
    Ok(serde_json::to_value(Time(t))?)
}
