//! The preStop hook the lab's kubelet runs: a fixed sleep (the sleep
//! action), or the adaptive drain: the real `prestop-drain` binary run
//! inside the pod's network namespace with the pod's identity (as the
//! downward API gives it) and a token bound to the pod (as its projected
//! volume holds it), as an exec hook would.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use crate::{api::PodRecord, netns::NetNs};

/// Writes a token bound to the pod and returns its file, or says why not.
pub type TokenSource = Arc<dyn Fn(&PodRecord) -> Result<PathBuf, String> + Send + Sync>;

/// How the adaptive drain's hook is run.
pub struct DrainHook {
    /// The `prestop-drain` binary.
    pub binary: PathBuf,
    /// The aggregator's HTTP API as pods reach it.
    pub aggregator: String,
    /// The fixed recommendation the hook falls back to.
    pub fallback: Duration,
    /// The longest the aggregator may make it wait.
    pub max: Duration,
    pub tokens: TokenSource,
    /// Every hook's output is appended here.
    pub log: PathBuf,
}

impl std::fmt::Debug for DrainHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainHook")
            .field("binary", &self.binary)
            .field("aggregator", &self.aggregator)
            .field("fallback", &self.fallback)
            .field("max", &self.max)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// A pod's preStop hook.
#[derive(Clone, Debug)]
pub enum PreStop {
    Sleep(Duration),
    Drain(Arc<DrainHook>),
}

/// A hook under way: done when the hook returned. Dropping it stops the
/// hook (the kubelet's kill at the end of the grace period).
pub type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

impl PreStop {
    /// Starts the hook of `pod`, whose network namespace is `ns`.
    pub fn start(&self, pod: &PodRecord, ns: &NetNs) -> Running {
        match self {
            Self::Sleep(d) => Box::pin(tokio::time::sleep(*d)),
            Self::Drain(hook) => hook.start(pod, ns),
        }
    }
}

impl DrainHook {
    fn start(&self, pod: &PodRecord, ns: &NetNs) -> Running {
        // Without a token the binary cannot authenticate and falls back:
        // the failure shows in the log, as a FailedPreStopHook event would.
        let token = (self.tokens)(pod).unwrap_or_else(|e| {
            let missing = self.log.with_extension(format!("no-token-{}", pod.name));
            append(&self.log, &format!("{}: no token: {e}\n", pod.name));
            missing
        });
        let mut cmd: tokio::process::Command = ns.command(&self.binary.to_string_lossy()).into();
        cmd.env("POD_NAMESPACE", crate::api::NAMESPACE)
            .env("POD_NAME", &pod.name)
            .env("PRESTOP_DRAIN_AGGREGATOR", &self.aggregator)
            .env("PRESTOP_DRAIN_TOKEN_FILE", &token)
            .arg("--fallback")
            .arg(format!("{}ms", self.fallback.as_millis()))
            .arg("--max")
            .arg(format!("{}ms", self.max.as_millis()))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let (log, name) = (self.log.clone(), pod.name.clone());
        Box::pin(async move {
            match cmd.output().await {
                Ok(out) => append(
                    &log,
                    &format!(
                        "{name}: {}\n{}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                ),
                Err(e) => append(&log, &format!("{name}: starting the hook: {e}\n")),
            }
        })
    }
}

fn append(log: &Path, text: &str) {
    use std::io::Write;
    let written = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("writing {}: {e}", log.display());
    }
}
