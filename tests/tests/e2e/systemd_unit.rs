//! The systemd unit's hardening, as `systemd-analyze security` scores it (issue 8 asks for an
//! exposure of 2.5 or less).

use std::path::Path;
use std::process::Command;

#[test]
fn unit_exposure_is_at_most_2_5() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/wattd.service");
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            wattd_testkit::skip(
                "unit_exposure_is_at_most_2_5",
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
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{text}");
}
