//! The lab network and dataplane without the observer: routing between
//! nodes and pods, a Service VIP programmed by delayed kube-proxy
//! controllers in every mode, clients. (A third-party load generator
//! against a whole lab: tests/rollout.rs and tests/cli.rs.)

use observer_proto::UnixNanos;
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use lab::{
    client::{Client, ClientConfig, ClientKind},
    delay::DelayDistribution,
    kubeproxy::{Mode, ServicePort},
    proxy::{Endpoint, Proxy, ProxyConfig, Services},
    server::ShutdownMode,
    topology::{Cluster, PodNet},
    workload::PodProcess,
};
use tokio::sync::watch;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_PORT: u16 = 8080;

fn server_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab-pod-server"))
}

fn service() -> ServicePort {
    ServicePort {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "http".into(),
        cluster_ip: VIP,
        port: 80,
    }
}

fn endpoint(name: &str, pod: &PodNet, ready: bool) -> Endpoint {
    Endpoint {
        pod: name.into(),
        ip: pod.ip,
        port: POD_PORT,
        ready,
        serving: ready,
        terminating: !ready,
    }
}

async fn start_pod(cluster: &Cluster, node: usize, name: &str) -> (PodNet, PodProcess) {
    let net = cluster.add_pod(node, name).expect("pod namespace");
    let process = PodProcess::start(
        server_bin(),
        &net.ns,
        name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, POD_PORT),
        ShutdownMode::Graceful,
        Default::default(),
    )
    .await
    .expect("pod server");
    (net, process)
}

fn client(
    cluster: &Cluster,
    node: usize,
    target: SocketAddrV4,
    kind: ClientKind,
    secs: u64,
) -> Client {
    Client::start(
        Some(cluster.nodes[node].ns.path()),
        ClientConfig {
            target: target.into(),
            kind,
            rate: 100.0,
            duration: Duration::from_secs(secs),
            concurrency: 4,
            timeout: Duration::from_secs(2),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_every_node_reach_each_other_through_the_underlay() {
    if !lab::root::root_or_skip("pods_on_every_node_reach_each_other_through_the_underlay") {
        return;
    }
    let cluster = Cluster::create(3).expect("cluster");
    let (a, _pa) = start_pod(&cluster, 0, "a").await;
    let (b, _pb) = start_pod(&cluster, 2, "b").await;
    assert_ne!(a.ip, b.ip);
    for (from, to, name) in [(1, &a, "a"), (0, &b, "b"), (2, &a, "a")] {
        let report = client(
            &cluster,
            from,
            SocketAddrV4::new(to.ip, POD_PORT),
            ClientKind::NewConnection,
            1,
        )
        .wait()
        .unwrap();
        assert!(report.requests >= 50, "{report:?}");
        assert_eq!(
            report.failed_total(),
            0,
            "node-{from} -> {name}: {report:?}"
        );
        assert_eq!(report.backends.keys().collect::<Vec<_>>(), [name]);
    }
    // Pod to pod across nodes, from inside the pod namespace.
    let config = ClientConfig {
        target: SocketAddrV4::new(b.ip, POD_PORT).into(),
        kind: ClientKind::KeepAlive,
        rate: 50.0,
        duration: Duration::from_millis(500),
        concurrency: 1,
        timeout: Duration::from_secs(2),
    };
    let report = Client::start(Some(a.ns.path()), config).wait().unwrap();
    assert!(
        report.ok > 10 && report.failed_total() == 0,
        "pod a -> pod b: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_follows_endpoint_changes_after_the_injected_delay_in_every_mode() {
    if !lab::root::root_or_skip(
        "vip_follows_endpoint_changes_after_the_injected_delay_in_every_mode",
    ) {
        return;
    }
    // One node per mode, the Cilium one included.
    let cluster = Cluster::create(Mode::ALL.len()).expect("cluster");
    let mut pods = Vec::new();
    for (i, name) in ["web-0", "web-1", "web-2"].into_iter().enumerate() {
        pods.push((name, start_pod(&cluster, i, name).await));
    }
    let endpoints = |removed: Option<&str>| -> Services {
        vec![(
            service(),
            pods.iter()
                .map(|(name, (net, _))| endpoint(name, net, Some(*name) != removed))
                .collect(),
        )]
    };
    let (tx, rx) = watch::channel(endpoints(None));
    let delay: DelayDistribution = "150ms..300ms".parse().unwrap();
    let mut proxies = Vec::new();
    for (node, mode) in cluster.nodes.iter().zip(Mode::ALL) {
        let config = ProxyConfig {
            node: node.name.clone(),
            netns: node.ns.name().to_owned(),
            mode,
            delay,
            seed: node.index as u64,
        };
        proxies.push(Proxy::start(config, rx.clone()).await.expect("proxy"));
    }
    let target = SocketAddrV4::new(VIP, 80);
    for node in 0..cluster.nodes.len() {
        let report = client(&cluster, node, target, ClientKind::NewConnection, 1)
            .wait()
            .unwrap();
        assert_eq!(report.failed_total(), 0, "node-{node}: {report:?}");
        assert_eq!(
            report.backends.len(),
            3,
            "node-{node} must balance over all pods: {report:?}"
        );
    }

    let sent = UnixNanos::now();
    tx.send(endpoints(Some("web-1"))).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (proxy, node) in proxies.iter().zip(&cluster.nodes) {
        let changes = proxy.changes();
        assert_eq!(changes.len(), 1, "{}: {changes:?}", node.name);
        let change = &changes[0];
        assert!(change.removed && change.ip == pods[1].1.0.ip, "{change:?}");
        let waited_ms = (change.applied_started_unix_nano - sent) as f64 / 1e6;
        assert!(
            (150.0..=300.0).contains(&change.injected_delay_ms)
                && waited_ms >= change.injected_delay_ms,
            "{}: injected {} ms, rules started changing {waited_ms} ms after the update",
            node.name,
            change.injected_delay_ms
        );
    }
    for node in 0..cluster.nodes.len() {
        let report = client(&cluster, node, target, ClientKind::KeepAlive, 1)
            .wait()
            .unwrap();
        assert_eq!(report.failed_total(), 0, "node-{node}: {report:?}");
        assert!(
            !report.backends.contains_key("web-1"),
            "node-{node} still routes to web-1: {report:?}"
        );
    }
    for proxy in proxies {
        proxy.stop().await.expect("cleanup");
    }
    for node in &cluster.nodes {
        let nft = node.ns.sh("nft list ruleset").unwrap();
        assert!(
            !String::from_utf8_lossy(&nft.stdout).contains("KUBE-SVC"),
            "{} keeps rules",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_cause() {
    if !lab::root::root_or_skip("failures_are_counted_by_cause") {
        return;
    }
    let cluster = Cluster::create(2).expect("cluster");
    // A pod namespace with nothing listening answers with RST: refused.
    let empty = cluster.add_pod(1, "empty").unwrap();
    let refused = client(
        &cluster,
        0,
        SocketAddrV4::new(empty.ip, POD_PORT),
        ClientKind::NewConnection,
        1,
    )
    .wait()
    .unwrap();
    assert_eq!(refused.ok, 0);
    assert_eq!(
        refused.failed.get(&lab::client::FailureCause::Refused),
        Some(&refused.requests)
    );
    // An address nobody owns: no ARP answer, so timeout or unreachable.
    let nobody = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 200), POD_PORT);
    let mut config = ClientConfig {
        target: nobody.into(),
        kind: ClientKind::NewConnection,
        rate: 5.0,
        duration: Duration::from_millis(500),
        concurrency: 4,
        timeout: Duration::from_millis(300),
    };
    let lost = Client::start(Some(cluster.nodes[0].ns.path()), config.clone())
        .wait()
        .unwrap();
    assert!(lost.requests > 0 && lost.ok == 0, "{lost:?}");
    assert!(
        lost.failed.keys().all(|c| matches!(
            c,
            lab::client::FailureCause::Timeout | lab::client::FailureCause::Unreachable
        )),
        "{lost:?}"
    );
    // A keep-alive connection whose server dies: the next request fails.
    let (_net, pod) = start_pod(&cluster, 1, "dies").await;
    config.target = SocketAddrV4::new(_net.ip, POD_PORT).into();
    config.kind = ClientKind::KeepAlive;
    config.rate = 50.0;
    config.concurrency = 1;
    config.duration = Duration::from_secs(2);
    config.timeout = Duration::from_secs(1);
    let keep_alive = Client::start(Some(cluster.nodes[0].ns.path()), config);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Without preStop and a zero grace period: the kubelet kills at once.
    pod.terminate(Duration::ZERO, Duration::ZERO).await;
    let report = keep_alive.wait().unwrap();
    assert!(report.ok > 10, "{report:?}");
    assert!(report.failed_total() > 0, "{report:?}");
}

#[test]
fn commit_witness_sees_nftables_and_iptables_nft_commits_but_not_legacy() {
    if !lab::root::root_or_skip(
        "commit_witness_sees_nftables_and_iptables_nft_commits_but_not_legacy",
    ) {
        return;
    }
    let ns = lab::netns::NetNs::create("witness").unwrap();
    let witness = lab::witness::CommitWitness::start(&ns.path()).unwrap();
    for (script, announced) in [
        ("nft add table ip lab", true),
        ("iptables-nft -t nat -N LAB", true),
        ("iptables-legacy -t nat -N LAB", false),
    ] {
        let before = UnixNanos::now();
        ns.sh(script).unwrap();
        let after = UnixNanos::now();
        // The witness thread records a commit when it reads the
        // notification (with the socket's receive timestamp where the kernel
        // gives one), which can take a while on a loaded machine.
        const READ_SLACK_NS: i64 = 500_000_000;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let seen = loop {
            let seen = witness
                .last_commit_between(before, after + READ_SLACK_NS)
                .is_some();
            if seen || std::time::Instant::now() > deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(seen, announced, "{script}");
    }
}

#[test]
fn once_settled_the_witness_holds_every_commit_of_a_write() {
    if !lab::root::root_or_skip("once_settled_the_witness_holds_every_commit_of_a_write") {
        return;
    }
    let ns = lab::netns::NetNs::create("witness-settled").unwrap();
    let witness = lab::witness::CommitWitness::start(&ns.path()).unwrap();
    // iptables-nft-restore commits each table apart: two commits per write.
    for round in 0..20 {
        let before = UnixNanos::now();
        ns.sh(&format!(
            "printf '*filter\\n:F{round} - [0:0]\\nCOMMIT\\n*nat\\n:N{round} - [0:0]\\nCOMMIT\\n' | iptables-nft-restore --noflush"
        ))
        .unwrap();
        let after = UnixNanos::now();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !(witness.settled() && witness.settled()) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: never settled"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            witness.commits_between(before, after).len(),
            2,
            "round {round}: settled before both commits were recorded"
        );
    }
}
