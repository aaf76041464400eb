//! The web configuration file: the format of the Prometheus exporter toolkit
//! (<https://prometheus.io/docs/prometheus/latest/configuration/https/>), so an operator who
//! secures node_exporter secures wattd the same way. The subset read:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.pem          # relative paths are relative to this file
//!   key_file: server.key           # must not be readable by others
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   client_ca_file: clients-ca.pem
//!   min_version: TLS12             # TLS12 (default) or TLS13
//!   max_version: TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10)
//! ```
//!
//! The YAML is read with yaml-rust2 (pure Rust; no libyaml, translated or not), aliases refused.
//! Any other key is refused by name (the toolkit's `cipher_suites`, `curve_preferences`,
//! `http_server_config`, ... are not implemented, and silently ignoring a security setting is
//! worse than refusing to start). The client authentication types that ask for a certificate
//! without verifying it (`RequestClientCert`, `RequireAnyClientCert`) are refused, and so are
//! TLS versions below 1.2 (the platform's policy).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use yaml_rust2::parser::{Event, EventReceiver, Parser};
use yaml_rust2::{Yaml, YamlLoader};

use crate::auth::BasicAuth;

/// Largest web configuration file read (it holds a few paths and hashes).
const FILE_MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, Default)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
}

/// Which client certificates the TLS handshake asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// None asked for.
    None,
    /// Verified against `client_ca_file` when the client presents one.
    VerifyIfGiven,
    /// Required, and verified against `client_ca_file`.
    Required,
}

/// A loaded, validated web configuration.
#[derive(Clone)]
pub struct WebConfig {
    path: PathBuf,
    tls: Option<Arc<ServerConfig>>,
    client_auth: ClientAuth,
    auth: Option<Arc<BasicAuth>>,
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .field("client_auth", &self.client_auth)
            .field("basic_auth_users", &self.auth.as_ref().map(|a| a.users()))
            .finish()
    }
}

/// Why a web configuration cannot be used: every problem found, each naming its key or file.
#[derive(Debug, thiserror::Error)]
#[error("web configuration {}: {}", path.display(), problems.join("; "))]
pub struct WebConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl WebConfig {
    /// Reads and validates `path`, loading the certificates and keys it names.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let fail = |problems: Vec<String>| WebConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let text = read_bounded(path).map_err(|e| fail(vec![e]))?;
        let raw = parse_yaml(&text).map_err(fail)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        let (tls, client_auth) = match raw.tls_server_config {
            None => (None, ClientAuth::None),
            Some(t) => match tls_config(base, t, &mut problems) {
                Some((c, a)) => (Some(Arc::new(c)), a),
                None => (None, ClientAuth::None),
            },
        };
        let auth = match raw.basic_auth_users {
            None => None,
            Some(users) if users.is_empty() => None,
            Some(users) => match BasicAuth::new(users) {
                Ok(a) => Some(Arc::new(a)),
                Err(mut p) => {
                    problems.append(&mut p);
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        Ok(WebConfig {
            path: path.to_path_buf(),
            tls,
            client_auth,
            auth,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether every request that gets an answer is authenticated: basic auth is configured, or
    /// the TLS handshake requires a verified client certificate. Only then may an endpoint serve
    /// what belongs to one tenant.
    pub fn authenticates(&self) -> bool {
        self.auth.is_some() || self.client_auth == ClientAuth::Required
    }

    /// The TLS configuration, when the endpoint serves HTTPS.
    pub fn tls(&self) -> Option<&Arc<ServerConfig>> {
        self.tls.as_ref()
    }

    /// Which client certificates the handshake asks for.
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth
    }

    /// The basic-auth checker, when users are configured.
    pub fn basic_auth(&self) -> Option<&Arc<BasicAuth>> {
        self.auth.as_ref()
    }

    /// One line for the log: what the endpoint requires.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (&self.tls, self.client_auth) {
            (None, _) => parts.push("plain HTTP".to_owned()),
            (Some(_), ClientAuth::None) => parts.push("TLS".to_owned()),
            (Some(_), ClientAuth::VerifyIfGiven) => {
                parts.push("TLS (client certificates verified when given)".to_owned())
            }
            (Some(_), ClientAuth::Required) => {
                parts.push("TLS (client certificates required)".to_owned())
            }
        }
        if let Some(a) = &self.auth {
            parts.push(format!("basic auth ({} users)", a.users().len()));
        }
        parts.join(", ")
    }
}

/// Counts the aliases in a YAML text (the loader would copy the node each names: a few hundred
/// bytes of nested aliases can expand to gigabytes).
#[derive(Default)]
struct Aliases(usize);

impl EventReceiver for Aliases {
    fn on_event(&mut self, ev: Event) {
        if matches!(ev, Event::Alias(_)) {
            self.0 += 1;
        }
    }
}

fn as_str<'a>(v: &'a Yaml, key: &str, problems: &mut Vec<String>) -> Option<&'a str> {
    match v {
        Yaml::String(s) => Some(s),
        Yaml::Null => None,
        _ => {
            problems.push(format!("{key}: must be a string"));
            None
        }
    }
}

/// The toolkit's YAML, every key known (the rest refused by name), every value a string.
fn parse_yaml(text: &str) -> Result<RawWebConfig, Vec<String>> {
    let mut aliases = Aliases::default();
    Parser::new_from_str(text)
        .load(&mut aliases, true)
        .map_err(|e| vec![e.to_string()])?;
    if aliases.0 > 0 {
        return Err(vec!["YAML aliases (*name) are not accepted here".into()]);
    }
    let docs = YamlLoader::load_from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut raw = RawWebConfig::default();
    let root = match docs.as_slice() {
        // The toolkit treats an empty file as "nothing configured".
        [] | [Yaml::Null] => return Ok(raw),
        [Yaml::Hash(h)] => h,
        [_] => return Err(vec!["the document must be a mapping".into()]),
        _ => return Err(vec!["one YAML document expected".into()]),
    };
    let mut problems = Vec::new();
    for (k, v) in root {
        match k.as_str() {
            Some("tls_server_config") => match v {
                Yaml::Null => {}
                Yaml::Hash(t) => {
                    let mut tls = RawTls::default();
                    for (k, v) in t {
                        let name = k.as_str().unwrap_or("?");
                        let key = format!("tls_server_config.{name}");
                        let slot = match name {
                            "cert_file" => &mut tls.cert_file,
                            "key_file" => &mut tls.key_file,
                            "client_auth_type" => &mut tls.client_auth_type,
                            "client_ca_file" => &mut tls.client_ca_file,
                            "min_version" => &mut tls.min_version,
                            "max_version" => &mut tls.max_version,
                            _ => {
                                problems.push(format!(
                                    "{key}: unknown or unsupported key (wattd reads cert_file, \
                                     key_file, client_auth_type, client_ca_file, min_version, \
                                     max_version)"
                                ));
                                continue;
                            }
                        };
                        *slot = as_str(v, &key, &mut problems).map(str::to_owned);
                    }
                    raw.tls_server_config = Some(tls);
                }
                _ => problems.push("tls_server_config: must be a mapping".into()),
            },
            Some("basic_auth_users") => match v {
                Yaml::Null => {}
                Yaml::Hash(u) => {
                    let mut users = BTreeMap::new();
                    for (k, v) in u {
                        let Some(user) = k.as_str() else {
                            problems.push("basic_auth_users: a user name must be a string".into());
                            continue;
                        };
                        let key = format!("basic_auth_users.{user}");
                        if let Some(hash) = as_str(v, &key, &mut problems) {
                            users.insert(user.to_owned(), hash.to_owned());
                        } else if matches!(v, Yaml::Null) {
                            problems.push(format!("{key}: no hash"));
                        }
                    }
                    raw.basic_auth_users = Some(users);
                }
                _ => problems.push("basic_auth_users: must be a mapping".into()),
            },
            Some(other) => problems.push(format!(
                "{other}: unknown or unsupported key (wattd reads tls_server_config and \
                 basic_auth_users)"
            )),
            None => problems.push("a top-level key must be a string".into()),
        }
    }
    if problems.is_empty() {
        Ok(raw)
    } else {
        Err(problems)
    }
}

fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(FILE_MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > FILE_MAX_BYTES {
        return Err(format!("larger than {FILE_MAX_BYTES} bytes"));
    }
    Ok(text)
}

fn tls_config(
    base: &Path,
    raw: RawTls,
    problems: &mut Vec<String>,
) -> Option<(ServerConfig, ClientAuth)> {
    let at = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let before = problems.len();
    let client_auth = match raw.client_auth_type.as_deref() {
        None | Some("NoClientCert") => ClientAuth::None,
        Some("VerifyClientCertIfGiven") => ClientAuth::VerifyIfGiven,
        Some("RequireAndVerifyClientCert") => ClientAuth::Required,
        Some(other @ ("RequestClientCert" | "RequireAnyClientCert")) => {
            problems.push(format!(
                "tls_server_config.client_auth_type: {other} accepts certificates nobody \
                 verifies; use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            ));
            ClientAuth::None
        }
        Some(other) => {
            problems.push(format!(
                "tls_server_config.client_auth_type: {other:?} is not one of NoClientCert, \
                 VerifyClientCertIfGiven, RequireAndVerifyClientCert"
            ));
            ClientAuth::None
        }
    };
    let versions = versions(
        raw.min_version.as_deref(),
        raw.max_version.as_deref(),
        problems,
    );
    let (Some(cert), Some(key)) = (raw.cert_file.as_deref(), raw.key_file.as_deref()) else {
        problems.push(
            "tls_server_config: cert_file and key_file are both required when TLS is configured"
                .to_owned(),
        );
        return None;
    };
    let certs = load_certs(&at(cert), "tls_server_config.cert_file", problems);
    let key = load_key(&at(key), problems);
    let verifier = match (client_auth, raw.client_ca_file.as_deref()) {
        (ClientAuth::None, None) => Some(WebPkiClientVerifier::no_client_auth()),
        (ClientAuth::None, Some(_)) => {
            problems.push(
                "tls_server_config.client_ca_file is set but client_auth_type does not verify \
                 client certificates (set it to RequireAndVerifyClientCert or \
                 VerifyClientCertIfGiven)"
                    .to_owned(),
            );
            None
        }
        (_, None) => {
            problems.push(
                "tls_server_config.client_ca_file is required to verify client certificates"
                    .to_owned(),
            );
            None
        }
        (auth, Some(ca)) => {
            let ca = at(ca);
            let mut roots = RootCertStore::empty();
            for c in
                load_certs(&ca, "tls_server_config.client_ca_file", problems).unwrap_or_default()
            {
                if let Err(e) = roots.add(c) {
                    problems.push(format!(
                        "tls_server_config.client_ca_file {}: {e}",
                        ca.display()
                    ));
                }
            }
            let mut b = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            );
            if auth == ClientAuth::VerifyIfGiven {
                b = b.allow_unauthenticated();
            }
            b.build()
                .map_err(|e| {
                    problems.push(format!(
                        "tls_server_config.client_ca_file {}: {e}",
                        ca.display()
                    ))
                })
                .ok()
        }
    };
    if problems.len() > before {
        return None;
    }
    let (certs, key, verifier) = (certs?, key?, verifier?);
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&versions)
            .map_err(|e| problems.push(format!("tls_server_config: {e}")))
            .ok()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| problems.push(format!("tls_server_config: cert_file and key_file: {e}")))
            .ok()?;
    Some((config, client_auth))
}

fn versions(
    min: Option<&str>,
    max: Option<&str>,
    problems: &mut Vec<String>,
) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let rank = |key: &str, v: Option<&str>, default: u8, problems: &mut Vec<String>| match v {
        None => default,
        Some("TLS12") => 12,
        Some("TLS13") => 13,
        Some(o @ ("TLS10" | "TLS11")) => {
            problems.push(format!(
                "tls_server_config.{key}: {o} is below TLS 1.2, which the platform's policy \
                 requires"
            ));
            default
        }
        Some(o) => {
            problems.push(format!(
                "tls_server_config.{key}: {o:?} is not one of TLS12, TLS13"
            ));
            default
        }
    };
    let lo = rank("min_version", min, 12, problems);
    let hi = rank("max_version", max, 13, problems);
    if lo > hi {
        problems.push("tls_server_config: min_version is above max_version".to_owned());
    }
    let mut v = Vec::new();
    if lo <= 13 && hi >= 13 {
        v.push(&rustls::version::TLS13);
    }
    if lo <= 12 && hi >= 12 {
        v.push(&rustls::version::TLS12);
    }
    v
}

fn load_certs(
    path: &Path,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<Vec<CertificateDer<'static>>> {
    crate::tls::load_certs(path, key)
        .map_err(|e| problems.push(e.to_string()))
        .ok()
}

/// The private key, which other users must not be able to read (as ssh refuses such a key).
fn load_key(path: &Path, problems: &mut Vec<String>) -> Option<PrivateKeyDer<'static>> {
    match std::fs::metadata(path) {
        Ok(m) if m.mode() & 0o004 != 0 => {
            problems.push(format!(
                "tls_server_config.key_file {}: readable by every user (mode {:04o}); \
                 chmod o-r it",
                path.display(),
                m.mode() & 0o7777
            ));
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            problems.push(format!(
                "tls_server_config.key_file {}: {e}",
                path.display()
            ));
            return None;
        }
    }
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| {
            problems.push(format!(
                "tls_server_config.key_file {}: {e}",
                path.display()
            ))
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A cost-4 bcrypt hash of "secret" (cheap for tests; real configurations use 10 or more).
    fn hash() -> String {
        bcrypt::hash("secret", 4).unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn pki(dir: &Path) -> (wattd_tests::tls::TestCa, wattd_tests::tls::CertFiles) {
        let ca = wattd_tests::tls::TestCa::new(dir, "web");
        let server = ca.server("server");
        std::fs::set_permissions(&server.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (ca, server)
    }

    fn problems(path: &Path) -> String {
        WebConfig::load(path).unwrap_err().to_string()
    }

    #[test]
    fn an_empty_file_configures_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = WebConfig::load(&write(dir.path(), "w.yml", "\n")).unwrap();
        assert!(c.tls().is_none() && c.basic_auth().is_none() && !c.authenticates());
        assert_eq!(c.describe(), "plain HTTP");
    }

    #[test]
    fn tls_with_required_client_certificates_and_basic_auth() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server) = pki(dir.path());
        // Relative paths are relative to the configuration's directory.
        let text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: \
             RequireAndVerifyClientCert\n  client_ca_file: {}\n  min_version: TLS13\n\
             basic_auth_users:\n  prometheus: {}\n",
            server.cert.file_name().unwrap().to_str().unwrap(),
            server.key.display(),
            ca.ca_pem.display(),
            hash()
        );
        let c = WebConfig::load(&write(dir.path(), "w.yml", &text)).unwrap();
        assert!(c.authenticates());
        assert_eq!(c.client_auth(), ClientAuth::Required);
        assert_eq!(
            c.describe(),
            "TLS (client certificates required), basic auth (1 users)"
        );
    }

    #[test]
    fn basic_auth_alone_authenticates_and_tls_alone_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = WebConfig::load(&write(
            dir.path(),
            "a.yml",
            &format!("basic_auth_users:\n  p: {}\n", hash()),
        ))
        .unwrap();
        assert!(c.authenticates() && c.tls().is_none());
        let (_ca, server) = pki(dir.path());
        let text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            server.cert.display(),
            server.key.display()
        );
        let c = WebConfig::load(&write(dir.path(), "t.yml", &text)).unwrap();
        assert!(!c.authenticates() && c.tls().is_some());
    }

    #[test]
    fn client_certificates_verified_only_when_given_do_not_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server) = pki(dir.path());
        let text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: \
             VerifyClientCertIfGiven\n  client_ca_file: {}\n",
            server.cert.display(),
            server.key.display(),
            ca.ca_pem.display()
        );
        let c = WebConfig::load(&write(dir.path(), "w.yml", &text)).unwrap();
        assert_eq!(c.client_auth(), ClientAuth::VerifyIfGiven);
        assert!(!c.authenticates(), "a client without a certificate gets in");
    }

    #[test]
    fn unknown_and_unsupported_settings_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = problems(&write(
            dir.path(),
            "w.yml",
            "http_server_config:\n  http2: true\n",
        ));
        assert!(e.contains("http_server_config"), "{e}");
        assert!(e.contains("w.yml"), "{e}");
        let e = problems(&write(
            dir.path(),
            "c.yml",
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n",
        ));
        assert!(e.contains("cipher_suites"), "{e}");
        let e = problems(&write(dir.path(), "y.yml", "basic_auth_users: [\n"));
        assert!(e.contains("y.yml"), "{e}");
    }

    #[test]
    fn aliases_and_values_of_the_wrong_type_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = problems(&write(
            dir.path(),
            "a.yml",
            "x: &a [1, 2]\nbasic_auth_users:\n  p: *a\n",
        ));
        assert!(e.contains("aliases"), "{e}");
        let e = problems(&write(
            dir.path(),
            "t.yml",
            "tls_server_config:\n  min_version: 12\nbasic_auth_users:\n  p:\n",
        ));
        assert!(
            e.contains("tls_server_config.min_version: must be a string"),
            "{e}"
        );
        assert!(e.contains("basic_auth_users.p: no hash"), "{e}");
        let e = problems(&write(dir.path(), "l.yml", "- a\n"));
        assert!(e.contains("must be a mapping"), "{e}");
    }

    #[test]
    fn weak_or_incomplete_tls_is_refused_with_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server) = pki(dir.path());
        let text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: \
             RequireAnyClientCert\n  min_version: TLS11\n",
            server.cert.display(),
            server.key.display()
        );
        let e = problems(&write(dir.path(), "w.yml", &text));
        assert!(
            e.contains("RequireAnyClientCert accepts certificates"),
            "{e}"
        );
        assert!(e.contains("min_version: TLS11 is below TLS 1.2"), "{e}");

        let text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: \
             RequireAndVerifyClientCert\n",
            server.cert.display(),
            server.key.display()
        );
        let e = problems(&write(dir.path(), "n.yml", &text));
        assert!(e.contains("client_ca_file is required"), "{e}");

        let text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n",
            server.cert.display(),
            server.key.display(),
            ca.ca_pem.display()
        );
        let e = problems(&write(dir.path(), "x.yml", &text));
        assert!(e.contains("client_auth_type does not verify"), "{e}");

        let e = problems(&write(
            dir.path(),
            "k.yml",
            "tls_server_config:\n  cert_file: /nonexistent/c.pem\n",
        ));
        assert!(
            e.contains("cert_file and key_file are both required"),
            "{e}"
        );
    }

    #[test]
    fn a_key_readable_by_others_or_a_missing_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_ca, server) = pki(dir.path());
        std::fs::set_permissions(&server.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "tls_server_config:\n  cert_file: /nonexistent/c.pem\n  key_file: {}\n",
            server.key.display()
        );
        let e = problems(&write(dir.path(), "w.yml", &text));
        assert!(e.contains("readable by every user (mode 0644)"), "{e}");
        assert!(
            e.contains("tls_server_config.cert_file /nonexistent/c.pem"),
            "{e}"
        );
    }

    #[test]
    fn bad_users_and_hashes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = problems(&write(
            dir.path(),
            "w.yml",
            &format!(
                "basic_auth_users:\n  alice: plaintext\n  \"a:b\": {}\n  bob: \"$2y$04$\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\"\n",
                hash()
            ),
        ));
        assert!(e.contains("basic_auth_users.alice"), "{e}");
        assert!(e.contains("basic_auth_users.\"a:b\""), "{e}");
        assert!(e.contains("basic_auth_users.bob"), "{e}");
    }
}
