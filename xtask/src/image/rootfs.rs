//! The root filesystem an image is built from: the binary, exactly the
//! shared objects the dynamic loader needs for it (found with `ldd`), and the
//! few files a program expects (CA certificates, a user database).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::Image;

/// Debian's CA bundle (package ca-certificates), at the path rustls' native
/// roots and OpenSSL look first.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The unprivileged user of the aggregator and prestop-check images; the
/// same uid the Deployment's securityContext names.
pub const NONROOT_UID: u32 = 65532;

/// Lays out the build context of `image` from its built `binary`:
/// `rootfs/`, and `store/` when the image has a store directory; whatever
/// was there before is removed.
pub fn prepare(image: &Image, binary: &Path, context: &Path) -> Result<()> {
    if context.exists() {
        fs::remove_dir_all(context)
            .with_context(|| format!("removing the old context {}", context.display()))?;
    }
    let rootfs = &context.join("rootfs");
    copy_into(rootfs, binary, &image.binary_path())?;
    for lib in shared_objects(binary)? {
        copy_into(rootfs, &lib, &lib)?;
    }
    if image.ca_certificates {
        copy_into(rootfs, Path::new(CA_BUNDLE), Path::new(CA_BUNDLE)).with_context(|| {
            format!(
                "{} needs CA certificates: install Debian's ca-certificates",
                image.name
            )
        })?;
    }
    if image.nonroot {
        let id = NONROOT_UID;
        write_into(
            rootfs,
            "etc/passwd",
            &format!(
                "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{id}:{id}:nonroot:/nonexistent:/sbin/nologin\n"
            ),
        )?;
        write_into(
            rootfs,
            "etc/group",
            &format!("root:x:0:\nnonroot:x:{id}:\n"),
        )?;
    }
    // Writable scratch space for a read-only root (the manifests mount an
    // emptyDir over it) and for plain `docker run`.
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    if let Some(dir) = image.store_dir {
        let dir = Path::new(dir);
        let name = dir.file_name().expect("a store directory has a name");
        fs::create_dir_all(context.join("store").join(name))?;
        // The parents exist before the `--chown` copy, so they stay root's.
        let parent = dir.parent().expect("a store directory has a parent");
        fs::create_dir_all(rootfs.join(parent.strip_prefix("/").unwrap_or(parent)))?;
    }
    Ok(())
}

/// The shared objects `binary` loads, the ELF interpreter included, as
/// absolute host paths; empty for a static binary.
pub fn shared_objects(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd on {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // glibc's ldd exits 1 for a static binary ("not a dynamic
    // executable") but 0 for a static PIE ("statically linked", what
    // crt-static builds).
    if text.contains("not a dynamic executable") || text.trim() == "statically linked" {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

/// Paths from ldd's lines: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{} is not found", name.trim());
                }
                target.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            _ if line.starts_with("linux-vdso") || line.starts_with("linux-gate") => {}
            _ => bail!("unexpected ldd line {line:?}"),
        }
    }
    Ok(libs)
}

/// Copies `from` (following symlinks) to `at` inside `rootfs`, keeping its mode.
fn copy_into(rootfs: &Path, from: &Path, at: &Path) -> Result<()> {
    let to = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    fs::create_dir_all(to.parent().expect("a path inside the rootfs has a parent"))?;
    fs::copy(from, &to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write_into(rootfs: &Path, at: &str, text: &str) -> Result<()> {
    let to = rootfs.join(at);
    fs::create_dir_all(to.parent().expect("a path inside the rootfs has a parent"))?;
    fs::write(&to, text).with_context(|| format!("writing {}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libraries_and_the_interpreter_from_ldd() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f24)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f24)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f24)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err();
        assert_eq!(missing.to_string(), "libssl.so.3 is not found");
    }

    #[test]
    fn finds_what_a_real_binary_loads() {
        let libs = shared_objects(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
        assert!(
            libs.iter().all(|l| l.is_absolute() && l.exists()),
            "{libs:?}"
        );
    }
}
