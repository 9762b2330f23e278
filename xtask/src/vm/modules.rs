//! The guest's boot modules in load order, from the kernel package's
//! `modules.dep` (which depmod writes at extraction). The order changes
//! between builds of one kernel line (6.1's 9p gained netfs and fscache
//! dependencies), so it is read, never written down.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

/// What the guest needs before it can mount the host's root: the virtio
/// PCI transport, 9p over virtio, the 9p filesystem, and overlayfs (a
/// writable layer over the read-only share).
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// The module name of a path: the file name without `.ko` (and any
/// compression suffix), `-` read as `_` as the kernel does.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The files to load, dependencies first, each once, for `wanted` (module
/// names). A wanted module missing from `modules_dep` is an error naming
/// it: the kernel may have it built in, which the caller checks first.
pub fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut by_path = HashMap::new();
    let mut by_name = HashMap::new();
    for (n, line) in modules_dep.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (path, deps) = line
            .split_once(':')
            .with_context(|| format!("modules.dep line {}: no ':' in {line:?}", n + 1))?;
        by_name.insert(module_name(path), path);
        by_path.insert(path, deps.split_whitespace().collect());
    }
    let mut order = Vec::new();
    for name in wanted {
        let Some(path) = by_name.get(&name.replace('-', "_")) else {
            bail!("module {name} is not in modules.dep");
        };
        visit(&by_path, path, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// Depth-first: every dependency before the module that needs it.
/// `by_path`: each module file and the files it needs, as modules.dep
/// lists them (paths relative to the modules directory).
fn visit<'a>(
    by_path: &HashMap<&'a str, Vec<&'a str>>,
    path: &'a str,
    order: &mut Vec<String>,
    stack: &mut Vec<&'a str>,
) -> Result<()> {
    if order.iter().any(|p| p == path) {
        return Ok(());
    }
    if stack.contains(&path) {
        bail!("modules.dep has a dependency cycle through {path}");
    }
    let deps = by_path.get(path).with_context(|| {
        format!("modules.dep names {path} as a dependency but has no line for it")
    })?;
    stack.push(path);
    for dep in deps {
        visit(by_path, dep, order, stack)?;
    }
    stack.pop();
    order.push(path.to_owned());
    Ok(())
}

/// Whether `modules.builtin` lists `name` (then nothing needs loading).
pub fn is_builtin(modules_builtin: &str, name: &str) -> bool {
    let name = name.replace('-', "_");
    modules_builtin.lines().any(|l| module_name(l) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The virtio, 9p, overlay and neighbouring lines of Debian's 6.1.0-57-amd64
    /// (linux-image-6.1.0-57-amd64-unsigned 6.1.192-3), as depmod wrote them.
    const DEBIAN_6_1: &str = include_str!("testdata/modules.dep-6.1.0-57-amd64");

    fn position(order: &[String], file: &str) -> usize {
        order
            .iter()
            .position(|p| p.ends_with(file))
            .unwrap_or_else(|| panic!("{file} not in {order:?}"))
    }

    #[test]
    fn debian_6_1_boot_modules_load_after_their_dependencies() {
        let order = load_order(DEBIAN_6_1, BOOT_MODULES).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/fscache/fscache.ko",
                "kernel/fs/9p/9p.ko",
                "kernel/fs/overlayfs/overlay.ko",
            ]
        );
        // Every line's dependencies come before it (what insmod needs).
        for line in DEBIAN_6_1.lines() {
            let (path, deps) = line.split_once(':').unwrap();
            if let Some(at) = order.iter().position(|p| p == path) {
                for dep in deps.split_whitespace() {
                    assert!(position(&order, dep) < at, "{dep} after {path}");
                }
            }
        }
    }

    #[test]
    fn a_missing_module_or_dependency_is_named() {
        let err = load_order(DEBIAN_6_1, &["no_such_module"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "module no_such_module is not in modules.dep"
        );
        let err = load_order("a.ko: b.ko\n", &["a"]).unwrap_err();
        assert!(err.to_string().contains("b.ko"), "{err}");
        let err = load_order("a.ko: b.ko\nb.ko: a.ko\n", &["a"]).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn names_read_dashes_as_underscores_and_drop_suffixes() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert!(is_builtin("kernel/fs/9p/9p.ko\n", "9p"));
        assert!(!is_builtin("kernel/fs/9p/9p.ko\n", "9pnet"));
    }
}
