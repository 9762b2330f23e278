//! nftables mode: the `ip kube-proxy` table (pkg/proxy/nftables/proxier.go,
//! setupNFTables + syncProxyRules).

use std::{collections::HashSet, fmt::Write as _};

use super::{
    Backend, ServicePort,
    names::{nft_endpoint_chain, nft_service_chain},
};

const TABLE: &str = "ip kube-proxy";
const MASQ_MARK: &str = "0x00004000";

/// Base chains: name, type, hook, priority (dstnat = -100, srcnat = 100).
const BASE_CHAINS: [(&str, &str, &str, &str); 7] = [
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
];

/// (destination chain, source base chain, match before the jump).
const JUMP_CHAINS: [(&str, &str, &str); 8] = [
    ("endpoints-check", "filter-input", "ct state new "),
    ("endpoints-check", "filter-forward", "ct state new "),
    ("endpoints-check", "filter-output", "ct state new "),
    ("firewall-check", "filter-prerouting", "ct state new "),
    ("firewall-check", "filter-output", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
];

pub struct Sync {
    pub script: String,
    /// Service and endpoint chains the new state uses.
    pub active: HashSet<String>,
    /// Chains flushed by this sync because nothing uses them any more.
    pub newly_stale: Vec<String>,
}

/// kube-proxy's `ensureChain`: add and flush, once per transaction.
fn ensure_chain(out: &mut String, created: &mut HashSet<String>, chain: &str) {
    if created.insert(chain.to_owned()) {
        let _ = writeln!(out, "add chain {TABLE} {chain}");
        let _ = writeln!(out, "flush chain {TABLE} {chain}");
    }
}

fn setup(out: &mut String) {
    let _ = writeln!(
        out,
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    );
    for (name, kind, hook, prio) in BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {TABLE} {name}");
    }
    let mut created = HashSet::new();
    for (dst, src, extra) in JUMP_CHAINS {
        ensure_chain(out, &mut created, dst);
        let _ = writeln!(out, "add rule {TABLE} {src} {extra}jump {dst}");
    }
    for chain in ["services", "masquerading", "mark-for-masquerade"] {
        ensure_chain(out, &mut created, chain);
    }
    let _ = writeln!(
        out,
        "add rule {TABLE} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} masquerading mark and {MASQ_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} masquerading mark set mark xor {MASQ_MARK}"
    );
    let _ = writeln!(out, "add rule {TABLE} masquerading masquerade fully-random");
    // NodePorts on every address: the set is added and deleted again.
    let _ = writeln!(
        out,
        "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(out, "delete set {TABLE} nodeport-ips");
    let vmap = "ipv4_addr . inet_proto . inet_service : verdict";
    let _ = writeln!(
        out,
        "add map {TABLE} no-endpoint-services {{ type {vmap} ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {TABLE} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {TABLE} reject-chain");
    let _ = writeln!(out, "add rule {TABLE} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {TABLE} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {TABLE} firewall-ips {{ type {vmap} ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure_chain(out, &mut created, "firewall-check");
    let _ = writeln!(
        out,
        "add rule {TABLE} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {TABLE} service-ips {{ type {vmap} ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );
}

/// The sync transaction; `existing` are the service/endpoint chains the last
/// sync used. A partial sync (`changed`: the Services that changed since
/// the last sync) rewrites only their chains and map elements, as
/// kube-proxy does between its full syncs; the maps keep their other
/// elements.
pub fn sync_script(
    services: &[(ServicePort, Vec<Backend>)],
    existing: &HashSet<String>,
    changed: Option<&HashSet<&ServicePort>>,
) -> Sync {
    let mut out = String::new();
    setup(&mut out);
    if changed.is_none() {
        for map in [
            "firewall-ips",
            "no-endpoint-services",
            "no-endpoint-nodeports",
            "service-ips",
            "service-nodeports",
        ] {
            let _ = writeln!(out, "flush map {TABLE} {map}");
        }
    }
    let mut active = HashSet::new();
    for (svc, backends) in services {
        if changed.is_some_and(|c| !c.contains(svc)) {
            if !backends.is_empty() {
                active.insert(nft_service_chain(svc));
                active.extend(backends.iter().map(|b| nft_endpoint_chain(svc, b)));
            }
            continue;
        }
        let key = format!("{} . tcp . {}", svc.cluster_ip, svc.port);
        if backends.is_empty() {
            let _ = writeln!(
                out,
                "add element {TABLE} no-endpoint-services {{ {key} comment \"{}\" : goto reject-chain }}",
                svc.port_name_string()
            );
            continue;
        }
        let svc_chain = nft_service_chain(svc);
        let ep_chains: Vec<String> = backends
            .iter()
            .map(|b| nft_endpoint_chain(svc, b))
            .collect();
        for chain in &ep_chains {
            ensure_chain(&mut out, &mut active, chain);
        }
        ensure_chain(&mut out, &mut active, &svc_chain);
        let _ = writeln!(
            out,
            "add element {TABLE} service-ips {{ {key} : goto {svc_chain} }}"
        );
        let elements: Vec<String> = ep_chains
            .iter()
            .enumerate()
            .map(|(i, chain)| format!("{i} : goto {chain}"))
            .collect();
        let _ = writeln!(
            out,
            "add rule {TABLE} {svc_chain} numgen random mod {} vmap {{ {} }}",
            backends.len(),
            elements.join(" , ")
        );
        for (backend, chain) in backends.iter().zip(&ep_chains) {
            let _ = writeln!(
                out,
                "add rule {TABLE} {chain} ip saddr {} jump mark-for-masquerade",
                backend.ip
            );
            let _ = writeln!(
                out,
                "add rule {TABLE} {chain} meta l4proto tcp dnat to {}:{}",
                backend.ip, backend.port
            );
        }
    }
    // Stale chains are flushed now and deleted a second later (kernels before
    // 6.2 notice only late that a map element no longer references them).
    let mut newly_stale: Vec<String> = existing.difference(&active).cloned().collect();
    newly_stale.sort();
    for chain in &newly_stale {
        let _ = writeln!(out, "flush chain {TABLE} {chain}");
    }
    Sync {
        script: out,
        active,
        newly_stale,
    }
}

pub fn delete_chains_script(chains: &[String]) -> String {
    chains
        .iter()
        .map(|c| format!("delete chain {TABLE} {c}\n"))
        .collect()
}

/// kube-proxy's CleanupLeftovers: delete the table (add first so a missing
/// table is not an error).
pub fn cleanup_script() -> String {
    format!("add table {TABLE}\ndelete table {TABLE}\n")
}
