//! The systemd units' hardening, as `systemd-analyze security` scores it (issue 8 asks for an
//! exposure of 2.5 or less for the agent, which needs capabilities to read the counters; issue
//! 17 asks 2.0 or less for the ledger, which needs none).

use std::path::Path;
use std::process::Command;

#[test]
fn unit_exposure_is_at_most_2_5() {
    exposure_at_most("wattd.service", 2.5);
}

#[test]
fn ledger_unit_exposure_is_at_most_2_0() {
    exposure_at_most("wattd-ledger.service", 2.0);
}

fn exposure_at_most(unit_name: &str, max: f64) {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(unit_name);
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            wattd_testkit::skip(
                &format!("{unit_name} exposure"),
                format!("systemd-analyze ({e}; Debian package systemd)"),
            );
            return;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    let score: f64 = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    eprintln!("{line}");
    assert!(
        score <= max,
        "{unit_name}: exposure {score} > {max}:\n{text}"
    );
}
