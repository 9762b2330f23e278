//! Root-only: nf_tables notifications that overflow the detector's socket
//! (ENOBUFS) are not lost in silence. The detector re-reads the rulesets and
//! reports the change it missed, counts the overflow, and doubles its
//! receive buffer so that the next burst of that size (kube-proxy's next
//! full sync) fits.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lab::{
    kubeproxy::{Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::root_or_skip,
};
use observer_agent::dataplane::{self, RecvBuffer};
use observer_proto::Observation;
use tokio::sync::mpsc::channel;

/// Full syncs at most until one fits: 16 KiB doubled eleven times is 32 MiB.
const ROUNDS: usize = 14;
const SERVICES: u16 = 300;
const ENDPOINTS: u16 = 10;

fn services(with_watched: bool) -> Vec<(ServicePort, Vec<Backend>)> {
    (0..SERVICES)
        .map(|s| {
            let port = ServicePort {
                namespace: "ns1".into(),
                name: format!("svc{s}"),
                port_name: "http".into(),
                cluster_ip: Ipv4Addr::new(172, 30, (s >> 8) as u8, s as u8),
                port: 80,
            };
            let backends = (0..ENDPOINTS)
                .filter(|e| with_watched || s != 0 || *e != 0)
                .map(|e| Backend {
                    ip: Ipv4Addr::new(10, 180, (s >> 4) as u8, ((s & 15) << 4) as u8 + e as u8 + 1),
                    port: 8080,
                })
                .collect();
            (port, backends)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_full_syncs_are_re_read_and_the_buffer_grows_until_one_fits() {
    if !root_or_skip("overflowing_full_syncs_are_re_read_and_the_buffer_grows_until_one_fits") {
        return;
    }
    let watched = SocketAddr::from((Ipv4Addr::new(10, 180, 0, 1), 8080));
    let ns = NetNs::create("dpovf").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    rules.sync(&services(true)).unwrap();
    let (tx, mut rx) = channel(64);
    let buffer = RecvBuffer {
        initial: 16 << 10,
        max: 64 << 20,
    };
    let watch = ns
        .run(move || dataplane::spawn_with(tx, buffer))
        .expect("enter netns")
        .expect("dataplane watch starts");
    watch.watch(watched);

    let mut sizes = vec![watch.recv_buffer_bytes().expect("socket open")];
    let mut overflowed = Vec::new();
    for round in 0..ROUNDS {
        // Each full sync rewrites every chain: thousands of notifications
        // in one commit. The watched endpoint goes and comes back in turn.
        let removed = round % 2 == 0;
        let before = watch.overflows();
        rules.sync(&services(!removed)).unwrap();
        let change = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the change was not reported"))
            .expect("channel open");
        match (&change, removed) {
            (Observation::RulesRemoved(c), true) | (Observation::RulesAdded(c), false) => {
                assert_eq!(c.endpoint, watched, "round {round}");
            }
            _ => panic!(
                "round {round}: expected the watched endpoint's {} got {change:?}",
                if removed { "removal" } else { "addition" }
            ),
        }
        // A re-read after a second overflow in the same commit repeats
        // nothing.
        if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            panic!("round {round}: extra change {extra:?}");
        }
        overflowed.push(watch.overflows() > before);
        sizes.push(watch.recv_buffer_bytes().expect("socket open"));
        eprintln!(
            "round {round}: overflowed {}, buffer {} KiB",
            overflowed[round],
            sizes[round + 1] >> 10
        );
        if !overflowed[round] {
            break;
        }
    }
    rules.cleanup().unwrap();
    assert!(
        overflowed[0],
        "a 16 KiB buffer held a full sync of {} endpoints: the test proves nothing",
        SERVICES * ENDPOINTS
    );
    assert!(
        overflowed.last() == Some(&false),
        "still overflowing after {ROUNDS} full syncs; buffer sizes {sizes:?}"
    );
    for (i, grew) in overflowed.iter().enumerate() {
        assert_eq!(
            sizes[i + 1] > sizes[i],
            *grew,
            "round {i}: the buffer grows exactly after an overflow: {sizes:?}"
        );
    }
}
