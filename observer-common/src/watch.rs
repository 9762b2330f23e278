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

/// Bits in [`WatchFilter::bits`]: with a few hundred watched addresses, one
/// in a dozen unwatched addresses shares a bit and pays the hash lookup.
pub const FILTER_BITS: u32 = 4096;
const FILTER_WORDS: usize = (FILTER_BITS / 64) as usize;

/// Prefilter in front of the watched-address hash map, in a one-entry array
/// map: an array lookup the verifier inlines and a bit test, where a hash
/// lookup hashes 16 bytes and walks a bucket. Almost every connection a node
/// makes is to an unwatched address, and most of them stop here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchFilter {
    /// Watched addresses; zero (the usual state of a node) lets the programs
    /// return before reading their record.
    pub count: u32,
    pub _pad: u32,
    /// Bit [`WatchKey::filter_bit`] set for every watched address.
    pub bits: [u64; FILTER_WORDS],
}

impl WatchFilter {
    pub const EMPTY: WatchFilter = WatchFilter {
        count: 0,
        _pad: 0,
        bits: [0; FILTER_WORDS],
    };

    /// The filter for exactly these addresses.
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a WatchKey>) -> WatchFilter {
        let mut filter = WatchFilter::EMPTY;
        for key in keys {
            let bit = key.filter_bit();
            filter.bits[(bit / 64) as usize] |= 1 << (bit % 64);
            filter.count += 1;
        }
        filter
    }

    /// False only when `key` is certainly not watched.
    #[inline(always)]
    pub fn may_contain(&self, key: &WatchKey) -> bool {
        let bit = key.filter_bit();
        match self.bits.get((bit / 64) as usize) {
            Some(word) => word & (1 << (bit % 64)) != 0,
            None => true,
        }
    }
}

/// Value stored for a watched address. Non-zero means watched; the bits are
/// reserved for per-address options.
pub type WatchFlags = u32;

#[cfg(feature = "user")]
unsafe impl aya::Pod for WatchKey {}

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

    /// Fibonacci hashing of the two halves folded together: the top bits of
    /// the product depend on every address bit, so addresses that differ only
    /// in their last octet (pods of one node) spread over the filter.
    #[inline(always)]
    pub fn filter_bit(&self) -> u32 {
        let a = &self.addr;
        let high = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let low = u64::from_le_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
        ((high ^ low).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILTER_BITS.trailing_zeros()))
            as u32
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
    fn the_filter_contains_every_key_it_was_built_from() {
        let keys: Vec<WatchKey> = (0..=255).map(|d| v4(10, 244, 3, d)).collect();
        let filter = WatchFilter::of(&keys);
        assert_eq!(filter.count, 256);
        assert!(keys.iter().all(|k| filter.may_contain(k)));
    }

    #[test]
    fn an_empty_filter_rejects_every_address() {
        let filter = WatchFilter::of(&[]);
        assert_eq!(filter, WatchFilter::EMPTY);
        assert!((0..=255).all(|d| !filter.may_contain(&v4(10, 244, 3, d))));
    }

    #[test]
    fn pods_of_one_node_spread_over_the_filter() {
        let bits: BTreeSet<u32> = (0..=255).map(|d| v4(10, 244, 3, d).filter_bit()).collect();
        assert!(
            bits.len() > 240,
            "256 addresses took only {} bits",
            bits.len()
        );
        assert!(bits.iter().all(|b| *b < FILTER_BITS));
    }

    #[test]
    fn a_few_watched_addresses_let_almost_every_other_address_through() {
        let watched: Vec<WatchKey> = (1..=20).map(|d| v4(10, 244, 7, d)).collect();
        let filter = WatchFilter::of(&watched);
        let others = (0..=255u8).flat_map(|c| (0..=255u8).map(move |d| v4(10, 96, c, d)));
        let passed = others.filter(|k| filter.may_contain(k)).count();
        // 20 of 4096 bits set: about 0.5 % of random addresses pass.
        assert!(
            passed < 65536 / 100,
            "{passed} of 65536 unwatched addresses passed"
        );
    }

    #[test]
    fn ipv6_addresses_use_all_their_bytes() {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        let mut b = a;
        b[1] = 1;
        assert_ne!(
            WatchKey::from_v6(a).filter_bit(),
            WatchKey::from_v6(b).filter_bit()
        );
    }
}
