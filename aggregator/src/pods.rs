//! Attributes source addresses to pods: which workload a connection came
//! from, so that a pod connecting to pod IPs itself (an ingress controller,
//! a client-side balancer) is named as a router of its own. One entry per
//! pod IP in the cluster (host-network pods are left out: their address is
//! their node's), kept from the Pod watch the aggregator already runs.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;

/// The label the Deployment controller puts on its ReplicaSets' pods; its
/// value is the suffix of the ReplicaSet's name after the Deployment's.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// A pod as the source of connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSource {
    pub uid: String,
    /// `namespace/owner`, see [`workload_name`].
    pub workload: String,
    pub node: Option<String>,
}

#[derive(Debug)]
struct Entry {
    pod: PodSource,
    /// Seen connecting to a watched pod IP without its node's DNAT.
    direct: bool,
}

/// Pod IP -> pod.
#[derive(Debug, Default)]
pub struct PodIndex {
    by_ip: HashMap<IpAddr, Entry>,
}

impl PodIndex {
    /// Indexes `pod` under each of its addresses; a pod that had an address
    /// before keeps what was learnt of it.
    pub fn set(&mut self, ips: &[IpAddr], pod: PodSource) {
        for ip in ips {
            match self.by_ip.get_mut(ip) {
                Some(e) if e.pod.uid == pod.uid => e.pod = pod.clone(),
                _ => {
                    self.by_ip.insert(
                        *ip,
                        Entry {
                            pod: pod.clone(),
                            direct: false,
                        },
                    );
                }
            }
        }
    }

    /// Forgets the pod `uid` at `ip` (another pod may have the address now).
    pub fn remove(&mut self, ip: IpAddr, uid: &str) {
        if self.by_ip.get(&ip).is_some_and(|e| e.pod.uid == uid) {
            self.by_ip.remove(&ip);
        }
    }

    /// Every indexed address with its pod's UID (to find what a relist lost).
    pub fn uids(&self) -> impl Iterator<Item = (IpAddr, &str)> {
        self.by_ip.iter().map(|(ip, e)| (*ip, e.pod.uid.as_str()))
    }

    pub fn get(&self, ip: IpAddr) -> Option<&PodSource> {
        self.by_ip.get(&ip).map(|e| &e.pod)
    }

    /// Notes that the pod at `ip` connects to pod IPs directly; returns it.
    pub fn mark_direct(&mut self, ip: IpAddr) -> Option<&PodSource> {
        let e = self.by_ip.get_mut(&ip)?;
        e.direct = true;
        Some(&e.pod)
    }

    /// The pod at `ip` when it was seen connecting to pod IPs directly.
    pub fn direct(&self, ip: IpAddr) -> Option<&PodSource> {
        self.by_ip.get(&ip).filter(|e| e.direct).map(|e| &e.pod)
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// The pod's addresses and what it is as a source; `None` for a pod
/// without a UID or an address, or on the host network.
pub fn source_of(p: &Pod) -> Option<(Vec<IpAddr>, PodSource)> {
    let uid = p.uid()?;
    let spec = p.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = p.status.as_ref()?;
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|a| a.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        return None;
    }
    let namespace = p.namespace().unwrap_or_default();
    let owner = workload_name(&p.name_any(), p.owner_references(), p.labels());
    Some((
        ips,
        PodSource {
            uid,
            workload: format!("{namespace}/{owner}"),
            node: spec.and_then(|s| s.node_name.clone()),
        },
    ))
}

/// The workload a pod belongs to: its controller's name (any owner when
/// none is marked controller), a ReplicaSet's Deployment when the pod's
/// `pod-template-hash` label is the ReplicaSet name's suffix (as the
/// Deployment controller names them: no ReplicaSet watch is needed), the
/// pod's own name when it has no owner.
pub fn workload_name(
    pod_name: &str,
    owners: &[OwnerReference],
    labels: &std::collections::BTreeMap<String, String>,
) -> String {
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return pod_name.to_owned();
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = labels.get(POD_TEMPLATE_HASH)
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return deployment.to_owned();
    }
    owner.name.clone()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            kind: kind.into(),
            name: name.into(),
            controller: Some(controller),
            ..OwnerReference::default()
        }
    }

    fn labels(hash: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(POD_TEMPLATE_HASH.to_owned(), hash.to_owned())])
    }

    #[test]
    fn a_replicaset_of_a_deployment_is_named_by_the_deployment() {
        let rs = [owner("ReplicaSet", "ingress-nginx-controller-7d9f8", true)];
        assert_eq!(
            workload_name("p", &rs, &labels("7d9f8")),
            "ingress-nginx-controller"
        );
        // Without the label (a ReplicaSet made by hand) or another hash,
        // the Deployment is not knowable.
        assert_eq!(
            workload_name("p", &rs, &BTreeMap::new()),
            "ingress-nginx-controller-7d9f8"
        );
        assert_eq!(
            workload_name("p", &rs, &labels("other")),
            "ingress-nginx-controller-7d9f8"
        );
    }

    #[test]
    fn the_controller_wins_and_a_bare_pod_is_its_own_workload() {
        let owners = [
            owner("ConfigMap", "not-it", false),
            owner("StatefulSet", "db", true),
        ];
        assert_eq!(workload_name("db-0", &owners, &BTreeMap::new()), "db");
        assert_eq!(workload_name("loner", &[], &BTreeMap::new()), "loner");
    }

    fn pod(ips: &[&str], host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("balancer-0".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                owner_references: Some(vec![owner("StatefulSet", "balancer", true)]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-b".into()),
                host_network: Some(host_network),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: ips.first().map(|s| (*s).to_owned()),
                pod_ips: Some(
                    ips.iter()
                        .map(|ip| PodIP {
                            ip: (*ip).to_owned(),
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn every_address_of_a_pod_is_indexed_host_network_pods_none() {
        let (ips, src) = source_of(&pod(&["10.244.1.9", "fd00:1::9"], false)).unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(src.workload, "shop/balancer");
        assert_eq!(src.node.as_deref(), Some("node-b"));
        assert_eq!(source_of(&pod(&["192.168.0.2"], true)), None);
        assert_eq!(source_of(&pod(&[], false)), None);

        let mut idx = PodIndex::default();
        idx.set(&ips, src.clone());
        let v4: IpAddr = "10.244.1.9".parse().unwrap();
        assert_eq!(idx.direct(v4), None);
        assert_eq!(idx.mark_direct(v4), Some(&src));
        // An update of the same pod keeps what was learnt.
        idx.set(&ips, src.clone());
        assert_eq!(idx.direct(v4), Some(&src));
        // Another pod now has the address: nothing of the old one is kept.
        let other = PodSource {
            uid: "u2".into(),
            ..src.clone()
        };
        idx.set(&[v4], other.clone());
        assert_eq!(idx.direct(v4), None);
        idx.remove(v4, "u1");
        assert_eq!(idx.get(v4), Some(&other), "only the pod's own entry goes");
        idx.remove(v4, "u2");
        assert_eq!(idx.get(v4), None);
    }
}
