//! A mirror of the nf_tables rulesets, kept only as far as reachability
//! needs: per table its chains (base or regular) with their rules' jumps,
//! verdict maps and DNAT targets, and the verdict maps' elements.
//!
//! Reachability is maintained incrementally, so that a change costs work
//! in proportion to what it touched, not to the ruleset (kube-proxy's
//! partial syncs at 250 000 endpoints rewrite a handful of chains). Every
//! chain and verdict map counts the reachable rules and map elements that
//! lead to it; one is reachable while it is a base chain or that count is
//! not zero, and a DNAT target is selected while a reachable rule leads to
//! it. nf_tables refuses jump loops, so the counts cannot keep each other
//! alive; were a loop ever mirrored, its chains would merely stay
//! reachable until the next re-read, and no walk runs forever.
//!
//! Names are shared (`Arc<str>`) between a chain and what refers to it,
//! rules without jumps, maps or DNAT are not kept, and set keys of up to
//! 16 bytes (every kube-proxy key) are stored inline: docs/benchmarks.md
//! has the resulting memory per endpoint.
//!
//! Applying the same event twice is harmless, so a dump and the
//! notifications that overlap it converge on the kernel's state.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use super::nft_msg::{NftEvent, RuleSummary, SetElem, TableId};

type Name = Arc<str>;

/// A DNAT destination in 20 bytes, where a `SocketAddr` takes 32: the
/// mirror holds one per endpoint, 250 000 in a large cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    ip: [u8; 16],
    port: u16,
    v4: bool,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        let (ip, v4) = match addr.ip() {
            IpAddr::V4(ip) => (ip.to_ipv6_mapped().octets(), true),
            IpAddr::V6(ip) => (ip.octets(), false),
        };
        Target {
            ip,
            port: addr.port(),
            v4,
        }
    }
}

impl From<Target> for SocketAddr {
    fn from(t: Target) -> Self {
        let v6 = Ipv6Addr::from(t.ip);
        let ip = match (t.v4, v6.to_ipv4_mapped()) {
            (true, Some(v4)) => IpAddr::V4(v4),
            (true, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (false, _) => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, t.port)
    }
}

/// Where a rule (or a map element) leads.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Edge {
    Chain(Name),
    Map(Name),
    Dnat(Target),
}

/// A rule's edges: kube-proxy's rules have one each, kept inline.
#[derive(Debug)]
enum Edges {
    One(Edge),
    Many(Box<[Edge]>),
}

impl Edges {
    fn new(mut edges: Vec<Edge>) -> Self {
        match edges.len() {
            1 => Edges::One(edges.remove(0)),
            _ => Edges::Many(edges.into_boxed_slice()),
        }
    }

    fn as_slice(&self) -> &[Edge] {
        match self {
            Edges::One(e) => std::slice::from_ref(e),
            Edges::Many(e) => e,
        }
    }
}

#[derive(Debug)]
struct Rule {
    handle: u64,
    edges: Edges,
}

/// A chain's rules: a list while it is short, an index by handle once it
/// is long (iptables-nft's KUBE-SERVICES holds one rule per Service and is
/// flushed and rewritten by every kube-proxy sync).
#[derive(Debug)]
// Boxed: the index is rare, and inline it would make every chain (250 000
// of them in a large cluster) 24 bytes larger.
#[allow(clippy::box_collection)]
enum Rules {
    Few(Vec<Rule>),
    Many(Box<HashMap<u64, Edges>>),
}

impl Default for Rules {
    fn default() -> Self {
        Rules::Few(Vec::new())
    }
}

/// Above this many rules a chain indexes them by handle.
const FEW_RULES: usize = 16;

impl Rules {
    fn len(&self) -> usize {
        match self {
            Rules::Few(v) => v.len(),
            Rules::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&mut self, handle: u64) -> Option<Edges> {
        match self {
            Rules::Few(v) => {
                let at = v.iter().position(|r| r.handle == handle)?;
                Some(v.swap_remove(at).edges)
            }
            Rules::Many(m) => m.remove(&handle),
        }
    }

    fn insert(&mut self, handle: u64, edges: Edges) {
        match self {
            Rules::Few(v) if v.len() < FEW_RULES => v.push(Rule { handle, edges }),
            Rules::Few(v) => {
                let mut m: HashMap<u64, Edges> = v.drain(..).map(|r| (r.handle, r.edges)).collect();
                m.insert(handle, edges);
                *self = Rules::Many(Box::new(m));
            }
            Rules::Many(m) => {
                m.insert(handle, edges);
            }
        }
    }

    fn edges(&self) -> Box<dyn Iterator<Item = &Edge> + '_> {
        match self {
            Rules::Few(v) => Box::new(v.iter().flat_map(|r| r.edges.as_slice())),
            Rules::Many(m) => Box::new(m.values().flat_map(Edges::as_slice)),
        }
    }

    fn take(&mut self) -> Vec<Edges> {
        match std::mem::take(self) {
            Rules::Few(v) => v.into_iter().map(|r| r.edges).collect(),
            Rules::Many(m) => m.into_values().collect(),
        }
    }
}

#[derive(Debug, Default)]
struct Chain {
    base: bool,
    /// Its rules' edges are counted where they lead (it was reachable at
    /// the last settling).
    active: bool,
    /// Rules of active chains and elements of active maps leading here.
    inbound: u32,
    rules: Rules,
}

impl Chain {
    fn reachable(&self) -> bool {
        self.base || self.inbound > 0
    }

    /// Nothing left to remember: neither rules nor reachability.
    fn is_idle(&self) -> bool {
        !self.base && !self.active && self.inbound == 0 && self.rules.is_empty()
    }
}

/// An element key, inline up to 16 bytes: one allocation less per element.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Inline(u8, [u8; 16]),
    Heap(Box<[u8]>),
}

impl From<Vec<u8>> for Key {
    fn from(bytes: Vec<u8>) -> Self {
        if bytes.len() <= 16 {
            let mut inline = [0; 16];
            inline[..bytes.len()].copy_from_slice(&bytes);
            Key::Inline(bytes.len() as u8, inline)
        } else {
            Key::Heap(bytes.into_boxed_slice())
        }
    }
}

#[derive(Debug, Default)]
struct Set {
    /// The kernel's handle of the set under this name, once it was seen.
    handle: Option<u64>,
    /// Its elements are counted where they lead (it was reachable at the
    /// last settling).
    active: bool,
    /// Rules of active chains that look it up as a verdict map.
    inbound: u32,
    /// Rules that look it up, reachable or not (anonymous sets die with
    /// their last one).
    uses: u32,
    /// Element key -> chain of its jump/goto verdict.
    elems: HashMap<Key, Option<Name>>,
}

impl Set {
    fn is_idle(&self) -> bool {
        self.handle.is_none()
            && !self.active
            && self.inbound == 0
            && self.uses == 0
            && self.elems.is_empty()
    }
}

#[derive(Debug, Default)]
struct Table {
    chains: HashMap<Name, Chain>,
    sets: HashMap<Name, Set>,
    /// DNAT targets of reachable rules, with how many such rules.
    targets: HashMap<Target, u32>,
    /// Targets that became or stopped being selected since the last
    /// commit, with whether they were selected before.
    touched: HashMap<Target, bool>,
    /// Anonymous sets that lost their last rule since the last commit.
    unused: HashSet<Name>,
    /// Chains and maps whose inbound count or base flag changed since the
    /// last commit: their reachability is settled at the commit, so a
    /// flip undone within the transaction (kube-proxy flushes its base
    /// chains and adds their jumps again in every sync) costs nothing.
    unsettled: Vec<Edge>,
    /// Deleted: kept, empty, only until the commit reports what it selected.
    gone: bool,
}

impl Table {
    /// The shared name of a chain, if the table knows it.
    fn chain_name(&self, name: &str) -> Name {
        self.chains
            .get_key_value(name)
            .map_or_else(|| Name::from(name), |(k, _)| k.clone())
    }

    fn set_name(&self, name: &str) -> Name {
        self.sets
            .get_key_value(name)
            .map_or_else(|| Name::from(name), |(k, _)| k.clone())
    }

    fn edges(&self, summary: RuleSummary) -> Edges {
        let jumps = summary
            .jumps
            .iter()
            .map(|c| Edge::Chain(self.chain_name(c)));
        let maps = summary
            .verdict_maps
            .iter()
            .map(|s| Edge::Map(self.set_name(s)));
        let dnat = summary.dnat.into_iter().map(|a| Edge::Dnat(a.into()));
        Edges::new(jumps.chain(maps).chain(dnat).collect())
    }

    /// One more (`up`) or one fewer reference along `edge`, from an
    /// active chain or map; where it leads is settled at the commit.
    fn count(&mut self, edge: &Edge, up: bool) {
        match edge {
            Edge::Dnat(ep) => self.count_target(*ep, up),
            Edge::Chain(name) => {
                let chain = self.chains.entry(name.clone()).or_default();
                chain.inbound = step(chain.inbound, up);
                self.unsettled.push(edge.clone());
            }
            Edge::Map(name) => {
                let set = self.sets.entry(name.clone()).or_default();
                set.inbound = step(set.inbound, up);
                self.unsettled.push(edge.clone());
            }
        }
    }

    /// Makes every unsettled chain and map active exactly when it is
    /// reachable, counting or uncounting its edges, and follows what that
    /// changes. Returns the steps taken.
    fn settle(&mut self) -> u64 {
        let mut steps = 0;
        while let Some(node) = self.unsettled.pop() {
            steps += 1;
            let (edges, up): (Vec<Edge>, bool) = match &node {
                Edge::Chain(name) => match self.chains.get_mut(name) {
                    Some(chain) if chain.reachable() != chain.active => {
                        chain.active = !chain.active;
                        (chain.rules.edges().cloned().collect(), chain.active)
                    }
                    Some(chain) if chain.is_idle() => {
                        self.chains.remove(name);
                        continue;
                    }
                    _ => continue,
                },
                Edge::Map(name) => match self.sets.get_mut(name) {
                    Some(set) if (set.inbound > 0) != set.active => {
                        set.active = !set.active;
                        let elems = set.elems.values().flatten().cloned();
                        (elems.map(Edge::Chain).collect(), set.active)
                    }
                    Some(set) if set.is_idle() => {
                        self.sets.remove(name);
                        continue;
                    }
                    _ => continue,
                },
                Edge::Dnat(_) => continue,
            };
            for edge in &edges {
                steps += 1;
                self.count(edge, up);
            }
            // Settled again: it may now be idle.
            self.unsettled.push(node);
        }
        steps
    }

    fn count_target(&mut self, ep: Target, up: bool) {
        let count = self.targets.entry(ep).or_insert(0);
        let was = *count > 0;
        *count = step(*count, up);
        if *count == 0 {
            self.targets.remove(&ep);
        }
        if self.targets.contains_key(&ep) != was {
            self.touched.entry(ep).or_insert(was);
        }
    }

    fn chain_active(&self, name: &str) -> bool {
        self.chains.get(name).is_some_and(|c| c.active)
    }

    fn set_active(&self, name: &str) -> bool {
        self.sets.get(name).is_some_and(|s| s.active)
    }

    /// A rule joins (`added`) or leaves a chain: counts its map uses, and
    /// its references when the chain is `active`.
    fn link(&mut self, edges: &[Edge], added: bool, active: bool) -> u64 {
        for edge in edges {
            if let Edge::Map(name) = edge {
                let set = self.sets.entry(name.clone()).or_default();
                set.uses = step(set.uses, added);
                if set.uses == 0 && name.starts_with("__") {
                    self.unused.insert(name.clone());
                }
            }
        }
        if active {
            for edge in edges {
                self.count(edge, added);
            }
        }
        edges.len() as u64
    }

    fn new_chain(&mut self, name: &str, base: bool) -> u64 {
        let name = self.chain_name(name);
        let chain = self.chains.entry(name.clone()).or_default();
        if base && !chain.base {
            chain.base = true;
            self.unsettled.push(Edge::Chain(name));
        }
        1
    }

    fn del_chain(&mut self, name: &str) -> u64 {
        let Some(chain) = self.chains.get_mut(name) else {
            return 1;
        };
        let active = chain.active;
        chain.base = false;
        let mut steps = 1;
        for edges in chain.rules.take() {
            steps += self.link(edges.as_slice(), false, active);
        }
        self.unsettled.push(Edge::Chain(self.chain_name(name)));
        steps
    }

    fn new_rule(&mut self, chain: &str, handle: u64, summary: RuleSummary) -> u64 {
        // Applied twice (a dump overlapping notifications): replace.
        let mut steps = self.del_rule(chain, handle);
        if summary.is_empty() {
            return steps;
        }
        let edges = self.edges(summary);
        let name = self.chain_name(chain);
        steps += self.link(edges.as_slice(), true, self.chain_active(&name));
        self.chains
            .entry(name)
            .or_default()
            .rules
            .insert(handle, edges);
        steps
    }

    fn del_rule(&mut self, chain: &str, handle: u64) -> u64 {
        let Some(edges) = self
            .chains
            .get_mut(chain)
            .and_then(|c| c.rules.remove(handle))
        else {
            return 1;
        };
        let steps = self.link(edges.as_slice(), false, self.chain_active(chain));
        if self.chains.get(chain).is_some_and(Chain::is_idle) {
            self.chains.remove(chain);
        }
        steps
    }

    /// Drops every element of `name` (its references too, when reachable).
    fn clear_set(&mut self, name: &str) -> u64 {
        let Some(set) = self.sets.get_mut(name) else {
            return 1;
        };
        let elems = std::mem::take(&mut set.elems);
        if set.active {
            for chain in elems.values().flatten() {
                self.count(&Edge::Chain(chain.clone()), false);
            }
        }
        elems.len() as u64 + 1
    }

    fn new_set(&mut self, name: &str, handle: u64) -> u64 {
        // Anonymous set names are reused within one transaction: a new
        // handle under a known name is a new, empty set.
        let steps = match self.sets.get(name).and_then(|s| s.handle) {
            Some(h) if h == handle => return 1,
            Some(_) => self.clear_set(name),
            None => 1,
        };
        let name = self.set_name(name);
        self.sets.entry(name.clone()).or_default().handle = Some(handle);
        if name.starts_with("__") {
            // Checked at the commit: by then a rule uses it, or it is gone.
            self.unused.insert(name);
        }
        steps
    }

    fn del_set(&mut self, name: &str, handle: u64) -> u64 {
        // The old set's deletion may come after a new set took its name.
        if self.sets.get(name).and_then(|s| s.handle) != Some(handle) {
            return 1;
        }
        let steps = self.clear_set(name);
        if let Some(set) = self.sets.get_mut(name) {
            set.handle = None;
            if set.is_idle() {
                self.sets.remove(name);
            }
        }
        steps
    }

    fn new_elems(&mut self, set: &str, elems: Vec<SetElem>) -> u64 {
        let name = self.set_name(set);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut steps = 0;
        for SetElem { key, chain } in elems {
            steps += 1;
            let chain = chain.map(|c| self.chain_name(&c));
            let set = self.sets.entry(name.clone()).or_default();
            if let Some(Some(old)) = set.elems.insert(Key::from(key), chain.clone()) {
                removed.push(Edge::Chain(old));
            }
            added.extend(chain.map(Edge::Chain));
        }
        if self.set_active(&name) {
            for edge in &removed {
                self.count(edge, false);
            }
            for edge in &added {
                self.count(edge, true);
            }
        }
        steps
    }

    fn del_elems(&mut self, set: &str, elems: Vec<SetElem>) -> u64 {
        // A flush of the whole set carries no elements.
        if elems.is_empty() {
            return self.clear_set(set);
        }
        let Some(s) = self.sets.get_mut(set) else {
            return 1;
        };
        let mut removed = Vec::new();
        let mut steps = 0;
        for elem in elems {
            steps += 1;
            if let Some(Some(chain)) = s.elems.remove(&Key::from(elem.key)) {
                removed.push(Edge::Chain(chain));
            }
        }
        if s.active {
            for edge in &removed {
                self.count(edge, false);
            }
        }
        steps
    }

    /// Anonymous sets (`__map0`, `__set1`, ...) that no rule uses any more
    /// are gone: the kernel destroys them with their last rule, whether or
    /// not that is notified.
    fn prune_unused(&mut self) -> u64 {
        let mut steps = 0;
        for name in std::mem::take(&mut self.unused) {
            steps += 1;
            if self.sets.get(&name).is_some_and(|s| s.uses == 0) {
                steps += self.clear_set(&name);
                self.sets.remove(&name);
            }
        }
        steps
    }
}

/// One more (`up`) or one fewer reference; never below zero (an event
/// mirrored twice, or a deletion of what the mirror never saw).
fn step(count: u32, up: bool) -> u32 {
    if up {
        count + 1
    } else {
        count.saturating_sub(1)
    }
}

/// An endpoint that became (`added`) or stopped being selected by any
/// table, with a table where that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetChange {
    pub endpoint: SocketAddr,
    pub added: bool,
    pub table: TableId,
}

#[derive(Debug, Default)]
pub struct Mirror {
    tables: HashMap<TableId, Table>,
    /// Elementary steps taken so far (events, rule edges, map elements and
    /// reachability propagation): what a change cost, as a count.
    work: u64,
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

    /// Steps taken since the mirror was made: [`Self::apply`] and
    /// [`Self::commit`] add what each event or commit visited.
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Chains of this table (for dumping their rules).
    pub fn chains(&self, table: &TableId) -> Vec<String> {
        self.tables
            .get(table)
            .map(|t| t.chains.keys().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    /// Sets of this table (for dumping their elements).
    pub fn sets(&self, table: &TableId) -> Vec<String> {
        self.tables
            .get(table)
            .map(|t| {
                t.sets
                    .iter()
                    .filter(|(_, s)| s.handle.is_some())
                    .map(|(n, _)| n.to_string())
                    .collect()
            })
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
        self.work += match event {
            NftEvent::NewTable(id) => {
                self.tables.entry(id).or_default().gone = false;
                1
            }
            NftEvent::DelTable(id) => self.del_table(&id),
            NftEvent::NewChain { table, name, base } => {
                self.tables.entry(table).or_default().new_chain(&name, base)
            }
            NftEvent::DelChain { table, name } => self.with(&table, |t| t.del_chain(&name)),
            NftEvent::NewRule {
                table,
                chain,
                handle,
                summary,
            } => self
                .tables
                .entry(table)
                .or_default()
                .new_rule(&chain, handle, summary),
            NftEvent::DelRule {
                table,
                chain,
                handle,
            } => self.with(&table, |t| t.del_rule(&chain, handle)),
            NftEvent::NewSet {
                table,
                name,
                handle,
            } => self.tables.entry(table).or_default().new_set(&name, handle),
            NftEvent::DelSet {
                table,
                name,
                handle,
            } => self.with(&table, |t| t.del_set(&name, handle)),
            NftEvent::NewElems { table, set, elems } => {
                self.tables.entry(table).or_default().new_elems(&set, elems)
            }
            NftEvent::DelElems { table, set, elems } => {
                self.with(&table, |t| t.del_elems(&set, elems))
            }
            NftEvent::NewGen { .. } | NftEvent::Ignored => 1,
        };
    }

    fn with(&mut self, table: &TableId, f: impl FnOnce(&mut Table) -> u64) -> u64 {
        self.tables.get_mut(table).map_or(1, f)
    }

    /// A table's deletion: every target it selected, unless it was only
    /// just selected in this batch, stops being selected by it.
    fn del_table(&mut self, id: &TableId) -> u64 {
        let Some(table) = self.tables.remove(id) else {
            return 1;
        };
        let mut gone = Table {
            touched: table.touched,
            gone: true,
            ..Table::default()
        };
        for ep in table.targets.keys() {
            gone.touched.entry(*ep).or_insert(true);
        }
        gone.touched.retain(|_, was| *was);
        let steps = table.targets.len() as u64 + 1;
        if !gone.touched.is_empty() {
            self.tables.insert(id.clone(), gone);
        }
        steps
    }

    /// The end of a committed transaction: drops the anonymous sets it
    /// left unused and returns every endpoint whose selection by the
    /// rulesets as a whole changed since the previous commit.
    pub fn commit(&mut self) -> Vec<TargetChange> {
        let mut steps = 0;
        let mut touched: HashSet<Target> = HashSet::new();
        for table in self.tables.values_mut() {
            steps += table.prune_unused();
            steps += table.settle();
            touched.extend(table.touched.keys());
        }
        let mut changes = Vec::new();
        for ep in touched {
            steps += self.tables.len() as u64;
            let was = self.tables.values().any(|t| {
                t.touched
                    .get(&ep)
                    .copied()
                    .unwrap_or(t.targets.contains_key(&ep))
            });
            let holder = self
                .tables
                .iter()
                .find(|(_, t)| t.targets.contains_key(&ep));
            match (was, holder) {
                (false, Some((id, _))) => changes.push(TargetChange {
                    endpoint: ep.into(),
                    added: true,
                    table: id.clone(),
                }),
                (true, None) => {
                    // Selected before and by no table now: some table
                    // dropped it in this batch.
                    if let Some((id, _)) = self
                        .tables
                        .iter()
                        .find(|(_, t)| t.touched.get(&ep) == Some(&true))
                    {
                        changes.push(TargetChange {
                            endpoint: ep.into(),
                            added: false,
                            table: id.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
        self.work += steps;
        self.tables.retain(|_, t| !t.gone);
        for table in self.tables.values_mut() {
            table.touched.clear();
        }
        changes
    }

    /// Every endpoint selected as of the last commit, with a table that
    /// selected it. Inside a transaction read in part (notifications lost
    /// in its middle) the targets hold the part applied so far; what a
    /// touched endpoint was before it is in `touched`.
    pub fn selected(&self) -> impl Iterator<Item = (SocketAddr, &TableId)> {
        self.tables.iter().flat_map(|(id, t)| {
            let kept = t
                .targets
                .keys()
                .filter(|ep| t.touched.get(ep) != Some(&false));
            let dropped = t
                .touched
                .iter()
                .filter(|(ep, was)| **was && !t.targets.contains_key(ep))
                .map(|(ep, _)| ep);
            kept.chain(dropped).map(move |ep| ((*ep).into(), id))
        })
    }

    /// Every endpoint a reachable DNAT of any table selects: the committed
    /// rulesets after a commit, with the part applied so far inside a
    /// transaction.
    pub fn targets(&self) -> HashSet<SocketAddr> {
        self.tables
            .values()
            .flat_map(|t| t.targets.keys().map(|ep| (*ep).into()))
            .collect()
    }

    /// DNAT destinations reachable from the table's base chains, following
    /// jumps, gotos and verdict-map elements, as of the last commit. A
    /// chain unlinked from the dispatch is not reachable even while it
    /// still exists.
    pub fn reachable_dnat(&self, table: &TableId) -> HashSet<SocketAddr> {
        self.tables
            .get(table)
            .map(|t| t.targets.keys().map(|ep| (*ep).into()).collect())
            .unwrap_or_default()
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

    fn del_rule(chain: &str, handle: u64) -> NftEvent {
        NftEvent::DelRule {
            table: table(),
            chain: chain.into(),
            handle,
        }
    }

    fn ep(last: u8) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(10, 180, 0, last), 80))
    }

    fn vmap(set: &str) -> RuleSummary {
        RuleSummary {
            verdict_maps: vec![set.into()],
            ..Default::default()
        }
    }

    fn dnat(to: SocketAddr) -> RuleSummary {
        RuleSummary {
            dnat: vec![to],
            ..Default::default()
        }
    }

    fn jump(to: &str) -> RuleSummary {
        RuleSummary {
            jumps: vec![to.into()],
            ..Default::default()
        }
    }

    fn elems(set: &str, chains: &[&str]) -> NftEvent {
        NftEvent::NewElems {
            table: table(),
            set: set.into(),
            elems: chains
                .iter()
                .enumerate()
                .map(|(i, c)| SetElem {
                    key: (i as u32).to_be_bytes().to_vec(),
                    chain: Some((*c).into()),
                })
                .collect(),
        }
    }

    fn new_set(name: &str, handle: u64) -> NftEvent {
        NftEvent::NewSet {
            table: table(),
            name: name.into(),
            handle,
        }
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
            rule("nat-output", 1, jump("services")),
            rule("services", 2, vmap("service-ips")),
            new_set("service-ips", 1),
            elems("service-ips", &["svc"]),
            new_set("__map0", 2),
            elems("__map0", &["ep1", "ep2"]),
            rule("svc", 3, vmap("__map0")),
            rule("ep1", 4, dnat(ep(1))),
            rule("ep2", 5, dnat(ep(2))),
        ] {
            m.apply(event);
        }
        m.commit();
        m
    }

    fn changes(m: &mut Mirror) -> Vec<(SocketAddr, bool)> {
        let mut c: Vec<_> = m
            .commit()
            .into_iter()
            .map(|c| (c.endpoint, c.added))
            .collect();
        c.sort();
        c
    }

    #[test]
    fn targets_are_compact_and_round_trip() {
        for addr in [ep(1), "[fd00::1]:8080".parse().unwrap()] {
            assert_eq!(SocketAddr::from(Target::from(addr)), addr);
        }
        // What each endpoint's rules cost (docs/benchmarks.md, 250 000 endpoints).
        assert!(std::mem::size_of::<Edge>() <= 24);
        assert!(std::mem::size_of::<Rule>() <= 32);
    }

    #[test]
    fn follows_jumps_and_verdict_maps() {
        let m = kube_proxy_like();
        assert_eq!(m.reachable_dnat(&table()), HashSet::from([ep(1), ep(2)]));
    }

    #[test]
    fn the_first_commit_reports_every_target_as_added() {
        let mut m = Mirror::new();
        for event in [
            chain("nat-output", true),
            chain("ep1", false),
            rule("ep1", 4, dnat(ep(1))),
            rule("nat-output", 1, jump("ep1")),
        ] {
            m.apply(event);
        }
        assert_eq!(changes(&mut m), vec![(ep(1), true)]);
        assert_eq!(changes(&mut m), vec![], "nothing changed since");
    }

    #[test]
    fn unlinked_chain_is_unreachable_while_it_still_exists() {
        let mut m = kube_proxy_like();
        // kube-proxy's sync: the service rule is replaced by one whose
        // anonymous map (same name, new handle) only names ep2.
        m.apply(del_rule("svc", 3));
        m.apply(new_set("__map0", 7));
        m.apply(elems("__map0", &["ep2"]));
        // The old set's deletion arrives late: it must not remove the new one.
        m.apply(NftEvent::DelSet {
            table: table(),
            name: "__map0".into(),
            handle: 2,
        });
        m.apply(rule("svc", 8, vmap("__map0")));
        assert_eq!(changes(&mut m), vec![(ep(1), false)]);
        assert_eq!(m.reachable_dnat(&table()), HashSet::from([ep(2)]));
    }

    #[test]
    fn a_change_undone_within_the_batch_is_no_change() {
        let mut m = kube_proxy_like();
        // A flush and re-add of the endpoint chain (a full resync).
        m.apply(del_rule("ep1", 4));
        m.apply(rule("ep1", 9, dnat(ep(1))));
        assert_eq!(changes(&mut m), vec![]);
        assert_eq!(m.reachable_dnat(&table()), HashSet::from([ep(1), ep(2)]));
    }

    #[test]
    fn the_selection_is_the_last_commits_while_a_transaction_is_read_in_part() {
        let mut m = kube_proxy_like();
        // A transaction's first notifications: ep1's rule goes, ep3 joins;
        // then the socket overflows before its NEWGEN.
        m.apply(del_rule("ep1", 4));
        m.apply(rule("ep2", 10, dnat(ep(3))));
        assert_eq!(m.targets(), HashSet::from([ep(2), ep(3)]), "the part read");
        let selected: HashSet<SocketAddr> = m.selected().map(|(ep, _)| ep).collect();
        assert_eq!(selected, HashSet::from([ep(1), ep(2)]));
        // Once committed, the transaction is the selection.
        assert_eq!(changes(&mut m), vec![(ep(1), false), (ep(3), true)]);
        let selected: HashSet<SocketAddr> = m.selected().map(|(ep, _)| ep).collect();
        assert_eq!(selected, HashSet::from([ep(2), ep(3)]));
    }

    #[test]
    fn table_deletion_and_set_flush_remove_targets() {
        let mut m = kube_proxy_like();
        m.apply(NftEvent::DelElems {
            table: table(),
            set: "service-ips".into(),
            elems: vec![],
        });
        assert_eq!(changes(&mut m), vec![(ep(1), false), (ep(2), false)]);
        assert!(m.reachable_dnat(&table()).is_empty());
        let mut m = kube_proxy_like();
        m.apply(NftEvent::DelTable(table()));
        assert_eq!(changes(&mut m), vec![(ep(1), false), (ep(2), false)]);
        assert!(m.reachable_dnat(&table()).is_empty());
        assert_eq!(m.tables().count(), 0, "the deleted table is forgotten");
    }

    #[test]
    fn a_target_of_two_tables_goes_when_the_last_one_drops_it() {
        let mut m = kube_proxy_like();
        let nat = TableId {
            family: 2,
            name: "nat".into(),
        };
        for event in [
            NftEvent::NewChain {
                table: nat.clone(),
                name: "OUTPUT".into(),
                base: true,
            },
            NftEvent::NewRule {
                table: nat.clone(),
                chain: "OUTPUT".into(),
                handle: 1,
                summary: dnat(ep(1)),
            },
        ] {
            m.apply(event);
        }
        assert_eq!(changes(&mut m), vec![]);
        m.apply(del_rule("ep1", 4));
        assert_eq!(changes(&mut m), vec![], "the nat table still selects it");
        m.apply(NftEvent::DelTable(nat.clone()));
        let c = m.commit();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].endpoint, c[0].added, &c[0].table),
            (ep(1), false, &nat)
        );
    }

    #[test]
    fn unused_anonymous_sets_are_pruned() {
        let mut m = kube_proxy_like();
        m.apply(new_set("__map9", 9));
        m.commit();
        let sets = m.sets(&table());
        assert!(sets.contains(&"__map0".to_owned()), "{sets:?}");
        assert!(sets.contains(&"service-ips".to_owned()), "{sets:?}");
        assert!(!sets.contains(&"__map9".to_owned()), "{sets:?}");
        // Its rule gone, the service's anonymous map goes too.
        m.apply(del_rule("svc", 3));
        m.commit();
        assert!(!m.sets(&table()).contains(&"__map0".to_owned()));
    }

    #[test]
    fn a_chain_deletion_unlinks_its_rules() {
        let mut m = kube_proxy_like();
        m.apply(NftEvent::DelChain {
            table: table(),
            name: "svc".into(),
        });
        assert_eq!(changes(&mut m), vec![(ep(1), false), (ep(2), false)]);
    }

    #[test]
    fn applying_twice_converges() {
        let mut m = kube_proxy_like();
        m.apply(rule("ep1", 4, dnat(ep(1))));
        m.apply(elems("__map0", &["ep1", "ep2"]));
        m.apply(chain("nat-output", true));
        assert_eq!(changes(&mut m), vec![]);
        assert_eq!(m.reachable_dnat(&table()).len(), 2);
        // One deletion of a rule mirrored twice still removes it once.
        m.apply(del_rule("ep1", 4));
        m.apply(del_rule("ep1", 4));
        assert_eq!(changes(&mut m), vec![(ep(1), false)]);
        assert_eq!(m.reachable_dnat(&table()), HashSet::from([ep(2)]));
    }

    #[test]
    fn a_dispatch_flushed_and_rewritten_in_one_commit_costs_only_its_rules() {
        let mut small = cluster(10, 50);
        let mut large = cluster(500, 50);
        // kube-proxy's setup in every sync: flush the base chain, add its
        // jump again (the dispatch below is unreachable in between).
        let work = |m: &mut Mirror| {
            let before = m.work();
            m.apply(del_rule("nat-output", 1));
            m.apply(rule("nat-output", 99, jump("services")));
            assert_eq!(changes(m), vec![]);
            m.work() - before
        };
        let (small, large) = (work(&mut small), work(&mut large));
        assert_eq!(small, large);
        assert!(large < 20, "{large} steps");
    }

    /// kube-proxy's nftables layout with `services` Services of
    /// `endpoints` endpoints each, as the mirror receives it.
    fn cluster(services: usize, endpoints: usize) -> Mirror {
        let mut m = Mirror::new();
        m.apply(chain("nat-output", true));
        m.apply(chain("services", false));
        m.apply(rule("nat-output", 1, jump("services")));
        m.apply(rule("services", 2, vmap("service-ips")));
        m.apply(new_set("service-ips", 1));
        let mut handle = 10;
        let svc_chains: Vec<String> = (0..services).map(|s| format!("svc-{s}")).collect();
        for (s, svc_chain) in svc_chains.iter().enumerate() {
            let eps: Vec<String> = (0..endpoints).map(|e| format!("ep-{s}-{e}")).collect();
            for (e, name) in eps.iter().enumerate() {
                m.apply(chain(name, false));
                m.apply(rule(name, handle, jump("mark-for-masquerade")));
                m.apply(rule(name, handle + 1, dnat(backend(s, e))));
                handle += 2;
            }
            m.apply(chain(svc_chain, false));
            let map = format!("__map{s}");
            m.apply(new_set(&map, handle));
            let names: Vec<&str> = eps.iter().map(String::as_str).collect();
            m.apply(elems(&map, &names));
            m.apply(rule(svc_chain, handle + 1, vmap(&map)));
            handle += 2;
        }
        let names: Vec<&str> = svc_chains.iter().map(String::as_str).collect();
        m.apply(NftEvent::NewElems {
            table: table(),
            set: "service-ips".into(),
            elems: names
                .iter()
                .enumerate()
                .map(|(i, c)| SetElem {
                    key: [
                        [172, 30, (i / 250) as u8, (i % 250) as u8],
                        [6, 0, 0, 0],
                        [0, 80, 0, 0],
                    ]
                    .concat(),
                    chain: Some((*c).into()),
                })
                .collect(),
        });
        assert_eq!(m.commit().len(), services * endpoints);
        m
    }

    fn backend(s: usize, e: usize) -> SocketAddr {
        let n = (s * 1000 + e) as u32;
        SocketAddr::from((Ipv4Addr::from(0x0ab4_0000 + n), 8080))
    }

    /// kube-proxy's partial sync (nftables mode) removing endpoint 0 of
    /// Service 3: the service chain is flushed and gets a new vmap rule with
    /// a new anonymous map, the endpoint's chain is flushed (and deleted a
    /// second later). Returns the mirror's work for it.
    fn remove_one_endpoint(m: &mut Mirror, endpoints: usize) -> (u64, Vec<(SocketAddr, bool)>) {
        let before = m.work();
        // Old service rule handle: see `cluster`.
        let old_rule = 10 + 3 * (2 * endpoints as u64 + 2) + 2 * endpoints as u64 + 1;
        m.apply(del_rule("svc-3", old_rule));
        m.apply(new_set("__map3", 1_000_000));
        let rest: Vec<String> = (1..endpoints).map(|e| format!("ep-3-{e}")).collect();
        let names: Vec<&str> = rest.iter().map(String::as_str).collect();
        m.apply(elems("__map3", &names));
        m.apply(rule("svc-3", 1_000_001, vmap("__map3")));
        let first = 10 + 3 * (2 * endpoints as u64 + 2);
        m.apply(del_rule("ep-3-0", first));
        m.apply(del_rule("ep-3-0", first + 1));
        m.apply(NftEvent::NewGen {
            id: 2,
            process: None,
        });
        let c = changes(m);
        (m.work() - before, c)
    }

    #[test]
    fn a_partial_sync_costs_work_in_proportion_to_its_service_not_the_ruleset() {
        let endpoints = 50;
        let mut small = cluster(10, endpoints);
        let mut large = cluster(500, endpoints);
        let (small_work, small_changes) = remove_one_endpoint(&mut small, endpoints);
        let (large_work, large_changes) = remove_one_endpoint(&mut large, endpoints);
        assert_eq!(small_changes, vec![(backend(3, 0), false)]);
        assert_eq!(large_changes, small_changes);
        // The same partial sync in a ruleset 50 times larger: the same work.
        assert_eq!(small_work, large_work);
        // And that work is a few steps per endpoint of the one Service.
        assert!(
            small_work <= 10 * endpoints as u64,
            "{small_work} steps for a Service of {endpoints} endpoints"
        );
        assert!(
            small_work >= endpoints as u64,
            "{small_work}: work not counted"
        );
        let (_, _, elements) = large.counts();
        assert!(elements > 500 * endpoints, "{elements}");
    }
}
