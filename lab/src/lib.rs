//! A cluster on one machine: network namespaces as nodes and pods, kube-proxy
//! rule layouts, workloads and clients. Used by the root-only tests and by
//! `cargo xtask lab`; never by production code.

pub use cli::LabArgs;
pub use lab_netns::{netns, root};

pub mod api;
pub mod busy;
pub mod cgroup;
pub mod cilium;
pub mod cli;
pub mod client;
pub mod commit_clock;
pub mod cost;
pub mod delay;
pub mod drain;
pub mod http;
pub mod http_client;
pub mod identity;
pub mod kube;
pub mod kubelet;
pub mod kubeproxy;
pub mod nginx;
pub mod observer;
pub mod proxy;
pub mod report;
pub mod routers;
pub mod scenario;
pub mod server;
pub mod startup;
pub mod tls;
pub mod topology;
pub mod witness;
pub mod workload;
