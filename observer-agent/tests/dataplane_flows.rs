//! Root-only: real traffic to a Service VIP through kube-proxy-shaped rules
//! in a network namespace, running while one endpoint is removed. New flows
//! to the watched endpoint are reported (and only those: the eBPF socket
//! filter drops the others in the kernel); the removal is detected inside
//! the writer's transaction, at the witnessed commit; no new flow reaches the
//! endpoint after it, and every connection that did reach it (the server's
//! own account) started before it and was reported.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lab::{
    commit_clock::{self, CommitClock, Window},
    kubeproxy::{Mode, Rules},
    netns::{self, NetNs},
    root::root_or_skip,
};
use observer_agent::{
    dataplane, flows,
    kernel::{Kernel, LoadOptions},
    realtime::DEFAULT_TIMING_PRIORITY,
    stamps::StampKind,
};
use observer_proto::{Detector, NewFlow, Observation, UnixNanos};
use tokio::sync::mpsc::{Receiver, channel};

mod common;

use common::{VIP, backend, service};

/// Traffic bounds: one connection every 500 us, at most this many, for at
/// most this long.
const PACE: Duration = Duration::from_micros(500);
const MAX_CONNECTIONS: usize = 4000;
const MAX_TRAFFIC: Duration = Duration::from_secs(6);
/// A flow's time is its ctnetlink event's receipt by the flow thread, the
/// removal's the receipt of the commit's first notification by the
/// dataplane thread (both SCHED_FIFO here). A connection translated by the
/// old rules just before the commit is confirmed, and reported, a few
/// microseconds later: that, plus the flow thread's wake-up (up to 1.6 ms
/// measured with every core busy, the bound the netlink detector claims
/// as its precision: 2 ms), is the slack.
const FLOW_SLACK_NS: i64 = 2_000_000;
/// The client's source address (not a backend's).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 181, 0, 1);

/// Accepts connections on :8080 inside the namespace until stopped, and
/// records which backend address each client address reached.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<HashMap<SocketAddr, IpAddr>>>,
}

impl Server {
    fn start(ns: &NetNs) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&path).unwrap();
            commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
            let listener = TcpListener::bind("0.0.0.0:8080").unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut reached = HashMap::new();
            loop {
                // Stop only once the queue is empty.
                let stopping = flag.load(Ordering::Relaxed);
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let backend = conn.local_addr().unwrap().ip();
                        assert!(
                            reached.insert(peer, backend).is_none(),
                            "{peer} connected twice"
                        );
                    }
                    Err(_) if stopping => return reached,
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

    /// Client address -> backend address it reached.
    fn stop(mut self) -> HashMap<SocketAddr, IpAddr> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
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

/// One client connection to the VIP: when connect() was called, and the
/// client's address when it succeeded.
#[derive(Clone, Copy, Debug)]
struct Conn {
    started: UnixNanos,
    local: Option<SocketAddr>,
}

/// Paced connections to the VIP from inside the namespace (SCHED_FIFO, so
/// the traffic really runs through the change on a busy machine), bounded
/// in count and time.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Conn>>,
}

impl Traffic {
    fn start(ns: &NetNs) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = ns.path();
        let thread = std::thread::spawn(move || {
            netns::enter(&path).unwrap();
            commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
            let began = Instant::now();
            let mut conns = Vec::new();
            while !flag.load(Ordering::Relaxed)
                && conns.len() < MAX_CONNECTIONS
                && began.elapsed() < MAX_TRAFFIC
            {
                let started = UnixNanos::now();
                let local = TcpStream::connect_timeout(
                    &SocketAddr::from((VIP, 80)),
                    Duration::from_millis(500),
                )
                .ok()
                .and_then(|s| s.local_addr().ok());
                conns.push(Conn { started, local });
                std::thread::sleep(PACE);
            }
            conns
        });
        Traffic { stop, thread }
    }

    fn stop(self) -> Vec<Conn> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

async fn drain(rx: &mut Receiver<Observation>, window: Duration) -> Vec<Observation> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(obs)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.push(obs);
    }
    out
}

fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

async fn flows_stop_after_removal(mode: Mode, detector: Detector) {
    let ns = NetNs::create("dpflow").unwrap();
    let (b1, b2) = (backend(1), backend(2));
    // Backends are local addresses; the VIP is routed (to lo) so the OUTPUT
    // DNAT sees the client's packets. The client has an address of its own:
    // from a backend's address, kube-proxy's hairpin masquerade would
    // rewrite its port and the server could not tell connections apart.
    for b in [b1, b2] {
        ns.ip(&["addr", "add", &format!("{}/32", b.ip), "dev", "lo"])
            .unwrap();
    }
    ns.ip(&["addr", "add", &format!("{CLIENT}/32"), "dev", "lo"])
        .unwrap();
    ns.ip(&[
        "route",
        "add",
        "172.30.0.0/16",
        "dev",
        "lo",
        "src",
        &CLIENT.to_string(),
    ])
    .unwrap();
    let clock = CommitClock::start(&ns.path(), mode).expect("commit witness starts");
    let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
    rules.sync(&[(service(), vec![b1, b2])]).unwrap();
    let server = Server::start(&ns);

    let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
    kernel.watch_ip(b2.ip.into()).unwrap();
    let (tx, mut rx) = channel(8192);
    let stamps = kernel.take_stamps(StampKind::Conntrack);
    let ebpf = kernel.ebpf_mut();
    // Both watchers' threads under SCHED_FIFO, as in dataplane_rules.
    let (_flows, watch) = ns
        .run(move || {
            commit_clock::realtime(DEFAULT_TIMING_PRIORITY).expect("SCHED_FIFO (root)");
            let flows = flows::spawn(ebpf, tx.clone(), stamps).expect("flow watch starts");
            let watch = dataplane::spawn(tx).expect("dataplane watch starts");
            (flows, watch)
        })
        .unwrap();
    let b2_addr = SocketAddr::from((b2.ip, b2.port));
    watch.watch(b2_addr);

    // Traffic runs before, during and after the change.
    let traffic = Traffic::start(&ns);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while seen.len() < 20 && tokio::time::Instant::now() < deadline {
        seen.extend(drain(&mut rx, Duration::from_millis(20)).await);
    }
    let window: Window = rules.sync(&[(service(), vec![b1])]).unwrap().into();
    seen.extend(drain(&mut rx, Duration::from_millis(300)).await);
    let conns = traffic.stop();
    seen.extend(drain(&mut rx, Duration::from_millis(300)).await);
    let reached = server.stop();

    // The removal: inside the writer's transaction, at the witnessed commit.
    let removals: Vec<_> = seen
        .iter()
        .filter_map(|o| match o {
            Observation::RulesRemoved(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(removals.len(), 1, "{mode}: {removals:?}");
    let removal = removals[0];
    assert_eq!(removal.endpoint, b2_addr);
    assert_eq!(removal.detector, detector);
    let removed_at = removal.time;
    let from_commit = clock.check(
        &format!("{mode} removal under traffic"),
        removed_at,
        removal.precision_ns,
        window.started,
    );
    assert!(
        (window.started..=window.finished).contains(&removed_at),
        "{mode}: removal at {removed_at} outside the writer's transaction [{}, {}]",
        window.started,
        window.finished
    );

    // The flows reported: to the watched endpoint only, through the VIP.
    let flows: Vec<&NewFlow> = seen
        .iter()
        .filter_map(|o| match o {
            Observation::NewFlow(f) => Some(f),
            Observation::RulesRemoved(_) => None,
            other => panic!("{mode}: unexpected {other:?}"),
        })
        .collect();
    for f in &flows {
        assert_eq!(f.dst, b2_addr, "{mode}");
        assert_eq!(f.original_dst, SocketAddr::from((VIP, 80)), "{mode}");
    }

    // The traffic really ran through the change, in both directions of it.
    let by_addr: HashMap<SocketAddr, Conn> = conns
        .iter()
        .filter_map(|c| c.local.map(|a| (a, *c)))
        .collect();
    assert_eq!(
        by_addr.len(),
        conns.iter().filter(|c| c.local.is_some()).count(),
        "{mode}: a client port was used twice"
    );
    let during = conns
        .iter()
        .filter(|c| (window.started..=window.finished).contains(&c.started))
        .count();
    let after = conns.iter().filter(|c| c.started > removed_at).count();
    assert!(
        during > 0 && after >= 100,
        "{mode}: traffic did not run through the change ({during} connections during the transaction, {after} after the removal)"
    );
    assert!(
        conns.len() < MAX_CONNECTIONS,
        "{mode}: traffic bound hit early"
    );

    // Before the removal: flows to the endpoint, up to shortly before it.
    let before: Vec<&&NewFlow> = flows.iter().filter(|f| f.time <= removed_at).collect();
    let last_before = before
        .iter()
        .map(|f| f.time)
        .max()
        .unwrap_or_else(|| panic!("{mode}: no new_flow to the endpoint before its removal"));
    let gap = removed_at - last_before;
    assert!(
        gap <= 50_000_000,
        "{mode}: the last flow to the endpoint came {} ms before the removal: traffic did not reach it up to the change",
        ms(gap)
    );

    // After it: none, whatever the flow's timestamp; and every flow belongs
    // to a connection that started before the removal was detected.
    let late: Vec<_> = flows
        .iter()
        .filter(|f| f.time > removed_at + FLOW_SLACK_NS)
        .collect();
    assert!(
        late.is_empty(),
        "{mode}: new flows more than {} ms after the removal: {late:?}",
        ms(FLOW_SLACK_NS)
    );
    for f in &flows {
        let conn = by_addr
            .get(&f.src)
            .unwrap_or_else(|| panic!("{mode}: flow {f:?} is not one of the client's"));
        assert!(
            conn.started <= removed_at,
            "{mode}: connection started {} ms after the detected removal reached the endpoint ({f:?})",
            ms(conn.started - removed_at)
        );
    }

    // The server's account: what reached the endpoint started before the
    // removal, and each of those connections was reported.
    assert_eq!(
        reached.len(),
        by_addr.len(),
        "{mode}: connections the server accepted vs the client made"
    );
    let to_b2: HashSet<SocketAddr> = reached
        .iter()
        .filter(|(_, ip)| **ip == IpAddr::from(b2.ip))
        .map(|(client, _)| *client)
        .collect();
    let reported: HashSet<SocketAddr> = flows.iter().map(|f| f.src).collect();
    for client in &to_b2 {
        let conn = by_addr[client];
        assert!(
            conn.started <= removed_at,
            "{mode}: the server saw a connection to the removed endpoint started {} ms after the detected removal",
            ms(conn.started - removed_at)
        );
    }
    assert_eq!(
        reported, to_b2,
        "{mode}: new_flow sources vs connections the server saw reach the endpoint"
    );
    assert_eq!(reported.len(), flows.len(), "{mode}: a flow reported twice");
    let latest_flow = flows.iter().map(|f| f.time - removed_at).max().unwrap_or(0);
    eprintln!(
        "{mode}: {} connections ({during} during the {:.1} ms transaction, {after} after the removal); {} new flows to the endpoint, the last {:.3} ms before the removal, latest flow time {:+.3} ms from it; removal {:+.3} ms from the commit",
        conns.len(),
        ms(window.finished - window.started),
        flows.len(),
        ms(gap),
        ms(latest_flow),
        ms(from_commit)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_new_flows_stop_after_rules_removed() {
    if !root_or_skip("nftables_new_flows_stop_after_rules_removed") {
        return;
    }
    flows_stop_after_removal(Mode::Nftables, Detector::Nftables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_nft_new_flows_stop_after_rules_removed() {
    if !root_or_skip("iptables_nft_new_flows_stop_after_rules_removed") {
        return;
    }
    flows_stop_after_removal(Mode::IptablesNft, Detector::IptablesNft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_legacy_new_flows_stop_after_rules_removed() {
    if !root_or_skip("iptables_legacy_new_flows_stop_after_rules_removed") {
        return;
    }
    flows_stop_after_removal(Mode::IptablesLegacy, Detector::IptablesLegacy).await;
}
