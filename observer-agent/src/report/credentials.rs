//! What the agent shows the aggregator: its projected ServiceAccount token
//! on every call, and the CA it verifies the aggregator's certificate with.

use std::path::{Path, PathBuf};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig};

#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The projected token file (the kubelet rewrites it before expiry);
    /// `None` sends no token (an aggregator with `--insecure-no-auth`).
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the aggregator's certificate must chain to;
    /// needed for an `https://` aggregator URL.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading --ca-file {path}: {source}")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the aggregator URL {0:?} is https: --ca-file names the CA to verify it with")]
    NoCa(String),
}

impl Credentials {
    /// The TLS settings for `url`: none for `http://`, the CA for `https://`.
    pub fn tls(&self, url: &str) -> Result<Option<ClientTlsConfig>, CredentialsError> {
        if !url.starts_with("https://") {
            return Ok(None);
        }
        let path = self
            .ca_file
            .as_ref()
            .ok_or_else(|| CredentialsError::NoCa(url.to_owned()))?;
        let pem = std::fs::read(path).map_err(|source| CredentialsError::Ca {
            path: path.clone(),
            source,
        })?;
        Ok(Some(
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        ))
    }

    pub fn bearer(&self) -> Bearer {
        Bearer {
            token_file: self.token_file.clone(),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call, reading the token
/// file each time: the kubelet replaces it (atomically, through a symlink
/// swap) well before it expires, and a stream is authenticated when it
/// opens, so every new call and stream carries the current token.
#[derive(Clone, Debug)]
pub struct Bearer {
    token_file: Option<PathBuf>,
}

fn read_token(path: &Path) -> Result<AsciiMetadataValue, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("reading --token-file {}: {e}", path.display()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(format!("--token-file {} is empty", path.display()));
    }
    format!("Bearer {token}").parse().map_err(|_| {
        format!(
            "--token-file {} holds characters a token cannot have",
            path.display()
        )
    })
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(path) = &self.token_file {
            let value = read_token(path).map_err(tonic::Status::unauthenticated)?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_is_read_at_each_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let mut bearer = Credentials {
            token_file: Some(path.clone()),
            ca_file: None,
        }
        .bearer();
        let missing = bearer.call(tonic::Request::new(())).unwrap_err();
        assert!(
            missing.message().contains("reading --token-file"),
            "{missing:?}"
        );
        std::fs::write(&path, "first\n").unwrap();
        let r = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer first");
        // The kubelet rotated it.
        std::fs::write(&path, "second").unwrap();
        let r = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer second");
    }

    #[test]
    fn https_needs_a_ca() {
        let none = Credentials::default();
        assert!(none.tls("http://agg:50051").unwrap().is_none());
        assert!(matches!(
            none.tls("https://agg:50051"),
            Err(CredentialsError::NoCa(_))
        ));
    }
}
