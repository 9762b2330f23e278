//! The aggregator's TLS certificate (a mounted Secret: `tls.crt`, `tls.key`).

use std::path::{Path, PathBuf};

use tonic::transport::{Identity, ServerTlsConfig};

#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
}

fn read(what: &'static str, path: &Path, expected: &'static str) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    // rustls would only say "no keys"/"bad certificate" at the first
    // handshake; a wrong mount fails at start instead.
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(pem)
}

impl TlsFiles {
    /// The gRPC server's TLS configuration from the files.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read("--tls-cert-file", &self.cert, "certificate")?;
        let key = read("--tls-key-file", &self.key, "private key")?;
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
    }
}
