//! Maps and read-only globals shared by the programs. Names are the contract
//! with observer-agent's loader.

use crate::record::{COPY_SLOTS, RecordCopy};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use observer_common::{
    ConnEvent, Stat, TracepointLayout, WatchFilter, WatchKey, WatchSlot,
    conn::{CONN_BATCH_LEN, CONN_EVENTS_MIN_BYTES, ConnBatchState},
    stats::STATS_LEN,
    watch::{AddrWords, MAX_WATCHED, SlotVerdict, WATCH_SLOT_COUNT, WatchFlags, slot_of},
};

/// Overwritten by the agent at load time with offsets read from tracefs.
#[unsafe(no_mangle)]
pub static LAYOUT: TracepointLayout = TracepointLayout::DEFAULT;

#[map]
pub static WATCHED: HashMap<WatchKey, WatchFlags> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// Count and occupied slots of `WATCHED`, kept by the agent (one entry).
#[map]
pub static WATCH_FILTER: Array<WatchFilter> = Array::with_max_entries(1, 0);

/// Direct-mapped table in front of `WATCHED`, kept by the agent.
#[map]
pub static WATCH_SLOTS: Array<WatchSlot> = Array::with_max_entries(WATCH_SLOT_COUNT, 0);

/// Resized by the agent to the machine's CPU count.
#[map]
pub static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(CONN_EVENTS_MIN_BYTES, 0);

/// Each CPU's queued events (see `delivery.rs`).
#[map]
pub static CONN_BATCH: PerCpuArray<[ConnEvent; CONN_BATCH_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Each CPU's batch length and busy mark, apart from the events so that the
/// agent can tell which CPUs have queued events by reading a few bytes each.
#[map]
pub static CONN_BATCH_STATE: PerCpuArray<ConnBatchState> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Events written one by one: each CPU's ring consumer position, plus one,
/// when it last woke the agent (zero: never).
#[map]
pub static CONN_WOKEN_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's copies of tracepoint records read at the agent's offsets
/// (see `record.rs`), one slot per tracepoint.
#[map]
pub static RECORD_COPY: PerCpuArray<RecordCopy> = PerCpuArray::with_max_entries(COPY_SLOTS, 0);

/// Reads one field of [`LAYOUT`]. Volatile so the compiler cannot fold the
/// compile-time default into the code; the verifier still sees the frozen
/// value the agent wrote and prunes what it makes dead.
macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::LAYOUT.$field)) }
    };
}
pub(crate) use layout;

/// The filter, or `None` while nothing is watched (the usual state of a
/// node: then every program returns before reading its record).
#[inline(always)]
pub fn watch_filter() -> Option<&'static WatchFilter> {
    WATCH_FILTER.get(0).filter(|f| f.count != 0)
}

#[inline(always)]
pub fn is_watched(filter: &WatchFilter, addr: AddrWords) -> bool {
    let slot = slot_of(addr);
    if !filter.slot_occupied(slot) {
        return false;
    }
    match WATCH_SLOTS.get(slot).map(|s| s.verdict(addr)) {
        Some(SlotVerdict::Watched) => true,
        Some(SlotVerdict::NotWatched) => false,
        Some(SlotVerdict::AskMap) | None => unsafe {
            WATCHED.get(WatchKey::from_words(addr)).is_some()
        },
    }
}

#[inline(always)]
pub fn count(stat: Stat) -> u64 {
    count_n(stat, 1)
}

#[inline(always)]
pub fn count_n(stat: Stat, n: u64) -> u64 {
    match STATS.get_ptr_mut(stat as u32) {
        Some(slot) => unsafe {
            *slot += n;
            *slot
        },
        None => 0,
    }
}
