//! What `/v1/deletions` and `/v1/deletions/{podUid}` add to the store's
//! answers so that they stay small on large clusters: the continue token of
//! a page of summaries, and the filters of one deletion's detail.

use std::cmp::Ordering;

use observer_proto::UnixNanos;
use observer_proto::api::{DeletionRecord, NodeClass, NodeMeasurement, RouterMeasurement};
use thiserror::Error;

use crate::store::DeletionPosition;

/// Version prefix of the tokens this aggregator issues.
const TOKEN_PREFIX: &str = "d1.";

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "continue token {0:?} was not issued by this API (take it from a previous page's \"continue\")"
)]
pub struct BadToken(pub String);

/// The token that continues a listing after `last`, the page's last item.
/// Opaque to clients; it names a position in the listing order, so it stays
/// valid while deletions are stored or pruned.
pub fn continue_token(last: DeletionPosition) -> String {
    format!(
        "{TOKEN_PREFIX}{:x}.{:x}",
        last.finished.as_nanos(),
        last.row
    )
}

/// The position a token names.
pub fn parse_continue_token(token: &str) -> Result<DeletionPosition, BadToken> {
    let bad = || BadToken(token.to_owned());
    let (finished, row) = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .ok_or_else(bad)?;
    let finished = i64::from_str_radix(finished, 16).map_err(|_| bad())?;
    let row = i64::from_str_radix(row, 16).map_err(|_| bad())?;
    if finished < 0 || row < 0 {
        return Err(bad());
    }
    Ok(DeletionPosition {
        finished: UnixNanos::from_nanos(finished),
        row,
    })
}

/// Which nodes and routers of one deletion to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetailFilter {
    /// Only the N slowest: still routing at the timeout first (their
    /// latency exceeds it), then by latency plus error, those without a
    /// latency last.
    pub slowest: Option<usize>,
    /// Only this node (and the routers running on it).
    pub node: Option<String>,
    pub class: Option<NodeClass>,
}

/// What the filters read of a node or a router.
struct View<'a> {
    node: Option<&'a str>,
    class: Option<NodeClass>,
    /// Latency plus error, when there is a latency.
    upper: Option<f64>,
}

trait Entry {
    fn view(&self) -> View<'_>;
}

impl Entry for NodeMeasurement {
    fn view(&self) -> View<'_> {
        View {
            node: Some(&self.node),
            class: self.class,
            upper: self.upper_seconds(),
        }
    }
}

impl Entry for RouterMeasurement {
    fn view(&self) -> View<'_> {
        View {
            node: self.router.node.as_deref(),
            class: self.class,
            upper: self.upper_seconds(),
        }
    }
}

/// Slowest first (see [`DetailFilter::slowest`]).
fn slower_first<E: Entry>(a: &E, b: &E) -> Ordering {
    let rank = |e: &E| {
        let v = e.view();
        match (v.class, v.upper) {
            (Some(NodeClass::StillRouting), _) => (2, f64::INFINITY),
            (_, Some(u)) => (1, u),
            (_, None) => (0, 0.0),
        }
    };
    let (ra, rb) = (rank(a), rank(b));
    rb.0.cmp(&ra.0).then(rb.1.total_cmp(&ra.1))
}

impl DetailFilter {
    /// Keeps the nodes and routers the filter selects, slowest first when
    /// `slowest` is set; the rest of the record is unchanged.
    pub fn apply(&self, record: &mut DeletionRecord) {
        self.apply_to(&mut record.nodes);
        self.apply_to(&mut record.routers);
    }

    fn apply_to<E: Entry>(&self, entries: &mut Vec<E>) {
        entries.retain(|e| {
            let v = e.view();
            self.node.as_deref().is_none_or(|n| v.node == Some(n))
                && self.class.is_none_or(|c| v.class == Some(c))
        });
        if let Some(n) = self.slowest {
            entries.sort_by(slower_first);
            entries.truncate(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_others_are_refused() {
        let p = DeletionPosition {
            finished: UnixNanos::from_nanos(1_700_000_000_123_456_789),
            row: 42,
        };
        assert_eq!(parse_continue_token(&continue_token(p)), Ok(p));
        for bad in ["", "42", "d1.", "d1.zz.1", "d1.1", "d2.1.1", "d1.-1.2"] {
            assert_eq!(
                parse_continue_token(bad),
                Err(BadToken(bad.to_owned())),
                "{bad}"
            );
        }
    }

    fn node(name: &str, class: NodeClass, latency: Option<f64>) -> NodeMeasurement {
        NodeMeasurement {
            node: name.into(),
            class: Some(class),
            latency_seconds: latency,
            error_seconds: latency.map(|_| 0.1),
            ..NodeMeasurement::default()
        }
    }

    fn names(r: &DeletionRecord) -> Vec<&str> {
        r.nodes.iter().map(|n| n.node.as_str()).collect()
    }

    #[test]
    fn detail_filters_pick_the_slowest_a_node_or_a_class() {
        let record = DeletionRecord {
            nodes: vec![
                node("fast", NodeClass::Measured, Some(0.5)),
                node("gone", NodeClass::Unknown, None),
                node("slow", NodeClass::Measured, Some(3.0)),
                node("stuck", NodeClass::StillRouting, None),
            ],
            ..DeletionRecord::default()
        };
        let filtered = |f: DetailFilter| {
            let mut r = record.clone();
            f.apply(&mut r);
            r
        };
        let all = filtered(DetailFilter {
            slowest: Some(10),
            ..DetailFilter::default()
        });
        assert_eq!(names(&all), ["stuck", "slow", "fast", "gone"]);
        let two = filtered(DetailFilter {
            slowest: Some(2),
            ..DetailFilter::default()
        });
        assert_eq!(names(&two), ["stuck", "slow"]);
        let one = filtered(DetailFilter {
            node: Some("fast".into()),
            ..DetailFilter::default()
        });
        assert_eq!(names(&one), ["fast"]);
        let measured = filtered(DetailFilter {
            class: Some(NodeClass::Measured),
            slowest: Some(1),
            ..DetailFilter::default()
        });
        assert_eq!(names(&measured), ["slow"]);
        assert_eq!(
            names(&filtered(DetailFilter::default())),
            names(&record),
            "no filter: everything, in stored order"
        );
    }
}
