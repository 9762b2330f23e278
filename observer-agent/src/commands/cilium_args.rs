//! The Cilium detector's flags, shared by `run`, `observe` and `probe`.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use observer_common::cilium::WriterFilter;

use crate::dataplane::cilium::CiliumOptions;

#[derive(Args, Clone, Debug)]
pub struct CiliumArgs {
    /// Where Cilium pins its service maps; the Cilium detector runs when
    /// `cilium_lb4_services_v2` or `cilium_lb6_services_v2` is there (the
    /// DaemonSet mounts the host's /sys/fs/bpf read-only for it).
    #[arg(long, default_value = observer_common::cilium::PIN_DIR, env = "OBSERVER_CILIUM_PIN_DIR")]
    pub cilium_pin_dir: PathBuf,
    /// Name (`comm`, at most 15 bytes) of the threads whose bpf() map
    /// writes the Cilium detector follows.
    #[arg(long, default_value = "cilium-agent", value_parser = parse_comm, env = "OBSERVER_CILIUM_WRITER_COMM")]
    pub cilium_writer_comm: String,
    /// Follow only this process id, as the host's PID namespace numbers
    /// it (the kernel's tgid; the DaemonSet has no hostPID, so leave it
    /// unset there); default: every process with the name above.
    #[arg(long, env = "OBSERVER_CILIUM_WRITER_PID")]
    pub cilium_writer_pid: Option<u32>,
    /// Interval, in milliseconds (10 at least), at which Cilium's watched
    /// frontends are polled where the bpf() tracepoint cannot attach.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..), env = "OBSERVER_CILIUM_POLL_MS")]
    pub cilium_poll_ms: u64,
    /// Poll Cilium's maps even where the tracepoint attaches.
    #[arg(long, env = "OBSERVER_CILIUM_POLL_ONLY")]
    pub cilium_poll_only: bool,
}

fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 {
        Err(format!(
            "{s:?}: a thread name has 1 to 15 bytes (the kernel's comm)"
        ))
    } else {
        Ok(s.to_owned())
    }
}

impl CiliumArgs {
    pub fn options(&self) -> CiliumOptions {
        let mut comm = [0u8; 16];
        comm[..self.cilium_writer_comm.len()].copy_from_slice(self.cilium_writer_comm.as_bytes());
        let mut writer = WriterFilter::comm(comm, self.cilium_writer_comm.len() as u32);
        writer.tgid = self.cilium_writer_pid.unwrap_or(0);
        CiliumOptions {
            pin_dir: self.cilium_pin_dir.clone(),
            poll_interval: Duration::from_millis(self.cilium_poll_ms),
            writer,
            force_polling: self.cilium_poll_only,
        }
    }
}
