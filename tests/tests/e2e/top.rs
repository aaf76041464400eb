//! `wattd top` driven through a real terminal (tmux, 80x24): it shows the runs of a live agent on
//! the simulated host and exits on `q`. The agent's endpoint is behind TLS and basic auth (a web
//! configuration), as it must be to serve per-run series; `top` is given the same credentials.

use std::process::Command;
use std::time::{Duration, Instant};

use wattd_tests::cgroups::{require_cgroups, TestCgroups};
use wattd_tests::simhost::{PowerModel, SimHost};

use crate::harness::{burn_bin, wattd_bin, Agent};

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux").args(args).output().unwrap()
}

#[test]
fn top_shows_live_runs_in_80x24_and_quits_on_q() {
    let Some(mount) = require_cgroups("top_shows_live_runs_in_80x24_and_quits_on_q") else {
        return;
    };
    if Command::new("tmux").arg("-V").output().is_err() {
        wattd_testkit::skip(
            "top_shows_live_runs_in_80x24_and_quits_on_q",
            "tmux (apt-get install tmux)",
        );
        return;
    }
    let mut cg = TestCgroups::new(&mount, "top").unwrap();
    let sim = SimHost::start(
        PowerModel {
            idle_w: 10.0,
            busy_w_per_cpu: 20.0,
        },
        1_000_000_000_000,
        Duration::from_millis(5),
    )
    .unwrap();
    sim.link_cgroup_mount(&mount).unwrap();
    let work = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ca = wattd_tests::tls::TestCa::new(work.path(), "metrics");
    let web = ca.web_config(
        &work.path().join("web.yml"),
        "metrics-server",
        &[("sre", "top secret")],
        None,
    );
    let password_file = work.path().join("sre.password");
    std::fs::write(&password_file, "top secret\n").unwrap();
    let config = sim
        .config(&format!(
            "cgroup_root = {:?}\n[sampling]\ninterval_ms = 200\n[runs]\npatterns = [{:?}]\ncontrol_socket = {:?}\n[spool]\ndir = {:?}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nweb_config = {:?}\n",
            mount.display().to_string(),
            format!("{}/run-{{run_id}}.scope", cg.rel().display()),
            work.path().join("c.sock").display().to_string(),
            work.path().join("spool").display().to_string(),
            web.display().to_string(),
        ))
        .unwrap();
    let mut agent = Agent::start(&config, &work.path().join("wattd.log"));
    cg.spawn_in(
        "run-topdemo.scope",
        Command::new(burn_bin()).args(["0.5", "6"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));

    let session = format!("wattd-top-{}", std::process::id());
    let cmd = format!(
        "{} top --endpoint 127.0.0.1:{port} --interval-ms 300 --tls-ca {} \
         --tls-server-name localhost --user sre --password-file {}",
        wattd_bin().display(),
        ca.ca_pem.display(),
        password_file.display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "24",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Until the run shows up with a non-zero power (two scrapes are needed for watts).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut screen = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout)
            .into_owned();
        if pkg_watts(&screen) > 0.0 {
            break;
        }
    }
    let _ = tmux(&["send-keys", "-t", &session, "q"]);
    let mut gone = false;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        if !tmux(&["has-session", "-t", &session]).status.success() {
            gone = true;
            break;
        }
    }
    if !gone {
        let _ = tmux(&["kill-session", "-t", &session]);
    }
    let _ = agent.stop();
    assert!(screen.contains("wattd top"), "{screen}");
    assert!(
        screen.lines().any(|l| l.starts_with("topdemo")),
        "run not shown:\n{screen}"
    );
    assert!(screen.contains("powercap/measured"), "{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(screen.lines().count() <= 24);
    assert!(
        pkg_watts(&screen) > 0.0,
        "no live package watts for the run:\n{screen}"
    );
    assert!(gone, "top did not exit on q");
}

/// The PKG W column of the run's row.
fn pkg_watts(screen: &str) -> f64 {
    screen
        .lines()
        .find(|l| l.starts_with("topdemo"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|w| w.parse().ok())
        .unwrap_or(0.0)
}
