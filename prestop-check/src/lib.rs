//! prestop-check: compares the preStop delays in Kubernetes manifests with
//! the delay the aggregator measured, for CI.

pub mod check;
pub mod exit;
pub mod fix;
pub mod hook;
pub mod recommendation;
pub mod report;
pub mod rollout;
pub mod source;
pub mod startup;
pub mod textfile;
pub mod workload;
pub mod yaml;
