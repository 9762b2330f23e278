//! prestop-admission: an admission webhook that compares workloads' preStop
//! delays with the measured recommendation as they are applied.
//!
//! Three modes, one per webhook path (the webhook configurations in
//! deploy/ pick the path by namespace label, so no namespace watch is
//! needed here):
//! - `/validate` (warn, the default): admission warnings for every routed
//!   container whose preStop delay is below the recommendation or whose
//!   grace period cannot hold it;
//! - `/validate/enforce` (`observer.prestop.dev/admission=enforce`): the
//!   same findings deny the request, except those against a low-confidence
//!   recommendation;
//! - `/mutate` (`observer.prestop.dev/inject=true`): sets the recommended
//!   preStop sleep on routed containers without a preStop hook
//!   ([`inject`]);
//! - `/mutate/adaptive-drain` (`observer.prestop.dev/inject=adaptive-drain`):
//!   gives them the adaptive drain instead, `prestop-drain` falling back to
//!   the recommendation ([`inject::Delay::AdaptiveDrain`]).
//!
//! The findings are prestop-check's, from its library
//! ([`prestop_check::check::workload`]): the CI check and the webhook call
//! the same function on the same typed workload.
//!
//! Why a binary of its own rather than a listener in the aggregator: the
//! aggregator is one stateful replica whose HTTP API thread is tuned for
//! CI queries; admission traffic (every apply in the cluster) would share
//! it, and the aggregator would need prestop-check's manifest reader and a
//! Service watch. Here the webhook can run two replicas, restarts without
//! touching measurements, and reads the aggregator only through its public
//! API, refreshed in the background into a cache ([`cache`]): an admission
//! answer never waits on the network. With `failurePolicy: Ignore`, neither
//! it nor the aggregator being down blocks an apply.

pub mod cache;
pub mod inject;
pub mod review;
pub mod routes;
pub mod server;
pub mod tls;
pub mod verdict;

/// Labels and annotations this webhook reads or writes (the namespace
/// labels `observer.prestop.dev/admission` and `observer.prestop.dev/inject`
/// are read by the webhook configurations' namespace selectors).
pub mod names {
    /// Namespace label: `enforce` denies, `off` excludes the namespace; named
    /// in denials.
    pub const MODE_LABEL: &str = "observer.prestop.dev/admission";
    /// Workload annotation: what the webhook injected.
    pub const INJECTED: &str = "observer.prestop.dev/injected";
    /// Workload annotation: where the injected number comes from.
    pub const INJECTED_WHY: &str = "observer.prestop.dev/injected-why";
    /// Pod template annotation: comma-separated names of containers whose
    /// image has a shell and `sleep` (for the exec hook on clusters without
    /// the sleep action), or `*` for all.
    pub const SHELL: &str = "observer.prestop.dev/image-has-shell";
}
