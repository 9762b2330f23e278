//! The connection event ring buffer and the per-CPU batches in front of it
//! (observer-ebpf/src/delivery.rs). Before each read of the ring, the
//! batches of the CPUs that queued events are emptied into it by running
//! the `flush_conn_batch` program on those CPUs (`BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_RUN_ON_CPU`, kernel 5.10 and later); a kernel that cannot run
//! it gets its events written to the ring one by one instead.

use std::os::fd::{AsRawFd, RawFd};

use aya::{
    Ebpf,
    maps::{MapData, MapError, PerCpuArray, RingBuf, ring_buf::RingBufItem},
    programs::{ProgramError, RawTracePoint, RawTracePointRunOptions, TestRun},
};
use observer_common::conn::ConnBatchState;
use thiserror::Error;

/// The program, in observer-ebpf, that hands its CPU's batch to the ring.
pub const FLUSH_PROGRAM: &str = "flush_conn_batch";

#[derive(Debug, Error)]
pub enum FlushError {
    #[error("reading the per-CPU batch lengths: {0}")]
    State(#[source] MapError),
    #[error("running {FLUSH_PROGRAM} on CPU {cpu}: {source}")]
    Run {
        cpu: u32,
        #[source]
        source: ProgramError,
    },
}

/// Empties the CPUs' batches into the ring.
pub struct BatchFlush {
    program: RawTracePoint,
    state: PerCpuArray<MapData, ConnBatchState>,
}

impl BatchFlush {
    /// Loads the flush program and runs it once here; `Err` says why the
    /// programs must write events one by one on this kernel.
    pub(super) fn prepare(
        ebpf: &mut Ebpf,
        state: PerCpuArray<MapData, ConnBatchState>,
    ) -> Result<BatchFlush, String> {
        let program: &mut RawTracePoint = ebpf
            .program_mut(FLUSH_PROGRAM)
            .ok_or_else(|| format!("program {FLUSH_PROGRAM} missing from the object"))?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        program
            .load()
            .map_err(|e| format!("{FLUSH_PROGRAM} rejected at load: {e}"))?;
        // An owned handle on the loaded program, so that the ring's reader
        // can run it without the whole object.
        let info = program.info().map_err(|e| e.to_string())?;
        let program = RawTracePoint::from_program_info(info, FLUSH_PROGRAM.into())
            .map_err(|e| e.to_string())?;
        let flush = BatchFlush { program, state };
        flush
            .run_on(None)
            .map_err(|e| format!("the kernel cannot run {FLUSH_PROGRAM} on demand: {e}"))?;
        Ok(flush)
    }

    /// Runs the flush on every CPU that has queued events; returns how many.
    pub fn flush(&self) -> Result<u32, FlushError> {
        let lengths = self.state.get(&0, 0).map_err(FlushError::State)?;
        let mut flushed = 0;
        for (cpu, state) in (0u32..).zip(lengths.iter()) {
            if state.len == 0 {
                continue;
            }
            self.run_on(Some(cpu))
                .map_err(|source| FlushError::Run { cpu, source })?;
            flushed += 1;
        }
        Ok(flushed)
    }

    fn run_on(&self, cpu: Option<u32>) -> Result<(), ProgramError> {
        let mut options = RawTracePointRunOptions::new();
        options.cpu = cpu;
        self.program.test_run(options).map(drop)
    }
}

/// The ring and, where the kernel runs it, the flush of the batches.
pub struct ConnRing {
    ring: RingBuf<MapData>,
    batches: Option<BatchFlush>,
}

impl ConnRing {
    pub(super) fn new(ring: RingBuf<MapData>, batches: Option<BatchFlush>) -> Self {
        ConnRing { ring, batches }
    }

    /// Hands every CPU's queued events to the ring; call before reading it.
    /// Returns the CPUs flushed.
    pub fn flush_batches(&self) -> Result<u32, FlushError> {
        self.batches.as_ref().map_or(Ok(0), BatchFlush::flush)
    }

    /// The next record: one to `CONN_BATCH_LEN` events back to back.
    pub fn next_record(&mut self) -> Option<RingBufItem<'_>> {
        self.ring.next()
    }
}

impl AsRawFd for ConnRing {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
