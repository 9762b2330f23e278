//! The pod workload: an HTTP/1.1 keep-alive server whose shutdown either
//! follows Kubernetes' contract or ignores it.
//!
//! Graceful (on SIGTERM): stop accepting; every keep-alive connection
//! answers its next request with `Connection: close` and closes, and one
//! that stays idle for the drain timeout is closed; in-flight requests
//! finish; the process exits when no connection is left. Answering the next
//! request with `Connection: close` instead of closing an idle connection at
//! once avoids the race where the client sends on a connection the server
//! is closing.
//!
//! Ignoring SIGTERM (the common bad case): keeps accepting and serving
//! until SIGKILL, so the kernel cuts every keep-alive connection at kill
//! time and the requests on them fail.
//!
//! Its HTTP is the lab's own minimal code ([`crate::http`]), not a library's,
//! because what it models is byte by byte: which request on a keep-alive
//! connection carries `Connection: close`, when the socket closes.

use std::time::Duration;

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use crate::http::{self, Next, Reader};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMode {
    /// Stop accepting, close keep-alive connections gracefully, finish in-flight, exit.
    Graceful,
    /// Ignore SIGTERM; die only by SIGKILL with keep-alive connections open.
    IgnoreSigterm,
    /// The lab's pods run Debian's nginx instead (its default
    /// `keepalive_timeout` of 75 s; SIGTERM is its fast shutdown, which
    /// closes keep-alive connections at once). Not a mode of lab-pod-server.
    Nginx,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Returned as the body of every response, so clients see which backend answered.
    pub name: String,
    pub mode: ShutdownMode,
    /// How long a graceful shutdown waits for an idle connection's next request.
    pub drain_timeout: Duration,
    /// Until then (a cold start warming up), every answer waits
    /// [`WARM_UP_ANSWER_DELAY`] first.
    pub warm_up_until: Option<tokio::time::Instant>,
}

/// How much slower a warming-up server answers.
pub const WARM_UP_ANSWER_DELAY: Duration = Duration::from_millis(300);

/// Serves on `listener` until `terminate` reports true (graceful mode) and
/// every connection is done. In `IgnoreSigterm` mode it never returns.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    mut terminate: watch::Receiver<bool>,
) {
    // Each connection task holds a sender; `recv` returns None once all ended.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let ignore = config.mode == ShutdownMode::IgnoreSigterm;
    let (stop_tx, stop_rx) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let config = config.clone();
                let stop = stop_rx.clone();
                let alive = alive_tx.clone();
                tokio::spawn(async move {
                    connection(stream, &config, stop).await;
                    drop(alive);
                });
            }
            changed = terminate.changed(), if !ignore => {
                if changed.is_err() || *terminate.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive_tx);
    alive_rx.recv().await;
}

async fn connection(mut stream: TcpStream, config: &ServerConfig, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let mut reader = Reader::default();
    loop {
        let stopping = *stop.borrow();
        let next = if stopping && !reader.has_pending() {
            match tokio::time::timeout(config.drain_timeout, reader.next(&mut stream, true)).await {
                Ok(next) => next,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                next = reader.next(&mut stream, true) => next,
                // Re-enter the loop to apply the drain timeout to this wait.
                _ = stop.changed(), if !stopping => continue,
            }
        };
        let Ok(Next::Message(head, _body)) = next else {
            return;
        };
        if let Some(ms) = head
            .second
            .strip_prefix("/sleep/")
            .and_then(|ms| ms.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if config
            .warm_up_until
            .is_some_and(|until| tokio::time::Instant::now() < until)
        {
            tokio::time::sleep(WARM_UP_ANSWER_DELAY).await;
        }
        let close = head.close || *stop.borrow();
        let body = format!("{}\n", config.name);
        if stream
            .write_all(&http::response(200, "OK", &body, close))
            .await
            .is_err()
            || close
        {
            let _ = stream.shutdown().await;
            return;
        }
    }
}
