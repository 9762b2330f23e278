//! Feature probing: which program types, maps and hooks work on this kernel.
//! `observer-agent probe` prints the table; `run` sends it to the aggregator.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};
use serde::Serialize;

use super::{Delivery, HookStatus, Kernel, LoadOptions, tracefs::Tracefs};

/// One row of the capability table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub name: String,
    pub available: bool,
    pub detail: String,
    /// The agent cannot observe the destination side without it.
    pub required: bool,
}

impl Capability {
    fn new(
        name: impl Into<String>,
        available: bool,
        detail: impl Into<String>,
        required: bool,
    ) -> Self {
        Capability {
            name: name.into(),
            available,
            detail: detail.into(),
            required,
        }
    }
}

/// Probes everything; loads and attaches the real programs to find out
/// whether the hooks work (then detaches them again).
pub fn probe() -> Vec<Capability> {
    let mut table = probe_kernel();
    match Kernel::load(LoadOptions::default()) {
        Ok(kernel) => {
            table.extend(hook_capabilities(kernel.hooks()));
            table.push(delivery_capability(kernel.delivery()));
        }
        Err(e) => table.push(Capability::new("ebpf/load", false, e.to_string(), true)),
    }
    table
}

/// The hooks of a loaded [`Kernel`] as capability rows.
pub fn hook_capabilities(hooks: &[HookStatus]) -> Vec<Capability> {
    hooks
        .iter()
        .map(|h| {
            Capability::new(
                h.name.clone(),
                h.attached,
                h.detail.clone(),
                h.name.ends_with("inet_sock_set_state"),
            )
        })
        .collect()
}

/// Whether events are batched per CPU: without it every event costs a ring
/// buffer reservation (more kernel time per event), nothing is lost.
pub fn delivery_capability(delivery: &Delivery) -> Capability {
    Capability::new(
        "delivery/per-cpu event batches",
        delivery.batched,
        delivery.detail.clone(),
        false,
    )
}

/// Program and map types, kernel files and tracefs, without loading the
/// project's programs.
pub fn probe_kernel() -> Vec<Capability> {
    let mut table = Vec::new();
    for (name, ty, required) in [
        ("program/tracepoint", ProgramType::TracePoint, true),
        ("program/raw_tracepoint", ProgramType::RawTracePoint, false),
        ("program/socket_filter", ProgramType::SocketFilter, false),
        ("program/sched_cls", ProgramType::SchedClassifier, false),
        ("program/kprobe", ProgramType::KProbe, false),
        (
            "program/tracing (fentry/fexit)",
            ProgramType::Tracing,
            false,
        ),
    ] {
        table.push(match is_program_supported(ty) {
            Ok(ok) => Capability::new(
                name,
                ok,
                if ok {
                    "loads"
                } else {
                    "rejected by the kernel"
                },
                required,
            ),
            Err(e) => Capability::new(name, false, e.to_string(), required),
        });
    }
    for (name, ty) in [
        ("map/ringbuf", MapType::RingBuf),
        ("map/hash", MapType::Hash),
        ("map/percpu_array", MapType::PerCpuArray),
    ] {
        table.push(match is_map_supported(ty) {
            Ok(ok) => Capability::new(
                name,
                ok,
                if ok {
                    "creates"
                } else {
                    "rejected by the kernel"
                },
                true,
            ),
            Err(e) => Capability::new(name, false, e.to_string(), true),
        });
    }
    table.push(path_capability(
        "btf/vmlinux",
        "/sys/kernel/btf/vmlinux",
        "kernel BTF: needed for fentry/fexit and to read kernel struct offsets",
        false,
    ));
    // perf_kprobe PMU: without it kprobes cannot attach even if the program
    // type loads (the case on this project's reference kernel).
    table.push(path_capability(
        "pmu/kprobe",
        "/sys/bus/event_source/devices/kprobe",
        "kprobe PMU for kprobe attachment",
        false,
    ));
    table.push(path_capability(
        "sysctl/bpf_stats_enabled",
        "/proc/sys/kernel/bpf_stats_enabled",
        "per-program run time statistics",
        false,
    ));
    table.push(match Tracefs::find_or_mount() {
        Ok(_) => Capability::new("tracefs", true, "mounted", true),
        Err(e) => Capability::new("tracefs", false, e.to_string(), true),
    });
    table
}

fn path_capability(name: &str, path: &str, what: &str, required: bool) -> Capability {
    let ok = Path::new(path).exists();
    Capability::new(
        name,
        ok,
        if ok {
            what.to_owned()
        } else {
            format!("{path} missing: no {what}")
        },
        required,
    )
}

/// True when every required capability is available.
pub fn all_required_available(table: &[Capability]) -> bool {
    table.iter().all(|c| c.available || !c.required)
}
