//! Cilium's pinned service maps, opened read-only and checked against the
//! layout observer-common knows before anything is read from them.

use std::{
    io,
    path::{Path, PathBuf},
};

use observer_common::cilium::{
    self, Backend, DecodeError, Family, LayoutError, MaglevKey, MapSpec, ServiceKey, ServiceValue,
};
use thiserror::Error;

use super::sys::{MapInfo, ReadOnlyMap};

/// Why the service maps cannot be read.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error(
        "no Cilium service maps under {0} (neither cilium_lb4_services_v2 nor cilium_lb6_services_v2)"
    )]
    NotFound(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Layout { path: PathBuf, source: LayoutError },
    #[error("{present} is pinned but {missing} is not")]
    Half { present: PathBuf, missing: PathBuf },
    #[error("first read of the maps: {0}")]
    Read(#[from] ReadError),
}

/// One family's services and backends maps.
#[derive(Debug)]
pub struct FamilyMaps {
    pub family: Family,
    pub services: ReadOnlyMap,
    pub backends: ReadOnlyMap,
}

/// The maps found under one pin directory: a family Cilium does not run
/// (IPv6 off, the default) has none.
#[derive(Debug)]
pub struct CiliumMaps {
    pub dir: PathBuf,
    pub v4: Option<FamilyMaps>,
    pub v6: Option<FamilyMaps>,
    /// Maglev's outer maps, pinned where Cilium runs Maglev. Its inner
    /// maps (the lookup tables) are not readable here: opening one by id
    /// needs CAP_SYS_ADMIN, which the agent does not have.
    pub maglev4: Option<ReadOnlyMap>,
    pub maglev6: Option<ReadOnlyMap>,
    /// What the kernel said of each map opened, with its spec's name.
    pub found: Vec<(&'static str, MapInfo)>,
}

fn open_checked(dir: &Path, spec: &MapSpec) -> Result<Option<(ReadOnlyMap, MapInfo)>, OpenError> {
    let path = dir.join(spec.name);
    if !path.exists() {
        return Ok(None);
    }
    let io = |source| OpenError::Io {
        path: path.clone(),
        source,
    };
    let map = ReadOnlyMap::open(&path).map_err(io)?;
    let info = map.info().map_err(io)?;
    spec.check(info.shape).map_err(|source| OpenError::Layout {
        path: path.clone(),
        source,
    })?;
    Ok(Some((map, info)))
}

impl CiliumMaps {
    /// Opens and checks the maps pinned under `dir`.
    pub fn open(dir: &Path) -> Result<CiliumMaps, OpenError> {
        let mut found = Vec::new();
        let mut family = |services: &MapSpec, backends: &MapSpec| {
            let s = open_checked(dir, services)?;
            let b = open_checked(dir, backends)?;
            match (s, b) {
                (None, None) => Ok(None),
                (Some((services_map, si)), Some((backends_map, bi))) => {
                    found.push((services.name, si));
                    found.push((backends.name, bi));
                    Ok(Some(FamilyMaps {
                        family: services.family,
                        services: services_map,
                        backends: backends_map,
                    }))
                }
                (Some(_), None) => Err(OpenError::Half {
                    present: dir.join(services.name),
                    missing: dir.join(backends.name),
                }),
                (None, Some(_)) => Err(OpenError::Half {
                    present: dir.join(backends.name),
                    missing: dir.join(services.name),
                }),
            }
        };
        let v4 = family(&cilium::SERVICES4, &cilium::BACKENDS4)?;
        let v6 = family(&cilium::SERVICES6, &cilium::BACKENDS6)?;
        let mut maglev = |spec: &MapSpec| -> Result<Option<ReadOnlyMap>, OpenError> {
            Ok(open_checked(dir, spec)?.map(|(map, info)| {
                found.push((spec.name, info));
                map
            }))
        };
        let maglev4 = maglev(&cilium::MAGLEV4)?;
        let maglev6 = maglev(&cilium::MAGLEV6)?;
        if v4.is_none() && v6.is_none() {
            if let Some(retired) = cilium::RETIRED.iter().find(|n| dir.join(n).exists()) {
                return Err(OpenError::Layout {
                    path: dir.join(retired),
                    source: LayoutError::Retired(retired),
                });
            }
            return Err(OpenError::NotFound(dir.to_owned()));
        }
        Ok(CiliumMaps {
            dir: dir.to_owned(),
            v4,
            v6,
            maglev4,
            maglev6,
            found,
        })
    }

    pub fn family(&self, family: Family) -> Option<&FamilyMaps> {
        match family {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }
}

/// Reads of the service maps, apart from where they come from: the pinned
/// maps, or a table in the unit tests.
pub trait ServiceMaps {
    /// Every backend of `family`, by id.
    fn backends(&self, family: Family) -> Result<Entries<u32, Backend>, ReadError>;
    /// Every services entry (masters and slots) of `family`.
    fn services(&self, family: Family) -> Result<Entries<ServiceKey, ServiceValue>, ReadError>;
    /// One services entry.
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, ReadError>;
    /// One backend.
    fn backend(&self, family: Family, id: u32) -> Result<Option<Backend>, ReadError>;
    /// The frontends (by rev_nat index) with a Maglev lookup table.
    fn maglev_keys(&self, family: Family) -> Result<Vec<MaglevKey>, ReadError>;
    /// The id of a frontend's Maglev lookup table (inner map), if it has one.
    fn maglev(&self, family: Family, key: MaglevKey) -> Result<Option<u32>, ReadError>;
}

/// Decoded entries, and how many did not decode (the first error kept):
/// one odd entry must not blind the detector to the others.
#[derive(Debug)]
pub struct Entries<K, V> {
    pub entries: Vec<(K, V)>,
    pub undecoded: usize,
    pub first_error: Option<DecodeError>,
}

impl<K, V> Default for Entries<K, V> {
    fn default() -> Self {
        Entries {
            entries: Vec::new(),
            undecoded: 0,
            first_error: None,
        }
    }
}

impl<K, V> Entries<K, V> {
    fn push(&mut self, decoded: Result<(K, V), DecodeError>) {
        match decoded {
            Ok(kv) => self.entries.push(kv),
            Err(e) => {
                self.undecoded += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum ReadError {
    #[error("reading {map}: {source}")]
    Io {
        map: &'static str,
        source: io::Error,
    },
    #[error("entry of {map}: {source}")]
    Decode {
        map: &'static str,
        source: DecodeError,
    },
}

fn specs(family: Family) -> (&'static MapSpec, &'static MapSpec) {
    match family {
        Family::V4 => (&cilium::SERVICES4, &cilium::BACKENDS4),
        Family::V6 => (&cilium::SERVICES6, &cilium::BACKENDS6),
    }
}

impl CiliumMaps {
    fn maglev_map(&self, family: Family) -> Option<(&ReadOnlyMap, &'static str)> {
        match family {
            Family::V4 => self.maglev4.as_ref().map(|m| (m, cilium::MAGLEV4.name)),
            Family::V6 => self.maglev6.as_ref().map(|m| (m, cilium::MAGLEV6.name)),
        }
    }
}

impl ServiceMaps for CiliumMaps {
    fn maglev_keys(&self, family: Family) -> Result<Vec<MaglevKey>, ReadError> {
        let Some((outer, map)) = self.maglev_map(family) else {
            return Ok(Vec::new());
        };
        let raw = outer
            .entries()
            .map_err(|source| ReadError::Io { map, source })?;
        raw.iter()
            .map(|(k, _)| MaglevKey::decode(k).map_err(|source| ReadError::Decode { map, source }))
            .collect()
    }

    fn maglev(&self, family: Family, key: MaglevKey) -> Result<Option<u32>, ReadError> {
        let Some((outer, map)) = self.maglev_map(family) else {
            return Ok(None);
        };
        let value = outer
            .lookup(&key.encode())
            .map_err(|source| ReadError::Io { map, source })?;
        Ok(value.map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]])))
    }

    fn backends(&self, family: Family) -> Result<Entries<u32, Backend>, ReadError> {
        let mut out = Entries::default();
        let Some(maps) = self.family(family) else {
            return Ok(out);
        };
        let map = specs(family).1.name;
        let raw = maps
            .backends
            .entries()
            .map_err(|source| ReadError::Io { map, source })?;
        for (k, v) in raw {
            let id = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
            out.push(Backend::decode(family, &v).map(|b| (id, b)));
        }
        Ok(out)
    }

    fn services(&self, family: Family) -> Result<Entries<ServiceKey, ServiceValue>, ReadError> {
        let mut out = Entries::default();
        let Some(maps) = self.family(family) else {
            return Ok(out);
        };
        let map = specs(family).0.name;
        let raw = maps
            .services
            .entries()
            .map_err(|source| ReadError::Io { map, source })?;
        for (k, v) in raw {
            out.push(
                ServiceKey::decode(family, &k).and_then(|key| Ok((key, ServiceValue::decode(&v)?))),
            );
        }
        Ok(out)
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, ReadError> {
        let family = Family::of(&key.frontend.ip);
        let Some(maps) = self.family(family) else {
            return Ok(None);
        };
        let map = specs(family).0.name;
        let value = maps
            .services
            .lookup(key.encode().as_slice())
            .map_err(|source| ReadError::Io { map, source })?;
        value
            .map(|v| ServiceValue::decode(&v))
            .transpose()
            .map_err(|source| ReadError::Decode { map, source })
    }

    fn backend(&self, family: Family, id: u32) -> Result<Option<Backend>, ReadError> {
        let Some(maps) = self.family(family) else {
            return Ok(None);
        };
        let map = specs(family).1.name;
        let value = maps
            .backends
            .lookup(&id.to_ne_bytes())
            .map_err(|source| ReadError::Io { map, source })?;
        value
            .map(|v| Backend::decode(family, &v))
            .transpose()
            .map_err(|source| ReadError::Decode { map, source })
    }
}
