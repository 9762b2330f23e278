//! One writer per store: the aggregator process holds an exclusive `flock`
//! on `<store>.lock` while it runs. The kernel drops the lock with the
//! process, so a crashed holder never blocks the next start (no stale lock
//! to clean up). SQLite's own exclusive locking mode would not do: the
//! store uses several connections (writer, reader) of one process.
//!
//! The holder writes its pid and host name (in Kubernetes, the pod's name)
//! into the lock file, so a refused second aggregator can name it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held while the aggregator runs; dropping it releases the lock.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "store {store} is in use by another aggregator ({holder}; lock file {lock}): only one may write a store"
    )]
    Held {
        store: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("lock file {lock} of store {store}: {source}")]
    Io {
        store: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
}

/// `<store>.lock`, next to the store.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the store's lock without waiting, or says who holds it.
pub fn lock(store: &Path) -> Result<StoreLock, LockError> {
    let path = lock_path(store);
    let io = |source| LockError::Io {
        store: store.to_owned(),
        lock: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // The holder may not have written itself yet.
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::Held {
                store: store.to_owned(),
                lock: path.clone(),
                holder: if holder.is_empty() {
                    "holder unknown".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let me = format!("pid {} on host {}\n", std::process::id(), host.trim());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(me.as_bytes()))
        .and_then(|()| file.flush())
        .map_err(io)?;
    Ok(StoreLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store.db");
        let held = lock(&store).unwrap();
        // flock locks belong to the open file: a second open conflicts
        // even within one process.
        let e = lock(&store).unwrap_err().to_string();
        assert!(e.contains(&store.display().to_string()), "{e}");
        assert!(
            e.contains(&format!("pid {} on host", std::process::id())),
            "{e}"
        );
        drop(held);
        lock(&store).unwrap();
    }
}
