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
    ATTR_KEY, ATTR_MAP_FD, ATTR_VALUE, BPF_MAP_DELETE_BATCH, BPF_MAP_DELETE_ELEM,
    BPF_MAP_UPDATE_BATCH, BPF_MAP_UPDATE_ELEM, CILIUM_STATS_LEN, CiliumStat, ENTER_CMD_OFFSET,
    ENTER_UATTR_OFFSET, EXIT_RET_OFFSET, FD_OTHER, KEY_MAX, MAP_WRITES_BYTES, MAX_PENDING_WRITES,
    MAX_WRITER_FDS, MapWrite, SERVICE_VALUE_LEN, VALUE_MAX, WriterFilter, fd_key,
};

use crate::record::ctx_load;

/// The writer to follow (one entry); all zero: follow nobody.
#[map]
pub static CILIUM_WRITER: Array<WriterFilter> = Array::with_max_entries(1, 0);

/// The writer's descriptors the agent classified ([`fd_key`] ->
/// `FD_FOLLOWED` / `FD_OTHER`).
#[map]
pub static CILIUM_FDS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_WRITER_FDS, 0);

/// Writes between their entry and exit, by thread id.
#[map]
pub static CILIUM_PENDING: HashMap<u32, MapWrite> =
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
    if !element {
        count(CiliumStat::Batches);
        return 0;
    }
    count(CiliumStat::WriterWrites);
    let uattr = ctx_load!(ctx.as_ptr(), u64, ENTER_UATTR_OFFSET);
    if enter(uattr, cmd, pid_tgid).is_err() {
        count(CiliumStat::Unreadable);
    }
    0
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
    if unsafe { CILIUM_FDS.get(&fd_key(tgid, map_fd)) } == Some(&FD_OTHER) {
        count(CiliumStat::OtherMaps);
        return Ok(());
    }
    let mut write = MapWrite {
        enter_ns: 0,
        exit_ns: 0,
        ret: 0,
        tgid,
        tid: pid_tgid as u32,
        cmd,
        map_fd,
        key: [0; KEY_MAX],
        value: [0; VALUE_MAX],
        key_len: 0,
        value_len: 0,
        _pad: [0; 6],
    };
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
    let Some(pending) = CILIUM_PENDING.get_ptr_mut(&tid) else {
        return 0;
    };
    // SAFETY: this thread's entry; only this thread writes or removes it.
    let mut write = unsafe { *pending };
    write.exit_ns = unsafe { bpf_ktime_get_ns() };
    write.ret = ctx_load!(ctx.as_ptr(), u64, EXIT_RET_OFFSET) as i64;
    let _ = CILIUM_PENDING.remove(&tid);
    if CILIUM_WRITES.output::<MapWrite>(&write, 0).is_ok() {
        count(CiliumStat::Sent);
    } else {
        count(CiliumStat::Lost);
    }
    0
}
