//! The real kubectl (on PATH) against a double, for tests: its own
//! kubeconfig and discovery cache, inside a network namespace when the
//! double listens in one (`ip netns exec`).

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long one kubectl command may take.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("starting kubectl {args} (it must be on PATH): {source}")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("kubectl {args} did not finish within {TIMEOUT:?}")]
    Timeout { args: String },
    #[error("kubectl {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

pub struct Kubectl {
    netns: Option<String>,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    /// kubectl with this kubeconfig, caching discovery in `cache` (so no
    /// earlier run's cache answers for the double).
    pub fn new(kubeconfig: PathBuf, cache: PathBuf) -> Self {
        Kubectl {
            netns: None,
            kubeconfig,
            cache,
        }
    }

    /// Runs kubectl inside the named network namespace.
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "kubectl"]);
                c
            }
            None => Command::new("kubectl"),
        };
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `kubectl ARGS` to the end, whatever its exit status; logs it
    /// to stderr (the test's output).
    pub async fn run(&self, args: &[&str]) -> Result<Output, KubectlError> {
        let joined = args.join(" ");
        let out = tokio::time::timeout(TIMEOUT, self.command(args).output())
            .await
            .map_err(|_| KubectlError::Timeout {
                args: joined.clone(),
            })?
            .map_err(|source| KubectlError::Spawn {
                args: joined.clone(),
                source,
            })?;
        eprintln!(
            "kubectl {joined}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// Runs `kubectl ARGS`; its stdout when it succeeds.
    pub async fn ok(&self, args: &[&str]) -> Result<String, KubectlError> {
        let out = self.run(args).await?;
        if !out.status.success() {
            return Err(KubectlError::Failed {
                args: args.join(" "),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running kubectl (`get -w`); it is killed when the
    /// returned [`Watch`] is dropped.
    pub fn watch(&self, args: &[&str]) -> Result<Watch, KubectlError> {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| KubectlError::Spawn {
                args: args.join(" "),
                source,
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(Watch {
            _child: child,
            lines: BufReader::new(stdout).lines(),
        })
    }
}

/// The output of a running kubectl, line by line.
pub struct Watch {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Watch {
    /// The next line within `wait`; `None` when none came or kubectl ended.
    pub async fn next_line(&mut self, wait: Duration) -> Option<String> {
        let line = tokio::time::timeout(wait, self.lines.next_line())
            .await
            .ok()?
            .ok()??;
        eprintln!("kubectl watch: {line}");
        Some(line)
    }

    /// Reads lines until one satisfies `found`, for at most `wait` in all.
    pub async fn until(&mut self, wait: Duration, found: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.next_line(left).await?;
            if found(&line) {
                return Some(line);
            }
        }
    }
}
