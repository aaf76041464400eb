//! Running the real binaries: `wattd` (built by `cargo test --workspace` next to this crate's
//! own `wattd-burn`) and reading its spool back through its own CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The `wattd` binary of this build: it sits beside `wattd-burn` in the target directory.
pub fn wattd_bin() -> PathBuf {
    let burn = PathBuf::from(env!("CARGO_BIN_EXE_wattd-burn"));
    let p = burn.with_file_name("wattd");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo test --workspace builds it)",
        p.display()
    );
    p
}

pub fn burn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wattd-burn"))
}

/// A running `wattd run`, killed if the test fails before stopping it.
pub struct Agent {
    pub child: Option<Child>,
}

impl Agent {
    pub fn start(config: &Path, log: &Path) -> Agent {
        let log = std::fs::File::create(log).unwrap();
        // At the shipped unit's priority (Nice=-5), where this process may raise it (root).
        let mut cmd = if wattd_testkit::is_root() {
            let mut c = Command::new("nice");
            c.args(["-n", "-5"]).arg(wattd_bin());
            c
        } else {
            Command::new(wattd_bin())
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            // WATTD_TEST_AGENT_LOG (a tracing filter) turns on more of the agent's log.
            .env(
                "RUST_LOG",
                std::env::var("WATTD_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent { child: Some(child) }
    }

    /// SIGTERM, then wait; returns the exit status and how long the stop took.
    pub fn stop(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        (status, t.elapsed())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wattd(args: &[&str]) -> Output {
    Command::new(wattd_bin()).args(args).output().unwrap()
}

/// A free TCP port on loopback (bound, then released for the server under test to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The numbers of a chart's `name="a,b,c"` attribute (`data-measured-uj`, `data-stacked-uj`).
pub fn chart_attr(chart: &str, name: &str) -> Vec<u64> {
    let start = chart.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    let end = start + chart[start..].find('"').unwrap();
    chart[start..end]
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|v| v.parse().unwrap())
        .collect()
}

/// `wattd verify` on a spool: signatures, chain, sequence and per-interval conservation.
pub fn assert_verifies(spool: &Path) {
    let v = wattd(&["verify", "--data-dir", spool.to_str().unwrap()]);
    assert!(
        v.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

/// `wattd runs --format json`: run id -> domain label -> energy uJ.
pub fn runs_json(data_dir: &Path) -> serde_json::Value {
    let out = wattd(&[
        "runs",
        "--format",
        "json",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "wattd runs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A run's energy in one domain label (e.g. `package:0`), 0 when absent.
pub fn run_energy(runs: &serde_json::Value, run_id: &str, domain: &str) -> u64 {
    runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == run_id)
        .and_then(|r| {
            r["domains"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["domain"] == domain)
        })
        .map_or(0, |d| d["energy_uj"].as_u64().unwrap())
}

/// A `wattd run` config for the simulated host: its tree as `host.root`, the real cgroup mount,
/// runs under `cg`'s parent by pattern, the socket and spool in `work`; `extra` is appended
/// (further sections). Returns the config file and the spool dir.
pub fn agent_config(
    sim: &wattd_tests::simhost::SimHost,
    mount: &Path,
    cg: &wattd_tests::cgroups::TestCgroups,
    work: &Path,
    interval_ms: u64,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let spool = work.join("spool");
    let config = agent_config_in(sim, mount, cg, work, &spool, interval_ms, "", extra);
    (config, spool)
}

/// As [`agent_config`], with the spool in `spool` and `spool_keys` (lines) added to `[spool]`.
#[allow(clippy::too_many_arguments)]
pub fn agent_config_in(
    sim: &wattd_tests::simhost::SimHost,
    mount: &Path,
    cg: &wattd_tests::cgroups::TestCgroups,
    work: &Path,
    spool: &Path,
    interval_ms: u64,
    spool_keys: &str,
    extra: &str,
) -> PathBuf {
    let pattern = format!("{}/run-{{run_id}}.scope", cg.rel().display());
    sim.config(&format!(
        "cgroup_root = {:?}\n[sampling]\ninterval_ms = {interval_ms}\n[runs]\npatterns = [{pattern:?}]\n\
         control_socket = {:?}\n[spool]\ndir = {:?}\n{spool_keys}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
        mount.display().to_string(),
        work.join("control.sock").display().to_string(),
        spool.display().to_string(),
    ))
    .unwrap()
}

/// Run id -> `final_usage` of a `wattd runs` / `wattd-ledger runs` JSON report (runs that have
/// one).
pub fn final_usages(v: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    v["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .filter_map(|r| {
                    Some((
                        r["run_id"].as_str()?.to_owned(),
                        r["final_usage"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}
