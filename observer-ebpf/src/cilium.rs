//! `syscalls/sys_enter_bpf` and `sys_exit_bpf`: the writer's element
//! writes to Cilium's service and backends maps (observer-common
//! `cilium.rs`), stamped with the kernel time at the syscall's entry and
//! exit, for the agent's mirror of those maps.
//!
//! Every bpf() syscall on the machine runs these programs, so the cheap
//! checks come first: the command (a context load), then the writer's
//! identity (its `comm`, and process when set), then the written map's
//! descriptor (one read of user memory and one hash lookup): the agent
//! marks the descriptors of the writer's other maps, whose writes stop
//! here. Only the rest get their key and value read, kept per thread until
//! the exit, and sent with the syscall's result.
//!
//! A batch write to a map the agent classified is kept per thread at the
//! entry (its attr's address) and read at the exit, where the kernel has
//! written back how many elements it applied: each is sent as an element
//! write with the batch syscall's times. The map's kind gives the key and
//! value sizes; a batch to a descriptor not classified yet, or longer than
//! [`MAX_BATCH_ELEMENTS`], is counted for the agent to re-read.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use observer_common::cilium::{
    ATTR_BATCH_COUNT, ATTR_BATCH_KEYS, ATTR_BATCH_MAP_FD, ATTR_BATCH_VALUES, ATTR_KEY, ATTR_MAP_FD,
    ATTR_VALUE, BACKEND_KEY_LEN, BPF_MAP_DELETE_BATCH, BPF_MAP_DELETE_ELEM, BPF_MAP_UPDATE_BATCH,
    BPF_MAP_UPDATE_ELEM, CILIUM_STATS_LEN, CLOSE_FD_OFFSET, CiliumStat, ENTER_CMD_OFFSET,
    ENTER_UATTR_OFFSET, EXIT_RET_OFFSET, FD_BACKENDS4, FD_BACKENDS6, FD_MAGLEV4, FD_MAGLEV6,
    FD_OTHER, FD_PENDING, FD_SERVICES4, FD_SERVICES6, Family, KEY_MAX, MAGLEV_KEY_LEN,
    MAGLEV_VALUE_LEN, MAP_WRITES_BYTES, MAX_BATCH_ELEMENTS, MAX_PENDING_WRITES, MAX_WRITER_FDS,
    MapWrite, SERVICE_VALUE_LEN, VALUE_MAX, WRITER_CLOSED, WRITER_EXITED, WriterFilter,
    backend_value_len, fd_key, service_key_len,
};

use crate::record::ctx_load;

/// The writer to follow (one entry); all zero: follow nobody.
#[map]
pub static CILIUM_WRITER: Array<WriterFilter> = Array::with_max_entries(1, 0);

/// The writer's descriptors the agent classified ([`fd_key`] -> `FD_*`).
#[map]
pub static CILIUM_FDS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_WRITER_FDS, 0);

/// Writes between their entry and exit, by thread id.
#[map]
pub static CILIUM_PENDING: HashMap<u32, MapWrite> =
    HashMap::with_max_entries(MAX_PENDING_WRITES, 0);

/// A batch write between its entry and exit.
#[derive(Clone, Copy)]
pub struct PendingBatch {
    uattr: u64,
    enter_ns: u64,
    cmd: u32,
    map_fd: u32,
    /// The descriptor's `FD_*` kind.
    kind: u8,
}

/// Batch writes between their entry and exit, by thread id.
#[map]
pub static CILIUM_PENDING_BATCHES: HashMap<u32, PendingBatch> =
    HashMap::with_max_entries(MAX_PENDING_WRITES, 0);

#[map]
pub static CILIUM_WRITES: RingBuf = RingBuf::with_byte_size(MAP_WRITES_BYTES, 0);

#[map]
pub static CILIUM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CILIUM_STATS_LEN, 0);

#[inline(always)]
fn count(stat: CiliumStat) {
    if let Some(slot) = CILIUM_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot of the counter.
        unsafe { *slot += 1 };
    }
}

/// The writer's process id when the current thread is the writer.
#[inline(always)]
fn writer() -> Option<u64> {
    let filter = CILIUM_WRITER.get(0)?;
    if filter.comm_len == 0 && filter.tgid == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().ok()?;
    filter
        .matches((pid_tgid >> 32) as u32, &comm)
        .then_some(pid_tgid)
}

#[tracepoint]
pub fn cilium_bpf_enter(ctx: TracePointContext) -> u32 {
    let cmd = ctx_load!(ctx.as_ptr(), u64, ENTER_CMD_OFFSET) as u32;
    let element = cmd == BPF_MAP_UPDATE_ELEM || cmd == BPF_MAP_DELETE_ELEM;
    if !element && cmd != BPF_MAP_UPDATE_BATCH && cmd != BPF_MAP_DELETE_BATCH {
        return 0;
    }
    let Some(pid_tgid) = writer() else {
        return 0;
    };
    let uattr = ctx_load!(ctx.as_ptr(), u64, ENTER_UATTR_OFFSET);
    let read = if element {
        count(CiliumStat::WriterWrites);
        enter(uattr, cmd, pid_tgid)
    } else {
        count(CiliumStat::Batches);
        enter_batch(uattr, cmd, pid_tgid)
    };
    if read.is_err() {
        count(CiliumStat::Unreadable);
    }
    0
}

/// Keeps a batch write to a classified map until the exit.
#[inline(always)]
fn enter_batch(uattr: u64, cmd: u32, pid_tgid: u64) -> Result<(), i64> {
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: user memory read with the helper, which checks the address.
    let map_fd = unsafe { bpf_probe_read_user((uattr + ATTR_BATCH_MAP_FD as u64) as *const u32)? };
    let kind = match descriptor(tgid, map_fd) {
        FD_OTHER => {
            count(CiliumStat::OtherMaps);
            return Ok(());
        }
        FD_PENDING => {
            count(CiliumStat::BatchesUnsent);
            return Ok(());
        }
        kind => kind,
    };
    let batch = PendingBatch {
        uattr,
        enter_ns: unsafe { bpf_ktime_get_ns() },
        cmd,
        map_fd,
        kind,
    };
    if CILIUM_PENDING_BATCHES
        .insert(&(pid_tgid as u32), &batch, 0)
        .is_err()
    {
        count(CiliumStat::Lost);
    }
    Ok(())
}

/// The descriptor's `FD_*` kind; one seen for the first time is marked
/// [`FD_PENDING`], so that its close is reported.
#[inline(always)]
fn descriptor(tgid: u32, fd: u32) -> u8 {
    let key = fd_key(tgid, fd);
    // SAFETY: a copy of the value is taken at once.
    if let Some(kind) = unsafe { CILIUM_FDS.get(&key) } {
        return *kind;
    }
    // BPF_NOEXIST: the agent's classification, if it came meanwhile, stays.
    let _ = CILIUM_FDS.insert(&key, &FD_PENDING, 1);
    FD_PENDING
}

/// A write of the current thread with no key or value yet.
#[inline(always)]
fn blank(pid_tgid: u64, cmd: u32, map_fd: u32) -> MapWrite {
    MapWrite {
        enter_ns: 0,
        exit_ns: 0,
        ret: 0,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        cmd,
        map_fd,
        key: [0; KEY_MAX],
        value: [0; VALUE_MAX],
        key_len: 0,
        value_len: 0,
        _pad: [0; 6],
    }
}

/// Reads `out.len()` bytes at `ptr`, else the first `short` of them (a
/// shorter key or value at the end of a page); returns how many were read.
#[inline(always)]
fn read_prefix(ptr: u64, out: &mut [u8], short: usize) -> Result<u8, i64> {
    // SAFETY: user memory read with the helper, which checks the address.
    unsafe {
        if bpf_probe_read_user_buf(ptr as *const u8, out).is_ok() {
            return Ok(out.len() as u8);
        }
        bpf_probe_read_user_buf(ptr as *const u8, &mut out[..short])?;
    }
    Ok(short as u8)
}

/// Reads the write's attr, and its key and value unless the map is one the
/// agent does not follow; keeps it until the exit.
#[inline(always)]
fn enter(uattr: u64, cmd: u32, pid_tgid: u64) -> Result<(), i64> {
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: user memory read with the helper, which checks the address.
    let map_fd = unsafe { bpf_probe_read_user((uattr + ATTR_MAP_FD as u64) as *const u32)? };
    if descriptor(tgid, map_fd) == FD_OTHER {
        count(CiliumStat::OtherMaps);
        return Ok(());
    }
    let mut write = blank(pid_tgid, cmd, map_fd);
    let key_ptr: u64 = unsafe { bpf_probe_read_user((uattr + ATTR_KEY as u64) as *const u64)? };
    // An IPv6 service key has 24 bytes, an IPv4 one 12, a backend id 4:
    // the longest that reads, then the IPv4 length; a backend id at the
    // end of a page is missed (counted unreadable: the agent re-reads).
    write.key_len = read_prefix(key_ptr, &mut write.key, 12)?;
    if cmd == BPF_MAP_UPDATE_ELEM {
        let value_ptr: u64 =
            unsafe { bpf_probe_read_user((uattr + ATTR_VALUE as u64) as *const u64)? };
        write.value_len = read_prefix(value_ptr, &mut write.value, SERVICE_VALUE_LEN)?;
    }
    write.enter_ns = unsafe { bpf_ktime_get_ns() };
    if CILIUM_PENDING.insert(&write.tid, &write, 0).is_err() {
        count(CiliumStat::Lost);
    }
    Ok(())
}

#[tracepoint]
pub fn cilium_bpf_exit(ctx: TracePointContext) -> u32 {
    let Some(pid_tgid) = writer() else {
        return 0;
    };
    let tid = pid_tgid as u32;
    let ret = ctx_load!(ctx.as_ptr(), u64, EXIT_RET_OFFSET) as i64;
    let Some(pending) = CILIUM_PENDING.get_ptr_mut(&tid) else {
        // SAFETY: this thread's entry; only this thread writes or removes it.
        if let Some(batch) = unsafe { CILIUM_PENDING_BATCHES.get(&tid) } {
            let batch = *batch;
            let _ = CILIUM_PENDING_BATCHES.remove(&tid);
            if exit_batch(&batch, pid_tgid).is_err() {
                count(CiliumStat::Unreadable);
            }
        }
        return 0;
    };
    // SAFETY: this thread's entry; only this thread writes or removes it.
    let mut write = unsafe { *pending };
    write.exit_ns = unsafe { bpf_ktime_get_ns() };
    write.ret = ret;
    let _ = CILIUM_PENDING.remove(&tid);
    send(&write);
    0
}

#[inline(always)]
fn send(write: &MapWrite) {
    if CILIUM_WRITES.output::<MapWrite>(write, 0).is_ok() {
        count(CiliumStat::Sent);
    } else {
        count(CiliumStat::Lost);
    }
}

/// Sends the elements the kernel applied of a batch, as element writes.
#[inline(always)]
fn exit_batch(batch: &PendingBatch, pid_tgid: u64) -> Result<(), i64> {
    let exit_ns = unsafe { bpf_ktime_get_ns() };
    let attr = |offset: usize| batch.uattr + offset as u64;
    // SAFETY: user memory reads with the helper, which checks the address.
    let (applied, keys, values) = unsafe {
        (
            bpf_probe_read_user(attr(ATTR_BATCH_COUNT) as *const u32)?,
            bpf_probe_read_user(attr(ATTR_BATCH_KEYS) as *const u64)?,
            bpf_probe_read_user(attr(ATTR_BATCH_VALUES) as *const u64)?,
        )
    };
    let update = batch.cmd == BPF_MAP_UPDATE_BATCH;
    let element = if update {
        BPF_MAP_UPDATE_ELEM
    } else {
        BPF_MAP_DELETE_ELEM
    };
    // `ret` stays 0: the first `applied` elements are in the map, whatever
    // the syscall's result says of the rest.
    let mut write = blank(pid_tgid, element, batch.map_fd);
    write.enter_ns = batch.enter_ns;
    write.exit_ns = exit_ns;
    let elements = Elements {
        applied,
        keys,
        values: if update { values } else { 0 },
    };
    match batch.kind {
        FD_SERVICES4 => elements.send::<SERVICE_KEY4, SERVICE_VALUE_LEN>(&mut write)?,
        FD_SERVICES6 => elements.send::<SERVICE_KEY6, SERVICE_VALUE_LEN>(&mut write)?,
        FD_BACKENDS4 => elements.send::<BACKEND_KEY_LEN, BACKEND4>(&mut write)?,
        FD_BACKENDS6 => elements.send::<BACKEND_KEY_LEN, BACKEND6>(&mut write)?,
        FD_MAGLEV4 | FD_MAGLEV6 => elements.send::<MAGLEV_KEY_LEN, MAGLEV_VALUE_LEN>(&mut write)?,
        _ => count(CiliumStat::BatchesUnsent),
    }
    if applied > MAX_BATCH_ELEMENTS {
        count(CiliumStat::BatchesUnsent);
    }
    Ok(())
}

const SERVICE_KEY4: usize = service_key_len(Family::V4);
const SERVICE_KEY6: usize = service_key_len(Family::V6);
const BACKEND4: usize = backend_value_len(Family::V4);
const BACKEND6: usize = backend_value_len(Family::V6);

/// A batch's arrays in user memory; `values` 0 for a deletion.
struct Elements {
    applied: u32,
    keys: u64,
    values: u64,
}

impl Elements {
    /// Sends the first `applied` (at most [`MAX_BATCH_ELEMENTS`]) keys of
    /// `K` bytes, with their values of `V` bytes for an update.
    #[inline(always)]
    fn send<const K: usize, const V: usize>(&self, write: &mut MapWrite) -> Result<(), i64> {
        write.key_len = K as u8;
        write.value_len = if self.values == 0 { 0 } else { V as u8 };
        for i in 0..MAX_BATCH_ELEMENTS {
            if i >= self.applied {
                break;
            }
            let i = i as u64;
            // SAFETY: user memory reads with the helper, which checks the address.
            unsafe {
                bpf_probe_read_user_buf(
                    (self.keys + i * K as u64) as *const u8,
                    &mut write.key[..K],
                )?;
                if self.values != 0 {
                    bpf_probe_read_user_buf(
                        (self.values + i * V as u64) as *const u8,
                        &mut write.value[..V],
                    )?;
                }
            }
            send(write);
        }
        Ok(())
    }
}

/// `syscalls/sys_enter_close`: the writer closes a descriptor the programs
/// have an entry for; forgotten here and told to the agent, as the number
/// may come back for another map (Cilium creates and closes Maglev inner
/// maps all the time). `dup2` onto a descriptor closes it unseen.
#[tracepoint]
pub fn cilium_close(ctx: TracePointContext) -> u32 {
    let Some(pid_tgid) = writer() else {
        return 0;
    };
    let fd = ctx_load!(ctx.as_ptr(), u64, CLOSE_FD_OFFSET) as u32;
    let key = fd_key((pid_tgid >> 32) as u32, fd);
    if CILIUM_FDS.remove(&key).is_ok() {
        let mut event = blank(pid_tgid, WRITER_CLOSED, fd);
        event.enter_ns = unsafe { bpf_ktime_get_ns() };
        event.exit_ns = event.enter_ns;
        send(&event);
    }
    0
}

/// `sched/sched_process_exit` of the writer's main thread: its process is
/// gone, and with it every descriptor (closed without close(2)).
#[tracepoint]
pub fn cilium_exit(_ctx: TracePointContext) -> u32 {
    let Some(pid_tgid) = writer() else {
        return 0;
    };
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 {
        let mut event = blank(pid_tgid, WRITER_EXITED, 0);
        event.enter_ns = unsafe { bpf_ktime_get_ns() };
        event.exit_ns = event.enter_ns;
        send(&event);
    }
    0
}
