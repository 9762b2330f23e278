//! Types shared by the eBPF programs (observer-ebpf) and user space (observer-agent).
//!
//! Everything here is `#[repr(C)]` and plain old data: the same bytes are
//! written by the kernel side and read by user space. Enable the `user`
//! feature in user space to get aya's `Pod` impls for map access.
#![no_std]

pub mod cilium;
pub mod conn;
pub mod layout;
pub mod ruleset;
pub mod stamp;
pub mod stats;
pub mod watch;

pub use conn::{CloseHow, ConnEvent, ConnEventKind};
pub use layout::{TcpSendResetAddrs, TracepointLayout};
pub use stats::Stat;
pub use watch::{WatchFilter, WatchKey, WatchSlot};
