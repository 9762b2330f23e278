//! Writes Cilium-layout service maps as the cilium-agent does: one
//! `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM` per entry, for a frontend
//! its slots first, the master (slot 0, the cutover) next, then the slots
//! past the new total deleted; a backend that leaves the EndpointSlice is
//! deleted from the backends map before its frontend is rewritten.
//!
//! Cilium makes no batch writes today; the writer can write a frontend in
//! two batches (`BPF_MAP_UPDATE_BATCH` of the slots then the master,
//! `BPF_MAP_DELETE_BATCH` of the tail), which aya has no call for, so the
//! agent's handling of batches is tested too.
//!
//! With Maglev maps ([`ServiceMapsWriter::add_maglev`]) a frontend written
//! with [`ServiceMapsWriter::write_frontend_maglev`] also gets its lookup
//! table as Cilium writes it (`UpdateMaglev` in
//! `pkg/loadbalancer/maps/lbmaps.go`, between the slots and the master): a
//! new inner array map (one element), filled, its descriptor written into
//! the outer map under the frontend's rev_nat index, then closed. The
//! table repeats the active backend ids in turn rather than Maglev's
//! permutations: the agent cannot read it, only when it is written.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd},
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, HashOfMaps, IterableMap, Map, MapData, MapError};
use observer_common::cilium::{
    self, BPF_MAP_DELETE_BATCH, BPF_MAP_UPDATE_BATCH, Backend, BatchAttr, Family, Frontend,
    MAP_TYPE_HASH_OF_MAPS, MaglevKey, MapShape, SERVICE_VALUE_LEN, ServiceKey, ServiceValue,
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

/// One `BPF_MAP_UPDATE_BATCH` of `keys` and `values` (whole keys and
/// values, back to back), or `BPF_MAP_DELETE_BATCH` of `keys` when
/// `values` is `None`; `count` elements.
fn batch(map: BorrowedFd<'_>, keys: &[u8], values: Option<&[u8]>, count: usize) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    let cmd = if values.is_some() {
        BPF_MAP_UPDATE_BATCH
    } else {
        BPF_MAP_DELETE_BATCH
    };
    // SAFETY: the attr and the arrays it points to live through the call;
    // the kernel reads `count` keys and values of the map's sizes, which
    // the callers' arrays hold, and writes back `count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if attr.count as usize != count {
        return Err(io::Error::other(format!(
            "batch of {count} elements: the kernel applied {}",
            attr.count
        )));
    }
    Ok(())
}

/// Entries of a lab Maglev lookup table: the smallest size Cilium allows
/// (`bpf-lb-maglev-table-size`, a prime).
pub const MAGLEV_TABLE_SIZE: usize = 251;
const MAP_TYPE_ARRAY: u32 = 2;
/// Cilium's `CILIUM_LB_MAGLEV_MAP_MAX_ENTRIES` default.
const MAGLEV_MAX_ENTRIES: u32 = 65_536;

type MaglevTable = [u32; MAGLEV_TABLE_SIZE];

/// A new lookup table: Cilium's inner map spec (array, u32 key, one element).
fn maglev_inner() -> io::Result<Array<MapData, MaglevTable>> {
    let obj =
        aya_obj::Map::new_from_params(MAP_TYPE_ARRAY, 4, size_of::<MaglevTable>() as u32, 1, 0);
    let map = MapData::create(obj, "cilium_maglev_i", None).map_err(io_error)?;
    Array::try_from(Map::Array(map)).map_err(io_error)
}

/// `union bpf_attr` of `BPF_MAP_CREATE`, as far as a map of maps needs.
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

/// Creates Cilium's Maglev outer map for `family` and pins it under `dir`
/// (aya creates maps of maps only from an object file's definitions).
fn create_maglev_outer(dir: &Path, family: Family) -> io::Result<HashOfMaps<MapData, [u8; 2]>> {
    let spec = match family {
        Family::V4 => cilium::MAGLEV4,
        Family::V6 => cilium::MAGLEV6,
    };
    let template = maglev_inner()?;
    let mut attr = CreateAttr {
        map_type: MAP_TYPE_HASH_OF_MAPS,
        key_size: spec.shape.key_size,
        value_size: spec.shape.value_size,
        max_entries: MAGLEV_MAX_ENTRIES,
        map_flags: BPF_F_NO_PREALLOC,
        inner_map_fd: template.map().fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    let name = &spec.name.as_bytes()[..spec.name.len().min(15)];
    attr.map_name[..name.len()].copy_from_slice(name);
    // SAFETY: a live attr of its size; the kernel returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            &mut attr as *mut CreateAttr,
            size_of::<CreateAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let map = MapData::from_fd(fd).map_err(io_error)?;
    map.pin(dir.join(spec.name)).map_err(io::Error::other)?;
    HashOfMaps::try_from(Map::HashOfMaps(map)).map_err(io_error)
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

    fn update_services_batch(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> io::Result<()> {
        let mut keys = Vec::with_capacity(entries.len() * KEY);
        let mut values = Vec::with_capacity(entries.len() * SERVICE_VALUE_LEN);
        for (key, value) in entries {
            keys.extend(sized::<KEY>("service key", key.encode().as_slice())?);
            values.extend(value.encode());
        }
        let map = self.services.map().fd().as_fd();
        batch(map, &keys, Some(&values), entries.len())
    }

    fn delete_services_batch(&mut self, entries: &[ServiceKey]) -> io::Result<()> {
        let mut keys = Vec::with_capacity(entries.len() * KEY);
        for key in entries {
            keys.extend(sized::<KEY>("service key", key.encode().as_slice())?);
        }
        batch(self.services.map().fd().as_fd(), &keys, None, entries.len())
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
    family: Family,
    /// Maglev's outer map, once added.
    maglev: Option<HashOfMaps<MapData, [u8; 2]>>,
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
            family,
            maglev: None,
        })
    }

    /// Creates and pins Maglev's outer map (`cilium_lb{4,6}_maglev`) under
    /// `dir`, as Cilium does where it runs Maglev.
    pub fn add_maglev(&mut self, dir: &Path) -> io::Result<()> {
        self.maglev = Some(create_maglev_outer(dir, self.family)?);
        Ok(())
    }

    /// Replaces the frontend's lookup table (by its `rev_nat_index`) with
    /// one of the `active` backend ids, as Cilium's `UpdateMaglev`; returns
    /// when the outer map's write ran.
    pub fn write_maglev_table(
        &mut self,
        rev_nat_index: u16,
        active: &[u32],
    ) -> io::Result<MasterWritten> {
        let outer = self.maglev.as_mut().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no Maglev maps: add_maglev first")
        })?;
        let mut inner = maglev_inner()?;
        let mut table: MaglevTable = [0; MAGLEV_TABLE_SIZE];
        for (i, entry) in table.iter_mut().enumerate() {
            *entry = active.get(i % active.len().max(1)).copied().unwrap_or(0);
        }
        inner.set(0, table, 0).map_err(io_error)?;
        let key = MaglevKey { rev_nat_index }.encode();
        let before = UnixNanos::now();
        outer.insert(key, inner.map(), 0).map_err(io_error)?;
        let written = MasterWritten {
            before,
            after: UnixNanos::now(),
        };
        // The inner map lives on in the outer map; the writer's descriptor
        // is closed, as Cilium's is.
        drop(inner);
        Ok(written)
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
        self.write_frontend_with(frontend, rev_nat_index, active, inactive, false)
            .map(|(_, master)| master)
    }

    /// [`Self::write_frontend`] of a Maglev frontend, in Cilium's order:
    /// slots, lookup table (outer map), master, tail. Returns when the
    /// outer map's and the master's writes ran.
    pub fn write_frontend_maglev(
        &mut self,
        frontend: Frontend,
        rev_nat_index: u16,
        active: &[u32],
        inactive: &[u32],
    ) -> io::Result<(MasterWritten, MasterWritten)> {
        let (table, master) =
            self.write_frontend_with(frontend, rev_nat_index, active, inactive, true)?;
        Ok((table.expect("written with its table"), master))
    }

    fn write_frontend_with(
        &mut self,
        frontend: Frontend,
        rev_nat_index: u16,
        active: &[u32],
        inactive: &[u32],
        maglev: bool,
    ) -> io::Result<(Option<MasterWritten>, MasterWritten)> {
        let (slots, master) = frontend_entries(frontend, rev_nat_index, active, inactive);
        for (key, value) in &slots {
            self.update_service(key, value)?;
        }
        let table = if maglev {
            Some(self.write_maglev_table(rev_nat_index, active)?)
        } else {
            None
        };
        let before = UnixNanos::now();
        self.update_service(&master.0, &master.1)?;
        let written = MasterWritten {
            before,
            after: UnixNanos::now(),
        };
        for key in self.tail(frontend, slots.len()) {
            self.delete_service(&key)?;
        }
        Ok((table, written))
    }

    /// [`Self::write_frontend`] in batches: one `BPF_MAP_UPDATE_BATCH` of
    /// the slots and then the master, one `BPF_MAP_DELETE_BATCH` of the
    /// tail; the batch update's syscall is the master's write.
    pub fn write_frontend_batch(
        &mut self,
        frontend: Frontend,
        rev_nat_index: u16,
        active: &[u32],
        inactive: &[u32],
    ) -> io::Result<MasterWritten> {
        let (mut entries, master) = frontend_entries(frontend, rev_nat_index, active, inactive);
        let slots = entries.len();
        entries.push(master);
        let before = UnixNanos::now();
        either!(&mut self.maps, m => m.update_services_batch(&entries))?;
        let written = MasterWritten {
            before,
            after: UnixNanos::now(),
        };
        let tail = self.tail(frontend, slots);
        if !tail.is_empty() {
            either!(&mut self.maps, m => m.delete_services_batch(&tail))?;
        }
        Ok(written)
    }

    /// Records that `frontend` has `total` slots now; the keys of the slots
    /// it had past that.
    fn tail(&mut self, frontend: Frontend, total: usize) -> Vec<ServiceKey> {
        let total = total as u16;
        let previous = self.totals.insert(frontend, total).unwrap_or(0);
        (total + 1..=previous)
            .map(|slot| ServiceKey { frontend, slot })
            .collect()
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

/// A frontend's slots (active backends first) and its master.
type Entry = (ServiceKey, ServiceValue);

fn frontend_entries(
    frontend: Frontend,
    rev_nat_index: u16,
    active: &[u32],
    inactive: &[u32],
) -> (Vec<Entry>, Entry) {
    let slots = active
        .iter()
        .chain(inactive)
        .enumerate()
        .map(|(i, id)| {
            let key = ServiceKey {
                frontend,
                slot: i as u16 + 1,
            };
            let value = ServiceValue {
                backend_id: *id,
                rev_nat_index,
                ..Default::default()
            };
            (key, value)
        })
        .collect();
    let master = ServiceValue {
        count: active.len() as u16,
        qcount: inactive.len() as u16,
        rev_nat_index,
        ..Default::default()
    };
    (slots, (ServiceKey::master(frontend), master))
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
