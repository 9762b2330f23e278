//! A CPU cgroup of its own for a process, as the kubelet gives each pod.
//!
//! The aggregator runs its report handling under `SCHED_IDLE`, below its
//! own HTTP API (`aggregator::app::runtime`): in a cluster its pod's cgroup
//! keeps its share of the node, and only its own threads compete inside.
//! The lab's processes share one cgroup, where those threads yield to every
//! busy process of the lab: at load 20 the aggregator's gRPC server starved
//! until the agents' calls timed out and their nodes went unknown. So the
//! lab moves the aggregator into a child CPU cgroup (default weight), where
//! the host allows it: cgroup v1's `cpu` hierarchy, or cgroup v2 where the
//! `cpu` controller can be enabled for the child.

use std::{
    io,
    path::{Path, PathBuf},
};

/// A child CPU cgroup of this process's, removed when dropped (once the
/// processes in it have ended).
#[derive(Debug)]
pub struct CpuGroup {
    dir: PathBuf,
}

impl CpuGroup {
    /// Creates the child cgroup `name` of this process's CPU cgroup.
    pub fn create(name: &str) -> io::Result<Self> {
        let parent = own_cpu_cgroup()?;
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with_path(e, &dir)),
        }
        Ok(Self { dir })
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|e| with_path(e, &procs))
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Empty once its processes ended (they are killed before).
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        eprintln!("lab: could not remove cgroup {}", self.dir.display());
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// This process's cgroup v2 directory: the cgroup2 mount (the unified
/// hierarchy, `/sys/fs/cgroup` or `/sys/fs/cgroup/unified` on hybrid
/// hosts) joined with the `0::` line of `/proc/self/cgroup`.
pub fn own_v2() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    v2(&mounts, &cgroups).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 mount or no cgroup v2 line in /proc/self/cgroup",
        )
    })
}

/// This process's cgroup in a hierarchy where a child can get its own CPU
/// share: cgroup v1's `cpu` controller, else cgroup v2 with `cpu` enabled
/// below this process's cgroup.
fn own_cpu_cgroup() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    if let Some(dir) = v1_cpu(&mounts, &cgroups) {
        return Ok(dir);
    }
    let dir = v2(&mounts, &cgroups).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup v1 cpu or cgroup v2 mount",
        )
    })?;
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control"))?;
    if enabled.split_whitespace().any(|c| c == "cpu") {
        Ok(dir)
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "cgroup v2 {}: the cpu controller is not enabled for its children",
                dir.display()
            ),
        ))
    }
}

/// `(mount point, super options)` of each mount of `fstype`.
fn mounts_of<'a>(mountinfo: &'a str, fstype: &str) -> impl Iterator<Item = (&'a str, &'a str)> {
    mountinfo.lines().filter_map(move |line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        (right.next()? == fstype).then_some(())?;
        let options = right.nth(1)?;
        Some((left.split(' ').nth(4)?, options))
    })
}

fn v1_cpu(mountinfo: &str, cgroups: &str) -> Option<PathBuf> {
    let (mount, _) = mounts_of(mountinfo, "cgroup")
        .find(|(_, options)| options.split(',').any(|o| o == "cpu"))?;
    let own = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })?;
    Some(Path::new(mount).join(own.trim_start_matches('/')))
}

fn v2(mountinfo: &str, cgroups: &str) -> Option<PathBuf> {
    let (mount, _) = mounts_of(mountinfo, "cgroup2").next()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new(mount).join(own.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn v1_cpu_is_found_by_its_controller_and_the_process_path() {
        let cgroups = "4:memory:/x\n2:cpu,cpuacct:/lab/session\n0::/user.slice\n";
        assert_eq!(
            v1_cpu(HYBRID, cgroups),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/lab/session"))
        );
        assert_eq!(
            v2(HYBRID, cgroups),
            Some(PathBuf::from("/sys/fs/cgroup/unified/user.slice"))
        );
    }

    #[test]
    fn a_v2_only_host_has_no_v1_cpu() {
        let unified = "31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let cgroups = "0::/\n";
        assert_eq!(v1_cpu(unified, cgroups), None);
        assert_eq!(v2(unified, cgroups), Some(PathBuf::from("/sys/fs/cgroup")));
    }
}
