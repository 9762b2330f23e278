//! Assembles the running service: gRPC for agents, HTTP for CI and
//! Prometheus, the Kubernetes watchers and the periodic housekeeping
//! (finishing timed-out deletions, checkpoints of the in-flight state,
//! retention, recommendation gauges). The binary and the end-to-end tests
//! start it the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use observer_proto::UnixNanos;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Guards;
use crate::config::Settings;
use crate::correlate::Correlator;
use crate::drain::Drains;
use crate::grpc;
use crate::http::{self, HttpState};
use crate::kube_thread::{KubeThread, KubeThreadError};
use crate::kube_watch;
use crate::limits::{Admission, Limits};
use crate::metrics::{Metrics, NamespaceService};
use crate::readiness::Readiness;
use crate::recommend::service::Recommender;
use crate::store::{Scope, Store, StoreError};

/// How often pending deletions are checked for completion or timeout.
pub const TICK: Duration = Duration::from_millis(200);
/// How often retention and the recommendation gauges run.
pub const HOUSEKEEPING: Duration = Duration::from_secs(30);

/// Why [`start`] failed; the cause is the error's source.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("reading a listener's address")]
    Io(#[from] std::io::Error),
    #[error("restoring the in-flight state from the store")]
    Restore(#[from] StoreError),
    #[error("setting up authentication")]
    Auth(#[from] crate::auth::GuardError),
    #[error("starting the Kubernetes client's thread")]
    Kube(#[from] KubeThreadError),
}

/// A running aggregator.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub correlator: Arc<Correlator>,
    pub http: HttpState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts every part on the given listeners. Without a Kubernetes config
/// (tests that feed the correlator directly) the service is ready at once.
/// The in-flight state of the previous run is restored from the store
/// before anything is served.
pub fn start(
    settings: Settings,
    store: Arc<Store>,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    kube: Option<kube::Config>,
) -> Result<Running, StartError> {
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::new(kube.is_none());
    let (shutdown, stop) = watch::channel(false);
    let kube = kube
        .map(|config| KubeThread::start(config, stop.clone()))
        .transpose()?;
    let client = kube.as_ref().map(|k| k.client.clone());
    let guards = settings
        .auth
        .guards(client.as_ref(), &metrics, ready.clone())?;
    if guards.agents.is_none() {
        tracing::warn!(
            "authentication is OFF: any client may register as any node and read /v1/deletions"
        );
    }
    let correlator = Correlator::new(
        Arc::clone(&settings),
        Arc::clone(&store),
        Arc::clone(&metrics),
    );
    if kube.is_some() {
        correlator.use_node_list();
    }
    let restored = correlator.restore(UnixNanos::now())?;
    tracing::info!(
        deletions = restored.deletions,
        node_accumulators = restored.node_accumulators,
        agents = restored.agents,
        startup_records = restored.startup_records,
        "restored the in-flight state"
    );
    let drains = Arc::new(Drains::new(
        Arc::clone(&correlator),
        guards.pods.clone(),
        settings.limits.max_drain_waits,
    ));
    let http_state = HttpState {
        recommender: Arc::new(Recommender::new(Arc::clone(&store), Arc::clone(&settings))),
        store,
        settings,
        metrics,
        ready,
        access: guards.http.clone(),
        startup: correlator.startup_log(),
        drain: Some(drains),
    };
    let mut tasks = vec![
        spawn_grpc(
            grpc_listener,
            &correlator,
            &http_state.settings.limits,
            guards,
            stop.clone(),
        ),
        spawn_http(http_listener, &http_state, stop.clone())?,
        spawn_checkpoints(&correlator, &http_state.settings, stop.clone()),
        spawn_ticks(&correlator, &http_state, stop.clone()),
    ];
    if let Some(kube) = kube {
        tasks.push(kube_watch::spawn(
            &kube,
            Arc::clone(&correlator),
            http_state.ready.clone(),
            stop,
        ));
    }

    Ok(Running {
        grpc_addr,
        http_addr,
        correlator,
        http: http_state,
        shutdown,
        tasks,
    })
}

fn spawn_grpc(
    listener: TcpListener,
    correlator: &Arc<Correlator>,
    limits: &Limits,
    guards: Guards,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let c = Arc::clone(correlator);
    let admission = Arc::new(Admission::new(limits.clone()));
    tokio::spawn(async move {
        if let Err(e) = grpc::serve(listener, c, admission, guards, stop).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    })
}

/// The HTTP API on a thread of its own (see [`serve_http`]); the task ends
/// when the thread does.
fn spawn_http(
    listener: TcpListener,
    state: &HttpState,
    stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    let st = state.clone();
    let listener = listener.into_std()?;
    let (served, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("http-api".into())
        .spawn(move || {
            if let Err(e) = serve_http(listener, st, stop) {
                tracing::error!(error = %e, "HTTP server failed");
            }
            let _ = served.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = done.await;
    }))
}

/// Checkpoints of the in-flight state every `--checkpoint-interval`.
fn spawn_checkpoints(
    correlator: &Arc<Correlator>,
    settings: &Settings,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let c = Arc::clone(correlator);
    // tokio's interval refuses zero.
    let interval = settings.checkpoint_interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                // The final checkpoint is `Running::shutdown`'s, after the
                // servers stopped applying reports.
                _ = stop.wait_for(|v| *v) => return,
            }
            checkpoint(&c).await;
        }
    })
}

/// Finishing deletions every [`TICK`], housekeeping every [`HOUSEKEEPING`].
fn spawn_ticks(
    correlator: &Arc<Correlator>,
    state: &HttpState,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let (c, st) = (Arc::clone(correlator), state.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        let mut house = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                _ = tick.tick() => c.tick(UnixNanos::now()),
                _ = house.tick() => {
                    housekeeping(&st);
                    prune_agents(&c, &st.settings);
                }
                _ = stop.wait_for(|v| *v) => return,
            }
        }
    })
}

impl Running {
    /// Stops every part and waits for them (open agent streams are ended),
    /// then writes a final checkpoint.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        checkpoint(&self.correlator).await;
    }

    /// Stops every task at once without the final checkpoint, as a crash
    /// would (for tests). Connections already accepted may linger until
    /// their clients drop them.
    pub fn abort(self) {
        // The HTTP API runs on a thread of its own, which only the signal stops.
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The runtime for everything but the HTTP API and the reading of the
/// Kubernetes client: its threads run under `SCHED_IDLE`, below the HTTP
/// API's own thread (see [`start`]) and the client's thread, whose watch
/// receipts are the deletions' T0 (`kube_thread`). A nice
/// value is not enough: the kernel lets a running thread finish its slice
/// (milliseconds) before a woken thread of a higher weight runs, but always
/// preempts a `SCHED_IDLE` thread at once, so a CI query is served as soon
/// as it arrives even while agent reports keep every core busy. Between
/// processes nothing changes: the pod's cgroup keeps its share of the node;
/// within the process, reports use every cycle the API leaves. Taking the
/// policy needs no privilege.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: plain syscall on the calling thread (pid 0).
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "could not put a runtime thread under SCHED_IDLE");
            }
        })
        .build()
}

/// The HTTP API on a current-thread runtime of its own thread: queries never
/// queue behind report handlers in the main runtime. The thread inherits the
/// priority of the thread that calls [`start`].
fn serve_http(
    listener: std::net::TcpListener,
    state: HttpState,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: plain syscall on the calling thread (pid 0).
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE {
        tracing::warn!(
            "the HTTP API thread runs under SCHED_IDLE: queries may wait behind agent reports"
        );
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::from_std(listener)?;
            let stop = async move {
                let _ = stop.wait_for(|v| *v).await;
            };
            http::serve_with_shutdown(listener, state, stop).await
        })
}

/// One checkpoint of the in-flight state, on a blocking thread.
pub async fn checkpoint(c: &Arc<Correlator>) {
    let c = Arc::clone(c);
    let r = tokio::task::spawn_blocking(move || c.checkpoint(UnixNanos::now())).await;
    match r {
        Ok(Ok(stats)) => tracing::debug!(?stats, "checkpoint"),
        Ok(Err(e)) => tracing::error!(error = %e, "checkpoint failed; retrying at the next"),
        Err(e) => tracing::error!(error = %e, "checkpoint task failed"),
    }
}

/// Agents not heard from within the retention window are forgotten.
fn prune_agents(c: &Correlator, settings: &Settings) {
    let before = UnixNanos::now() - settings.retention;
    match c.prune_agents(before) {
        Ok(0) => {}
        Ok(n) => tracing::info!(agents = n, "forgot agents not seen within retention"),
        Err(e) => tracing::error!(error = %e, "pruning agents failed"),
    }
}

/// Retention and the recommendation gauges.
pub fn housekeeping(st: &HttpState) {
    let now = UnixNanos::now();
    let since = now - st.settings.retention;
    match st.store.prune(since) {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "pruned deletions past retention"),
        Err(e) => tracing::error!(error = %e, "pruning the store failed"),
    }
    match st.store.prune_startups(since, st.settings.startup.kept) {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "pruned startup records past retention"),
        Err(e) => tracing::error!(error = %e, "pruning startup records failed"),
    }
    if let Ok(n) = st.store.len() {
        st.metrics.store_deletions.set(n as i64);
    }
    let scopes = match st.store.services(since) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "listing services failed");
            return;
        }
    };
    let m = &st.metrics;
    m.recommendation_seconds.clear();
    m.recommendation_samples.clear();
    let all = std::iter::once((String::new(), String::new())).chain(scopes);
    for (namespace, service) in all {
        let scope = Scope {
            namespace: (!namespace.is_empty()).then(|| namespace.clone()),
            service: (!service.is_empty()).then(|| service.clone()),
            ..Scope::default()
        };
        let (q, c) = (st.settings.quantile, st.settings.confidence);
        let Ok(r) = st.recommender.compute(scope, q, c, now) else {
            continue;
        };
        let labels = NamespaceService { namespace, service };
        if let Some(s) = r.pre_stop_seconds {
            m.recommendation_seconds
                .get_or_create(&labels)
                .set(s as f64);
        }
        m.recommendation_samples
            .get_or_create(&labels)
            .set(r.samples as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: plain syscall on the calling thread (pid 0).
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn runtime_threads_run_below_the_caller() {
        let caller = policy();
        assert_ne!(caller, libc::SCHED_IDLE);
        let rt = runtime().unwrap();
        let worker = rt.block_on(async { tokio::spawn(async { policy() }).await.unwrap() });
        let blocking = rt.block_on(async { tokio::task::spawn_blocking(policy).await.unwrap() });
        assert_eq!(worker, libc::SCHED_IDLE);
        assert_eq!(blocking, libc::SCHED_IDLE);
        assert_eq!(policy(), caller, "the calling thread kept its policy");
    }
}
