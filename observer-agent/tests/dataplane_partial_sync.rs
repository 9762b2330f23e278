//! Root-only: a kube-proxy partial sync (nftables mode) that touches one
//! Service costs the mirror work in proportion to that Service, not to the
//! ruleset. The notifications nf_tables really sends for the lab's
//! kube-proxy syncs are replayed into a [`Mirror`], and its work counter
//! (events, rule edges, map elements and reachability steps) compared for
//! the same partial sync in a ruleset ten times larger.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use lab::{
    kubeproxy::{Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::root_or_skip,
    witness::nftables_listener,
};
use observer_agent::dataplane::{Mirror, NftEvent, decode_nft_message};

const ENDPOINTS: usize = 10;

fn service(i: usize) -> ServicePort {
    ServicePort {
        namespace: "ns1".into(),
        name: format!("svc-{i}"),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::new(172, 30, (i / 250) as u8, (i % 250) as u8 + 1),
        port: 80,
    }
}

fn backend(i: usize, j: usize) -> Backend {
    Backend {
        ip: Ipv4Addr::from(0x0ab4_0000 + (i * ENDPOINTS + j) as u32),
        port: 8080,
    }
}

/// Applies every notification queued on `sock` to `mirror`, committing at
/// each NEWGEN; returns the changes of the last commit.
fn replay(sock: &OwnedFd, mirror: &mut Mirror) -> Vec<(SocketAddr, bool)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut last = vec![];
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN),
            "notifications lost: {}",
            std::io::Error::last_os_error()
        );
        if n <= 0 {
            return last;
        }
        let mut data = &buf[..n as usize];
        while data.len() >= 16 {
            let len = u32::from_ne_bytes(data[..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
            let event = decode_nft_message(kind, &data[16..len]).expect("a valid notification");
            if matches!(event, NftEvent::NewGen { .. }) {
                last = mirror
                    .commit()
                    .into_iter()
                    .map(|c| (c.endpoint, c.added))
                    .collect();
            } else {
                mirror.apply(event);
            }
            data = &data[((len + 3) & !3).min(data.len())..];
        }
    }
}

/// `services` Services of ENDPOINTS endpoints, fully synced; then the
/// stale-chain deletion and the partial sync that removes one endpoint of
/// Service 7. Returns the mirror's work for that partial sync, and its
/// changes.
fn partial_sync_work(services: usize) -> (u64, Vec<(SocketAddr, bool)>) {
    let ns = NetNs::create("partial").unwrap();
    let sock = ns
        .run(|| nftables_listener(Some(256 << 20), Duration::from_millis(500)))
        .unwrap()
        .expect("nf_tables listener");
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    let mut state: Vec<(ServicePort, Vec<Backend>)> = (0..services)
        .map(|i| (service(i), (0..ENDPOINTS).map(|j| backend(i, j)).collect()))
        .collect();
    let mut mirror = Mirror::new();
    rules.sync(&state).unwrap();
    let initial = replay(&sock, &mut mirror);
    assert_eq!(
        initial.len(),
        services * ENDPOINTS,
        "every endpoint selected"
    );

    let gone = backend(7, 3);
    state[7].1.retain(|b| *b != gone);
    let changed = HashSet::from([&state[7].0]);
    let before = mirror.work();
    rules.partial_sync(&state, &changed).unwrap();
    let changes = replay(&sock, &mut mirror);
    let work = mirror.work() - before;
    rules.cleanup().unwrap();
    (work, changes)
}

#[test]
fn a_partial_sync_of_one_service_costs_work_in_proportion_to_that_service() {
    if !root_or_skip("a_partial_sync_of_one_service_costs_work_in_proportion_to_that_service") {
        return;
    }
    let (small, small_changes) = partial_sync_work(100);
    let (large, large_changes) = partial_sync_work(1000);
    let removed = vec![(SocketAddr::from((backend(7, 3).ip, 8080)), false)];
    assert_eq!(small_changes, removed);
    assert_eq!(large_changes, removed);
    // The ruleset is ten times larger; the work is the same up to the
    // handful of steps an element key or a map name can add.
    assert!(
        large <= small + small / 10,
        "partial sync work: {small} steps at 1000 endpoints, {large} at 10000"
    );
    // And it is a few dozen steps per endpoint of the Service, not of the
    // ruleset (1000 endpoints in the small one).
    assert!(
        small < 60 * ENDPOINTS as u64,
        "{small} steps for a Service of {ENDPOINTS} endpoints"
    );
}
