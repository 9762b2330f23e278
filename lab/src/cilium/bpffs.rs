//! A private bpffs mount: `/sys/fs/bpf` is not a bpffs on the lab's
//! machines, and a lab must not share pins with another lab or the host.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// A bpffs mounted on a fresh directory; unmounted and removed on drop
/// (pins vanish with the mount; maps live on while a descriptor holds them).
#[derive(Debug)]
pub struct Bpffs {
    dir: PathBuf,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

impl Bpffs {
    /// Mounts a bpffs on a new directory under the temporary directory.
    pub fn mount(label: &str) -> io::Result<Bpffs> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lab-bpffs-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let target = c_path(&dir)?;
        // SAFETY: NUL-terminated strings that outlive the call; no data.
        let ret = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if ret != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(io::Error::new(
                e.kind(),
                format!("mounting a bpffs on {}: {e}", dir.display()),
            ));
        }
        Ok(Bpffs { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(target) = c_path(&self.dir) {
            // SAFETY: a NUL-terminated path; detaching cannot fail for a busy mount.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
