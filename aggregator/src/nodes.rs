//! Attributes source addresses to nodes: a node's own addresses and its pod
//! CIDRs (from the Node objects) identify where a connection came from.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix such as `10.244.1.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: no prefix length"))?;
        let addr: IpAddr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Self { addr, len })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<Cidr>,
}

/// Node name -> addresses. Small (one entry per node) and read on every
/// attributed connection event; a linear scan of CIDRs is fine at thousands
/// of nodes because only connection events of watched endpoints get here.
#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: BTreeMap<String, NodeInfo>,
}

impl NodeIndex {
    pub fn set(&mut self, name: String, info: NodeInfo) {
        self.nodes.insert(name, info);
    }

    pub fn remove(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// The node a source address belongs to: exact node address first, then
    /// the longest matching pod CIDR.
    pub fn node_of(&self, ip: IpAddr) -> Option<&str> {
        if let Some((name, _)) = self.nodes.iter().find(|(_, n)| n.addresses.contains(&ip)) {
            return Some(name);
        }
        self.nodes
            .iter()
            .flat_map(|(name, n)| n.pod_cidrs.iter().map(move |c| (name, c)))
            .filter(|(_, c)| c.contains(ip))
            .max_by_key(|(_, c)| c.len)
            .map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_by_address_then_longest_cidr() {
        let mut idx = NodeIndex::default();
        idx.set(
            "a".into(),
            NodeInfo {
                addresses: vec!["192.168.0.10".parse().unwrap()],
                pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            },
        );
        idx.set(
            "b".into(),
            NodeInfo {
                addresses: vec!["192.168.0.11".parse().unwrap()],
                pod_cidrs: vec![
                    "10.244.1.0/24".parse().unwrap(),
                    "fd00:1::/64".parse().unwrap(),
                ],
            },
        );
        assert_eq!(idx.node_of("192.168.0.10".parse().unwrap()), Some("a"));
        assert_eq!(idx.node_of("10.244.1.7".parse().unwrap()), Some("b"));
        assert_eq!(idx.node_of("10.244.2.7".parse().unwrap()), Some("a"));
        assert_eq!(idx.node_of("fd00:1::5".parse().unwrap()), Some("b"));
        assert_eq!(idx.node_of("8.8.8.8".parse().unwrap()), None);
        idx.remove("b");
        assert_eq!(idx.node_of("10.244.1.7".parse().unwrap()), Some("a"));
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
    }
}
