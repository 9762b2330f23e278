//! Boots a kernel under QEMU with the host's root shared read-only and
//! returns the exit code `init.sh` printed on the serial console.
//!
//! TCG, not KVM: a nested KVM guest hung at boot on these machines, while
//! TCG boots Debian's 6.1 to a shell in about 6 s.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The line init.sh prints before powering off.
const EXIT_MARKER: &str = "XTASK-VM-EXIT ";

pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    /// Run by init.sh in the chroot (a path on the host, seen by the guest).
    pub script: &'a Path,
    /// The extracted package (its lib/modules/ is mounted in the guest).
    pub modroot: &'a Path,
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
}

/// What the guest printed and the script's exit code.
pub struct Console {
    pub lines: Vec<String>,
    pub code: i32,
}

/// Boots, echoes the console with `prefix`, and returns what it printed.
pub fn boot(b: &Boot, prefix: &str) -> Result<Console> {
    for p in [b.script, b.modroot] {
        if p.to_string_lossy().contains(char::is_whitespace) {
            bail!(
                "{}: the kernel command line cannot carry a path with spaces",
                p.display()
            );
        }
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-smp")
    .arg(b.cpus.to_string())
    .arg("-m")
    .arg(format!("{}M", b.memory_mib))
    .arg("-kernel")
    .arg(b.vmlinuz)
    .arg("-initrd")
    .arg(b.initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 xtask.script={} xtask.modroot={}",
        b.script.display(),
        b.modroot.display()
    ))
    // multidevs=remap: the host's root spans several filesystems whose
    // inode numbers would otherwise collide in the guest.
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!("+ {}", cmd::describe(&qemu));
    let mut child = qemu.spawn().context(
        "starting qemu-system-x86_64 (Debian package qemu-system-x86; `cargo xtask setup`)",
    )?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let prefix = prefix.to_owned();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            println!("{prefix}{line}");
            lines.push(line);
        }
        lines
    });
    let deadline = Instant::now() + b.timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Only the child this function started.
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            bail!("the guest did not power off within {:?}", b.timeout);
        }
        thread::sleep(Duration::from_millis(200));
    };
    let lines = reader.join().unwrap_or_default();
    let Some(marker) = lines
        .iter()
        .find_map(|l| l.find(EXIT_MARKER).map(|at| &l[at + EXIT_MARKER.len()..]))
    else {
        bail!("qemu exited ({status}) before the guest's init reported an exit code");
    };
    let mut words = marker.split_whitespace();
    let code = words
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("unreadable exit marker {marker:?}"))?;
    let why: Vec<&str> = words.collect();
    if !why.is_empty() {
        bail!("the guest's init failed: {}", why.join(" "));
    }
    Ok(Console { lines, code })
}
