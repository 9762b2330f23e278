//! Writes Cilium-layout service maps as the cilium-agent does: one
//! `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM` per entry, for a frontend
//! its slots first, the master (slot 0, the cutover) next, then the slots
//! past the new total deleted; a backend that leaves the EndpointSlice is
//! deleted from the backends map before its frontend is rewritten.

use std::{collections::HashMap, io, path::Path};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use observer_common::cilium::{
    self, Backend, Family, Frontend, MapShape, SERVICE_VALUE_LEN, ServiceKey, ServiceValue,
};
use observer_proto::UnixNanos;

/// Cilium's CONDITIONAL_PREALLOC on kernels without map preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;
/// Cilium's default CILIUM_LB_MAP_MAX_ENTRIES.
pub const MAX_ENTRIES: u32 = 65_536;

/// The syscall's error where there is one: callers test its errno.
pub fn io_error(e: MapError) -> io::Error {
    match e {
        MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other),
    }
}

/// Creates a map of `shape` and pins it as `dir/name` (the kernel keeps the
/// name's first 15 bytes).
pub fn create_pinned(dir: &Path, name: &str, shape: MapShape) -> io::Result<MapData> {
    let obj = aya_obj::Map::new_from_params(
        shape.map_type,
        shape.key_size,
        shape.value_size,
        MAX_ENTRIES,
        BPF_F_NO_PREALLOC,
    );
    let map = MapData::create(obj, name, None).map_err(io_error)?;
    map.pin(dir.join(name)).map_err(io::Error::other)?;
    Ok(map)
}

/// A pinned hash map, typed by its key and value sizes.
pub fn typed<K: aya::Pod, V: aya::Pod>(map: MapData) -> io::Result<BpfHashMap<MapData, K, V>> {
    BpfHashMap::try_from(Map::HashMap(map)).map_err(io_error)
}

/// One `BPF_MAP_DELETE_ELEM`; a key already gone is no error.
fn delete<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    key: &K,
) -> io::Result<()> {
    match map.remove(key).map_err(io_error) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn sized<const N: usize>(what: &str, bytes: &[u8]) -> io::Result<[u8; N]> {
    bytes.try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} of {} bytes where the map has {N}", bytes.len()),
        )
    })
}

/// One family's maps: the key and value sizes differ by family.
#[derive(Debug)]
struct FamilyMaps<const KEY: usize, const BACKEND: usize> {
    services: BpfHashMap<MapData, [u8; KEY], [u8; SERVICE_VALUE_LEN]>,
    backends: BpfHashMap<MapData, u32, [u8; BACKEND]>,
}

impl<const KEY: usize, const BACKEND: usize> FamilyMaps<KEY, BACKEND> {
    fn create(dir: &Path, family: Family) -> io::Result<Self> {
        let (services, backends) = match family {
            Family::V4 => (cilium::SERVICES4, cilium::BACKENDS4),
            Family::V6 => (cilium::SERVICES6, cilium::BACKENDS6),
        };
        Ok(FamilyMaps {
            services: typed(create_pinned(dir, services.name, services.shape)?)?,
            backends: typed(create_pinned(dir, backends.name, backends.shape)?)?,
        })
    }

    fn update_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> io::Result<()> {
        let key = sized("service key", key.encode().as_slice())?;
        self.services
            .insert(key, value.encode(), 0)
            .map_err(io_error)
    }

    fn delete_service(&mut self, key: &ServiceKey) -> io::Result<()> {
        delete(
            &mut self.services,
            &sized("service key", key.encode().as_slice())?,
        )
    }

    fn upsert_backend(&mut self, id: u32, backend: &Backend) -> io::Result<()> {
        let (value, len) = backend.encode();
        let value = sized("backend", &value[..len])?;
        self.backends.insert(id, value, 0).map_err(io_error)
    }

    fn delete_backend(&mut self, id: u32) -> io::Result<()> {
        delete(&mut self.backends, &id)
    }
}

#[derive(Debug)]
enum Maps {
    V4(FamilyMaps<12, 12>),
    V6(FamilyMaps<24, 24>),
}

/// Calls `$f` on the family's maps, whichever it is.
macro_rules! either {
    ($maps:expr, $m:ident => $f:expr) => {
        match $maps {
            Maps::V4($m) => $f,
            Maps::V6($m) => $f,
        }
    };
}

/// When the master's syscall ran, by the wall clock: the cutover is
/// inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterWritten {
    pub before: UnixNanos,
    pub after: UnixNanos,
}

/// One family's services and backends maps, pinned under a directory;
/// each write is one `BPF_MAP_UPDATE_ELEM` or `BPF_MAP_DELETE_ELEM` (aya's
/// hash map API), as Cilium writes them.
#[derive(Debug)]
pub struct ServiceMapsWriter {
    maps: Maps,
    /// Slots each frontend has now, for the tail deletion.
    totals: HashMap<Frontend, u16>,
}

impl ServiceMapsWriter {
    /// Creates and pins `cilium_lb{4,6}_services_v2` and
    /// `cilium_lb{4,6}_backends_v3` under `dir`.
    pub fn create(dir: &Path, family: Family) -> io::Result<ServiceMapsWriter> {
        let maps = match family {
            Family::V4 => Maps::V4(FamilyMaps::create(dir, family)?),
            Family::V6 => Maps::V6(FamilyMaps::create(dir, family)?),
        };
        Ok(ServiceMapsWriter {
            maps,
            totals: HashMap::new(),
        })
    }

    pub fn upsert_backend(&mut self, id: u32, backend: &Backend) -> io::Result<()> {
        either!(&mut self.maps, m => m.upsert_backend(id, backend))
    }

    pub fn delete_backend(&mut self, id: u32) -> io::Result<()> {
        either!(&mut self.maps, m => m.delete_backend(id))
    }

    fn update_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> io::Result<()> {
        either!(&mut self.maps, m => m.update_service(key, value))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> io::Result<()> {
        either!(&mut self.maps, m => m.delete_service(key))
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
            self.update_service(&key, &value)?;
        }
        let master = ServiceValue {
            count: active.len() as u16,
            qcount: inactive.len() as u16,
            rev_nat_index,
            ..Default::default()
        };
        let before = UnixNanos::now();
        self.update_service(&ServiceKey::master(frontend), &master)?;
        let written = MasterWritten {
            before,
            after: UnixNanos::now(),
        };
        let total = (active.len() + inactive.len()) as u16;
        let previous = self.totals.insert(frontend, total).unwrap_or(0);
        for slot in total + 1..=previous {
            self.delete_service(&ServiceKey { frontend, slot })?;
        }
        Ok(written)
    }

    /// Deletes the frontend: its master first (no new connection picks a
    /// slot), then its slots.
    pub fn delete_frontend(&mut self, frontend: Frontend) -> io::Result<()> {
        self.delete_service(&ServiceKey::master(frontend))?;
        for slot in 1..=self.totals.remove(&frontend).unwrap_or(0) {
            self.delete_service(&ServiceKey { frontend, slot })?;
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
