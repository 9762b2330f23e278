//! The pod server's shutdown semantics, on loopback (no root needed). The
//! requests are written by hand on purpose: the assertions are about the
//! bytes and the moment the server closes (a request answered with
//! `Connection: close`, a refused connect), which an HTTP library hides.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(mode: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lab-pod-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--name",
                "web-1",
                "--mode",
                mode,
                "--drain-timeout-ms",
                "1500",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lab-pod-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .expect("listening line")
            .parse()
            .unwrap();
        Server { child, addr }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn exited_within(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a GET and returns the raw response (head and body), or None when
/// the connection failed before a full response.
fn get(conn: &mut TcpStream, path: &str) -> Option<String> {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(text);
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn
}

#[test]
fn graceful_server_closes_keep_alive_after_next_request_and_finishes_in_flight() {
    let mut server = Server::start("graceful");
    let mut idle = connect(server.addr);
    let first = get(&mut idle, "/").expect("response");
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("web-1\n"),
        "{first}"
    );
    assert!(!first.contains("Connection: close"));

    let mut slow = connect(server.addr);
    slow.write_all(b"GET /sleep/400 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));

    // Stopped accepting.
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "still accepting after SIGTERM"
    );
    // The idle keep-alive connection still gets its next answer, marked close.
    let last = get(&mut idle, "/").expect("idle keep-alive connection answered after SIGTERM");
    assert!(last.contains("Connection: close"), "{last}");
    let mut rest = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut rest).unwrap(),
        0,
        "server closes after the close response"
    );
    // The in-flight request finished.
    let mut slow_response = String::new();
    slow.read_to_string(&mut slow_response).unwrap();
    assert!(slow_response.starts_with("HTTP/1.1 200"), "{slow_response}");
    assert!(
        server.exited_within(Duration::from_secs(3)),
        "graceful server did not exit"
    );
}

#[test]
fn graceful_server_closes_a_connection_that_stays_idle_past_the_drain_timeout() {
    let mut server = Server::start("graceful");
    let mut idle = connect(server.addr);
    get(&mut idle, "/").expect("response");
    server.signal(libc::SIGTERM);
    let start = Instant::now();
    let mut rest = Vec::new();
    assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(server.exited_within(Duration::from_secs(2)));
}

#[test]
fn bad_server_ignores_sigterm_and_its_keep_alive_requests_fail_at_kill() {
    let mut server = Server::start("ignore-sigterm");
    let mut conn = connect(server.addr);
    get(&mut conn, "/").expect("response");
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let after_term = get(&mut conn, "/").expect("still serving after SIGTERM");
    assert!(!after_term.contains("Connection: close"), "{after_term}");
    assert!(
        TcpStream::connect(server.addr).is_ok(),
        "still accepting after SIGTERM"
    );
    assert!(!server.exited_within(Duration::from_millis(300)));
    server.signal(libc::SIGKILL);
    assert!(server.exited_within(Duration::from_secs(2)));
    assert!(
        get(&mut conn, "/").is_none(),
        "a request on a killed keep-alive connection must fail"
    );
}
