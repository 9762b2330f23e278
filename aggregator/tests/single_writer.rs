//! One writer per store, with real aggregator processes: a second one on
//! the same store refuses to start and names the holder; a crashed holder
//! does not block the next start.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the process when the test ends, whatever happened.
struct Aggregator(Child);

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aggregator"));
    c.args([
        "--no-kube",
        // Without Kubernetes there is no TokenReview to check tokens with.
        "--insecure-no-auth",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])
    .arg("--store")
    .arg(store)
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Starts an aggregator and waits (at most 20 s) until it says it started.
fn started(store: &Path) -> Aggregator {
    let mut child = command(store).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("aggregator started") {
                let _ = tx.send(());
            }
        }
    });
    let agg = Aggregator(child);
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the aggregator did not start within 20 s");
    agg
}

/// Runs an aggregator that must refuse to start (within 20 s): its stderr.
fn refused(store: &Path) -> String {
    let child = command(store).spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(20)) else {
        // SAFETY: plain syscall; the pid is our child's, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("the second aggregator neither started nor exited within 20 s");
    };
    let out = out.unwrap();
    assert!(!out.status.success(), "the second aggregator ran");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_aggregator_on_the_same_store_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let mut first = started(&store);
    let err = refused(&store);
    assert!(
        err.contains(&format!(
            "store {} is in use by another aggregator",
            store.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {} on host", first.0.id())),
        "{err}"
    );

    // A crash (SIGKILL, no cleanup) leaves no stale lock behind.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(started(&store));
}
