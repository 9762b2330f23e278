//! `cargo xtask image`: OCI images of the agent, the aggregator,
//! prestop-check and prestop-drain, built daemonless with buildah from the Containerfiles in
//! deploy/images/, written as OCI archives with a CycloneDX SBOM each.

mod rootfs;
mod sbom;
#[cfg(test)]
mod smoke;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::{
    build::{self, ensure_setup},
    cmd,
};

/// Where the images are published (the release workflow pushes there and
/// deploy/ names them).
pub const REGISTRY: &str = "ghcr.io/prestop-observer";

/// One image: which binary of which package, and what else it needs.
pub struct Image {
    /// Repository name under [`REGISTRY`], and the Containerfile's directory.
    pub name: &'static str,
    pub package: &'static str,
    pub binary: &'static str,
    /// TLS clients (the Kubernetes API, an aggregator behind HTTPS) verify
    /// against the system roots.
    pub ca_certificates: bool,
    /// Runs as the unprivileged user of `rootfs::NONROOT_UID`.
    pub nonroot: bool,
    /// The directory the program writes to by default, owned by its user:
    /// prepared as `store/BASENAME` in the context, which the Containerfile
    /// copies into the parent with `--chown` (a directory copied onto an
    /// existing one keeps that one's owner).
    pub store_dir: Option<&'static str>,
    /// Linked statically (`crt-static`, see [`build_static`]): the binary
    /// must also run when copied into another image's container.
    pub static_binary: bool,
}

impl Image {
    pub fn binary_path(&self) -> PathBuf {
        Path::new("/usr/local/bin").join(self.binary)
    }

    pub fn containerfile(&self) -> PathBuf {
        cmd::workspace_root()
            .join("deploy/images")
            .join(self.name)
            .join("Containerfile")
    }

    pub fn reference(&self, version: &str) -> String {
        format!("{REGISTRY}/{}:{version}", self.name)
    }
}

pub const IMAGES: [Image; 5] = [
    // Loads eBPF programs and joins the node's network namespace: root, as
    // the DaemonSet's securityContext says.
    Image {
        name: "prestop-agent",
        package: "observer-agent",
        binary: "observer-agent",
        ca_certificates: false,
        nonroot: false,
        store_dir: None,
        static_binary: false,
    },
    Image {
        name: "prestop-aggregator",
        package: "aggregator",
        binary: "aggregator",
        ca_certificates: true,
        nonroot: true,
        store_dir: Some("/var/lib/prestop-aggregator"),
        static_binary: false,
    },
    Image {
        name: "prestop-check",
        package: "prestop-check",
        binary: "prestop-check",
        ca_certificates: true,
        nonroot: true,
        store_dir: None,
        static_binary: false,
    },
    // An init container copies it into an emptyDir the app container's
    // preStop runs it from (README, "Adaptive drain"): whatever the app's
    // image holds, a static binary runs.
    Image {
        name: "prestop-drain",
        package: "prestop-drain",
        binary: "prestop-drain",
        ca_certificates: false,
        nonroot: true,
        store_dir: None,
        static_binary: true,
    },
    Image {
        name: "prestop-admission",
        package: "prestop-admission",
        binary: "prestop-admission",
        ca_certificates: true,
        nonroot: true,
        store_dir: None,
        static_binary: false,
    },
];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// Optimised binaries with their dependency list embedded (cargo-auditable).
    #[default]
    Release,
    /// The debug binaries `cargo build` (and so `cargo xtask test`) leaves:
    /// quick, for trying the images out.
    Debug,
}

#[derive(Args, Clone, Default)]
pub struct ImageArgs {
    /// Cargo profile of the binaries in the images.
    #[arg(long, value_enum, default_value_t)]
    pub profile: Profile,
    /// Where the archives, SBOMs and build contexts go [default: TARGET_DIR/images].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Only prepare the build contexts and SBOMs, for `docker build` or
    /// `podman build` with deploy/images/NAME/Containerfile; buildah is not needed.
    #[arg(long)]
    pub context_only: bool,
}

pub fn run(args: &ImageArgs) -> Result<()> {
    ensure_setup()?;
    let out = build(args)?;
    eprintln!(
        "image: done; archives, SBOMs and contexts in {}",
        out.display()
    );
    Ok(())
}

/// Builds every image and returns the output directory.
pub fn build(args: &ImageArgs) -> Result<PathBuf> {
    let meta = Metadata::read()?;
    let out = args
        .out_dir
        .clone()
        .unwrap_or_else(|| meta.target_dir.join("images"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    build_binaries(args.profile)?;
    let provenance = Provenance::of_checkout()?;
    let bin_dir = meta.target_dir.join(match args.profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    });
    let sboms: Vec<(&str, PathBuf)> = IMAGES
        .iter()
        .map(|i| (i.package, out.join(format!("{}.cdx.json", i.name))))
        .collect();
    sbom::write(&meta, &sboms)?;
    for image in &IMAGES {
        let version = meta.version(image.package)?;
        let context = out.join("context").join(image.name);
        let binary = if image.static_binary {
            build_static(image, args.profile, &meta.target_dir)?
        } else {
            bin_dir.join(image.binary)
        };
        rootfs::prepare(image, &binary, &context)?;
        if !args.context_only {
            Buildah::new(&out).build(image, &version, &provenance, &context)?;
        }
    }
    Ok(out)
}

fn build_binaries(profile: Profile) -> Result<()> {
    match profile {
        // Exactly `cargo xtask build` (and the test run's build): the same
        // packages, so the same features and nothing rebuilt. Not
        // auditable: that wraps rustc and would rebuild them.
        Profile::Debug => build::run(&build::BuildArgs::default()),
        Profile::Release => {
            let mut cargo = Command::new(env!("CARGO"));
            cargo.current_dir(cmd::workspace_root()).args([
                "auditable",
                "build",
                "--release",
                "--locked",
                "--bins",
            ]);
            for image in IMAGES.iter().filter(|i| !i.static_binary) {
                cargo.args(["--package", image.package]);
            }
            cmd::run(&mut cargo)
        }
    }
}

/// Builds `image`'s binary linked statically against glibc (`crt-static`
/// for the host's target, given as `--target` so build scripts stay
/// dynamic) and returns its path. glibc since 2.34 resolves names from
/// /etc/hosts and DNS without loading NSS modules, so the static binary
/// reaches the aggregator's Service name from any image; the musl target
/// would do too but is not installed with the toolchains.
fn build_static(image: &Image, profile: Profile, target_dir: &Path) -> Result<PathBuf> {
    let host = host_target()?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(cmd::workspace_root());
    if profile == Profile::Release {
        cargo.args(["auditable", "build", "--release"]);
    } else {
        cargo.arg("build");
    }
    cargo
        .args([
            "--locked",
            "--package",
            image.package,
            "--bin",
            image.binary,
        ])
        .args(["--target", &host])
        .env(
            format!(
                "CARGO_TARGET_{}_RUSTFLAGS",
                host.to_uppercase().replace('-', "_")
            ),
            "-C target-feature=+crt-static",
        );
    cmd::run(&mut cargo)?;
    let dir = match profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    };
    let binary = target_dir.join(&host).join(dir).join(image.binary);
    let loads = rootfs::shared_objects(&binary)?;
    if !loads.is_empty() {
        anyhow::bail!("{} should be static but loads {loads:?}", binary.display());
    }
    Ok(binary)
}

/// The target triple rustc builds for by default (`rustc -vV`'s host).
fn host_target() -> Result<String> {
    let info = cmd::output(Command::new("rustc").arg("-vV"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` names no host")
}

/// What the images record about the checkout they were built from.
struct Provenance {
    revision: String,
    /// The commit's time: the images' creation time, so a rebuild of the
    /// same commit gives the same config.
    timestamp: String,
}

impl Provenance {
    fn of_checkout() -> Result<Self> {
        let git = |args: &[&str]| {
            cmd::output(
                Command::new("git")
                    .current_dir(cmd::workspace_root())
                    .args(args),
            )
        };
        Ok(Self {
            revision: git(&["rev-parse", "HEAD"])?,
            timestamp: git(&["log", "-1", "--format=%ct"])?,
        })
    }
}

/// buildah with its own vfs store under the output directory: no daemon, no
/// overlay mounts, nothing left in the user's image store.
struct Buildah {
    out: PathBuf,
    root: PathBuf,
}

impl Buildah {
    fn new(out: &Path) -> Self {
        Self {
            out: out.to_owned(),
            root: out.join("buildah"),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    }

    fn build(
        &self,
        image: &Image,
        version: &str,
        provenance: &Provenance,
        context: &Path,
    ) -> Result<()> {
        let reference = image.reference(version);
        cmd::run(
            self.command()
                .args([
                    "bud",
                    "--layers=false",
                    "--timestamp",
                    &provenance.timestamp,
                ])
                .arg(format!("--build-arg=VERSION={version}"))
                .arg(format!("--build-arg=REVISION={}", provenance.revision))
                .arg("--file")
                .arg(image.containerfile())
                .args(["--tag", &reference])
                .arg(context),
        )?;
        let archive = self.out.join(format!("{}.tar", image.name));
        // An existing archive would be appended to, not replaced.
        if archive.exists() {
            std::fs::remove_file(&archive)?;
        }
        cmd::run(
            self.command()
                .arg("push")
                .arg(&reference)
                .arg(format!("oci-archive:{}:{version}", archive.display())),
        )?;
        cmd::run(self.command().args(["rmi", &reference]))
    }
}

/// What `cargo metadata` says about the workspace.
struct Metadata {
    target_dir: PathBuf,
    json: serde_json::Value,
}

impl Metadata {
    fn read() -> Result<Self> {
        let text = cmd::output(
            Command::new(env!("CARGO"))
                .current_dir(cmd::workspace_root())
                .args(["metadata", "--format-version=1", "--no-deps", "--locked"]),
        )?;
        let json: serde_json::Value =
            serde_json::from_str(&text).context("parsing `cargo metadata` output")?;
        let target_dir = json["target_directory"]
            .as_str()
            .context("`cargo metadata` names no target_directory")?
            .into();
        Ok(Self { target_dir, json })
    }

    fn packages(&self) -> impl Iterator<Item = &serde_json::Value> {
        self.json["packages"].as_array().into_iter().flatten()
    }

    /// Every workspace member's name and Cargo.toml.
    fn members(&self) -> impl Iterator<Item = (&str, PathBuf)> {
        self.packages().filter_map(|p| {
            Some((
                p["name"].as_str()?,
                PathBuf::from(p["manifest_path"].as_str()?),
            ))
        })
    }

    fn version(&self, package: &str) -> Result<String> {
        self.packages()
            .find(|p| p["name"] == package)
            .and_then(|p| p["version"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("`cargo metadata` has no version for package {package}"))
    }
}
