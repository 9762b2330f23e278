//! The aggregator: watches Kubernetes for pod deletions, tells the agents
//! which endpoints to watch, correlates their reports into per-deletion
//! propagation measurements, stores them and recommends a preStop delay.
//!
//! Data flow: [`kube_watch`] -> [`correlate`] <- [`grpc`] (agent reports,
//! decoded into `observer_proto::Report`); finished deletions
//! (`observer_proto::api::DeletionRecord`) -> [`store`] -> [`recommend`] ->
//! [`http`]. Every time is an `observer_proto::UnixNanos` on the
//! aggregator's clock.

pub mod app;
pub mod auth;
pub mod config;
pub mod correlate;
pub mod deletion_pages;
pub mod drain;
pub mod grpc;
pub mod http;
pub mod kube_thread;
pub mod kube_watch;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod nodes;
pub mod openapi;
pub mod pods;
pub mod readiness;
pub mod recommend;
pub mod startup;
pub mod stats;
pub mod store;
pub mod store_lock;
