//! Tests of the `wattd` binary's command-line contract: subcommands, formats, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wattd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wattd"))
}

fn fixture(name: &str) -> PathBuf {
    wattd_testkit::host_fixture(name)
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("run wattd");
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, so, se)
}

#[test]
fn probe_json_on_fixture_lists_the_right_zones() {
    let (out, so, se) = run(wattd()
        .args(["probe", "--format", "json", "--root"])
        .arg(fixture("kepler")));
    assert!(out.status.success(), "{se}");
    let v: serde_json::Value = serde_json::from_str(&so).expect("valid JSON");
    let chosen = v["chosen"].as_array().expect("chosen array");
    let pk: Vec<(String, u64, String)> = chosen
        .iter()
        .map(|c| {
            (
                c["domain"].as_str().unwrap_or_default().to_owned(),
                c["package"].as_u64().unwrap_or(u64::MAX),
                c["source"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        pk,
        vec![
            ("package".into(), 0, "powercap".into()),
            ("package".into(), 10, "powercap".into())
        ]
    );
    let powercap = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "powercap")
        .unwrap();
    let statuses: Vec<&str> = powercap["zones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "duplicate").count(),
        1,
        "{statuses:?}"
    );
}

#[test]
fn probe_text_names_the_estimator_on_a_host_without_counters() {
    let dir = tempfile::tempdir().unwrap();
    let t = wattd_collectors::synth::HostTree::new(dir.path());
    t.cpus(1, 2, 1).unwrap();
    t.cpuinfo("GenuineIntel", 6, 0x55, true).unwrap();
    t.proc_stat(&[(1, 1), (1, 1)]).unwrap();
    let (out, so, se) = run(wattd().args(["probe", "--root"]).arg(dir.path()));
    assert!(out.status.success(), "{se}");
    assert!(so.contains("estimator") && so.contains("Estimated"), "{so}");
    assert!(so.contains("powercap   not used"), "{so}");
    assert!(so.contains("msr        not used"), "{so}");
}

#[test]
fn bad_usage_exits_64() {
    let (out, _, se) = run(wattd().args(["probe", "--format", "yaml"]));
    assert_eq!(out.status.code(), Some(64), "{se}");
    let (out, _, _) = run(wattd().args(["no-such-command"]));
    assert_eq!(out.status.code(), Some(64));
    let (out, so, _) = run(wattd().args(["--help"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(so.contains("probe"));
}

/// A root-only `energy_uj` (mode 0400, as since CVE-2020-8694) read by an unprivileged user must
/// give a permission reason with the way to grant it, never a silent zero.
#[test]
fn root_only_energy_file_gives_permission_reason() {
    use std::os::unix::fs::PermissionsExt;
    let setpriv = Path::new("/usr/bin/setpriv");
    if !wattd_testkit::need::is_root() || !setpriv.exists() {
        wattd_testkit::skip(
            "root_only_energy_file_gives_permission_reason",
            "root and /usr/bin/setpriv to drop privileges",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let t = wattd_collectors::synth::HostTree::new(dir.path());
    let zdir = t
        .zone(&wattd_collectors::synth::ZoneSpec::new(
            "intel-rapl:0",
            "package-0",
            "100",
        ))
        .unwrap();
    for sub in ["sys", "sys/class", "sys/class/powercap"] {
        std::fs::set_permissions(dir.path().join(sub), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    std::fs::set_permissions(
        zdir.join("energy_uj"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let (out, so, se) = run(Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_wattd"))
        .args(["probe", "--root"])
        .arg(dir.path()));
    assert!(out.status.success(), "{se}");
    assert!(so.contains("permission denied"), "{so}");
    assert!(so.contains("CAP_DAC_READ_SEARCH"), "{so}");
    assert!(
        !so.contains("chosen        package"),
        "an unreadable zone must not be chosen: {so}"
    );
}

#[test]
fn validate_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[sampling]\ninterval_ms = 5\n[runs]\npatterns = [\"x\"]\n[nope]\n",
    )
    .unwrap();
    let (out, _, se) = run(wattd().args(["validate", "--config"]).arg(&bad));
    assert_eq!(out.status.code(), Some(64), "{se}");
    assert!(se.contains("3 problems"), "{se}");
    assert!(se.contains("bad.toml:2: sampling.interval_ms"), "{se}");
    assert!(se.contains("bad.toml:4: runs.patterns"), "{se}");
    assert!(se.contains("bad.toml:5: nope: unknown section"), "{se}");
    // The whole report, as an operator reads it: a reviewed diff when it changes.
    wattd_testkit::golden::check(
        env!("CARGO_MANIFEST_DIR"),
        "tests/golden/validate-bad.txt",
        &se.replace(&dir.path().display().to_string(), "DIR"),
    );
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[sampling]\ninterval_ms = 500\n").unwrap();
    let (out, so, se) = run(wattd().args(["validate", "--config"]).arg(&good));
    assert!(out.status.success(), "{se}");
    assert!(so.contains("good.toml: ok"));
    let (out, _, se) = run(wattd().args(["validate", "--config", "/nonexistent/wattd.toml"]));
    assert_eq!(out.status.code(), Some(64), "{se}");
    assert!(
        se.contains("/nonexistent/wattd.toml:0: cannot read"),
        "{se}"
    );
}

/// The annotated example the packages install to /etc/wattd/wattd.toml must stay valid, and
/// uncommenting its every key must too (the defaults it shows are real values).
#[test]
fn annotated_example_config_is_valid_with_and_without_its_keys() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/wattd.toml");
    let (out, _, se) = run(wattd().args(["validate", "--config"]).arg(&example));
    assert!(out.status.success(), "{se}");
    let text = std::fs::read_to_string(&example).unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest.to_owned(),
            Some(rest) if rest.starts_with(" [") => rest.trim_start().to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.toml");
    std::fs::write(&full, &uncommented).unwrap();
    // Validation reads the [ledger] TLS files: the example's /etc/wattd paths do not exist here,
    // and each missing one is named: a warning (the unit validates before every start, and a
    // node without its certificate must still measure), an error with --strict.
    let (out, _, se) = run(wattd().args(["validate", "--config"]).arg(&full));
    assert!(out.status.success(), "{se}");
    for key in ["ledger.ca", "ledger.cert", "ledger.key"] {
        assert!(
            se.contains(&format!("warning: {}: {key}: /etc/wattd/", full.display())),
            "{se}"
        );
    }
    // And the metrics endpoint's web configuration.
    assert!(
        se.contains(&format!(
            "warning: {}: metrics.web_config: web configuration /etc/wattd/metrics-web.yml: ",
            full.display()
        )),
        "{se}"
    );
    let (out, _, se) = run(wattd()
        .args(["validate", "--strict", "--config"])
        .arg(&full));
    assert_eq!(out.status.code(), Some(64), "{se}");
    assert!(se.contains("ledger.key: /etc/wattd/node.key"), "{se}");
    // With the files in place (the key owner-only), the full example is valid.
    let mut with_files = uncommented.clone();
    let web = dir.path().join("metrics-web.yml");
    std::fs::write(&web, "# nothing configured: host-level series only\n").unwrap();
    with_files = with_files.replace("/etc/wattd/metrics-web.yml", web.to_str().unwrap());
    for (path, pem) in [
        ("/etc/wattd/ledger-ca.pem", "CERTIFICATE"),
        ("/etc/wattd/node.pem", "CERTIFICATE"),
        ("/etc/wattd/node.key", "PRIVATE KEY"),
    ] {
        let local = dir.path().join(Path::new(path).file_name().unwrap());
        std::fs::write(
            &local,
            format!("-----BEGIN {pem}-----\nAA==\n-----END {pem}-----\n"),
        )
        .unwrap();
        std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        with_files = with_files.replace(path, local.to_str().unwrap());
    }
    std::fs::write(&full, with_files).unwrap();
    let (out, _, se) = run(wattd()
        .args(["validate", "--strict", "--config"])
        .arg(&full));
    assert!(out.status.success(), "{se}");
    assert!(!se.contains("warning"), "{se}");
}
