//! Cilium's service load-balancing maps (its kube-proxy replacement), as
//! the cilium-agent pins them under [`PIN_DIR`], and the events of the
//! `syscalls/sys_{enter,exit}_bpf` tracepoints that see Cilium write them.
//!
//! Layouts follow Cilium's main branch after 1.19 (`bpf/lib/lb.h`,
//! `pkg/loadbalancer/maps/types.go`): `cilium_lb{4,6}_services_v2` and
//! `cilium_lb{4,6}_backends_v3`, and where Cilium runs Maglev
//! `cilium_lb{4,6}_maglev` (`lbmaps.go`). A frontend has a master entry at slot 0
//! (`count` active backends, `qcount` inactive tail) and slots
//! 1..count+qcount holding backend ids, active first. Multi-byte fields are
//! host order except the address, the ports and `rev_nat_index`, which are
//! network order, as Cilium stores them.
//!
//! The byte layouts are spelt out here (offsets, not `#[repr(C)]` structs):
//! the eBPF program compares whole keys and reads two fields of a value at
//! these offsets, user space decodes and encodes them with the checks below.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where the cilium-agent pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/tc/globals";

/// `BPF_MAP_TYPE_HASH`, the type of the services and backends maps.
pub const MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_HASH_OF_MAPS`, the type of the Maglev outer maps.
pub const MAP_TYPE_HASH_OF_MAPS: u32 = 13;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    pub const fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `lb{4,6}_key` -> `lb{4,6}_service`: masters and backend slots.
    Services,
    /// `u32` backend id -> `lb{4,6}_backend`.
    Backends,
    /// Maglev's outer map: [`MaglevKey`] (a frontend's `rev_nat_index`)
    /// -> inner map (an array of one element, the lookup table of backend
    /// ids). Written as the inner map's descriptor in the writer's table;
    /// a lookup returns the inner map's id.
    Maglev,
}

/// What the kernel says of a map (`bpf_map_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
}

/// One map of the layout this crate knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub family: Family,
    pub kind: MapKind,
    pub shape: MapShape,
}

/// The services map's key: address, dport (be16), backend_slot, proto,
/// scope, pad[2].
pub const fn service_key_len(family: Family) -> usize {
    family.addr_len() + 8
}
/// `lb{4,6}_service`: the same 12 bytes for both families.
pub const SERVICE_VALUE_LEN: usize = 12;
/// Offsets of `count` and `qcount` (host-order u16) in a service value.
pub const SERVICE_COUNT_OFFSET: usize = 4;
pub const SERVICE_QCOUNT_OFFSET: usize = 10;
/// `lb{4,6}_backend`: address, port (be16), proto, flags, cluster_id,
/// zone, pad.
pub const fn backend_value_len(family: Family) -> usize {
    family.addr_len() + 8
}
pub const BACKEND_KEY_LEN: usize = 4;
/// The Maglev outer map's key (`__u16` rev_nat_index) and value (`__u32`
/// inner map descriptor or id).
pub const MAGLEV_KEY_LEN: usize = 2;
pub const MAGLEV_VALUE_LEN: usize = 4;

const fn spec(name: &'static str, family: Family, kind: MapKind) -> MapSpec {
    let (map_type, key_size, value_size) = match kind {
        MapKind::Services => (MAP_TYPE_HASH, service_key_len(family), SERVICE_VALUE_LEN),
        MapKind::Backends => (MAP_TYPE_HASH, BACKEND_KEY_LEN, backend_value_len(family)),
        MapKind::Maglev => (MAP_TYPE_HASH_OF_MAPS, MAGLEV_KEY_LEN, MAGLEV_VALUE_LEN),
    };
    MapSpec {
        name,
        family,
        kind,
        shape: MapShape {
            map_type,
            key_size: key_size as u32,
            value_size: value_size as u32,
        },
    }
}

pub const SERVICES4: MapSpec = spec("cilium_lb4_services_v2", Family::V4, MapKind::Services);
pub const BACKENDS4: MapSpec = spec("cilium_lb4_backends_v3", Family::V4, MapKind::Backends);
pub const SERVICES6: MapSpec = spec("cilium_lb6_services_v2", Family::V6, MapKind::Services);
pub const BACKENDS6: MapSpec = spec("cilium_lb6_backends_v3", Family::V6, MapKind::Backends);
pub const MAPS: [MapSpec; 4] = [SERVICES4, BACKENDS4, SERVICES6, BACKENDS6];
/// Pinned only where Cilium runs Maglev (`bpf-lb-algorithm=maglev`, or
/// the per-service annotation allowed).
pub const MAGLEV4: MapSpec = spec("cilium_lb4_maglev", Family::V4, MapKind::Maglev);
pub const MAGLEV6: MapSpec = spec("cilium_lb6_maglev", Family::V6, MapKind::Maglev);

/// Pinned names of earlier layouts (before the services map's v2 and the
/// backends map's v3): a node that has them and not [`MAPS`] runs a Cilium this agent
/// cannot read, which it says rather than guessing.
pub const RETIRED: [&str; 6] = [
    "cilium_lb4_services",
    "cilium_lb4_backends",
    "cilium_lb4_backends_v2",
    "cilium_lb6_services",
    "cilium_lb6_backends",
    "cilium_lb6_backends_v2",
];

/// A pinned map that is not the layout this crate knows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "map {name}: type {found_type}, key {found_key} bytes, value {found_value} bytes; \
         the layout of Cilium after 1.19 is type {want_type}, key {want_key}, value {want_value}"
    , found_type = found.map_type, found_key = found.key_size, found_value = found.value_size,
      want_type = expected.map_type, want_key = expected.key_size, want_value = expected.value_size)]
    Shape {
        name: &'static str,
        expected: MapShape,
        found: MapShape,
    },
    #[error(
        "map {0} is an earlier layout of Cilium's service maps, which this agent does not read"
    )]
    Retired(&'static str),
}

impl MapSpec {
    /// Whether a map pinned under this spec's name has its layout.
    pub fn check(&self, found: MapShape) -> Result<(), LayoutError> {
        if found == self.shape {
            Ok(())
        } else {
            Err(LayoutError::Shape {
                name: self.name,
                expected: self.shape,
                found,
            })
        }
    }
}

/// Bytes of a map entry that do not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{what}: {got} bytes where the layout has {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("service key: scope {0} is neither external (0) nor internal (1)")]
    Scope(u8),
    #[error(
        "backend: state {0} is none of active (0), terminating (1), quarantined (2), maintenance (3)"
    )]
    BackendState(u8),
}

fn exact<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], DecodeError> {
    bytes.try_into().map_err(|_| DecodeError::Length {
        what,
        expected: N,
        got: bytes.len(),
    })
}

fn ip_from(family: Family, bytes: &[u8]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        Family::V6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[..16]);
            IpAddr::V6(Ipv6Addr::from(a))
        }
    }
}

fn put_ip(ip: &IpAddr, out: &mut [u8]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            out[..16].copy_from_slice(&v6.octets());
            16
        }
    }
}

/// `LB_LOOKUP_SCOPE_*`: the internal scope is the second set of slots of a
/// frontend with `externalTrafficPolicy=Local` (node-local backends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    External = 0,
    Internal = 1,
}

/// A service frontend: ClusterIP, one NodePort address, an LB or external
/// IP, per L4 protocol (0: any) and scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub scope: Scope,
}

/// The longest key ([`service_key_len`] of IPv6).
pub const KEY_MAX: usize = 24;

/// A services map key in its map bytes; IPv4 keys use the first 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyBytes {
    pub bytes: [u8; KEY_MAX],
    pub len: usize,
}

impl KeyBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// One entry's key of a services map: slot 0 is the frontend's master.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub frontend: Frontend,
    pub slot: u16,
}

impl ServiceKey {
    pub fn master(frontend: Frontend) -> ServiceKey {
        ServiceKey { frontend, slot: 0 }
    }

    pub fn decode(family: Family, bytes: &[u8]) -> Result<ServiceKey, DecodeError> {
        let len = service_key_len(family);
        if bytes.len() != len {
            return Err(DecodeError::Length {
                what: "service key",
                expected: len,
                got: bytes.len(),
            });
        }
        let a = family.addr_len();
        let scope = match bytes[a + 5] {
            0 => Scope::External,
            1 => Scope::Internal,
            other => return Err(DecodeError::Scope(other)),
        };
        Ok(ServiceKey {
            frontend: Frontend {
                ip: ip_from(family, bytes),
                port: u16::from_be_bytes([bytes[a], bytes[a + 1]]),
                proto: bytes[a + 4],
                scope,
            },
            slot: u16::from_ne_bytes([bytes[a + 2], bytes[a + 3]]),
        })
    }

    /// The map bytes, padding zeroed as Cilium writes it.
    pub fn encode(&self) -> KeyBytes {
        let mut bytes = [0u8; KEY_MAX];
        let a = put_ip(&self.frontend.ip, &mut bytes);
        bytes[a..a + 2].copy_from_slice(&self.frontend.port.to_be_bytes());
        bytes[a + 2..a + 4].copy_from_slice(&self.slot.to_ne_bytes());
        bytes[a + 4] = self.frontend.proto;
        bytes[a + 5] = self.frontend.scope as u8;
        KeyBytes { bytes, len: a + 8 }
    }
}

/// A services map value: for the master, `count`/`qcount` and the
/// frontend's flags; for a slot, the backend id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// Backend id in a slot; in the master, the union of the session
    /// affinity timeout / LB algorithm or the L7 proxy port.
    pub backend_id: u32,
    pub count: u16,
    pub qcount: u16,
    /// Host order here; network order in the map.
    pub rev_nat_index: u16,
    pub flags: u8,
    pub flags2: u8,
}

impl ServiceValue {
    pub fn decode(bytes: &[u8]) -> Result<ServiceValue, DecodeError> {
        let b: [u8; SERVICE_VALUE_LEN] = exact("service value", bytes)?;
        Ok(ServiceValue {
            backend_id: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            count: u16::from_ne_bytes([b[4], b[5]]),
            rev_nat_index: u16::from_be_bytes([b[6], b[7]]),
            flags: b[8],
            flags2: b[9],
            qcount: u16::from_ne_bytes([b[10], b[11]]),
        })
    }

    pub fn encode(&self) -> [u8; SERVICE_VALUE_LEN] {
        let mut b = [0u8; SERVICE_VALUE_LEN];
        b[0..4].copy_from_slice(&self.backend_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.count.to_ne_bytes());
        b[6..8].copy_from_slice(&self.rev_nat_index.to_be_bytes());
        b[8] = self.flags;
        b[9] = self.flags2;
        b[10..12].copy_from_slice(&self.qcount.to_ne_bytes());
        b
    }
}

/// The Maglev outer map's key: the frontend's `rev_nat_index`, in network
/// order as in the services map's value (the datapath looks the outer map
/// up with the master's field as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// Host order here.
    pub rev_nat_index: u16,
}

impl MaglevKey {
    pub fn decode(bytes: &[u8]) -> Result<MaglevKey, DecodeError> {
        let b: [u8; MAGLEV_KEY_LEN] = exact("maglev key", bytes)?;
        Ok(MaglevKey {
            rev_nat_index: u16::from_be_bytes(b),
        })
    }

    pub fn encode(&self) -> [u8; MAGLEV_KEY_LEN] {
        self.rev_nat_index.to_be_bytes()
    }
}

/// A backend's state, in its flags byte (`loadbalancer.BackendState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    Active = 0,
    Terminating = 1,
    Quarantined = 2,
    Maintenance = 3,
}

/// One entry's value of a backends map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub state: BackendState,
    pub cluster_id: u16,
    pub zone: u8,
}

/// The longest backend value ([`backend_value_len`] of IPv6).
pub const BACKEND_MAX: usize = 24;

impl Backend {
    /// A TCP backend at `addr` in `state`, in the local cluster and no zone
    /// (what kube-proxy replacement writes for a Service's endpoint).
    pub fn tcp(addr: core::net::SocketAddr, state: BackendState) -> Self {
        Backend {
            ip: addr.ip(),
            port: addr.port(),
            proto: 6,
            state,
            cluster_id: 0,
            zone: 0,
        }
    }

    pub fn decode(family: Family, bytes: &[u8]) -> Result<Backend, DecodeError> {
        let len = backend_value_len(family);
        if bytes.len() != len {
            return Err(DecodeError::Length {
                what: "backend",
                expected: len,
                got: bytes.len(),
            });
        }
        let a = family.addr_len();
        let state = match bytes[a + 3] {
            0 => BackendState::Active,
            1 => BackendState::Terminating,
            2 => BackendState::Quarantined,
            3 => BackendState::Maintenance,
            other => return Err(DecodeError::BackendState(other)),
        };
        Ok(Backend {
            ip: ip_from(family, bytes),
            port: u16::from_be_bytes([bytes[a], bytes[a + 1]]),
            proto: bytes[a + 2],
            state,
            cluster_id: u16::from_ne_bytes([bytes[a + 4], bytes[a + 5]]),
            zone: bytes[a + 6],
        })
    }

    /// The map bytes (the first [`backend_value_len`] of the array).
    pub fn encode(&self) -> ([u8; BACKEND_MAX], usize) {
        let mut b = [0u8; BACKEND_MAX];
        let a = put_ip(&self.ip, &mut b);
        b[a..a + 2].copy_from_slice(&self.port.to_be_bytes());
        b[a + 2] = self.proto;
        b[a + 3] = self.state as u8;
        b[a + 4..a + 6].copy_from_slice(&self.cluster_id.to_ne_bytes());
        b[a + 6] = self.zone;
        (b, a + 8)
    }
}

// ---- The tracepoint's side ----

/// bpf() commands the tracepoint looks at: the single-element writes
/// Cilium's reconciler makes (one per entry, no batches today) and the
/// batch ones, whose elements it sends one by one.
pub const BPF_MAP_UPDATE_ELEM: u32 = 2;
pub const BPF_MAP_DELETE_ELEM: u32 = 3;
pub const BPF_MAP_UPDATE_BATCH: u32 = 26;
pub const BPF_MAP_DELETE_BATCH: u32 = 27;

/// Offsets in the `syscalls/sys_enter_bpf` record (`cmd`, `uattr`) and in
/// `sys_exit_bpf` (`ret`): syscall arguments are 8-byte slots from 16 on
/// every kernel with syscall tracepoints; the agent checks them in tracefs.
pub const ENTER_CMD_OFFSET: usize = 16;
pub const ENTER_UATTR_OFFSET: usize = 24;
pub const EXIT_RET_OFFSET: usize = 16;
/// `fd` in the `syscalls/sys_enter_close` record.
pub const CLOSE_FD_OFFSET: usize = 16;

/// Not bpf() commands: what happened to the writer's descriptors, sent as
/// [`MapWrite::cmd`] on the ring of its writes so that it comes in order
/// with them. The writer closed `map_fd` (close(2)), a descriptor the
/// programs had seen written: a later descriptor of that number is
/// another map.
pub const WRITER_CLOSED: u32 = 0x8000_0001;
/// The writer's process `tgid` exited (its main thread's
/// `sched/sched_process_exit`): every descriptor of it is gone.
pub const WRITER_EXITED: u32 = 0x8000_0002;

/// Per-CPU counters of the tracepoint programs (`CILIUM_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CiliumStat {
    /// Element writes by the writer that the program looked at.
    WriterWrites = 0,
    /// Records sent to the agent: writes to a followed map or to one not
    /// classified yet (a batch's elements one each), and the writer's
    /// closes and exits.
    Sent = 1,
    /// Writer's writes whose attr, key or value could not be read from
    /// user memory (not resident): such a write is missed, the agent
    /// re-reads the maps.
    Unreadable = 2,
    /// Writes lost: the ring was full or the pending table was.
    Lost = 3,
    /// Batch writes by the writer that the program looked at.
    Batches = 4,
    /// Writer's writes to a map the agent classified as none of its own:
    /// dropped after one lookup, before any user memory is read.
    OtherMaps = 5,
    /// Batch writes whose elements were not all sent: to a descriptor not
    /// classified yet (the element sizes are unknown), or of more than
    /// [`MAX_BATCH_ELEMENTS`]; the agent re-reads the maps.
    BatchesUnsent = 6,
}

impl CiliumStat {
    pub const ALL: [CiliumStat; 7] = [
        CiliumStat::WriterWrites,
        CiliumStat::Sent,
        CiliumStat::Unreadable,
        CiliumStat::Lost,
        CiliumStat::Batches,
        CiliumStat::OtherMaps,
        CiliumStat::BatchesUnsent,
    ];

    /// Counters that mean a write of a followed map may have been missed.
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            CiliumStat::Unreadable | CiliumStat::Lost | CiliumStat::BatchesUnsent
        )
    }
}

pub const CILIUM_STATS_LEN: u32 = 7;

/// Offsets in the user's `union bpf_attr` of the element commands.
pub const ATTR_MAP_FD: usize = 0;
pub const ATTR_KEY: usize = 8;
pub const ATTR_VALUE: usize = 16;

/// Offsets in the user's `union bpf_attr` of the batch commands
/// (`attr.batch`: in_batch, out_batch, keys, values, count, map_fd, ...).
/// `keys` and `values` point to arrays of whole keys and values; the
/// kernel applies them in order and writes back in `count` how many it
/// processed, also when it stops at an error.
pub const ATTR_BATCH_KEYS: usize = 16;
pub const ATTR_BATCH_VALUES: usize = 24;
pub const ATTR_BATCH_COUNT: usize = 32;
pub const ATTR_BATCH_MAP_FD: usize = 36;

/// `union bpf_attr` of the batch commands (UAPI `attr.batch`), for the
/// user-space callers (the agent's reads, the lab's writes); the program
/// reads it at the offsets above.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(BatchAttr, keys) == ATTR_BATCH_KEYS);
    assert!(core::mem::offset_of!(BatchAttr, values) == ATTR_BATCH_VALUES);
    assert!(core::mem::offset_of!(BatchAttr, count) == ATTR_BATCH_COUNT);
    assert!(core::mem::offset_of!(BatchAttr, map_fd) == ATTR_BATCH_MAP_FD);
};

/// Elements of one batch the program sends, each as a [`MapWrite`]; the
/// rest of a longer batch is counted ([`CiliumStat::BatchesUnsent`]).
pub const MAX_BATCH_ELEMENTS: u32 = 64;

/// The longest value read from a write ([`BACKEND_MAX`]; a service value
/// is [`SERVICE_VALUE_LEN`]).
pub const VALUE_MAX: usize = BACKEND_MAX;

/// Key of the map of the writer's descriptors (`CILIUM_FDS`): its process
/// in the high half, the descriptor in the low.
pub const fn fd_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// What a descriptor of the writer is, as the agent classified it; a
/// descriptor not in the map, or [`FD_PENDING`], is not classified yet,
/// and its element writes are sent for the agent to classify. A followed map's kind gives
/// the program its key and value sizes, for the elements of a batch.
///
/// Seen written, not classified yet: put by the programs themselves at
/// the first write, so that the descriptor's close is reported even
/// before the agent classifies it (the agent's classification only
/// replaces an entry that is still there).
pub const FD_PENDING: u8 = 1;
/// Not one of the service maps: its writes are dropped in the kernel.
pub const FD_OTHER: u8 = 2;
/// The followed maps, by family and kind ([`fd_kind`]).
pub const FD_SERVICES4: u8 = 3;
pub const FD_SERVICES6: u8 = 4;
pub const FD_BACKENDS4: u8 = 5;
pub const FD_BACKENDS6: u8 = 6;
pub const FD_MAGLEV4: u8 = 7;
pub const FD_MAGLEV6: u8 = 8;

/// The `CILIUM_FDS` value of a followed map.
pub const fn fd_kind(family: Family, kind: MapKind) -> u8 {
    match (family, kind) {
        (Family::V4, MapKind::Services) => FD_SERVICES4,
        (Family::V6, MapKind::Services) => FD_SERVICES6,
        (Family::V4, MapKind::Backends) => FD_BACKENDS4,
        (Family::V6, MapKind::Backends) => FD_BACKENDS6,
        (Family::V4, MapKind::Maglev) => FD_MAGLEV4,
        (Family::V6, MapKind::Maglev) => FD_MAGLEV6,
    }
}

/// Descriptors the map of the writer's descriptors holds (LRU: a
/// restarted writer's old ones age out).
pub const MAX_WRITER_FDS: u32 = 4096;

/// Threads with a write in flight the program can follow at once.
pub const MAX_PENDING_WRITES: u32 = 1024;

/// The writer to follow: threads whose `comm` starts with `comm` (its
/// first `comm_len` bytes), and of process `tgid` when that is non-zero.
/// Checked before any user memory is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterFilter {
    pub comm: [u8; 16],
    pub comm_len: u32,
    pub tgid: u32,
}

impl WriterFilter {
    /// Threads of cilium-agent: Go does not rename its threads, so every
    /// one carries the process's name.
    pub const CILIUM_AGENT: WriterFilter = WriterFilter::comm(*b"cilium-agent\0\0\0\0", 12);

    pub const fn comm(comm: [u8; 16], comm_len: u32) -> WriterFilter {
        WriterFilter {
            comm,
            comm_len,
            tgid: 0,
        }
    }

    /// Whether a thread of process `tgid` named `comm` is the writer.
    #[inline(always)]
    pub fn matches(&self, tgid: u32, comm: &[u8; 16]) -> bool {
        if self.tgid != 0 && self.tgid != tgid {
            return false;
        }
        let n = self.comm_len as usize;
        let mut i = 0;
        while i < 16 {
            if i < n && comm[i] != self.comm[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// One element write by the writer to a map not known to be another's,
/// seen at the syscall's entry and exit on one thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapWrite {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) at sys_enter_bpf.
    pub enter_ns: u64,
    /// bpf_ktime_get_ns at sys_exit_bpf: the new value is visible to
    /// lookups from some instant between the two.
    pub exit_ns: u64,
    /// The syscall's return value: 0 on success, -errno.
    pub ret: i64,
    pub tgid: u32,
    pub tid: u32,
    /// [`BPF_MAP_UPDATE_ELEM`] or [`BPF_MAP_DELETE_ELEM`]; for an element
    /// of a batch, the element command of the batch's, `ret` 0 (the kernel
    /// applied it: it is within the batch's written-back `count`) and the
    /// batch syscall's times.
    pub cmd: u32,
    /// The writer's map descriptor (in the writer's table).
    pub map_fd: u32,
    /// The key's first bytes: [`KEY_MAX`], or as many of 12 and 4 as
    /// could be read (`key_len`).
    pub key: [u8; KEY_MAX],
    /// For an update, the value's first bytes (`value_len` of them).
    pub value: [u8; VALUE_MAX],
    pub key_len: u8,
    pub value_len: u8,
    pub _pad: [u8; 6],
}

/// Ring buffer of [`MapWrite`]s: a full resync of a large cluster writes
/// tens of thousands of entries; a lost write makes the agent re-read.
pub const MAP_WRITES_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
unsafe impl aya::Pod for WriterFilter {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for MapWrite {}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;
    use std::string::ToString;

    use proptest::prelude::*;

    use super::*;

    fn any_ip(family: Family) -> BoxedStrategy<IpAddr> {
        match family {
            Family::V4 => any::<[u8; 4]>().prop_map(IpAddr::from).boxed(),
            Family::V6 => any::<[u8; 16]>().prop_map(IpAddr::from).boxed(),
        }
    }

    fn any_family() -> impl Strategy<Value = Family> {
        prop_oneof![Just(Family::V4), Just(Family::V6)]
    }

    fn any_key() -> impl Strategy<Value = ServiceKey> {
        any_family().prop_flat_map(|f| {
            (
                any_ip(f),
                any::<u16>(),
                any::<u8>(),
                any::<bool>(),
                any::<u16>(),
            )
                .prop_map(|(ip, port, proto, internal, slot)| ServiceKey {
                    frontend: Frontend {
                        ip,
                        port,
                        proto,
                        scope: if internal {
                            Scope::Internal
                        } else {
                            Scope::External
                        },
                    },
                    slot,
                })
        })
    }

    fn any_backend() -> impl Strategy<Value = Backend> {
        any_family().prop_flat_map(|f| {
            (
                any_ip(f),
                any::<u16>(),
                any::<u8>(),
                0u8..4,
                any::<u16>(),
                any::<u8>(),
            )
                .prop_map(|(ip, port, proto, state, cluster_id, zone)| Backend {
                    ip,
                    port,
                    proto,
                    state: [
                        BackendState::Active,
                        BackendState::Terminating,
                        BackendState::Quarantined,
                        BackendState::Maintenance,
                    ][state as usize],
                    cluster_id,
                    zone,
                })
        })
    }

    proptest! {
        #[test]
        fn keys_round_trip(key in any_key()) {
            let bytes = key.encode();
            let family = Family::of(&key.frontend.ip);
            prop_assert_eq!(bytes.len, service_key_len(family));
            prop_assert_eq!(ServiceKey::decode(family, bytes.as_slice()), Ok(key));
            // The address and port sit in network order where the datapath reads them.
            let a = family.addr_len();
            prop_assert_eq!(&bytes.bytes[a..a + 2], &key.frontend.port.to_be_bytes()[..]);
            prop_assert!(bytes.bytes[bytes.len..].iter().all(|b| *b == 0));
        }

        #[test]
        fn random_key_bytes_decode_or_name_the_bad_field(
            family in any_family(), bytes in proptest::collection::vec(any::<u8>(), 0..32)
        ) {
            match ServiceKey::decode(family, &bytes) {
                Ok(key) => {
                    // Everything but the padding comes back.
                    let mut expected = bytes.clone();
                    let a = family.addr_len();
                    expected[a + 6] = 0;
                    expected[a + 7] = 0;
                    let encoded = key.encode();
                    prop_assert_eq!(encoded.as_slice(), &expected[..]);
                }
                Err(DecodeError::Length { expected, got, .. }) => {
                    prop_assert_eq!(expected, service_key_len(family));
                    prop_assert_eq!(got, bytes.len());
                    prop_assert_ne!(got, expected);
                }
                Err(DecodeError::Scope(s)) => {
                    prop_assert_eq!(s, bytes[family.addr_len() + 5]);
                    prop_assert!(s > 1);
                }
                Err(other) => prop_assert!(false, "unexpected {}", other),
            }
        }

        #[test]
        fn service_values_round_trip_every_byte(bytes in any::<[u8; SERVICE_VALUE_LEN]>()) {
            let value = ServiceValue::decode(&bytes).unwrap();
            prop_assert_eq!(value.encode(), bytes);
            prop_assert_eq!(
                value.count,
                u16::from_ne_bytes([bytes[SERVICE_COUNT_OFFSET], bytes[SERVICE_COUNT_OFFSET + 1]])
            );
            prop_assert_eq!(
                value.qcount,
                u16::from_ne_bytes([bytes[SERVICE_QCOUNT_OFFSET], bytes[SERVICE_QCOUNT_OFFSET + 1]])
            );
        }

        #[test]
        fn service_values_of_another_length_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..40)
        ) {
            prop_assume!(bytes.len() != SERVICE_VALUE_LEN);
            prop_assert_eq!(
                ServiceValue::decode(&bytes),
                Err(DecodeError::Length { what: "service value", expected: 12, got: bytes.len() })
            );
        }

        #[test]
        fn maglev_keys_round_trip_and_are_the_masters_rev_nat_bytes(
            key in any::<u16>(), value in any::<[u8; SERVICE_VALUE_LEN]>()
        ) {
            let k = MaglevKey { rev_nat_index: key };
            prop_assert_eq!(MaglevKey::decode(&k.encode()), Ok(k));
            // The datapath looks the outer map up with the master's field.
            let master = ServiceValue::decode(&value).unwrap();
            let from_master = MaglevKey { rev_nat_index: master.rev_nat_index };
            prop_assert_eq!(&from_master.encode()[..], &value[6..8]);
        }

        #[test]
        fn maglev_keys_of_another_length_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..8)
        ) {
            prop_assume!(bytes.len() != MAGLEV_KEY_LEN);
            prop_assert_eq!(
                MaglevKey::decode(&bytes),
                Err(DecodeError::Length { what: "maglev key", expected: 2, got: bytes.len() })
            );
        }

        #[test]
        fn backends_round_trip(backend in any_backend()) {
            let (bytes, len) = backend.encode();
            let family = Family::of(&backend.ip);
            prop_assert_eq!(len, backend_value_len(family));
            prop_assert_eq!(Backend::decode(family, &bytes[..len]), Ok(backend));
        }

        #[test]
        fn random_backend_bytes_decode_or_name_the_state(
            family in any_family(), bytes in proptest::collection::vec(any::<u8>(), 12..=24)
        ) {
            match Backend::decode(family, &bytes) {
                Ok(b) => {
                    let (enc, len) = b.encode();
                    let mut expected = bytes.clone();
                    *expected.last_mut().unwrap() = 0;
                    prop_assert_eq!(&enc[..len], &expected[..]);
                }
                Err(DecodeError::BackendState(s)) => prop_assert!(s > 3),
                Err(DecodeError::Length { got, expected, .. }) => {
                    prop_assert_eq!(expected, backend_value_len(family));
                    prop_assert_ne!(got, expected);
                }
                Err(other) => prop_assert!(false, "unexpected {}", other),
            }
        }
    }

    #[test]
    fn the_known_layout_has_ciliums_sizes() {
        assert_eq!(
            SERVICES4.shape,
            MapShape {
                map_type: 1,
                key_size: 12,
                value_size: 12
            }
        );
        assert_eq!(
            (SERVICES6.shape.key_size, SERVICES6.shape.value_size),
            (24, 12)
        );
        assert_eq!(
            (BACKENDS4.shape.key_size, BACKENDS4.shape.value_size),
            (4, 12)
        );
        assert_eq!(
            (BACKENDS6.shape.key_size, BACKENDS6.shape.value_size),
            (4, 24)
        );
        for maglev in [MAGLEV4, MAGLEV6] {
            assert_eq!(
                maglev.shape,
                MapShape {
                    map_type: 13,
                    key_size: 2,
                    value_size: 4
                }
            );
        }
    }

    #[test]
    fn an_unknown_layout_names_the_map_and_both_shapes() {
        let found = MapShape {
            map_type: 1,
            key_size: 12,
            value_size: 8,
        };
        let err = SERVICES4.check(found).unwrap_err();
        assert_eq!(
            err.to_string(),
            "map cilium_lb4_services_v2: type 1, key 12 bytes, value 8 bytes; the layout of \
             Cilium after 1.19 is type 1, key 12, value 12"
        );
        assert_eq!(SERVICES4.check(SERVICES4.shape), Ok(()));
        assert!(format!("{}", LayoutError::Retired(RETIRED[2])).contains("cilium_lb4_backends_v2"));
    }

    #[test]
    fn a_known_master_encodes_as_cilium_writes_it() {
        let key = ServiceKey::master(Frontend {
            ip: IpAddr::from([10, 96, 0, 10]),
            port: 80,
            proto: 6,
            scope: Scope::External,
        });
        let slot1 = ServiceKey { slot: 1, ..key };
        assert_eq!(
            key.encode().as_slice(),
            &[10, 96, 0, 10, 0, 80, 0, 0, 6, 0, 0, 0]
        );
        let mut one = [0u8; 2];
        one.copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(&slot1.encode().as_slice()[6..8], &one);
    }

    #[test]
    fn the_writer_filter_compares_the_name_prefix_and_the_process() {
        let mut comm = [0u8; 16];
        comm[..12].copy_from_slice(b"cilium-agent");
        assert!(WriterFilter::CILIUM_AGENT.matches(7, &comm));
        comm[3] = b'X';
        assert!(!WriterFilter::CILIUM_AGENT.matches(7, &comm));
        let mut lab = WriterFilter::comm(*b"lab-cilium\0\0\0\0\0\0", 10);
        let mut name = [0u8; 16];
        name[..10].copy_from_slice(b"lab-cilium");
        assert!(lab.matches(1, &name));
        lab.tgid = 2;
        assert!(!lab.matches(1, &name));
        assert!(lab.matches(2, &name));
    }
}
