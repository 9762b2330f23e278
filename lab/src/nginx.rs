//! Real nginx (Debian's package) inside a lab namespace: started in the
//! foreground so the lab owns the master process, its configuration,
//! pid file, logs and temporary files in one directory, reloaded with
//! `nginx -s reload` as an ingress controller does.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use observer_proto::UnixNanos;
use thiserror::Error;
use tokio::process::{Child, Command};

use crate::netns::NetNs;

/// The nginx binary (Debian installs it in /usr/sbin, outside a user's PATH).
const NGINX: &str = "/usr/sbin/nginx";
/// How long nginx may take to start or to take a new configuration.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum NginxError {
    #[error("nginx in {dir}: {action}: {source}")]
    Io {
        dir: String,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("nginx in {dir}: `{command}` failed: {stderr}")]
    Command {
        dir: String,
        command: String,
        stderr: String,
    },
    #[error(
        "nginx in {dir}: {what} within {READY_TIMEOUT:?}; see {dir}/error.log (is Debian's `nginx` installed? `cargo xtask setup`)"
    )]
    Timeout { dir: String, what: &'static str },
}

/// The parts of a configuration every lab nginx shares: files under `dir`,
/// one worker, the `http` block's `body`.
pub fn config(dir: &Path, body: &str) -> String {
    let d = dir.display();
    format!(
        "user root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{body}}}\n"
    )
}

/// A running nginx master (and its workers), killed when dropped.
#[derive(Debug)]
pub struct Nginx {
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Writes `conf` into `dir`, starts nginx inside `ns` and waits until
    /// its worker runs (its sockets are bound before).
    pub async fn start(ns: &NetNs, dir: &Path, conf: &str) -> Result<Self, NginxError> {
        let io = |action| {
            move |source| NginxError::Io {
                dir: dir.display().to_string(),
                action,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(io("writing nginx.conf"))?;
        let child = Command::from(ns.command(NGINX))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting /usr/sbin/nginx"))?;
        let nginx = Nginx {
            dir: dir.to_owned(),
            child,
        };
        nginx
            .wait_for_new_worker(&HashSet::new(), "no worker ran")
            .await?;
        Ok(nginx)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master process, for a caller that stops it by signals (a pod's
    /// kubelet).
    pub fn into_child(self) -> Child {
        self.child
    }

    /// The master's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Writes `conf` and runs `nginx -s reload`; returns when a worker of
    /// the new configuration runs (the old ones stop accepting as it
    /// starts): the moment new connections follow `conf`.
    pub async fn reload(&self, conf: &str) -> Result<UnixNanos, NginxError> {
        let dir = self.dir.display().to_string();
        let conf_path = self.dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|source| NginxError::Io {
            dir: dir.clone(),
            action: "writing nginx.conf",
            source,
        })?;
        let before = self.workers();
        let out = Command::new(NGINX)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-s", "reload"])
            .output()
            .await
            .map_err(|source| NginxError::Io {
                dir: dir.clone(),
                action: "running nginx -s reload",
                source,
            })?;
        if !out.status.success() {
            return Err(NginxError::Command {
                dir,
                command: "nginx -s reload".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        self.wait_for_new_worker(&before, "no worker of the new configuration ran")
            .await
    }

    /// The master's children (its workers, old and new).
    fn workers(&self) -> HashSet<u32> {
        let Some(pid) = self.pid() else {
            return HashSet::new();
        };
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    async fn wait_for_new_worker(
        &self,
        old: &HashSet<u32>,
        what: &'static str,
    ) -> Result<UnixNanos, NginxError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self.workers().iter().any(|w| !old.contains(w)) {
                return Ok(UnixNanos::now());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(NginxError::Timeout {
                    dir: self.dir.display().to_string(),
                    what,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
