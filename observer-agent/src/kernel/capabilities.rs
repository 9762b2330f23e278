//! Feature probing: which program types, maps and hooks work on this kernel.
//! `observer-agent probe` prints the table; `run` sends it to the aggregator.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};
use observer_common::{TcpSendResetAddrs, TracepointLayout};
use serde::Serialize;

use super::{Delivery, HookStatus, Kernel, LoadOptions, tracefs::Tracefs};
use crate::dataplane::{
    CommitTiming, KprobeStatus,
    cilium::{CiliumDetector, CiliumOptions, CiliumTiming},
    commit_kprobe,
};
use crate::receipt::SchedStat;
use crate::stamps::{self, StampKind, Timing};

/// One row of the capability table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub name: String,
    pub available: bool,
    pub detail: String,
    /// The agent cannot observe the destination side without it.
    pub required: bool,
    /// What the user loses on this node while it is missing.
    pub cost: &'static str,
}

impl Capability {
    fn new(
        name: impl Into<String>,
        available: bool,
        detail: impl Into<String>,
        required: bool,
    ) -> Self {
        let name = name.into();
        Capability {
            cost: cost(&name),
            name,
            available,
            detail: detail.into(),
            required,
        }
    }
}

/// The name of the row saying whether `tcp_send_reset` fires for resets
/// sent without a socket.
pub const RESETS_WITHOUT_SOCKET: &str = "tcp_send_reset/refused connections";

const NOTHING_OBSERVED: &str =
    "nothing is observed on this node: no connection, refusal or reset of its pods is seen";

/// What each capability's absence costs, by row name.
fn cost(name: &str) -> &'static str {
    match name {
        "program/tracepoint" | "map/ringbuf" | "map/hash" | "map/percpu_array" | "tracefs"
        | "ebpf/load" => NOTHING_OBSERVED,
        "tracepoint/sock/inet_sock_set_state" => {
            "connections to this node's pods are not seen (accepted, closed, keep-alive endings): the last connection each router sent is unknown"
        }
        "tracepoint/tcp/tcp_send_reset" => {
            "resets sent by this node's pods are not seen, refused connections included: routers still sending to a stopped pod go unnoticed"
        }
        RESETS_WITHOUT_SOCKET => {
            "refused connections to this node's pods (nothing listening any more) are not seen: routers still sending after the app stopped go unnoticed; resets sent by open sockets are"
        }
        "tracepoint/tcp/tcp_receive_reset" => "resets received by this node's pods are not seen",
        "program/raw_tracepoint" | "delivery/per-cpu event batches" => {
            "events are written one by one: more kernel time per event, none lost"
        }
        "program/socket_filter" => {
            "new flows to watched pods are not seen from this node (source side of the last connection)"
        }
        "program/kprobe" | "pmu/kprobe" | "kprobe/nf_tables_commit" | "kprobe/xt_replace_table" => {
            "ruleset changes are timed by their netlink notification or re-read, not by the kernel's commit: times are up to a few ms late"
        }
        CILIUM_MAPS => {
            "Cilium's service maps are not read: on a node where Cilium replaces kube-proxy, no backend removal is timed here"
        }
        CILIUM_TIMING => {
            "Cilium's map writes are timed by a read-only poll of the watched frontends: up to the poll interval late"
        }
        "sysctl/bpf_stats_enabled" => "the run time of the agent's eBPF programs is not reported",
        SCHED_STATS => {
            "a datagram timed at its receipt claims everything since its socket was last empty as its precision, not its reader's measured wake-up"
        }
        "timing/nf_tables notifications" => {
            "rule changes are timed when the agent's thread reads their notification, not by the kernel: late by that thread's wait for a core (claimed as the precision), tens of ms at normal priority on a busy node"
        }
        "timing/conntrack new flows" => {
            "new flows are timed when the agent's thread reads their event, not when the kernel confirmed them: milliseconds late on a busy node"
        }
        _ => "nothing the agent uses today",
    }
}

pub const CILIUM_MAPS: &str = "cilium/service maps";
pub const SCHED_STATS: &str = "sched/run delay";
pub const CILIUM_TIMING: &str = "timing/cilium map writes";

/// Probes everything; loads and attaches the real programs to find out
/// whether the hooks work (then detaches them again).
pub fn probe(cilium: &CiliumOptions) -> Vec<Capability> {
    let mut table = probe_kernel();
    match Kernel::load(LoadOptions::default()) {
        Ok(mut kernel) => {
            table.extend(hook_capabilities(kernel.hooks()));
            table.push(resets_without_socket_capability(kernel.layout()));
            table.push(delivery_capability(kernel.delivery()));
            table.extend(timing_capabilities(&mut kernel));
            table.extend(match commit_kprobe::load(kernel.ebpf_mut()) {
                Ok(setup) => commit_timing_capabilities(&setup.statuses),
                Err(e) => vec![Capability::new(
                    "kprobe/ruleset commits",
                    false,
                    e.to_string(),
                    false,
                )],
            });
            table.extend(cilium_capabilities(Some(kernel.ebpf_mut()), cilium));
        }
        Err(e) => table.push(Capability::new("ebpf/load", false, e.to_string(), true)),
    }
    table
}

/// The Cilium detector as it would start: the maps found (or why none are
/// read, an unknown layout named) and how their writes are timed.
pub fn cilium_capabilities(
    ebpf: Option<&mut aya::Ebpf>,
    options: &CiliumOptions,
) -> Vec<Capability> {
    match CiliumDetector::open(ebpf, options) {
        Ok((_, status)) => {
            let maps: Vec<String> = status
                .maps
                .iter()
                .map(|(name, info)| {
                    format!(
                        "{name} (id {}, key {}, value {}, {} entries max)",
                        info.id, info.shape.key_size, info.shape.value_size, info.max_entries
                    )
                })
                .collect();
            let timing = match &status.timing {
                CiliumTiming::Syscall => Capability::new(
                    CILIUM_TIMING,
                    true,
                    "syscalls/sys_enter_bpf and sys_exit_bpf attached: a write is timed by the writer's bpf() syscall",
                    false,
                ),
                CiliumTiming::Polling { interval, why } => Capability::new(
                    CILIUM_TIMING,
                    false,
                    format!("polled every {} ms: {why}", interval.as_millis()),
                    false,
                ),
            };
            vec![
                Capability::new(
                    CILIUM_MAPS,
                    true,
                    format!(
                        "{} under {}: the layout of Cilium after 1.19",
                        maps.join(", "),
                        status.pin_dir.display()
                    ),
                    false,
                ),
                timing,
            ]
        }
        Err(e) => vec![Capability::new(CILIUM_MAPS, false, e.to_string(), false)],
    }
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
                REQUIRED_HOOKS.iter().any(|r| h.name.ends_with(r)),
            )
        })
        .collect()
}

/// The hooks without which a node's measurements lose their core evidence:
/// the connections routed to a pod and the resets (refusals) it sent.
const REQUIRED_HOOKS: [&str; 2] = ["inet_sock_set_state", "tcp_send_reset"];

/// How ruleset commits are timed, one row per commit probe: available when
/// the kernel's commit time is used.
pub fn commit_timing_capabilities(statuses: &[KprobeStatus]) -> Vec<Capability> {
    statuses
        .iter()
        .map(|s| {
            let detail = match &s.timing {
                CommitTiming::Kprobe => "commits timed by the kernel".to_owned(),
                CommitTiming::Detector(why) => why.clone(),
            };
            Capability::new(
                format!("kprobe/{}", s.function),
                s.attached(),
                detail,
                false,
            )
        })
        .collect()
}

/// Whether this kernel's `tcp_send_reset` fires for resets sent without a
/// socket, i.e. for refused connections. Kernels before 6.10 fire it only
/// for resets sent by a socket; the record layout changed with that (its
/// addresses became `sockaddr`s taken from the packet), so the layout tells
/// which behaviour this kernel has. Not required: the rest still measures.
pub fn resets_without_socket_capability(layout: &TracepointLayout) -> Capability {
    let sockaddr = layout.send_reset_addrs == TcpSendResetAddrs::Sockaddr as u8;
    Capability::new(
        RESETS_WITHOUT_SOCKET,
        sockaddr,
        if sockaddr {
            "the record's addresses come from the packet (kernel 6.10 or later)"
        } else {
            "the record's addresses come from the socket: kernels before 6.10 do not fire it without one"
        },
        false,
    )
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

/// How the source side's netlink datagrams are timed: by the socket
/// filters' kernel stamps, or at receipt (the row is missing).
pub fn timing_capabilities(kernel: &mut Kernel) -> Vec<Capability> {
    StampKind::ALL
        .into_iter()
        .map(|kind| {
            let timing = stamps::probe(kernel, kind);
            Capability::new(
                format!("timing/{kind}"),
                timing == Timing::KernelStamp,
                timing.to_string(),
                false,
            )
        })
        .collect()
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
    table.push(path_capability(
        "pmu/kprobe",
        commit_kprobe::KPROBE_PMU,
        "kprobe PMU for kprobe attachment",
        false,
    ));
    table.push(path_capability(
        "sysctl/bpf_stats_enabled",
        "/proc/sys/kernel/bpf_stats_enabled",
        "per-program run time statistics",
        false,
    ));
    table.push(match SchedStat::open() {
        Ok(_) => Capability::new(
            SCHED_STATS,
            true,
            "the reader threads' waits for a core are measured",
            false,
        ),
        Err(e) => Capability::new(SCHED_STATS, false, e.to_string(), false),
    });
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
    missing_required(table).next().is_none()
}

/// The required capabilities that are missing.
pub fn missing_required(table: &[Capability]) -> impl Iterator<Item = &Capability> {
    table.iter().filter(|c| c.required && !c.available)
}
