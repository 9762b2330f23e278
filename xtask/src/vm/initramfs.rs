//! The guest's initramfs: busybox-static, the boot modules in load order
//! and `init.sh`, as an uncompressed newc cpio archive (what the kernel
//! unpacks). It holds nothing about the tests, so one archive per kernel
//! serves every run; it is rewritten only when its content changes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{kernel::KernelTree, modules};

/// busybox-static's binary (Debian package busybox-static).
const BUSYBOX: &str = "/bin/busybox";
const INIT: &str = include_str!("init.sh");

/// Builds (or keeps) the kernel's initramfs; returns its path.
pub fn build(kernel: &KernelTree) -> Result<PathBuf> {
    let modules_dir = kernel.modules_dir();
    let read = |name: &str| {
        let path = modules_dir.join(name);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let builtin = read("modules.builtin")?;
    let wanted: Vec<&str> = modules::BOOT_MODULES
        .iter()
        .copied()
        .filter(|m| !modules::is_builtin(&builtin, m))
        .collect();
    let order = modules::load_order(&read("modules.dep")?, &wanted)?;

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "boot-modules"] {
        cpio.dir(dir);
    }
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!("reading {BUSYBOX}: install busybox-static (`cargo xtask setup`)")
    })?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    for (n, path) in order.iter().enumerate() {
        let data = module_bytes(&modules_dir.join(path))
            .with_context(|| format!("reading module {path} of {}", kernel.package))?;
        let file = path.rsplit('/').next().unwrap_or(path);
        let stem = file.split(".ko").next().unwrap_or(file);
        // init.sh loads them in the glob's (lexical) order.
        cpio.file(&format!("boot-modules/{n:02}-{stem}.ko"), 0o644, &data);
    }
    let archive = cpio.finish();

    let out = kernel.dir.join("initramfs.cpio");
    if fs::read(&out).ok().as_deref() != Some(archive.as_slice()) {
        fs::write(&out, &archive).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(out)
}

/// A module file, decompressed (6.12's are `.ko.xz`; busybox's insmod
/// takes plain ones).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// A newc ("070701") cpio archive in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        // ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check
        let fields = [
            self.inode,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    /// busybox's own cpio lists what the writer wrote.
    #[test]
    fn busybox_cpio_reads_the_archive() {
        if !std::path::Path::new(BUSYBOX).exists() {
            eprintln!("skipped: {BUSYBOX} missing (busybox-static)");
            return;
        }
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("bin/odd", 0o755, b"12345");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let dir = tempfile_dir();
        let archive = dir.join("a.cpio");
        fs::write(&archive, cpio.finish()).unwrap();
        let out = Command::new(BUSYBOX)
            .args(["cpio", "-t", "-F"])
            .arg(&archive)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "bin\nbin/odd\ninit\n");
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
