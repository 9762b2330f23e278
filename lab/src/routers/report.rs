//! The routers' part of the lab's report: every router, per deletion what
//! the aggregator measured for each against the injected truth, the
//! accuracy per router type against its stated bound, and failed requests
//! by router.

use std::{collections::BTreeMap, fmt::Write as _};

use observer_proto::{
    UnixNanos,
    api::{DeletionRecord, NodeClass, RouterKind, RouterMeasurement, RouterRef},
};
use serde::Serialize;

use super::{ByRouter, Choice, Routers};
use crate::scenario::DeletionTruth;

/// A router of the lab as reported: the aggregator's name for it and the
/// lab's type.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterInfo {
    #[serde(flatten)]
    pub router: RouterRef,
    #[serde(rename = "type")]
    pub choice: Choice,
}

/// Every router of the lab: each node's kube-proxy (its rules exist
/// whether or not a VIP client runs), then the others.
pub fn infos(nodes: &[String], routers: &Routers) -> Vec<RouterInfo> {
    let kube_proxies = nodes.iter().map(|n| RouterInfo {
        router: RouterRef {
            kind: RouterKind::Node,
            name: n.clone(),
            node: Some(n.clone()),
        },
        choice: Choice::KubeProxy,
    });
    kube_proxies
        .chain(routers.routers.iter().map(|r| RouterInfo {
            router: r.info.clone(),
            choice: r.choice,
        }))
        .collect()
}

/// One router's measurement of one deletion against the injected truth.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerRouter {
    pub router: String,
    pub kind: RouterKind,
    #[serde(rename = "type")]
    pub choice: Choice,
    /// The aggregator's latency for this router (from its T0); null when
    /// it reported none.
    pub measured_ms: Option<f64>,
    /// When the router really stopped sending new connections to the pod:
    /// a node's rule commit, the ingress's reload, a balancer's new list.
    pub injected_ms: f64,
    /// measured - injected.
    pub error_ms: Option<f64>,
    /// The aggregator's error budget of its measurement (safe side).
    pub uncertainty_ms: Option<f64>,
    pub class: Option<NodeClass>,
}

/// The aggregator's measurement of `router`: the same kind and name, or
/// for a workload the same kind on the same node (the aggregator may name
/// a workload by its ReplicaSet or its Deployment).
fn measurement<'a>(
    record: Option<&'a DeletionRecord>,
    router: &RouterRef,
) -> Option<&'a RouterMeasurement> {
    let routers = &record?.routers;
    routers
        .iter()
        .find(|m| m.router.kind == router.kind && m.router.name == router.name)
        .or_else(|| {
            routers.iter().find(|m| {
                router.kind == RouterKind::Workload
                    && m.router.kind == RouterKind::Workload
                    && m.router.node.is_some()
                    && m.router.node == router.node
            })
        })
}

/// Per router of `infos`: the truth of `truth` joined with `record`.
pub fn per_router(
    infos: &[RouterInfo],
    truth: &DeletionTruth,
    record: Option<&DeletionRecord>,
    t0: UnixNanos,
) -> Vec<PerRouter> {
    let ms_since_t0 = |t: UnixNanos| (t - t0) as f64 / 1e6;
    infos
        .iter()
        .filter_map(|info| {
            let r = &info.router;
            let injected = match info.choice {
                Choice::KubeProxy => truth
                    .removals
                    .iter()
                    .find(|c| Some(&c.node) == r.node.as_ref())?
                    .truth_unix_nano(),
                _ => {
                    truth
                        .router_drops
                        .iter()
                        .find(|d| d.router == r.name)?
                        .dropped_unix_nano
                }
            };
            let m = measurement(record, r);
            let measured_ms = m.and_then(|m| m.latency_seconds).map(|s| s * 1000.0);
            let injected_ms = ms_since_t0(injected);
            Some(PerRouter {
                router: r.name.clone(),
                kind: r.kind,
                choice: info.choice,
                measured_ms,
                injected_ms,
                error_ms: measured_ms.map(|m| m - injected_ms),
                uncertainty_ms: m.and_then(|m| m.error_seconds).map(|s| s * 1000.0),
                class: m.and_then(|m| m.class),
            })
        })
        .collect()
}

/// The gap between two new connections of a round-robin router to one
/// pod: `backends / rate`. A router timed by its last connection is seen
/// that much early at most.
pub fn connection_gap_ms(backends: usize, rate: f64) -> f64 {
    backends as f64 * 1000.0 / rate.max(0.001)
}

/// How late a traffic-timed measurement may come after the drop: a
/// connection the router began just before it reaches the pod a moment
/// later, plus the agents' clock offset.
pub const LATE_SLACK_MS: f64 = 50.0;

/// How late a router timed by its traffic may still connect after the
/// drop: a request already bound to the pod when the router let go of it
/// (nginx's old worker finishing the requests it holds after a reload)
/// connects after the drop; up to 80 ms was measured (docs/benchmarks.md).
pub const IN_FLIGHT_MS: f64 = 250.0;

/// The interval `measured - injected` must fall in for a router of this
/// type. kube-proxy is timed by its rules (5 ms for the netlink-announced
/// modes; iptables-legacy's transaction window, checked per node by the
/// lab's end-to-end tests, is within the same 50 ms); the others by their
/// last connection, at most two connection gaps early (a client does not
/// hold its rate exactly, and may pass a pod over once) and one request in
/// flight late.
pub fn bound_ms(choice: Choice, gap_ms: f64) -> (f64, f64) {
    match choice {
        Choice::KubeProxy => (-LATE_SLACK_MS, LATE_SLACK_MS),
        _ => (-(2.0 * gap_ms + LATE_SLACK_MS), IN_FLIGHT_MS),
    }
}

/// |measured - injected| of one router type, and the measurements outside
/// its bound.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterAccuracy {
    #[serde(rename = "type")]
    pub choice: Choice,
    pub samples: usize,
    pub missing: usize,
    pub p50_abs_error_ms: Option<f64>,
    pub p99_abs_error_ms: Option<f64>,
    pub max_abs_error_ms: Option<f64>,
    /// The bound (ms) measured - injected must fall in.
    pub bound_ms: (f64, f64),
    pub outside_bound: usize,
}

/// Accuracy per router type over `per_router` measurements.
pub fn accuracy<'a>(
    per_router: impl IntoIterator<Item = &'a PerRouter>,
    gap_ms: f64,
) -> Vec<RouterAccuracy> {
    let mut by_type: BTreeMap<Choice, (Vec<f64>, usize)> = BTreeMap::new();
    for p in per_router {
        let entry = by_type.entry(p.choice).or_default();
        match p.error_ms {
            Some(e) => entry.0.push(e),
            None => entry.1 += 1,
        }
    }
    by_type
        .into_iter()
        .map(|(choice, (errors, missing))| {
            let bound = bound_ms(choice, gap_ms);
            let mut abs: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
            abs.sort_by(f64::total_cmp);
            RouterAccuracy {
                choice,
                samples: abs.len(),
                missing,
                p50_abs_error_ms: crate::report::nearest_rank(&abs, 0.5),
                p99_abs_error_ms: crate::report::nearest_rank(&abs, 0.99),
                max_abs_error_ms: abs.last().copied(),
                bound_ms: bound,
                outside_bound: errors
                    .iter()
                    .filter(|e| **e < bound.0 || **e > bound.1)
                    .count(),
            }
        })
        .collect()
}

/// Failed requests of one run per router type.
pub fn failed_by_type(infos: &[RouterInfo], by_router: &ByRouter) -> BTreeMap<Choice, u64> {
    let mut out = BTreeMap::new();
    for (name, report) in by_router {
        if let Some(info) = infos.iter().find(|i| i.router.name == *name) {
            *out.entry(info.choice).or_default() += report.failed_total();
        }
    }
    out
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// The printed accuracy per router type.
pub fn write_accuracy(out: &mut String, accuracy: &[RouterAccuracy]) {
    let _ = writeln!(
        out,
        "\nAccuracy |measured - injected| by router type (the aggregator's per-router measurements):"
    );
    if accuracy.iter().all(|a| a.samples == 0) {
        let _ = writeln!(
            out,
            "  none: the aggregator reported no per-router measurement (`routers` of /v1/deletions is empty)"
        );
        return;
    }
    for a in accuracy {
        let _ = writeln!(
            out,
            "  {:<12} samples {:>3} (missing {:>3}), p50 {} ms, p99 {} ms, max {} ms; bound {:.0}..{:.0} ms, outside {}",
            a.choice.to_string(),
            a.samples,
            a.missing,
            opt_ms(a.p50_abs_error_ms),
            opt_ms(a.p99_abs_error_ms),
            opt_ms(a.max_abs_error_ms),
            a.bound_ms.0,
            a.bound_ms.1,
            a.outside_bound
        );
    }
}

/// What the folklore delay does for one router type: measured, what it
/// needs, and the time it wastes (negative) or lacks (positive) per pod.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FolkloreVerdict {
    #[serde(rename = "type")]
    pub choice: Choice,
    /// The largest latency the aggregator measured for routers of this type.
    pub measured_max_ms: f64,
    /// Where it comes from: the aggregator's per-router latency, or for
    /// kube-proxy while those are empty, its per-node T_rules.
    pub source: &'static str,
    /// Whole seconds covering it (a preStop is whole seconds).
    pub needed_seconds: u64,
    /// needed - folklore: below zero the folklore delay wastes that much
    /// per pod of a rollout, above zero it is that much too short.
    pub versus_folklore_seconds: i64,
}

/// Per router type, how the folklore `sleep 5` compares with what was
/// measured.
pub fn folklore(
    deletions: &[crate::report::DeletionReport],
    folklore_s: u64,
) -> Vec<FolkloreVerdict> {
    let mut max: BTreeMap<Choice, (f64, &'static str)> = BTreeMap::new();
    fn take(
        max: &mut BTreeMap<Choice, (f64, &'static str)>,
        choice: Choice,
        ms: f64,
        source: &'static str,
    ) {
        let e = max.entry(choice).or_insert((ms, source));
        if ms > e.0 {
            *e = (ms, source);
        }
    }
    for p in deletions.iter().flat_map(|d| &d.per_router) {
        if let Some(ms) = p.measured_ms {
            take(&mut max, p.choice, ms, "per-router latency");
        }
    }
    if !max.contains_key(&Choice::KubeProxy) {
        for n in deletions.iter().flat_map(|d| &d.per_node) {
            if let Some(ms) = n.measured_rules_ms {
                take(&mut max, Choice::KubeProxy, ms, "per-node T_rules");
            }
        }
    }
    max.into_iter()
        .map(|(choice, (ms, source))| {
            let needed = (ms / 1000.0).ceil().max(0.0) as u64;
            FolkloreVerdict {
                choice,
                measured_max_ms: ms,
                source,
                needed_seconds: needed,
                versus_folklore_seconds: needed as i64 - folklore_s as i64,
            }
        })
        .collect()
}

/// The printed comparison with the folklore delay.
pub fn write_folklore(
    out: &mut String,
    verdicts: &[FolkloreVerdict],
    folklore_s: u64,
    pods: usize,
) {
    if verdicts.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nFolklore preStop {folklore_s} s against the measurements:"
    );
    for v in verdicts {
        let verdict = match v.versus_folklore_seconds {
            d if d > 0 => format!("too short by {d} s: requests through it fail"),
            0 => "just enough".to_owned(),
            d => format!(
                "{} s would do: the folklore wastes {} s per pod, {} s over a rollout of {pods} pods",
                v.needed_seconds,
                -d,
                -d * pods as i64
            ),
        };
        let _ = writeln!(
            out,
            "  {:<12} measured max {:>7.0} ms ({}): {verdict}",
            v.choice.to_string(),
            v.measured_max_ms,
            v.source
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(choice: Choice, error_ms: Option<f64>) -> PerRouter {
        PerRouter {
            router: format!("{choice}"),
            kind: RouterKind::Workload,
            choice,
            measured_ms: error_ms.map(|e| 1000.0 + e),
            injected_ms: 1000.0,
            error_ms,
            uncertainty_ms: None,
            class: None,
        }
    }

    #[test]
    fn traffic_timed_routers_may_be_early_by_two_gaps_and_a_request_late() {
        // 16 backends at 40 requests/s: one connection per pod every 400 ms.
        let gap = connection_gap_ms(16, 40.0);
        assert_eq!(gap, 400.0);
        assert_eq!(bound_ms(Choice::Ingress, gap), (-850.0, 250.0));
        assert_eq!(bound_ms(Choice::KubeProxy, gap), (-50.0, 50.0));
        let rows = [
            row(Choice::Ingress, Some(-840.0)),
            row(Choice::Ingress, Some(-860.0)),
            row(Choice::Ingress, Some(260.0)),
            row(Choice::Ingress, None),
            row(Choice::KubeProxy, Some(-60.0)),
        ];
        let acc = accuracy(&rows, gap);
        let ingress = acc.iter().find(|a| a.choice == Choice::Ingress).unwrap();
        assert_eq!((ingress.samples, ingress.missing), (3, 1));
        assert_eq!(ingress.outside_bound, 2);
        assert_eq!(ingress.max_abs_error_ms, Some(860.0));
        let kube_proxy = acc.iter().find(|a| a.choice == Choice::KubeProxy).unwrap();
        assert_eq!(kube_proxy.outside_bound, 1);
    }
}
