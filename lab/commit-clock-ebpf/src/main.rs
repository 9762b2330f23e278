//! The kernel time of each `sendmsg` by a ruleset writer (`nft`,
//! `iptables-nft-restore`): `syscalls/sys_enter_sendmsg` and
//! `sys_exit_sendmsg`, for the processes whose `comm` is in [`WRITERS`].
//!
//! Both writers send their nf_tables batch with one sendmsg (checked with
//! strace), and the kernel commits it inside that call (nfnetlink_rcv_batch
//! -> nf_tables_commit -> the notifications), so a commit lies between the
//! entry and exit of one of these records, whoever reads them and when.
//!
//! Record (ring [`SENDS`]), native-endian u64s: entry ns, exit ns
//! (bpf_ktime_get_ns, CLOCK_MONOTONIC), the syscall's return value, and
//! pid_tgid (tgid << 32 | tid).
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

/// Entry time of the writers' sendmsg calls in flight, by pid_tgid.
#[map]
static ENTERED: HashMap<u64, u64> = HashMap::with_max_entries(1024, 0);

/// The records: a few hundred bytes per writer process.
#[map]
static SENDS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// `ret` of sys_exit_sendmsg (its tracepoint format).
const EXIT_RET_OFFSET: usize = 16;

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
    let _ = ENTERED.insert(bpf_get_current_pid_tgid(), at, 0);
    0
}

#[tracepoint]
pub fn writer_sendmsg_exit(ctx: TracePointContext) -> u32 {
    let at = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a copy of this thread's entry, which only it writes.
    let Some(entered) = (unsafe { ENTERED.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = ENTERED.remove(pid_tgid);
    // SAFETY: inside the tracepoint's record (its format).
    let ret: i64 = unsafe { ctx.read_at(EXIT_RET_OFFSET) }.unwrap_or(i64::MIN);
    // A full ring loses the record: user space then finds no send around
    // the stamp and says so.
    let _ = SENDS.output::<[u64; 4]>([entered, at, ret as u64, pid_tgid], 0);
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
