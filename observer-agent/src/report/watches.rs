//! One kind of watch the aggregator streams (terminating endpoints, new
//! endpoints in their startup window), by pod UID, with the snapshot of
//! the current subscription: what was watched before a reconnect and is
//! not in the new snapshot ended meanwhile.

use std::collections::{HashMap, HashSet};

#[derive(Debug)]
pub(super) struct Watches<E> {
    watched: HashMap<String, E>,
    /// UIDs in the current subscription's snapshot, until `synced`.
    snapshot: Option<HashSet<String>>,
}

impl<E> Default for Watches<E> {
    fn default() -> Self {
        Self {
            watched: HashMap::new(),
            snapshot: None,
        }
    }
}

impl<E: Clone> Watches<E> {
    /// A new subscription starts its snapshot.
    pub fn subscribed(&mut self) {
        self.snapshot = Some(HashSet::new());
    }

    /// `Some` when `uid` was not watched yet.
    pub fn add(&mut self, uid: &str, e: E) -> Option<E> {
        if let Some(s) = self.snapshot.as_mut() {
            s.insert(uid.to_owned());
        }
        if self.watched.contains_key(uid) {
            return None;
        }
        self.watched.insert(uid.to_owned(), e.clone());
        Some(e)
    }

    pub fn remove(&mut self, uid: &str) -> Option<E> {
        self.watched.remove(uid)
    }

    /// The snapshot is complete: the watches it lacks, ended.
    pub fn synced(&mut self) -> Vec<E> {
        let Some(current) = self.snapshot.take() else {
            return Vec::new();
        };
        let gone: Vec<String> = self
            .watched
            .keys()
            .filter(|u| !current.contains(*u))
            .cloned()
            .collect();
        gone.iter().filter_map(|u| self.watched.remove(u)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resubscription_ends_what_its_snapshot_lacks() {
        let mut w = Watches::default();
        w.subscribed();
        assert_eq!(w.add("u1", 1), Some(1));
        assert_eq!(w.add("u2", 2), Some(2));
        assert_eq!(w.add("u2", 2), None, "already watched");
        assert!(w.synced().is_empty());
        w.subscribed();
        assert_eq!(w.add("u2", 2), None);
        assert_eq!(w.synced(), [1]);
        assert_eq!(w.remove("u2"), Some(2));
        assert_eq!(w.remove("u2"), None);
    }
}
