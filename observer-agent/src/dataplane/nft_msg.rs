//! Typed decoding of nf_tables netlink messages (notifications and dump
//! replies share the format), reduced to what reachability needs: chains,
//! the jumps, verdict maps and DNAT targets of rules, and verdict map
//! elements.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::xtables;
use crate::netlink::{Attr, NFGENMSG_LEN, NetlinkDecodeError, attrs};

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNLGRP_NFTABLES: u32 = 7;

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_DELCHAIN: u16 = 5;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_GETSET: u16 = 10;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_GETSETELEM: u16 = 13;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWGEN: u16 = 15;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_SET_TABLE: u16 = 1;
pub const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_HANDLE: u16 = 16;
pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_TARGET_REV: u16 = 2;
const NFTA_TARGET_INFO: u16 = 3;
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_NAME: u16 = 3;

const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_NAT_DNAT: u32 = 1;
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;

/// A table: nfproto family and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    pub family: u8,
    pub name: String,
}

/// What a rule can do that matters for reachability. Conditions are ignored:
/// a jump that can happen is followed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSummary {
    /// Chains reached by `jump` / `goto`.
    pub jumps: Vec<String>,
    /// Sets looked up as verdict maps (`vmap`).
    pub verdict_maps: Vec<String>,
    /// Destinations of `dnat` (native or the xtables DNAT target).
    pub dnat: Vec<SocketAddr>,
}

impl RuleSummary {
    pub fn is_empty(&self) -> bool {
        self.jumps.is_empty() && self.verdict_maps.is_empty() && self.dnat.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetElem {
    /// Key (and interval end) bytes: the element's identity.
    pub key: Vec<u8>,
    /// For verdict maps: the chain a `jump`/`goto` element leads to.
    pub chain: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NftEvent {
    NewTable(TableId),
    DelTable(TableId),
    NewChain {
        table: TableId,
        name: String,
        base: bool,
    },
    DelChain {
        table: TableId,
        name: String,
    },
    NewRule {
        table: TableId,
        chain: String,
        handle: u64,
        summary: RuleSummary,
    },
    DelRule {
        table: TableId,
        chain: String,
        handle: u64,
    },
    NewSet {
        table: TableId,
        name: String,
        handle: u64,
    },
    DelSet {
        table: TableId,
        name: String,
        handle: u64,
    },
    NewElems {
        table: TableId,
        set: String,
        elems: Vec<SetElem>,
    },
    DelElems {
        table: TableId,
        set: String,
        elems: Vec<SetElem>,
    },
    /// End of a committed transaction.
    NewGen {
        id: u32,
        process: Option<String>,
    },
    /// A message of the subsystem this mirror does not need (objects, flowtables, ...).
    Ignored,
}

impl NftEvent {
    /// The table the event changes; None for a generation (commit) and
    /// for what is ignored.
    pub fn table(&self) -> Option<&TableId> {
        match self {
            NftEvent::NewTable(t) | NftEvent::DelTable(t) => Some(t),
            NftEvent::NewChain { table, .. }
            | NftEvent::DelChain { table, .. }
            | NftEvent::NewRule { table, .. }
            | NftEvent::DelRule { table, .. }
            | NftEvent::NewSet { table, .. }
            | NftEvent::DelSet { table, .. }
            | NftEvent::NewElems { table, .. }
            | NftEvent::DelElems { table, .. } => Some(table),
            NftEvent::NewGen { .. } | NftEvent::Ignored => None,
        }
    }
}

fn find<'a>(buf: &'a [u8], kind: u16) -> Result<Option<Attr<'a>>, NetlinkDecodeError> {
    for attr in attrs(buf) {
        let attr = attr?;
        if attr.kind == kind {
            return Ok(Some(attr));
        }
    }
    Ok(None)
}

fn required<'a>(
    buf: &'a [u8],
    kind: u16,
    what: &'static str,
) -> Result<Attr<'a>, NetlinkDecodeError> {
    find(buf, kind)?.ok_or(NetlinkDecodeError::Missing { what })
}

fn string(buf: &[u8], kind: u16, what: &'static str) -> Result<String, NetlinkDecodeError> {
    Ok(required(buf, kind, what)?.str(what)?.to_owned())
}

/// Decodes one nf_tables message (`kind` is the netlink type with the
/// subsystem in the high byte; `payload` starts with the nfgenmsg).
pub fn decode(kind: u16, payload: &[u8]) -> Result<NftEvent, NetlinkDecodeError> {
    if kind >> 8 != NFNL_SUBSYS_NFTABLES {
        return Ok(NftEvent::Ignored);
    }
    if payload.len() < NFGENMSG_LEN {
        return Err(NetlinkDecodeError::Truncated {
            what: "nfgenmsg",
            need: NFGENMSG_LEN,
            have: payload.len(),
        });
    }
    let family = payload[0];
    let body = &payload[NFGENMSG_LEN..];
    let table = |attr, what| -> Result<TableId, NetlinkDecodeError> {
        Ok(TableId {
            family,
            name: string(body, attr, what)?,
        })
    };
    Ok(match kind & 0xff {
        NFT_MSG_NEWTABLE => NftEvent::NewTable(table(NFTA_TABLE_NAME, "table name")?),
        NFT_MSG_DELTABLE => NftEvent::DelTable(table(NFTA_TABLE_NAME, "table name")?),
        NFT_MSG_NEWCHAIN => NftEvent::NewChain {
            table: table(NFTA_CHAIN_TABLE, "chain table")?,
            name: string(body, NFTA_CHAIN_NAME, "chain name")?,
            base: find(body, NFTA_CHAIN_HOOK)?.is_some(),
        },
        NFT_MSG_DELCHAIN => NftEvent::DelChain {
            table: table(NFTA_CHAIN_TABLE, "chain table")?,
            name: string(body, NFTA_CHAIN_NAME, "chain name")?,
        },
        NFT_MSG_NEWRULE | NFT_MSG_DELRULE => {
            rule(kind & 0xff, table(NFTA_RULE_TABLE, "rule table")?, body)?
        }
        NFT_MSG_NEWSET | NFT_MSG_DELSET => {
            set(kind & 0xff, table(NFTA_SET_TABLE, "set table")?, body)?
        }
        NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM => set_elements(
            kind & 0xff,
            table(NFTA_SET_ELEM_LIST_TABLE, "element table")?,
            body,
        )?,
        NFT_MSG_NEWGEN => NftEvent::NewGen {
            id: required(body, NFTA_GEN_ID, "generation id")?.be_u32("generation id")?,
            process: find(body, NFTA_GEN_PROC_NAME)?
                .map(|a| a.str("process name").map(str::to_owned))
                .transpose()?,
        },
        _ => NftEvent::Ignored,
    })
}

/// NEWRULE (with its expressions' summary) or DELRULE of `table`.
fn rule(msg: u16, table: TableId, body: &[u8]) -> Result<NftEvent, NetlinkDecodeError> {
    let chain = string(body, NFTA_RULE_CHAIN, "rule chain")?;
    let handle = required(body, NFTA_RULE_HANDLE, "rule handle")?.be_u64("rule handle")?;
    if msg == NFT_MSG_DELRULE {
        return Ok(NftEvent::DelRule {
            table,
            chain,
            handle,
        });
    }
    let summary = match find(body, NFTA_RULE_EXPRESSIONS)? {
        Some(exprs) => summarize(exprs)?,
        None => RuleSummary::default(),
    };
    Ok(NftEvent::NewRule {
        table,
        chain,
        handle,
        summary,
    })
}

/// NEWSET or DELSET of `table`.
fn set(msg: u16, table: TableId, body: &[u8]) -> Result<NftEvent, NetlinkDecodeError> {
    let name = string(body, NFTA_SET_NAME, "set name")?;
    let handle = required(body, NFTA_SET_HANDLE, "set handle")?.be_u64("set handle")?;
    Ok(if msg == NFT_MSG_NEWSET {
        NftEvent::NewSet {
            table,
            name,
            handle,
        }
    } else {
        NftEvent::DelSet {
            table,
            name,
            handle,
        }
    })
}

/// NEWSETELEM or DELSETELEM of a set of `table`.
fn set_elements(msg: u16, table: TableId, body: &[u8]) -> Result<NftEvent, NetlinkDecodeError> {
    let set = string(body, NFTA_SET_ELEM_LIST_SET, "element set")?;
    let elems = match find(body, NFTA_SET_ELEM_LIST_ELEMENTS)? {
        Some(list) => set_elems(list)?,
        None => Vec::new(),
    };
    Ok(if msg == NFT_MSG_NEWSETELEM {
        NftEvent::NewElems { table, set, elems }
    } else {
        NftEvent::DelElems { table, set, elems }
    })
}

fn set_elems(list: Attr<'_>) -> Result<Vec<SetElem>, NetlinkDecodeError> {
    let mut out = Vec::new();
    for elem in list.nested() {
        let elem = elem?;
        if elem.kind != NFTA_LIST_ELEM {
            continue;
        }
        let mut key = Vec::new();
        let mut chain = None;
        for attr in elem.nested() {
            let attr = attr?;
            match attr.kind {
                NFTA_SET_ELEM_KEY | NFTA_SET_ELEM_KEY_END => {
                    let value =
                        find(attr.value, NFTA_DATA_VALUE)?.ok_or(NetlinkDecodeError::Missing {
                            what: "element key",
                        })?;
                    key.extend_from_slice(value.value);
                }
                NFTA_SET_ELEM_DATA => chain = verdict_chain(attr.value)?,
                _ => {}
            }
        }
        out.push(SetElem { key, chain });
    }
    Ok(out)
}

/// The chain of a `jump`/`goto` verdict in an nft_data attribute, if any.
fn verdict_chain(data: &[u8]) -> Result<Option<String>, NetlinkDecodeError> {
    let Some(verdict) = find(data, NFTA_DATA_VERDICT)? else {
        return Ok(None);
    };
    let code =
        required(verdict.value, NFTA_VERDICT_CODE, "verdict code")?.be_u32("verdict code")? as i32;
    if code != NFT_JUMP && code != NFT_GOTO {
        return Ok(None);
    }
    Ok(Some(string(
        verdict.value,
        NFTA_VERDICT_CHAIN,
        "verdict chain",
    )?))
}

/// The register file of one rule, as bytes: NFT_REG_1..4 are 16-byte
/// registers that alias the 4-byte NFT_REG32_00..15.
struct Registers([u8; 64]);

impl Registers {
    fn offset(reg: u32) -> Option<usize> {
        match reg {
            1..=4 => Some((reg as usize - 1) * 16),
            8..=23 => Some((reg as usize - 8) * 4),
            _ => None,
        }
    }

    fn write(&mut self, reg: u32, value: &[u8]) {
        if let Some(off) = Self::offset(reg) {
            let end = (off + value.len()).min(self.0.len());
            self.0[off..end].copy_from_slice(&value[..end - off]);
        }
    }

    fn read<const N: usize>(&self, reg: u32) -> Option<[u8; N]> {
        let off = Self::offset(reg)?;
        self.0.get(off..off + N)?.try_into().ok()
    }
}

/// The destination of a `nat` expression when it is a DNAT whose address
/// (and port, if any) an earlier `immediate` loaded into its registers.
fn dnat_destination(
    data: &[u8],
    regs: &Registers,
) -> Result<Option<SocketAddr>, NetlinkDecodeError> {
    let kind = required(data, NFTA_NAT_TYPE, "nat type")?.be_u32("nat type")?;
    let family = required(data, NFTA_NAT_FAMILY, "nat family")?.be_u32("nat family")?;
    if kind != NFT_NAT_DNAT {
        return Ok(None);
    }
    let Some(addr_reg) = find(data, NFTA_NAT_REG_ADDR_MIN)? else {
        return Ok(None);
    };
    let addr_reg = addr_reg.be_u32("nat addr reg")?;
    let addr = match family {
        NFPROTO_IPV4 => regs
            .read::<4>(addr_reg)
            .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        NFPROTO_IPV6 => regs
            .read::<16>(addr_reg)
            .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        _ => None,
    };
    let Some(addr) = addr else {
        return Ok(None);
    };
    let port = match find(data, NFTA_NAT_REG_PROTO_MIN)? {
        Some(r) => regs
            .read::<2>(r.be_u32("nat proto reg")?)
            .map(u16::from_be_bytes),
        None => Some(0),
    };
    Ok(port.map(|port| SocketAddr::new(addr, port)))
}

fn summarize(exprs: Attr<'_>) -> Result<RuleSummary, NetlinkDecodeError> {
    let mut summary = RuleSummary::default();
    let mut regs = Registers([0; 64]);
    for expr in exprs.nested() {
        let expr = expr?;
        if expr.kind != NFTA_LIST_ELEM {
            continue;
        }
        let name =
            required(expr.value, NFTA_EXPR_NAME, "expression name")?.str("expression name")?;
        let data = find(expr.value, NFTA_EXPR_DATA)?.map_or(&[][..], |a| a.value);
        match name {
            "immediate" => {
                let dreg = required(data, NFTA_IMMEDIATE_DREG, "immediate dreg")?
                    .be_u32("immediate dreg")?;
                let value = required(data, NFTA_IMMEDIATE_DATA, "immediate data")?;
                if dreg == 0 {
                    if let Some(chain) = verdict_chain(value.value)? {
                        summary.jumps.push(chain);
                    }
                } else if let Some(v) = find(value.value, NFTA_DATA_VALUE)? {
                    regs.write(dreg, v.value);
                }
            }
            "lookup" => {
                let is_vmap = match find(data, NFTA_LOOKUP_DREG)? {
                    Some(dreg) => dreg.be_u32("lookup dreg")? == 0,
                    None => false,
                };
                if is_vmap {
                    summary
                        .verdict_maps
                        .push(string(data, NFTA_LOOKUP_SET, "lookup set")?);
                }
            }
            "nat" => {
                if let Some(dst) = dnat_destination(data, &regs)? {
                    summary.dnat.push(dst);
                }
            }
            "target" => {
                let target = required(data, NFTA_TARGET_NAME, "target name")?.str("target name")?;
                if target == "DNAT" {
                    let rev =
                        required(data, NFTA_TARGET_REV, "target rev")?.be_u32("target rev")?;
                    let info = required(data, NFTA_TARGET_INFO, "target info")?;
                    if let Some(dst) = xtables::dnat_destination(rev, info.value)? {
                        summary.dnat.push(SocketAddr::V4(dst));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::attr;
    use proptest::prelude::*;

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn expr(name: &str, data: Vec<u8>) -> Vec<u8> {
        attr(
            NFTA_LIST_ELEM,
            &[
                attr(NFTA_EXPR_NAME, &cstr(name)),
                attr(NFTA_EXPR_DATA, &data),
            ]
            .concat(),
        )
    }

    /// `meta l4proto tcp dnat to 10.180.0.1:80` as the kernel reports it.
    fn dnat_rule() -> Vec<u8> {
        let imm = |reg: u32, value: &[u8]| {
            [
                attr(NFTA_IMMEDIATE_DREG, &reg.to_be_bytes()),
                attr(NFTA_IMMEDIATE_DATA, &attr(NFTA_DATA_VALUE, value)),
            ]
            .concat()
        };
        let exprs = [
            expr("immediate", imm(1, &[10, 180, 0, 1])),
            expr("immediate", imm(2, &80u16.to_be_bytes())),
            expr(
                "nat",
                [
                    attr(NFTA_NAT_TYPE, &NFT_NAT_DNAT.to_be_bytes()),
                    attr(NFTA_NAT_FAMILY, &NFPROTO_IPV4.to_be_bytes()),
                    attr(NFTA_NAT_REG_ADDR_MIN, &1u32.to_be_bytes()),
                    attr(NFTA_NAT_REG_PROTO_MIN, &2u32.to_be_bytes()),
                ]
                .concat(),
            ),
            expr(
                "immediate",
                [
                    attr(NFTA_IMMEDIATE_DREG, &0u32.to_be_bytes()),
                    attr(
                        NFTA_IMMEDIATE_DATA,
                        &attr(
                            NFTA_DATA_VERDICT,
                            &[
                                attr(NFTA_VERDICT_CODE, &(NFT_JUMP as u32).to_be_bytes()),
                                attr(NFTA_VERDICT_CHAIN, &cstr("mark-for-masquerade")),
                            ]
                            .concat(),
                        ),
                    ),
                ]
                .concat(),
            ),
        ]
        .concat();
        [
            vec![2, 0, 0, 0],
            attr(NFTA_RULE_TABLE, &cstr("kube-proxy")),
            attr(NFTA_RULE_CHAIN, &cstr("endpoint-x")),
            attr(NFTA_RULE_HANDLE, &7u64.to_be_bytes()),
            attr(NFTA_RULE_EXPRESSIONS, &exprs),
        ]
        .concat()
    }

    #[test]
    fn decodes_a_dnat_rule() {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
        let NftEvent::NewRule {
            table,
            chain,
            handle,
            summary,
        } = decode(kind, &dnat_rule()).unwrap()
        else {
            panic!("not a rule");
        };
        assert_eq!(table.name, "kube-proxy");
        assert_eq!(chain, "endpoint-x");
        assert_eq!(handle, 7);
        assert_eq!(
            summary.dnat,
            vec![SocketAddr::from((Ipv4Addr::new(10, 180, 0, 1), 80))]
        );
        assert_eq!(summary.jumps, vec!["mark-for-masquerade".to_owned()]);
    }

    #[test]
    fn missing_and_truncated_attributes_are_errors() {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
        assert!(matches!(
            decode(kind, &[2, 0]),
            Err(NetlinkDecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(kind, &[2, 0, 0, 0]),
            Err(NetlinkDecodeError::Missing { .. })
        ));
        let rule = dnat_rule();
        assert!(decode(kind, &rule[..rule.len() - 6]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(msg in 0u16..20, payload in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode((NFNL_SUBSYS_NFTABLES << 8) | msg, &payload);
        }

        #[test]
        fn corrupted_rules_never_panic(at in 0usize..400, byte in any::<u8>(), cut in 0usize..400) {
            let mut rule = dnat_rule();
            if at < rule.len() {
                rule[at] = byte;
            }
            rule.truncate(cut.max(4));
            let _ = decode((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE, &rule);
        }
    }
}
