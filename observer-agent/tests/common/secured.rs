//! An aggregator secured as deployed, for tests that run the agent against
//! it: TLS from a throwaway CA, the agent's token from the double.

use std::path::PathBuf;

use aggregator::auth::tls::TlsFiles;
use aggregator::auth::{AuthSettings, TokenSettings};
use aggregator::config::Settings;
use apiserver_double::ApiServerDouble;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lab::identity;
use lab::tls::LabCa;

/// The files of one test: the store, the TLS certificate, the agent's
/// token and the CA it verifies with.
pub struct Files {
    pub dir: tempfile::TempDir,
    pub tls: lab::tls::TlsFiles,
}

impl Files {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls = LabCa::generate(&["localhost", "127.0.0.1"])
            .unwrap()
            .write(dir.path())
            .unwrap();
        Self { dir, tls }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }

    pub fn token(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// node-a in the Node list, its agent pod, and a token of that pod in
    /// the token file (what the kubelet's projected volume holds).
    pub async fn node_a_token(&self, double: &ApiServerDouble) {
        if double.get::<Node>("", "node-a").is_none() {
            double.create(&node_a()).unwrap();
        }
        let token = identity::agent_token_requested(double, "node-a", identity::AUDIENCE)
            .await
            .unwrap();
        std::fs::write(self.token(), token).unwrap();
    }
}

fn node_a() -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// `settings` with TLS from `files` and token checks of the agents'
/// ServiceAccount, as deploy/ runs the aggregator.
pub fn secured(settings: Settings, files: &Files) -> Settings {
    let agents = format!(
        "{}:{}",
        identity::NAMESPACE,
        identity::AGENT_SERVICE_ACCOUNT
    );
    Settings {
        auth: AuthSettings {
            tokens: Some(TokenSettings::new(
                identity::AUDIENCE,
                agents.parse().unwrap(),
                identity::NAMESPACE,
            )),
            tls: Some(TlsFiles {
                cert: files.tls.cert.clone(),
                key: files.tls.key.clone(),
            }),
        },
        ..settings
    }
}
