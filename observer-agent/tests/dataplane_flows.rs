//! Root-only: real traffic to a Service VIP through kube-proxy-shaped
//! nftables rules in a network namespace. New flows to the watched endpoint
//! are reported (and only those: the eBPF socket filter drops the others in
//! the kernel); after the endpoint's removal no new flow reaches it.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lab::{
    kubeproxy::{Mode, Rules},
    netns::{self, NetNs},
    root::root_or_skip,
};
use observer_agent::{
    dataplane, flows,
    kernel::{Kernel, LoadOptions},
    observation::Observation,
};
use tokio::sync::mpsc::{Receiver, channel};

mod fixture;

use fixture::{VIP, backend, service};

/// Accepts and closes connections on :8080 inside the namespace until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&path).unwrap();
            let listener = TcpListener::bind("0.0.0.0:8080").unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        ready_rx.recv().unwrap();
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `count` connections to the VIP from inside the namespace.
fn connect_many(ns: &NetNs, count: usize) -> usize {
    ns.run(move || {
        (0..count)
            .filter(|_| {
                TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_millis(500))
                    .is_ok()
            })
            .count()
    })
    .unwrap()
}

async fn drain(rx: &mut Receiver<Observation>, window: Duration) -> Vec<Observation> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(obs)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.push(obs);
    }
    out
}

async fn flows_stop_after_removal(mode: Mode, slack_ns: u64) {
    let ns = NetNs::create("dpflow").unwrap();
    let (b1, b2) = (backend(1), backend(2));
    // Backends are local addresses; the VIP is routed (to lo) so the OUTPUT
    // DNAT sees the client's packets.
    for b in [b1, b2] {
        ns.ip(&["addr", "add", &format!("{}/32", b.ip), "dev", "lo"])
            .unwrap();
    }
    ns.ip(&["route", "add", "172.30.0.0/16", "dev", "lo"])
        .unwrap();
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    rules.sync(&[(service(), vec![b1, b2])]).unwrap();
    let _server = Server::start(&ns);

    let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
    kernel.watch_ip(b2.ip.into()).unwrap();
    let (tx, mut rx) = channel(1024);
    let flow_tx = tx.clone();
    let ebpf = kernel.ebpf_mut();
    let _flows = ns
        .run(move || flows::spawn(ebpf, flow_tx))
        .unwrap()
        .expect("flow watch starts");
    let watch = ns.run(move || dataplane::spawn(tx)).unwrap().unwrap();
    let b2_addr = SocketAddr::from((b2.ip, b2.port));
    watch.watch(b2_addr);

    // Before: flows reach both endpoints; only those to the watched one are reported.
    assert_eq!(connect_many(&ns, 40), 40);
    let before = drain(&mut rx, Duration::from_millis(300)).await;
    let flows_before: Vec<_> = before
        .iter()
        .map(|o| match o {
            Observation::NewFlow(f) => f,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert!(
        !flows_before.is_empty(),
        "no new_flow to the watched endpoint"
    );
    assert!(flows_before.len() < 40, "unwatched flows were not filtered");
    for f in &flows_before {
        assert_eq!(f.dst, b2_addr);
        assert_eq!(f.original_dst, SocketAddr::from((VIP, 80)));
    }

    // The endpoint is removed; clients keep connecting.
    let applied = rules.sync(&[(service(), vec![b1])]).unwrap();
    assert_eq!(connect_many(&ns, 40), 40);
    let after = drain(&mut rx, Duration::from_millis(500)).await;
    let removed_at = after
        .iter()
        .find_map(|o| match o {
            Observation::RulesRemoved(c) if c.endpoint == b2_addr => Some(c.time_unix_nano),
            _ => None,
        })
        .expect("rules_removed reported");
    assert!(
        removed_at <= applied.finished_unix_nano + slack_ns,
        "{mode}"
    );
    let late: Vec<_> = after
        .iter()
        .filter(|o| matches!(o, Observation::NewFlow(f) if f.time_unix_nano > removed_at))
        .collect();
    assert!(
        late.is_empty(),
        "{mode}: new flows after the removal: {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_new_flows_stop_after_rules_removed() {
    if !root_or_skip("nftables_new_flows_stop_after_rules_removed") {
        return;
    }
    flows_stop_after_removal(Mode::Nftables, 5_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_nft_new_flows_stop_after_rules_removed() {
    if !root_or_skip("iptables_nft_new_flows_stop_after_rules_removed") {
        return;
    }
    flows_stop_after_removal(Mode::IptablesNft, 5_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_legacy_new_flows_stop_after_rules_removed() {
    if !root_or_skip("iptables_legacy_new_flows_stop_after_rules_removed") {
        return;
    }
    flows_stop_after_removal(Mode::IptablesLegacy, 20_000_000).await;
}
