//! A cluster on one machine: network namespaces as nodes and pods, kube-proxy
//! rule layouts, workloads and clients. Used by the root-only tests and by
//! `cargo xtask lab`; never by production code.

pub mod kubeproxy;
pub mod netns;
pub mod root;
