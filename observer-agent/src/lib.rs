//! The node agent, as a library so its parts can be tested on their own and
//! driven by the lab. Data flows kernel -> sources -> [`observation`] ->
//! output (standalone `observe`) or report (to the aggregator, `run`).

pub mod clock;
pub mod commands;
pub mod dataplane;
pub mod endpoint_record;
pub mod flows;
pub mod health;
pub mod kernel;
pub mod netlink;
pub mod observation;
pub mod output;
pub mod realtime;
pub mod report;
