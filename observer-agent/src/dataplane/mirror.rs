//! A mirror of the nf_tables rulesets, kept only as far as reachability
//! needs: per table its chains (base or regular) with their rules' jumps,
//! verdict maps and DNAT targets, and the verdict maps' elements.
//!
//! Applying the same event twice is harmless, so a dump and the
//! notifications that overlap it converge on the kernel's state.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use super::nft_msg::{NftEvent, RuleSummary, SetElem, TableId};

#[derive(Debug, Default)]
struct Chain {
    base: bool,
    rules: BTreeMap<u64, RuleSummary>,
}

#[derive(Debug, Default)]
struct Set {
    handle: u64,
    /// Element key -> chain of its jump/goto verdict.
    elems: HashMap<Vec<u8>, Option<String>>,
}

#[derive(Debug, Default)]
struct Table {
    chains: HashMap<String, Chain>,
    sets: HashMap<String, Set>,
}

#[derive(Debug, Default)]
pub struct Mirror {
    tables: HashMap<TableId, Table>,
}

impl Mirror {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.tables.clear();
    }

    pub fn tables(&self) -> impl Iterator<Item = &TableId> {
        self.tables.keys()
    }

    /// Sets of this table (for dumping their elements).
    pub fn sets(&self, table: &TableId) -> Vec<String> {
        self.tables
            .get(table)
            .map(|t| t.sets.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Rules, chains and set elements held (for sizing).
    pub fn counts(&self) -> (usize, usize, usize) {
        self.tables.values().fold((0, 0, 0), |(r, c, e), t| {
            (
                r + t.chains.values().map(|c| c.rules.len()).sum::<usize>(),
                c + t.chains.len(),
                e + t.sets.values().map(|s| s.elems.len()).sum::<usize>(),
            )
        })
    }

    pub fn apply(&mut self, event: NftEvent) {
        match event {
            NftEvent::NewTable(id) => {
                self.tables.entry(id).or_default();
            }
            NftEvent::DelTable(id) => {
                self.tables.remove(&id);
            }
            NftEvent::NewChain { table, name, base } => {
                self.tables
                    .entry(table)
                    .or_default()
                    .chains
                    .entry(name)
                    .or_default()
                    .base |= base;
            }
            NftEvent::DelChain { table, name } => {
                if let Some(t) = self.tables.get_mut(&table) {
                    t.chains.remove(&name);
                }
            }
            NftEvent::NewRule {
                table,
                chain,
                handle,
                summary,
            } => {
                self.tables
                    .entry(table)
                    .or_default()
                    .chains
                    .entry(chain)
                    .or_default()
                    .rules
                    .insert(handle, summary);
            }
            NftEvent::DelRule {
                table,
                chain,
                handle,
            } => {
                if let Some(c) = self
                    .tables
                    .get_mut(&table)
                    .and_then(|t| t.chains.get_mut(&chain))
                {
                    c.rules.remove(&handle);
                }
            }
            NftEvent::NewSet {
                table,
                name,
                handle,
            } => self.new_set(table, name, handle),
            NftEvent::DelSet {
                table,
                name,
                handle,
            } => {
                if let Some(t) = self.tables.get_mut(&table)
                    && t.sets.get(&name).is_some_and(|s| s.handle == handle)
                {
                    t.sets.remove(&name);
                }
            }
            NftEvent::NewElems { table, set, elems } => self.new_elems(table, set, elems),
            NftEvent::DelElems { table, set, elems } => self.del_elems(&table, &set, elems),
            NftEvent::NewGen { .. } | NftEvent::Ignored => {}
        }
    }

    fn new_set(&mut self, table: TableId, name: String, handle: u64) {
        let sets = &mut self.tables.entry(table).or_default().sets;
        // Anonymous set names are reused within one transaction: a new
        // handle under a known name is a new set.
        if sets.get(&name).is_none_or(|s| s.handle != handle) {
            sets.insert(
                name,
                Set {
                    handle,
                    elems: HashMap::new(),
                },
            );
        }
    }

    fn new_elems(&mut self, table: TableId, set: String, elems: Vec<SetElem>) {
        let set = self
            .tables
            .entry(table)
            .or_default()
            .sets
            .entry(set)
            .or_default();
        for SetElem { key, chain } in elems {
            set.elems.insert(key, chain);
        }
    }

    fn del_elems(&mut self, table: &TableId, set: &str, elems: Vec<SetElem>) {
        if let Some(s) = self.tables.get_mut(table).and_then(|t| t.sets.get_mut(set)) {
            // A flush of the whole set carries no elements.
            if elems.is_empty() {
                s.elems.clear();
            }
            for elem in elems {
                s.elems.remove(&elem.key);
            }
        }
    }

    /// Drops anonymous sets (`__map0`, `__set1`, ...) no rule of the table
    /// uses any more: the kernel destroys them with their last rule, whether
    /// or not that is notified.
    pub fn prune_anonymous_sets(&mut self, table: &TableId) {
        let Some(t) = self.tables.get_mut(table) else {
            return;
        };
        let used: HashSet<&str> = t
            .chains
            .values()
            .flat_map(|c| c.rules.values())
            .flat_map(|r| r.verdict_maps.iter().map(String::as_str))
            .collect();
        t.sets
            .retain(|name, _| !name.starts_with("__") || used.contains(name.as_str()));
    }

    /// DNAT destinations reachable from the table's base chains, following
    /// jumps, gotos and verdict-map elements. A chain unlinked from the
    /// dispatch is not reachable even while it still exists.
    pub fn reachable_dnat(&self, table: &TableId) -> HashSet<SocketAddr> {
        let mut out = HashSet::new();
        let Some(t) = self.tables.get(table) else {
            return out;
        };
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack: Vec<&str> = t
            .chains
            .iter()
            .filter(|(_, c)| c.base)
            .map(|(name, _)| name.as_str())
            .collect();
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some(chain) = t.chains.get(name) else {
                continue;
            };
            for rule in chain.rules.values() {
                out.extend(rule.dnat.iter().copied());
                stack.extend(rule.jumps.iter().map(String::as_str));
                for map in &rule.verdict_maps {
                    if let Some(set) = t.sets.get(map) {
                        stack.extend(set.elems.values().flatten().map(String::as_str));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn table() -> TableId {
        TableId {
            family: 2,
            name: "kube-proxy".into(),
        }
    }

    fn chain(name: &str, base: bool) -> NftEvent {
        NftEvent::NewChain {
            table: table(),
            name: name.into(),
            base,
        }
    }

    fn rule(chain: &str, handle: u64, summary: RuleSummary) -> NftEvent {
        NftEvent::NewRule {
            table: table(),
            chain: chain.into(),
            handle,
            summary,
        }
    }

    fn ep(last: u8) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(10, 180, 0, last), 80))
    }

    /// nat-output -> services -vmap@service-ips-> svc -vmap@__map0-> ep1/ep2.
    fn kube_proxy_like() -> Mirror {
        let mut m = Mirror::new();
        for event in [
            chain("nat-output", true),
            chain("services", false),
            chain("svc", false),
            chain("ep1", false),
            chain("ep2", false),
            rule(
                "nat-output",
                1,
                RuleSummary {
                    jumps: vec!["services".into()],
                    ..Default::default()
                },
            ),
            rule(
                "services",
                2,
                RuleSummary {
                    verdict_maps: vec!["service-ips".into()],
                    ..Default::default()
                },
            ),
            NftEvent::NewSet {
                table: table(),
                name: "service-ips".into(),
                handle: 1,
            },
            NftEvent::NewElems {
                table: table(),
                set: "service-ips".into(),
                elems: vec![SetElem {
                    key: vec![1],
                    chain: Some("svc".into()),
                }],
            },
            NftEvent::NewSet {
                table: table(),
                name: "__map0".into(),
                handle: 2,
            },
            NftEvent::NewElems {
                table: table(),
                set: "__map0".into(),
                elems: vec![
                    SetElem {
                        key: vec![0],
                        chain: Some("ep1".into()),
                    },
                    SetElem {
                        key: vec![1],
                        chain: Some("ep2".into()),
                    },
                ],
            },
            rule(
                "svc",
                3,
                RuleSummary {
                    verdict_maps: vec!["__map0".into()],
                    ..Default::default()
                },
            ),
            rule(
                "ep1",
                4,
                RuleSummary {
                    dnat: vec![ep(1)],
                    ..Default::default()
                },
            ),
            rule(
                "ep2",
                5,
                RuleSummary {
                    dnat: vec![ep(2)],
                    ..Default::default()
                },
            ),
        ] {
            m.apply(event);
        }
        m
    }

    #[test]
    fn follows_jumps_and_verdict_maps() {
        let m = kube_proxy_like();
        assert_eq!(m.reachable_dnat(&table()), HashSet::from([ep(1), ep(2)]));
    }

    #[test]
    fn unlinked_chain_is_unreachable_while_it_still_exists() {
        let mut m = kube_proxy_like();
        // kube-proxy's sync: the service rule is replaced by one whose
        // anonymous map (same name, new handle) only names ep2.
        m.apply(NftEvent::DelRule {
            table: table(),
            chain: "svc".into(),
            handle: 3,
        });
        m.apply(NftEvent::NewSet {
            table: table(),
            name: "__map0".into(),
            handle: 7,
        });
        m.apply(NftEvent::NewElems {
            table: table(),
            set: "__map0".into(),
            elems: vec![SetElem {
                key: vec![0],
                chain: Some("ep2".into()),
            }],
        });
        // The old set's deletion arrives late: it must not remove the new one.
        m.apply(NftEvent::DelSet {
            table: table(),
            name: "__map0".into(),
            handle: 2,
        });
        m.apply(rule(
            "svc",
            8,
            RuleSummary {
                verdict_maps: vec!["__map0".into()],
                ..Default::default()
            },
        ));
        assert_eq!(m.reachable_dnat(&table()), HashSet::from([ep(2)]));
    }

    #[test]
    fn table_deletion_and_set_flush_remove_targets() {
        let mut m = kube_proxy_like();
        m.apply(NftEvent::DelElems {
            table: table(),
            set: "service-ips".into(),
            elems: vec![],
        });
        assert!(m.reachable_dnat(&table()).is_empty());
        let mut m = kube_proxy_like();
        m.apply(NftEvent::DelTable(table()));
        assert!(m.reachable_dnat(&table()).is_empty());
    }

    #[test]
    fn unused_anonymous_sets_are_pruned() {
        let mut m = kube_proxy_like();
        m.apply(NftEvent::NewSet {
            table: table(),
            name: "__map9".into(),
            handle: 9,
        });
        m.prune_anonymous_sets(&table());
        let sets = m.sets(&table());
        assert!(sets.contains(&"__map0".to_owned()), "{sets:?}");
        assert!(sets.contains(&"service-ips".to_owned()), "{sets:?}");
        assert!(!sets.contains(&"__map9".to_owned()), "{sets:?}");
    }

    #[test]
    fn applying_twice_converges() {
        let mut m = kube_proxy_like();
        m.apply(rule(
            "ep1",
            4,
            RuleSummary {
                dnat: vec![ep(1)],
                ..Default::default()
            },
        ));
        assert_eq!(m.reachable_dnat(&table()).len(), 2);
    }
}
