//! Key of the map of watched endpoint addresses.

/// An IP address as 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`). The tracepoints already store IPv4 addresses in this
/// form in their `*_v6` fields, so one key type serves both families and the
/// eBPF side can look addresses up without converting them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WatchKey {
    pub addr: [u8; 16],
}

/// Capacity of the watched-address map. Terminating pods at any one time in a
/// cluster stay far below this; adding past it fails with a clear error in
/// user space rather than silently dropping a watch.
pub const MAX_WATCHED: u32 = 16_384;

/// An address as the programs hold it: the 16 bytes of [`WatchKey::addr`]
/// as two native-endian words, loaded as such from the tracepoint record.
/// Kept in words on the kernel side, where bytes cost shifts and masks.
pub type AddrWords = [u64; 2];

/// Index of an address in the table of [`WatchSlot`]s: Fibonacci hashing,
/// whose top bits depend on every input bit, so addresses that differ only
/// in their last octet (pods of one node) spread over the table. The first
/// word is mixed before the second joins it, so that the same bit set in
/// either word does not cancel out.
#[inline(always)]
pub fn slot_of([high, low]: AddrWords) -> u32 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    ((high.wrapping_mul(K) ^ low).wrapping_mul(K) >> (64 - WATCH_SLOT_COUNT.trailing_zeros()))
        as u32
}

/// Slots of the direct-mapped table of watched addresses, and bits of
/// [`WatchFilter`].
pub const WATCH_SLOT_COUNT: u32 = 4096;
const FILTER_WORDS: usize = (WATCH_SLOT_COUNT / 64) as usize;

/// Count of the watched addresses and one bit per non-empty [`WatchSlot`],
/// in a one-entry array map: a single lookup, inlined by the verifier, tells
/// the programs whether anything is watched and, for most unwatched
/// addresses, that this one is not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchFilter {
    /// Watched addresses; zero (the usual state of a node) lets the programs
    /// return before reading their record.
    pub count: u32,
    /// Nonzero when the agent empties the per-CPU event batches
    /// (`CONN_BATCH`) on a timer: only then may the programs queue events
    /// there instead of writing each to the ring buffer.
    pub batched: u32,
    pub bits: [u64; FILTER_WORDS],
}

impl WatchFilter {
    pub const EMPTY: WatchFilter = WatchFilter {
        count: 0,
        batched: 0,
        bits: [0; FILTER_WORDS],
    };

    /// The filter for exactly these addresses.
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a WatchKey>) -> WatchFilter {
        let mut filter = WatchFilter::EMPTY;
        for key in keys {
            let slot = key.slot();
            filter.bits[(slot / 64) as usize] |= 1 << (slot % 64);
            filter.count += 1;
        }
        filter
    }

    /// False when no watched address has this slot ([`slot_of`]): then
    /// none of the addresses that map to it is watched.
    #[inline(always)]
    pub fn slot_occupied(&self, slot: u32) -> bool {
        match self.bits.get((slot / 64) as usize) {
            Some(word) => word & (1 << (slot % 64)) != 0,
            None => true,
        }
    }
}

/// One slot of a direct-mapped table in front of the watched-address hash
/// map, kept in an array map: the programs fetch an address's slot
/// ([`WatchKey::slot`]) with an array lookup the verifier inlines and
/// compare two words, where a hash lookup is a call that hashes 16 bytes and
/// walks a bucket. Only addresses whose slot several watched addresses share
/// go on to the hash map, which stays the authority.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchSlot {
    /// A watched address ([`WatchKey::words`]) when `state` is not
    /// [`SlotState::Empty`].
    pub words: [u64; 2],
    pub state: u32,
    pub _pad: u32,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// No watched address has this slot.
    Empty = 0,
    /// Exactly one watched address has this slot: the one stored.
    One = 1,
    /// Several do; the one stored is one of them.
    Shared = 2,
}

/// What a slot says about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotVerdict {
    Watched,
    NotWatched,
    /// The slot is shared and holds another address: ask the hash map.
    AskMap,
}

impl WatchSlot {
    /// The slot's content for the watched keys whose slot it is.
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a WatchKey>) -> WatchSlot {
        let mut keys = keys.into_iter();
        let Some(first) = keys.next() else {
            return WatchSlot::default();
        };
        WatchSlot {
            words: first.words(),
            state: if keys.next().is_some() {
                SlotState::Shared
            } else {
                SlotState::One
            } as u32,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub fn verdict(&self, words: AddrWords) -> SlotVerdict {
        if self.state == SlotState::Empty as u32 {
            SlotVerdict::NotWatched
        } else if self.words[0] == words[0] && self.words[1] == words[1] {
            SlotVerdict::Watched
        } else if self.state == SlotState::Shared as u32 {
            SlotVerdict::AskMap
        } else {
            SlotVerdict::NotWatched
        }
    }
}

/// Value stored for a watched address. Non-zero means watched; the bits are
/// reserved for per-address options.
pub type WatchFlags = u32;

#[cfg(feature = "user")]
unsafe impl aya::Pod for WatchKey {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for WatchSlot {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for WatchFilter {}

impl WatchKey {
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        WatchKey { addr }
    }

    pub const fn from_v6(octets: [u8; 16]) -> Self {
        WatchKey { addr: octets }
    }

    /// `from_v4(v4.to_ne_bytes()).words()` without going through bytes: the
    /// eBPF programs build it from a 32-bit load in two instructions.
    #[cfg(target_endian = "little")]
    #[inline(always)]
    pub const fn v4_words(v4: u32) -> AddrWords {
        [0, 0xffff_0000 | (v4 as u64) << 32]
    }

    /// The address as the programs hold it.
    #[inline(always)]
    pub fn words(&self) -> AddrWords {
        unsafe { core::mem::transmute::<[u8; 16], AddrWords>(self.addr) }
    }

    #[inline(always)]
    pub fn from_words(words: AddrWords) -> WatchKey {
        WatchKey {
            addr: unsafe { core::mem::transmute::<AddrWords, [u8; 16]>(words) },
        }
    }

    /// Index of this address in the table of [`WatchSlot`]s.
    pub fn slot(&self) -> u32 {
        slot_of(self.words())
    }

    /// The IPv4 address when this key is IPv4-mapped.
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;
    use std::vec::Vec;

    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> WatchKey {
        WatchKey::from_v4([a, b, c, d])
    }

    #[test]
    fn a_slot_of_one_address_knows_exactly_that_address() {
        let watched = v4(10, 244, 3, 7);
        let slot = WatchSlot::of([&watched]);
        assert_eq!(slot.verdict(watched.words()), SlotVerdict::Watched);
        assert_eq!(
            slot.verdict(v4(10, 244, 3, 8).words()),
            SlotVerdict::NotWatched
        );
    }

    #[test]
    fn a_shared_slot_sends_the_other_addresses_to_the_map() {
        let (a, b) = (v4(10, 244, 3, 7), v4(10, 244, 3, 8));
        let slot = WatchSlot::of([&a, &b]);
        assert_eq!(slot.state, SlotState::Shared as u32);
        assert_eq!(slot.verdict(a.words()), SlotVerdict::Watched);
        assert_eq!(slot.verdict(b.words()), SlotVerdict::AskMap);
    }

    #[test]
    fn an_empty_slot_rejects_every_address_even_all_zeros() {
        let slot = WatchSlot::of([]);
        assert_eq!(slot, WatchSlot::default());
        assert_eq!(
            slot.verdict(WatchKey::default().words()),
            SlotVerdict::NotWatched
        );
        assert_eq!(
            slot.verdict(v4(10, 0, 0, 1).words()),
            SlotVerdict::NotWatched
        );
    }

    #[test]
    fn the_filter_passes_every_watched_address_and_almost_no_other() {
        let watched: Vec<WatchKey> = (1..=20).map(|d| v4(10, 244, 7, d)).collect();
        let filter = WatchFilter::of(&watched);
        assert_eq!(filter.count, 20);
        assert!(watched.iter().all(|k| filter.slot_occupied(k.slot())));
        let others = (0..=255u8).flat_map(|c| (0..=255u8).map(move |d| v4(10, 96, c, d)));
        let passed = others.filter(|k| filter.slot_occupied(k.slot())).count();
        // 20 of 4096 bits set: about 0.5 % of other addresses pass.
        assert!(
            passed < 65536 / 100,
            "{passed} of 65536 unwatched addresses passed"
        );
        assert!((0..=255).all(|d| !WatchFilter::EMPTY.slot_occupied(v4(10, 244, 7, d).slot())));
    }

    #[test]
    fn pods_of_one_node_spread_over_the_slots() {
        let slots: BTreeSet<u32> = (0..=255).map(|d| v4(10, 244, 3, d).slot()).collect();
        assert!(
            slots.len() > 240,
            "256 addresses took only {} slots",
            slots.len()
        );
        assert!(slots.iter().all(|s| *s < WATCH_SLOT_COUNT));
    }

    #[test]
    fn v4_words_are_the_mapped_address() {
        for octets in [
            [10, 244, 3, 7],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [1, 2, 3, 4],
        ] {
            assert_eq!(
                WatchKey::v4_words(u32::from_ne_bytes(octets)),
                WatchKey::from_v4(octets).words()
            );
        }
    }

    #[test]
    fn words_are_the_same_bytes() {
        let key = v4(10, 244, 3, 7);
        assert_eq!(WatchKey::from_words(key.words()), key);
        assert_eq!(
            key.words()[1].to_ne_bytes(),
            [0, 0, 0xff, 0xff, 10, 244, 3, 7]
        );
    }

    #[test]
    fn every_byte_of_an_ipv6_address_moves_its_slot() {
        let base = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let slots: Vec<u32> = (0..16)
            .map(|i| {
                let mut a = base;
                a[i] ^= 0x10;
                WatchKey::from_v6(a).slot()
            })
            .collect();
        let distinct: BTreeSet<u32> = slots.iter().copied().collect();
        assert!(distinct.len() >= 15, "slots {slots:?}");
        assert!(!distinct.contains(&WatchKey::from_v6(base).slot()));
    }
}
