//! `wattd report` checks, run on the spool of the simulated-host test: the stacked and the
//! measured outlines of every chart are equal and match the records, and headless Chromium
//! loads the page and takes a screenshot.

use std::path::Path;
use std::process::Command;

use prost::Message as _;

use crate::harness::{chart_attr, wattd};

/// Writes the report of `spool` into `work`, checks it, and renders it with Chromium.
pub fn check_report(spool: &Path, work: &Path) {
    let html_path = work.join("report.html");
    let out = wattd(&[
        "report",
        "--data-dir",
        spool.to_str().unwrap(),
        "--out",
        html_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(
        !html.contains("<script") && !html.contains("http://") && !html.contains("https://"),
        "the report fetches nothing"
    );

    // Every chart: the stack's top equals the measured total, interval by interval...
    let attr = chart_attr;
    let charts: Vec<&str> = html.split("<svg ").skip(1).collect();
    assert!(!charts.is_empty());
    for c in &charts {
        assert_eq!(
            attr(c, "data-stacked-uj"),
            attr(c, "data-measured-uj"),
            "outlines differ"
        );
        assert!(c.contains("max 0 uJ"), "non-zero conservation residual");
    }
    // ...and the measured outline is what the records say (an independent read via export).
    let package = charts
        .iter()
        .find(|c| c.contains("data-domain=\"package\""))
        .unwrap();
    let export = wattd(&["export", "--data-dir", spool.to_str().unwrap()]);
    let mut buf = export.stdout.as_slice();
    let mut intervals = Vec::new();
    while !buf.is_empty() {
        let signed = wattd_proto::v1::SignedBatch::decode_length_delimited(&mut buf).unwrap();
        intervals.extend(
            wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice())
                .unwrap()
                .intervals,
        );
    }
    intervals.sort_by_key(|i| i.index);
    let from_records: Vec<u64> = intervals
        .iter()
        .map(|i| {
            i.domains
                .iter()
                .filter(|d| d.domain == "package")
                .map(|d| d.measured_uj)
                .sum()
        })
        .collect();
    assert_eq!(attr(package, "data-measured-uj"), from_records);

    // Focused on one run (every other run as one series): the same outlines.
    let focused = work.join("report-a.html");
    let out = wattd(&[
        "report",
        "--data-dir",
        spool.to_str().unwrap(),
        "--run",
        "a",
        "--out",
        focused.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "report --run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fhtml = std::fs::read_to_string(&focused).unwrap();
    assert!(fhtml.contains("run <b>a</b> against every other run") && fhtml.contains("other runs"));
    for c in fhtml.split("<svg ").skip(1) {
        assert_eq!(attr(c, "data-stacked-uj"), attr(c, "data-measured-uj"));
    }

    // A real browser loads it offline.
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(chromium) = chromium else {
        wattd_testkit::skip("report rendering", "chromium (apt-get install chromium)");
        return;
    };
    let profile = work.join("chromium-profile");
    let png = work.join("report.png");
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1100,1000",
    ];
    let url = format!("file://{}", html_path.display());
    let shot = Command::new(chromium)
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot of {size} bytes");
    let dom = Command::new(chromium)
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("wattd report") && dom.contains("power over time"),
        "page did not load: {dom:.200}"
    );
    if let Ok(keep) = std::env::var("WATTD_REPORT_SCREENSHOT") {
        let _ = std::fs::copy(&png, keep);
    }
}
