//! `syscalls/sys_enter_bpf` and `sys_exit_bpf`: Cilium's writes of the
//! masters of watched frontends (observer-common `cilium.rs`), stamped with
//! the kernel time at the syscall's entry and exit.
//!
//! Every bpf() syscall on the machine runs these programs, so the cheap
//! checks come first: the command (a context load), then the writer's
//! identity (its `comm`, and process when set); only the writer's element
//! writes get their attr and key read from user memory, and only a key
//! that is a watched master (one hash lookup) is kept until the exit, per
//! thread, and then sent with the syscall's result.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use observer_common::cilium::{
    ATTR_KEY, ATTR_MAP_FD, ATTR_VALUE, BPF_MAP_DELETE_BATCH, BPF_MAP_DELETE_ELEM,
    BPF_MAP_UPDATE_BATCH, BPF_MAP_UPDATE_ELEM, CILIUM_STATS_LEN, CiliumStat, ENTER_CMD_OFFSET,
    ENTER_UATTR_OFFSET, EXIT_RET_OFFSET, KEY_MAX, MASTER_WRITES_BYTES, MAX_PENDING_WRITES,
    MAX_WATCHED_MASTERS, MasterKey, MasterWrite, SERVICE_COUNT_OFFSET, SERVICE_QCOUNT_OFFSET,
    SERVICE_VALUE_LEN, WriterFilter,
};

use crate::record::ctx_load;

/// The writer to follow (one entry); all zero: follow nobody.
#[map]
pub static CILIUM_WRITER: Array<WriterFilter> = Array::with_max_entries(1, 0);

/// Masters of the watched frontends, kept by the agent.
#[map]
pub static CILIUM_MASTERS: HashMap<MasterKey, u8> =
    HashMap::with_max_entries(MAX_WATCHED_MASTERS, 0);

/// Matching writes between their entry and exit, by thread id.
#[map]
pub static CILIUM_PENDING: HashMap<u32, MasterWrite> =
    HashMap::with_max_entries(MAX_PENDING_WRITES, 0);

#[map]
pub static CILIUM_WRITES: RingBuf = RingBuf::with_byte_size(MASTER_WRITES_BYTES, 0);

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
    let _ = enter(uattr, cmd, pid_tgid);
    0
}

/// Reads the write's attr and key; keeps it when the key is a watched master.
#[inline(always)]
fn enter(uattr: u64, cmd: u32, pid_tgid: u64) -> Result<(), i32> {
    let unreadable = |e| {
        count(CiliumStat::Unreadable);
        e
    };
    // SAFETY: user memory read with the helper, which checks the address.
    let (map_fd, key_ptr) = unsafe {
        (
            bpf_probe_read_user((uattr + ATTR_MAP_FD as u64) as *const u32).map_err(unreadable)?,
            bpf_probe_read_user((uattr + ATTR_KEY as u64) as *const u64).map_err(unreadable)?,
        )
    };
    let mut key: MasterKey = [0; KEY_MAX];
    // An IPv4 key is the first 12 bytes (zero-padded in the map of
    // masters); an IPv6 key all 24. The 12 bytes come first so that a
    // 12-byte key at the end of a page is still read.
    unsafe { bpf_probe_read_user_buf(key_ptr as *const u8, &mut key[..12]).map_err(unreadable)? };
    if unsafe { CILIUM_MASTERS.get(key) }.is_none() {
        unsafe {
            bpf_probe_read_user_buf(key_ptr as *const u8, &mut key).map_err(unreadable)?;
        }
        if unsafe { CILIUM_MASTERS.get(key) }.is_none() {
            return Ok(());
        }
    }
    count(CiliumStat::Matched);
    let mut write = MasterWrite {
        enter_ns: unsafe { bpf_ktime_get_ns() },
        exit_ns: 0,
        ret: 0,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        cmd,
        map_fd,
        key,
        count: 0,
        qcount: 0,
        _pad: 0,
    };
    if cmd == BPF_MAP_UPDATE_ELEM {
        let mut value = [0u8; SERVICE_VALUE_LEN];
        unsafe {
            let value_ptr: u64 = bpf_probe_read_user((uattr + ATTR_VALUE as u64) as *const u64)
                .map_err(unreadable)?;
            bpf_probe_read_user_buf(value_ptr as *const u8, &mut value).map_err(unreadable)?;
        }
        let c = SERVICE_COUNT_OFFSET;
        let q = SERVICE_QCOUNT_OFFSET;
        write.count = u16::from_ne_bytes([value[c], value[c + 1]]);
        write.qcount = u16::from_ne_bytes([value[q], value[q + 1]]);
    }
    CILIUM_PENDING
        .insert(write.tid, write, 0)
        .inspect_err(|_| count(CiliumStat::Lost))
}

#[tracepoint]
pub fn cilium_bpf_exit(ctx: TracePointContext) -> u32 {
    let Some(pid_tgid) = writer() else {
        return 0;
    };
    let tid = pid_tgid as u32;
    let Some(pending) = CILIUM_PENDING.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: this thread's entry; only this thread writes or removes it.
    let mut write = unsafe { *pending };
    write.exit_ns = unsafe { bpf_ktime_get_ns() };
    write.ret = ctx_load!(ctx.as_ptr(), u64, EXIT_RET_OFFSET) as i64;
    let _ = CILIUM_PENDING.remove(tid);
    if CILIUM_WRITES.output::<MasterWrite>(&write, 0).is_err() {
        count(CiliumStat::Lost);
    }
    0
}
