//! PEM files and rustls client configurations, shared by the metrics endpoint, its scrape
//! client and the ledger's connections (to PostgreSQL, and its own server identity). Every error
//! names the file by the setting that gave it (`what`), as `{what} {path}: {problem}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file or TLS setting that cannot be used, naming the setting and the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TlsFileError {
    /// `{what} {path}: {problem}`: unreadable, not PEM of the expected kind, or refused.
    #[error("{what} {}: {problem}", path.display())]
    File {
        what: String,
        path: PathBuf,
        problem: String,
    },
    #[error("TLS versions: {0}")]
    Versions(rustls::Error),
    #[error("client certificate and key: {0}")]
    ClientAuth(rustls::Error),
}

impl TlsFileError {
    /// A problem of the file `path` given by the setting `what`.
    pub fn file(what: &str, path: &Path, problem: impl ToString) -> Self {
        TlsFileError::File {
            what: what.to_owned(),
            path: path.to_owned(),
            problem: problem.to_string(),
        }
    }
}

/// Every certificate of a PEM file; a file with none is an error.
pub fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsFileError::file(what, path, e))?
        .collect();
    let certs = certs.map_err(|e| TlsFileError::file(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsFileError::file(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// A TLS 1.3/1.2 client on ring that trusts the CAs of `ca` (named `ca_what` in errors) and,
/// with `cert_key` (certificate chain, key), authenticates with that certificate.
pub fn client_config(
    ca: &Path,
    ca_what: &str,
    cert_key: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsFileError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca, ca_what)? {
        roots
            .add(c)
            .map_err(|e| TlsFileError::file(ca_what, ca, e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(TlsFileError::Versions)?
    .with_root_certificates(roots);
    match cert_key {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = load_certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| TlsFileError::file("client key", key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsFileError::ClientAuth)
        }
    }
}
