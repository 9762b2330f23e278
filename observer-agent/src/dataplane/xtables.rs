//! The xtables DNAT target as iptables-nft stores it (NFTA_TARGET_INFO):
//! revision 0 `struct nf_nat_ipv4_multi_range_compat`, revision 1
//! `struct nf_nat_range`, revision 2 `struct nf_nat_range2`
//! (linux/netfilter/nf_nat.h). Host byte order for flags, network byte order
//! for addresses and ports.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::netlink::NetlinkDecodeError;

const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

fn field<const N: usize>(info: &[u8], at: usize) -> Result<[u8; N], NetlinkDecodeError> {
    info.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .ok_or(NetlinkDecodeError::Truncated {
            what: "DNAT target info",
            need: at + N,
            have: info.len(),
        })
}

/// The `--to-destination` address and port (0 = unchanged) of a DNAT target,
/// or None when it does not map addresses.
pub fn dnat_destination(rev: u32, info: &[u8]) -> Result<Option<SocketAddrV4>, NetlinkDecodeError> {
    // Offsets of flags, min address, min port.
    let (flags_at, addr_at, port_at) = match rev {
        // rangesize (u32), then range[0]: flags, min_ip, max_ip, min, max.
        0 => {
            let rangesize = u32::from_ne_bytes(field(info, 0)?);
            if rangesize != 1 {
                return Err(NetlinkDecodeError::BadLength {
                    what: "DNAT rangesize",
                    len: rangesize as usize,
                });
            }
            (4, 8, 16)
        }
        // flags, min_addr[16], max_addr[16], min_proto, max_proto (, base_proto).
        1 | 2 => (0, 4, 36),
        _ => {
            return Err(NetlinkDecodeError::BadLength {
                what: "DNAT revision",
                len: rev as usize,
            });
        }
    };
    let flags = u32::from_ne_bytes(field(info, flags_at)?);
    if flags & NF_NAT_RANGE_MAP_IPS == 0 {
        return Ok(None);
    }
    let addr = Ipv4Addr::from(field::<4>(info, addr_at)?);
    let port = if flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0 {
        u16::from_be_bytes(field(info, port_at)?)
    } else {
        0
    };
    Ok(Some(SocketAddrV4::new(addr, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range2(addr: [u8; 4], port: u16, flags: u32) -> Vec<u8> {
        let mut info = vec![0u8; 42];
        info[0..4].copy_from_slice(&flags.to_ne_bytes());
        info[4..8].copy_from_slice(&addr);
        info[20..24].copy_from_slice(&addr);
        info[36..38].copy_from_slice(&port.to_be_bytes());
        info[38..40].copy_from_slice(&port.to_be_bytes());
        info
    }

    #[test]
    fn decodes_every_revision() {
        let want = SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, 1), 80);
        let info = range2([10, 180, 0, 1], 80, 3);
        assert_eq!(dnat_destination(2, &info).unwrap(), Some(want));
        assert_eq!(dnat_destination(1, &info[..40]).unwrap(), Some(want));
        let mut compat = vec![0u8; 20];
        compat[0..4].copy_from_slice(&1u32.to_ne_bytes());
        compat[4..8].copy_from_slice(&3u32.to_ne_bytes());
        compat[8..12].copy_from_slice(&[10, 180, 0, 1]);
        compat[12..16].copy_from_slice(&[10, 180, 0, 1]);
        compat[16..18].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(dnat_destination(0, &compat).unwrap(), Some(want));
    }

    #[test]
    fn port_is_zero_unless_specified_and_none_without_addresses() {
        let info = range2([10, 0, 0, 9], 80, 1);
        assert_eq!(
            dnat_destination(2, &info).unwrap(),
            Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 0))
        );
        assert_eq!(
            dnat_destination(2, &range2([1, 2, 3, 4], 80, 2)).unwrap(),
            None
        );
    }

    #[test]
    fn short_or_unknown_input_is_an_error() {
        assert!(dnat_destination(2, &[3, 0, 0, 0, 10]).is_err());
        assert!(dnat_destination(9, &range2([1, 2, 3, 4], 80, 3)).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(rev in 0u32..4, info in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = dnat_destination(rev, &info);
        }
    }
}
