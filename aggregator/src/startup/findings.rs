//! Finished startup windows summed up per workload, node and router kind,
//! and the finding a workload gets when its new pods refused connections
//! after being marked ready (thresholds in [`Thresholds`]).

use std::collections::{BTreeMap, BTreeSet};

use observer_proto::api::startup::{
    PropagationSummary, RolloutFinding, StartupFinding, StartupRecord, WorkloadStartup,
};
use observer_proto::api::{RouterKind, RouterRef};

use crate::stats::nearest_rank;

/// When a workload's startups make a finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// New pods that refused at least one connection after ready.
    pub min_refusing_pods: u64,
    /// Refused connections over all of the workload's new pods.
    pub min_refused_connections: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_refusing_pods: 1,
            min_refused_connections: 1,
        }
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

#[derive(Default)]
struct Workload<'a> {
    services: BTreeSet<&'a str>,
    records: Vec<&'a StartupRecord>,
}

/// Per workload, sorted by namespace and name.
pub fn workloads(records: &[StartupRecord]) -> Vec<WorkloadStartup> {
    group(records)
        .into_iter()
        .map(|((namespace, workload), w)| summarize(namespace, workload, &w))
        .collect()
}

fn group(records: &[StartupRecord]) -> BTreeMap<(&str, &str), Workload<'_>> {
    let mut by: BTreeMap<(&str, &str), Workload<'_>> = BTreeMap::new();
    for r in records {
        let w = by
            .entry((r.namespace.as_str(), r.workload.as_str()))
            .or_default();
        w.services.extend(r.services.iter().map(String::as_str));
        w.records.push(r);
    }
    by
}

fn summarize(namespace: &str, workload: &str, w: &Workload<'_>) -> WorkloadStartup {
    let additions = sorted(
        w.records
            .iter()
            .flat_map(|r| r.nodes.iter().filter_map(|n| n.propagation_seconds))
            .collect(),
    );
    let accepted = sorted(
        w.records
            .iter()
            .filter_map(|r| r.ready_to_first_accepted_seconds)
            .collect(),
    );
    WorkloadStartup {
        namespace: namespace.to_owned(),
        workload: workload.to_owned(),
        services: w.services.iter().map(|s| (*s).to_owned()).collect(),
        new_pods: w.records.len() as u64,
        pods_refusing: w
            .records
            .iter()
            .filter(|r| r.refused_connections > 0)
            .count() as u64,
        refused_connections: w.records.iter().map(|r| r.refused_connections).sum(),
        reset_connections: w.records.iter().map(|r| r.reset_connections).sum(),
        addition_p50_seconds: nearest_rank(&additions, 0.5),
        addition_p99_seconds: nearest_rank(&additions, 0.99),
        ready_to_first_accepted_p50_seconds: nearest_rank(&accepted, 0.5),
        ready_to_first_accepted_p99_seconds: nearest_rank(&accepted, 0.99),
    }
}

/// The findings of the workloads that meet `t`.
pub fn findings(records: &[StartupRecord], t: Thresholds) -> Vec<StartupFinding> {
    group(records)
        .into_iter()
        .filter_map(|((namespace, workload), w)| {
            let s = summarize(namespace, workload, &w);
            let meets = s.pods_refusing >= t.min_refusing_pods.max(1)
                && s.refused_connections >= t.min_refused_connections.max(1);
            meets.then(|| finding(s, &w))
        })
        .collect()
}

fn finding(s: WorkloadStartup, w: &Workload<'_>) -> StartupFinding {
    let refusing_for_seconds = w
        .records
        .iter()
        .filter_map(|r| r.last_refusal_seconds)
        .fold(0.0, f64::max);
    let routers: BTreeMap<(RouterKind, &str), &RouterRef> = w
        .records
        .iter()
        .flat_map(|r| r.routers.iter().filter(|x| x.refused_connections > 0))
        .map(|x| ((x.router.kind, x.router.name.as_str()), &x.router))
        .collect();
    let message = format!(
        "{} of {} new pods of workload {} refused {} connections within {:.1} s of becoming ready: \
         the readiness probe passes before the server listens",
        s.pods_refusing, s.new_pods, s.workload, s.refused_connections, refusing_for_seconds
    );
    StartupFinding {
        namespace: s.namespace,
        workload: s.workload,
        services: s.services,
        new_pods: s.new_pods,
        pods_refusing: s.pods_refusing,
        refused_connections: s.refused_connections,
        refusing_for_seconds,
        routers: routers.into_values().cloned().collect(),
        message,
    }
}

/// Per workload whose new pods were followed by an old pod's deletion
/// while some node was not routing to them yet.
pub fn rollout_findings(records: &[StartupRecord]) -> Vec<RolloutFinding> {
    group(records)
        .into_iter()
        .filter_map(|((namespace, workload), w)| {
            let followed: Vec<&&StartupRecord> = w
                .records
                .iter()
                .filter(|r| r.old_pod_deleted_seconds.is_some())
                .collect();
            let affected: Vec<u64> = followed
                .iter()
                .map(|r| r.nodes_not_routing_at_old_deletion)
                .filter(|n| *n > 0)
                .collect();
            let max_nodes = affected.iter().copied().max()?;
            Some(RolloutFinding {
                namespace: namespace.to_owned(),
                workload: workload.to_owned(),
                new_pods: followed.len() as u64,
                pods_affected: affected.len() as u64,
                max_nodes_affected: max_nodes,
                message: format!(
                    "the rollout of workload {workload} deleted old pods while up to {max_nodes} nodes had not \
                     started routing to their replacements ({} of {} new pods): the addition's propagation \
                     exceeded the time from ready to the next deletion (raise minReadySeconds)",
                    affected.len(),
                    followed.len()
                ),
            })
        })
        .collect()
}

/// Addition propagation per node, sorted by node.
pub fn by_node(records: &[StartupRecord]) -> Vec<PropagationSummary> {
    let mut per: BTreeMap<&str, (Vec<f64>, u64)> = BTreeMap::new();
    for n in records.iter().flat_map(|r| &r.nodes) {
        let e = per.entry(n.node.as_str()).or_default();
        e.0.extend(n.propagation_seconds);
        e.1 += u64::from(n.not_added);
    }
    per.into_iter()
        .map(|(node, (v, not_added))| PropagationSummary {
            node: Some(node.to_owned()),
            not_added,
            ..quantiles(v)
        })
        .collect()
}

/// Time from T_ready to each router's first new connection, per kind.
pub fn by_router_kind(records: &[StartupRecord]) -> Vec<PropagationSummary> {
    RouterKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let v: Vec<f64> = records
                .iter()
                .flat_map(|r| &r.routers)
                .filter(|x| x.router.kind == kind)
                .filter_map(|x| x.first_connection_seconds)
                .collect();
            (!v.is_empty()).then(|| PropagationSummary {
                kind: Some(kind),
                ..quantiles(v)
            })
        })
        .collect()
}

fn quantiles(v: Vec<f64>) -> PropagationSummary {
    let v = sorted(v);
    PropagationSummary {
        samples: v.len() as u64,
        p50_seconds: nearest_rank(&v, 0.5),
        p99_seconds: nearest_rank(&v, 0.99),
        max_seconds: v.last().copied(),
        ..PropagationSummary::default()
    }
}

#[cfg(test)]
mod tests {
    use observer_proto::api::startup::{NodeAddition, RouterStartup};

    use super::*;

    fn record(pod: &str, workload: &str, refused: u64) -> StartupRecord {
        let node = RouterRef {
            kind: RouterKind::Node,
            name: "node-a".into(),
            node: Some("node-a".into()),
        };
        StartupRecord {
            pod_uid: pod.into(),
            namespace: "shop".into(),
            pod_name: pod.into(),
            workload: workload.into(),
            services: vec!["web".into()],
            nodes: vec![
                NodeAddition {
                    node: "node-a".into(),
                    propagation_seconds: Some(0.5),
                    ..NodeAddition::default()
                },
                NodeAddition {
                    node: "node-b".into(),
                    not_added: true,
                    ..NodeAddition::default()
                },
            ],
            routers: vec![RouterStartup {
                router: node,
                first_connection_seconds: Some(0.7),
                connections: refused + 3,
                refused_connections: refused,
                ..RouterStartup::default()
            }],
            refused_connections: refused,
            last_refusal_seconds: (refused > 0).then_some(1.84),
            ready_to_first_accepted_seconds: Some(2.0),
            ..StartupRecord::default()
        }
    }

    #[test]
    fn a_workload_whose_new_pods_refused_gets_a_finding_naming_it() {
        let records = [
            record("web-1", "shop/web", 7),
            record("web-2", "shop/web", 0),
            record("web-3", "shop/web", 3),
            record("api-1", "shop/api", 0),
        ];
        let f = findings(&records, Thresholds::default());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].workload, "shop/web");
        assert_eq!((f[0].pods_refusing, f[0].new_pods), (2, 3));
        assert_eq!(f[0].refused_connections, 10);
        assert_eq!(f[0].routers.len(), 1);
        assert_eq!(
            f[0].message,
            "2 of 3 new pods of workload shop/web refused 10 connections within 1.8 s of \
             becoming ready: the readiness probe passes before the server listens"
        );
    }

    #[test]
    fn the_thresholds_hold_back_a_finding() {
        let records = [
            record("web-1", "shop/web", 7),
            record("web-2", "shop/web", 3),
        ];
        let pods = |n| Thresholds {
            min_refusing_pods: n,
            ..Thresholds::default()
        };
        assert_eq!(findings(&records, pods(2)).len(), 1);
        assert!(findings(&records, pods(3)).is_empty());
        let connections = |n| Thresholds {
            min_refused_connections: n,
            ..Thresholds::default()
        };
        assert_eq!(findings(&records, connections(10)).len(), 1);
        assert!(findings(&records, connections(11)).is_empty());
        // Zero thresholds still need one refusal: no finding without one.
        let zero = Thresholds {
            min_refusing_pods: 0,
            min_refused_connections: 0,
        };
        assert!(findings(&[record("web-1", "shop/web", 0)], zero).is_empty());
    }

    #[test]
    fn a_rollout_deleting_before_every_node_routes_is_reported_with_its_nodes() {
        let followed = |pod, nodes| StartupRecord {
            old_pod_deleted_seconds: Some(0.3),
            nodes_not_routing_at_old_deletion: nodes,
            ..record(pod, "shop/web", 0)
        };
        let records = [
            followed("web-1", 2),
            followed("web-2", 0),
            followed("web-3", 1),
            record("web-4", "shop/web", 0),
            StartupRecord {
                old_pod_deleted_seconds: Some(5.0),
                ..record("api-1", "shop/api", 0)
            },
        ];
        let f = rollout_findings(&records);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].workload, "shop/web");
        assert_eq!(
            (f[0].pods_affected, f[0].new_pods, f[0].max_nodes_affected),
            (2, 3, 2)
        );
        assert!(f[0].message.contains("up to 2 nodes"), "{}", f[0].message);
    }

    #[test]
    fn quantiles_per_node_and_router_kind() {
        let records = [
            record("web-1", "shop/web", 0),
            record("web-2", "shop/web", 0),
        ];
        let nodes = by_node(&records);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].node.as_deref(), Some("node-a"));
        assert_eq!((nodes[0].samples, nodes[0].p99_seconds), (2, Some(0.5)));
        assert_eq!((nodes[1].samples, nodes[1].not_added), (0, 2));
        let kinds = by_router_kind(&records);
        assert_eq!(kinds.len(), 1);
        assert_eq!(kinds[0].kind, Some(RouterKind::Node));
        assert_eq!(kinds[0].p50_seconds, Some(0.7));
        let w = workloads(&records);
        assert_eq!(w[0].addition_p99_seconds, Some(0.5));
        assert_eq!(w[0].ready_to_first_accepted_p50_seconds, Some(2.0));
    }
}
