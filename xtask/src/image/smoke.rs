//! Smoke test of the images: each archive is unpacked with umoci into a
//! runtime bundle, and its entrypoint runs from the unpacked root filesystem
//! in a chroot, as the image's user, in a private mount namespace (so the
//! /proc and /sys bind mounts vanish with the process, even on failure).
//! A container runtime cannot be used: crun's setrlimit is denied on these
//! machines. Needs root (chroot, mounts, eBPF).

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    thread::sleep,
    time::{Duration, Instant},
};

use lab_netns::root::root_or_skip;
use serde_json::Value;

use super::{IMAGES, ImageArgs, Metadata, Profile, build, rootfs::NONROOT_UID};
use crate::cmd;

/// The images, built once for all tests from the debug binaries the test
/// run already has, in a directory of their own (target/images stays the
/// user's).
fn images() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let out = Metadata::read()
            .expect("cargo metadata")
            .target_dir
            .join("images-smoke");
        build(&ImageArgs {
            profile: Profile::Debug,
            out_dir: Some(out.clone()),
            context_only: false,
        })
        .expect("cargo xtask image --profile debug");
        out
    })
}

/// An unpacked image: its root filesystem and the runtime config umoci
/// derived from the image config (entrypoint, user, environment).
struct Bundle {
    dir: PathBuf,
    config: Value,
}

impl Bundle {
    fn unpack(name: &str) -> Self {
        let out = images();
        let layout = out.join("unpacked").join(format!("{name}-layout"));
        let dir = out.join("unpacked").join(name);
        for d in [&layout, &dir] {
            let _ = std::fs::remove_dir_all(d);
        }
        std::fs::create_dir_all(&layout).unwrap();
        cmd::run(
            Command::new("tar")
                .arg("-xf")
                .arg(out.join(format!("{name}.tar")))
                .arg("-C")
                .arg(&layout),
        )
        .unwrap();
        let tag = env!("CARGO_PKG_VERSION");
        cmd::run(
            Command::new("umoci")
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:{tag}", layout.display()))
                .arg(&dir),
        )
        .unwrap();
        let config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap())
            .expect("umoci's config.json is JSON");
        let bundle = Self { dir, config };
        bundle.assert_labels(name);
        bundle
    }

    /// The OCI labels the Containerfile sets from the build's arguments
    /// (umoci copies the image config's labels into the annotations).
    fn assert_labels(&self, name: &str) {
        let label = |key: &str| {
            self.config["annotations"][format!("org.opencontainers.image.{key}")]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no label {key}: {:#}", self.config))
                .to_owned()
        };
        let head = cmd::output(
            Command::new("git")
                .current_dir(cmd::workspace_root())
                .args(["rev-parse", "HEAD"]),
        )
        .unwrap();
        assert_eq!(label("title"), name);
        assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
        assert_eq!(label("revision"), head);
        assert_eq!(label("licenses"), env!("CARGO_PKG_LICENSE"));
        assert_eq!(
            label("source"),
            "https://github.com/prestop-observer/prestop-observer"
        );
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn user(&self) -> (u64, u64) {
        let user = &self.config["process"]["user"];
        (user["uid"].as_u64().unwrap(), user["gid"].as_u64().unwrap())
    }

    fn entrypoint(&self) -> Vec<String> {
        self.config["process"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    }

    /// The entrypoint with `args`, chrooted into the root filesystem as the
    /// image's user with the image's environment and nothing else.
    fn command(&self, args: &[&str]) -> Command {
        let rootfs = self.rootfs();
        for dir in ["proc", "sys"] {
            std::fs::create_dir_all(rootfs.join(dir)).unwrap();
        }
        let (uid, gid) = self.user();
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-euc"])
            .arg(
                r#"root=$1; spec=$2; shift 2
mount --rbind /proc "$root/proc"
mount --rbind /sys "$root/sys"
exec chroot --userspec="$spec" "$root" "$@""#,
            )
            .arg("sh")
            .arg(&rootfs)
            .arg(format!("{uid}:{gid}"))
            .args(self.entrypoint())
            .args(args)
            .env_clear()
            .envs(
                self.config["process"]["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
                        (k.to_owned(), v.to_owned())
                    }),
            );
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        eprintln!(
            "{args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

#[test]
fn agent_image_probe_loads_the_programs() {
    if !root_or_skip("agent_image_probe_loads_the_programs") {
        return;
    }
    let bundle = Bundle::unpack("prestop-agent");
    assert_eq!(bundle.user(), (0, 0));
    assert_eq!(bundle.entrypoint(), ["/usr/local/bin/observer-agent"]);
    let out = bundle.output(&["probe", "--output", "json"]);
    assert!(out.status.success(), "probe failed: {out:?}");
    let in_image = availability(&out.stdout);
    assert!(
        in_image
            .iter()
            .any(|(name, available)| name.starts_with("tracepoint/") && *available),
        "no tracepoint program loaded: {in_image:?}"
    );
    // Nothing the host can do is lost in the image (libraries, tracefs, BTF).
    let host =
        Command::new(images().join("context/prestop-agent/rootfs/usr/local/bin/observer-agent"))
            .args(["probe", "--output", "json"])
            .output()
            .unwrap();
    assert_eq!(in_image, availability(&host.stdout));
}

/// Each check of `probe --output json` with whether it is available.
fn availability(json: &[u8]) -> Vec<(String, bool)> {
    let checks: Value = serde_json::from_slice(json).expect("probe --output json prints JSON");
    checks
        .as_array()
        .expect("a list of checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["available"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn aggregator_image_serves_health_as_nonroot() {
    if !root_or_skip("aggregator_image_serves_health_as_nonroot") {
        return;
    }
    let bundle = Bundle::unpack("prestop-aggregator");
    assert_eq!(bundle.user(), (NONROOT_UID.into(), NONROOT_UID.into()));
    let owner = |dir: &str| {
        let meta = std::fs::metadata(bundle.rootfs().join(dir)).unwrap();
        (meta.uid(), meta.gid())
    };
    assert_eq!(
        owner("var/lib/prestop-aggregator"),
        (NONROOT_UID, NONROOT_UID)
    );
    assert_eq!(owner("var/lib"), (0, 0));
    let http = free_port();
    let grpc = free_port();
    // The default store path: the image makes it writable for its user.
    let child = bundle
        .command(&[
            // Without Kubernetes no token can be reviewed: checks off.
            "--no-kube",
            "--insecure-no-auth",
            "--http-addr",
            &http.to_string(),
            "--grpc-addr",
            &grpc.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Killed(child);
    for path in ["/healthz", "/readyz"] {
        let status = wait_for_ok(http, path, &mut server.0);
        assert_eq!(status, 200, "GET {path}");
    }
}

#[test]
fn prestop_check_image_answers_version_as_nonroot() {
    if !root_or_skip("prestop_check_image_answers_version_as_nonroot") {
        return;
    }
    let bundle = Bundle::unpack("prestop-check");
    assert_eq!(bundle.user(), (NONROOT_UID.into(), NONROOT_UID.into()));
    let out = bundle.output(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("prestop-check {}", env!("CARGO_PKG_VERSION"))
    );
    let ca = bundle.rootfs().join("etc/ssl/certs/ca-certificates.crt");
    assert!(ca.metadata().unwrap().len() > 0, "{}", ca.display());
}

/// The drain hook's image: static, so the copy its init container makes
/// runs in any app image; run as its user, it falls back to its sleep
/// when the aggregator is unreachable.
#[test]
fn prestop_drain_image_is_static_and_falls_back_as_nonroot() {
    if !root_or_skip("prestop_drain_image_is_static_and_falls_back_as_nonroot") {
        return;
    }
    let bundle = Bundle::unpack("prestop-drain");
    assert_eq!(bundle.user(), (NONROOT_UID.into(), NONROOT_UID.into()));
    let binary = bundle.rootfs().join("usr/local/bin/prestop-drain");
    assert_eq!(
        super::rootfs::shared_objects(&binary).unwrap(),
        Vec::<PathBuf>::new()
    );
    let token = bundle.rootfs().join("tmp/token");
    std::fs::write(&token, "t").unwrap();
    let started = Instant::now();
    let out = bundle.output(&[
        "--aggregator",
        &format!("http://{}", free_port()),
        "--namespace",
        "shop",
        "--pod",
        "web-1",
        "--token-file",
        "/tmp/token",
        "--fallback",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Connection refused"));
}

#[test]
fn each_image_has_the_sbom_of_its_package() {
    if !root_or_skip("each_image_has_the_sbom_of_its_package") {
        return;
    }
    for image in &IMAGES {
        let path = images().join(format!("{}.cdx.json", image.name));
        let sbom: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(sbom["bomFormat"], "CycloneDX", "{}", path.display());
        let component = &sbom["metadata"]["component"];
        assert_eq!(component["name"], image.package, "{}", path.display());
        assert_eq!(component["version"], env!("CARGO_PKG_VERSION"));
        let crates = sbom["components"].as_array().unwrap();
        // Every image's binary links tokio or clap at least; a real list.
        assert!(
            crates.iter().any(|c| c["name"] == "clap"),
            "{}: {} components",
            path.display(),
            crates.len()
        );
    }
}

/// Kills the server when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The HTTP status of GET `path`, once the server answers 200 (bounded:
/// 30 s), or the last status; fails early when the server exits.
fn wait_for_ok(addr: SocketAddr, path: &str, server: &mut Child) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(exit) = server.try_wait().unwrap() {
            panic!("the aggregator exited: {exit}");
        }
        last = get_status(addr, path);
        if last == Some(200) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    last.unwrap_or_else(|| panic!("nothing answered on {addr} within 30 s"))
}

/// The status curl (a real HTTP client, as an operator's probe would be)
/// gets for GET `path`; None when nothing answered.
fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .args(["--max-time", "5", &format!("http://{addr}{path}")])
        .output()
        .unwrap_or_else(|e| panic!("curl (cargo xtask setup installs it): {e}"));
    // curl writes 000 when no answer came.
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|status| *status != 0)
}
