//! The startup side: new pods routed before they can serve, and how long
//! each node takes to start routing to them.
//!
//! For every endpoint an EndpointSlice shows ready ([`detect`]; T_ready is
//! the aggregator's receipt of that change), a [`window::Window`] opens:
//! the agents watch the endpoint until T_ready + `--startup-window`, and
//! report when their node's dataplane started selecting it (rules added),
//! every new connection to it, and the connections it refused (no socket
//! listened) or reset. The correlator feeds them in, attributed to routers
//! as for deletions; the finished windows go to the store (restored at
//! start) and to the [`Log`], which sums them up per workload, node and
//! router kind ([`findings`]) for `GET /v1/startup`.
//!
//! The watched set stays bounded: a window lasts `window + settle`, and at
//! most `--startup-max-watched` are open at once (further new pods are not
//! watched, and counted), so a rollout of thousands of pods cannot
//! overflow the agents' watched-address map (`MAX_WATCHED` addresses,
//! shared with the terminating pods).

pub mod detect;
pub mod findings;
pub mod metrics;
pub mod openapi;
pub mod window;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use observer_proto::api::startup::{StartupRecord, StartupReport};
use observer_proto::{NewEndpoint, UnixNanos};

use crate::pods::{PodIndex, PodSource};

pub use self::findings::Thresholds;
pub use self::window::{NewPod, Seen, Window};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartupSettings {
    /// How long after T_ready refusals count and additions are awaited.
    pub window: Duration,
    /// How long a window stays open past its end for reports in flight,
    /// and how far before T_ready a node's rules addition may lie (its
    /// kube-proxy may see the slice before the aggregator does).
    pub settle: Duration,
    /// Windows open at once at most.
    pub max_watched: usize,
    pub thresholds: Thresholds,
    /// Finished windows kept for the API at most (newest kept).
    pub kept: usize,
}

impl Default for StartupSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            settle: Duration::from_secs(2),
            max_watched: 8192,
            thresholds: Thresholds::default(),
            kept: 10_000,
        }
    }
}

/// What [`Tracker::open`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// A window opened: agents must watch this.
    Watch(NewEndpoint),
    /// The pod's window is open already (another of its slices).
    AlreadyOpen,
    /// `max_watched` windows are open: this pod is not watched.
    Full,
}

/// The windows in flight, by pod and by address.
#[derive(Debug, Default)]
pub struct Tracker {
    settings: StartupSettings,
    windows: HashMap<String, Window>,
    by_ip: HashMap<IpAddr, Vec<String>>,
    /// Recent deletion starts: (workload, T0), oldest first.
    deletions: VecDeque<(String, UnixNanos)>,
}

/// Deletion starts kept at most for the rollout finding.
const MAX_DELETIONS_KEPT: usize = 100_000;

impl Tracker {
    pub fn new(settings: StartupSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// Opens the window of `pod`, which every node in `expected` should
    /// start routing to.
    pub fn open(&mut self, pod: NewPod, expected: Arc<BTreeSet<String>>) -> Opened {
        let uid = pod.endpoint.pod_uid.clone();
        if let Some(w) = self.windows.get_mut(&uid) {
            for s in &pod.endpoint.services {
                if !w.pod.endpoint.services.contains(s) {
                    w.pod.endpoint.services.push(s.clone());
                }
            }
            return Opened::AlreadyOpen;
        }
        if self.windows.len() >= self.settings.max_watched {
            return Opened::Full;
        }
        let endpoint = pod.endpoint.clone();
        self.by_ip.entry(endpoint.ip).or_default().push(uid.clone());
        let w = Window::new(pod, expected, self.settings.window, self.settings.settle);
        self.windows.insert(uid, w);
        Opened::Watch(endpoint)
    }

    /// Whether a window watches `ip`.
    pub fn watches(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// Folds `s` into the windows of its endpoint's address; returns
    /// whether any counted it.
    pub fn apply(&mut self, s: &Seen<'_>) -> bool {
        let Some(uids) = self.by_ip.get(&s.obs.endpoint().ip()) else {
            return false;
        };
        let mut counted = false;
        for uid in uids {
            if let Some(w) = self.windows.get_mut(uid) {
                counted |= w.apply(s);
            }
        }
        counted
    }

    /// Gives the windows of `ip` the workload and node of `pod` (see
    /// [`NewPod::identify`]).
    pub fn identify(&mut self, ip: IpAddr, pod: &PodSource) {
        for uid in self.by_ip.get(&ip).into_iter().flatten() {
            if let Some(w) = self.windows.get_mut(uid) {
                w.pod.identify(pod);
            }
        }
    }

    /// A pod of `workload` began its deletion at `t0`: kept until every
    /// window it may concern has closed (see [`Window::old_pod_deleted`]).
    pub fn old_pod_deleted(&mut self, workload: String, t0: UnixNanos) {
        let kept = self.settings.window + self.settings.settle * 2;
        while self
            .deletions
            .front()
            .is_some_and(|(_, t)| *t + kept < t0 || self.deletions.len() >= MAX_DELETIONS_KEPT)
        {
            self.deletions.pop_front();
        }
        self.deletions.push_back((workload, t0));
    }

    /// Closes the windows whose end plus the settling time passed, each
    /// with its workload from `pods` when its Pod event came late and the
    /// first deletion of an old pod of that workload in it.
    pub fn due(&mut self, now: UnixNanos, pods: &PodIndex) -> Vec<Window> {
        let settle = self.settings.settle;
        let due: Vec<String> = self
            .windows
            .iter()
            .filter(|(_, w)| w.end() + settle <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut closed: Vec<Window> = due.iter().filter_map(|uid| self.close(uid)).collect();
        for w in &mut closed {
            if let Some(p) = pods.get(w.pod.endpoint.ip) {
                w.pod.identify(p);
            }
            for (workload, t0) in &self.deletions {
                w.old_pod_deleted(workload, *t0);
            }
        }
        closed
    }

    fn close(&mut self, uid: &str) -> Option<Window> {
        let w = self.windows.remove(uid)?;
        let ip = w.pod.endpoint.ip;
        if let Some(v) = self.by_ip.get_mut(&ip) {
            v.retain(|u| u != uid);
            if v.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
        Some(w)
    }

    /// What agents watch for the open windows.
    pub fn endpoints(&self) -> Vec<NewEndpoint> {
        self.windows
            .values()
            .map(|w| w.pod.endpoint.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// Which finished windows a report covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub namespace: Option<String>,
    pub service: Option<String>,
    /// `namespace/owner`.
    pub workload: Option<String>,
    /// Newest records listed at most.
    pub limit: usize,
}

impl Query {
    fn covers(&self, r: &StartupRecord) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == r.namespace)
            && self.service.as_ref().is_none_or(|s| r.services.contains(s))
            && self.workload.as_ref().is_none_or(|w| *w == r.workload)
    }
}

/// The finished windows, newest last, kept in memory (at most `kept`, none
/// older than the retention).
#[derive(Debug)]
pub struct Log {
    settings: StartupSettings,
    retention: Duration,
    records: Mutex<VecDeque<StartupRecord>>,
}

impl Log {
    pub fn new(settings: StartupSettings, retention: Duration) -> Self {
        Self {
            settings,
            retention,
            records: Mutex::new(VecDeque::new()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, VecDeque<StartupRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, r: StartupRecord, now: UnixNanos) {
        let mut records = self.records();
        let horizon = now - self.retention;
        while records
            .front()
            .is_some_and(|f| f.ready_unix_nanos < horizon || records.len() >= self.settings.kept)
        {
            records.pop_front();
        }
        records.push_back(r);
    }

    /// `GET /v1/startup` for `q`.
    pub fn report(&self, q: &Query, cluster: &str) -> StartupReport {
        let records: Vec<StartupRecord> = self
            .records()
            .iter()
            .filter(|r| q.covers(r))
            .cloned()
            .collect();
        StartupReport {
            cluster: cluster.to_owned(),
            namespace: q.namespace.clone(),
            service: q.service.clone(),
            workload: q.workload.clone(),
            window_seconds: self.settings.window.as_secs_f64(),
            new_pods: records.len() as u64,
            findings: findings::findings(&records, self.settings.thresholds),
            rollout_findings: findings::rollout_findings(&records),
            workloads: findings::workloads(&records),
            by_node: findings::by_node(&records),
            by_router_kind: findings::by_router_kind(&records),
            pods: records.iter().rev().take(q.limit).cloned().collect(),
        }
    }
}

/// Shared between the correlator (writer) and the HTTP API (reader).
pub type SharedLog = Arc<Log>;

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ip: &str, service: &str, ready_s: i64) -> NewPod {
        NewPod {
            endpoint: NewEndpoint {
                pod_uid: uid.into(),
                namespace: "shop".into(),
                pod_name: format!("web-{uid}"),
                services: vec![service.into()],
                ip: ip.parse().unwrap(),
                ports: vec![8080],
                ready: UnixNanos::from_seconds(ready_s),
            },
            workload: "shop/web".into(),
            host_node: None,
            ready_condition: None,
            identified: true,
        }
    }

    fn tracker(max_watched: usize) -> Tracker {
        Tracker::new(StartupSettings {
            max_watched,
            ..StartupSettings::default()
        })
    }

    #[test]
    fn the_watched_set_is_capped_and_frees_as_windows_close() {
        let mut t = tracker(2);
        let none = Arc::new(BTreeSet::new());
        assert!(matches!(
            t.open(pod("u1", "10.0.0.1", "web", 100), none.clone()),
            Opened::Watch(_)
        ));
        assert!(matches!(
            t.open(pod("u2", "10.0.0.2", "web", 105), none.clone()),
            Opened::Watch(_)
        ));
        assert_eq!(
            t.open(pod("u3", "10.0.0.3", "web", 105), none.clone()),
            Opened::Full
        );
        assert!(!t.watches("10.0.0.3".parse().unwrap()));
        // Window 10 s + settle 2 s: u1 closes at 112.
        let pods = PodIndex::default();
        assert!(t.due(UnixNanos::from_seconds(111), &pods).is_empty());
        let closed = t.due(UnixNanos::from_seconds(112), &pods);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].pod.endpoint.pod_uid, "u1");
        assert!(!t.watches("10.0.0.1".parse().unwrap()));
        assert!(matches!(
            t.open(pod("u3", "10.0.0.3", "web", 112), none),
            Opened::Watch(_)
        ));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_second_slice_of_an_open_window_adds_its_service() {
        let mut t = tracker(10);
        let none = Arc::new(BTreeSet::new());
        t.open(pod("u1", "10.0.0.1", "web", 100), none.clone());
        assert_eq!(
            t.open(pod("u1", "10.0.0.1", "web-canary", 100), none),
            Opened::AlreadyOpen
        );
        assert_eq!(t.endpoints()[0].services, ["web", "web-canary"]);
    }

    #[test]
    fn the_log_filters_by_scope_and_keeps_the_newest() {
        let log = Log::new(
            StartupSettings {
                kept: 2,
                ..StartupSettings::default()
            },
            Duration::from_secs(3600),
        );
        let now = UnixNanos::from_seconds(1_000);
        for (uid, ns) in [("u1", "shop"), ("u2", "shop"), ("u3", "other")] {
            log.push(
                StartupRecord {
                    pod_uid: uid.into(),
                    namespace: ns.into(),
                    workload: format!("{ns}/web"),
                    services: vec!["web".into()],
                    ready_unix_nanos: now,
                    ..StartupRecord::default()
                },
                now,
            );
        }
        let all = log.report(
            &Query {
                limit: 10,
                ..Query::default()
            },
            "c",
        );
        assert_eq!(all.new_pods, 2, "u1 went past `kept`");
        assert_eq!(all.pods[0].pod_uid, "u3", "newest first");
        let shop = log.report(
            &Query {
                namespace: Some("shop".into()),
                limit: 10,
                ..Query::default()
            },
            "c",
        );
        assert_eq!(shop.new_pods, 1);
        let later = now + Duration::from_secs(7200);
        log.push(StartupRecord::default(), later);
        let q = Query {
            limit: 10,
            ..Query::default()
        };
        assert_eq!(log.report(&q, "c").new_pods, 1, "older than the retention");
    }
}
