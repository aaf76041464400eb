//! The Debian package `.ci/run` builds (cargo-deb) and checks with lintian: its contents and
//! maintainer scripts. `WATTD_DEB` names the file.

use std::ffi::OsString;
use std::process::Command;

/// The package file `.ci/run` built and named in `var`, or a loud skip (a failure in CI).
fn built_package(var: &str, tool: &str) -> Option<OsString> {
    let p = std::env::var_os(var);
    if p.is_none() {
        wattd_testkit::skip(
            "package contents",
            format!("{var} (.ci/run builds the package with {tool} and sets it)"),
        );
    }
    p
}

#[test]
fn deb_has_binary_unit_config_sysusers_and_keeps_the_spool_until_purge() {
    let Some(deb) = built_package("WATTD_DEB", "cargo-deb") else {
        return;
    };
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let list = String::from_utf8_lossy(&list.stdout);
    eprintln!("{list}");
    for path in [
        "./usr/bin/wattd",
        "/systemd/system/wattd.service",
        "./etc/wattd/wattd.toml",
        "./usr/lib/sysusers.d/wattd.conf",
        "./usr/lib/tmpfiles.d/wattd.conf",
        "./usr/share/doc/wattd/copyright",
    ] {
        assert!(
            list.lines().any(|l| l.contains(path)),
            "{path} missing:\n{list}"
        );
    }
    let ctl = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(ctl.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(ctl.path().join(f)).unwrap_or_default();
    assert!(
        read("conffiles").contains("/etc/wattd/wattd.toml"),
        "config is a conffile"
    );
    let postinst = read("postinst");
    assert!(
        postinst.contains("systemd-sysusers") && postinst.contains("enable"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke start") && !postinst.contains("systemctl start"),
        "installed, not started:\n{postinst}"
    );
    let postrm = read("postrm");
    assert!(
        postrm.contains("\"purge\"") && postrm.contains("rm -rf /var/lib/wattd"),
        "{postrm}"
    );
}

#[test]
fn rpm_has_binary_unit_config_and_enables_without_starting() {
    let Some(rpm) = built_package("WATTD_RPM", "cargo-generate-rpm") else {
        return;
    };
    let list = Command::new("rpm")
        .args(["-qlp"])
        .arg(&rpm)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "/usr/bin/wattd",
        "/usr/lib/systemd/system/wattd.service",
        "/etc/wattd/wattd.toml",
        "/usr/lib/sysusers.d/wattd.conf",
        "/usr/lib/tmpfiles.d/wattd.conf",
    ] {
        assert!(list.lines().any(|l| l == path), "{path} missing:\n{list}");
    }
    let conf = Command::new("rpm")
        .args(["-qcp"])
        .arg(&rpm)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&conf.stdout).contains("/etc/wattd/wattd.toml"),
        "config is %config"
    );
    let scripts = Command::new("rpm")
        .args(["-qp", "--scripts"])
        .arg(&rpm)
        .output()
        .unwrap();
    let scripts = String::from_utf8_lossy(&scripts.stdout);
    assert!(
        scripts.contains("systemctl enable wattd.service"),
        "{scripts}"
    );
    assert!(
        !scripts.contains("systemctl start") && !scripts.contains("enable --now"),
        "installed, not started:\n{scripts}"
    );
}

#[test]
fn ledger_deb_has_binary_unit_env_sysusers_and_keeps_the_store_until_purge() {
    let Some(deb) = built_package("WATTD_LEDGER_DEB", "cargo-deb") else {
        return;
    };
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "./usr/bin/wattd-ledger",
        "/systemd/system/wattd-ledger.service",
        "./etc/wattd-ledger/serve.env",
        "./usr/lib/sysusers.d/wattd-ledger.conf",
        "./usr/lib/tmpfiles.d/wattd-ledger.conf",
        "./usr/share/doc/wattd-ledger/copyright",
    ] {
        assert!(
            list.lines().any(|l| l.contains(path)),
            "{path} missing:\n{list}"
        );
    }
    // The agent's files are not in it, nor the ledger's in the agent's package.
    assert!(
        !list.lines().any(|l| l.ends_with("/wattd.service")),
        "{list}"
    );
    // The serve arguments name key paths: readable by root and the service's group only.
    let env_line = list
        .lines()
        .find(|l| l.ends_with("./etc/wattd-ledger/serve.env"))
        .unwrap();
    assert!(env_line.starts_with("-rw-r-----"), "{env_line}");
    let ctl = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(ctl.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let read = |f: &str| std::fs::read_to_string(ctl.path().join(f)).unwrap_or_default();
    assert!(read("conffiles").contains("/etc/wattd-ledger/serve.env"));
    let postinst = read("postinst");
    assert!(
        postinst.contains("systemd-sysusers") && postinst.contains("enable"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke start") && !postinst.contains("systemctl start"),
        "installed, not started:\n{postinst}"
    );
    let postrm = read("postrm");
    assert!(
        postrm.contains("\"purge\"") && postrm.contains("rm -rf /var/lib/wattd-ledger"),
        "{postrm}"
    );
    if let Some(agent) = std::env::var_os("WATTD_DEB") {
        let a = Command::new("dpkg-deb")
            .arg("-c")
            .arg(agent)
            .output()
            .unwrap();
        let a = String::from_utf8_lossy(&a.stdout);
        assert!(!a.contains("wattd-ledger"), "{a}");
    }
}

#[test]
fn ledger_rpm_has_binary_unit_env_and_enables_without_starting() {
    let Some(rpm) = built_package("WATTD_LEDGER_RPM", "cargo-generate-rpm") else {
        return;
    };
    let list = Command::new("rpm")
        .args(["-qlp"])
        .arg(&rpm)
        .output()
        .unwrap();
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "/usr/bin/wattd-ledger",
        "/usr/lib/systemd/system/wattd-ledger.service",
        "/etc/wattd-ledger/serve.env",
        "/usr/lib/sysusers.d/wattd-ledger.conf",
        "/usr/lib/tmpfiles.d/wattd-ledger.conf",
    ] {
        assert!(list.lines().any(|l| l == path), "{path} missing:\n{list}");
    }
    let conf = Command::new("rpm")
        .args(["-qcp"])
        .arg(&rpm)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&conf.stdout).contains("/etc/wattd-ledger/serve.env"),
        "the serve arguments are %config"
    );
    let scripts = Command::new("rpm")
        .args(["-qp", "--scripts"])
        .arg(&rpm)
        .output()
        .unwrap();
    let scripts = String::from_utf8_lossy(&scripts.stdout);
    assert!(
        scripts.contains("systemctl enable wattd-ledger.service"),
        "{scripts}"
    );
    assert!(
        !scripts.contains("systemctl start") && !scripts.contains("enable --now"),
        "installed, not started:\n{scripts}"
    );
}
