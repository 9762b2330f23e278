//! The kernel time of each `sendmsg` by a ruleset writer (`nft`,
//! `iptables-nft-restore`): `syscalls/sys_enter_sendmsg` and
//! `sys_exit_sendmsg`, for the processes whose `comm` is in [`WRITERS`],
//! and how long the call spent off its CPU (`sched/sched_switch`): on a
//! busy node the writer can wait for a core inside its own syscall.
//!
//! Both writers send their nf_tables batch with one sendmsg (checked with
//! strace), and the kernel commits it inside that call (nfnetlink_rcv_batch
//! -> nf_tables_commit -> the notifications), so a commit lies between the
//! entry and exit of one of these records, whoever reads them and when.
//!
//! Record (ring [`SENDS`]), native-endian u64s: entry ns, exit ns
//! (bpf_ktime_get_ns, CLOCK_MONOTONIC), the syscall's return value,
//! pid_tgid (tgid << 32 | tid), and ns off CPU between entry and exit.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, RingBuf},
    programs::TracePointContext,
};

/// The writers' `comm`s (NUL-padded to 16 bytes), set by user space.
#[map]
static WRITERS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(8, 0);

/// The writers' sendmsg calls in flight, by thread id: entry ns, when the
/// thread last left its CPU (0: on it), ns off CPU so far.
#[map]
static ENTERED: HashMap<u32, [u64; 3]> = HashMap::with_max_entries(1024, 0);

/// The records: a few hundred bytes per writer process.
#[map]
static SENDS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// `ret` of sys_exit_sendmsg (its tracepoint format).
const EXIT_RET_OFFSET: usize = 16;
/// `prev_pid` and `next_pid` of sched_switch (its tracepoint format).
const PREV_PID_OFFSET: usize = 24;
const NEXT_PID_OFFSET: usize = 56;

#[tracepoint]
pub fn writer_sendmsg_enter(_ctx: TracePointContext) -> u32 {
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    // SAFETY: a lookup; the value is not kept.
    if unsafe { WRITERS.get(comm) }.is_none() {
        return 0;
    }
    let at = unsafe { bpf_ktime_get_ns() };
    let _ = ENTERED.insert(bpf_get_current_pid_tgid() as u32, [at, 0, 0], 0);
    0
}

/// Every context switch on the machine: two lookups, a write only for a
/// writer inside its sendmsg.
#[tracepoint]
pub fn writer_sched_switch(ctx: TracePointContext) -> u32 {
    let at = unsafe { bpf_ktime_get_ns() };
    // SAFETY: inside the tracepoint's record (its format).
    let (prev, next) = unsafe {
        (
            ctx.read_at::<u32>(PREV_PID_OFFSET).unwrap_or(0),
            ctx.read_at::<u32>(NEXT_PID_OFFSET).unwrap_or(0),
        )
    };
    if let Some(call) = ENTERED.get_ptr_mut(prev) {
        // SAFETY: the entry of a thread that is switching out here.
        unsafe { (*call)[1] = at };
    }
    if let Some(call) = ENTERED.get_ptr_mut(next) {
        // SAFETY: the entry of the thread switching in here.
        unsafe {
            if (*call)[1] != 0 {
                (*call)[2] += at - (*call)[1];
                (*call)[1] = 0;
            }
        }
    }
    0
}

#[tracepoint]
pub fn writer_sendmsg_exit(ctx: TracePointContext) -> u32 {
    let at = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: a copy of this thread's entry (on its CPU: not written now).
    let Some([entered, _, off_cpu]) = (unsafe { ENTERED.get(tid) }).copied() else {
        return 0;
    };
    let _ = ENTERED.remove(tid);
    // SAFETY: inside the tracepoint's record (its format).
    let ret: i64 = unsafe { ctx.read_at(EXIT_RET_OFFSET) }.unwrap_or(i64::MIN);
    // A full ring loses the record: user space then finds no send around
    // the stamp and says so.
    let _ = SENDS.output::<[u64; 5]>([entered, at, ret as u64, pid_tgid, off_cpu], 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel (the tracepoint record's read) is
// GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
