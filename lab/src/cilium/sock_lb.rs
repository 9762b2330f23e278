//! The `cilium` node's datapath: the connect4 program of lab-sock-lb-ebpf
//! (Cilium's socket-LB, imitated) loaded on the lab's pinned service maps
//! and attached to the lab process's cgroup v2 (its clients, pods and
//! routers are its children: Cilium too attaches once, at its cgroup v2
//! root), filtered to the node's network namespace by its cookie (the
//! lab's nodes share one kernel). The attachment is a bpf link held by a
//! descriptor: it goes with [`SockLb`], or with the process if the lab
//! dies, so nothing outlives the lab.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use observer_common::cilium::{BACKENDS4, SERVICES4};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb"));
const PROGRAM: &str = "sock_lb_connect4";

#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    #[error("the cookie of network namespace {}: {source}", netns.display())]
    Cookie {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("finding this process's cgroup v2: {0}")]
    Cgroup(#[source] io::Error),
    #[error("map {} is not pinned (create the maps before the datapath)", .0.display())]
    NotPinned(PathBuf),
    #[error("loading the connect4 program: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the connect4 program: {0}")]
    Program(#[source] Box<aya::programs::ProgramError>),
}

/// The loaded and attached program; detached on drop.
#[derive(Debug)]
pub struct SockLb {
    _ebpf: Ebpf,
}

impl SockLb {
    /// Routes new IPv4 connections made in the namespace at `netns` by
    /// the `cilium_lb4_*` maps pinned under `pin_dir`.
    pub fn attach(pin_dir: &Path, netns: &Path) -> Result<SockLb, SockLbError> {
        let cookie = netns_cookie(netns).map_err(|source| SockLbError::Cookie {
            netns: netns.to_owned(),
            source,
        })?;
        let cgroup = File::open(crate::cgroup::own_v2().map_err(SockLbError::Cgroup)?)
            .map_err(SockLbError::Cgroup)?;
        let services = pin_dir.join(SERVICES4.name);
        let backends = pin_dir.join(BACKENDS4.name);
        // aya would create and pin a missing map: the maps must be the lab's.
        for pinned in [&services, &backends] {
            if !pinned.exists() {
                return Err(SockLbError::NotPinned(pinned.clone()));
            }
        }
        let mut ebpf = EbpfLoader::new()
            .override_global("NETNS_COOKIE", &cookie, true)
            .map_pin_path("SERVICES", services.as_path())
            .map_pin_path("BACKENDS", backends.as_path())
            .load(OBJECT)
            .map_err(|e| SockLbError::Load(Box::new(e)))?;
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(PROGRAM)
            .expect("the object has its program")
            .try_into()
            .map_err(|e| SockLbError::Program(Box::new(e)))?;
        program
            .load()
            // A link (aya's attach on kernels >= 5.7) sits next to other
            // programs of the cgroup anyway; the kernel refuses the
            // ALLOW_MULTI flag on links.
            .and_then(|()| program.attach(&cgroup, CgroupAttachMode::Single))
            .map_err(|e| SockLbError::Program(Box::new(e)))?;
        Ok(SockLb { _ebpf: ebpf })
    }
}

/// The namespace's cookie (`SO_NETNS_COOKIE` of a socket opened in it),
/// what `bpf_get_netns_cookie` returns there.
pub fn netns_cookie(netns: &Path) -> io::Result<u64> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        crate::netns::enter(&netns)?;
        // SAFETY: plain socket creation; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: `cookie` and `len` are live and sized for the option.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    })
    .join()
    .expect("the cookie thread does not panic")
}
