//! The start-up sequence `run` and `observe` share: load the eBPF programs,
//! start the connection-event reader, then the source side (dataplane rule
//! detectors, ruleset commit kprobes, conntrack new flows), all feeding one
//! channel of observations. The commands differ only in what a source-side
//! failure means: [`SourceSide`].

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use observer_proto::Observation;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    clock::WallClock,
    dataplane::{self, DataplaneError, DataplaneWatch, Limits, cilium::CiliumOptions},
    flows::{self, FlowWatch},
    kernel::{Kernel, LoadOptions, conn_events},
    realtime::{self, TimingPriority},
    stamps::StampKind,
};

/// Capacity of the channel from the sources to the command's loop: a burst
/// beyond it backs up into the ring buffer, whose overflow the kernel counts.
pub const CHANNEL_CAPACITY: usize = 4096;

/// Whether and how the source side starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceSide {
    /// Not started (`observe --watch-ip` only: connections, no rules or flows).
    Off,
    /// A detector that cannot start is an error (`observe --watch-endpoint`:
    /// the user asked for it).
    Required,
    /// A detector that cannot start is logged and left out (`run`: the
    /// destination side still works without it).
    Degraded,
}

pub struct StartOptions {
    pub log_kernel_events: bool,
    /// SCHED_FIFO level of the source-side threads (0: normal policy).
    pub timing_priority: u8,
    pub source_side: SourceSide,
    /// Addresses put in the kernel's watched map before anything runs.
    pub watch_ips: Vec<IpAddr>,
    /// Endpoints the dataplane detectors watch from their start.
    pub watch_endpoints: Vec<SocketAddr>,
    pub cilium: CiliumOptions,
    pub dataplane: Limits,
}

/// The running sources; dropping the watches stops their threads.
pub struct Sources {
    pub kernel: Kernel,
    pub observations: mpsc::Receiver<Observation>,
    pub conn_reader: JoinHandle<std::io::Result<()>>,
    pub dataplane: Option<DataplaneWatch>,
    pub flows: Option<FlowWatch>,
}

pub fn start(options: StartOptions) -> anyhow::Result<Sources> {
    let mut kernel = Kernel::load(LoadOptions {
        log_events: options.log_kernel_events,
        ..LoadOptions::default()
    })
    .context("loading the eBPF programs")?;
    for ip in &options.watch_ips {
        kernel
            .watch_ip(*ip)
            .with_context(|| format!("watching {ip}"))?;
    }
    let (tx, observations) = mpsc::channel(CHANNEL_CAPACITY);
    let ring = kernel
        .take_conn_events()
        .context("connection event ring buffer already taken")?;
    let decoder = conn_events::ConnDecoder::new(WallClock::new(), kernel.reset_reasons().clone());
    let conn_reader = tokio::spawn(conn_events::forward(ring, decoder, tx.clone()));
    let timing = TimingPriority::from_level(options.timing_priority);
    let policy = options.source_side;
    let (dataplane, flows) = if policy == SourceSide::Off {
        (None, None)
    } else {
        let dataplane = start_dataplane(
            &mut kernel,
            timing,
            &tx,
            &options.watch_endpoints,
            &options.cilium,
            options.dataplane,
        );
        let dataplane = degrade(policy, dataplane, "dataplane rule detection")?;
        let stamps = kernel.take_stamps(StampKind::Conntrack);
        let ebpf = kernel.ebpf_mut();
        let flows = realtime::spawn_inheriting(timing, "flows", || flows::spawn(ebpf, tx, stamps))
            .context("starting the conntrack new-flow watch");
        let flows = degrade(policy, flows, "new-flow observation")?;
        (dataplane, flows)
    };
    Ok(Sources {
        kernel,
        observations,
        conn_reader,
        dataplane,
        flows,
    })
}

/// The dataplane detectors, watching `endpoints`, timed by the ruleset
/// commit kprobes where the kernel has kprobes, else by the kernel stamps
/// of their notifications, else at receipt (neither failure is fatal).
fn start_dataplane(
    kernel: &mut Kernel,
    timing: TimingPriority,
    tx: &mpsc::Sender<Observation>,
    endpoints: &[SocketAddr],
    cilium: &CiliumOptions,
    limits: Limits,
) -> anyhow::Result<DataplaneWatch> {
    let mut watch = realtime::spawn_inheriting(timing, "dataplane", || {
        dataplane::spawn_with(tx.clone(), limits)
    })
    .context("starting the dataplane detectors")?;
    for endpoint in endpoints {
        watch.watch(*endpoint);
    }
    if let Err(e) = watch.time_commits_by_kernel(kernel.ebpf_mut()) {
        tracing::warn!(error = %e, "ruleset commit probes not loaded");
    }
    let stamps = kernel.take_stamps(StampKind::Nftables);
    watch.use_kernel_stamps(kernel.ebpf_mut(), stamps);
    // Cilium's maps: absent on most nodes; an unknown layout or a failed
    // open leaves the other detectors running.
    match watch.follow_cilium(Some(kernel.ebpf_mut()), cilium) {
        Ok(status) => {
            tracing::info!(pin_dir = %status.pin_dir.display(), maps = status.maps.len(), timing = ?status.timing, "Cilium detector running")
        }
        Err(DataplaneError::Cilium(dataplane::cilium::OpenError::NotFound(dir))) => {
            tracing::info!(pin_dir = %dir.display(), "no Cilium service maps: Cilium detector off")
        }
        Err(e) => {
            tracing::error!(error = %e, "Cilium detector unavailable; the other detectors keep running")
        }
    }
    Ok(watch)
}

/// Applies the policy to one source-side start-up.
fn degrade<T>(
    policy: SourceSide,
    started: anyhow::Result<T>,
    what: &'static str,
) -> anyhow::Result<Option<T>> {
    match (started, policy) {
        (Ok(source), _) => Ok(Some(source)),
        (Err(e), SourceSide::Degraded) => {
            tracing::error!(error = format!("{e:#}"), "{what} unavailable on this node");
            Ok(None)
        }
        (Err(e), _) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_source_is_an_error_or_left_out_by_policy() {
        let failed = || Err::<(), _>(anyhow::anyhow!("no netlink"));
        assert!(degrade(SourceSide::Required, failed(), "x").is_err());
        assert_eq!(degrade(SourceSide::Degraded, failed(), "x").unwrap(), None);
        assert_eq!(degrade(SourceSide::Degraded, Ok(1), "x").unwrap(), Some(1));
        assert_eq!(degrade(SourceSide::Required, Ok(1), "x").unwrap(), Some(1));
    }
}
