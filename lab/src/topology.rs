//! The lab's network: nodes on an underlay switch, pods behind their node.
//!
//! ```text
//!             switch namespace: bridge br0 (10.100.0.0/24)
//!        /              |               \                \
//!   node-0 eth0      node-1 eth0     node-2 eth0      control-plane eth0
//!   10.100.0.1       10.100.0.2      10.100.0.3       10.100.0.254
//!   cbr0 10.244.0.1  cbr0 10.244.1.1 ...
//!     |  pods 10.244.0.2..             (aggregator, API double)
//! ```
//!
//! Every node routes the other nodes' pod CIDRs through their underlay
//! address and forwards packets, as a kubenet-style cluster does. Node
//! default routes point at the control plane, which does not forward, so a
//! Service VIP without rules goes nowhere instead of leaving the lab. All
//! addresses exist only inside the lab's namespaces; the host namespace is
//! never touched.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use thiserror::Error;

use crate::netns::{self, NetNs, NetnsError};

/// The control plane's address on the underlay.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 254);
const UNDERLAY_PREFIX: u8 = 24;
const POD_PREFIX: u8 = 24;
/// Nodes take 10.100.0.1 ..= 10.100.0.MAX_NODES on the underlay.
pub const MAX_NODES: usize = 200;
/// Pods per node: 10.244.N.2 ..= 10.244.N.254.
const MAX_PODS_PER_NODE: u32 = 253;

#[derive(Debug, Error)]
pub enum TopologyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{0} nodes requested; the lab supports 1..={MAX_NODES}")]
    NodeCount(usize),
    #[error("node {0} has no free pod address left")]
    PodCidrFull(String),
    #[error("no node with index {0}")]
    NoSuchNode(usize),
}

/// One node: a namespace with an underlay address, a pod bridge and its own
/// netfilter and conntrack.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub index: usize,
    pub ns: NetNs,
    /// Underlay (InternalIP) address.
    pub ip: Ipv4Addr,
    /// Network address of the pod CIDR (/24); the node itself is `.1`.
    pub pod_cidr: Ipv4Addr,
    next_pod: AtomicU32,
}

impl Node {
    /// Node `index`: its namespace on the switch, the pods' bridge with its
    /// gateway address, a default route to the control plane, forwarding.
    fn create(index: usize, switch: &NetNs) -> Result<Self, TopologyError> {
        let ns = NetNs::create(&format!("n{index}"))?;
        let ip = node_ip(index);
        attach_to_switch(switch, &format!("n{index}"), &ns, ip)?;
        let node = Node {
            name: format!("node-{index}"),
            index,
            ns,
            ip,
            pod_cidr: pod_cidr(index),
            next_pod: AtomicU32::new(2),
        };
        // A fixed address: a bridge otherwise takes the lowest address
        // of its ports and changes it when that pod's veth goes, and
        // the other pods' cached gateway address then goes nowhere.
        node.ns.ip(&[
            "link",
            "add",
            "cbr0",
            "address",
            &format!("02:00:0a:f4:{:02x}:01", index),
            "type",
            "bridge",
        ])?;
        node.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{POD_PREFIX}", node.gateway()),
            "dev",
            "cbr0",
        ])?;
        node.ns.ip(&["link", "set", "cbr0", "up"])?;
        node.ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &CONTROL_PLANE_IP.to_string(),
        ])?;
        node.ns.sh("echo 1 > /proc/sys/net/ipv4/ip_forward")?;
        Ok(node)
    }

    pub fn pod_cidr_string(&self) -> String {
        format!("{}/{POD_PREFIX}", self.pod_cidr)
    }

    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.pod_cidr.octets();
        Ipv4Addr::new(a, b, c, 1)
    }
}

/// A pod's network namespace, attached to its node's bridge.
#[derive(Debug)]
pub struct PodNet {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub node: usize,
}

/// The whole lab network. Dropping it removes every namespace (and with
/// them the links and every process still running inside).
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: nodes before the switch they hang off.
    pub nodes: Vec<Node>,
    pub control_plane: NetNs,
    switch: NetNs,
}

/// Creates a veth pair with one end in each namespace, renamed there to
/// `a_name` and `b_name` (both ends are left down and unaddressed).
fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Result<(), NetnsError> {
    let (ta, tb) = netns::veth_pair(a, b)?;
    a.ip(&["link", "set", &ta, "name", a_name])?;
    b.ip(&["link", "set", &tb, "name", b_name])?;
    Ok(())
}

fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, index as u8 + 1)
}

fn pod_cidr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index as u8, 0)
}

impl Cluster {
    /// Creates `nodes` nodes named `node-0`.. on a fresh underlay.
    pub fn create(nodes: usize) -> Result<Self, TopologyError> {
        if nodes == 0 || nodes > MAX_NODES {
            return Err(TopologyError::NodeCount(nodes));
        }
        let switch = NetNs::create("switch")?;
        switch.ip(&[
            "link",
            "add",
            "br0",
            "address",
            "02:00:0a:64:00:fe",
            "type",
            "bridge",
        ])?;
        switch.ip(&["link", "set", "br0", "up"])?;

        let control_plane = NetNs::create("cp")?;
        attach_to_switch(&switch, "cp", &control_plane, CONTROL_PLANE_IP)?;

        let mut cluster = Cluster {
            nodes: Vec::with_capacity(nodes),
            control_plane,
            switch,
        };
        for index in 0..nodes {
            let node = Node::create(index, &cluster.switch)?;
            cluster.nodes.push(node);
        }
        cluster.route_pods()?;
        Ok(cluster)
    }

    /// Every node reaches every other node's pods through that node, and
    /// the control plane reaches all pods for completeness of the mesh.
    fn route_pods(&self) -> Result<(), TopologyError> {
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                node.ns.ip(&[
                    "route",
                    "add",
                    &other.pod_cidr_string(),
                    "via",
                    &other.ip.to_string(),
                ])?;
            }
        }
        Ok(self.route_to_pods(&self.control_plane)?)
    }

    /// `ns`, on the underlay, reaches every node's pods through that node.
    fn route_to_pods(&self, ns: &NetNs) -> Result<(), NetnsError> {
        for node in &self.nodes {
            ns.ip(&[
                "route",
                "add",
                &node.pod_cidr_string(),
                "via",
                &node.ip.to_string(),
            ])?;
        }
        Ok(())
    }

    pub fn node(&self, index: usize) -> Result<&Node, TopologyError> {
        self.nodes
            .get(index)
            .ok_or(TopologyError::NoSuchNode(index))
    }

    /// Creates a pod namespace on node `index` with the node's next free
    /// address and a default route through the node.
    pub fn add_pod(&self, index: usize, role: &str) -> Result<PodNet, TopologyError> {
        let node = self.node(index)?;
        let host = node.next_pod.fetch_add(1, Ordering::Relaxed);
        if host > MAX_PODS_PER_NODE + 1 {
            return Err(TopologyError::PodCidrFull(node.name.clone()));
        }
        let [a, b, c, _] = node.pod_cidr.octets();
        let ip = Ipv4Addr::new(a, b, c, host as u8);
        let ns = NetNs::create(role)?;
        let node_side = format!("veth{host}");
        veth(&ns, "eth0", &node.ns, &node_side)?;
        node.ns
            .ip(&["link", "set", &node_side, "master", "cbr0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/{POD_PREFIX}"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &node.gateway().to_string(),
        ])?;
        Ok(PodNet {
            ns,
            ip,
            node: index,
        })
    }
}

impl Cluster {
    /// A host on the underlay that is no node (no proxy, no agent, no pod
    /// CIDR): a load balancer outside the cluster sending to pod IPs, which
    /// it reaches through each pod's node as a VPC routes them.
    pub fn add_outside(&self, role: &str, ip: Ipv4Addr) -> Result<NetNs, TopologyError> {
        let ns = NetNs::create(role)?;
        attach_to_switch(&self.switch, role, &ns, ip)?;
        self.route_to_pods(&ns)?;
        Ok(ns)
    }
}

/// Plugs `ns` into the switch as `eth0` with `ip` on the underlay.
fn attach_to_switch(
    switch: &NetNs,
    port: &str,
    ns: &NetNs,
    ip: Ipv4Addr,
) -> Result<(), NetnsError> {
    veth(ns, "eth0", switch, port)?;
    switch.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{ip}/{UNDERLAY_PREFIX}"),
        "dev",
        "eth0",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}
