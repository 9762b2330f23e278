//! A read-only copy of Cilium's service and backends maps, kept by the
//! writer's writes, and which endpoints they select: an endpoint is
//! selected while one of its backend ids sits in a slot 1..=`count` of some
//! frontend (Cilium picks slot `(random % count) + 1`; with no active
//! backend left it counts the terminating ones in, so "within count" is
//! the whole rule).
//!
//! Every endpoint is followed, watched or not: a cutover that happens
//! before the agent learns the pod is terminating is reported with its own
//! time when the watch starts, as the nf_tables mirror does.
//! Selection is decided at the master's writes: Cilium rewrites a
//! frontend's slots first and its master last, so slots shuffled in
//! between (a backend moved from slot 1 to the tail while another takes
//! its place) are one change at the master, the cutover, not a flicker of
//! removals and additions. A master write costs O(count).
//!
//! A Maglev frontend (its rev_nat index has an entry in Maglev's outer
//! map) is selected by two paths: socket-LB picks a slot at connect()
//! (the master's write is its cutover), the TC/XDP path looks its
//! backend up in the lookup table the outer map points to (the outer
//! map's write is its cutover). Cilium builds that table from the active
//! backends, the same ones it counts in the master, and writes the outer
//! map before the master in the same reconciliation. The agent cannot
//! read the table (its inner map opens by id only with CAP_SYS_ADMIN), so
//! it takes the table to hold the slots 1..count of the master written
//! with it, and decides a Maglev frontend's selection at the later of the
//! two writes: at the master when the outer map was written since the
//! frontend's previous master write (Cilium's order), else at the next
//! outer-map write.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use observer_common::cilium::{Backend, Family, MaglevKey, ServiceKey, ServiceValue};

use super::maps::{ReadError, ServiceMaps};

/// Reads of a master while its slots are read, before a poll takes what
/// it has.
pub const REFRESH_TRIES: usize = 3;

/// An endpoint whose selection changed, and whether it is selected now.
pub type Flip = (SocketAddr, bool);

#[derive(Debug, Default)]
pub struct Mirror {
    services: HashMap<ServiceKey, ServiceValue>,
    backends: HashMap<(Family, u32), Backend>,
    /// The endpoints each master's slots 1..=count held at its last write:
    /// a slot's backend may be deleted before the master drops it.
    counted: HashMap<ServiceKey, Vec<SocketAddr>>,
    /// How many selected slots hold each endpoint.
    selected: HashMap<SocketAddr, u32>,
    /// Frontends with a Maglev lookup table, by family and rev_nat index.
    maglev: HashSet<(Family, u16)>,
    /// Maglev tables written since their frontend's last master write.
    table_written: HashSet<(Family, u16)>,
    /// Maglev frontends' masters written since their table: counted at the
    /// table's next write.
    deferred: HashMap<(Family, u16), ServiceKey>,
}

impl Mirror {
    /// Reads both families of `maps` whole.
    pub fn read(maps: &impl ServiceMaps) -> Result<Mirror, ReadError> {
        let mut mirror = Mirror::default();
        for family in [Family::V4, Family::V6] {
            for (id, b) in maps.backends(family)?.entries {
                mirror.backends.insert((family, id), b);
            }
            mirror.services.extend(maps.services(family)?.entries);
            for key in maps.maglev_keys(family)? {
                mirror.maglev.insert((family, key.rev_nat_index));
            }
        }
        let masters: Vec<ServiceKey> = mirror
            .services
            .keys()
            .filter(|k| k.slot == 0)
            .copied()
            .collect();
        for master in masters {
            mirror.recount(master);
        }
        Ok(mirror)
    }

    /// The endpoints selected now.
    pub fn selected(&self) -> impl Iterator<Item = &SocketAddr> {
        self.selected.keys()
    }

    /// Replaces the mirror by a fresh read of `maps`; returns what changed
    /// (writes that were not seen).
    pub fn resync(&mut self, maps: &impl ServiceMaps) -> Result<Vec<Flip>, ReadError> {
        let mut fresh = Mirror::read(maps)?;
        // Tables written before their master: the maps do not say.
        fresh.table_written = std::mem::take(&mut self.table_written);
        let before: HashSet<SocketAddr> = self.selected.keys().copied().collect();
        let now: HashSet<SocketAddr> = fresh.selected.keys().copied().collect();
        let mut flips: Vec<Flip> = before.difference(&now).map(|e| (*e, false)).collect();
        flips.extend(now.difference(&before).map(|e| (*e, true)));
        *self = fresh;
        Ok(flips)
    }

    /// The writer updated a services entry.
    pub fn update_service(&mut self, key: ServiceKey, value: ServiceValue) -> Vec<Flip> {
        self.services.insert(key, value);
        if key.slot != 0 {
            return Vec::new();
        }
        let table = (Family::of(&key.frontend.ip), value.rev_nat_index);
        if self.maglev.contains(&table) && !self.table_written.remove(&table) {
            self.deferred.insert(table, key);
            return Vec::new();
        }
        self.recount(key)
    }

    /// The writer deleted a services entry: a master deleted is gone for
    /// both paths at once.
    pub fn delete_service(&mut self, key: ServiceKey) -> Vec<Flip> {
        self.services.remove(&key);
        if key.slot == 0 {
            self.deferred.retain(|_, master| *master != key);
            self.recount(key)
        } else {
            Vec::new()
        }
    }

    /// The writer replaced (or, `present` false, deleted) a frontend's
    /// Maglev lookup table.
    pub fn write_maglev(&mut self, family: Family, key: MaglevKey, present: bool) -> Vec<Flip> {
        let table = (family, key.rev_nat_index);
        if present {
            self.maglev.insert(table);
        } else {
            self.maglev.remove(&table);
        }
        match self.deferred.remove(&table) {
            Some(master) => self.recount(master),
            None => {
                self.table_written.insert(table);
                Vec::new()
            }
        }
    }

    /// The writer updated a backend: selection changes with the masters,
    /// which Cilium writes after the backend.
    pub fn update_backend(&mut self, family: Family, id: u32, backend: Backend) {
        self.backends.insert((family, id), backend);
    }

    pub fn delete_backend(&mut self, family: Family, id: u32) {
        self.backends.remove(&(family, id));
    }

    /// The masters whose slots (counted or in the inactive tail) hold one
    /// of `endpoints`: what a poll re-reads for them.
    pub fn frontends_holding(&self, endpoints: &HashSet<SocketAddr>) -> HashSet<ServiceKey> {
        let ids: HashSet<(Family, u32)> = self
            .backends
            .iter()
            .filter(|(_, b)| endpoints.contains(&SocketAddr::new(b.ip, b.port)))
            .map(|(id, _)| *id)
            .collect();
        self.services
            .iter()
            .filter(|(k, v)| {
                k.slot != 0 && ids.contains(&(Family::of(&k.frontend.ip), v.backend_id))
            })
            .map(|(k, _)| ServiceKey { slot: 0, ..*k })
            .collect()
    }

    /// Re-reads `master` and its slots (those it had and those it has now)
    /// and counts them: a poll's view of one frontend, no writes seen.
    /// Read master, slots, master again (Cilium writes slots, then the
    /// master): a master that changed meanwhile is read again, at most
    /// [`REFRESH_TRIES`] times.
    pub fn refresh(
        &mut self,
        maps: &impl ServiceMaps,
        master: ServiceKey,
    ) -> Result<Vec<Flip>, ReadError> {
        let family = Family::of(&master.frontend.ip);
        let total = |v: Option<&ServiceValue>| v.map_or(0, |v| v.count.saturating_add(v.qcount));
        let had = total(self.services.get(&master));
        let mut value = maps.service(&master)?;
        for _ in 0..REFRESH_TRIES {
            for slot in 1..=had.max(total(value.as_ref())) {
                let key = ServiceKey { slot, ..master };
                match maps.service(&key)? {
                    Some(v) => {
                        if !self.backends.contains_key(&(family, v.backend_id))
                            && let Some(b) = maps.backend(family, v.backend_id)?
                        {
                            self.backends.insert((family, v.backend_id), b);
                        }
                        self.services.insert(key, v);
                    }
                    None => {
                        self.services.remove(&key);
                    }
                }
            }
            let again = maps.service(&master)?;
            let settled = again == value;
            value = again;
            if settled {
                break;
            }
        }
        match value {
            Some(v) => self.services.insert(master, v),
            None => self.services.remove(&master),
        };
        Ok(self.recount(master))
    }

    /// Counts the slots of `master` as they are now, in place of what they
    /// held at its last write.
    fn recount(&mut self, master: ServiceKey) -> Vec<Flip> {
        let family = Family::of(&master.frontend.ip);
        let count = self.services.get(&master).map_or(0, |v| v.count);
        let now: Vec<SocketAddr> = (1..=count)
            .filter_map(|slot| self.services.get(&ServiceKey { slot, ..master }))
            .filter_map(|v| self.backends.get(&(family, v.backend_id)))
            .map(|b| SocketAddr::new(b.ip, b.port))
            .collect();
        let before = self.counted.remove(&master).unwrap_or_default();
        let mut touched: HashMap<SocketAddr, bool> = HashMap::new();
        for endpoint in before.iter().chain(&now) {
            touched
                .entry(*endpoint)
                .or_insert_with(|| self.selected.contains_key(endpoint));
        }
        for endpoint in &now {
            *self.selected.entry(*endpoint).or_default() += 1;
        }
        for endpoint in &before {
            if let Some(n) = self.selected.get_mut(endpoint) {
                *n -= 1;
                if *n == 0 {
                    self.selected.remove(endpoint);
                }
            }
        }
        if !now.is_empty() {
            self.counted.insert(master, now);
        }
        touched
            .into_iter()
            .filter_map(|(endpoint, before)| {
                let now = self.selected.contains_key(&endpoint);
                (now != before).then_some((endpoint, now))
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use observer_common::cilium::{BackendState, Frontend, Scope};

    use super::super::maps::Entries;
    use super::*;

    /// Cilium's maps as a table, written in Cilium's order by the tests,
    /// each write also applied to a mirror as the tracepoint reports it.
    #[derive(Default)]
    pub(crate) struct Table {
        pub backends: BTreeMap<u32, Backend>,
        pub services: BTreeMap<(IpAddr, u16, u16), ServiceValue>,
        /// Maglev outer map: rev_nat index -> inner map id (IPv4).
        pub maglev: BTreeMap<u16, u32>,
        /// Single-entry lookups of services entries made (a poll's cost).
        pub lookups: std::cell::Cell<usize>,
    }

    fn key_of(k: &ServiceKey) -> (IpAddr, u16, u16) {
        (k.frontend.ip, k.frontend.port, k.slot)
    }

    impl ServiceMaps for Table {
        fn backends(&self, family: Family) -> Result<Entries<u32, Backend>, ReadError> {
            Ok(Entries {
                entries: self
                    .backends
                    .iter()
                    .filter(|(_, b)| Family::of(&b.ip) == family)
                    .map(|(id, b)| (*id, *b))
                    .collect(),
                ..Default::default()
            })
        }

        fn services(&self, family: Family) -> Result<Entries<ServiceKey, ServiceValue>, ReadError> {
            Ok(Entries {
                entries: self
                    .services
                    .iter()
                    .filter(|((ip, _, _), _)| Family::of(ip) == family)
                    .map(|((ip, port, slot), v)| {
                        (
                            ServiceKey {
                                frontend: fe(*ip, *port),
                                slot: *slot,
                            },
                            *v,
                        )
                    })
                    .collect(),
                ..Default::default()
            })
        }

        fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, ReadError> {
            self.lookups.set(self.lookups.get() + 1);
            Ok(self.services.get(&key_of(key)).copied())
        }

        fn backend(&self, family: Family, id: u32) -> Result<Option<Backend>, ReadError> {
            Ok(self
                .backends
                .get(&id)
                .filter(|b| Family::of(&b.ip) == family)
                .copied())
        }

        fn maglev_keys(&self, family: Family) -> Result<Vec<MaglevKey>, ReadError> {
            Ok(match family {
                Family::V4 => self
                    .maglev
                    .keys()
                    .map(|r| MaglevKey { rev_nat_index: *r })
                    .collect(),
                Family::V6 => Vec::new(),
            })
        }

        fn maglev(&self, family: Family, key: MaglevKey) -> Result<Option<u32>, ReadError> {
            Ok(match family {
                Family::V4 => self.maglev.get(&key.rev_nat_index).copied(),
                Family::V6 => None,
            })
        }
    }

    fn fe(ip: IpAddr, port: u16) -> Frontend {
        Frontend {
            ip,
            port,
            proto: 6,
            scope: Scope::External,
        }
    }

    pub(crate) const VIP: [u8; 4] = [10, 96, 0, 10];
    const OTHER_VIP: [u8; 4] = [10, 96, 0, 11];

    pub(crate) fn pod(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 244, 1, last], 8080))
    }

    pub(crate) fn backend_of(ep: SocketAddr) -> Backend {
        Backend::tcp(ep, BackendState::Active)
    }

    impl Table {
        /// Adds a backend (to the mirror too, when given).
        pub(crate) fn add_backend(&mut self, id: u32, ep: SocketAddr, mirror: Option<&mut Mirror>) {
            self.backends.insert(id, backend_of(ep));
            if let Some(m) = mirror {
                m.update_backend(Family::V4, id, backend_of(ep));
            }
        }

        /// Cilium's update of one frontend: slots first, master last,
        /// then the tail past the new total deleted. Returns the flips of
        /// each write applied to `mirror`, in order, and the master.
        pub(crate) fn frontend(
            &mut self,
            vip: [u8; 4],
            active: &[u32],
            inactive: &[u32],
            mut mirror: Option<&mut Mirror>,
        ) -> (ServiceKey, Vec<Vec<Flip>>) {
            let ip = IpAddr::from(vip);
            let master = ServiceKey::master(fe(ip, 80));
            let mut flips = Vec::new();
            let mut write = |t: &mut Table, slot: u16, value: Option<ServiceValue>| {
                let key = ServiceKey { slot, ..master };
                match value {
                    Some(v) => t.services.insert((ip, 80, slot), v),
                    None => t.services.remove(&(ip, 80, slot)),
                };
                if let Some(m) = mirror.as_deref_mut() {
                    flips.push(match value {
                        Some(v) => m.update_service(key, v),
                        None => m.delete_service(key),
                    });
                }
            };
            for (i, id) in active.iter().chain(inactive).enumerate() {
                let value = ServiceValue {
                    backend_id: *id,
                    ..Default::default()
                };
                write(self, i as u16 + 1, Some(value));
            }
            let total = (active.len() + inactive.len()) as u16;
            let value = ServiceValue {
                count: active.len() as u16,
                qcount: inactive.len() as u16,
                ..Default::default()
            };
            write(self, 0, Some(value));
            let stale: Vec<u16> = self
                .services
                .keys()
                .filter(|(i, _, slot)| *i == ip && *slot > total)
                .map(|k| k.2)
                .collect();
            for slot in stale {
                write(self, slot, None);
            }
            (master, flips)
        }
    }

    /// The flips of a frontend's writes, by write: slots, master, tail.
    fn only_master_flips(flips: &[Vec<Flip>], slots: usize) -> &Vec<Flip> {
        for (i, f) in flips.iter().enumerate() {
            if i != slots {
                assert!(f.is_empty(), "write {i} flipped {f:?}");
            }
        }
        &flips[slots]
    }

    #[test]
    fn a_backend_moved_to_the_tail_is_no_longer_selected_at_the_master_write() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.frontend(VIP, &[1, 2], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        let mut selected: Vec<_> = m.selected().copied().collect();
        selected.sort();
        assert_eq!(selected, vec![pod(1), pod(2)]);

        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 2), &vec![(pod(1), false)]);
        // The same state again: no flip.
        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert!(flips.iter().all(Vec::is_empty), "{flips:?}");

        let (_, flips) = t.frontend(VIP, &[1, 2], &[], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 2), &vec![(pod(1), true)]);
    }

    #[test]
    fn a_poll_re_reads_only_the_frontends_holding_a_watched_endpoint() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.frontend(VIP, &[1, 2], &[], None);
        // 50 frontends that hold no watched endpoint.
        for n in 0..50u8 {
            t.add_backend(100 + u32::from(n), pod(100 + n), None);
            t.frontend([10, 97, 0, n], &[100 + u32::from(n)], &[], None);
        }
        let mut m = Mirror::read(&t).unwrap();
        let watched = HashSet::from([pod(1)]);
        let frontends = m.frontends_holding(&watched);
        assert_eq!(
            frontends,
            HashSet::from([ServiceKey::master(fe(IpAddr::from(VIP), 80))])
        );

        // Cilium moves pod 1 to the tail and empties another frontend; the
        // poll sees no write.
        t.frontend(VIP, &[2], &[1], None);
        t.frontend([10, 97, 0, 7], &[], &[], None);
        t.lookups.set(0);
        let flips: Vec<Flip> = frontends
            .iter()
            .flat_map(|f| m.refresh(&t, *f).unwrap())
            .collect();
        assert_eq!(flips, vec![(pod(1), false)]);
        // The master, its two slots, the master again: not the 50 others.
        assert_eq!(t.lookups.get(), 4);
        // The pod is in the tail: still held, still polled.
        assert_eq!(m.frontends_holding(&watched), frontends);
        // The rest waits for the whole re-read.
        assert_eq!(m.resync(&t).unwrap(), vec![(pod(107), false)]);
    }

    #[test]
    fn a_poll_of_a_frontend_that_lost_slots_forgets_them() {
        let mut t = Table::default();
        for id in 1..=3 {
            t.add_backend(id, pod(id as u8), None);
        }
        let (master, _) = t.frontend(VIP, &[1, 2, 3], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        t.frontend(VIP, &[1], &[], None);
        let mut flips = m.refresh(&t, master).unwrap();
        flips.sort();
        assert_eq!(flips, vec![(pod(2), false), (pod(3), false)]);
        // A second poll of the same state: nothing.
        assert!(m.refresh(&t, master).unwrap().is_empty());
        assert!(
            m.resync(&t).unwrap().is_empty(),
            "the poll left the mirror as the maps"
        );
    }

    #[test]
    fn a_new_backend_is_added_at_the_master_write_that_counts_its_slot() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.frontend(VIP, &[1], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        t.add_backend(2, pod(2), Some(&mut m));
        let (_, flips) = t.frontend(VIP, &[1, 2], &[], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 2), &vec![(pod(2), true)]);
    }

    #[test]
    fn a_slot_rewritten_within_count_is_the_cutover_of_both_backends_at_the_master() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.frontend(VIP, &[1], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        let (_, flips) = t.frontend(VIP, &[2], &[], Some(&mut m));
        let mut at_master = only_master_flips(&flips, 1).clone();
        at_master.sort();
        assert_eq!(at_master, vec![(pod(1), false), (pod(2), true)]);
    }

    #[test]
    fn the_last_backend_stays_selected_until_its_frontend_is_deleted() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        let (master, _) = t.frontend(VIP, &[1], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        // Every backend terminating: Cilium keeps them within count.
        let (_, flips) = t.frontend(VIP, &[1], &[], Some(&mut m));
        assert!(flips.iter().all(Vec::is_empty));
        // The master deleted first, then its slot.
        assert_eq!(m.delete_service(master), vec![(pod(1), false)]);
        assert_eq!(m.delete_service(ServiceKey { slot: 1, ..master }), vec![]);
    }

    #[test]
    fn an_endpoint_of_two_frontends_is_selected_until_both_drop_it() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.frontend(VIP, &[1, 2], &[], None);
        t.frontend(OTHER_VIP, &[1], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert!(flips.iter().all(Vec::is_empty));
        let (_, flips) = t.frontend(OTHER_VIP, &[], &[1], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 1), &vec![(pod(1), false)]);
    }

    #[test]
    fn a_deleted_backend_leaves_no_trace_and_a_resync_finds_missed_writes() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.frontend(VIP, &[1, 2], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 2), &vec![(pod(1), false)]);
        // The backend left the EndpointSlice: deleted, then its tail slot.
        t.backends.remove(&1);
        m.delete_backend(Family::V4, 1);
        let (_, flips) = t.frontend(VIP, &[2], &[], Some(&mut m));
        assert!(flips.iter().all(Vec::is_empty));
        assert_eq!(m.resync(&t).unwrap(), vec![]);
        // Writes the mirror did not see: the resync reports them.
        t.add_backend(3, pod(3), None);
        t.frontend(VIP, &[3], &[2], None);
        let mut flips = m.resync(&t).unwrap();
        flips.sort();
        assert_eq!(flips, vec![(pod(2), false), (pod(3), true)]);
    }

    /// A Maglev frontend (rev_nat 0 in the test table's masters) written
    /// in Cilium's order: slots, table, master.
    #[test]
    fn a_maglev_frontend_is_cut_over_at_the_master_written_after_its_table() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.maglev.insert(0, 100);
        t.frontend(VIP, &[1, 2], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        let table = MaglevKey { rev_nat_index: 0 };
        assert!(m.write_maglev(Family::V4, table, true).is_empty());
        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 2), &vec![(pod(1), false)]);
    }

    /// The master written with no table since: the TC path still uses the
    /// old table, so the cutover is the table's next write.
    #[test]
    fn a_maglev_master_without_a_new_table_waits_for_the_tables_write() {
        let mut t = Table::default();
        t.add_backend(1, pod(1), None);
        t.add_backend(2, pod(2), None);
        t.maglev.insert(0, 100);
        t.frontend(VIP, &[1, 2], &[], None);
        let mut m = Mirror::read(&t).unwrap();
        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert!(flips.iter().all(Vec::is_empty), "{flips:?}");
        let table = MaglevKey { rev_nat_index: 0 };
        assert_eq!(
            m.write_maglev(Family::V4, table, true),
            vec![(pod(1), false)]
        );
        // An addition likewise.
        let (_, flips) = t.frontend(VIP, &[1, 2], &[], Some(&mut m));
        assert!(flips.iter().all(Vec::is_empty), "{flips:?}");
        assert_eq!(
            m.write_maglev(Family::V4, table, true),
            vec![(pod(1), true)]
        );
        // A frontend without a table is not held.
        assert!(m.write_maglev(Family::V4, table, false).is_empty());
        let (_, flips) = t.frontend(VIP, &[2], &[1], Some(&mut m));
        assert_eq!(only_master_flips(&flips, 2), &vec![(pod(1), false)]);
    }

    #[test]
    fn families_keep_their_backend_ids_apart() {
        let mut m = Mirror::default();
        let v6 = SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 1], 8080));
        m.update_backend(Family::V4, 1, backend_of(pod(1)));
        m.update_backend(Family::V6, 1, backend_of(v6));
        let master = ServiceKey::master(fe(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 10]), 80));
        let slot = ServiceKey { slot: 1, ..master };
        m.update_service(
            slot,
            ServiceValue {
                backend_id: 1,
                ..Default::default()
            },
        );
        let master_value = ServiceValue {
            count: 1,
            ..Default::default()
        };
        assert_eq!(m.update_service(master, master_value), vec![(v6, true)]);
    }
}
