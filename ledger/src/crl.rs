//! Certificate revocation lists (`--crl FILE`): checked by rustls at every handshake (end-entity
//! certificates: a revoked node certificate fails the handshake), and kept here as a set of
//! (issuer, serial) so a reload can end the open streams of a certificate it newly revokes.

use std::collections::HashSet;
use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateRevocationListDer;
use wattd_web::tls::TlsFileError;

/// The revoked (issuer DN, serial number) pairs of every loaded CRL, raw DER bytes.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
    /// How many CRLs were loaded.
    pub crls: usize,
}

impl Revocations {
    /// Whether the certificate `der` (a client's leaf) is revoked by a loaded CRL. A certificate
    /// that does not parse is not judged here (the handshake already verified it).
    pub fn revokes(&self, der: &[u8]) -> Option<String> {
        if self.revoked.is_empty() {
            return None;
        }
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let key = (cert.issuer().as_raw().to_vec(), cert.raw_serial().to_vec());
        self.revoked
            .contains(&key)
            .then(|| cert.raw_serial_as_string())
    }

    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

/// Reads every PEM CRL in `path`: the DER lists for rustls and the revoked set. Every problem
/// names the file.
pub fn load(
    path: &Path,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, Revocations), TlsFileError> {
    let shown = path.display();
    let bad = |problem: &dyn std::fmt::Display| TlsFileError::file("--crl", path, problem);
    let ders: Result<Vec<_>, _> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect();
    let ders = ders.map_err(|e| bad(&e))?;
    if ders.is_empty() {
        return Err(bad(&"no PEM X509 CRL in it"));
    }
    let mut revoked = HashSet::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    for (i, der) in ders.iter().enumerate() {
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| bad(&format_args!("CRL {}: {e}", i + 1)))?;
        if let Some(next) = crl.next_update() {
            if next.timestamp() < now {
                tracing::warn!(
                    file = %shown,
                    crl = i + 1,
                    next_update = %next,
                    "CRL is past its nextUpdate: still applied; publish a fresh one"
                );
            }
        }
        let issuer = crl.issuer().as_raw().to_vec();
        for r in crl.iter_revoked_certificates() {
            revoked.insert((issuer.clone(), r.raw_serial().to_vec()));
        }
    }
    let crls = ders.len();
    Ok((ders, Revocations { revoked, crls }))
}
