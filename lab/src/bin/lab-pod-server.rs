//! A lab pod's application: HTTP/1.1 with keep-alive, answering every
//! request with its name. `/sleep/<ms>` answers after a delay (an in-flight
//! request for shutdown tests). Prints `listening <addr>` once ready; with
//! `--listen-after-ms` it prints `started` at once and listens later (a
//! readiness probe that passes before the server listens).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lab::server::{ServerConfig, ShutdownMode, serve};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

#[derive(Parser)]
#[command(about = "HTTP/1.1 keep-alive server for lab pods, with Kubernetes-style or bad shutdown")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Name returned in every response body.
    #[arg(long, default_value = "pod")]
    name: String,
    /// What SIGTERM does.
    #[arg(long, value_enum, default_value = "graceful")]
    mode: ShutdownMode,
    /// Graceful mode: how long an idle keep-alive connection may wait for
    /// its last request (answered with `Connection: close`) after SIGTERM.
    #[arg(long, default_value_t = 2000)]
    drain_timeout_ms: u64,
    /// Start listening only this long after starting (printing `started`
    /// at once): connections before then are refused.
    #[arg(long, default_value_t = 0)]
    listen_after_ms: u64,
    /// For this long after it listens, answer every request 300 ms late.
    #[arg(long, default_value_t = 0)]
    warm_up_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.mode == ShutdownMode::Nginx {
        bail!("--mode nginx: the lab runs nginx itself for its pods, not lab-pod-server");
    }
    if args.listen_after_ms > 0 {
        println!(
            "started {}, listening in {} ms",
            args.listen, args.listen_after_ms
        );
        tokio::time::sleep(Duration::from_millis(args.listen_after_ms)).await;
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // Installed in both modes: in IgnoreSigterm mode the handler is what
    // keeps SIGTERM's default action from ending the process.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (terminate_tx, terminate_rx) = watch::channel(false);
    tokio::spawn(async move {
        while sigterm.recv().await.is_some() {
            let _ = terminate_tx.send(true);
        }
    });
    // One line only: the lab reads the first and closes the pipe.
    if args.listen_after_ms == 0 {
        println!("listening {}", listener.local_addr()?);
    }
    let config = ServerConfig {
        name: args.name,
        mode: args.mode,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        warm_up_until: (args.warm_up_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(args.warm_up_ms)),
    };
    serve(listener, config, terminate_rx).await;
    Ok(())
}
