//! The pod server's start behaviours, on loopback (no root needed): a slow
//! start refuses connections until it listens; a warm-up answers late.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A child killed when the test ends, pass or fail.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free a moment ago.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the server with `args`; returns it and its first line.
fn start(addr: SocketAddr, args: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lab-pod-server"))
        .args(["--listen", &addr.to_string(), "--name", "web-1"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start lab-pod-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Server(child), line)
}

fn get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_slow_start_refuses_until_it_listens() {
    let addr = free_addr();
    let (_server, line) = start(addr, &["--listen-after-ms", "800"]);
    let started = Instant::now();
    assert!(line.starts_with("started "), "{line}");
    let first = TcpStream::connect(addr).map(|_| ()).unwrap_err();
    assert_eq!(first.kind(), ErrorKind::ConnectionRefused);
    let listening = loop {
        match TcpStream::connect(addr) {
            Ok(_) => break started.elapsed(),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "never listened"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(
        listening >= Duration::from_millis(700),
        "listened after {listening:?}"
    );
    assert!(get(addr).ends_with("web-1\n"));
}

#[test]
fn a_warming_up_server_answers_late_at_first() {
    let addr = free_addr();
    let (_server, line) = start(addr, &["--warm-up-ms", "5000"]);
    assert!(line.starts_with("listening "), "{line}");
    let asked = Instant::now();
    assert!(get(addr).ends_with("web-1\n"));
    let took = asked.elapsed();
    assert!(
        took >= lab::server::WARM_UP_ANSWER_DELAY,
        "answered in {took:?} while warming up"
    );
}
