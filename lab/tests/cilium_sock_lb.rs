//! The `cilium` node's datapath: connect() in the node's namespace follows
//! the lab's Cilium-layout maps as Cilium's socket-LB does, and nothing
//! outside that namespace (or after the program is dropped) is touched.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use lab::{
    cilium::{Bpffs, ServiceMapsWriter, SockLb},
    netns::NetNs,
};
use observer_common::cilium::{Backend, BackendState, Family, Frontend, Scope};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;
const CONNECTS: usize = 60;

fn backend_addr(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([127, 0, 0, last]), PORT)
}

fn backend(last: u8) -> Backend {
    let addr = backend_addr(last);
    Backend {
        ip: addr.ip(),
        port: addr.port(),
        proto: 6,
        state: BackendState::Active,
        cluster_id: 0,
        zone: 0,
    }
}

fn frontend() -> Frontend {
    Frontend {
        ip: IpAddr::V4(VIP),
        port: 80,
        proto: 6,
        scope: Scope::External,
    }
}

/// Where `CONNECTS` connections to the VIP made in `ns` ended up, by
/// backend address (the socket's peer: the rewritten destination), or
/// the first error.
fn connect_many(ns: &NetNs) -> io::Result<BTreeMap<SocketAddr, usize>> {
    ns.run(|| {
        let mut reached = BTreeMap::new();
        for _ in 0..CONNECTS {
            let stream = TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(VIP), 80),
                Duration::from_secs(2),
            )?;
            *reached.entry(stream.peer_addr()?).or_insert(0) += 1;
        }
        Ok(reached)
    })?
}

#[test]
fn connect_follows_the_maps_in_the_node_namespace_only() {
    if !lab::root::root_or_skip("connect_follows_the_maps_in_the_node_namespace_only") {
        return;
    }
    let node = NetNs::create("sock-lb-node").expect("node namespace");
    let other = NetNs::create("sock-lb-other").expect("other namespace");
    // Two backends on loopback addresses of each namespace; the listen
    // backlog holds the accepted-nowhere connections of the test.
    let listeners: Vec<TcpListener> = [&node, &other]
        .into_iter()
        .flat_map(|ns| {
            ns.run(|| [2, 3].map(|last| TcpListener::bind(backend_addr(last)).expect("listener")))
                .expect("enter namespace")
        })
        .collect();
    let bpffs = Bpffs::mount("sock-lb").expect("bpffs");
    let mut writer = ServiceMapsWriter::create(bpffs.path(), Family::V4).expect("maps");
    writer.upsert_backend(1, &backend(2)).expect("backend 1");
    writer.upsert_backend(2, &backend(3)).expect("backend 2");
    writer
        .write_frontend(frontend(), 1, &[1, 2], &[])
        .expect("frontend");

    let sock_lb = SockLb::attach(bpffs.path(), &node.path()).expect("attach connect4");
    let both = connect_many(&node).expect("connects in the node");
    assert_eq!(
        both.keys().copied().collect::<Vec<_>>(),
        vec![backend_addr(2), backend_addr(3)],
        "random slot picks reach both backends: {both:?}"
    );

    // Backend 2 moves to the tail (terminating), the master is rewritten.
    writer
        .write_frontend(frontend(), 1, &[1], &[2])
        .expect("move to the tail");
    let one = connect_many(&node).expect("connects in the node");
    assert_eq!(one, BTreeMap::from([(backend_addr(2), CONNECTS)]));

    // Without an active backend the frontend refuses, as Cilium's does.
    writer
        .write_frontend(frontend(), 1, &[], &[1, 2])
        .expect("no active backend");
    let refused = connect_many(&node).expect_err("no backend to pick");
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");

    // Another namespace is not routed by the maps: the VIP has no route.
    writer
        .write_frontend(frontend(), 1, &[1, 2], &[])
        .expect("both active again");
    let elsewhere = connect_many(&other).expect_err("the VIP is not routed elsewhere");
    assert_eq!(
        elsewhere.kind(),
        io::ErrorKind::NetworkUnreachable,
        "{elsewhere}"
    );

    // Dropping the program detaches it.
    drop(sock_lb);
    let detached = connect_many(&node).expect_err("the VIP is not routed once detached");
    assert_eq!(
        detached.kind(),
        io::ErrorKind::NetworkUnreachable,
        "{detached}"
    );
    drop(listeners);
}
