//! Helpers shared by the integration tests: [`cli`] runs the binary against
//! a real aggregator, [`deploy`] reads what deploy/ ships.
// Each test crate uses a part of them.
#![allow(dead_code)]

pub mod cli;
pub mod deploy;
