//! The programs live in the `observer` binary (src/main.rs); this empty
//! library lets observer-agent depend on the crate so cargo rebuilds the agent
//! when the programs change.
#![no_std]
