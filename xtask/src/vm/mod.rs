//! The kernel matrix: the kernel-facing root tests, built on the host, run
//! inside a QEMU guest booted with another kernel (Debian's, downloaded
//! once into target/kernels/), against the host's root filesystem shared
//! read-only. See README "Kernels tested".

mod guest;
mod initramfs;
mod kernel;
mod modules;
mod qemu;

use std::{fs, time::Duration};

use anyhow::{Context, Result, bail};

pub use kernel::DebianKernel;

use crate::cmd;

/// Guest size: two vCPUs exercise the per-CPU paths; the tests need little
/// memory.
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 2048;
/// A whole guest run, boot included (about 4 minutes measured for 6.1).
const TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Builds the guest tests, boots `kernel` and runs them; fails unless all pass.
pub fn run(kernel: &DebianKernel) -> Result<()> {
    let tests = guest::build()?;
    let cache = cmd::target_dir().join("kernels");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cache = cache
        .canonicalize()
        .with_context(|| format!("resolving {}", cache.display()))?;
    let tree = kernel::fetch(kernel, &cache)?;
    let initramfs = initramfs::build(&tree)?;
    let script = tree.dir.join("guest-tests.sh");
    fs::write(&script, guest::script(&tests))
        .with_context(|| format!("writing {}", script.display()))?;
    eprintln!(
        "{kernel}: booting {} ({}) under QEMU (TCG) to run {} test programs",
        tree.package,
        tree.release,
        tests.len()
    );
    let console = qemu::boot(
        &qemu::Boot {
            vmlinuz: &tree.vmlinuz,
            initramfs: &initramfs,
            script: &script,
            modroot: &tree.root,
            cpus: CPUS,
            memory_mib: MEMORY_MIB,
            timeout: TIMEOUT,
        },
        &format!("[{kernel}] "),
    )?;
    let results = guest::results(&console.lines);
    eprintln!("{kernel} ({}): guest test results", tree.release);
    for r in &results {
        eprintln!(
            "  {:<6} {} (exit {})",
            if r.code == 0 { "ok" } else { "FAILED" },
            r.name,
            r.code
        );
    }
    let failed = results.iter().filter(|r| r.code != 0).count();
    if console.code != 0 || failed != 0 || results.len() != tests.len() {
        bail!(
            "{kernel}: {failed} of {} guest test programs failed, {} did not report (guest exit {})",
            tests.len(),
            tests.len() - results.len(),
            console.code
        );
    }
    Ok(())
}
