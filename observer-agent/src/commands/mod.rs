//! The agent's subcommands.

pub mod observe;
pub mod probe;
pub mod run;
