//! kube-proxy's chain names. Real names matter: the agent must recognise a
//! real node's rules, and tests compare against names from kube-proxy's own
//! test fixtures.

use sha2::{Digest, Sha256};

use super::{Backend, ServicePort};

/// knftables.NameLengthMax (256) minus kube-proxy's longest prefix allowance (16).
const NFT_CHAIN_BASE_MAX: usize = 240;

/// RFC 4648 base32 (standard alphabet) of the SHA-256 of `input`, unpadded.
fn sha256_base32(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(digest.len() * 8 / 5 + 1);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in digest {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// kube-proxy nftables `hashAndTruncate`.
fn hash_and_truncate(name: &str) -> String {
    let mut out = format!("{}-{name}", &sha256_base32(name)[..8]);
    if out.len() > NFT_CHAIN_BASE_MAX {
        out.truncate(NFT_CHAIN_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

/// nftables mode: `service-HASH-ns/name/tcp/port`.
pub fn nft_service_chain(svc: &ServicePort) -> String {
    let base = format!("{}/{}/tcp/{}", svc.namespace, svc.name, svc.port_name);
    format!("service-{}", hash_and_truncate(&base))
}

/// nftables mode: `endpoint-HASH-ns/name/tcp/port__ip/port`.
pub fn nft_endpoint_chain(svc: &ServicePort, ep: &Backend) -> String {
    let base = format!(
        "{}/{}/tcp/{}__{}/{}",
        svc.namespace, svc.name, svc.port_name, ep.ip, ep.port
    );
    format!("endpoint-{}", hash_and_truncate(&base))
}

/// iptables modes: `KUBE-SVC-` + 16 characters of hash.
pub fn iptables_service_chain(svc: &ServicePort) -> String {
    let hash = sha256_base32(&format!("{}tcp", svc.port_name_string()));
    format!("KUBE-SVC-{}", &hash[..16])
}

/// iptables modes: `KUBE-SEP-` + 16 characters of hash.
pub fn iptables_endpoint_chain(svc: &ServicePort, ep: &Backend) -> String {
    let hash = sha256_base32(&format!(
        "{}tcp{}:{}",
        svc.port_name_string(),
        ep.ip,
        ep.port
    ));
    format!("KUBE-SEP-{}", &hash[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc1() -> ServicePort {
        ServicePort {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
        }
    }

    #[test]
    fn names_match_kube_proxy_test_fixtures() {
        let svc = svc1();
        let ep = Backend {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
        };
        // From kube-proxy's proxier_test.go fixtures.
        assert_eq!(iptables_service_chain(&svc), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            iptables_endpoint_chain(&svc, &ep),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(nft_service_chain(&svc), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            nft_endpoint_chain(&svc, &ep),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }
}
