//! The aggregator's talk with the API server, on a thread of its own at the
//! priority of the thread that starts it (the binary's main thread), not
//! under the main runtime's `SCHED_IDLE` (`crate::app::runtime`), where a
//! busy node starves it for seconds: the watches' receipt times are the
//! deletions' T0 and the endpoints' T_ready (`crate::kube_watch`), and
//! TokenReview and SubjectAccessReview answers gate every caller.
//!
//! Every request of the client runs on this thread, whoever calls: a
//! connection's socket is driven by the runtime it was opened on, and a
//! pooled connection serves every caller after.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use kube::Client;
use kube::client::ClientBuilder;
use tokio::runtime::Handle;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeThreadError {
    #[error("starting the kube thread")]
    Thread(#[source] std::io::Error),
    #[error("the kube thread's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the kube thread's Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the kube thread ended while starting")]
    Ended,
}

/// The running thread: its client (clones share it), and its runtime for
/// tasks that read what the client returns.
pub struct KubeThread {
    pub client: Client,
    pub handle: Handle,
}

impl KubeThread {
    /// Starts the thread, which runs until `stop`.
    pub fn start(
        config: kube::Config,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, KubeThreadError> {
        let (started, start) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("kube".into())
            .spawn(move || run(config, started, stop))
            .map_err(KubeThreadError::Thread)?;
        start.recv().map_err(|_| KubeThreadError::Ended)?
    }
}

fn run(
    config: kube::Config,
    started: std::sync::mpsc::SyncSender<Result<KubeThread, KubeThreadError>>,
    mut stop: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = started.send(Err(KubeThreadError::Runtime(e)));
            return;
        }
    };
    runtime.block_on(async move {
        let handle = Handle::current();
        let client =
            ClientBuilder::try_from(config).map(|b| b.with_layer(&SpawnOn(handle.clone())).build());
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                let _ = started.send(Err(KubeThreadError::Client(e)));
                return;
            }
        };
        let _ = started.send(Ok(KubeThread { client, handle }));
        let _ = stop.wait_for(|v| *v).await;
    });
}

/// Runs each request of the service it wraps as a task on `0`'s runtime.
#[derive(Clone)]
struct SpawnOn(Handle);

impl<S> tower::Layer<S> for SpawnOn {
    type Service = Spawned<S>;

    fn layer(&self, inner: S) -> Spawned<S> {
        Spawned {
            inner,
            handle: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Spawned<S> {
    inner: S,
    handle: Handle,
}

impl<S, Req> tower::Service<Req> for Spawned<S>
where
    S: tower::Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let task = self.handle.spawn(self.inner.call(req));
        Box::pin(async move { task.await.map_err(BoxError::from)?.map_err(Into::into) })
    }
}
