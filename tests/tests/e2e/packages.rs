//! The packages `.ci/run` builds (cargo-deb, cargo-generate-rpm; the .debs checked with lintian):
//! their contents and maintainer scripts. `WATTD_DEB`, `WATTD_RPM`, `WATTD_LEDGER_DEB` and
//! `WATTD_LEDGER_RPM` name the files.

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

/// What one package installs and how.
struct Package {
    /// The binary and the unit's name.
    name: &'static str,
    /// The configuration, a conffile / %config.
    conffile: &'static str,
    /// The state directory removal keeps and purge deletes.
    state: &'static str,
}

const AGENT: Package = Package {
    name: "wattd",
    conffile: "/etc/wattd/wattd.toml",
    state: "/var/lib/wattd",
};

const LEDGER: Package = Package {
    name: "wattd-ledger",
    conffile: "/etc/wattd-ledger/serve.env",
    state: "/var/lib/wattd-ledger",
};

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The .deb of `p` (named by `var`): its files, conffile, and scripts that create the user,
/// enable without starting, and keep the state until purge. Returns the file list.
fn check_deb(var: &str, p: &Package) -> Option<String> {
    let deb = built_package(var, "cargo-deb")?;
    let list = output(Command::new("dpkg-deb").arg("-c").arg(&deb));
    eprintln!("{list}");
    let n = p.name;
    for path in [
        format!("./usr/bin/{n}"),
        format!("/systemd/system/{n}.service"),
        format!(".{}", p.conffile),
        format!("./usr/lib/sysusers.d/{n}.conf"),
        format!("./usr/lib/tmpfiles.d/{n}.conf"),
        format!("./usr/share/doc/{n}/copyright"),
    ] {
        assert!(
            list.lines().any(|l| l.contains(&path)),
            "{path} missing:\n{list}"
        );
    }
    let ctl = tempfile::tempdir().unwrap();
    output(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()));
    let read = |f: &str| std::fs::read_to_string(ctl.path().join(f)).unwrap_or_default();
    assert!(
        read("conffiles").contains(p.conffile),
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
    // The state directory is made once the user it names exists.
    let users = postinst.find("systemd-sysusers").unwrap_or(usize::MAX);
    let dirs = postinst.rfind("systemd-tmpfiles --create").unwrap_or(0);
    assert!(users < dirs, "tmpfiles before sysusers:\n{postinst}");
    let postrm = read("postrm");
    assert!(
        postrm.contains("\"purge\"") && postrm.contains(&format!("rm -rf {}", p.state)),
        "{postrm}"
    );
    Some(list)
}

/// The .rpm of `p`: its files, %config, and scripts that enable without starting.
fn check_rpm(var: &str, p: &Package) {
    let Some(rpm) = built_package(var, "cargo-generate-rpm") else {
        return;
    };
    let list = output(Command::new("rpm").arg("-qlp").arg(&rpm));
    let n = p.name;
    for path in [
        format!("/usr/bin/{n}"),
        format!("/usr/lib/systemd/system/{n}.service"),
        p.conffile.to_owned(),
        format!("/usr/lib/sysusers.d/{n}.conf"),
        format!("/usr/lib/tmpfiles.d/{n}.conf"),
    ] {
        assert!(list.lines().any(|l| l == path), "{path} missing:\n{list}");
    }
    let conf = output(Command::new("rpm").arg("-qcp").arg(&rpm));
    assert!(conf.contains(p.conffile), "config is %config: {conf}");
    let scripts = output(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    assert!(
        scripts.contains(&format!("systemctl enable {n}.service")),
        "{scripts}"
    );
    assert!(
        !scripts.contains("systemctl start") && !scripts.contains("enable --now"),
        "installed, not started:\n{scripts}"
    );
}

#[test]
fn deb_has_binary_unit_config_sysusers_and_keeps_the_spool_until_purge() {
    if let Some(list) = check_deb("WATTD_DEB", &AGENT) {
        assert!(!list.contains("wattd-ledger"), "{list}");
    }
}

#[test]
fn rpm_has_binary_unit_config_and_enables_without_starting() {
    check_rpm("WATTD_RPM", &AGENT);
}

#[test]
fn ledger_deb_has_binary_unit_env_sysusers_and_keeps_the_store_until_purge() {
    let Some(list) = check_deb("WATTD_LEDGER_DEB", &LEDGER) else {
        return;
    };
    assert!(
        !list.lines().any(|l| l.ends_with("/wattd.service")),
        "{list}"
    );
    // The serve arguments name key paths: not for every user (systemd reads them as root).
    let env_line = list
        .lines()
        .find(|l| l.ends_with("./etc/wattd-ledger/serve.env"))
        .unwrap();
    assert!(env_line.starts_with("-rw-r-----"), "{env_line}");
}

#[test]
fn ledger_rpm_has_binary_unit_env_and_enables_without_starting() {
    check_rpm("WATTD_LEDGER_RPM", &LEDGER);
}
