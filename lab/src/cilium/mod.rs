//! Cilium's kube-proxy replacement, imitated for the lab and the agent's
//! tests: service maps with the exact layout of Cilium's main branch after
//! 1.19 (observer-common `cilium.rs`), pinned in a private bpffs
//! ([`Bpffs`]), written one element per bpf() syscall in the order
//! Cilium's reconciler (`pkg/loadbalancer/reconciler/bpf_reconciler.go`)
//! uses ([`ServiceMapsWriter`]).

mod bpffs;
pub mod writer;

pub use bpffs::Bpffs;
pub use writer::{ServiceMapsWriter, update_elem};
