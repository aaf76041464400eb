//! Where and how the ledger connects to PostgreSQL: the store URL as libpq users write it, with
//! the parameters tokio-postgres does not implement read here.
//!
//! ```text
//! postgres://wattd@db1:5432,db2:5432/wattd?target_session_attrs=read-write
//!     &sslmode=verify-full&sslrootcert=/etc/wattd-ledger/pg-ca.pem
//!     [&sslcert=client.pem&sslkey=client.key] [&passfile=/run/credentials/pgpass]
//! ```
//!
//! - Several hosts: tried in order; with `target_session_attrs=read-write` a standby is passed
//!   over, so after a failover new connections find the promoted server.
//! - `sslmode=verify-full` (TLS 1.2 or 1.3 through rustls; the server's certificate must chain
//!   to `sslrootcert` and name the host). `disable` or no `sslmode` is plain TCP, accepted only
//!   when every host is on loopback or a Unix socket: the platform's policy asks TLS between
//!   services. `allow`, `prefer`, `require` and `verify-ca` are refused (none checks that the
//!   server is the one named).
//! - The password is never in the URL: it is read from the password file (`passfile`, else
//!   `PGPASSFILE`, else `~/.pgpass`) at every new connection, so a rotated password takes effect
//!   at the next reconnect without a restart.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};

use super::StoreError;

/// The parameters read here and removed before tokio-postgres parses the rest.
const OURS: [&str; 5] = ["sslmode", "sslrootcert", "sslcert", "sslkey", "passfile"];

/// A parsed, validated PostgreSQL store URL.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    passfile: Option<PathBuf>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a PostgreSQL store URL is refused. Each names the parameter, host or file at fault, and
/// none repeats the URL (it could hold a password).
#[derive(Debug, thiserror::Error)]
pub enum PgUrlError {
    #[error("{value:?}: a % not followed by two hex digits")]
    BadPercent { value: String },
    #[error("{value:?}: not UTF-8 once decoded")]
    NotUtf8 { value: String },
    #[error("{0} is given twice")]
    Repeated(String),
    #[error("not a PostgreSQL URL: {0}")]
    Syntax(#[source] tokio_postgres::Error),
    /// Not echoed: the message would print the password.
    #[error(
        "the PostgreSQL URL holds a password, which every local user can read in the process \
         list: put it in the password file instead (passfile=, PGPASSFILE, else ~/.pgpass: \
         host:port:database:user:password, mode 600)"
    )]
    PasswordInUrl,
    #[error(
        "host {0:?} is not on loopback: connections to PostgreSQL between hosts need TLS \
         (sslmode=verify-full&sslrootcert=CA.pem)"
    )]
    HostNotLoopback(String),
    #[error(
        "hostaddr {0} is not on loopback: connections to PostgreSQL between hosts need TLS \
         (sslmode=verify-full&sslrootcert=CA.pem)"
    )]
    HostaddrNotLoopback(IpAddr),
    #[error("no host: name the server (a loopback address, or a host with sslmode=verify-full)")]
    NoHost,
    #[error("{0} is given without sslmode=verify-full")]
    TlsFileWithoutTls(&'static str),
    #[error(
        "sslmode=verify-full needs sslrootcert=CA.pem (the CA the server's certificate must \
         chain to)"
    )]
    NoRootCert,
    #[error(
        "sslmode={0} does not check that the server is the host named; use sslmode=verify-full \
         with sslrootcert (or disable, on loopback only)"
    )]
    WeakSslMode(String),
    #[error("sslmode={0:?} is not one of disable, verify-full")]
    UnknownSslMode(String),
    #[error("sslcert and sslkey go together")]
    CertWithoutKey,
    /// A certificate or key file named by the URL (the message names the parameter and file).
    #[error(transparent)]
    TlsFile(wattd_web::tls::TlsFileError),
}

fn percent_decode(s: &str) -> Result<String, PgUrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PgUrlError::BadPercent {
                    value: s.to_owned(),
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgUrlError::NotUtf8 {
        value: s.to_owned(),
    })
}

fn is_loopback(h: &Host) -> bool {
    match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

impl PgTarget {
    /// Parses `url`, reading the CA and client certificate it names; every problem is named.
    pub fn parse(url: &str) -> Result<PgTarget, PgUrlError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut ours = std::collections::BTreeMap::new();
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if OURS.contains(&k) {
                if ours.insert(k, percent_decode(v)?).is_some() {
                    return Err(PgUrlError::Repeated(k.to_owned()));
                }
            } else {
                rest.push(pair);
            }
        }
        let their_url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config: tokio_postgres::Config = their_url.parse().map_err(PgUrlError::Syntax)?;
        if config.get_password().is_some() {
            return Err(PgUrlError::PasswordInUrl);
        }
        let tls = match ours.get("sslmode").map(String::as_str) {
            None | Some("disable") => {
                if let Some(h) = config.get_hosts().iter().find(|h| !is_loopback(h)) {
                    return Err(PgUrlError::HostNotLoopback(match h {
                        Host::Tcp(name) => name.clone(),
                        Host::Unix(path) => path.display().to_string(),
                    }));
                }
                // tokio-postgres connects to hostaddr when it is given, whatever the host says.
                if let Some(a) = config.get_hostaddrs().iter().find(|a| !a.is_loopback()) {
                    return Err(PgUrlError::HostaddrNotLoopback(*a));
                }
                if config.get_hosts().is_empty() {
                    return Err(PgUrlError::NoHost);
                }
                for k in ["sslrootcert", "sslcert", "sslkey"] {
                    if ours.contains_key(k) {
                        return Err(PgUrlError::TlsFileWithoutTls(k));
                    }
                }
                None
            }
            Some("verify-full") => {
                let Some(ca) = ours.get("sslrootcert") else {
                    return Err(PgUrlError::NoRootCert);
                };
                config.ssl_mode(SslMode::Require);
                Some(Arc::new(client_tls(
                    Path::new(ca),
                    ours.get("sslcert").map(Path::new),
                    ours.get("sslkey").map(Path::new),
                )?))
            }
            Some(m @ ("allow" | "prefer" | "require" | "verify-ca")) => {
                return Err(PgUrlError::WeakSslMode((*m).to_owned()))
            }
            Some(m) => return Err(PgUrlError::UnknownSslMode(m.to_owned())),
        };
        // A dead server or a silently dropped connection must fail a commit (the stream gets
        // UNAVAILABLE and the node retries), not hang it while it holds a pool slot. With
        // several hosts, the timeout is per host.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        Ok(PgTarget {
            config,
            tls,
            passfile: ours.get("passfile").map(PathBuf::from),
        })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection to the first host that takes it (and, with
    /// `target_session_attrs=read-write`, is a primary). The password file is read now.
    pub async fn connect(&self) -> Result<Client, StoreError> {
        let mut config = self.config.clone();
        if let Some(password) = self.password() {
            config.password(password);
        }
        Ok(match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                drive(connection);
                client
            }
            Some(tls) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = config.connect(make).await?;
                drive(connection);
                client
            }
        })
    }

    /// The password file's entry for the first host that has one.
    fn password(&self) -> Option<String> {
        let path = self.passfile.clone().or_else(super::pgpass::location)?;
        let user = self.config.get_user()?;
        let database = self.config.get_dbname().unwrap_or(user);
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .find_map(|(i, h)| {
                let host = match h {
                    Host::Tcp(h) => h.clone(),
                    Host::Unix(_) => "localhost".to_owned(),
                };
                // One port for every host, or one per host (libpq's rule); 5432 by default.
                let port = ports
                    .get(i)
                    .or_else(|| ports.first())
                    .copied()
                    .unwrap_or(5432);
                super::pgpass::password_for(&path, &host, port, database, user)
            })
    }
}

/// Runs a connection's protocol task until the connection ends.
fn drive(
    connection: impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %super::postgres::describe(&e), "postgres connection closed");
        }
    });
}

fn client_tls(
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<rustls::ClientConfig, PgUrlError> {
    let cert_key = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => return Err(PgUrlError::CertWithoutKey),
    };
    wattd_web::tls::client_config(ca, "sslrootcert", cert_key).map_err(PgUrlError::TlsFile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_parameters_are_read_and_the_rest_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let ca = wattd_tests::tls::TestCa::new(dir.path(), "pg");
        let url = format!(
            "postgres://wattd@db1:5432,db2:5433/wattd?target_session_attrs=read-write&sslmode=verify-full&sslrootcert={}&passfile=%2Frun%2Fpgpass",
            ca.ca_pem.display()
        );
        let t = PgTarget::parse(&url).unwrap();
        assert!(t.is_tls());
        assert_eq!(t.passfile.as_deref(), Some(Path::new("/run/pgpass")));
        assert_eq!(t.config.get_hosts().len(), 2);
        assert_eq!(t.config.get_ports(), &[5432, 5433]);
        assert_eq!(
            t.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn plain_connections_leave_loopback_only() {
        assert!(!PgTarget::parse("postgres://u@127.0.0.1:5432/db")
            .unwrap()
            .is_tls());
        assert!(PgTarget::parse("postgres://u@localhost,[::1]:5432/db?sslmode=disable").is_ok());
        let e = PgTarget::parse("postgres://u@db.internal:5432/db")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not on loopback") && e.contains("verify-full"),
            "{e}"
        );
        let e = PgTarget::parse("postgres://u@127.0.0.1,10.0.0.2/db?sslmode=disable")
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.2"), "{e}");
        let e = PgTarget::parse("postgres://u@localhost/db?hostaddr=10.0.0.5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostaddr 10.0.0.5"), "{e}");
        assert!(PgTarget::parse("postgres://u@localhost/db?hostaddr=127.0.0.1").is_ok());
    }

    #[test]
    fn weak_or_incomplete_tls_settings_are_refused() {
        for (url, want) in [
            (
                "postgres://u@h/db?sslmode=require",
                "sslmode=require does not check",
            ),
            (
                "postgres://u@h/db?sslmode=verify-ca",
                "sslmode=verify-ca does not check",
            ),
            (
                "postgres://u@h/db?sslmode=bogus",
                "is not one of disable, verify-full",
            ),
            ("postgres://u@h/db?sslmode=verify-full", "needs sslrootcert"),
            (
                "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert /nonexistent/ca.pem",
            ),
            (
                "postgres://u@127.0.0.1/db?sslrootcert=/x",
                "without sslmode=verify-full",
            ),
            (
                "postgres://u@127.0.0.1/db?sslmode=disable&sslmode=disable",
                "given twice",
            ),
            ("postgres://u@127.0.0.1/db?passfile=%zz", "hex digits"),
            ("postgres://u:pw@127.0.0.1/db", "password file"),
        ] {
            let e = PgTarget::parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains(":pw@"), "{e}");
        }
    }
}
