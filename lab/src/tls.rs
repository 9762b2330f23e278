//! A throwaway certificate authority for the lab and the tests: a CA and a
//! server certificate for the aggregator, written as the files a
//! `kubernetes.io/tls` Secret and a CA ConfigMap would mount.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the lab's certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One CA and the server certificate it signed, PEM.
#[derive(Clone, Debug)]
pub struct LabCa {
    /// What agents and prestop-check verify against.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where [`LabCa::write`] put the files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    /// `tls.crt` and `tls.key`, as in a `kubernetes.io/tls` Secret.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LabCa {
    /// A new CA and a server certificate for `names` (DNS names or IP
    /// addresses).
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "prestop-observer lab CA");
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "prestop-aggregator");
        let cert_pem = params.signed_by(&key, &issuer)?.pem();
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.crt`, `tls.crt` and `tls.key` under `dir`.
    pub fn write(&self, dir: &Path) -> Result<TlsFiles, TlsError> {
        let write = |name: &str, body: &str| {
            let path = dir.join(name);
            std::fs::write(&path, body).map_err(|source| TlsError::Write {
                path: path.clone(),
                source,
            })?;
            Ok::<_, TlsError>(path)
        };
        Ok(TlsFiles {
            ca: write("ca.crt", &self.ca_pem)?,
            cert: write("tls.crt", &self.cert_pem)?,
            key: write("tls.key", &self.key_pem)?,
        })
    }
}
