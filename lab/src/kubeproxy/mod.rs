//! kube-proxy's rule layouts, written the way kube-proxy writes them: one
//! atomic transaction per sync (`nft -f -` in nftables mode,
//! `iptables-restore --noflush` in the iptables modes), with kube-proxy's
//! chain names, dispatch structure and stale-chain handling, so the agent is
//! tested against what a real node carries.
//!
//! Layouts follow kubernetes pkg/proxy/nftables/proxier.go and
//! pkg/proxy/iptables/proxier.go (ClusterIP services, cluster traffic policy,
//! no session affinity, no local-traffic detector).
//!
//! The `cilium` mode has no rules: Cilium's kube-proxy replacement,
//! imitated with its service maps and socket-LB ([`cilium`]).

mod cilium;
mod iptables;
mod names;
mod nft;

use observer_proto::UnixNanos;
use std::{
    collections::HashSet,
    fmt,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    str::FromStr,
    time::Instant,
};

use thiserror::Error;

pub use cilium::CiliumNode;
pub use names::{
    iptables_endpoint_chain, iptables_service_chain, nft_endpoint_chain, nft_service_chain,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Nftables,
    IptablesNft,
    IptablesLegacy,
    /// Cilium's kube-proxy replacement: service maps and socket-LB.
    Cilium,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Nftables,
        Mode::IptablesNft,
        Mode::IptablesLegacy,
        Mode::Cilium,
    ];
    /// The modes of kube-proxy itself, which write netfilter rules.
    pub const KUBE_PROXY: [Mode; 3] = [Mode::Nftables, Mode::IptablesNft, Mode::IptablesLegacy];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::Cilium => "cilium",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = KubeProxyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| KubeProxyError::UnknownMode(s.to_owned()))
    }
}

/// One port of a Service (TCP).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
}

impl ServicePort {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port`.
    fn port_name_string(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Wall clock (ns since the Unix epoch) just before the transaction started
/// and just after it finished; the kernel commit happened in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub started_unix_nano: UnixNanos,
    pub finished_unix_nano: UnixNanos,
}

#[derive(Debug, Error)]
pub enum KubeProxyError {
    #[error(
        "unknown dataplane mode {0:?} (expected nftables, iptables-nft, iptables-legacy or cilium)"
    )]
    UnknownMode(String),
    #[error("cilium mode: {what}: {source}")]
    Cilium {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}\ninput:\n{input}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
        input: String,
    },
}

/// The rules one kube-proxy keeps in one network namespace.
#[derive(Debug)]
pub struct Rules {
    netns: Option<String>,
    mode: Mode,
    /// Service and endpoint chains the last sync used.
    chains: HashSet<String>,
    /// nftables mode: flushed chains awaiting deletion, with the time they
    /// became stale (kube-proxy deletes them a second later).
    stale: Vec<(String, Instant)>,
    /// iptables modes: the jumps from the built-in chains exist.
    jumps_installed: bool,
    /// cilium mode: the maps, their writer and the datapath, from the
    /// first sync to the cleanup.
    cilium: Option<cilium::Dataplane>,
}

impl Rules {
    pub fn new(netns: Option<String>, mode: Mode) -> Self {
        Rules {
            netns,
            mode,
            chains: HashSet::new(),
            stale: Vec::new(),
            jumps_installed: false,
            cilium: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// cilium mode, once synced: where the node's maps and writer are.
    pub fn cilium_node(&self) -> Option<CiliumNode> {
        self.cilium.as_ref().map(cilium::Dataplane::node)
    }

    /// A full sync that also names, per Service, the terminating
    /// endpoints not selected: netfilter rules drop them, Cilium keeps them
    /// in its frontend's tail until they leave the EndpointSlice.
    pub fn sync_keeping_terminating(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        terminating: &[(ServicePort, Vec<Backend>)],
    ) -> Result<Applied, KubeProxyError> {
        match self.mode {
            Mode::Cilium => self.sync_cilium(services, terminating),
            _ => self.sync_some(services, None),
        }
    }

    /// One kube-proxy sync: the full desired state for these services, in one transaction.
    pub fn sync(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
    ) -> Result<Applied, KubeProxyError> {
        self.sync_some(services, None)
    }

    /// One partial kube-proxy sync (its normal case between full syncs):
    /// `services` is the full desired state, and only the chains and map
    /// elements of the `changed` ones are written. A Service whose last
    /// endpoint goes needs a full [`Self::sync`] here (its map element is
    /// deleted by the flush of the maps).
    pub fn partial_sync(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        changed: &HashSet<&ServicePort>,
    ) -> Result<Applied, KubeProxyError> {
        self.sync_some(services, Some(changed))
    }

    fn sync_some(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        changed: Option<&HashSet<&ServicePort>>,
    ) -> Result<Applied, KubeProxyError> {
        match self.mode {
            Mode::Nftables => self.sync_nft(services, changed),
            Mode::IptablesNft | Mode::IptablesLegacy => self.sync_iptables(services, changed),
            // Only changed frontends are written anyway; with no
            // terminating endpoints named, a frontend keeps no tail (the
            // lab's controller calls `sync_keeping_terminating`).
            Mode::Cilium => self.sync_cilium(services, &[]),
        }
    }

    fn sync_cilium(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        terminating: &[(ServicePort, Vec<Backend>)],
    ) -> Result<Applied, KubeProxyError> {
        let dataplane = match &mut self.cilium {
            Some(d) => d,
            None => {
                static WRITERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let netns = self
                    .netns
                    .as_deref()
                    .ok_or_else(|| KubeProxyError::Cilium {
                        what: "the datapath needs the node's namespace".into(),
                        source: std::io::ErrorKind::InvalidInput.into(),
                    })?;
                self.cilium
                    .insert(cilium::Dataplane::create(netns, &format!("cilium-w{n}"))?)
            }
        };
        dataplane.sync(services, terminating)
    }

    /// Removes every table/chain this Rules created.
    pub fn cleanup(&mut self) -> Result<(), KubeProxyError> {
        match self.mode {
            Mode::Cilium => self.cilium = None,
            Mode::Nftables => {
                self.apply("nft", &["-f", "-"], &nft::cleanup_script())?;
            }
            Mode::IptablesNft | Mode::IptablesLegacy => {
                if self.jumps_installed {
                    for args in iptables::jump_rules() {
                        let mut delete = vec!["-w"];
                        delete.extend(args.iter().map(|a| if *a == "-I" { "-D" } else { a }));
                        self.run(&self.iptables_bin(), &delete, "")?;
                    }
                    self.jumps_installed = false;
                }
                let input = iptables::cleanup_input(&self.chains);
                self.apply(&self.restore_bin(), &["-w", "--noflush"], &input)?;
            }
        }
        self.chains.clear();
        self.stale.clear();
        Ok(())
    }

    fn sync_nft(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        changed: Option<&HashSet<&ServicePort>>,
    ) -> Result<Applied, KubeProxyError> {
        // kube-proxy deletes chains that went stale more than a second ago in
        // a transaction of its own, before the sync transaction.
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stale)
            .into_iter()
            .partition(|(_, since)| now.duration_since(*since).as_secs_f64() > 1.0);
        self.stale = kept;
        if !expired.is_empty() {
            let names: Vec<String> = expired.into_iter().map(|(c, _)| c).collect();
            self.apply("nft", &["-f", "-"], &nft::delete_chains_script(&names))?;
        }
        let sync = nft::sync_script(services, &self.chains, changed);
        let applied = self.apply("nft", &["-f", "-"], &sync.script)?;
        self.stale.retain(|(chain, _)| !sync.active.contains(chain));
        self.stale
            .extend(sync.newly_stale.into_iter().map(|chain| (chain, now)));
        self.chains = sync.active;
        Ok(applied)
    }

    fn sync_iptables(
        &mut self,
        services: &[(ServicePort, Vec<Backend>)],
        changed: Option<&HashSet<&ServicePort>>,
    ) -> Result<Applied, KubeProxyError> {
        let sync = iptables::restore_input(services, &self.chains, changed);
        let applied = self.apply(&self.restore_bin(), &["-w", "--noflush"], &sync.input)?;
        self.chains = sync.active;
        if !self.jumps_installed {
            // kube-proxy's EnsureRule: check, insert if missing.
            let bin = self.iptables_bin();
            for args in iptables::jump_rules() {
                let mut check = vec!["-w"];
                check.extend(args.iter().map(|a| if *a == "-I" { "-C" } else { a }));
                if self.run(&bin, &check, "").is_err() {
                    let mut insert = vec!["-w"];
                    insert.extend(args.iter().copied());
                    self.run(&bin, &insert, "")?;
                }
            }
            self.jumps_installed = true;
        }
        Ok(applied)
    }

    fn restore_bin(&self) -> String {
        match self.mode {
            Mode::IptablesLegacy => "iptables-legacy-restore",
            _ => "iptables-nft-restore",
        }
        .to_owned()
    }

    fn iptables_bin(&self) -> String {
        match self.mode {
            Mode::IptablesLegacy => "iptables-legacy",
            _ => "iptables-nft",
        }
        .to_owned()
    }

    fn apply(&self, program: &str, args: &[&str], input: &str) -> Result<Applied, KubeProxyError> {
        let started_unix_nano = UnixNanos::now();
        self.run(program, args, input)?;
        Ok(Applied {
            started_unix_nano,
            finished_unix_nano: UnixNanos::now(),
        })
    }

    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<(), KubeProxyError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let command = format!("{program} {}", args.join(" "));
        let spawn_err = |source| KubeProxyError::Spawn {
            command: command.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(KubeProxyError::Failed {
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                input: input.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{netns::NetNs, root::root_or_skip};

    fn service() -> ServicePort {
        ServicePort {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            ip: Ipv4Addr::new(10, 180, 0, last),
            port: 80,
        }
    }

    fn dump(ns: &NetNs, mode: Mode) -> String {
        let script = match mode {
            Mode::Nftables => "nft list ruleset",
            Mode::IptablesNft => "iptables-nft-save",
            Mode::IptablesLegacy => "iptables-legacy-save",
            Mode::Cilium => unreachable!("the cilium mode writes no rules"),
        };
        String::from_utf8(ns.sh(script).unwrap().stdout).unwrap()
    }

    #[test]
    fn sync_writes_and_removes_kube_proxy_rules_in_every_mode() {
        if !root_or_skip("sync_writes_and_removes_kube_proxy_rules_in_every_mode") {
            return;
        }
        for mode in Mode::KUBE_PROXY {
            let ns = NetNs::create("kp").unwrap();
            let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
            let svc = service();
            let applied = rules
                .sync(&[(svc.clone(), vec![backend(1), backend(2)])])
                .unwrap();
            assert!(applied.started_unix_nano <= applied.finished_unix_nano);
            let text = dump(&ns, mode);
            assert!(text.contains("10.180.0.1:80"), "{mode}: {text}");
            assert!(text.contains("10.180.0.2:80"), "{mode}: {text}");

            rules.sync(&[(svc.clone(), vec![backend(2)])]).unwrap();
            let text = dump(&ns, mode);
            assert!(
                !text.contains("to 10.180.0.1:80") && !text.contains("destination 10.180.0.1:80"),
                "{mode}: {text}"
            );
            assert!(text.contains("10.180.0.2:80"), "{mode}: {text}");

            rules.sync(&[(svc.clone(), vec![])]).unwrap();
            assert!(!dump(&ns, mode).contains("10.180.0.2:80"), "{mode}");

            rules.cleanup().unwrap();
            let text = dump(&ns, mode);
            assert!(
                !text.contains("kube-proxy") && !text.contains("KUBE-"),
                "{mode}: {text}"
            );
        }
    }

    #[test]
    fn a_partial_sync_rewrites_the_changed_service_and_keeps_the_others() {
        if !root_or_skip("a_partial_sync_rewrites_the_changed_service_and_keeps_the_others") {
            return;
        }
        for mode in Mode::KUBE_PROXY {
            let ns = NetNs::create("kpp").unwrap();
            let mut rules = Rules::new(Some(ns.name().to_owned()), mode);
            let other = ServicePort {
                name: "svc2".into(),
                cluster_ip: Ipv4Addr::new(172, 30, 0, 42),
                ..service()
            };
            let mut services = vec![
                (service(), vec![backend(1), backend(2)]),
                (other.clone(), vec![backend(3)]),
            ];
            rules.sync(&services).unwrap();
            services[0].1.retain(|b| *b != backend(1));
            let changed = HashSet::from([&services[0].0]);
            rules.partial_sync(&services, &changed).unwrap();
            let text = dump(&ns, mode);
            assert!(
                !text.contains("to 10.180.0.1:80") && !text.contains("destination 10.180.0.1:80"),
                "{mode}: {text}"
            );
            for kept in ["10.180.0.2:80", "10.180.0.3:80"] {
                assert!(text.contains(kept), "{mode}: {kept} in {text}");
            }
            // The other Service's rules were not written again: same handles.
            if mode == Mode::Nftables {
                let handles = |ns: &NetNs| {
                    let out = ns.sh("nft -a list ruleset").unwrap().stdout;
                    String::from_utf8(out)
                        .unwrap()
                        .lines()
                        .filter(|l| l.contains("10.180.0.3"))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                };
                let before = handles(&ns);
                services[0].1.push(backend(1));
                let changed = HashSet::from([&services[0].0]);
                rules.partial_sync(&services, &changed).unwrap();
                assert_eq!(handles(&ns), before, "{mode}");
                assert!(dump(&ns, mode).contains("10.180.0.1:80"), "{mode}");
            }
            rules.cleanup().unwrap();
        }
    }

    #[test]
    fn mode_parses_from_its_name() {
        for mode in Mode::ALL {
            assert_eq!(mode.as_str().parse::<Mode>().unwrap(), mode);
        }
        assert!("ipvs".parse::<Mode>().is_err());
    }
}
