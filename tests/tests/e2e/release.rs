//! The release set `scripts/release` builds (`.ci/run` builds one, signed with a key it makes
//! for the run, and names its directory in `WATTD_RELEASE_DIR`): the OpenPGP signature over
//! SHA256SUMS and rpm's own signature verify against the shipped public key alone, a file with
//! one byte changed is refused by each check that covers it, and the SBOMs list what Cargo.lock
//! says each binary is built from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn release_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("WATTD_RELEASE_DIR").map(PathBuf::from);
    if dir.is_none() {
        wattd_testkit::skip(
            "release set",
            "WATTD_RELEASE_DIR (.ci/run builds and signs the set with scripts/release)",
        );
    }
    dir
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A copy of the release set with one byte of `file` changed (the middle byte, xor 1).
fn tampered(dir: &Path, file: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
    }
    let path = copy.path().join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    copy
}

/// A keyring that holds only the release's public key, as a verifier's would.
struct Verifier {
    gnupg: tempfile::TempDir,
    rpmdb: tempfile::TempDir,
}

impl Verifier {
    fn new(dir: &Path) -> Self {
        let gnupg = tempfile::tempdir().unwrap();
        let o = run(Command::new("gpg")
            .env("GNUPGHOME", gnupg.path())
            .args(["--batch", "--import"])
            .arg(dir.join("signing-key.asc")));
        assert!(o.status.success(), "gpg --import: {}", text(&o));
        let rpmdb = tempfile::tempdir().unwrap();
        let o = run(Command::new("rpmkeys")
            .arg("--dbpath")
            .arg(rpmdb.path())
            .arg("--import")
            .arg(dir.join("signing-key.asc")));
        assert!(o.status.success(), "rpmkeys --import: {}", text(&o));
        Verifier { gnupg, rpmdb }
    }

    /// `gpg --verify` of SHA256SUMS.asc; Ok with the signing key's fingerprint.
    fn sums_signature(&self, dir: &Path) -> Result<String, String> {
        let o = run(Command::new("gpg")
            .env("GNUPGHOME", self.gnupg.path())
            .args(["--batch", "--status-fd", "1", "--verify"])
            .arg(dir.join("SHA256SUMS.asc"))
            .arg(dir.join("SHA256SUMS")));
        let status = String::from_utf8_lossy(&o.stdout).into_owned();
        let valid = status
            .lines()
            .find_map(|l| l.strip_prefix("[GNUPG:] VALIDSIG "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string);
        match valid {
            Some(fpr) if o.status.success() => Ok(fpr),
            _ => Err(text(&o)),
        }
    }

    fn rpm_signature(&self, rpm: &Path) -> Output {
        run(Command::new("rpmkeys")
            .arg("--dbpath")
            .arg(self.rpmdb.path())
            .arg("--checksig")
            .arg("-v")
            .arg(rpm))
    }
}

fn sums_check(dir: &Path) -> Output {
    run(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(dir))
}

fn need_tools() -> bool {
    for tool in ["gpg", "rpmkeys", "sha256sum"] {
        if wattd_testkit::need::which(tool).is_none() {
            wattd_testkit::skip("release set", format!("{tool} on PATH"));
            return false;
        }
    }
    true
}

#[test]
fn signatures_verify_with_the_public_key_alone_and_one_changed_byte_is_refused() {
    let Some(dir) = release_dir() else {
        return;
    };
    if !need_tools() {
        return;
    }
    let v = Verifier::new(&dir);

    // The untouched set: the sums are signed by the shipped key, every sum matches, the rpm's own
    // signature verifies.
    let fpr = v.sums_signature(&dir).expect("SHA256SUMS.asc verifies");
    let o = run(Command::new("gpg").env("GNUPGHOME", v.gnupg.path()).args([
        "--batch",
        "--with-colons",
        "--fingerprint",
    ]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!(":{fpr}:")),
        "signed by {fpr}, which is not the shipped key: {}",
        text(&o)
    );
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    for file in [
        "wattd.deb",
        "wattd.rpm",
        "wattd-ledger.deb",
        "wattd-ledger.rpm",
        "wattd.cdx.json",
        "wattd-ledger.cdx.json",
    ] {
        assert!(
            sums.lines().any(|l| l.ends_with(&format!("  {file}"))),
            "{file} is not in SHA256SUMS:\n{sums}"
        );
    }
    let o = sums_check(&dir);
    assert!(o.status.success(), "sha256sum --check: {}", text(&o));
    for rpm in ["wattd.rpm", "wattd-ledger.rpm"] {
        let o = v.rpm_signature(&dir.join(rpm));
        let out = text(&o);
        assert!(o.status.success(), "rpmkeys --checksig {rpm}: {out}");
        assert!(
            out.contains("Signature") && out.contains("OK") && !out.contains("NOKEY"),
            "{rpm} carries a signature made by the shipped key: {out}"
        );
    }

    // The rpm's signature is the key's and nobody else's: with an empty keyring it is not OK.
    let empty = tempfile::tempdir().unwrap();
    let o = run(Command::new("rpmkeys")
        .arg("--dbpath")
        .arg(empty.path())
        .arg("--checksig")
        .arg(dir.join("wattd.rpm")));
    assert!(
        !o.status.success(),
        "an rpm checked without the key passed: {}",
        text(&o)
    );

    // One byte changed in each file: refused by the check that covers it.
    let t = tampered(&dir, "wattd.rpm");
    let o = v.rpm_signature(&t.path().join("wattd.rpm"));
    assert!(
        !o.status.success(),
        "rpm with a changed byte verified: {}",
        text(&o)
    );
    let o = sums_check(t.path());
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stdout).contains("wattd.rpm: FAILED"),
        "{}",
        text(&o)
    );
    for file in [
        "wattd.deb",
        "wattd-ledger.deb",
        "wattd.cdx.json",
        "wattd-ledger.cdx.json",
    ] {
        let t = tampered(&dir, file);
        let o = sums_check(t.path());
        assert!(
            !o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!("{file}: FAILED")),
            "{file} with a changed byte passed the sums: {}",
            text(&o)
        );
    }
    for file in ["SHA256SUMS", "SHA256SUMS.asc"] {
        let t = tampered(&dir, file);
        assert!(
            v.sums_signature(t.path()).is_err(),
            "{file} with a changed byte still verifies"
        );
    }
}

/// The size of /usr/bin/wattd in each package.
fn packaged_binary_sizes(dir: &Path) -> (u64, u64) {
    let o = run(Command::new("rpm")
        .args(["-qp", "--queryformat", "[%{FILENAMES} %{FILESIZES}\\n]"])
        .arg(dir.join("wattd.rpm")));
    assert!(o.status.success(), "rpm -qp: {}", text(&o));
    let rpm = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("/usr/bin/wattd ")?.trim().parse().ok())
        .expect("/usr/bin/wattd in the rpm");
    let o = run(Command::new("dpkg-deb")
        .arg("-c")
        .arg(dir.join("wattd.deb")));
    assert!(o.status.success(), "dpkg-deb -c: {}", text(&o));
    let deb = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.ends_with("./usr/bin/wattd"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .expect("./usr/bin/wattd in the deb");
    (rpm, deb)
}

#[test]
fn both_packages_carry_a_stripped_binary() {
    let Some(dir) = release_dir() else {
        return;
    };
    let (rpm, deb) = packaged_binary_sizes(&dir);
    // Unstripped, the binary is about seven times its stripped size (debug lines, symbols).
    assert!(
        rpm <= deb + deb / 2 && deb <= rpm + rpm / 2,
        "/usr/bin/wattd is {rpm} bytes in the rpm and {deb} in the deb: one is not stripped"
    );
}

/// Cargo.lock's packages: name -> versions.
fn locked_versions() -> BTreeMap<String, Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let lock: toml::Table = std::fs::read_to_string(root.join("Cargo.lock"))
        .unwrap()
        .parse()
        .unwrap();
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in lock["package"].as_array().unwrap() {
        map.entry(p["name"].as_str().unwrap().to_string())
            .or_default()
            .push(p["version"].as_str().unwrap().to_string());
    }
    map
}

/// The SBOM's components: name -> versions.
fn sbom_components(path: &Path) -> (String, BTreeMap<String, Vec<String>>) {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["bomFormat"], "CycloneDX", "{}", path.display());
    let top = doc["metadata"]["component"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in doc["components"].as_array().unwrap() {
        map.entry(c["name"].as_str().unwrap().to_string())
            .or_default()
            .push(c["version"].as_str().unwrap().to_string());
    }
    (top, map)
}

#[test]
fn sboms_list_what_each_binary_is_built_from_at_the_locked_versions() {
    let Some(dir) = release_dir() else {
        return;
    };
    let locked = locked_versions();
    let (agent_top, agent) = sbom_components(&dir.join("wattd.cdx.json"));
    let (ledger_top, ledger) = sbom_components(&dir.join("wattd-ledger.cdx.json"));
    assert_eq!(agent_top, "wattd");
    assert_eq!(ledger_top, "wattd-ledger");
    for (sbom, components) in [("wattd", &agent), ("wattd-ledger", &ledger)] {
        assert!(
            components.len() > 50,
            "{sbom}: {} components",
            components.len()
        );
        for (name, versions) in components {
            for v in versions {
                assert!(
                    locked.get(name).is_some_and(|l| l.contains(v)),
                    "{sbom}'s SBOM lists {name} {v}, which Cargo.lock does not have"
                );
            }
        }
    }
    // What each binary links, by the architecture: both sign with ed25519-dalek; only the agent
    // reads NVML and perf events; only the ledger has the stores and rustls' server.
    for name in ["ed25519-dalek", "prost", "wattd-records", "wattd-proto"] {
        assert!(agent.contains_key(name), "wattd's SBOM lacks {name}");
        assert!(
            ledger.contains_key(name),
            "wattd-ledger's SBOM lacks {name}"
        );
    }
    for name in ["nvml-wrapper", "perf-event2", "wattd-collectors"] {
        assert!(agent.contains_key(name), "wattd's SBOM lacks {name}");
        assert!(
            !ledger.contains_key(name),
            "wattd-ledger's SBOM lists {name}, which the ledger must not build"
        );
    }
    for name in ["rusqlite", "tokio-postgres"] {
        assert!(
            ledger.contains_key(name),
            "wattd-ledger's SBOM lacks {name}"
        );
    }
    // Dev-only crates are in no binary.
    for name in ["criterion", "proptest", "wattd-testkit"] {
        assert!(
            !agent.contains_key(name),
            "wattd's SBOM lists dev-only {name}"
        );
        assert!(
            !ledger.contains_key(name),
            "wattd-ledger's SBOM lists dev-only {name}"
        );
    }
}
