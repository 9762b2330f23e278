//! The few bpf() commands the Cilium detector needs, on pinned maps opened
//! read-only (`BPF_OBJ_GET` with `BPF_F_RDONLY`): the kernel refuses every
//! update and delete through such a descriptor, so the agent cannot change
//! Cilium's datapath even by mistake.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use observer_common::cilium::{BatchAttr, MapShape};

const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_OBJ_GET: u32 = 7;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_MAP_LOOKUP_BATCH: u32 = 24;
/// Entries asked for per `BPF_MAP_LOOKUP_BATCH` (doubled while the kernel
/// says a hash bucket holds more: ENOSPC).
const BATCH: u32 = 1024;
/// The kernel's own "not supported" (not in the UAPI errno set): a map type
/// without batch operations.
const ENOTSUPP: i32 = 524;
/// `file_flags` of `BPF_OBJ_GET`: a descriptor for lookups only.
const BPF_F_RDONLY: u32 = 1 << 3;

/// `union bpf_attr` for the element commands (UAPI, stable).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info`: the kernel fills what fits.
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, initialised UAPI attr of its size; the
    // kernel reads (and for info, writes) at most that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// What the kernel says of an open map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub shape: MapShape,
    pub max_entries: u32,
    pub name: String,
}

/// A pinned map, open for lookups only.
#[derive(Debug)]
pub struct ReadOnlyMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl ReadOnlyMap {
    /// Opens the map pinned at `path` read-only.
    pub fn open(path: &Path) -> io::Result<ReadOnlyMap> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
        let mut attr = ObjAttr {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: BPF_F_RDONLY,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut map = ReadOnlyMap {
            fd,
            key_size: 0,
            value_size: 0,
        };
        let info = map.info()?;
        map.key_size = info.shape.key_size as usize;
        map.value_size = info.shape.value_size as usize;
        Ok(map)
    }

    pub fn info(&self) -> io::Result<MapInfo> {
        let mut head = MapInfoHead::default();
        let mut attr = InfoAttr {
            bpf_fd: self.fd.as_raw_fd() as u32,
            info_len: size_of::<MapInfoHead>() as u32,
            info: &mut head as *mut MapInfoHead as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let name_len = head.name.iter().position(|b| *b == 0).unwrap_or(16);
        Ok(MapInfo {
            id: head.id,
            shape: MapShape {
                map_type: head.map_type,
                key_size: head.key_size,
                value_size: head.value_size,
            },
            max_entries: head.max_entries,
            name: String::from_utf8_lossy(&head.name[..name_len]).into_owned(),
        })
    }

    /// The value at `key`, `None` when the map has no such key.
    pub fn lookup(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.check_key(key)?;
        let mut value = vec![0u8; self.value_size];
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every entry, in the map's order: by `BPF_MAP_LOOKUP_BATCH` (Linux
    /// 5.6), a syscall per [`BATCH`] entries, else key by key.
    pub fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match self.entries_batched() {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                ) =>
            {
                self.entries_by_key()
            }
            other => other,
        }
    }

    /// The whole map in batches. The batch token is opaque (a hash map's
    /// bucket index); the last batch ends with ENOENT.
    fn entries_batched(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let token_len = self.key_size.max(8);
        let (mut token_in, mut token_out) = (vec![0u8; token_len], vec![0u8; token_len]);
        let mut first = true;
        let mut count = BATCH;
        loop {
            let mut keys = vec![0u8; self.key_size * count as usize];
            let mut values = vec![0u8; self.value_size * count as usize];
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count,
                map_fd: self.fd.as_raw_fd() as u32,
                ..Default::default()
            };
            let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
                Ok(_) => false,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count < BATCH << 6 => {
                    count *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for i in 0..attr.count as usize {
                out.push((
                    keys[i * self.key_size..(i + 1) * self.key_size].to_vec(),
                    values[i * self.value_size..(i + 1) * self.value_size].to_vec(),
                ));
            }
            if done {
                return Ok(out);
            }
            std::mem::swap(&mut token_in, &mut token_out);
            first = false;
        }
    }

    /// Every key, then its value. A hash map's walk restarts from its first
    /// key when the key it continues from was deleted meanwhile, so an
    /// entry may come twice: callers keep the last.
    fn entries_by_key(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; self.key_size];
            let mut attr = ElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value_or_next_key: next.as_mut_ptr() as u64,
                ..Default::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e),
            }
            if let Some(value) = self.lookup(&next)? {
                out.push((next.clone(), value));
            }
            key = Some(next);
        }
    }

    fn check_key(&self, key: &[u8]) -> io::Result<()> {
        if key.len() == self.key_size {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "key of {} bytes for a map whose keys have {}",
                    key.len(),
                    self.key_size
                ),
            ))
        }
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}
