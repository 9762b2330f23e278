//! Attributes source addresses to nodes: a node's own addresses and its pod
//! CIDRs (from the Node objects) identify where a connection came from.

use std::collections::{BTreeMap, HashMap};
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
    /// The address with the host bits cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

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

/// Node name -> addresses, indexed for lookups on every attributed
/// connection event: exact addresses in one hash map, pod CIDRs in one hash
/// map per prefix length (clusters use one or two lengths), so a lookup
/// costs a few hash probes however many nodes there are.
#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: BTreeMap<String, NodeInfo>,
    by_addr: HashMap<IpAddr, String>,
    /// (prefix length, is IPv6) -> masked network -> node
    by_cidr: BTreeMap<(u8, bool), HashMap<IpAddr, String>>,
}

impl NodeIndex {
    pub fn set(&mut self, name: String, info: NodeInfo) {
        self.remove(&name);
        for a in &info.addresses {
            self.by_addr.insert(*a, name.clone());
        }
        for c in &info.pod_cidrs {
            self.by_cidr
                .entry((c.len, c.addr.is_ipv6()))
                .or_default()
                .insert(c.network(), name.clone());
        }
        self.nodes.insert(name, info);
    }

    pub fn remove(&mut self, name: &str) {
        let Some(old) = self.nodes.remove(name) else {
            return;
        };
        for a in &old.addresses {
            if self.by_addr.get(a).is_some_and(|n| n == name) {
                self.by_addr.remove(a);
            }
        }
        for c in &old.pod_cidrs {
            let key = (c.len, c.addr.is_ipv6());
            if let Some(m) = self.by_cidr.get_mut(&key) {
                if m.get(&c.network()).is_some_and(|n| n == name) {
                    m.remove(&c.network());
                }
                if m.is_empty() {
                    self.by_cidr.remove(&key);
                }
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// The node whose own (not pod) address `ip` is.
    pub fn node_with_address(&self, ip: IpAddr) -> Option<&str> {
        self.by_addr.get(&ip).map(String::as_str)
    }

    /// The node a source address belongs to: exact node address first, then
    /// the longest matching pod CIDR.
    pub fn node_of(&self, ip: IpAddr) -> Option<&str> {
        if let Some(n) = self.by_addr.get(&ip) {
            return Some(n);
        }
        self.by_cidr
            .iter()
            .rev()
            .filter(|((_, v6), _)| *v6 == ip.is_ipv6())
            .find_map(|((len, _), nets)| {
                let net = Cidr {
                    addr: ip,
                    len: *len,
                }
                .network();
                nets.get(&net).map(String::as_str)
            })
    }
}

/// False for an event of the pod's own sockets that an agent of another
/// node than the pod's reported: it shares the pod's kernel (the lab runs
/// every node on one), and the pod's node reports the same event.
pub fn from_pod_kernel(
    obs: &observer_proto::Observation,
    node: &str,
    host_node: Option<&str>,
) -> bool {
    !obs.at_endpoint() || host_node.is_none_or(|h| h == node)
}

/// False for an event of a socket on the other side of the endpoint
/// (`Connected`, `ResetReceived`) whose address belongs to another node
/// than the reporting agent's: that agent shares the socket's kernel (the
/// lab runs every node on one), and the socket's own node reports it. In a
/// cluster a socket's address is its own node's, or known to no node (pod
/// addresses outside every pod CIDR), and the event is kept.
pub fn from_own_socket(obs: &observer_proto::Observation, node: &str, nodes: &NodeIndex) -> bool {
    use observer_proto::Observation::{Connected, ResetReceived};
    match obs {
        Connected(c) | ResetReceived(c) => nodes.node_of(c.src.ip()).is_none_or(|n| n == node),
        _ => true,
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
        // Updating a node replaces its old addresses.
        idx.set(
            "a".into(),
            NodeInfo {
                addresses: vec!["192.168.0.99".parse().unwrap()],
                pod_cidrs: vec![],
            },
        );
        assert_eq!(idx.node_of("192.168.0.10".parse().unwrap()), None);
        assert_eq!(idx.node_of("10.244.2.7".parse().unwrap()), None);
        assert_eq!(idx.node_of("192.168.0.99".parse().unwrap()), Some("a"));
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

    #[test]
    fn a_socket_event_belongs_to_the_node_of_its_address_or_to_whoever_reports_it() {
        use observer_proto::{ConnEvent, Observation, UnixNanos};
        let mut idx = NodeIndex::default();
        for (name, cidr) in [("a", "10.0.0.0/24"), ("b", "10.1.0.0/24")] {
            idx.set(
                name.into(),
                NodeInfo {
                    addresses: vec![],
                    pod_cidrs: vec![cidr.parse().unwrap()],
                },
            );
        }
        let from = |src: &str| ConnEvent {
            src: format!("{src}:40000").parse().unwrap(),
            dst: "10.0.0.5:8080".parse().unwrap(),
            time: UnixNanos::from_nanos(1),
            close: None,
            reason: None,
        };
        let connected = |src| Observation::Connected(from(src));
        assert!(from_own_socket(&connected("10.1.0.9"), "b", &idx));
        assert!(!from_own_socket(&connected("10.1.0.9"), "a", &idx));
        assert!(
            from_own_socket(&connected("172.16.0.9"), "a", &idx),
            "an address no node claims"
        );
        assert!(
            from_own_socket(&Observation::Accepted(from("10.1.0.9")), "a", &idx),
            "the pod's side"
        );
        assert!(!from_own_socket(
            &Observation::ResetReceived(from("10.1.0.9")),
            "a",
            &idx
        ));
    }
}
