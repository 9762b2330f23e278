//! The `syscalls/sys_{enter,exit}_bpf` programs (observer-ebpf
//! `cilium.rs`), and those that see the writer close a descriptor or
//! exit: attached here, told the writer and its descriptors' kinds, and
//! read back as [`MapWrite`]s, each the writer's bpf() syscall that wrote
//! a followed (or not yet classified) map, with its kernel times at entry
//! and exit, or a close or exit.

use std::{os::fd::AsRawFd, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use observer_common::cilium::{
    CLOSE_FD_OFFSET, CiliumStat, ENTER_CMD_OFFSET, ENTER_UATTR_OFFSET, EXIT_RET_OFFSET, MapWrite,
    WriterFilter, fd_key,
};
use thiserror::Error;

use crate::kernel::{self, MissingInObject, tracefs::Tracefs};

#[derive(Debug, Error)]
pub enum TracepointError {
    #[error(transparent)]
    Missing(#[from] MissingInObject),
    #[error("tracefs: {0}")]
    Tracefs(#[from] kernel::tracefs::TracefsError),
    #[error(
        "syscalls/{event}: field {field} at offset {found}, the program reads it at {expected}"
    )]
    Layout {
        event: &'static str,
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// (program, category, event).
const PROGRAMS: [(&str, &str, &str); 4] = [
    ("cilium_bpf_enter", "syscalls", "sys_enter_bpf"),
    ("cilium_bpf_exit", "syscalls", "sys_exit_bpf"),
    ("cilium_close", "syscalls", "sys_enter_close"),
    ("cilium_exit", "sched", "sched_process_exit"),
];

/// `BPF_EXIST`: update an entry only if it is there.
const BPF_EXIST: u64 = 2;

/// The attached programs' maps.
pub struct WriteEvents {
    fds: HashMap<MapData, u64, u8>,
    writes: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for WriteEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteEvents").finish_non_exhaustive()
    }
}

fn check_offset(
    tracefs: &Tracefs,
    event: &'static str,
    field: &'static str,
    expected: usize,
) -> Result<(), TracepointError> {
    let found = tracefs.format("syscalls", event)?.field(field)?.offset;
    if found == expected {
        Ok(())
    } else {
        Err(TracepointError::Layout {
            event,
            field,
            found,
            expected,
        })
    }
}

fn typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, TracepointError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    kernel::take_map(ebpf, name)?
        .try_into()
        .map_err(|source| TracepointError::Map { name, source })
}

/// A `CILIUM_FDS` call that found no entry (ENOENT: the descriptor was
/// closed, or never marked) is no error.
fn gone_is_fine(result: Result<(), aya::maps::MapError>) -> Result<(), TracepointError> {
    match result {
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.map_err(|source| TracepointError::Map {
            name: "CILIUM_FDS",
            source,
        }),
    }
}

impl WriteEvents {
    /// Checks the tracepoints' record layout, loads and attaches both
    /// programs and tells them which writer to follow.
    pub fn attach(ebpf: &mut Ebpf, writer: WriterFilter) -> Result<WriteEvents, TracepointError> {
        let tracefs = Tracefs::find_or_mount()?;
        check_offset(&tracefs, "sys_enter_bpf", "cmd", ENTER_CMD_OFFSET)?;
        check_offset(&tracefs, "sys_enter_bpf", "uattr", ENTER_UATTR_OFFSET)?;
        check_offset(&tracefs, "sys_exit_bpf", "ret", EXIT_RET_OFFSET)?;
        check_offset(&tracefs, "sys_enter_close", "fd", CLOSE_FD_OFFSET)?;
        let mut filter: Array<MapData, WriterFilter> = typed(ebpf, "CILIUM_WRITER")?;
        filter
            .set(0, writer, 0)
            .map_err(|source| TracepointError::Map {
                name: "CILIUM_WRITER",
                source,
            })?;
        for (program, category, event) in PROGRAMS {
            let prog: &mut TracePoint = kernel::program_mut(ebpf, program)?
                .try_into()
                .map_err(|source| TracepointError::Program { program, source })?;
            prog.load()
                .and_then(|()| prog.attach(category, event).map(drop))
                .map_err(|source| TracepointError::Program { program, source })?;
        }
        Ok(WriteEvents {
            fds: typed(ebpf, "CILIUM_FDS")?,
            writes: typed(ebpf, "CILIUM_WRITES")?,
            stats: typed(ebpf, "CILIUM_STATS")?,
        })
    }

    /// Tells the programs what descriptor `fd` of process `tgid` is
    /// (`FD_*`): a followed map, whose writes they send (a batch's
    /// elements with the kind's sizes), or another, whose writes they drop.
    /// Only while their entry for it is there: a descriptor closed since
    /// the write that named it is not marked again (its number may be
    /// another map's by now).
    pub fn classify(&mut self, tgid: u32, fd: u32, kind: u8) -> Result<(), TracepointError> {
        gone_is_fine(self.fds.insert(fd_key(tgid, fd), kind, BPF_EXIST))
    }

    /// Drops the programs' entry for descriptor `fd` of process `tgid`.
    pub fn forget(&mut self, tgid: u32, fd: u32) -> Result<(), TracepointError> {
        gone_is_fine(self.fds.remove(&fd_key(tgid, fd)))
    }

    /// Waits up to `timeout` for a write to read.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.writes.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd. An error or a timeout both mean "look again".
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    }

    /// The next write the programs sent, if any.
    pub fn next_write(&mut self) -> Option<MapWrite> {
        let item = self.writes.next()?;
        (item.len() >= size_of::<MapWrite>())
            // SAFETY: the programs write whole MapWrites; read unaligned.
            .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MapWrite>()) })
    }

    /// The programs' counters, summed over the CPUs.
    pub fn stats(&self) -> Result<Vec<(CiliumStat, u64)>, TracepointError> {
        CiliumStat::ALL
            .into_iter()
            .map(|stat| {
                let per_cpu =
                    self.stats
                        .get(&(stat as u32), 0)
                        .map_err(|source| TracepointError::Map {
                            name: "CILIUM_STATS",
                            source,
                        })?;
                Ok((stat, per_cpu.iter().sum()))
            })
            .collect()
    }
}
