//! Reference programs measured beside the real ones, in the same storms: an
//! empty program (the floor: tracepoint dispatch, the call into the program
//! and bpf_stats' own clock reads, which every program pays) and one that
//! only reads the clock (`bpf_ktime_get_ns`, which every emitting invocation
//! pays). They run on the same tracepoints at the same moments as the real
//! programs, so a host that is slower or busier moves them together, and
//! the difference is the part of the cost the programs' code decides.
//!
//! Loaded with raw `bpf(2)` and `perf_event_open(2)`: two or three
//! instructions each, not worth a second eBPF object.

use std::{
    ffi::CString,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{Context, bail};
use aya_obj::generated::{
    PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF, PERF_FLAG_FD_CLOEXEC, bpf_attr, bpf_cmd,
    bpf_insn, bpf_prog_info, bpf_prog_type, perf_event_attr, perf_type_id,
};
use observer_agent::kernel::tracefs::{ConnTracepoint, Tracefs};

/// `BPF_FUNC_ktime_get_ns`.
const KTIME_GET_NS: i32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Returns at once.
    Floor,
    /// Reads the clock once, then returns.
    Clock,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Floor, Kind::Clock];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Floor => "(empty program)",
            Kind::Clock => "(clock read only)",
        }
    }

    fn insns(self) -> Vec<bpf_insn> {
        let mut insns = Vec::new();
        if self == Kind::Clock {
            insns.push(insn(0x85, 0, 0, KTIME_GET_NS)); // call bpf_ktime_get_ns
        }
        insns.push(insn(0xb7, 0, 0, 0)); // r0 = 0
        insns.push(insn(0x95, 0, 0, 0)); // exit
        insns
    }
}

/// One reference program attached to one tracepoint.
pub struct Reference {
    pub kind: Kind,
    /// The real program sharing its tracepoint.
    pub program: &'static str,
    prog: OwnedFd,
    _event: OwnedFd,
}

impl Reference {
    pub fn attach(tracefs: &Tracefs, kind: Kind, tp: ConnTracepoint) -> anyhow::Result<Reference> {
        let prog = load(kind).with_context(|| format!("loading {}", kind.label()))?;
        let id = tracefs.event_id(tp.category, tp.name)?;
        let event = attach(&prog, id)
            .with_context(|| format!("attaching to {}/{}", tp.category, tp.name))?;
        Ok(Reference {
            kind,
            program: tp.program,
            prog,
            _event: event,
        })
    }

    /// (run_time, run_count) so far.
    pub fn stats(&self) -> anyhow::Result<(Duration, u64)> {
        let mut info: bpf_prog_info = unsafe { zeroed() };
        let mut attr: bpf_attr = unsafe { zeroed() };
        attr.info.bpf_fd = self.prog.as_raw_fd() as u32;
        attr.info.info_len = size_of::<bpf_prog_info>() as u32;
        attr.info.info = &mut info as *mut bpf_prog_info as u64;
        bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        Ok((Duration::from_nanos(info.run_time_ns), info.run_cnt))
    }
}

fn insn(code: u8, dst: u8, src: u8, imm: i32) -> bpf_insn {
    let mut insn: bpf_insn = unsafe { zeroed() };
    insn.code = code;
    insn.set_dst_reg(dst);
    insn.set_src_reg(src);
    insn.imm = imm;
    insn
}

fn load(kind: Kind) -> anyhow::Result<OwnedFd> {
    let insns = kind.insns();
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 4096];
    let mut attr: bpf_attr = unsafe { zeroed() };
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT as u32;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    load.log_level = 1;
    load.log_size = log.len() as u32;
    load.log_buf = log.as_mut_ptr() as u64;
    let name: &[u8] = match kind {
        Kind::Floor => b"bench_floor",
        Kind::Clock => b"bench_clock",
    };
    for (dst, src) in load.prog_name.iter_mut().zip(name) {
        *dst = *src as core::ffi::c_char;
    }
    match bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let log = String::from_utf8_lossy(&log);
            bail!("{e}; verifier log: {}", log.trim_end_matches('\0').trim())
        }
    }
}

fn attach(prog: &OwnedFd, tracepoint_id: u64) -> anyhow::Result<OwnedFd> {
    let mut attr: perf_event_attr = unsafe { zeroed() };
    attr.type_ = perf_type_id::PERF_TYPE_TRACEPOINT as u32;
    attr.size = size_of::<perf_event_attr>() as u32;
    attr.config = tracepoint_id;
    attr.__bindgen_anon_1.sample_period = 1;
    attr.__bindgen_anon_2.wakeup_events = 1;
    // Programs on a tracepoint run for its every hit, whichever CPU the
    // event itself was opened on.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const perf_event_attr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("perf_event_open");
    }
    let event = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    for (request, arg) in [
        (PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd() as libc::c_ulong),
        (PERF_EVENT_IOC_ENABLE, 0),
    ] {
        if unsafe { libc::ioctl(event.as_raw_fd(), request as _, arg) } < 0 {
            return Err(std::io::Error::last_os_error()).context("ioctl on the perf event");
        }
    }
    Ok(event)
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<RawFd> {
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret as RawFd)
    }
}
