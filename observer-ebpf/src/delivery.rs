//! How connection events reach user space: queued in a per-CPU batch that
//! goes to the ring buffer as one record when it is full or when the agent
//! asks (the `flush_conn_batch` program, run on each CPU that has queued
//! events before every read of the ring), or written to the ring one by
//! one where the agent cannot ask (the kernel cannot run that program).
//!
//! A ring buffer reservation and its commit cost more than everything else
//! an emitting program does; a batch pays them once per `CONN_BATCH_LEN`
//! events. Queued events keep their own kernel timestamps, so batching
//! delays their delivery (by at most the agent's read interval), never
//! their times.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::{
    BPF_RB_AVAIL_DATA, BPF_RB_CONS_POS, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
};
use observer_common::{
    ConnEvent, Stat, WatchFilter,
    conn::{CONN_EVENTS_WAKEUP_BYTES, ConnBatchState},
};

use crate::maps::{CONN_BATCH, CONN_BATCH_STATE, CONN_EVENTS, CONN_WOKEN_AT, count, count_n};

const WAKEUP_BYTES: u64 = CONN_EVENTS_WAKEUP_BYTES as u64;

/// Events a CPU writes one by one between two looks at the ring's fill
/// level (a helper call): 16 events per CPU fit many times in the three
/// quarters of the ring left above the wakeup mark.
const FILL_CHECK_EVERY: u64 = 16;

/// Sends one event towards user space.
#[inline(always)]
pub fn send(filter: &WatchFilter, event: &ConnEvent) {
    if filter.batched != 0 && queue(event) {
        return;
    }
    write_one(event);
}

/// Hands this CPU's queued events to the ring buffer. A program interrupted
/// on this CPU while changing the batch keeps it: its events go with the
/// agent's next flush.
#[inline(always)]
pub fn flush() {
    let (Some(state), Some(batch)) = (CONN_BATCH_STATE.get_ptr_mut(0), CONN_BATCH.get_ptr_mut(0))
    else {
        return;
    };
    unsafe {
        if !enter(state) {
            return;
        }
        // Two reads of the length, so that the compiler cannot fold the two
        // tests into one range check on a derived value, which the verifier
        // cannot carry back to the length it bounds.
        if read_volatile(addr_of!((*state).len)) != 0 {
            let len = read_volatile(addr_of!((*state).len)) as usize;
            if let Some(events) = (*batch).get(..len) {
                hand_over(events);
            }
            (*state).len = 0;
        }
        leave(state);
    }
}

/// Queues `event` in this CPU's batch, handing the batch to the ring when
/// it is full. False when the batch is in use below this program (the
/// agent's flush, which this program interrupted): then the caller writes
/// the event on its own.
#[inline(always)]
fn queue(event: &ConnEvent) -> bool {
    let (Some(state), Some(batch)) = (CONN_BATCH_STATE.get_ptr_mut(0), CONN_BATCH.get_ptr_mut(0))
    else {
        return false;
    };
    unsafe {
        if !enter(state) {
            return false;
        }
        let len = (*state).len as usize;
        let Some(slot) = (*batch).get_mut(len) else {
            // Only these programs write the length, and never past the end.
            (*state).len = 0;
            leave(state);
            return false;
        };
        *slot = *event;
        count(Stat::Emitted);
        let len = len + 1;
        if len == (*batch).len() {
            hand_over(&*batch);
            (*state).len = 0;
        } else {
            (*state).len = len as u32;
        }
        leave(state);
    }
    true
}

/// Marks the batch busy; false when it already is. Programs on one CPU only
/// nest, so a check and a set in sequence cannot be torn by another program
/// of this CPU: one that interrupts between them runs to its end first.
#[inline(always)]
unsafe fn enter(state: *mut ConnBatchState) -> bool {
    unsafe {
        if read_volatile(addr_of!((*state).busy)) != 0 {
            return false;
        }
        write_volatile(addr_of_mut!((*state).busy), 1);
    }
    compiler_barrier();
    true
}

#[inline(always)]
unsafe fn leave(state: *mut ConnBatchState) {
    compiler_barrier();
    unsafe { write_volatile(addr_of_mut!((*state).busy), 0) };
}

/// Keeps the compiler from moving the batch's loads and stores across the
/// busy mark: an interrupt on this CPU sees memory in program order, so
/// only the compiler could make it see a half-written batch as free.
#[inline(always)]
fn compiler_barrier() {
    // An empty asm block that may touch memory: no instruction, but no
    // memory access moves across it.
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
}

/// One ring record for the whole batch; a full ring loses all of it, counted.
///
/// Wakes the agent only with the record that takes the unread bytes past
/// the mark: a wakeup is an interrupt to this CPU (irq_work), and waking
/// again with every later batch until the agent had read cost each
/// emitting invocation 8-88 ns more in the bench (docs/benchmarks.md).
/// The agent's timer reads the ring anyway: a reader that misses the one
/// wakeup loses no event, it reads them at its next tick.
#[inline(always)]
fn hand_over(events: &[ConnEvent]) {
    let unread = CONN_EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let bytes = core::mem::size_of_val(events) as u64;
    let flags = if unread < WAKEUP_BYTES && unread + bytes >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if CONN_EVENTS
        .output::<[ConnEvent]>(events, flags as u64)
        .is_err()
    {
        count_n(Stat::Lost, events.len() as u64);
    }
}

#[inline(always)]
fn write_one(event: &ConnEvent) {
    match CONN_EVENTS.reserve::<ConnEvent>(0) {
        Some(mut slot) => {
            // Through the raw pointer: `MaybeUninit::write` compiled to a
            // call of a byte-by-byte memmove, seven word copies here.
            unsafe { slot.as_mut_ptr().write(*event) };
            // A wakeup per event (an irq_work and an epoll round trip) costs
            // more than the rest of the program: the agent drains the ring
            // on a short timer, and is woken early only when it fills up.
            let emitted = count(Stat::Emitted);
            let flags = if emitted.is_multiple_of(FILL_CHECK_EVERY) && past_mark_unwoken() {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(flags as u64);
        }
        None => {
            count(Stat::Lost);
        }
    }
}

/// Whether the ring holds more than the mark and this CPU has not woken the
/// agent since the agent last read. Looked at every 16th event, the fill
/// level cannot show the moment it passes the mark (as `hand_over` sees
/// it); remembering where the reader stood instead keeps each CPU to one
/// wakeup per read. Waking at every look cost `inet_sock_set_state` 114 ns
/// and `tcp_receive_reset` 545 ns more per invocation in the bench's storms
/// (docs/benchmarks.md).
#[inline(always)]
fn past_mark_unwoken() -> bool {
    if CONN_EVENTS.query(BPF_RB_AVAIL_DATA as u64) < WAKEUP_BYTES {
        return false;
    }
    let Some(woken_at) = CONN_WOKEN_AT.get_ptr_mut(0) else {
        return true;
    };
    let read_to = CONN_EVENTS.query(BPF_RB_CONS_POS as u64) + 1;
    unsafe {
        if *woken_at == read_to {
            return false;
        }
        *woken_at = read_to;
    }
    true
}
