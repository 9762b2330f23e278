//! Debian kernels for the guest: which package a kernel name means, and the
//! package downloaded (`apt-get download`) and extracted once under
//! target/kernels/, with depmod's index so that modprobe works in the guest.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// A kernel line and flavour from the Debian archive, as `--kernel` names
/// it: `debian-6.1` (the generic build), `debian-6.1-rt` (PREEMPT_RT),
/// `debian-6.12`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianKernel {
    /// `6.1`, `6.12`: what follows `linux-image-` in the package names.
    pub line: String,
    /// `amd64` or `rt-amd64`.
    pub flavour: &'static str,
}

impl FromStr for DebianKernel {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix("debian-") else {
            bail!("kernel {s:?}: expected debian-<line>[-rt], e.g. debian-6.1 or debian-6.1-rt");
        };
        let (line, flavour) = match rest.split_once('-') {
            None => (rest, "amd64"),
            Some((line, "rt")) => (line, "rt-amd64"),
            Some((_, "cloud")) => bail!(
                "kernel {s:?}: Debian's cloud kernels have no 9p, so the guest cannot mount the host's root; use the generic or rt flavour"
            ),
            Some((_, other)) => bail!("kernel {s:?}: unknown flavour {other:?} (known: rt)"),
        };
        if line.is_empty() || !line.chars().all(|c| c.is_ascii_digit() || c == '.') {
            bail!("kernel {s:?}: {line:?} is not a kernel line such as 6.1");
        }
        Ok(DebianKernel {
            line: line.to_owned(),
            flavour,
        })
    }
}

impl fmt::Display for DebianKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.flavour {
            "amd64" => write!(f, "debian-{}", self.line),
            _ => write!(f, "debian-{}-rt", self.line),
        }
    }
}

impl DebianKernel {
    /// The ABI part of `package` (`.0-57` of linux-image-6.1.0-57-amd64-unsigned,
    /// `.118+deb12` of linux-image-6.12.118+deb12-amd64-unsigned) when it is
    /// this line's and flavour's unsigned image, else `None`.
    fn abi<'a>(&self, package: &'a str) -> Option<&'a str> {
        let abi = package
            .strip_prefix("linux-image-")?
            .strip_prefix(self.line.as_str())?
            .strip_suffix("-unsigned")?
            .strip_suffix(self.flavour)?
            .strip_suffix('-')?;
        // Another flavour's package leaves a word (`-rt`, `-cloud`) in the ABI.
        let numeric = abi
            .split(['.', '-', '+'])
            .all(|p| p.chars().all(|c| c.is_ascii_digit()) || p.starts_with("deb"));
        (abi.starts_with(['.', '-']) && numeric).then_some(abi)
    }

    /// The newest of `packages` that is this kernel's, by its ABI numbers.
    fn newest<'a>(&self, packages: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        packages
            .into_iter()
            .filter_map(|p| Some((abi_numbers(self.abi(p)?), p)))
            .max()
            .map(|(_, p)| p)
    }

    /// The newest matching package apt knows (`apt-get update` first on a
    /// fresh machine).
    fn resolve(&self) -> Result<String> {
        let pattern = format!(
            "^linux-image-{}[.-].*-{}-unsigned$",
            self.line.replace('.', "\\."),
            self.flavour
        );
        let list =
            cmd::output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
        let names = list.lines().filter_map(|l| l.split_whitespace().next());
        self.newest(names).map(str::to_owned).with_context(|| {
            format!(
                "apt knows no package for kernel {self} ({pattern}): run `apt-get update`, or check that the Debian archive carrying the {} line is in apt's sources",
                self.line
            )
        })
    }
}

fn abi_numbers(abi: &str) -> Vec<u64> {
    abi.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// An extracted kernel package.
#[derive(Debug)]
pub struct KernelTree {
    pub package: String,
    /// `uname -r` of the guest.
    pub release: String,
    /// The package's files (`boot/`, `lib/modules/<release>/`): modprobe's
    /// `-d` in the guest.
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    /// Per-kernel cache directory (the initramfs goes here too).
    pub dir: PathBuf,
}

impl KernelTree {
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Marks a complete extraction: an interrupted one is redone.
const EXTRACTED: &str = ".extracted";

/// Downloads and extracts `kernel` under `cache` unless already there.
pub fn fetch(kernel: &DebianKernel, cache: &Path) -> Result<KernelTree> {
    let package = kernel.resolve()?;
    let dir = cache.join(&package);
    let root = dir.join("root");
    if !dir.join(EXTRACTED).exists() {
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        cmd::run(
            Command::new("apt-get")
                .current_dir(&dir)
                .args(["download", &package]),
        )?;
        let deb = find_one(&dir, |n| n.starts_with(&package) && n.ends_with(".deb"))?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let release = release_of(&root)?;
        cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
        fs::write(dir.join(EXTRACTED), &package)?;
    }
    let release = release_of(&root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{package} has no {}", vmlinuz.display());
    }
    Ok(KernelTree {
        package,
        release,
        root,
        vmlinuz,
        dir,
    })
}

/// The one directory under lib/modules/ of an extracted package.
fn release_of(root: &Path) -> Result<String> {
    let modules = root.join("lib/modules");
    let found = find_one(&modules, |_| true)?;
    Ok(found
        .file_name()
        .expect("a directory entry has a name")
        .to_string_lossy()
        .into_owned())
}

fn find_one(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| matches(&n.to_string_lossy()))
        {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one match in {}, found {found:?}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APT: &[&str] = &[
        "linux-image-6.1.0-47-amd64-unsigned",
        "linux-image-6.1.0-57-amd64-unsigned",
        "linux-image-6.1.0-57-cloud-amd64-unsigned",
        "linux-image-6.1.0-57-rt-amd64-unsigned",
        "linux-image-6.1.0-9-amd64-unsigned",
        "linux-image-6.12.118+deb12-amd64-unsigned",
        "linux-image-6.12.99+deb12-amd64-unsigned",
        "linux-image-6.12.118+deb12-rt-amd64-unsigned",
    ];

    #[test]
    fn names_mean_the_newest_package_of_their_line_and_flavour() {
        let newest = |name: &str| {
            name.parse::<DebianKernel>()
                .unwrap()
                .newest(APT.iter().copied())
        };
        assert_eq!(
            newest("debian-6.1"),
            Some("linux-image-6.1.0-57-amd64-unsigned")
        );
        assert_eq!(
            newest("debian-6.1-rt"),
            Some("linux-image-6.1.0-57-rt-amd64-unsigned")
        );
        assert_eq!(
            newest("debian-6.12"),
            Some("linux-image-6.12.118+deb12-amd64-unsigned")
        );
        assert_eq!(newest("debian-5.10"), None);
        assert_eq!(
            "debian-6.1-rt".parse::<DebianKernel>().unwrap().to_string(),
            "debian-6.1-rt"
        );
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        let err = |s: &str| s.parse::<DebianKernel>().unwrap_err().to_string();
        assert!(err("debian-6.1-cloud").contains("no 9p"));
        assert!(err("debian-6.1-foo").contains("unknown flavour \"foo\""));
        assert!(err("ubuntu-6.8").contains("expected debian-<line>"));
        assert!(err("debian-x").contains("not a kernel line"));
    }
}
