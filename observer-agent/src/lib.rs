//! The node agent, as a library so its parts can be tested on their own and
//! driven by the lab. Data flows kernel -> sources -> one typed
//! [`observer_proto::Observation`] -> [`watched`] filter -> output
//! (standalone `observe`) or report (to the aggregator, `run`).

pub mod clock;
pub mod commands;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod kernel;
pub mod locks;
pub mod netlink;
pub mod output;
pub mod realtime;
pub mod receipt;
pub mod report;
pub mod stamps;
pub mod stop;
pub mod watched;
