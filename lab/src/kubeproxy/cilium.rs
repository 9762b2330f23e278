//! The `cilium` mode: no netfilter rule; the node's Services live in
//! Cilium-layout maps on a private bpffs, written by a named writer thread
//! in the order of Cilium's reconciler, and new connections of the node
//! follow them through the connect4 program (see [`crate::cilium`]).
//!
//! Per sync: backends that are new or change state are written first, then
//! each changed frontend (slots, master, tail deletion), then the backends
//! no frontend holds any more are deleted. A selected backend is active; a
//! terminating endpoint that is no longer selected stays in its frontend's
//! tail (Cilium's `qcount`) until it leaves the EndpointSlice.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use observer_common::cilium::{self, BackendState, Family, Frontend, Scope};
use observer_proto::UnixNanos;

use super::{Applied, Backend, KubeProxyError, ServicePort};
use crate::cilium::{Bpffs, SockLb, WriterThread};

/// Where an agent finds the node's maps and their writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CiliumNode {
    pub pin_dir: PathBuf,
    /// The writer thread's name (`comm`).
    pub writer_comm: String,
    /// The writer's process, as the host's PID namespace numbers it.
    pub writer_pid: u32,
}

/// A frontend as written: active backend ids, then the tail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Written {
    active: Vec<u32>,
    inactive: Vec<u32>,
}

pub(super) struct Dataplane {
    // Fields drop in order: the datapath first, the maps' mount last.
    _sock_lb: SockLb,
    writer: WriterThread,
    bpffs: Bpffs,
    ids: HashMap<Backend, u32>,
    next_id: u32,
    states: HashMap<u32, BackendState>,
    frontends: HashMap<ServicePort, Written>,
    /// rev_nat_index of each Service, from 1 in order of appearance.
    rev_nat: HashMap<ServicePort, u16>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.bpffs.path())
            .field("writer", &self.writer.comm())
            .finish_non_exhaustive()
    }
}

fn error(what: &str) -> impl FnOnce(io::Error) -> KubeProxyError + '_ {
    move |source| KubeProxyError::Cilium {
        what: what.to_owned(),
        source,
    }
}

fn frontend(svc: &ServicePort) -> Frontend {
    Frontend {
        ip: IpAddr::V4(svc.cluster_ip),
        port: svc.port,
        proto: libc::IPPROTO_TCP as u8,
        scope: Scope::External,
    }
}

impl Dataplane {
    /// Mounts the node's bpffs, creates the maps, starts the writer named
    /// `writer_comm` and attaches the datapath to the namespace `netns`.
    pub fn create(netns: &str, writer_comm: &str) -> Result<Dataplane, KubeProxyError> {
        let bpffs = Bpffs::mount(netns).map_err(error("mounting the node's bpffs"))?;
        let maps = crate::cilium::ServiceMapsWriter::create(bpffs.path(), Family::V4)
            .map_err(error("creating the service maps"))?;
        let writer = WriterThread::spawn(writer_comm, maps).map_err(error("the writer thread"))?;
        let sock_lb =
            SockLb::attach(bpffs.path(), &Path::new("/run/netns").join(netns)).map_err(|e| {
                KubeProxyError::Cilium {
                    what: "the connect4 datapath".into(),
                    source: io::Error::other(e),
                }
            })?;
        Ok(Dataplane {
            _sock_lb: sock_lb,
            writer,
            bpffs,
            ids: HashMap::new(),
            next_id: 1,
            states: HashMap::new(),
            frontends: HashMap::new(),
            rev_nat: HashMap::new(),
        })
    }

    pub fn node(&self) -> CiliumNode {
        CiliumNode {
            pin_dir: self.bpffs.path().to_owned(),
            writer_comm: self.writer.comm().to_owned(),
            writer_pid: std::process::id(),
        }
    }

    /// The backend's id, a new one for a backend the maps do not hold.
    fn id(&mut self, backend: Backend) -> u32 {
        let next = &mut self.next_id;
        *self.ids.entry(backend).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    /// Writes the desired state; the returned window spans the masters'
    /// syscalls (the cutovers), or the whole sync when no master changed.
    pub fn sync(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        terminating: &[(ServicePort, Vec<Backend>)],
    ) -> Result<Applied, KubeProxyError> {
        let started = UnixNanos::now();
        let mut desired: Vec<(ServicePort, Written)> = Vec::new();
        for (svc, selected) in services {
            let active: Vec<u32> = selected.iter().map(|b| self.id(*b)).collect();
            let tail: Vec<Backend> = terminating
                .iter()
                .filter(|(s, _)| s == svc)
                .flat_map(|(_, bs)| bs)
                .filter(|b| !selected.contains(b))
                .copied()
                .collect();
            let inactive: Vec<u32> = tail.into_iter().map(|b| self.id(b)).collect();
            let next = self.rev_nat.len() as u16 + 1;
            self.rev_nat.entry(svc.clone()).or_insert(next);
            desired.push((svc.clone(), Written { active, inactive }));
        }
        let mut states: HashMap<u32, BackendState> = HashMap::new();
        for (_, w) in &desired {
            states.extend(w.active.iter().map(|id| (*id, BackendState::Active)));
            for id in &w.inactive {
                states.entry(*id).or_insert(BackendState::Terminating);
            }
        }
        let by_id: HashMap<u32, Backend> = self.ids.iter().map(|(b, id)| (*id, *b)).collect();
        let upserts: Vec<(u32, cilium::Backend)> = states
            .iter()
            .filter(|(id, state)| self.states.get(id) != Some(state))
            .map(|(id, state)| {
                let b = by_id[id];
                let addr = SocketAddr::from((b.ip, b.port));
                (*id, cilium::Backend::tcp(addr, *state))
            })
            .collect();
        let writes: Vec<(Frontend, u16, Written)> = desired
            .iter()
            .filter(|(svc, w)| self.frontends.get(svc) != Some(w))
            .map(|(svc, w)| (frontend(svc), self.rev_nat[svc], w.clone()))
            .collect();
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|svc| !desired.iter().any(|(s, _)| s == *svc))
            .map(frontend)
            .collect();
        let orphans: Vec<u32> = self
            .states
            .keys()
            .filter(|id| !states.contains_key(id))
            .copied()
            .collect();
        let masters = self
            .writer
            .run(move |maps| -> io::Result<Option<(UnixNanos, UnixNanos)>> {
                for (id, backend) in &upserts {
                    maps.upsert_backend(*id, backend)?;
                }
                let mut window: Option<(UnixNanos, UnixNanos)> = None;
                for (frontend, rev_nat, w) in &writes {
                    let m = maps.write_frontend(*frontend, *rev_nat, &w.active, &w.inactive)?;
                    window = Some(window.map_or((m.before, m.after), |(b, _)| (b, m.after)));
                }
                for frontend in gone {
                    maps.delete_frontend(frontend)?;
                }
                for id in orphans {
                    maps.delete_backend(id)?;
                }
                Ok(window)
            })
            .map_err(error("writing the service maps"))?;
        self.frontends = desired.into_iter().collect();
        self.states = states;
        let live: HashSet<u32> = self.states.keys().copied().collect();
        self.ids.retain(|_, id| live.contains(id));
        let (started_unix_nano, finished_unix_nano) =
            masters.unwrap_or_else(|| (started, UnixNanos::now()));
        Ok(Applied {
            started_unix_nano,
            finished_unix_nano,
        })
    }
}
