//! Which watched endpoints Cilium's service maps select: the backend ids of
//! each endpoint, the frontends whose slots hold them, and per frontend
//! whether one of its first `count` slots does (Cilium picks slot
//! `(random % count) + 1`; with no active backend left it counts the
//! terminating ones in, so "within count" is the whole rule).
//!
//! Only the entries of watched frontends are re-read after a write: the
//! full dump happens once per watched endpoint.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use observer_common::cilium::{Family, ServiceKey, ServiceValue};

use super::maps::{ReadError, ServiceMaps};

#[derive(Debug, Default)]
struct Watched {
    backend_ids: HashSet<u32>,
    /// Masters (slot 0) of the frontends holding one of the ids, and
    /// whether each selects the endpoint.
    frontends: HashMap<ServiceKey, bool>,
}

impl Watched {
    fn selected(&self) -> bool {
        self.frontends.values().any(|s| *s)
    }
}

/// The watched endpoints and what the maps say of them.
#[derive(Debug, Default)]
pub struct Model {
    endpoints: HashMap<SocketAddr, Watched>,
    /// The watched endpoints of each master: a write costs its own
    /// endpoints, not a pass over every watched one.
    by_master: HashMap<ServiceKey, HashSet<SocketAddr>>,
}

/// Whether the frontend of `master` selects one of `ids`, given the
/// master's value (`None`: the frontend is gone).
fn selects(
    maps: &impl ServiceMaps,
    master: &ServiceKey,
    value: Option<ServiceValue>,
    ids: &HashSet<u32>,
) -> Result<bool, ReadError> {
    let Some(value) = value else {
        return Ok(false);
    };
    for slot in 1..=value.count {
        let key = ServiceKey { slot, ..*master };
        if let Some(v) = maps.service(&key)?
            && ids.contains(&v.backend_id)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Model {
    pub fn is_watched(&self, endpoint: &SocketAddr) -> bool {
        self.endpoints.contains_key(endpoint)
    }

    pub fn watched(&self) -> impl Iterator<Item = &SocketAddr> {
        self.endpoints.keys()
    }

    /// Starts watching `endpoint`: finds its backends and their
    /// frontends; returns whether the maps select it now.
    #[cfg(test)]
    pub fn watch(
        &mut self,
        maps: &impl ServiceMaps,
        endpoint: SocketAddr,
    ) -> Result<bool, ReadError> {
        Ok(self.watch_all(maps, &[endpoint])?[0].1)
    }

    /// [`Self::watch`] for many endpoints with one read of each map (a
    /// rollout makes hundreds terminating at once).
    pub fn watch_all(
        &mut self,
        maps: &impl ServiceMaps,
        endpoints: &[SocketAddr],
    ) -> Result<Vec<(SocketAddr, bool)>, ReadError> {
        let mut found: HashMap<SocketAddr, Watched> =
            endpoints.iter().map(|e| (*e, Watched::default())).collect();
        for family in [Family::V4, Family::V6] {
            if !endpoints.iter().any(|e| Family::of(&e.ip()) == family) {
                continue;
            }
            let mut owner: HashMap<u32, SocketAddr> = HashMap::new();
            for (id, b) in maps.backends(family)?.entries {
                let endpoint = SocketAddr::new(b.ip, b.port);
                if let Some(w) = found.get_mut(&endpoint) {
                    w.backend_ids.insert(id);
                    owner.insert(id, endpoint);
                }
            }
            if owner.is_empty() {
                continue;
            }
            for (key, value) in maps.services(family)?.entries {
                if key.slot == 0 {
                    continue;
                }
                if let Some(w) = owner.get(&value.backend_id).and_then(|e| found.get_mut(e)) {
                    w.frontends.insert(ServiceKey::master(key.frontend), false);
                }
            }
        }
        let mut out = Vec::with_capacity(endpoints.len());
        for (endpoint, mut watched) in found {
            for (master, selected) in &mut watched.frontends {
                *selected = selects(maps, master, maps.service(master)?, &watched.backend_ids)?;
            }
            out.push((endpoint, watched.selected()));
            for master in watched.frontends.keys() {
                self.by_master.entry(*master).or_default().insert(endpoint);
            }
            self.endpoints.insert(endpoint, watched);
        }
        Ok(out)
    }

    pub fn unwatch(&mut self, endpoint: &SocketAddr) {
        let Some(watched) = self.endpoints.remove(endpoint) else {
            return;
        };
        for master in watched.frontends.keys() {
            if let Some(endpoints) = self.by_master.get_mut(master) {
                endpoints.remove(endpoint);
                if endpoints.is_empty() {
                    self.by_master.remove(master);
                }
            }
        }
    }

    /// The masters of every watched frontend: the keys the tracepoint
    /// program matches.
    pub fn masters(&self) -> HashSet<ServiceKey> {
        self.by_master.keys().copied().collect()
    }

    /// After a write of `master` (its new value, `None` for a deletion):
    /// the watched endpoints whose selection flipped, with the new state.
    pub fn on_master(
        &mut self,
        maps: &impl ServiceMaps,
        master: &ServiceKey,
        value: Option<ServiceValue>,
    ) -> Result<Vec<(SocketAddr, bool)>, ReadError> {
        let mut flips = Vec::new();
        let Some(endpoints) = self.by_master.get(master) else {
            return Ok(flips);
        };
        for endpoint in endpoints {
            let Some(watched) = self.endpoints.get_mut(endpoint) else {
                continue;
            };
            let before = watched.selected();
            let now = selects(maps, master, value, &watched.backend_ids)?;
            watched.frontends.insert(*master, now);
            if watched.selected() != before {
                flips.push((*endpoint, !before));
            }
        }
        Ok(flips)
    }

    /// Re-reads every watched master (the polling fallback, and the
    /// check after events were lost).
    pub fn refresh(
        &mut self,
        maps: &impl ServiceMaps,
    ) -> Result<Vec<(SocketAddr, bool)>, ReadError> {
        let mut flips = Vec::new();
        for master in self.masters() {
            let value = maps.service(&master)?;
            flips.extend(self.on_master(maps, &master, value)?);
        }
        Ok(flips)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{cell::Cell, collections::BTreeMap, net::IpAddr};

    use observer_common::cilium::{Backend, BackendState, Frontend, Scope};

    use super::super::maps::Entries;
    use super::*;

    /// Cilium's maps as a table, written in Cilium's order by the tests.
    #[derive(Default)]
    pub(crate) struct Table {
        pub backends: BTreeMap<u32, Backend>,
        pub services: BTreeMap<(IpAddr, u16, u16), ServiceValue>,
        pub lookups: Cell<usize>,
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
    }

    fn fe(ip: IpAddr, port: u16) -> Frontend {
        Frontend {
            ip,
            port,
            proto: 6,
            scope: Scope::External,
        }
    }

    const VIP: [u8; 4] = [10, 96, 0, 10];
    const OTHER_VIP: [u8; 4] = [10, 96, 0, 11];

    fn pod(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 244, 1, last], 8080))
    }

    impl Table {
        pub(crate) fn backend(&mut self, id: u32, ep: SocketAddr) {
            self.backends.insert(
                id,
                Backend {
                    ip: ep.ip(),
                    port: ep.port(),
                    proto: 6,
                    state: BackendState::Active,
                    cluster_id: 0,
                    zone: 0,
                },
            );
        }

        /// Cilium's update of one frontend: slots first, master last,
        /// then the tail past the new total deleted.
        pub(crate) fn frontend(
            &mut self,
            vip: [u8; 4],
            active: &[u32],
            inactive: &[u32],
        ) -> ServiceKey {
            let ip = IpAddr::from(vip);
            for (i, id) in active.iter().chain(inactive).enumerate() {
                self.services.insert(
                    (ip, 80, i as u16 + 1),
                    ServiceValue {
                        backend_id: *id,
                        ..Default::default()
                    },
                );
            }
            let total = (active.len() + inactive.len()) as u16;
            self.services.insert(
                (ip, 80, 0),
                ServiceValue {
                    count: active.len() as u16,
                    qcount: inactive.len() as u16,
                    ..Default::default()
                },
            );
            self.services
                .retain(|(i, _, slot), _| *i != ip || *slot <= total);
            ServiceKey::master(fe(ip, 80))
        }
    }

    #[test]
    fn a_backend_moved_to_the_tail_is_no_longer_selected_and_back_is_again() {
        let mut t = Table::default();
        t.backend(1, pod(1));
        t.backend(2, pod(2));
        let master = t.frontend(VIP, &[1, 2], &[]);
        let mut m = Model::default();
        assert!(m.watch(&t, pod(1)).unwrap());
        assert_eq!(m.masters(), HashSet::from([master]));

        t.frontend(VIP, &[2], &[1]);
        let value = t.service(&master).unwrap();
        assert_eq!(
            m.on_master(&t, &master, value).unwrap(),
            vec![(pod(1), false)]
        );
        // The same state again: no flip.
        assert_eq!(m.on_master(&t, &master, value).unwrap(), vec![]);

        t.frontend(VIP, &[1, 2], &[]);
        let value = t.service(&master).unwrap();
        assert_eq!(
            m.on_master(&t, &master, value).unwrap(),
            vec![(pod(1), true)]
        );
    }

    #[test]
    fn the_last_backend_stays_selected_when_cilium_counts_terminating_ones_in() {
        let mut t = Table::default();
        t.backend(1, pod(1));
        let master = t.frontend(VIP, &[1], &[]);
        let mut m = Model::default();
        assert!(m.watch(&t, pod(1)).unwrap());
        // Every backend terminating: Cilium keeps them within count.
        t.frontend(VIP, &[1], &[]);
        assert_eq!(
            m.on_master(&t, &master, t.service(&master).unwrap())
                .unwrap(),
            vec![]
        );
        // The frontend deleted.
        assert_eq!(
            m.on_master(&t, &master, None).unwrap(),
            vec![(pod(1), false)]
        );
    }

    #[test]
    fn an_endpoint_of_two_frontends_is_selected_until_both_drop_it() {
        let mut t = Table::default();
        t.backend(1, pod(1));
        t.backend(2, pod(2));
        let a = t.frontend(VIP, &[1, 2], &[]);
        let b = t.frontend(OTHER_VIP, &[1], &[]);
        let mut m = Model::default();
        assert!(m.watch(&t, pod(1)).unwrap());
        assert_eq!(m.masters().len(), 2);
        t.frontend(VIP, &[2], &[1]);
        assert_eq!(m.on_master(&t, &a, t.service(&a).unwrap()).unwrap(), vec![]);
        t.frontend(OTHER_VIP, &[], &[1]);
        assert_eq!(
            m.on_master(&t, &b, t.service(&b).unwrap()).unwrap(),
            vec![(pod(1), false)]
        );
    }

    #[test]
    fn writes_to_unrelated_frontends_change_nothing_and_read_nothing() {
        let mut t = Table::default();
        t.backend(1, pod(1));
        t.backend(2, pod(2));
        t.frontend(VIP, &[1], &[]);
        let other = t.frontend(OTHER_VIP, &[2], &[]);
        let mut m = Model::default();
        m.watch(&t, pod(1)).unwrap();
        t.lookups.set(0);
        t.frontend(OTHER_VIP, &[], &[2]);
        assert_eq!(
            m.on_master(&t, &other, t.service(&other).unwrap()).unwrap(),
            vec![]
        );
        assert_eq!(t.lookups.get(), 1, "only the test's own lookup");
    }

    #[test]
    fn the_poll_finds_the_same_flips_as_the_events() {
        let mut t = Table::default();
        t.backend(1, pod(1));
        t.backend(2, pod(2));
        t.frontend(VIP, &[1, 2], &[]);
        let mut m = Model::default();
        m.watch(&t, pod(1)).unwrap();
        m.watch(&t, pod(2)).unwrap();
        assert_eq!(m.refresh(&t).unwrap(), vec![]);
        t.frontend(VIP, &[2], &[1]);
        assert_eq!(m.refresh(&t).unwrap(), vec![(pod(1), false)]);
        // The backend left the EndpointSlice: deleted, then the tail slot.
        t.backends.remove(&1);
        t.frontend(VIP, &[2], &[]);
        assert_eq!(m.refresh(&t).unwrap(), vec![]);
        m.unwatch(&pod(1));
        assert_eq!(m.watched().collect::<Vec<_>>(), vec![&pod(2)]);
    }

    #[test]
    fn many_endpoints_are_resolved_with_one_read_of_each_map() {
        let mut t = Table::default();
        for id in 1..=4 {
            t.backend(id, pod(id as u8));
        }
        t.frontend(VIP, &[1, 2], &[3]);
        t.frontend(OTHER_VIP, &[3, 4], &[]);
        let mut m = Model::default();
        t.lookups.set(0);
        let mut found = m.watch_all(&t, &[pod(1), pod(3), pod(9)]).unwrap();
        found.sort();
        assert_eq!(found, vec![(pod(1), true), (pod(3), true), (pod(9), false)]);
        assert_eq!(m.masters().len(), 2);
        // Per frontend of each endpoint its master and its first `count`
        // slots up to the hit, no dump: pod 1 in VIP (2), pod 3 in VIP
        // (master, slots 1-2: it is in the tail) and in OTHER_VIP (2).
        assert_eq!(t.lookups.get(), 7);
    }

    #[test]
    fn an_endpoint_cilium_does_not_know_is_not_selected() {
        let t = Table::default();
        let mut m = Model::default();
        assert!(!m.watch(&t, pod(9)).unwrap());
        assert!(m.masters().is_empty());
        assert!(m.is_watched(&pod(9)));
    }
}
