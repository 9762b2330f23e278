//! iptables modes: kube-proxy's `iptables-restore --noflush` input
//! (pkg/proxy/iptables/proxier.go, full sync) and the jumps it ensures from
//! the built-in chains.

use std::{collections::HashSet, fmt::Write as _};

use super::{
    Backend, ServicePort,
    names::{iptables_endpoint_chain, iptables_service_chain},
};

const MASQ_MARK: &str = "0x4000";

const FILTER_CHAINS: [&str; 5] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
];
const NAT_CHAINS: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

/// One of kube-proxy's iptablesJumpChains: a rule in a built-in chain that
/// jumps to one of its own.
struct Jump {
    table: &'static str,
    from: &'static str,
    to: &'static str,
    comment: &'static str,
    /// Only for packets that start a connection (`--ctstate NEW`).
    new_only: bool,
}

const JUMPS: [Jump; 8] = [
    Jump {
        table: "filter",
        from: "INPUT",
        to: "KUBE-PROXY-FIREWALL",
        comment: "kubernetes load balancer firewall",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: "KUBE-NODEPORTS",
        comment: "kubernetes health check service ports",
        new_only: false,
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: "KUBE-EXTERNAL-SERVICES",
        comment: "kubernetes externally-visible service portals",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: "KUBE-FORWARD",
        comment: "kubernetes forwarding rules",
        new_only: false,
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: "KUBE-SERVICES",
        comment: "kubernetes service portals",
        new_only: true,
    },
    Jump {
        table: "nat",
        from: "OUTPUT",
        to: "KUBE-SERVICES",
        comment: "kubernetes service portals",
        new_only: false,
    },
    Jump {
        table: "nat",
        from: "PREROUTING",
        to: "KUBE-SERVICES",
        comment: "kubernetes service portals",
        new_only: false,
    },
    Jump {
        table: "nat",
        from: "POSTROUTING",
        to: "KUBE-POSTROUTING",
        comment: "kubernetes postrouting rules",
        new_only: false,
    },
];

/// kube-proxy's iptablesJumpChains, as `iptables` arguments with `-I`.
pub fn jump_rules() -> Vec<Vec<&'static str>> {
    JUMPS
        .iter()
        .map(|j| {
            let mut args = vec!["-t", j.table, "-I", j.from];
            if j.new_only {
                args.extend(["-m", "conntrack", "--ctstate", "NEW"]);
            }
            args.extend(["-m", "comment", "--comment", j.comment, "-j", j.to]);
            args
        })
        .collect()
}

pub struct Sync {
    pub input: String,
    pub active: HashSet<String>,
}

/// The restore input of one sync; `existing` are the KUBE-SVC/KUBE-SEP
/// chains the last sync used (those no longer used are deleted, as
/// kube-proxy's iptables mode does, in the same transaction). A partial
/// sync (`changed`: the Services that changed since the last sync) leaves
/// out the chains of the other Services, as kube-proxy does since 1.27;
/// KUBE-SERVICES and the other top-level chains are rewritten in full by
/// every sync.
pub fn restore_input(
    services: &[(ServicePort, Vec<Backend>)],
    existing: &HashSet<String>,
    changed: Option<&HashSet<&ServicePort>>,
) -> Sync {
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    let mut active = HashSet::new();

    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
    );
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");

    for (svc, backends) in services {
        let name = svc.port_name_string();
        if backends.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m tcp -p tcp -d {} --dport {} -j REJECT",
                svc.cluster_ip, svc.port
            );
            continue;
        }
        let svc_chain = iptables_service_chain(svc);
        active.insert(svc_chain.clone());
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {} --dport {} -j {svc_chain}",
            svc.cluster_ip, svc.port
        );
        if changed.is_some_and(|c| !c.contains(svc)) {
            active.extend(backends.iter().map(|b| iptables_endpoint_chain(svc, b)));
            continue;
        }
        let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");
        let n = backends.len();
        for (i, backend) in backends.iter().enumerate() {
            let ep_chain = iptables_endpoint_chain(svc, backend);
            let _ = writeln!(nat_chains, ":{ep_chain} - [0:0]");
            active.insert(ep_chain.clone());
            let probability = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                nat_rules,
                "-A {svc_chain} -m comment --comment \"{name} -> {}:{}\" {probability}-j {ep_chain}",
                backend.ip, backend.port
            );
            let _ = writeln!(
                nat_rules,
                "-A {ep_chain} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                backend.ip
            );
            let _ = writeln!(
                nat_rules,
                "-A {ep_chain} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {}:{}",
                backend.ip, backend.port
            );
        }
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    let mut stale: Vec<&String> = existing.difference(&active).collect();
    stale.sort();
    for chain in stale {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        let _ = writeln!(nat_rules, "-X {chain}");
    }

    let mut input = String::from("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    input.push_str(&filter_rules);
    input.push_str("COMMIT\n*nat\n");
    for chain in NAT_CHAINS {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    input.push_str(&nat_chains);
    input.push_str(&nat_rules);
    input.push_str("COMMIT\n");
    Sync { input, active }
}

/// Flushes and deletes every chain kube-proxy owns (the jumps into them must
/// be gone first).
pub fn cleanup_input(service_chains: &HashSet<String>) -> String {
    let mut input = String::from("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    for chain in FILTER_CHAINS {
        let _ = writeln!(input, "-X {chain}");
    }
    input.push_str("COMMIT\n*nat\n");
    let mut nat: Vec<&str> = NAT_CHAINS.to_vec();
    nat.extend(service_chains.iter().map(String::as_str));
    for chain in &nat {
        let _ = writeln!(input, ":{chain} - [0:0]");
    }
    for chain in &nat {
        let _ = writeln!(input, "-X {chain}");
    }
    input.push_str("COMMIT\n");
    input
}
