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

/// Value stored for a watched address. Non-zero means watched; the bits are
/// reserved for per-address options.
pub type WatchFlags = u32;

#[cfg(feature = "user")]
unsafe impl aya::Pod for WatchKey {}

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
