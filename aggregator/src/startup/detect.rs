//! Which endpoints just became ready, from the EndpointSlice watch the
//! aggregator already runs: a pod that no slice listed ready and that one
//! now lists ready (and not terminating). Slices seen while (re)listing
//! only set the state: their endpoints were ready before the aggregator
//! looked, when is unknown. Also keeps the pods' recent Ready conditions,
//! whose time the API gives in whole seconds.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use observer_proto::UnixNanos;

use crate::kube_watch::{SERVICE_NAME_LABEL, pod_target, slice_key, slice_ports};

/// Ready conditions are kept this long after they were seen, for the
/// slice that follows them.
const CONDITIONS_KEPT: Duration = Duration::from_secs(300);

/// An endpoint a slice just showed ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyEndpoint {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub service: String,
    pub ip: IpAddr,
    pub ports: Vec<u16>,
}

#[derive(Debug, Default)]
pub struct ReadyWatch {
    /// Pod uid -> keys of the slices that list it ready.
    ready_in: HashMap<String, BTreeSet<String>>,
    /// Slice key -> pod uids it lists ready.
    slice_ready: HashMap<String, BTreeSet<String>>,
    /// Pod uid -> (Ready condition's transition time, when it was seen).
    conditions: HashMap<String, (UnixNanos, UnixNanos)>,
}

impl ReadyWatch {
    /// The endpoints `s` shows ready that no slice showed ready before;
    /// none while `listing`.
    pub fn slice_seen(&mut self, s: &EndpointSlice, listing: bool) -> Vec<ReadyEndpoint> {
        let key = slice_key(s);
        let service = s.labels().get(SERVICE_NAME_LABEL).cloned();
        let ports = slice_ports(s);
        let mut now_ready = BTreeSet::new();
        let mut became = Vec::new();
        for ep in &s.endpoints {
            let Some(target) = pod_target(ep) else {
                continue;
            };
            let Some(uid) = target.uid.clone() else {
                continue;
            };
            let c = ep.conditions.as_ref();
            // An unset `ready` reads as ready (the API's rule).
            let ready = c.and_then(|c| c.ready) != Some(false)
                && c.and_then(|c| c.terminating) != Some(true);
            if !ready {
                continue;
            }
            now_ready.insert(uid.clone());
            let slices = self.ready_in.entry(uid.clone()).or_default();
            let first = slices.is_empty();
            slices.insert(key.clone());
            let ip = ep.addresses.first().and_then(|a| a.parse().ok());
            if let (true, false, Some(service), Some(ip)) = (first, listing, &service, ip) {
                became.push(ReadyEndpoint {
                    pod_uid: uid,
                    namespace: target
                        .namespace
                        .clone()
                        .or_else(|| s.namespace())
                        .unwrap_or_default(),
                    pod_name: target.name.clone().unwrap_or_default(),
                    service: service.clone(),
                    ip,
                    ports: ports.clone(),
                });
            }
        }
        let before = self.slice_ready.insert(key.clone(), now_ready.clone());
        for uid in before.unwrap_or_default().difference(&now_ready) {
            self.not_ready_in(uid, &key);
        }
        became
    }

    /// The slice was deleted (or missing from a relist).
    pub fn slice_gone(&mut self, key: &str) {
        for uid in self.slice_ready.remove(key).unwrap_or_default() {
            self.not_ready_in(&uid, key);
        }
    }

    fn not_ready_in(&mut self, uid: &str, key: &str) {
        if let Some(slices) = self.ready_in.get_mut(uid) {
            slices.remove(key);
            if slices.is_empty() {
                self.ready_in.remove(uid);
            }
        }
    }

    /// Notes the pod's Ready condition when it turned true recently.
    pub fn pod_seen(&mut self, p: &Pod, now: UnixNanos) {
        self.conditions
            .retain(|_, (_, seen)| *seen + CONDITIONS_KEPT >= now);
        let Some(uid) = p.uid() else { return };
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "Ready" && c.status == "True")
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| UnixNanos::from(std::time::SystemTime::from(t.0)));
        match ready {
            Some(at) if at + CONDITIONS_KEPT >= now => {
                self.conditions.insert(uid, (at, now));
            }
            _ => {
                self.conditions.remove(&uid);
            }
        }
    }

    pub fn pod_gone(&mut self, uid: &str) {
        self.conditions.remove(uid);
    }

    /// When the pod's Ready condition last turned true, if seen recently.
    pub fn ready_condition(&self, uid: &str) -> Option<UnixNanos> {
        self.conditions.get(uid).map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ObjectReference, PodCondition, PodStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    fn slice(name: &str, pods: &[(&str, Option<bool>, bool)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some([(SERVICE_NAME_LABEL.into(), "web".into())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: pods
                .iter()
                .enumerate()
                .map(|(i, (uid, ready, terminating))| Endpoint {
                    addresses: vec![format!("10.244.1.{}", i + 1)],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        terminating: Some(*terminating),
                        ..EndpointConditions::default()
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(format!("web-{uid}")),
                        uid: Some((*uid).into()),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..EndpointPort::default()
            }]),
        }
    }

    fn uids(v: &[ReadyEndpoint]) -> Vec<&str> {
        v.iter().map(|e| e.pod_uid.as_str()).collect()
    }

    #[test]
    fn an_endpoint_turning_ready_is_new_once() {
        let mut w = ReadyWatch::default();
        assert!(
            w.slice_seen(&slice("a", &[("u1", Some(false), false)]), false)
                .is_empty()
        );
        let became = w.slice_seen(&slice("a", &[("u1", Some(true), false)]), false);
        assert_eq!(
            became,
            [ReadyEndpoint {
                pod_uid: "u1".into(),
                namespace: "shop".into(),
                pod_name: "web-u1".into(),
                service: "web".into(),
                ip: "10.244.1.1".parse().unwrap(),
                ports: vec![8080],
            }]
        );
        assert!(
            w.slice_seen(&slice("a", &[("u1", Some(true), false)]), false)
                .is_empty()
        );
        // Listed ready by a second slice (another address family or a
        // split slice): not new.
        assert!(
            w.slice_seen(&slice("b", &[("u1", None, false)]), false)
                .is_empty()
        );
    }

    #[test]
    fn a_relist_and_terminating_endpoints_start_nothing() {
        let mut w = ReadyWatch::default();
        assert!(
            w.slice_seen(&slice("a", &[("u1", Some(true), false)]), true)
                .is_empty()
        );
        assert!(
            w.slice_seen(&slice("a", &[("u1", Some(true), false)]), false)
                .is_empty()
        );
        assert!(
            w.slice_seen(&slice("a", &[("u2", Some(true), true)]), false)
                .is_empty()
        );
    }

    #[test]
    fn ready_again_after_leaving_every_slice_is_new_again() {
        let mut w = ReadyWatch::default();
        let ready = slice("a", &[("u1", Some(true), false)]);
        assert_eq!(uids(&w.slice_seen(&ready, false)), ["u1"]);
        w.slice_seen(&slice("a", &[("u1", Some(false), false)]), false);
        assert_eq!(uids(&w.slice_seen(&ready, false)), ["u1"]);
        w.slice_gone("shop/a");
        assert_eq!(uids(&w.slice_seen(&ready, false)), ["u1"]);
    }

    #[test]
    fn a_recent_ready_condition_is_kept_an_old_one_not() {
        let mut w = ReadyWatch::default();
        let now = UnixNanos::from_seconds(1_700_000_000);
        let pod = |uid: &str, at: i64| Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(
                        std::time::SystemTime::from(UnixNanos::from_seconds(at))
                            .try_into()
                            .unwrap(),
                    )),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        w.pod_seen(&pod("u1", 1_700_000_000 - 2), now);
        w.pod_seen(&pod("u2", 1_700_000_000 - 3600), now);
        assert_eq!(
            w.ready_condition("u1"),
            Some(UnixNanos::from_seconds(1_700_000_000 - 2))
        );
        assert_eq!(w.ready_condition("u2"), None);
        w.pod_gone("u1");
        assert_eq!(w.ready_condition("u1"), None);
    }
}
