//! One node's kube-proxy: follows the Service's endpoints, selects backends
//! the way kube-proxy does, and programs them through [`Rules`] after an
//! injected delay. The moments the rules really changed are recorded: the
//! ground truth the observer's measurements are compared with.

use observer_proto::UnixNanos;
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    delay::{DelayDistribution, Rng},
    kubeproxy::{Applied, Backend, CiliumNode, KubeProxyError, Mode, Rules, ServicePort},
    witness::CommitWitness,
};

/// One endpoint of an EndpointSlice, with its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The desired state the controllers follow: every Service with its endpoints.
pub type Services = Vec<(ServicePort, Vec<Endpoint>)>;

/// kube-proxy's choice: ready endpoints; when none is ready, the serving
/// ones that are terminating (so a Service whose pods are all terminating
/// keeps working while they drain).
pub fn select(endpoints: &[Endpoint]) -> Vec<Backend> {
    let ready: Vec<Backend> = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| Backend {
            ip: e.ip,
            port: e.port,
        })
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating)
        .map(|e| Backend {
            ip: e.ip,
            port: e.port,
        })
        .collect()
}

/// A backend entering or leaving one node's rules, when that was committed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleChange {
    pub node: String,
    pub mode: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub removed: bool,
    /// When the controller saw the endpoint change that caused it.
    pub seen_unix_nano: UnixNanos,
    /// The delay drawn for that change.
    pub injected_delay_ms: f64,
    pub applied_started_unix_nano: UnixNanos,
    pub applied_finished_unix_nano: UnixNanos,
    /// The kernel's commit of the change, for modes that announce commits
    /// (nftables, iptables-nft); see [`crate::witness`]. In cilium mode the
    /// applied window is the master's bpf() syscall (the cutover).
    pub committed_unix_nano: Option<UnixNanos>,
}

impl RuleChange {
    /// The best known moment the rules changed: the kernel's commit, else
    /// the end of the transaction.
    pub fn truth_unix_nano(&self) -> UnixNanos {
        self.committed_unix_nano
            .unwrap_or(self.applied_finished_unix_nano)
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node: String,
    /// `ip netns` name of the node.
    pub netns: String,
    pub mode: Mode,
    pub delay: DelayDistribution,
    pub seed: u64,
}

/// A running controller; [`Proxy::stop`] removes its rules.
pub struct Proxy {
    stop: watch::Sender<bool>,
    /// Added to every delay drawn from now on (a node turned slow).
    extra: Arc<Mutex<Duration>>,
    task: JoinHandle<Result<(), KubeProxyError>>,
    changes: Arc<Mutex<Vec<RuleChange>>>,
    cilium: Option<CiliumNode>,
}

type Selected = HashSet<(ServicePort, Backend)>;

fn selected(services: &Services) -> Selected {
    services
        .iter()
        .flat_map(|(svc, eps)| select(eps).into_iter().map(move |b| (svc.clone(), b)))
        .collect()
}

fn desired(services: &Services) -> Vec<(ServicePort, Vec<Backend>)> {
    services
        .iter()
        .map(|(svc, eps)| (svc.clone(), select(eps)))
        .collect()
}

/// Per Service, its terminating endpoints (Cilium's frontend tail).
fn terminating(services: &Services) -> Vec<(ServicePort, Vec<Backend>)> {
    services
        .iter()
        .map(|(svc, eps)| {
            let tail = eps
                .iter()
                .filter(|e| e.terminating)
                .map(|e| Backend {
                    ip: e.ip,
                    port: e.port,
                })
                .collect();
            (svc.clone(), tail)
        })
        .collect()
}

/// An endpoint's identity: its Service and pod.
type Key = (ServicePort, String);

fn by_key(services: &Services) -> HashMap<Key, Endpoint> {
    services
        .iter()
        .flat_map(|(svc, eps)| {
            eps.iter()
                .map(move |e| ((svc.clone(), e.pod.clone()), e.clone()))
        })
        .collect()
}

impl Proxy {
    /// Programs the current state at once (a node's initial sync), then
    /// follows `services`: every endpoint change reaches this node's rules
    /// after its own drawn delay.
    pub async fn start(
        config: ProxyConfig,
        mut services: watch::Receiver<Services>,
    ) -> Result<Self, KubeProxyError> {
        let initial = services.borrow_and_update().clone();
        let rules = Rules::new(Some(config.netns.clone()), config.mode);
        let (rules, result) = sync(rules, &initial).await;
        result?;
        let cilium = rules.cilium_node();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let extra = Arc::new(Mutex::new(Duration::ZERO));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(follow(
            config,
            rules,
            initial,
            services,
            stop_rx,
            changes.clone(),
            extra.clone(),
        ));
        Ok(Proxy {
            stop,
            extra,
            task,
            changes,
            cilium,
        })
    }

    /// cilium mode: where the node's maps and their writer are.
    pub fn cilium(&self) -> Option<&CiliumNode> {
        self.cilium.as_ref()
    }

    /// From now on every change waits `extra` longer than its drawn delay.
    pub fn slow_down(&self, extra: Duration) {
        *self.extra.lock().expect("extra lock") = extra;
    }

    /// Rule changes committed so far.
    pub fn changes(&self) -> Vec<RuleChange> {
        self.changes.lock().expect("changes lock").clone()
    }

    /// The last committed change adding (or removing) `ip`, searched in
    /// place: a lab of hundreds of deletions looks it up for each.
    pub fn last_change(&self, ip: Ipv4Addr, removed: bool) -> Option<RuleChange> {
        self.changes
            .lock()
            .expect("changes lock")
            .iter()
            .rev()
            .find(|c| c.ip == ip && c.removed == removed)
            .cloned()
    }

    /// Stops following and removes the node's rules.
    pub async fn stop(self) -> Result<Vec<RuleChange>, KubeProxyError> {
        let _ = self.stop.send(true);
        self.task.await.expect("proxy task panicked")?;
        Ok(self.changes.lock().expect("changes lock").clone())
    }
}

async fn sync(mut rules: Rules, view: &Services) -> (Rules, Result<Applied, KubeProxyError>) {
    let (desired, terminating) = (desired(view), terminating(view));
    tokio::task::spawn_blocking(move || {
        let result = rules.sync_keeping_terminating(&desired, &terminating);
        (rules, result)
    })
    .await
    .expect("sync thread panicked")
}

/// One endpoint change waiting for its injected delay.
struct Pending {
    due: Instant,
    seen_unix_nano: UnixNanos,
    delay: Duration,
    key: Key,
    /// The endpoint's address (before or after the change).
    ip: Ipv4Addr,
    /// None: the endpoint left the slice.
    endpoint: Option<Endpoint>,
}

/// The endpoints as this node's proxy knows them: the published state with
/// every change held back until its delay ran out.
struct View {
    /// Services in published order (a Service with no endpoint still gets
    /// its rules), with the endpoints applied so far.
    services: Services,
}

impl View {
    fn apply(&mut self, change: &Pending) {
        let Some((_, eps)) = self
            .services
            .iter_mut()
            .find(|(svc, _)| *svc == change.key.0)
        else {
            return;
        };
        eps.retain(|e| e.pod != change.key.1);
        if let Some(endpoint) = &change.endpoint {
            eps.push(endpoint.clone());
        }
    }

    /// Takes the Service list of `published`, keeping known endpoints.
    fn adopt_services(&mut self, published: &Services) {
        let mut services: Services = published
            .iter()
            .map(|(svc, _)| (svc.clone(), Vec::new()))
            .collect();
        for (svc, eps) in &mut services {
            if let Some((_, known)) = self.services.iter().find(|(s, _)| s == svc) {
                eps.clone_from(known);
            }
        }
        self.services = services;
    }
}

async fn follow(
    config: ProxyConfig,
    mut rules: Rules,
    initial: Services,
    mut services: watch::Receiver<Services>,
    mut stop: watch::Receiver<bool>,
    changes: Arc<Mutex<Vec<RuleChange>>>,
    extra: Arc<Mutex<Duration>>,
) -> Result<(), KubeProxyError> {
    let witness = match config.mode {
        Mode::Nftables | Mode::IptablesNft => {
            let path = Path::new("/run/netns").join(&config.netns);
            Some(
                CommitWitness::start(&path).map_err(|source| KubeProxyError::Spawn {
                    command: "nftables commit witness".into(),
                    source,
                })?,
            )
        }
        Mode::IptablesLegacy | Mode::Cilium => None,
    };
    let mut rng = Rng::new(config.seed);
    let mut seen = by_key(&initial);
    let mut programmed = selected(&initial);
    let mut view = View { services: initial };
    let mut pending: Vec<Pending> = Vec::new();
    // Changes to one endpoint apply in order even when a later one drew a
    // shorter delay.
    let mut last_due: HashMap<Key, Instant> = HashMap::new();
    loop {
        let next_due = pending.iter().map(|p| p.due).min();
        tokio::select! {
            changed = services.changed() => {
                if changed.is_err() {
                    break;
                }
                let published = services.borrow_and_update().clone();
                view.adopt_services(&published);
                let now_published = by_key(&published);
                // In a fixed order, so a seed gives the same delays to the
                // same endpoints on every run.
                let mut keys: Vec<&Key> = seen.keys().chain(now_published.keys()).collect();
                keys.sort_by(|a, b| {
                    (&a.0.namespace, &a.0.name, &a.0.port_name, &a.1).cmp(&(&b.0.namespace, &b.0.name, &b.0.port_name, &b.1))
                });
                keys.dedup();
                let (now, seen_unix_nano) = (Instant::now(), UnixNanos::now());
                for key in keys {
                    let (before, endpoint) = (seen.get(key), now_published.get(key));
                    let Some(ip) = endpoint.or(before).map(|e| e.ip).filter(|_| before != endpoint) else {
                        continue;
                    };
                    let delay = config.delay.sample(&mut rng) + *extra.lock().expect("extra lock");
                    let due = last_due.get(key).map_or(now + delay, |d| (*d).max(now + delay));
                    last_due.insert(key.clone(), due);
                    pending.push(Pending { due, seen_unix_nano, delay, key: key.clone(), ip, endpoint: endpoint.cloned() });
                }
                seen = now_published;
            }
            _ = async { tokio::time::sleep_until(next_due.expect("guarded")).await }, if next_due.is_some() => {
                let now = Instant::now();
                let (mut due, waiting): (Vec<Pending>, Vec<Pending>) = pending.into_iter().partition(|p| p.due <= now);
                pending = waiting;
                due.sort_by_key(|p| p.due);
                for change in &due {
                    view.apply(change);
                }
                let next = selected(&view.services);
                if next == programmed {
                    continue;
                }
                let (rules_back, result) = sync(rules, &view.services).await;
                rules = rules_back;
                let applied = result?;
                let committed = match &witness {
                    Some(w) => commit_of(w, applied).await,
                    None => None,
                };
                record(&config, &programmed, &next, &due, applied, committed, &changes);
                programmed = next;
            }
            // A stop (the only value ever sent) or the handle dropped.
            _ = stop.changed() => break,
        }
    }
    tokio::task::spawn_blocking(move || rules.cleanup())
        .await
        .expect("cleanup thread panicked")
}

/// The last kernel commit inside the transaction `applied` (iptables-nft
/// commits each table apart, the `nat` table's DNAT rules last), once the
/// witness has read every notification the writer queued before it
/// returned: taken earlier, a lagging witness gave a write's first commit,
/// milliseconds before its last.
async fn commit_of(witness: &CommitWitness, applied: Applied) -> Option<UnixNanos> {
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut settled = 0;
    loop {
        settled = if witness.settled() { settled + 1 } else { 0 };
        if settled == 2 || Instant::now() > deadline {
            return witness
                .last_commit_between(applied.started_unix_nano, applied.finished_unix_nano);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn record(
    config: &ProxyConfig,
    before: &Selected,
    after: &Selected,
    causes: &[Pending],
    applied: Applied,
    committed_unix_nano: Option<UnixNanos>,
    changes: &Mutex<Vec<RuleChange>>,
) {
    let change = |(svc, b): &(ServicePort, Backend), removed| {
        // The change to this backend's endpoint that was just applied.
        let cause = causes
            .iter()
            .rev()
            .find(|p| p.key.0 == *svc && p.ip == b.ip)
            .unwrap_or(&causes[0]);
        RuleChange {
            node: config.node.clone(),
            mode: config.mode.to_string(),
            ip: b.ip,
            port: b.port,
            removed,
            seen_unix_nano: cause.seen_unix_nano,
            injected_delay_ms: cause.delay.as_secs_f64() * 1000.0,
            applied_started_unix_nano: applied.started_unix_nano,
            applied_finished_unix_nano: applied.finished_unix_nano,
            committed_unix_nano,
        }
    };
    let mut changes = changes.lock().expect("changes lock");
    changes.extend(before.difference(after).map(|s| change(s, true)));
    changes.extend(after.difference(before).map(|s| change(s, false)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            pod: format!("p{last}"),
            ip: Ipv4Addr::new(10, 244, 0, last),
            port: 8080,
            ready,
            serving,
            terminating,
        }
    }

    fn ips(backends: Vec<Backend>) -> Vec<u8> {
        backends.into_iter().map(|b| b.ip.octets()[3]).collect()
    }

    #[test]
    fn selects_ready_endpoints_only_while_any_is_ready() {
        let eps = [
            ep(2, true, true, false),
            ep(3, false, true, true),
            ep(4, false, false, false),
        ];
        assert_eq!(ips(select(&eps)), [2]);
    }

    #[test]
    fn falls_back_to_serving_terminating_when_all_terminate() {
        let eps = [
            ep(2, false, true, true),
            ep(3, false, false, true),
            ep(4, false, true, false),
        ];
        assert_eq!(ips(select(&eps)), [2]);
        assert!(select(&[]).is_empty());
    }
}
