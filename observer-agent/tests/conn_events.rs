//! Root-only: the destination-side tracepoints against real TCP traffic
//! between network namespaces, through the real `observer-agent observe`.
//!
//! Each test has its own namespaces, addresses and agent, so they run in
//! parallel; tracepoints are global, so every assertion is about the test's
//! own addresses.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lab_netns::{
    netns::{NetNs, link},
    root::root_or_skip,
};
use observer_agent::kernel::tracefs::Tracefs;
use serde_json::Value;

/// What this kernel's `tcp/tcp_send_reset` reports, read from its format:
/// before 6.10 it fires only for resets sent by a socket (not for refused
/// connections: nothing listens) and carries no reason.
struct SendResetKernel {
    without_socket: bool,
    reason: bool,
}

fn send_reset_kernel() -> SendResetKernel {
    let format = Tracefs::find_or_mount()
        .expect("tracefs")
        .format("tcp", "tcp_send_reset")
        .expect("tcp_send_reset format");
    SendResetKernel {
        // 6.10 made its addresses sockaddrs taken from the packet.
        without_socket: format.fields.get("saddr").is_some_and(|f| f.size >= 16),
        reason: format.fields.contains_key("reason"),
    }
}

/// Events a refused connection to a watched address emits: the reset the
/// refusing side sends (where the kernel reports it) and the one the client
/// receives.
fn events_per_refusal() -> u64 {
    if send_reset_kernel().without_socket {
        2
    } else {
        1
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `observer-agent observe --output json`.
struct Observer {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Observer {
    fn start(watch: &[IpAddr]) -> Self {
        let ips: Vec<String> = watch.iter().map(ToString::to_string).collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_observer-agent"))
            .args([
                "observe",
                "--output",
                "json",
                "--duration",
                "120",
                "--watch-ip",
            ])
            .arg(ips.join(","))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start observer-agent");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let started = lines
            .recv_timeout(START_TIMEOUT)
            .expect("agent printed its started line");
        assert_eq!(started["kind"], "started", "first line: {started}");
        for hook in started["hooks"].as_array().expect("hooks") {
            assert_eq!(hook["attached"], true, "hook not attached: {hook}");
        }
        Observer {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until an event matching `pred` arrives; returns it.
    fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_all(what, 1, pred).remove(0)
    }

    /// Waits until `count` events matching `pred` arrived; returns them.
    fn expect_all(
        &mut self,
        what: &str,
        count: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let found: Vec<Value> = self.seen.iter().filter(|v| pred(v)).cloned().collect();
            if found.len() >= count {
                return found;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => break,
            }
        }
        panic!(
            "no {count} {what} events within {EVENT_TIMEOUT:?}; saw {:#?}",
            self.seen
        );
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server namespace and a client namespace on one veth link.
struct Pair {
    server: NetNs,
    client: NetNs,
    server_ip: IpAddr,
    client_ip: IpAddr,
}

fn pair(subnet: u8) -> Pair {
    lab_netns::netns::reap_stale();
    let server = NetNs::create("srv").expect("server netns");
    let client = NetNs::create("cli").expect("client netns");
    let server_ip = format!("10.201.{subnet}.1").parse().unwrap();
    let client_ip = format!("10.201.{subnet}.2").parse().unwrap();
    link(&server, server_ip, &client, client_ip, 24).expect("veth link");
    Pair {
        server,
        client,
        server_ip: IpAddr::V4(server_ip),
        client_ip: IpAddr::V4(client_ip),
    }
}

/// An agent watching the server of a [`pair`], and one connection to it.
struct Connection {
    obs: Observer,
    server_addr: SocketAddr,
    client: TcpStream,
    /// The server's end of the connection.
    server_side: TcpStream,
    /// The client's address as the server sees it.
    peer: SocketAddr,
    /// The namespaces, kept until the test ends.
    _pair: Pair,
}

/// [`Connection`] in `pair(subnet)`.
fn watched_connection(subnet: u8) -> Connection {
    let p = pair(subnet);
    let obs = Observer::start(&[p.server_ip]);
    let listener = p.listen(p.server_ip);
    let server_addr = listener.local_addr().unwrap();
    let client = p.connect(server_addr).expect("connect");
    let (server_side, peer) = listener.accept().unwrap();
    Connection {
        obs,
        server_addr,
        client,
        server_side,
        peer,
        _pair: p,
    }
}

impl Pair {
    fn listen(&self, ip: IpAddr) -> TcpListener {
        self.server
            .run(move || TcpListener::bind(SocketAddr::new(ip, 0)))
            .expect("enter server netns")
            .expect("bind")
    }

    fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        self.client
            .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .expect("enter client netns")
    }
}

fn is(v: &Value, kind: &str) -> bool {
    v["kind"] == kind
}

fn addr(v: &Value, field: &str) -> SocketAddr {
    v[field]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{field} is not ip:port in {v}"))
}

#[test]
fn refused_connection_reports_reset_with_reason() {
    if !root_or_skip("refused_connection_reports_reset_with_reason") {
        return;
    }
    let p = pair(1);
    let mut obs = Observer::start(&[p.server_ip]);
    let target = SocketAddr::new(p.server_ip, 9);
    let err = p.connect(target).expect_err("nothing listens on port 9");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    if !send_reset_kernel().without_socket {
        // What `observer-agent probe` reports as missing on this kernel:
        // the client's side sees the reset, the refusing side reports none.
        let received = obs.expect("reset_received", |v| {
            is(v, "reset_received") && addr(v, "dst") == target
        });
        assert_eq!(addr(&received, "src").ip(), p.client_ip);
        let sent: Vec<&Value> = obs.seen.iter().filter(|v| is(v, "reset_sent")).collect();
        assert!(sent.is_empty(), "this kernel reported a refusal: {sent:?}");
        return;
    }
    let sent = obs.expect("reset_sent", |v| {
        is(v, "reset_sent") && addr(v, "dst") == target
    });
    assert_eq!(addr(&sent, "src").ip(), p.client_ip);
    assert_eq!(sent["reason"], "no_socket");
    assert!(sent["time_unix_nano"].as_u64().unwrap() > 0);
    let received = obs.expect("reset_received", |v| {
        is(v, "reset_received") && addr(v, "dst") == target
    });
    assert_eq!(addr(&received, "src"), addr(&sent, "src"));
}

#[test]
fn established_connection_reports_accepted_and_connected() {
    if !root_or_skip("established_connection_reports_accepted_and_connected") {
        return;
    }
    let mut c = watched_connection(2);
    assert_eq!(c.peer, c.client.local_addr().unwrap());

    let accepted = c.obs.expect("accepted", |v| {
        is(v, "accepted") && addr(v, "dst") == c.server_addr
    });
    assert_eq!(addr(&accepted, "src"), c.peer);
    assert!(accepted.get("close").is_none(), "{accepted}");
    let connected = c.obs.expect("connected", |v| {
        is(v, "connected") && addr(v, "dst") == c.server_addr
    });
    assert_eq!(addr(&connected, "src"), c.peer);
}

#[test]
fn graceful_close_by_the_endpoint_reports_endpoint_fin() {
    if !root_or_skip("graceful_close_by_the_endpoint_reports_endpoint_fin") {
        return;
    }
    let mut c = watched_connection(3);
    c.server_side.shutdown(Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    c.client.read_to_end(&mut buf).expect("client sees FIN");

    // The pod's socket closes first, then the client's socket sees the FIN:
    // two closes, both the endpoint's FIN.
    let closes = c
        .obs
        .expect_all("closed (server and client sockets)", 2, |v| {
            is(v, "closed") && addr(v, "src") == c.peer && addr(v, "dst") == c.server_addr
        });
    for closed in &closes {
        assert_eq!(closed["close"], "endpoint_fin", "{closed}");
    }
}

#[test]
fn abortive_close_reports_reset_and_its_reason() {
    if !root_or_skip("abortive_close_reports_reset_and_its_reason") {
        return;
    }
    let mut c = watched_connection(4);
    // Closing with unread data aborts the connection with a RST (RFC 2525).
    c.client.write_all(b"unread request").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(c.server_side);
    let mut buf = [0u8; 16];
    let err = c.client.read(&mut buf).expect_err("client sees the reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

    let reset = reset_sent(&mut c.obs, c.server_addr);
    assert_eq!(addr(&reset, "src"), c.peer);
    if send_reset_kernel().reason {
        assert_eq!(reset["reason"], "tcp_abort_on_close");
    } else {
        assert_eq!(reset["reason"], Value::Null, "no reason on this kernel");
    }
    c.obs.expect("closed by the reset", |v| {
        is(v, "closed") && addr(v, "dst") == c.server_addr && v["close"] == "reset"
    });
    c.obs.expect("reset_received", |v| {
        is(v, "reset_received") && addr(v, "dst") == c.server_addr
    });
}

/// The keep-alive race as a killed or closing server leaves it: the server
/// closed an idle connection and the client's next request arrives after
/// the FIN. The reset's reason must read as data after close: it is how
/// aborted requests are counted.
#[test]
fn request_after_the_server_closed_reports_data_after_close() {
    if !root_or_skip("request_after_the_server_closed_reports_data_after_close") {
        return;
    }
    let mut c = watched_connection(12);
    // In FIN_WAIT2 for longer than time-wait lasts, the closed socket stays
    // a full socket once the client's ACK is in. With the default it may
    // become a time-wait socket at once, depending on timing: the next
    // test's case.
    set_linger2(&c.server_side, 120);
    drop(c.server_side);
    let mut buf = [0u8; 16];
    assert_eq!(c.client.read(&mut buf).expect("client sees the FIN"), 0);
    send_request_until_reset(c.client);
    let sent = reset_sent(&mut c.obs, c.server_addr);
    assert_eq!(addr(&sent, "src"), c.peer);
    reason_is_data_after_close(&sent);
}

/// The same race where the server had shut its side down and the client
/// acknowledged the FIN before the server closed: the closed socket is a
/// time-wait socket, which resets the request. Since 6.10 `tcp_send_reset`
/// reports it with its reason; before, it fires for full sockets only, and
/// the reset is seen where it arrives (the client's node) alone.
#[test]
fn request_after_a_half_close_is_reset_by_a_time_wait_socket_and_reported() {
    if !root_or_skip("request_after_a_half_close_is_reset_by_a_time_wait_socket_and_reported") {
        return;
    }
    let mut c = watched_connection(13);
    c.server_side.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(c.client.read(&mut buf).expect("client sees the FIN"), 0);
    // Closed in FIN_WAIT2 (the client's ACK is in), the socket becomes a
    // time-wait socket at once.
    wait_for_tcp_state(&c.server_side, TCP_FIN_WAIT2);
    drop(c.server_side);
    send_request_until_reset(c.client);
    if send_reset_kernel().without_socket {
        let sent = reset_sent(&mut c.obs, c.server_addr);
        assert_eq!(addr(&sent, "src"), c.peer);
        reason_is_data_after_close(&sent);
    } else {
        let received = c.obs.expect("reset_received", |v| {
            is(v, "reset_received") && addr(v, "dst") == c.server_addr
        });
        assert_eq!(addr(&received, "src"), c.peer);
    }
}

/// Sends a request on `client`, whose server side is closed, until the
/// server's reset arrives.
fn send_request_until_reset(mut client: TcpStream) {
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // The reset closes the half-closed socket with EPIPE (reads keep
    // returning the FIN's end of stream): a later write says it arrived.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let err = loop {
        std::thread::sleep(Duration::from_millis(10));
        match client.write(b"x") {
            Ok(_) if Instant::now() < deadline => {}
            other => break other.expect_err("the server resets the request"),
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
}

/// The reset the server at `server_addr` sent, as reported.
fn reset_sent(obs: &mut Observer, server_addr: SocketAddr) -> Value {
    obs.expect("reset_sent", |v| {
        is(v, "reset_sent") && addr(v, "dst") == server_addr
    })
}

/// Where the kernel gives reasons, the reset's reads as data after close.
fn reason_is_data_after_close(reset: &Value) {
    if send_reset_kernel().reason {
        let reason = reset["reason"].as_str().expect("a reason on this kernel");
        assert_eq!(
            observer_proto::ResetCause::from_kernel_reason(reason),
            observer_proto::ResetCause::DataAfterClose,
            "{reset}"
        );
    } else {
        assert_eq!(reset["reason"], Value::Null, "no reason on this kernel");
    }
}

/// Sets TCP_LINGER2 (how long an orphaned socket stays in FIN_WAIT2).
fn set_linger2(socket: &TcpStream, seconds: i32) {
    // SAFETY: a valid socket and an int option.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_LINGER2,
            (&raw const seconds).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "TCP_LINGER2: {}", std::io::Error::last_os_error());
}

const TCP_FIN_WAIT2: u8 = 5;

/// Waits (2 s at most) until `socket`'s TCP state is `state`.
fn wait_for_tcp_state(socket: &TcpStream, state: u8) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        assert_eq!(ret, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        if info.tcpi_state == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "socket in TCP state {}, not {state}, after 2 s",
            info.tcpi_state
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn traffic_to_unwatched_addresses_produces_no_event() {
    if !root_or_skip("traffic_to_unwatched_addresses_produces_no_event") {
        return;
    }
    let p = pair(5);
    let unwatched: IpAddr = "10.201.5.3".parse().unwrap();
    p.server
        .ip(&["addr", "add", "10.201.5.3/32", "dev", "lo"])
        .unwrap();
    let mut obs = Observer::start(&[p.server_ip]);

    // Every kind of event, but to the unwatched address.
    let listener = p.listen(unwatched);
    let to_unwatched = listener.local_addr().unwrap();
    for _ in 0..20 {
        let c = p.connect(to_unwatched).expect("connect");
        let (s, _) = listener.accept().unwrap();
        drop(s);
        drop(c);
    }
    assert!(p.connect(SocketAddr::new(unwatched, 9)).is_err());

    // A marker to the watched address: once it is seen, earlier events
    // would have been delivered before it.
    let marker = SocketAddr::new(p.server_ip, 9);
    assert!(p.connect(marker).is_err());
    // The client's reset_received: every kernel reports it (the refusal's
    // reset_sent only from 6.10).
    obs.expect("marker reset_received", |v| {
        is(v, "reset_received") && addr(v, "dst") == marker
    });
    let leaked: Vec<&Value> = obs
        .seen
        .iter()
        .filter(|v| {
            ["src", "dst"]
                .iter()
                .any(|f| v[*f].as_str().is_some_and(|s| s.starts_with("10.201.5.3:")))
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "events for an unwatched address: {leaked:#?}"
    );
}

#[test]
fn ipv6_endpoints_are_observed() {
    if !root_or_skip("ipv6_endpoints_are_observed") {
        return;
    }
    let p = pair(6);
    let server_ip: IpAddr = "fd00:201:6::1".parse().unwrap();
    let client_ip: IpAddr = "fd00:201:6::2".parse().unwrap();
    let dev = |ns: &NetNs| -> String {
        let out = ns.ip(&["-o", "link", "show", "type", "veth"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split(':')
            .nth(1)
            .unwrap()
            .trim()
            .split('@')
            .next()
            .unwrap()
            .to_owned()
    };
    let (sdev, cdev) = (dev(&p.server), dev(&p.client));
    p.server
        .ip(&["addr", "add", "fd00:201:6::1/64", "dev", &sdev, "nodad"])
        .unwrap();
    p.client
        .ip(&["addr", "add", "fd00:201:6::2/64", "dev", &cdev, "nodad"])
        .unwrap();
    let mut obs = Observer::start(&[server_ip]);

    let target = SocketAddr::new(server_ip, 9);
    assert!(p.connect(target).is_err());
    let received = obs.expect("reset_received", |v| {
        is(v, "reset_received") && addr(v, "dst") == target
    });
    assert_eq!(addr(&received, "src").ip(), client_ip);
    if send_reset_kernel().without_socket {
        let sent = obs.expect("reset_sent", |v| {
            is(v, "reset_sent") && addr(v, "dst") == target
        });
        assert_eq!(addr(&sent, "src").ip(), client_ip);
        assert_eq!(sent["reason"], "no_socket");
    }
}

#[test]
fn unwatching_the_last_address_stops_events_and_watching_again_restarts_them() {
    if !root_or_skip("unwatching_the_last_address_stops_events_and_watching_again_restarts_them") {
        return;
    }
    // Drives the kernel API directly: the programs skip everything while the
    // watched set is empty, so the count the agent keeps must be right.
    use observer_agent::kernel::{Kernel, LoadOptions};
    let p = pair(7);
    let mut kernel = Kernel::load(LoadOptions::default()).expect("load");
    let refused = SocketAddr::new(p.server_ip, 9);
    let per_refusal = events_per_refusal();
    let emitted = |k: &Kernel| k.stats().expect("stats").emitted;

    kernel.watch_ip(p.server_ip).unwrap();
    kernel.watch_ip(p.server_ip).unwrap();
    assert!(p.connect(refused).is_err());
    let after_watch = emitted(&kernel);
    assert!(
        after_watch >= per_refusal,
        "{per_refusal} events per refusal expected, got {after_watch}"
    );

    // Watching twice made one entry: the first unwatch removes it, the second
    // is a no-op that must not drive the count below zero.
    kernel.unwatch_ip(p.server_ip).unwrap();
    kernel.unwatch_ip(p.server_ip).unwrap();
    assert!(p.connect(refused).is_err());
    assert_eq!(
        emitted(&kernel),
        after_watch,
        "events while nothing is watched"
    );

    kernel.watch_ip(p.server_ip).unwrap();
    assert!(p.connect(refused).is_err());
    assert!(
        emitted(&kernel) >= after_watch + per_refusal,
        "no events after watching again"
    );
}

#[test]
fn a_shared_slot_watches_exactly_the_addresses_in_the_map() {
    if !root_or_skip("a_shared_slot_watches_exactly_the_addresses_in_the_map") {
        return;
    }
    use observer_agent::kernel::{Kernel, LoadOptions};
    use observer_common::WatchKey;
    let p = pair(8);
    let IpAddr::V4(server) = p.server_ip else {
        unreachable!("pair() is IPv4")
    };
    // An address that shares the server's slot in the kernel's table of
    // watched addresses.
    let slot = WatchKey::from_v4(server.octets()).slot();
    let twin = (0..=u16::MAX)
        .map(|n| std::net::Ipv4Addr::new(10, 250, (n >> 8) as u8, n as u8))
        .find(|a| WatchKey::from_v4(a.octets()).slot() == slot)
        .expect("some address of 10.250.0.0/16 shares the slot");
    p.server
        .ip(&["addr", "add", &format!("{twin}/32"), "dev", "lo"])
        .unwrap();
    p.client
        .ip(&["route", "add", "10.250.0.0/16", "via", &server.to_string()])
        .unwrap();
    let twin = IpAddr::V4(twin);

    let mut kernel = Kernel::load(LoadOptions::default()).expect("load");
    let per_refusal = events_per_refusal();
    let stats = |k: &Kernel| k.stats().expect("stats");
    kernel.watch_ip(p.server_ip).unwrap();
    assert!(p.connect(SocketAddr::new(twin, 9)).is_err());
    let s = stats(&kernel);
    assert_eq!(s.emitted, 0, "events for an unwatched twin address");
    assert!(s.filtered >= 1, "the twin's reset was not filtered: {s:?}");

    // Both in one slot: each is found, one of them through the hash map.
    kernel.watch_ip(twin).unwrap();
    assert!(p.connect(SocketAddr::new(twin, 9)).is_err());
    let with_twin = stats(&kernel).emitted;
    assert!(with_twin >= per_refusal, "no events for the watched twin");
    assert!(p.connect(SocketAddr::new(p.server_ip, 9)).is_err());
    let both = stats(&kernel).emitted;
    assert!(
        both >= with_twin + per_refusal,
        "no events for the server beside its twin"
    );

    // Unwatching the twin leaves the server alone in the slot, and the
    // twin's slot entry is gone.
    kernel.unwatch_ip(twin).unwrap();
    assert!(p.connect(SocketAddr::new(twin, 9)).is_err());
    assert_eq!(
        stats(&kernel).emitted,
        both,
        "events for the unwatched twin"
    );
    assert!(p.connect(SocketAddr::new(p.server_ip, 9)).is_err());
    assert!(
        stats(&kernel).emitted >= both + per_refusal,
        "no events for the server after its twin was unwatched"
    );
}

/// Every observation the ring holds now, decoded.
fn drain(
    ring: &mut observer_agent::kernel::conn_ring::ConnRing,
    decoder: &mut observer_agent::kernel::conn_events::ConnDecoder,
) -> Vec<observer_proto::Observation> {
    let mut seen = Vec::new();
    while let Some(record) = ring.next_record() {
        for obs in decoder.decode_record(&record).expect("whole events") {
            seen.push(obs.expect("decodes"));
        }
    }
    seen
}

/// A namespace pair and programs loaded with the given delivery, watching
/// the server's address; the ring is handed out.
fn watching_the_server(
    unbatched: bool,
    subnet: u8,
) -> (
    Pair,
    observer_agent::kernel::Kernel,
    observer_agent::kernel::conn_ring::ConnRing,
) {
    use observer_agent::kernel::{Kernel, LoadOptions};
    let p = pair(subnet);
    let mut kernel = Kernel::load(LoadOptions {
        unbatched,
        ..LoadOptions::default()
    })
    .expect("load");
    assert_eq!(
        kernel.delivery().batched,
        !unbatched,
        "{:?}",
        kernel.delivery()
    );
    kernel.watch_ip(p.server_ip).unwrap();
    let ring = kernel.take_conn_events().expect("ring");
    (p, kernel, ring)
}

/// Every event emitted reaches the reader exactly once, whether the
/// programs queue events per CPU (read after a flush) or write each one.
fn every_emitted_event_is_read_once(unbatched: bool, subnet: u8) {
    use observer_agent::{clock::WallClock, kernel::conn_events::ConnDecoder};
    use observer_proto::Observation;
    let (p, kernel, mut ring) = watching_the_server(unbatched, subnet);
    let mut decoder = ConnDecoder::new(WallClock::new(), Default::default());
    let mut read = |ring: &mut observer_agent::kernel::conn_ring::ConnRing| {
        let events = drain(ring, &mut decoder);
        let accepted: Vec<u16> = events
            .iter()
            .filter_map(|obs| match obs {
                Observation::Accepted(c) => Some(c.src.port()),
                _ => None,
            })
            .collect();
        (events.len() as u64, accepted)
    };

    let listener = p.listen(p.server_ip);
    let to = listener.local_addr().unwrap();
    let mut ports = Vec::new();
    for _ in 0..50 {
        let client = p.connect(to).expect("connect");
        ports.push(client.local_addr().unwrap().port());
        let (server, _) = listener.accept().unwrap();
        drop(client);
        drop(server);
    }
    // Refused connections add two events each, until the total is not a
    // whole number of batches: then some CPU's batch is partly filled.
    let refused = SocketAddr::new(p.server_ip, 9);
    let batch = observer_common::conn::CONN_BATCH_LEN as u64;
    while kernel.stats().unwrap().emitted.is_multiple_of(batch) {
        assert!(p.connect(refused).is_err());
    }
    // Connections close in the background of the kernel: wait until every
    // socket has left ESTABLISHED (4 events per connection, then resets).
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while kernel.stats().unwrap().emitted < 4 * 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let emitted = kernel.stats().unwrap().emitted;
    assert!(emitted >= 4 * 50, "emitted {emitted}");

    let (before_flush, mut accepted) = read(&mut ring);
    if unbatched {
        assert_eq!(
            before_flush, emitted,
            "one record per event, nothing held back"
        );
    } else {
        assert!(
            before_flush < emitted,
            "{before_flush} of {emitted} events read before the flush: nothing was batched"
        );
        assert!(ring.flush_batches().expect("flush") >= 1);
    }
    let (after_flush, rest) = read(&mut ring);
    assert_eq!(before_flush + after_flush, emitted, "events read once each");
    assert_eq!(kernel.stats().unwrap().lost, 0);
    accepted.extend(rest);
    accepted.sort_unstable();
    ports.sort_unstable();
    assert_eq!(accepted, ports, "each accepted connection exactly once");
}

#[test]
fn batched_delivery_reads_every_event_once_after_a_flush() {
    if !root_or_skip("batched_delivery_reads_every_event_once_after_a_flush") {
        return;
    }
    every_emitted_event_is_read_once(false, 9);
}

#[test]
fn unbatched_delivery_reads_every_event_once() {
    if !root_or_skip("unbatched_delivery_reads_every_event_once") {
        return;
    }
    every_emitted_event_is_read_once(true, 10);
}

/// Kernels whose record layout is not the compiled-in one (before 6.10)
/// copy each record before reading it; forced here, the same traffic gives
/// the same events.
#[test]
fn copied_records_give_the_same_events() {
    use observer_agent::{
        clock::WallClock,
        kernel::{Kernel, LoadOptions, conn_events::ConnDecoder},
    };
    use observer_proto::{CloseKind, ConnEvent, Observation};
    if !root_or_skip("copied_records_give_the_same_events") {
        return;
    }
    let p = pair(11);
    let mut kernel = Kernel::load(LoadOptions {
        copy_records: true,
        ..LoadOptions::default()
    })
    .expect("load");
    for hook in kernel.hooks() {
        assert!(hook.attached, "{hook:?}");
        assert!(hook.detail.contains("record copied"), "{hook:?}");
    }
    kernel.watch_ip(p.server_ip).unwrap();
    let mut ring = kernel.take_conn_events().expect("ring");
    let mut decoder = ConnDecoder::new(WallClock::new(), kernel.reset_reasons().clone());

    let listener = p.listen(p.server_ip);
    let server_addr = listener.local_addr().unwrap();
    let mut client = p.connect(server_addr).expect("connect");
    let client_addr = client.local_addr().unwrap();
    let (server_side, _) = listener.accept().unwrap();
    server_side.shutdown(Shutdown::Write).unwrap();
    client
        .read_to_end(&mut Vec::new())
        .expect("client sees FIN");
    // A reset sent by a socket (every kernel reports those; refused
    // connections only from 6.10): the server closes with unread data.
    let mut aborted = p.connect(server_addr).expect("connect");
    let aborted_addr = aborted.local_addr().unwrap();
    let (aborting_side, _) = listener.accept().unwrap();
    aborted.write_all(b"unread request").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(aborting_side);
    assert!(
        aborted.read(&mut [0u8; 16]).is_err(),
        "client sees the reset"
    );

    // accepted, connected, two closes, then for the aborted connection
    // accepted, connected, reset sent, reset received.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while kernel.stats().unwrap().emitted < 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ring.flush_batches().expect("flush");
    let seen = drain(&mut ring, &mut decoder);
    let has = |what: &str, pred: &dyn Fn(&Observation) -> bool| {
        assert!(seen.iter().any(pred), "no {what} in {seen:#?}");
    };
    let from_client = |c: &ConnEvent| c.src == client_addr && c.dst == server_addr;
    has(
        "accepted",
        &|o| matches!(o, Observation::Accepted(c) if from_client(c)),
    );
    has(
        "connected",
        &|o| matches!(o, Observation::Connected(c) if from_client(c)),
    );
    let endpoint_fins = seen
        .iter()
        .filter(|o| {
            matches!(o, Observation::Closed(c)
                if from_client(c) && c.close == Some(CloseKind::EndpointFin))
        })
        .count();
    assert_eq!(
        endpoint_fins, 2,
        "the server's and the client's socket close on the endpoint's FIN: {seen:#?}"
    );
    has(
        "reset sent",
        &|o| matches!(o, Observation::ResetSent(c) if c.src == aborted_addr && c.dst == server_addr),
    );
    has(
        "reset received",
        &|o| matches!(o, Observation::ResetReceived(c) if c.dst == server_addr),
    );
}

/// The wakeups of a reader blocked on the ring: edge-triggered epoll
/// reports each wakeup of the ring's wait queue (once per wait, however
/// many came since the last one).
struct Wakeups(OwnedFd);

impl Wakeups {
    fn of(ring: &impl AsRawFd) -> Self {
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            epoll >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut interest = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        let added = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                ring.as_raw_fd(),
                &mut interest,
            )
        };
        assert_eq!(added, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        Wakeups(epoll)
    }

    /// Whether a wakeup came since the last call, waiting up to `timeout`.
    fn came(&self, timeout: Duration) -> bool {
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }];
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                ready.as_mut_ptr(),
                1,
                timeout.as_millis() as i32,
            )
        };
        assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
        n == 1
    }
}

/// Keeps the calling thread (and the threads it starts) on the CPU it is
/// on: the programs' wakeup rule is per CPU, and the kernel handles the
/// test's own packets on the sender's CPU.
fn stay_on_this_cpu() {
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let pinned = libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        assert_eq!(
            pinned,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The programs wake a blocked reader when the unread bytes pass the mark,
/// not with every event before it, and not again with every later event
/// until the reader has read: each wakeup is an interrupt.
fn a_blocked_reader_is_woken_once_per_pass_of_the_mark(unbatched: bool, subnet: u8) {
    use observer_common::{
        ConnEvent,
        conn::{CONN_BATCH_LEN, CONN_EVENTS_WAKEUP_BYTES},
    };
    stay_on_this_cpu();
    let (p, kernel, mut ring) = watching_the_server(unbatched, subnet);
    let wakeups = Wakeups::of(&ring);

    // Each refused connection emits two events (reset sent, reset
    // received). Batched, events reach the ring up to a batch late, and a
    // record of up to a batch has an 8-byte header; one by one, every event
    // has its header and the fill level is looked at every 16th event.
    let event = std::mem::size_of::<ConnEvent>() as u64;
    let (per_event, late) = if unbatched {
        (event + 8, 16 * (event + 8))
    } else {
        (event, CONN_BATCH_LEN as u64 * event)
    };
    let mark = CONN_EVENTS_WAKEUP_BYTES as u64;
    let refused = SocketAddr::new(p.server_ip, 9);
    let emitted_bytes = || kernel.stats().expect("stats").emitted * per_event;
    let refuse_until = |bytes: u64| {
        while emitted_bytes() < bytes {
            assert!(p.connect(refused).is_err());
        }
    };

    // 4 KiB below the mark leaves room for the batches' headers.
    refuse_until(mark - 4096);
    assert!(
        !wakeups.came(Duration::from_millis(200)),
        "woken before the unread bytes reached the mark"
    );
    refuse_until(mark + late);
    assert!(
        wakeups.came(Duration::from_secs(5)),
        "not woken after the unread bytes passed the mark"
    );
    refuse_until(emitted_bytes() + 4 * late);
    assert!(
        !wakeups.came(Duration::from_millis(200)),
        "woken again by later events before anything was read"
    );

    let mut records = 0;
    while ring.next_record().is_some() {
        records += 1;
    }
    assert!(records > 0, "nothing to read");
    refuse_until(emitted_bytes() + mark + late);
    assert!(
        wakeups.came(Duration::from_secs(5)),
        "not woken when the mark was passed again after a read"
    );
    assert_eq!(kernel.stats().unwrap().lost, 0);
}

#[test]
fn batched_events_wake_a_blocked_reader_once_per_pass_of_the_mark() {
    if !root_or_skip("batched_events_wake_a_blocked_reader_once_per_pass_of_the_mark") {
        return;
    }
    a_blocked_reader_is_woken_once_per_pass_of_the_mark(false, 12);
}

#[test]
fn events_written_one_by_one_wake_a_blocked_reader_once_per_pass_of_the_mark() {
    if !root_or_skip("events_written_one_by_one_wake_a_blocked_reader_once_per_pass_of_the_mark") {
        return;
    }
    a_blocked_reader_is_woken_once_per_pass_of_the_mark(true, 13);
}
