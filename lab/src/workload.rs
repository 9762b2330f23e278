//! Pod processes and the kubelet's part of a deletion: preStop delay,
//! SIGTERM, SIGKILL when the grace period ends.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::watch,
};

use crate::{
    netns::NetNs,
    nginx::{self, Nginx, NginxError},
    server::ShutdownMode,
    startup::StartBehaviour,
};

/// How long a server may take to print that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error("starting the pod server {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("pod server {0} did not report listening within {START_TIMEOUT:?}")]
    NotReady(String),
    #[error(transparent)]
    Nginx(#[from] NginxError),
}

/// A running pod server.
#[derive(Debug)]
pub struct PodProcess {
    pub name: String,
    pub addr: SocketAddrV4,
    child: Child,
    /// Files of the process (nginx's configuration, pid, log), removed
    /// with it.
    scratch: Option<PathBuf>,
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// An nginx pod's `http` block: every request answered with the pod's name,
/// nginx's keep-alive defaults untouched.
fn nginx_pod(name: &str, addr: SocketAddrV4) -> String {
    format!(
        "  server {{\n    listen {addr};\n    default_type text/plain;\n    location / {{ return 200 \"{name}\\n\"; }}\n  }}\n"
    )
}

/// How a pod's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Ending {
    /// Exited by itself after SIGTERM.
    Exited,
    /// Still running when the grace period ended.
    Killed,
}

#[derive(Debug, Clone, Copy)]
pub struct Termination {
    pub ending: Ending,
    /// How long the preStop hook ran (until it returned or the grace
    /// period ended).
    pub pre_stop: Duration,
    pub sigterm_at: Instant,
    pub ended_at: Instant,
}

fn signal(child: &Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on a child we own and have not reaped.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

impl PodProcess {
    /// Starts `binary` (lab-pod-server) in `ns`, listening on `addr`, and
    /// waits until it accepts connections, or for a slow start until it
    /// started (it listens later).
    pub async fn start(
        binary: &Path,
        ns: &NetNs,
        name: &str,
        addr: SocketAddrV4,
        mode: ShutdownMode,
        start: StartBehaviour,
    ) -> Result<Self, WorkloadError> {
        let mut cmd: Command = ns.command(&binary.to_string_lossy()).into();
        let mode = match mode {
            ShutdownMode::Graceful => "graceful",
            ShutdownMode::IgnoreSigterm => "ignore-sigterm",
            ShutdownMode::Nginx => {
                let dir = std::env::temp_dir()
                    .join(format!("obslab-{}-nginx-{name}", std::process::id()));
                let conf = nginx::config(&dir, &nginx_pod(name, addr));
                let child = Nginx::start(ns, &dir, &conf).await?.into_child();
                return Ok(PodProcess {
                    name: name.to_owned(),
                    addr,
                    child,
                    scratch: Some(dir),
                });
            }
        };
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--name",
            name,
            "--mode",
            mode,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
        match start {
            StartBehaviour::Immediate => {}
            StartBehaviour::SlowStart(d) => {
                cmd.args(["--listen-after-ms", &d.as_millis().to_string()]);
            }
            StartBehaviour::WarmUp(d) => {
                cmd.args(["--warm-up-ms", &d.as_millis().to_string()]);
            }
        }
        let spawn_err = |source| WorkloadError::Spawn {
            binary: binary.display().to_string(),
            source,
        };
        // `ip netns exec` execs the program, so the child is the server itself.
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let ready =
            tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut line)).await;
        let started = line.starts_with("listening") || line.starts_with("started");
        if !matches!(ready, Ok(Ok(n)) if n > 0 && started) {
            return Err(WorkloadError::NotReady(name.to_owned()));
        }
        Ok(PodProcess {
            name: name.to_owned(),
            addr,
            child,
            scratch: None,
        })
    }

    /// The kubelet's termination of a deleted pod: the preStop sleep, then
    /// SIGTERM, then SIGKILL once `grace` (counted from now, preStop
    /// included, as Kubernetes counts it) has passed.
    pub async fn terminate(self, pre_stop: Duration, grace: Duration) -> Termination {
        self.terminate_shortened(pre_stop, watch::channel(grace).1)
            .await
    }

    /// [`Self::terminate`] with a grace period that a second deletion may
    /// shorten while it runs: as the kubelet, the kill then comes at the
    /// earlier of the old deadline and now + the new grace.
    pub async fn terminate_shortened(
        self,
        pre_stop: Duration,
        grace: watch::Receiver<Duration>,
    ) -> Termination {
        self.terminate_after(tokio::time::sleep(pre_stop), grace)
            .await
    }

    /// [`Self::terminate_shortened`] with any preStop hook: `hook` runs
    /// until it returns or the grace period ends (then it is dropped, which
    /// stops it, and the process is killed at once).
    pub async fn terminate_after(
        mut self,
        hook: impl std::future::Future<Output = ()>,
        mut grace: watch::Receiver<Duration>,
    ) -> Termination {
        let start = tokio::time::Instant::now();
        let mut deadline = start + *grace.borrow_and_update();
        fn shortened(grace: &mut watch::Receiver<Duration>, deadline: &mut tokio::time::Instant) {
            *deadline = (*deadline).min(tokio::time::Instant::now() + *grace.borrow_and_update());
        }
        tokio::pin!(hook);
        loop {
            tokio::select! {
                () = &mut hook => break,
                () = tokio::time::sleep_until(deadline) => break,
                Ok(()) = grace.changed() => shortened(&mut grace, &mut deadline),
            }
        }
        let pre_stop = start.elapsed();
        let sigterm_at = Instant::now();
        signal(&self.child, libc::SIGTERM);
        let ending = loop {
            tokio::select! {
                _ = self.child.wait() => break Ending::Exited,
                () = tokio::time::sleep_until(deadline) => {
                    signal(&self.child, libc::SIGKILL);
                    let _ = self.child.wait().await;
                    break Ending::Killed;
                }
                Ok(()) = grace.changed() => shortened(&mut grace, &mut deadline),
            }
        };
        Termination {
            ending,
            pre_stop,
            sigterm_at,
            ended_at: Instant::now(),
        }
    }
}
