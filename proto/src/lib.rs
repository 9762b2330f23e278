//! The agent <-> aggregator protocol, generated from
//! `proto/prestop/observer/v1/observer.proto`. Each protocol version is its
//! own module so a v2 can be served next to v1; [`Endpoint`] is the typed
//! form both sides use of what agents are told to watch.

mod endpoint;

pub use endpoint::{BadEndpoint, Endpoint};

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("prestop.observer.v1");
}
