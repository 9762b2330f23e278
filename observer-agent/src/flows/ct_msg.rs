//! Typed decoding of ctnetlink new-conntrack events into the flow they
//! describe: the original tuple (what the client chose) and the reply
//! tuple's source (where NAT sent it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use observer_proto::UnixNanos;

use crate::netlink::{Attr, NFGENMSG_LEN, NetlinkDecodeError, attrs};

/// (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW.
pub const CT_NEW: u16 = 1 << 8;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TIMESTAMP: u16 = 22;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_TIMESTAMP_START: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtNew {
    pub original: Tuple,
    pub reply: Tuple,
    /// Conntrack's own start time (wall clock, ns) when
    /// net.netfilter.nf_conntrack_timestamp is on.
    pub start: Option<UnixNanos>,
}

fn ip(attr: &Attr<'_>, what: &'static str) -> Result<IpAddr, NetlinkDecodeError> {
    match attr.value.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(attr.value)
                .map_err(|_| NetlinkDecodeError::BadLength { what, len: 4 })?,
        ))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(attr.value)
                .map_err(|_| NetlinkDecodeError::BadLength { what, len: 16 })?,
        ))),
        len => Err(NetlinkDecodeError::BadLength { what, len }),
    }
}

fn tuple(nest: &Attr<'_>) -> Result<Tuple, NetlinkDecodeError> {
    let (mut src, mut dst, mut sport, mut dport, mut protocol) = (None, None, 0, 0, None);
    for attr in nest.nested() {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_IP => {
                for a in attr.nested() {
                    let a = a?;
                    match a.kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip(&a, "tuple source")?),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip(&a, "tuple destination")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attr.nested() {
                    let a = a?;
                    match a.kind {
                        CTA_PROTO_NUM => {
                            protocol =
                                Some(*a.value.first().ok_or(NetlinkDecodeError::BadLength {
                                    what: "protocol number",
                                    len: 0,
                                })?)
                        }
                        CTA_PROTO_SRC_PORT => sport = a.be_u16("source port")?,
                        CTA_PROTO_DST_PORT => dport = a.be_u16("destination port")?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Tuple {
        src: SocketAddr::new(
            src.ok_or(NetlinkDecodeError::Missing {
                what: "tuple source",
            })?,
            sport,
        ),
        dst: SocketAddr::new(
            dst.ok_or(NetlinkDecodeError::Missing {
                what: "tuple destination",
            })?,
            dport,
        ),
        protocol: protocol.ok_or(NetlinkDecodeError::Missing {
            what: "tuple protocol",
        })?,
    })
}

/// Decodes the payload (after nlmsghdr) of a CT_NEW message.
pub fn decode(payload: &[u8]) -> Result<CtNew, NetlinkDecodeError> {
    let body = payload
        .get(NFGENMSG_LEN..)
        .ok_or(NetlinkDecodeError::Truncated {
            what: "nfgenmsg",
            need: NFGENMSG_LEN,
            have: payload.len(),
        })?;
    let (mut original, mut reply, mut start) = (None, None, None);
    for attr in attrs(body) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_ORIG => original = Some(tuple(&attr)?),
            CTA_TUPLE_REPLY => reply = Some(tuple(&attr)?),
            CTA_TIMESTAMP => {
                for a in attr.nested() {
                    let a = a?;
                    if a.kind == CTA_TIMESTAMP_START {
                        start = UnixNanos::from_wire(a.be_u64("conntrack start")?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(CtNew {
        original: original.ok_or(NetlinkDecodeError::Missing {
            what: "original tuple",
        })?,
        reply: reply.ok_or(NetlinkDecodeError::Missing {
            what: "reply tuple",
        })?,
        start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::attr;
    use proptest::prelude::*;

    fn tuple_attr(kind: u16, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let nested = 0x8000;
        attr(
            kind | nested,
            &[
                attr(
                    CTA_TUPLE_IP | nested,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)].concat(),
                ),
                attr(
                    CTA_TUPLE_PROTO | nested,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        )
    }

    /// A client 10.0.0.5:40000 to the VIP 172.30.0.10:80, DNATed to 10.180.0.2:8080.
    pub(crate) fn event() -> Vec<u8> {
        [
            vec![2, 0, 0, 0],
            tuple_attr(CTA_TUPLE_ORIG, [10, 0, 0, 5], 40000, [172, 30, 0, 10], 80),
            tuple_attr(CTA_TUPLE_REPLY, [10, 180, 0, 2], 8080, [10, 0, 0, 5], 40000),
            attr(
                CTA_TIMESTAMP | 0x8000,
                &attr(
                    CTA_TIMESTAMP_START,
                    &1_700_000_000_000_000_000u64.to_be_bytes(),
                ),
            ),
        ]
        .concat()
    }

    #[test]
    fn decodes_a_dnat_flow() {
        let ct = decode(&event()).unwrap();
        assert_eq!(ct.original.src, "10.0.0.5:40000".parse().unwrap());
        assert_eq!(ct.original.dst, "172.30.0.10:80".parse().unwrap());
        assert_eq!(ct.reply.src, "10.180.0.2:8080".parse().unwrap());
        assert_eq!(ct.original.protocol, 6);
        assert_eq!(
            ct.start,
            Some(UnixNanos::from_nanos(1_700_000_000_000_000_000))
        );
    }

    #[test]
    fn missing_reply_or_truncation_is_an_error() {
        let ev = event();
        assert!(decode(&ev[..40]).is_err());
        assert!(matches!(
            decode(&[2, 0, 0, 0]),
            Err(NetlinkDecodeError::Missing { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn corrupted_events_never_panic(at in 0usize..120, byte in any::<u8>(), cut in 0usize..120) {
            let mut ev = event();
            if at < ev.len() {
                ev[at] = byte;
            }
            ev.truncate(cut);
            let _ = decode(&ev);
        }
    }
}
