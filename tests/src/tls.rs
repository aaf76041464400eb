//! A throwaway certificate authority made at test time, for mutual TLS on loopback: a CA, a
//! server certificate for `localhost` and 127.0.0.1, and client certificates whose subject
//! common name is the node id (what `wattd-ledger` reads to know which node is talking).
//! Nothing here is ever committed: every test makes its own keys in its own temporary directory.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use std::path::{Path, PathBuf};

/// PEM files of one certificate and its private key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA whose certificate is written to `<dir>/<name>-ca.pem`.
pub struct TestCa {
    dir: PathBuf,
    params: CertificateParams,
    key: KeyPair,
    pub ca_pem: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

impl TestCa {
    /// A new CA named `name` (its files go to `dir`).
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generating the CA key");
        let cert = params.self_signed(&key).expect("self-signing the CA");
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, cert.pem()).expect("writing the CA certificate");
        TestCa {
            dir: dir.to_path_buf(),
            params,
            key,
            ca_pem,
        }
    }

    fn issue(&self, file_stem: &str, mut params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("generating a key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &issuer)
            .expect("signing a certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("writing a certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("writing a key");
        // As an operator would keep it: owner only (wattd refuses a key others can read).
        std::fs::set_permissions(
            &files.key,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod 600 on a key");
        files
    }

    /// A server certificate valid for `localhost` and 127.0.0.1.
    pub fn server(&self, file_stem: &str) -> CertFiles {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().expect("a valid DNS name")),
            SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file_stem, params)
    }

    /// A web configuration (the Prometheus exporter toolkit's YAML) at `path` for a metrics
    /// endpoint: TLS with a server certificate of this CA (`<stem>.pem`, valid for localhost
    /// and 127.0.0.1), basic-auth `users` (user, password; cost-4 bcrypt hashes, cheap for
    /// tests), and, with `clients`, client certificates of that CA required.
    pub fn web_config(
        &self,
        path: &Path,
        stem: &str,
        users: &[(&str, &str)],
        clients: Option<&TestCa>,
    ) -> PathBuf {
        let server = self.server(stem);
        let mut text = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            server.cert.display(),
            server.key.display()
        );
        if let Some(c) = clients {
            text.push_str(&format!(
                "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
                c.ca_pem.display()
            ));
        }
        if !users.is_empty() {
            text.push_str("basic_auth_users:\n");
            for (user, password) in users {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                text.push_str(&format!("  {user}: \"{hash}\"\n"));
            }
        }
        std::fs::write(path, text).expect("writing a web configuration");
        path.to_path_buf()
    }

    /// A client certificate for `node_id` (subject CN).
    pub fn client(&self, node_id: &str) -> CertFiles {
        self.client_params(node_id, None)
    }

    /// A client certificate for `node_id`, valid from a second ago for `valid_s` seconds,
    /// written over `client-<node_id>.pem` / `.key` (where [`TestCa::client`] writes): what an
    /// outside tool issuing short-lived certificates leaves on disk.
    pub fn client_expiring(&self, node_id: &str, valid_s: i64) -> CertFiles {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(1);
        params.not_after = now + time::Duration::seconds(valid_s);
        self.issue(&format!("client-{node_id}"), params)
    }

    /// A client certificate for `node_id` with serial number `serial` (for a CRL to name),
    /// written to `client-<node_id>-<serial>.pem`.
    pub fn client_with_serial(&self, node_id: &str, serial: u64) -> CertFiles {
        self.client_params(node_id, Some(serial))
    }

    fn client_params(&self, node_id: &str, serial: Option<u64>) -> CertFiles {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = serial.map(SerialNumber::from);
        let stem = match serial {
            Some(n) => format!("client-{node_id}-{n}"),
            None => format!("client-{node_id}"),
        };
        self.issue(&stem, params)
    }

    /// Writes a CRL signed by this CA that revokes the certificates with these serial numbers
    /// (PEM, to `path`).
    pub fn crl(&self, path: &Path, number: u64, revoked: &[u64]) {
        let issuer = Issuer::from_params(&self.params, &self.key);
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(4000, 1, 1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|n| RevokedCertParams {
                    serial_number: SerialNumber::from(*n),
                    revocation_time: date_time_ymd(2020, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer).expect("signing a CRL");
        std::fs::write(path, crl.pem().expect("CRL PEM")).expect("writing a CRL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pem_files_that_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "ledger");
        let s = ca.server("server");
        let c = ca.client("node-a");
        for p in [&ca.ca_pem, &s.cert, &c.cert] {
            let pem = std::fs::read_to_string(p).unwrap();
            assert!(
                pem.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                p.display()
            );
        }
        assert!(std::fs::read_to_string(&c.key)
            .unwrap()
            .contains("PRIVATE KEY"));
        assert_ne!(
            std::fs::read(&s.cert).unwrap(),
            std::fs::read(&c.cert).unwrap()
        );
    }
}
