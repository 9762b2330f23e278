//! A router that follows the EndpointSlice and applies each removal after
//! its own drawn delay (an ingress controller's reconcile, a load
//! balancer's deregistration). Additions apply at once: the lab measures
//! how late a router lets go of a deleted pod, and a router that ran out
//! of backends while a rollout replaces them would fail for another reason.

use std::{future::Future, time::Duration};

use tokio::{sync::watch, time::Instant};

use observer_proto::UnixNanos;

use super::{Drops, RouterDrop, Task};
use crate::{
    delay::{DelayDistribution, Rng},
    kubeproxy::Backend,
    proxy::{Services, select},
};

/// The endpoints kube-proxy would pick, as a router picks them too.
pub(super) fn ready(services: &Services) -> Vec<Backend> {
    services.iter().flat_map(|(_, eps)| select(eps)).collect()
}

/// Applies a backend list; returns when the router follows it.
pub(super) trait Apply {
    fn apply(
        &mut self,
        backends: &[Backend],
    ) -> impl Future<Output = Result<UnixNanos, String>> + Send;
}

/// [`follow`] in a task of its own: the task (aborted when dropped) and
/// the drops it records.
pub(super) fn spawn(
    router: &str,
    services: watch::Receiver<Services>,
    delay: DelayDistribution,
    seed: u64,
    applier: impl Apply + Send + 'static,
) -> (Task, Drops) {
    let drops = Drops::default();
    let task = Task(tokio::spawn(follow(
        router.to_owned(),
        services,
        delay,
        seed,
        drops.clone(),
        applier,
    )));
    (task, drops)
}

/// Follows `services` until it closes: the current list at once, then
/// every change. A failed apply is said on stderr with the router's name;
/// the rollout waiting for the drop then fails with it.
async fn follow(
    router: String,
    mut services: watch::Receiver<Services>,
    delay: DelayDistribution,
    seed: u64,
    drops: Drops,
    mut applier: impl Apply,
) {
    let mut rng = Rng::new(seed);
    let mut current = ready(&services.borrow_and_update());
    if let Err(e) = applier.apply(&current).await {
        eprintln!("lab: {router}: {e}");
    }
    let mut pending: Vec<(Instant, Backend, Duration)> = Vec::new();
    loop {
        let next_due = pending.iter().map(|p| p.0).min();
        tokio::select! {
            changed = services.changed() => {
                if changed.is_err() {
                    return;
                }
                let now_ready = ready(&services.borrow_and_update());
                let added: Vec<Backend> = now_ready
                    .iter()
                    .filter(|b| !current.contains(b))
                    .cloned()
                    .collect();
                for gone in current.iter().filter(|b| !now_ready.contains(b)) {
                    if pending.iter().all(|p| p.1 != *gone) {
                        let d = delay.sample(&mut rng);
                        pending.push((Instant::now() + d, *gone, d));
                    }
                }
                if !added.is_empty() {
                    current.extend(added);
                    if let Err(e) = applier.apply(&current).await {
                        eprintln!("lab: {router}: {e}");
                    }
                }
            }
            _ = async { tokio::time::sleep_until(next_due.expect("guarded")).await }, if next_due.is_some() => {
                let now = Instant::now();
                let (due, waiting): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.0 <= now);
                pending = waiting;
                current.retain(|b| due.iter().all(|p| p.1 != *b));
                match applier.apply(&current).await {
                    Ok(at) => {
                        for (_, backend, d) in due {
                            drops.push(RouterDrop {
                                router: router.clone(),
                                ip: backend.ip,
                                drawn_delay_ms: Some(d.as_secs_f64() * 1000.0),
                                dropped_unix_nano: at,
                            });
                        }
                    }
                    Err(e) => eprintln!("lab: {router}: {e}"),
                }
            }
        }
    }
}
