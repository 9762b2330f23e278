//! Loads the embedded eBPF object, attaches what this kernel supports and
//! owns the maps user space talks to.

use std::{collections::HashSet, net::IpAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, TracePoint},
};
use observer_common::{
    Stat, TracepointLayout, WatchFilter, WatchKey, WatchSlot,
    conn::{ConnBatchState, conn_ring_bytes},
    watch::{MAX_WATCHED, WatchFlags},
};
use thiserror::Error;

use crate::stamps::{StampKind, StampRings, Stamps};

use super::{
    conn_ring::{BatchFlush, ConnRing},
    tracefs::{self, CONN_TRACEPOINTS, ConnTracepoint, Tracefs, TracefsError},
};

/// The eBPF object built by build.rs (aya-build) from observer-ebpf.
static OBSERVER_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error(transparent)]
    Missing(#[from] MissingInObject),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the watched-address map is full ({capacity} entries): {ip} is not watched")]
    WatchMapFull { capacity: u32, ip: IpAddr },
    #[error("no connection tracepoint could be attached: {0}")]
    NoHook(String),
    #[error("reading the CPU count from {0} (the ring buffer is sized by it): {1}")]
    Cpus(&'static str, #[source] std::io::Error),
}

/// A program or map the agent needs that the eBPF object does not have
/// (an agent built against another object): the one error for it, which
/// the kernel, dataplane and flows errors wrap.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the eBPF object has no {kind} named {name}")]
pub struct MissingInObject {
    pub kind: &'static str,
    pub name: &'static str,
}

/// Program `name` of the object, to be converted to its type by the caller.
pub fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, MissingInObject> {
    ebpf.program_mut(name).ok_or(MissingInObject {
        kind: "program",
        name,
    })
}

/// Takes map `name` out of the object (one owner per map).
pub fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, MissingInObject> {
    ebpf.take_map(name)
        .ok_or(MissingInObject { kind: "map", name })
}

/// Whether one hook works on this kernel, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookStatus {
    /// e.g. `tracepoint/sock/inet_sock_set_state`.
    pub name: String,
    pub attached: bool,
    /// Why it failed, or what it is attached to.
    pub detail: String,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Emit an aya-log debug line per event from the kernel (debugging only).
    pub log_events: bool,
    /// Write every event to the ring buffer on its own instead of queuing
    /// it in its CPU's batch (for comparisons; batching is cheaper).
    pub unbatched: bool,
    /// Copy every tracepoint record before reading it, as the programs do
    /// on kernels whose record layout differs from the compiled-in one
    /// (so that this path can be tested on any kernel).
    pub copy_records: bool,
    /// Time netlink datagrams at their receipt instead of by the socket
    /// filters' kernel stamps (so that the fallback can be tested on any
    /// kernel).
    pub receipt_timing: bool,
}

/// How connection events reach the ring buffer on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Queued per CPU and flushed by the agent, or else one by one.
    pub batched: bool,
    /// Why not, when not.
    pub detail: String,
}

/// Counters kept by the programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub emitted: u64,
    pub lost: u64,
    pub filtered: u64,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Kernel {
    ebpf: Ebpf,
    watched: HashMap<MapData, WatchKey, WatchFlags>,
    /// Count and occupied slots of `watched`, for the programs.
    watch_filter: Array<MapData, WatchFilter>,
    /// The direct-mapped table in front of `watched`.
    watch_slots: Array<MapData, WatchSlot>,
    /// The keys of `watched`, to rebuild a slot when one of its keys leaves.
    watched_keys: HashSet<WatchKey>,
    stats: PerCpuArray<MapData, u64>,
    conn_events: Option<ConnRing>,
    delivery: Delivery,
    hooks: Vec<HookStatus>,
    reset_reasons: std::collections::HashMap<u32, String>,
    layout: TracepointLayout,
    stamps: StampRings,
}

impl Kernel {
    pub fn load(options: LoadOptions) -> Result<Self, KernelError> {
        raise_memlock_limit();
        let tracefs = Tracefs::find_or_mount()?;
        let formats = CONN_TRACEPOINTS.map(|tp| tracefs.format(tp.category, tp.name));
        let [set_state, send_reset, receive_reset] = &formats;
        // set_state is required; a missing reset tracepoint only loses its events.
        let set_state = set_state
            .as_ref()
            .map_err(|e| KernelError::NoHook(e.to_string()))?;
        let mut layout = tracefs::conn_layout(
            set_state,
            send_reset.as_ref().ok(),
            receive_reset.as_ref().ok(),
        )?;
        layout.log_events = u8::from(options.log_events);
        if options.copy_records {
            layout.direct = 0;
        }
        let reset_reasons = send_reset
            .as_ref()
            .map(|f| f.symbols("reason"))
            .unwrap_or_default();

        let cpus = aya::util::nr_cpus().map_err(|(path, e)| KernelError::Cpus(path, e))?;
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .map_max_entries("CONN_EVENTS", conn_ring_bytes(cpus))
            .load(OBSERVER_OBJECT)
            .map_err(KernelError::Load)?;
        if options.log_events {
            start_kernel_log(&mut ebpf);
        }

        let hooks = attach_tracepoints(&mut ebpf, &formats, layout.direct)?;

        let watched: HashMap<_, _, _> = typed_map(&mut ebpf, "WATCHED")?;
        let watch_filter: Array<_, _> = typed_map(&mut ebpf, "WATCH_FILTER")?;
        let watch_slots: Array<_, _> = typed_map(&mut ebpf, "WATCH_SLOTS")?;
        let stats: PerCpuArray<_, _> = typed_map(&mut ebpf, "STATS")?;
        let conn_events: RingBuf<_> = typed_map(&mut ebpf, "CONN_EVENTS")?;
        let batch_state: PerCpuArray<_, _> = typed_map(&mut ebpf, "CONN_BATCH_STATE")?;
        let (batches, delivery) = if options.unbatched {
            (None, Delivery::one_by_one("turned off by the caller"))
        } else {
            prepare_batches(&mut ebpf, batch_state)
        };
        let stamps = if options.receipt_timing {
            StampRings::off("turned off by the caller")
        } else {
            StampRings::take_from(&mut ebpf)
        };
        let mut kernel = Kernel {
            ebpf,
            watched,
            watch_filter,
            watch_slots,
            watched_keys: HashSet::new(),
            stats,
            conn_events: Some(ConnRing::new(conn_events, batches)),
            delivery,
            hooks,
            reset_reasons,
            layout,
            stamps,
        };
        // The filter carries the delivery mode to the programs.
        kernel.write_filter()?;
        Ok(kernel)
    }

    /// How connection events reach the ring buffer.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Hooks tried at load, attached or not.
    pub fn hooks(&self) -> &[HookStatus] {
        &self.hooks
    }

    /// The record layout handed to the programs, read from this kernel's
    /// tracepoint formats.
    pub fn layout(&self) -> &TracepointLayout {
        &self.layout
    }

    /// The kernel's names of `sk_rst_reason` values, from tracefs.
    pub fn reset_reasons(&self) -> &std::collections::HashMap<u32, String> {
        &self.reset_reasons
    }

    /// The loaded object, for program statistics.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The loaded object, for sources that attach programs of their own.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The kernel stamps of one socket's datagrams, each kind handed out
    /// once; else why that socket is timed at receipt.
    pub fn take_stamps(&mut self, kind: StampKind) -> Stamps {
        self.stamps.take(kind)
    }

    /// Whether the stamps of `kind` are still here to be taken, or why not.
    pub fn stamps_available(&self, kind: StampKind) -> Result<(), String> {
        self.stamps.available(kind)
    }

    /// The connection event ring buffer; there is one reader, so it is handed out once.
    pub fn take_conn_events(&mut self) -> Option<ConnRing> {
        self.conn_events.take()
    }

    pub fn watch_ip(&mut self, ip: IpAddr) -> Result<(), KernelError> {
        let key = watch_key(ip);
        // Into the map before its slot: a program sent to the map by a
        // shared slot must find the address there.
        match self.watched.insert(key, 1, 0) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                return Err(KernelError::WatchMapFull {
                    capacity: MAX_WATCHED,
                    ip,
                });
            }
            Err(source) => {
                return Err(KernelError::Map {
                    name: "WATCHED",
                    source,
                });
            }
        }
        if self.watched_keys.insert(key) {
            self.write_slot(key.slot())?;
            self.write_filter()?;
        }
        Ok(())
    }

    /// Stops watching `ip`; unwatching an address that is not watched is not an error.
    pub fn unwatch_ip(&mut self, ip: IpAddr) -> Result<(), KernelError> {
        let key = watch_key(ip);
        if self.watched_keys.remove(&key) {
            self.write_filter()?;
            self.write_slot(key.slot())?;
        }
        match self.watched.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(KernelError::Map {
                name: "WATCHED",
                source,
            }),
        }
    }

    /// Rewrites one slot from the watched keys that have it. A concurrent
    /// reader may see a slot half rewritten for the microseconds of the
    /// copy: at worst it misses an address being watched or unwatched at
    /// that very moment.
    fn write_slot(&mut self, index: u32) -> Result<(), KernelError> {
        let slot = WatchSlot::of(self.watched_keys.iter().filter(|k| k.slot() == index));
        self.watch_slots
            .set(index, slot, 0)
            .map_err(|source| KernelError::Map {
                name: "WATCH_SLOTS",
                source,
            })
    }

    /// Rewrites the whole filter: a concurrent reader sees every bit that
    /// stays set as set, since the bytes copied over it are the same.
    fn write_filter(&mut self) -> Result<(), KernelError> {
        let mut filter = WatchFilter::of(&self.watched_keys);
        filter.batched = u32::from(self.delivery.batched);
        self.watch_filter
            .set(0, filter, 0)
            .map_err(|source| KernelError::Map {
                name: "WATCH_FILTER",
                source,
            })
    }

    pub fn stats(&self) -> Result<Stats, KernelError> {
        let read = |stat: Stat| -> Result<u64, KernelError> {
            let values = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(|source| KernelError::Map {
                    name: "STATS",
                    source,
                })?;
            Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(Stats {
            emitted: read(Stat::Emitted)?,
            lost: read(Stat::Lost)?,
            filtered: read(Stat::Filtered)?,
        })
    }
}

impl Delivery {
    fn one_by_one(why: &str) -> Self {
        Delivery {
            batched: false,
            detail: format!("one ring record per event: {why}"),
        }
    }
}

pub fn watch_key(ip: IpAddr) -> WatchKey {
    match ip {
        IpAddr::V4(v4) => WatchKey::from_v4(v4.octets()),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(
            || WatchKey::from_v6(v6.octets()),
            |v4| WatchKey::from_v4(v4.octets()),
        ),
    }
}

/// Attaches the connection tracepoints whose format tracefs gave; at least
/// one must attach. `direct` has a bit per tracepoint whose record is read
/// in place.
fn attach_tracepoints(
    ebpf: &mut Ebpf,
    formats: &[Result<tracefs::EventFormat, TracefsError>],
    direct: u8,
) -> Result<Vec<HookStatus>, KernelError> {
    let mut hooks = Vec::new();
    for (tp, format) in CONN_TRACEPOINTS.iter().zip(formats) {
        let status = match format {
            Err(e) => HookStatus {
                name: format!("tracepoint/{}/{}", tp.category, tp.name),
                attached: false,
                detail: e.to_string(),
            },
            Ok(_) => attach_tracepoint(ebpf, tp, direct & tp.direct_bit != 0),
        };
        if status.attached {
            tracing::debug!(hook = %status.name, "attached");
        } else {
            tracing::warn!(hook = %status.name, reason = %status.detail, "hook unavailable; its events will be missing");
        }
        hooks.push(status);
    }
    if !hooks.iter().any(|h| h.attached) {
        let reasons: Vec<String> = hooks
            .iter()
            .map(|h| format!("{}: {}", h.name, h.detail))
            .collect();
        return Err(KernelError::NoHook(reasons.join("; ")));
    }
    Ok(hooks)
}

/// Per-CPU batches where the flush program loads, else one event at a time
/// (reported as the delivery's detail).
fn prepare_batches(
    ebpf: &mut Ebpf,
    batch_state: PerCpuArray<MapData, ConnBatchState>,
) -> (Option<BatchFlush>, Delivery) {
    match BatchFlush::prepare(ebpf, batch_state) {
        Ok(flush) => (
            Some(flush),
            Delivery {
                batched: true,
                detail: "queued per CPU, flushed before every read".into(),
            },
        ),
        Err(reason) => {
            tracing::warn!(%reason, "connection events go to the ring buffer one by one, which costs more per event");
            (None, Delivery::one_by_one(&reason))
        }
    }
}

/// Takes map `name` out of the object as the type the loader uses it as.
fn typed_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, KernelError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = take_map(ebpf, name)?;
    M::try_from(map).map_err(|source| KernelError::Map { name, source })
}

fn attach_tracepoint(ebpf: &mut Ebpf, tp: &ConnTracepoint, read_directly: bool) -> HookStatus {
    let ConnTracepoint {
        category,
        name,
        program,
        ..
    } = *tp;
    let hook = format!("tracepoint/{category}/{name}");
    let result = (|| -> Result<(), String> {
        let prog: &mut TracePoint = program_mut(ebpf, program)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        prog.load().map_err(|e| format!("rejected at load: {e}"))?;
        prog.attach(category, name)
            .map_err(|e| format!("attach failed: {e}"))?;
        Ok(())
    })();
    match result {
        Ok(()) => HookStatus {
            name: hook,
            attached: true,
            detail: if read_directly {
                format!("program {program}, record read in place")
            } else {
                format!(
                    "program {program}, record copied first (its layout is not the compiled-in one)"
                )
            },
        },
        Err(detail) => HookStatus {
            name: hook,
            attached: false,
            detail,
        },
    }
}

/// Forwards aya-log records from the programs to the agent's log (debug level).
fn start_kernel_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns the log ring buffer's fd until dropped, which
        // happens only with the AsyncFd.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = fd.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot poll the eBPF log buffer"),
        },
        Err(e) => tracing::warn!(error = %e, "eBPF logging unavailable"),
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use
/// memory cgroups and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}
