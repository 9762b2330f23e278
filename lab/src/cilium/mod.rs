//! Cilium's kube-proxy replacement, imitated for the lab and the agent's
//! tests: service maps with the exact layout of Cilium's main branch after
//! 1.19 (observer-common `cilium.rs`), pinned in a private bpffs
//! ([`Bpffs`]), written one element per bpf() syscall in the order
//! Cilium's reconciler (`pkg/loadbalancer/reconciler/bpf_reconciler.go`)
//! uses ([`ServiceMapsWriter`]), and followed by new connections of a
//! node's namespace as Cilium's socket-LB follows them ([`SockLb`]).

mod bpffs;
pub mod sock_lb;
pub mod writer;

pub use bpffs::Bpffs;
pub use sock_lb::{SockLb, SockLbError};
pub use writer::{ServiceMapsWriter, WriterThread};
