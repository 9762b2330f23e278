//! Decoder of a legacy xtables table blob (`IPT_SO_GET_ENTRIES`): a
//! sequence of `struct ipt_entry`, each with its matches and one target.
//! User chains start with an `ERROR` target naming them; jumps are standard
//! targets whose verdict is the byte offset of the destination entry.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
};

use super::xtables;
use crate::netlink::NetlinkDecodeError;

/// sizeof(struct ipt_entry).
pub const IPT_ENTRY_LEN: usize = 112;
const TARGET_OFFSET_AT: usize = 88;
const NEXT_OFFSET_AT: usize = 90;
/// sizeof(struct xt_entry_target) header: size, name[29], revision.
const TARGET_HEADER_LEN: usize = 32;
pub const NF_INET_NUMHOOKS: usize = 5;

#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// Verdict >= 0 is a jump to that byte offset.
    Standard(i32),
    /// The head of a user chain (or the table's end marker).
    Error,
    Dnat(SocketAddrV4),
    Other,
}

#[derive(Debug)]
struct Entry {
    offset: u32,
    target: Target,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, NetlinkDecodeError> {
    b.get(at..at + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
        .ok_or(NetlinkDecodeError::Truncated {
            what: "ipt_entry",
            need: at + 2,
            have: b.len(),
        })
}

fn parse(blob: &[u8]) -> Result<Vec<Entry>, NetlinkDecodeError> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at < blob.len() {
        let entry = &blob[at..];
        let target_offset = u16_at(entry, TARGET_OFFSET_AT)? as usize;
        let next_offset = u16_at(entry, NEXT_OFFSET_AT)? as usize;
        if next_offset < IPT_ENTRY_LEN || next_offset > entry.len() {
            return Err(NetlinkDecodeError::BadLength {
                what: "ipt_entry next_offset",
                len: next_offset,
            });
        }
        if target_offset < IPT_ENTRY_LEN || target_offset + TARGET_HEADER_LEN > next_offset {
            return Err(NetlinkDecodeError::BadLength {
                what: "ipt_entry target_offset",
                len: target_offset,
            });
        }
        let target = &entry[target_offset..next_offset];
        let target_size = (u16_at(target, 0)? as usize).min(target.len());
        if target_size < TARGET_HEADER_LEN {
            return Err(NetlinkDecodeError::BadLength {
                what: "xt_entry_target",
                len: target_size,
            });
        }
        let name_bytes = &target[2..31];
        let name_end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let revision = target[31];
        let data = &target[TARGET_HEADER_LEN..target_size];
        let target = match &name_bytes[..name_end] {
            b"" => {
                let verdict: [u8; 4] = data.get(0..4).and_then(|d| d.try_into().ok()).ok_or(
                    NetlinkDecodeError::Truncated {
                        what: "standard target",
                        need: 4,
                        have: data.len(),
                    },
                )?;
                Target::Standard(i32::from_ne_bytes(verdict))
            }
            b"ERROR" => Target::Error,
            b"DNAT" => match xtables::dnat_destination(u32::from(revision), data)? {
                Some(dst) => Target::Dnat(dst),
                None => Target::Other,
            },
            _ => Target::Other,
        };
        entries.push(Entry {
            offset: at as u32,
            target,
        });
        at += next_offset;
    }
    Ok(entries)
}

/// DNAT destinations reachable from the table's hooks (`hook_entry`,
/// `underflow`: byte offsets from IPT_SO_GET_INFO, for hooks in `valid_hooks`).
pub fn reachable_dnat(
    blob: &[u8],
    valid_hooks: u32,
    hook_entry: &[u32; NF_INET_NUMHOOKS],
    underflow: &[u32; NF_INET_NUMHOOKS],
) -> Result<HashSet<SocketAddrV4>, NetlinkDecodeError> {
    let entries = parse(blob)?;
    let index: HashMap<u32, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.offset, i))
        .collect();
    let policies: HashSet<u32> = (0..NF_INET_NUMHOOKS)
        .filter(|h| valid_hooks & (1 << h) != 0)
        .map(|h| underflow[h])
        .collect();
    let mut stack: Vec<usize> = (0..NF_INET_NUMHOOKS)
        .filter(|h| valid_hooks & (1 << h) != 0)
        .filter_map(|h| index.get(&hook_entry[h]).copied())
        .collect();
    let mut seen = vec![false; entries.len()];
    let mut out = HashSet::new();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        let entry = &entries[i];
        match entry.target {
            Target::Dnat(dst) => {
                out.insert(dst);
            }
            Target::Standard(v) if v >= 0 => {
                if let Some(&j) = index.get(&(v as u32)) {
                    stack.push(j);
                }
            }
            _ => {}
        }
        // Evaluation falls through to the next rule of the same chain; a
        // chain ends at its policy (built-in) or before the next chain head.
        if policies.contains(&entry.offset) {
            continue;
        }
        if let Some(next) = entries.get(i + 1)
            && next.target != Target::Error
        {
            stack.push(i + 1);
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use proptest::prelude::*;

    fn entry(target_name: &str, revision: u8, data: &[u8]) -> Vec<u8> {
        let target_size = (TARGET_HEADER_LEN + data.len() + 7) & !7;
        let mut e = vec![0u8; IPT_ENTRY_LEN + target_size];
        e[TARGET_OFFSET_AT..TARGET_OFFSET_AT + 2]
            .copy_from_slice(&(IPT_ENTRY_LEN as u16).to_ne_bytes());
        let len = e.len() as u16;
        e[NEXT_OFFSET_AT..NEXT_OFFSET_AT + 2].copy_from_slice(&len.to_ne_bytes());
        let t = &mut e[IPT_ENTRY_LEN..];
        t[0..2].copy_from_slice(&(target_size as u16).to_ne_bytes());
        t[2..2 + target_name.len()].copy_from_slice(target_name.as_bytes());
        t[31] = revision;
        t[TARGET_HEADER_LEN..TARGET_HEADER_LEN + data.len()].copy_from_slice(data);
        e
    }

    fn standard(verdict: i32) -> Vec<u8> {
        entry("", 0, &verdict.to_ne_bytes())
    }

    fn dnat(addr: [u8; 4], port: u16) -> Vec<u8> {
        let mut info = vec![0u8; 40];
        info[0..4].copy_from_slice(&3u32.to_ne_bytes());
        info[4..8].copy_from_slice(&addr);
        info[36..38].copy_from_slice(&port.to_be_bytes());
        entry("DNAT", 1, &info)
    }

    fn error(name: &str) -> Vec<u8> {
        let mut data = [0u8; 32];
        data[..name.len()].copy_from_slice(name.as_bytes());
        entry("ERROR", 0, &data)
    }

    /// OUTPUT: jump SVC; ACCEPT policy. SVC: jump SEP1; jump SEP2 (if linked); RETURN.
    /// SEP1, SEP2: DNAT; RETURN.
    fn table(link_sep2: bool) -> (Vec<u8>, [u32; 5], [u32; 5]) {
        let sizes = |parts: &[Vec<u8>]| parts.iter().map(Vec::len).sum::<usize>() as u32;
        let accept = -2; // -NF_ACCEPT - 1
        let ret = -5;
        // Layout offsets are computed from fixed sizes.
        let out_jump_len = standard(0).len() as u32;
        let head = [standard(0), standard(accept)];
        let svc_at = sizes(&head);
        let svc_head = error("SVC");
        let svc_rules_at = svc_at + svc_head.len() as u32;
        let svc_len = out_jump_len * 3;
        let sep1_at = svc_rules_at + svc_len;
        let sep1 = [error("SEP1"), dnat([10, 0, 0, 1], 80), standard(ret)];
        let sep2_at = sep1_at + sizes(&sep1);
        let sep1_rules_at = sep1_at + sep1[0].len() as u32;
        let sep2_rules_at = sep2_at + error("SEP2").len() as u32;
        let mut blob = Vec::new();
        blob.extend(standard(svc_rules_at as i32));
        blob.extend(standard(accept));
        blob.extend(svc_head);
        blob.extend(standard(sep1_rules_at as i32));
        blob.extend(if link_sep2 {
            standard(sep2_rules_at as i32)
        } else {
            standard(ret)
        });
        blob.extend(standard(ret));
        for part in sep1 {
            blob.extend(part);
        }
        blob.extend(error("SEP2"));
        blob.extend(dnat([10, 0, 0, 2], 80));
        blob.extend(standard(ret));
        blob.extend(error("ERROR"));
        let hooks = [0, 0, 0, 0, 0];
        let under = [0, 0, 0, out_jump_len, 0];
        (blob, hooks, under)
    }

    #[test]
    fn reachability_follows_jumps_and_ignores_unlinked_chains() {
        let ep = |last| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80);
        let (blob, hooks, under) = table(true);
        assert_eq!(
            reachable_dnat(&blob, 1 << 3, &hooks, &under).unwrap(),
            HashSet::from([ep(1), ep(2)])
        );
        let (blob, hooks, under) = table(false);
        assert_eq!(
            reachable_dnat(&blob, 1 << 3, &hooks, &under).unwrap(),
            HashSet::from([ep(1)])
        );
    }

    #[test]
    fn truncated_blob_is_an_error() {
        let (blob, hooks, under) = table(true);
        assert!(reachable_dnat(&blob[..blob.len() - 10], 1 << 3, &hooks, &under).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(blob in proptest::collection::vec(any::<u8>(), 0..600), hook in 0u32..600) {
            let _ = reachable_dnat(&blob, 0x1f, &[hook; 5], &[hook; 5]);
        }
    }
}
