//! Writes Cilium-layout service maps as the cilium-agent does: one
//! `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM` per entry, for a frontend
//! its slots first, the master (slot 0, the cutover) next, then the slots
//! past the new total deleted; a backend that leaves the EndpointSlice is
//! deleted from the backends map before its frontend is rewritten.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use observer_common::cilium::{
    self, Backend, Family, Frontend, MapShape, ServiceKey, ServiceValue,
};
use observer_proto::UnixNanos;

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_OBJ_PIN: u32 = 6;
/// Cilium's CONDITIONAL_PREALLOC on kernels without map preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;
/// Cilium's default CILIUM_LB_MAP_MAX_ENTRIES.
pub const MAX_ENTRIES: u32 = 65_536;

#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct PinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live UAPI attr of its size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a map of `shape` and pins it as `dir/name`.
pub fn create_pinned(dir: &Path, name: &str, shape: MapShape) -> io::Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    let short = &name.as_bytes()[..name.len().min(15)];
    map_name[..short.len()].copy_from_slice(short);
    let mut attr = CreateAttr {
        map_type: shape.map_type,
        key_size: shape.key_size,
        value_size: shape.value_size,
        max_entries: MAX_ENTRIES,
        map_flags: BPF_F_NO_PREALLOC,
        map_name,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(dir.join(name).into_os_string().into_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut pin = PinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin)?;
    Ok(fd)
}

/// One `BPF_MAP_UPDATE_ELEM` on `fd`.
pub fn update_elem(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn delete_elem(fd: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(drop),
    }
}

/// When the master's syscall ran, by the wall clock: the cutover is
/// inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterWritten {
    pub before: UnixNanos,
    pub after: UnixNanos,
}

/// One family's services and backends maps, pinned under a directory.
#[derive(Debug)]
pub struct ServiceMapsWriter {
    services: OwnedFd,
    backends: OwnedFd,
    /// Slots each frontend has now, for the tail deletion.
    totals: HashMap<Frontend, u16>,
}

impl ServiceMapsWriter {
    /// Creates and pins `cilium_lb{4,6}_services_v2` and
    /// `cilium_lb{4,6}_backends_v3` under `dir`.
    pub fn create(dir: &Path, family: Family) -> io::Result<ServiceMapsWriter> {
        let (services, backends) = match family {
            Family::V4 => (cilium::SERVICES4, cilium::BACKENDS4),
            Family::V6 => (cilium::SERVICES6, cilium::BACKENDS6),
        };
        Ok(ServiceMapsWriter {
            services: create_pinned(dir, services.name, services.shape)?,
            backends: create_pinned(dir, backends.name, backends.shape)?,
            totals: HashMap::new(),
        })
    }

    pub fn upsert_backend(&self, id: u32, backend: &Backend) -> io::Result<()> {
        let (value, len) = backend.encode();
        update_elem(self.backends.as_fd(), &id.to_ne_bytes(), &value[..len])
    }

    pub fn delete_backend(&self, id: u32) -> io::Result<()> {
        delete_elem(self.backends.as_fd(), &id.to_ne_bytes())
    }

    /// Rewrites `frontend` with `active` backends then the inactive tail:
    /// slots, master, then the slots past the new total.
    pub fn write_frontend(
        &mut self,
        frontend: Frontend,
        rev_nat_index: u16,
        active: &[u32],
        inactive: &[u32],
    ) -> io::Result<MasterWritten> {
        let fd = self.services.as_fd();
        for (i, id) in active.iter().chain(inactive).enumerate() {
            let key = ServiceKey {
                frontend,
                slot: i as u16 + 1,
            };
            let value = ServiceValue {
                backend_id: *id,
                rev_nat_index,
                ..Default::default()
            };
            update_elem(fd, key.encode().as_slice(), &value.encode())?;
        }
        let master = ServiceValue {
            count: active.len() as u16,
            qcount: inactive.len() as u16,
            rev_nat_index,
            ..Default::default()
        };
        let before = UnixNanos::now();
        update_elem(
            fd,
            ServiceKey::master(frontend).encode().as_slice(),
            &master.encode(),
        )?;
        let written = MasterWritten {
            before,
            after: UnixNanos::now(),
        };
        let total = (active.len() + inactive.len()) as u16;
        let previous = self.totals.insert(frontend, total).unwrap_or(0);
        for slot in total + 1..=previous {
            delete_elem(fd, ServiceKey { frontend, slot }.encode().as_slice())?;
        }
        Ok(written)
    }

    /// Deletes the frontend: its master first (no new connection picks a
    /// slot), then its slots.
    pub fn delete_frontend(&mut self, frontend: Frontend) -> io::Result<()> {
        let fd = self.services.as_fd();
        delete_elem(fd, ServiceKey::master(frontend).encode().as_slice())?;
        for slot in 1..=self.totals.remove(&frontend).unwrap_or(0) {
            delete_elem(fd, ServiceKey { frontend, slot }.encode().as_slice())?;
        }
        Ok(())
    }
}

type Job = Box<dyn FnOnce(&mut ServiceMapsWriter) + Send>;

/// A thread of its own, with its own name, that owns a
/// [`ServiceMapsWriter`]: the agent follows the bpf() writes of one thread
/// name (`comm`), as it follows the cilium-agent's, so a lab with several
/// Cilium nodes names each node's writer differently.
#[derive(Debug)]
pub struct WriterThread {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    comm: String,
}

impl WriterThread {
    /// Starts the thread named `comm` (at most 15 bytes: the kernel's
    /// `comm`, which the agent matches whole).
    pub fn spawn(comm: &str, mut writer: ServiceMapsWriter) -> io::Result<WriterThread> {
        if comm.is_empty() || comm.len() > 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{comm:?}: a thread name has 1 to 15 bytes"),
            ));
        }
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(comm.to_owned())
            .spawn(move || {
                for job in rx {
                    job(&mut writer);
                }
            })?;
        Ok(WriterThread {
            jobs: Some(jobs),
            thread: Some(thread),
            comm: comm.to_owned(),
        })
    }

    pub fn comm(&self) -> &str {
        &self.comm
    }

    /// Runs `f` on the writer thread and waits for its result.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ServiceMapsWriter) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .expect("jobs are open until drop")
            .send(Box::new(move |writer| {
                let _ = tx.send(f(writer));
            }))
            .expect("the writer thread runs until drop");
        rx.recv().expect("the writer thread answers every job")
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
