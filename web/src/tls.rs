//! PEM files and rustls client configurations, shared by the metrics endpoint, its scrape
//! client and the ledger's connections (to PostgreSQL, and its own server identity). Every error
//! names the file by the setting that gave it (`what`), as `{what} {path}: {problem}`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate of a PEM file; a file with none is an error.
pub fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// A TLS 1.3/1.2 client on ring that trusts the CAs of `ca` (named `ca_what` in errors) and,
/// with `cert_key` (certificate chain, key), authenticates with that certificate.
pub fn client_config(
    ca: &Path,
    ca_what: &str,
    cert_key: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca, ca_what)? {
        roots
            .add(c)
            .map_err(|e| format!("{ca_what} {}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| format!("TLS versions: {e}"))?
    .with_root_certificates(roots);
    match cert_key {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = load_certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("client key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate and key: {e}"))
        }
    }
}
