//! Root-only: the Cilium detector's whole-map reads (the first read, and
//! the re-reads after a lost write or at each poll) on maps with Cilium's
//! layout in a bpffs of the test's own, larger than one
//! `BPF_MAP_LOOKUP_BATCH`, return every entry once.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
};

use lab::{
    cilium::{Bpffs, ServiceMapsWriter},
    root::root_or_skip,
};
use observer_agent::dataplane::cilium::maps::{CiliumMaps, ServiceMaps};
use observer_common::cilium::{Backend, BackendState, Family};

/// More than two batches of the reader's 1024.
const BACKENDS: u32 = 2_500;

fn address(id: u32) -> SocketAddr {
    let [_, _, hi, lo] = id.to_be_bytes();
    SocketAddr::from((Ipv4Addr::new(10, 9, hi, lo), 8080))
}

#[test]
fn a_read_of_a_map_larger_than_a_batch_returns_every_entry_once() {
    if !root_or_skip("a_read_of_a_map_larger_than_a_batch_returns_every_entry_once") {
        return;
    }
    let fs = Bpffs::mount("mapreads").expect("bpffs mounts");
    let mut writer = ServiceMapsWriter::create(fs.path(), Family::V4).expect("maps created");
    for id in 1..=BACKENDS {
        writer
            .upsert_backend(id, &Backend::tcp(address(id), BackendState::Active))
            .expect("backend written");
    }
    let maps = CiliumMaps::open(fs.path()).expect("maps open read-only");
    let read = maps.backends(Family::V4).expect("backends read");
    assert_eq!(read.undecoded, 0, "{:?}", read.first_error);
    assert_eq!(read.entries.len(), BACKENDS as usize, "entries read");
    let ids: HashSet<u32> = read.entries.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), BACKENDS as usize, "an entry came twice");
    for (id, backend) in &read.entries {
        assert_eq!(
            SocketAddr::from((backend.ip, backend.port)),
            address(*id),
            "backend {id}"
        );
    }
    let services = maps.services(Family::V4).expect("services read");
    assert!(services.entries.is_empty(), "no frontend was written");
}
