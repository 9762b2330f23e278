//! Network namespaces and veth links that remove themselves.
//!
//! Names carry the creating process id so parallel tests never collide and a
//! later run can remove what a crashed one left behind (see [`reap_stale`]).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use thiserror::Error;

/// Every namespace this crate creates starts with this.
pub const PREFIX: &str = "obslab";

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("failed to start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion and fails with its stderr unless it exits 0.
pub fn check(cmd: &mut Command) -> Result<Output, NetnsError> {
    let out = cmd.output().map_err(|source| NetnsError::Spawn {
        command: describe(cmd),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            command: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// A named network namespace (`ip netns`), deleted with every process still
/// running in it when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// Creates `obslab-<pid>-<n>-<role>` with loopback up.
    pub fn create(role: &str) -> Result<Self, NetnsError> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{}-{id}-{role}", std::process::id());
        check(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `setns` and `--netns` flags.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        check(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `sh -c script` inside the namespace.
    pub fn sh(&self, script: &str) -> Result<Output, NetnsError> {
        check(self.command("sh").args(["-c", script]))
    }

    /// Runs `f` on a thread that has entered the namespace, so sockets it
    /// opens live there, and returns its result. The calling thread's
    /// namespace is never changed.
    pub fn run<F, R>(&self, f: F) -> std::io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&path)?;
                    Ok(f())
                })
                .join()
                .expect("closure in namespace panicked")
        })
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    unsafe extern "C" {
        fn setns(fd: i32, nstype: i32) -> i32;
    }
    const CLONE_NEWNET: i32 = 0x4000_0000;
    // SAFETY: fd is a valid open namespace file for the duration of the call.
    if unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

fn remove(name: &str) {
    // Processes keep a namespace alive after `ip netns del`; end them first.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// Removes namespaces left by processes of this crate that no longer run.
pub fn reap_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            remove(&name);
        }
    }
}

/// Connects `a` and `b` with a veth pair and addresses each end (`/prefix`).
pub fn link(
    a: &NetNs,
    a_addr: Ipv4Addr,
    b: &NetNs,
    b_addr: Ipv4Addr,
    prefix: u8,
) -> Result<(String, String), NetnsError> {
    let (a_if, b_if) = veth_pair(a, b)?;
    a.ip(&["addr", "add", &format!("{a_addr}/{prefix}"), "dev", &a_if])?;
    b.ip(&["addr", "add", &format!("{b_addr}/{prefix}"), "dev", &b_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    Ok((a_if, b_if))
}

/// Creates a veth pair with one end in each namespace and returns the ends'
/// names there; both are left down and unaddressed.
pub fn veth_pair(a: &NetNs, b: &NetNs) -> Result<(String, String), NetnsError> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // Interface names are limited to 15 bytes and live in the namespace, but
    // are created in the caller's namespace first: keep them unique there.
    let a_if = format!("v{}a{id}", std::process::id() % 100_000);
    let b_if = format!("v{}b{id}", std::process::id() % 100_000);
    check(Command::new("ip").args([
        "link",
        "add",
        &a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        b.name(),
    ]))?;
    Ok((a_if, b_if))
}
