//! Which of the writer's map descriptors are Cilium's service and backends
//! maps. The tracepoint sees a descriptor number, not a map, and the agent
//! cannot read the writer's descriptor table (another PID namespace, and
//! ptrace rights it does not have), so it recognises a map by what is
//! written to it: an update whose key holds that value in one of the maps
//! the agent has open read-only names the map. A descriptor with
//! [`MISSES`] updates found in none of them is another map, whose writes
//! the kernel drops from then on. Maglev's outer map holds inner maps,
//! whose written value (the writer's descriptor of a new lookup table)
//! cannot be compared: its write is named by the table filled just before
//! on the same thread (see `identify`).
//!
//! A descriptor is forgotten when the writer closes it, and all of a
//! process's when it exits (the programs report both in order with the
//! writes): the number of a closed descriptor comes back for the next map
//! the writer opens, and a restarted writer is a new process.

use std::collections::HashMap;

use observer_common::cilium::{
    BPF_MAP_DELETE_ELEM, BPF_MAP_UPDATE_ELEM, Backend, DecodeError, FD_OTHER, Family,
    MAGLEV_KEY_LEN, MaglevKey, MapKind, MapWrite, SERVICE_VALUE_LEN, ServiceKey, ServiceValue,
    backend_value_len, fd_kind, service_key_len,
};

use super::maps::{ReadError, ServiceMaps};

/// Updates matching none of the maps before a descriptor is another map's:
/// more than one, as the entry may have changed again before the agent
/// looked.
pub const MISSES: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    Services(Family),
    Backends(Family),
    /// Maglev's outer map.
    Maglev(Family),
    Other,
}

/// One element write of a followed map, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    UpdateService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    UpdateBackend(Family, u32, Backend),
    DeleteBackend(Family, u32),
    /// A frontend's Maglev lookup table replaced (the inner map written
    /// as the writer's descriptor, which says nothing here).
    UpdateMaglev(Family, MaglevKey),
    DeleteMaglev(Family, MaglevKey),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    #[error("{what} of {len} bytes read, the layout has {need}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("command {0} is not an element write")]
    Command(u32),
}

fn prefix<'a>(what: &'static str, bytes: &'a [u8], need: usize) -> Result<&'a [u8], OpError> {
    bytes.get(..need).ok_or(OpError::Short {
        what,
        len: bytes.len(),
        need,
    })
}

impl FdKind {
    /// The kind as the tracepoint's descriptor map holds it (`FD_*`).
    pub const fn code(self) -> u8 {
        match self {
            FdKind::Services(family) => fd_kind(family, MapKind::Services),
            FdKind::Backends(family) => fd_kind(family, MapKind::Backends),
            FdKind::Maglev(family) => fd_kind(family, MapKind::Maglev),
            FdKind::Other => FD_OTHER,
        }
    }

    /// The write as an operation on a map of this kind (not `Other`).
    pub fn decode(self, write: &MapWrite) -> Result<Op, OpError> {
        let key = &write.key[..write.key_len as usize];
        let value = &write.value[..write.value_len as usize];
        let update = match write.cmd {
            BPF_MAP_UPDATE_ELEM => true,
            BPF_MAP_DELETE_ELEM => false,
            other => return Err(OpError::Command(other)),
        };
        match self {
            FdKind::Services(family) => {
                let k = ServiceKey::decode(family, prefix("key", key, service_key_len(family))?)?;
                Ok(if update {
                    let v = ServiceValue::decode(prefix("value", value, SERVICE_VALUE_LEN)?)?;
                    Op::UpdateService(k, v)
                } else {
                    Op::DeleteService(k)
                })
            }
            FdKind::Backends(family) => {
                let id = backend_id(prefix("key", key, 4)?);
                Ok(if update {
                    let b = prefix("value", value, backend_value_len(family))?;
                    Op::UpdateBackend(family, id, Backend::decode(family, b)?)
                } else {
                    Op::DeleteBackend(family, id)
                })
            }
            FdKind::Maglev(family) => {
                let k = MaglevKey::decode(prefix("key", key, MAGLEV_KEY_LEN)?)?;
                Ok(if update {
                    Op::UpdateMaglev(family, k)
                } else {
                    Op::DeleteMaglev(family, k)
                })
            }
            FdKind::Other => Err(OpError::Command(write.cmd)),
        }
    }
}

fn backend_id(key: &[u8]) -> u32 {
    u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
}

/// Which followed map holds the written update now, if any. `inner`: the
/// descriptor the writing thread wrote just before with a zero key, if
/// any: Cilium fills a new Maglev lookup table (an array of one element,
/// key 0) and then writes its descriptor into the outer map under the
/// frontend's rev_nat index, so an outer-map write is an update whose
/// value is that descriptor and whose key the outer map holds.
fn identify(
    maps: &impl ServiceMaps,
    write: &MapWrite,
    inner: Option<u32>,
) -> Result<Option<FdKind>, ReadError> {
    for family in [Family::V4, Family::V6] {
        if let Ok(Op::UpdateService(k, v)) = FdKind::Services(family).decode(write)
            && maps.service(&k)? == Some(v)
        {
            return Ok(Some(FdKind::Services(family)));
        }
        if let Ok(Op::UpdateBackend(family, id, b)) = FdKind::Backends(family).decode(write)
            && maps.backend(family, id)? == Some(b)
        {
            return Ok(Some(FdKind::Backends(family)));
        }
    }
    let value = &write.value[..write.value_len as usize];
    if inner.is_none_or(|fd| value.get(..4) != Some(&fd.to_ne_bytes()[..])) {
        return Ok(None);
    }
    let mut holders = Vec::new();
    for family in [Family::V4, Family::V6] {
        if let Ok(Op::UpdateMaglev(family, key)) = FdKind::Maglev(family).decode(write)
            && maps.maglev(family, key)?.is_some()
        {
            holders.push(family);
        }
    }
    // In both families' outer maps: which one is not known.
    Ok(match holders[..] {
        [family] => Some(FdKind::Maglev(family)),
        _ => None,
    })
}

/// What a write says of its descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learnt {
    /// Classified before.
    Known(FdKind),
    /// Classified by this write; `missed_since`: the kernel time of the
    /// first earlier write of the descriptor that could not be classified
    /// (lost for the mirror).
    New {
        kind: FdKind,
        missed_since: Option<u64>,
    },
    /// Not yet.
    Unknown,
}

#[derive(Debug)]
struct Pending {
    misses: u32,
    first_ns: u64,
}

/// The writer's descriptors, by (process, descriptor).
#[derive(Debug, Default)]
pub struct Descriptors {
    known: HashMap<(u32, u32), FdKind>,
    pending: HashMap<(u32, u32), Pending>,
    /// By thread: the descriptor of its last update if that had a zero
    /// key (a Maglev lookup table being filled).
    zero_key: HashMap<u32, u32>,
}

impl Descriptors {
    /// The writer closed `fd`: the number may come back for another map.
    pub fn forget(&mut self, tgid: u32, fd: u32) {
        self.known.remove(&(tgid, fd));
        self.pending.remove(&(tgid, fd));
    }

    /// The writer's process `tgid` exited; returns the descriptors it had
    /// classified.
    pub fn forget_process(&mut self, tgid: u32) -> Vec<u32> {
        self.pending.retain(|(t, _), _| *t != tgid);
        let fds = self
            .known
            .keys()
            .filter(|(t, _)| *t == tgid)
            .map(|(_, fd)| *fd)
            .collect();
        self.known.retain(|(t, _), _| *t != tgid);
        fds
    }

    pub fn learn(
        &mut self,
        maps: &impl ServiceMaps,
        write: &MapWrite,
    ) -> Result<Learnt, ReadError> {
        let fd = (write.tgid, write.map_fd);
        let inner = self.zero_key.remove(&write.tid);
        let key = &write.key[..write.key_len.min(4) as usize];
        if write.cmd == BPF_MAP_UPDATE_ELEM && key.len() == 4 && key.iter().all(|b| *b == 0) {
            self.zero_key.insert(write.tid, write.map_fd);
        }
        if let Some(kind) = self.known.get(&fd) {
            return Ok(Learnt::Known(*kind));
        }
        // Writes of the descriptor seen before this one, not applied.
        let earlier = self.pending.get(&fd).map(|p| p.first_ns);
        let pending = self.pending.entry(fd).or_insert(Pending {
            misses: 0,
            first_ns: write.enter_ns,
        });
        if write.ret != 0 || write.cmd != BPF_MAP_UPDATE_ELEM {
            return Ok(Learnt::Unknown);
        }
        let found = identify(maps, write, inner)?;
        let kind = match found {
            Some(kind) => kind,
            None => {
                pending.misses += 1;
                if pending.misses < MISSES {
                    return Ok(Learnt::Unknown);
                }
                FdKind::Other
            }
        };
        self.pending.remove(&fd);
        self.known.insert(fd, kind);
        Ok(Learnt::New {
            kind,
            missed_since: earlier.filter(|_| kind != FdKind::Other),
        })
    }
}

#[cfg(test)]
mod tests {
    use observer_common::cilium::KEY_MAX;

    use super::super::mirror::tests::{Table, VIP, backend_of, pod};
    use super::*;

    fn write(fd: u32, cmd: u32, key: &[u8], value: &[u8], at: u64) -> MapWrite {
        let mut w = MapWrite {
            enter_ns: at,
            exit_ns: at + 1,
            ret: 0,
            tgid: 7,
            tid: 7,
            cmd,
            map_fd: fd,
            key: [0xaa; KEY_MAX],
            value: [0xbb; 24],
            key_len: 24,
            value_len: 24,
            _pad: [0; 6],
        };
        // The program reads past a short key or value: what follows is garbage.
        w.key[..key.len()].copy_from_slice(key);
        w.value[..value.len()].copy_from_slice(value);
        w
    }

    #[test]
    fn a_descriptor_is_named_by_the_entry_it_wrote() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        let (master, _) = t.frontend(VIP, &[1], &[], None);
        let mut d = Descriptors::default();
        let slot = ServiceKey { slot: 1, ..master };
        let slot_value = ServiceValue {
            backend_id: 1,
            ..Default::default()
        };
        let w = write(
            3,
            BPF_MAP_UPDATE_ELEM,
            slot.encode().as_slice(),
            &slot_value.encode(),
            10,
        );
        let kind = FdKind::Services(Family::V4);
        assert_eq!(
            d.learn(&t, &w).unwrap(),
            Learnt::New {
                kind,
                missed_since: None
            }
        );
        assert_eq!(
            kind.decode(&w).unwrap(),
            Op::UpdateService(slot, slot_value)
        );
        assert_eq!(d.learn(&t, &w).unwrap(), Learnt::Known(kind));

        let (b, len) = backend_of(pod(1)).encode();
        let del = write(4, BPF_MAP_DELETE_ELEM, &1u32.to_ne_bytes(), &[], 20);
        assert_eq!(
            d.learn(&t, &del).unwrap(),
            Learnt::Unknown,
            "a delete names nothing"
        );
        let w = write(4, BPF_MAP_UPDATE_ELEM, &1u32.to_ne_bytes(), &b[..len], 30);
        let kind = FdKind::Backends(Family::V4);
        assert_eq!(
            d.learn(&t, &w).unwrap(),
            Learnt::New {
                kind,
                missed_since: Some(20)
            }
        );
        assert_eq!(
            kind.decode(&w).unwrap(),
            Op::UpdateBackend(Family::V4, 1, backend_of(pod(1)))
        );
        assert_eq!(kind.decode(&del).unwrap(), Op::DeleteBackend(Family::V4, 1));
    }

    #[test]
    fn another_maps_descriptor_is_other_after_its_misses() {
        let t = Table::default();
        let mut d = Descriptors::default();
        let w = write(5, BPF_MAP_UPDATE_ELEM, &[1, 2, 3, 4], &[9; 8], 1);
        for _ in 1..MISSES {
            assert_eq!(d.learn(&t, &w).unwrap(), Learnt::Unknown);
        }
        assert_eq!(
            d.learn(&t, &w).unwrap(),
            Learnt::New {
                kind: FdKind::Other,
                missed_since: None
            }
        );
    }

    #[test]
    fn a_closed_descriptor_and_an_exited_writers_are_forgotten() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        let (master, _) = t.frontend(VIP, &[1], &[], None);
        let value = t.service(&master).unwrap().unwrap();
        let w = write(
            3,
            BPF_MAP_UPDATE_ELEM,
            master.encode().as_slice(),
            &value.encode(),
            1,
        );
        let mut d = Descriptors::default();
        assert!(matches!(d.learn(&t, &w).unwrap(), Learnt::New { .. }));
        d.forget(7, 3);
        // The number again, for a map holding something else.
        let mut other = w;
        other.value[4] ^= 1;
        assert_eq!(d.learn(&t, &other).unwrap(), Learnt::Unknown);

        let mut w4 = w;
        w4.map_fd = 4;
        assert!(matches!(d.learn(&t, &w4).unwrap(), Learnt::New { .. }));
        assert_eq!(d.forget_process(7), vec![4]);
        assert_eq!(d.learn(&t, &other).unwrap(), Learnt::Unknown);
        assert!(d.known.is_empty());
    }

    #[test]
    fn the_maglev_outer_map_is_named_by_the_table_written_just_before() {
        let mut t = Table::default();
        t.maglev.insert(5, 100);
        let key = MaglevKey { rev_nat_index: 5 };
        let mut d = Descriptors::default();
        // Not after a table's fill: unknown.
        let outer = write(
            6,
            BPF_MAP_UPDATE_ELEM,
            &key.encode(),
            &9u32.to_ne_bytes(),
            1,
        );
        assert_eq!(d.learn(&t, &outer).unwrap(), Learnt::Unknown);
        // A new table (descriptor 9) filled at key 0, then its descriptor
        // written under the frontend's rev_nat index.
        let fill = write(9, BPF_MAP_UPDATE_ELEM, &[0; 4], &[7; 24], 2);
        assert_eq!(d.learn(&t, &fill).unwrap(), Learnt::Unknown);
        let kind = FdKind::Maglev(Family::V4);
        assert_eq!(
            d.learn(&t, &outer).unwrap(),
            Learnt::New {
                kind,
                missed_since: Some(1)
            }
        );
        assert_eq!(
            kind.decode(&outer).unwrap(),
            Op::UpdateMaglev(Family::V4, key)
        );
        // Another table's descriptor: not the outer map's write.
        let mut d = Descriptors::default();
        d.learn(&t, &fill).unwrap();
        let other = write(
            6,
            BPF_MAP_UPDATE_ELEM,
            &key.encode(),
            &8u32.to_ne_bytes(),
            3,
        );
        assert_eq!(d.learn(&t, &other).unwrap(), Learnt::Unknown);
    }

    #[test]
    fn a_short_read_is_named() {
        let mut w = write(3, BPF_MAP_UPDATE_ELEM, &[0; 12], &[0; 12], 1);
        w.value_len = 4;
        assert_eq!(
            FdKind::Services(Family::V4).decode(&w),
            Err(OpError::Short {
                what: "value",
                len: 4,
                need: 12
            })
        );
    }
}
