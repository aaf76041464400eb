//! The server's TLS: the node and reader configurations (rustls on ring, TLS 1.2 minimum,
//! client certificates verified against the CA and the enrolment list), and their reload when
//! the certificate, CRL or enrolment files change.

use super::*;

/// The rustls configuration of the query port: the same server certificate, client
/// certificates required and issued by the readers' CA.
pub fn reader_tls_config(
    cert: &Path,
    key: &Path,
    reader_ca: &Path,
) -> Result<ServerConfig, Vec<String>> {
    let mut problems = Vec::new();
    let (certs, key, roots) =
        identity_and_roots(cert, key, reader_ca, "--reader-ca", &mut problems);
    let (Some(certs), Some(key)) = (certs, key) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| vec![format!("--reader-ca {}: {e}", reader_ca.display())])?;
    server_config(provider, verifier, certs, key)
}

/// The server's certificate chain and key, and the roots its clients' certificates must chain
/// to (`ca`, named `flag` in messages); every problem is pushed to `problems`.
fn identity_and_roots(
    cert: &Path,
    key: &Path,
    ca: &Path,
    flag: &str,
    problems: &mut Vec<String>,
) -> (
    Option<Vec<CertificateDer<'static>>>,
    Option<PrivateKeyDer<'static>>,
    RootCertStore,
) {
    let certs = wattd_web::tls::load_certs(cert, "--cert")
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| problems.push(format!("--key {}: {e}", key.display())))
        .ok();
    let mut roots = RootCertStore::empty();
    if let Ok(cas) = wattd_web::tls::load_certs(ca, flag).map_err(|e| problems.push(e.to_string()))
    {
        for c in cas {
            if let Err(e) = roots.add(c) {
                problems.push(format!("{flag} {}: {e}", ca.display()));
            }
        }
    }
    (certs, key, roots)
}

/// TLS 1.3 and 1.2 on ring, ALPN h2, client certificates checked by `verifier`.
fn server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, Vec<String>> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![format!("TLS versions: {e}")])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| vec![format!("--cert/--key: {e}")])?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The files the TLS configuration is read from, again at every reload.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
}

/// The CRLs' revoked certificates, swapped by a reload.
pub type SharedRevocations = Arc<RwLock<Arc<Revocations>>>;

/// The rustls server configuration: TLS 1.3 and 1.2 on ring, client certificates required
/// (and, with `--crl`, not revoked), and the CRLs' revoked set.
pub fn tls_config(
    files: &TlsFiles,
    gate: &EnrolmentGate,
) -> Result<(ServerConfig, Revocations), Vec<String>> {
    let TlsFiles {
        cert,
        key,
        client_ca,
        crl,
    } = files;
    let mut problems = Vec::new();
    let crls = match crl {
        Some(path) => crate::crl::load(path)
            .map_err(|e| problems.push(e.to_string()))
            .ok(),
        None => Some((Vec::new(), Revocations::default())),
    };
    let (certs, key, roots) =
        identity_and_roots(cert, key, client_ca, "--client-ca", &mut problems);
    let (Some(certs), Some(key), Some((crls, revocations))) = (certs, key, crls) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        // Node certificates are checked against the CRLs; a CA with no CRL in the file (an
        // intermediate, a second CA) is not refused for it.
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| vec![format!("--client-ca {}: {e}", client_ca.display())])?;
    let verifier = Arc::new(EnrolledClientVerifier {
        inner: verifier,
        gate: gate.clone(),
    });
    Ok((server_config(provider, verifier, certs, key)?, revocations))
}

/// What the TLS handshake checks a client certificate's node against: the current enrolment
/// (shared with reloads), and the counter of certificates refused for naming nobody enrolled.
#[derive(Clone, Debug)]
pub struct EnrolmentGate {
    pub enrolment: Arc<RwLock<Arc<Enrolment>>>,
    pub metrics: Arc<Metrics>,
}

/// The CA's verdict (chain, validity, CRL), then the enrolment's: a certificate whose CN names
/// no enrolled node fails the handshake itself, so it never gets past the TLS layer (and a
/// slot is held only for the handshake).
#[derive(Debug)]
struct EnrolledClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    gate: EnrolmentGate,
}

impl rustls::server::danger::ClientCertVerifier for EnrolledClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let enrolled = crate::service::cert_common_name(end_entity.as_ref())
            .ok()
            .is_some_and(|cn| {
                let e = self
                    .gate
                    .enrolment
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                e.node(&cn).is_some()
            });
        if !enrolled {
            self.gate
                .metrics
                .inc(&self.gate.metrics.connections_unenrolled);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How long changes to the enrolment directory must be quiet before the watch reloads it.
pub const WATCH_QUIET: Duration = Duration::from_millis(200);

/// Why a reload was refused (the current configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Every problem found in the TLS files, each naming its flag and file.
    #[error("{}", .0.join("; "))]
    Tls(Vec<String>),
    #[error(transparent)]
    Enrolment(#[from] crate::enrol::EnrolmentError),
    /// A copy in progress, or a directory swapped in empty, would otherwise revoke every node.
    #[error("{}: no node would be enrolled; the current enrolment stays", dir.display())]
    NoNode { dir: PathBuf },
}

/// Handle to re-read the enrolment directory (SIGHUP).
#[derive(Clone)]
pub struct EnrolmentReload {
    pub(super) dir: PathBuf,
    pub(super) enrolment: Arc<RwLock<Arc<Enrolment>>>,
    pub(super) changed: Arc<watch::Sender<u64>>,
    pub(super) acceptor: Arc<RwLock<TlsAcceptor>>,
    pub(super) tls_files: TlsFiles,
    pub(super) revocations: SharedRevocations,
    pub(super) gate: EnrolmentGate,
    /// Held across a reload's read and swap: SIGHUP and the directory watch never interleave
    /// (an older read swapped in last would bring a removed node back).
    pub(super) serial: Arc<std::sync::Mutex<()>>,
    /// The query port's acceptor and reader CA, re-read with the certificate and key.
    pub(super) query: Option<(Arc<RwLock<TlsAcceptor>>, PathBuf)>,
}

impl std::fmt::Debug for EnrolmentReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentReload")
            .field("dir", &self.dir)
            .field("tls_files", &self.tls_files)
            .finish_non_exhaustive()
    }
}

impl EnrolmentReload {
    /// Re-reads the directory. New streams see the new enrolment; an open stream whose node
    /// was removed, or whose keys changed, is ended at once (PERMISSION_DENIED, `revoked`).
    /// Re-reads `--cert`, `--key`, `--client-ca` and `--crl` (renewed certificates, a rotated
    /// CA, a new CRL): new connections use them; an open stream whose client certificate the
    /// new CRL revokes is ended at once (`revoked`). On any problem the current ones stay.
    /// Returns how many certificates the CRLs revoke.
    pub fn reload_tls(&self) -> Result<usize, ReloadError> {
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let (tls, revocations) =
            tls_config(&self.tls_files, &self.gate).map_err(ReloadError::Tls)?;
        let query_tls = match &self.query {
            Some((_, reader_ca)) => Some(
                reader_tls_config(&self.tls_files.cert, &self.tls_files.key, reader_ca)
                    .map_err(ReloadError::Tls)?,
            ),
            None => None,
        };
        if let (Some((acceptor, _)), Some(t)) = (&self.query, query_tls) {
            *acceptor.write().unwrap_or_else(|p| p.into_inner()) = TlsAcceptor::from(Arc::new(t));
        }
        let revoked = revocations.len();
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) =
            TlsAcceptor::from(Arc::new(tls));
        *self.revocations.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revocations);
        self.changed.send_modify(|g| *g += 1);
        Ok(revoked)
    }

    /// Watches the enrolment directory (inotify) and reloads it, as SIGHUP does, once changes
    /// to it have been quiet for [`WATCH_QUIET`]: a removed or changed file revokes without a
    /// signal. Runs until `stop`; if the directory cannot be watched it says so and leaves
    /// reloads to SIGHUP.
    pub async fn watch(self, mut stop: watch::Receiver<bool>) {
        use inotify::{EventMask, Inotify, WatchMask};
        use tokio_stream::StreamExt as _;
        let mut warned = false;
        loop {
            let watched = Inotify::init().and_then(|i| {
                i.watches().add(
                    &self.dir,
                    WatchMask::CREATE
                        | WatchMask::DELETE
                        | WatchMask::CLOSE_WRITE
                        | WatchMask::MOVED_TO
                        | WatchMask::MOVED_FROM
                        | WatchMask::ATTRIB
                        | WatchMask::DELETE_SELF
                        | WatchMask::MOVE_SELF,
                )?;
                i.into_event_stream([0u8; 4096])
            });
            let mut events = match watched {
                Ok(e) => {
                    if warned {
                        tracing::info!(dir = %self.dir.display(), "watching the enrolment directory again");
                        // It may have changed while it could not be watched.
                        self.reload_logged("enrolment directory back");
                        warned = false;
                    }
                    e
                }
                Err(error) => {
                    if !warned {
                        tracing::warn!(dir = %self.dir.display(), %error, "cannot watch the enrolment directory: retrying every 5 s; SIGHUP reloads it meanwhile");
                        warned = true;
                    }
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    }
                }
            };
            // Events until the directory itself goes (deleted, moved, replaced).
            let mut gone = false;
            while !gone {
                let first = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    e = events.next() => e,
                };
                let mut note = |e: &inotify::EventOwned| {
                    gone |= e.mask.intersects(
                        EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED,
                    );
                };
                match first {
                    Some(Ok(e)) => note(&e),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "enrolment directory watch failed: watching it again");
                        break;
                    }
                    None => break,
                }
                // Let a burst (an editor's write and rename, several files) settle first.
                while let Ok(Some(Ok(e))) = tokio::time::timeout(WATCH_QUIET, events.next()).await {
                    note(&e);
                }
                self.reload_logged("enrolment directory changed");
            }
            if gone {
                tracing::warn!(dir = %self.dir.display(), "the enrolment directory was moved or deleted: watching the path again");
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok((nodes, keys)) => tracing::info!(nodes, keys, "{why}: reloaded"),
            Err(error) => {
                tracing::error!(%error, "{why} but does not load: the previous enrolment stays");
            }
        }
    }

    /// Re-reads the enrolment directory. A directory that would enrol no node at all is
    /// refused (a copy in progress, or one swapped in empty, would otherwise revoke every
    /// node): to unenrol the last node, restart the ledger.
    pub fn reload(&self) -> Result<(usize, usize), ReloadError> {
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let e = Enrolment::load(&self.dir)?;
        if e.node_count() == 0 {
            return Err(ReloadError::NoNode {
                dir: self.dir.clone(),
            });
        }
        let counts = (e.node_count(), e.key_count());
        *self.enrolment.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(e);
        self.changed.send_modify(|g| *g += 1);
        Ok(counts)
    }
}
