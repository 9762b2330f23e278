//! The ingress router: real nginx in a pod, proxying to the Service's pod
//! IPs from an `upstream` block (as ingress-nginx and most ingress
//! controllers do, bypassing the ClusterIP). Its controller rewrites the
//! upstreams and runs `nginx -s reload` an injected delay after each
//! endpoint turned not ready; a client on another node sends through it.

use std::{net::SocketAddrV4, path::Path, sync::Arc};

use observer_proto::UnixNanos;

use super::{
    Choice, Router, RouterError, RoutersConfig, Traffic,
    follow::{self, Apply},
    workload,
};
use crate::{
    delay::DelayDistribution,
    kube::{ApiServer, KubeError, workload_pod_object},
    kubeproxy::Backend,
    nginx::{self, Nginx},
    scenario::Lab,
};

pub const NAMESPACE: &str = "ingress-nginx";
pub const OWNER: &str = "ingress-nginx-controller";
pub const PORT: u16 = 80;

/// The `http` block: every ready pod as an upstream server. Passive health
/// checks are off (`max_fails=0`, ingress-nginx's default), and a refused
/// upstream is not retried on another (`proxy_next_upstream off`, as nginx
/// treats every non-idempotent request): the client sees each request the
/// router sent to a pod that stopped listening.
fn http_block(backends: &[Backend]) -> String {
    let mut servers: String = backends
        .iter()
        .map(|b| format!("    server {}:{} max_fails=0;\n", b.ip, b.port))
        .collect();
    if servers.is_empty() {
        // nginx needs one server; this one answers 502 as "no backend".
        servers = "    server 127.0.0.1:1 down;\n".into();
    }
    format!(
        "  upstream web {{\n{servers}  }}\n  server {{\n    listen {PORT};\n    location / {{\n      \
         proxy_pass http://web;\n      proxy_next_upstream off;\n      proxy_connect_timeout 1s;\n    }}\n  }}\n"
    )
}

struct Upstreams {
    nginx: Arc<Nginx>,
}

impl Apply for Upstreams {
    async fn apply(&mut self, backends: &[Backend]) -> Result<UnixNanos, String> {
        let conf = nginx::config(self.nginx.dir(), &http_block(backends));
        self.nginx.reload(&conf).await.map_err(|e| e.to_string())
    }
}

/// Starts nginx in a new pod on node `node` (registered in the API as
/// `ingress-nginx/ingress-nginx-controller`), its controller, and the
/// route of its client on node `client_node`.
pub async fn start(
    lab: &Lab,
    api: &ApiServer,
    (node, client_node): (usize, usize),
    delay: DelayDistribution,
    config: &RoutersConfig,
    dir: &Path,
) -> Result<Router, RouterError> {
    let net = lab.cluster.add_pod(node, "ingress")?;
    let info = &lab.nodes()[node];
    api.double()
        .apply(&workload_pod_object(NAMESPACE, OWNER, info, net.ip))
        .map_err(KubeError::from)?;
    let services = lab.subscribe();
    let dir = dir.join("ingress-nginx");
    let initial = nginx::config(&dir, &http_block(&follow::ready(&services.borrow())));
    let nginx = Arc::new(Nginx::start(&net.ns, &dir, &initial).await?);
    let router = workload(NAMESPACE, OWNER, &info.name);
    let (task, drops) = follow::spawn(
        &router.name,
        services,
        delay,
        config.seed.wrapping_mul(7919).wrapping_add(1),
        Upstreams {
            nginx: nginx.clone(),
        },
    );
    Ok(Router {
        info: router,
        choice: Choice::Ingress,
        drops,
        traffic: Traffic {
            netns: lab.cluster.node(client_node)?.ns.path(),
            target: SocketAddrV4::new(net.ip, PORT).into(),
        },
        max_lag: delay.max(),
        _owned: Box::new((task, nginx, net)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real nginx accepts the configuration the controller writes, with
    /// backends and with none (`cargo xtask setup` installs nginx).
    #[test]
    fn nginx_accepts_the_upstream_configuration() {
        let dir = std::env::temp_dir().join(format!("lab-ingress-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let backends = [
            Backend {
                ip: "10.244.0.2".parse().unwrap(),
                port: 8080,
            },
            Backend {
                ip: "10.244.1.3".parse().unwrap(),
                port: 8080,
            },
        ];
        for list in [&backends[..], &[]] {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx::config(&dir, &http_block(list))).unwrap();
            let out = std::process::Command::new("/usr/sbin/nginx")
                .arg("-t")
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .output()
                .expect("nginx (cargo xtask setup installs it)");
            assert!(
                out.status.success(),
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&conf).unwrap()
            );
        }
        let rendered = http_block(&backends);
        assert!(rendered.contains("server 10.244.1.3:8080 max_fails=0;"));
        assert!(rendered.contains("proxy_next_upstream off;"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
