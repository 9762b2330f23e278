//! The agent <-> aggregator protocol, generated from
//! `proto/prestop/observer/v1/observer.proto`, and the typed forms both
//! sides use of its messages. Each protocol version is its own module so a
//! v2 can be served next to v1; the typed forms ([`Endpoint`],
//! [`Observation`], [`Report`], [`UnixNanos`]) convert to and from the wire
//! in this crate only, with typed errors naming the bad field. [`api`] holds
//! the aggregator's HTTP answers, shared by their writer and readers.

pub mod api;
mod endpoint;
mod new_endpoint;
mod observation;
mod report;
mod time;

pub use endpoint::{BadEndpoint, Endpoint};
pub use new_endpoint::NewEndpoint;
pub use observation::{
    BadObservation, CloseKind, ConnEvent, Detector, NewFlow, Observation, ResetCause, RulesChange,
    UnknownDetector,
};
pub use report::{AgentCounters, BadReport, ClockEstimate, Report};
pub use time::UnixNanos;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("prestop.observer.v1");
}
