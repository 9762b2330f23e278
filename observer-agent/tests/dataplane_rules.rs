//! Root-only: kube-proxy-shaped rules in a network namespace, in each
//! kube-proxy mode, changed the way kube-proxy changes them; the dataplane
//! detectors must report exactly the removals and additions of the watched
//! endpoints, on time.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lab::{
    kubeproxy::{Applied, Backend, Mode, Rules, ServicePort},
    netns::NetNs,
    root::root_or_skip,
};
use observer_agent::{
    dataplane::{self, DataplaneWatch},
    observation::{Detector, Observation, RulesChange},
};
use tokio::sync::mpsc::{Receiver, channel};

fn service(name: &str, vip_last: u8) -> ServicePort {
    ServicePort {
        namespace: "ns1".into(),
        name: name.into(),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::new(172, 30, 0, vip_last),
        port: 80,
    }
}

fn backend(last: u8) -> Backend {
    Backend {
        ip: Ipv4Addr::new(10, 180, 0, last),
        port: 8080,
    }
}

fn addr(b: Backend) -> SocketAddr {
    SocketAddr::from((b.ip, b.port))
}

fn detector(mode: Mode) -> Detector {
    match mode {
        Mode::Nftables => Detector::Nftables,
        Mode::IptablesNft => Detector::IptablesNft,
        Mode::IptablesLegacy => Detector::IptablesLegacy,
    }
}

/// Everything observed within `window`.
async fn drain(rx: &mut Receiver<Observation>, window: Duration) -> Vec<Observation> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(obs)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.push(obs);
    }
    out
}

/// Waits for the next rules event (at most `limit`).
async fn next_change(rx: &mut Receiver<Observation>, limit: Duration) -> Observation {
    tokio::time::timeout(limit, rx.recv())
        .await
        .expect("no dataplane event in time")
        .expect("channel open")
}

/// The change must be timed inside the transaction, or at most `slack_ns`
/// after it finished.
fn assert_timely(change: &RulesChange, applied: Applied, slack_ns: u64) {
    assert!(
        change.time_unix_nano >= applied.started_unix_nano
            && change.time_unix_nano <= applied.finished_unix_nano + slack_ns,
        "change at {} outside [{}, {} + {slack_ns}] ({:?})",
        change.time_unix_nano,
        applied.started_unix_nano,
        applied.finished_unix_nano,
        change
    );
}

fn start(ns: &NetNs) -> (DataplaneWatch, Receiver<Observation>) {
    let (tx, rx) = channel(64);
    let watch = ns
        .run(move || dataplane::spawn(tx))
        .expect("enter netns")
        .expect("dataplane watch starts");
    (watch, rx)
}

async fn removal_addition_and_unrelated_changes(mode: Mode, slack_ns: u64) {
    let ns = NetNs::create("dp").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    let svc = service("web", 10);
    let other = service("other", 11);
    let (b1, b2, b3) = (backend(1), backend(2), backend(3));
    rules.sync(&[(svc.clone(), vec![b1, b2, b3])]).unwrap();

    let (watch, mut rx) = start(&ns);
    watch.watch(addr(b1));
    watch.watch(addr(b2));

    // A change that touches other services only is not a removal.
    rules
        .sync(&[
            (svc.clone(), vec![b1, b2, b3]),
            (other.clone(), vec![backend(9)]),
        ])
        .unwrap();
    let quiet = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(
        quiet.is_empty(),
        "{mode}: unrelated change reported: {quiet:?}"
    );

    // Endpoint 2 goes (kube-proxy unlinks its chain, deletes it later).
    let applied = rules
        .sync(&[
            (svc.clone(), vec![b1, b3]),
            (other.clone(), vec![backend(9)]),
        ])
        .unwrap();
    let Observation::RulesRemoved(change) = next_change(&mut rx, Duration::from_secs(3)).await
    else {
        panic!("{mode}: expected rules_removed");
    };
    assert_eq!(change.endpoint, addr(b2), "{mode}");
    assert_eq!(change.detector, detector(mode));
    assert_timely(&change, applied, slack_ns);
    let rest = drain(&mut rx, Duration::from_millis(200)).await;
    assert!(rest.is_empty(), "{mode}: extra events {rest:?}");

    // kube-proxy's later sync deletes the stale chain: nothing to report.
    std::thread::sleep(Duration::from_millis(1100));
    rules
        .sync(&[
            (svc.clone(), vec![b1, b3]),
            (other.clone(), vec![backend(9)]),
        ])
        .unwrap();
    let quiet = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(
        quiet.is_empty(),
        "{mode}: stale chain deletion reported: {quiet:?}"
    );

    // Endpoint 2 comes back.
    let applied = rules
        .sync(&[
            (svc.clone(), vec![b1, b2, b3]),
            (other.clone(), vec![backend(9)]),
        ])
        .unwrap();
    let Observation::RulesAdded(change) = next_change(&mut rx, Duration::from_secs(3)).await else {
        panic!("{mode}: expected rules_added");
    };
    assert_eq!(change.endpoint, addr(b2));
    assert_timely(&change, applied, slack_ns);

    // Everything goes at once (kube-proxy cleanup: table deletion / chain removal).
    rules.cleanup().unwrap();
    let mut removed: Vec<SocketAddr> = drain(&mut rx, Duration::from_millis(1500))
        .await
        .into_iter()
        .map(|o| match o {
            Observation::RulesRemoved(c) => c.endpoint,
            other => panic!("{mode}: unexpected {other:?}"),
        })
        .collect();
    removed.sort();
    assert_eq!(removed, vec![addr(b1), addr(b2)], "{mode}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_mode_removal_addition_unrelated_and_table_deletion() {
    if !root_or_skip("nftables_mode_removal_addition_unrelated_and_table_deletion") {
        return;
    }
    removal_addition_and_unrelated_changes(Mode::Nftables, 5_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_nft_mode_removal_addition_unrelated_and_cleanup() {
    if !root_or_skip("iptables_nft_mode_removal_addition_unrelated_and_cleanup") {
        return;
    }
    removal_addition_and_unrelated_changes(Mode::IptablesNft, 5_000_000).await;
}

/// Legacy bound: the change is timed at the xtables lock's release, so within
/// the transaction window plus the inotify wake-up (asserted: 20 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_legacy_mode_removal_addition_unrelated_and_cleanup() {
    if !root_or_skip("iptables_legacy_mode_removal_addition_unrelated_and_cleanup") {
        return;
    }
    removal_addition_and_unrelated_changes(Mode::IptablesLegacy, 20_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_flush_ruleset_is_a_removal() {
    if !root_or_skip("nft_flush_ruleset_is_a_removal") {
        return;
    }
    for mode in [Mode::Nftables, Mode::IptablesNft] {
        let ns = NetNs::create("dpflush").unwrap();
        let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
        rules
            .sync(&[(service("web", 20), vec![backend(5), backend(6)])])
            .unwrap();
        let (watch, mut rx) = start(&ns);
        watch.watch(addr(backend(5)));
        ns.sh("nft flush ruleset").unwrap();
        let Observation::RulesRemoved(change) = next_change(&mut rx, Duration::from_secs(3)).await
        else {
            panic!("{mode}: expected rules_removed");
        };
        assert_eq!(change.endpoint, addr(backend(5)));
        assert_eq!(change.detector, detector(mode));
    }
}

/// kube-proxy may act before the agent learns that the pod terminates: the
/// removal is reported, with its own time, when the endpoint gets watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_before_watch_is_reported_on_watch() {
    if !root_or_skip("removal_before_watch_is_reported_on_watch") {
        return;
    }
    let ns = NetNs::create("dpearly").unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), Mode::Nftables);
    let svc = service("web", 30);
    rules
        .sync(&[(svc.clone(), vec![backend(1), backend(2)])])
        .unwrap();
    let (watch, mut rx) = start(&ns);
    let applied = rules.sync(&[(svc.clone(), vec![backend(1)])]).unwrap();
    let quiet = drain(&mut rx, Duration::from_millis(200)).await;
    assert!(quiet.is_empty(), "unwatched endpoint reported: {quiet:?}");
    watch.watch(addr(backend(2)));
    let Observation::RulesRemoved(change) = next_change(&mut rx, Duration::from_secs(1)).await
    else {
        panic!("expected rules_removed");
    };
    assert_eq!(change.endpoint, addr(backend(2)));
    assert_timely(&change, applied, 5_000_000);
    // Still selected endpoints are not reported.
    watch.watch(addr(backend(1)));
    let quiet = drain(&mut rx, Duration::from_millis(200)).await;
    assert!(quiet.is_empty(), "{quiet:?}");
    // The agent only reads rules: no legacy xtables table appeared.
    let names = ns.sh("cat /proc/net/ip_tables_names").unwrap();
    assert!(
        names.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&names.stdout)
    );
}

/// kube-proxy's IPv6 table (`ip6 kube-proxy`) in the same layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_table_removal() {
    if !root_or_skip("ipv6_table_removal") {
        return;
    }
    let ns = NetNs::create("dpv6").unwrap();
    let t = "ip6 kube-proxy";
    let (ep1, ep2) = (
        "endpoint-AAAAAAAA-ns1/web/tcp/http__fd00..1/8080",
        "endpoint-BBBBBBBB-ns1/web/tcp/http__fd00..2/8080",
    );
    let svc = "service-CCCCCCCC-ns1/web/tcp/http";
    let setup = format!(
        "add table {t}\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain {t} services\n\
         add map {t} service-ips {{ type ipv6_addr . inet_proto . inet_service : verdict ; }}\n\
         add rule {t} nat-output jump services\n\
         add rule {t} services ip6 daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain {t} {svc}\n\
         add chain {t} {ep1}\n\
         add chain {t} {ep2}\n\
         add rule {t} {ep1} meta l4proto tcp dnat to [fd00::1]:8080\n\
         add rule {t} {ep2} meta l4proto tcp dnat to [fd00::2]:8080\n\
         add rule {t} {svc} numgen random mod 2 vmap {{ 0 : goto {ep1} , 1 : goto {ep2} }}\n\
         add element {t} service-ips {{ fd00:30::10 . tcp . 80 : goto {svc} }}\n"
    );
    let apply = |script: String| {
        let mut child = ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    };
    apply(setup);
    let (watch, mut rx) = start(&ns);
    let watched: SocketAddr = "[fd00::2]:8080".parse().unwrap();
    watch.watch(watched);
    apply(format!(
        "flush chain {t} {svc}\nadd rule {t} {svc} numgen random mod 1 vmap {{ 0 : goto {ep1} }}\n"
    ));
    let Observation::RulesRemoved(change) = next_change(&mut rx, Duration::from_secs(3)).await
    else {
        panic!("expected rules_removed");
    };
    assert_eq!(change.endpoint, watched);
    assert_eq!(change.detector, Detector::Nftables);
}
