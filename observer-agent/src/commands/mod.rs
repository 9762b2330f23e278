//! The agent's subcommands, and the start-up sequence `run` and `observe`
//! share.

pub mod cilium_args;
pub mod dataplane_args;
pub mod observe;
pub mod probe;
pub mod run;
pub mod start;
