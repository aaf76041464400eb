//! systemd's notifications from the real `wattd run`: a datagram socket bound where
//! `NOTIFY_SOCKET` points, as systemd's is, and a watchdog period in `WATCHDOG_USEC` and
//! `WATCHDOG_PID`. READY after the first interval, RELOADING then READY at SIGHUP, STOPPING at
//! SIGTERM, and keep-alives at most every quarter of the watchdog's period however fast the
//! daemon ticks (each one is a socket, a connect, a send and a close).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::metrics::{free_port, Daemon, Host};

/// The messages received until `until` holds of them (30 s at most), each with when it came.
fn receive_until(
    sock: &UnixDatagram,
    got: &mut Vec<(Instant, String)>,
    daemon: &mut Daemon,
    log: &std::path::Path,
    until: impl Fn(&[(Instant, String)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !until(got) {
        let text = || std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "30 s without the notifications awaited; got {:?}; log:\n{}",
            got.iter().map(|(_, m)| m).collect::<Vec<_>>(),
            text()
        );
        if let Some(status) = daemon.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("wattd exited ({status}); log:\n{}", text());
        }
        match sock.recv(&mut buf) {
            Ok(n) => got.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
            )),
            // The read timeout, or a signal (the project's CI has delivered some to test
            // threads): wait again.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("receiving: {e}"),
        }
    }
}

fn count(got: &[(Instant, String)], msg: &str) -> usize {
    got.iter().filter(|(_, m)| m == msg).count()
}

fn signal(daemon: &Daemon, sig: &str) {
    let pid = daemon.0.as_ref().unwrap().id().to_string();
    let status = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}: {status}");
}

#[test]
fn ready_reloading_stopping_and_keep_alives_at_a_quarter_of_the_watchdog_period() {
    let work = tempfile::tempdir().unwrap();
    let host = Host::start(work.path());
    let notify = work.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let config = work.path().join("wattd.toml");
    // 100 Hz, a watchdog of 400 ms: keep-alives at most every 100 ms, not every 10 ms tick.
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"it-notify\"\n[sampling]\ninterval_ms = 10\n[host]\nroot = {:?}\n\
             cgroup_root = \"/sys/fs/cgroup\"\n[runs]\ncontrol_socket = {:?}\n[spool]\ndir = {:?}\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n",
            host.root,
            work.path().join("control.sock").display().to_string(),
            work.path().join("spool").display().to_string(),
            free_port(),
        ),
    )
    .unwrap();
    let log = work.path().join("wattd.log");
    // systemd gives WATCHDOG_PID as the main process's own pid: the shell's, kept by exec.
    let mut daemon = Daemon(Some(
        Command::new("sh")
            .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_wattd"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "400000")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    ));
    let mut got = Vec::new();
    receive_until(&sock, &mut got, &mut daemon, &log, |g| {
        count(g, "WATCHDOG=1") >= 6
    });
    assert_eq!(got[0].1, "READY=1", "{got:?}");
    assert_eq!(count(&got, "READY=1"), 1, "{got:?}");
    // Every 100 ms at most (a quarter of 400 ms) by the daemon's clock. Counted, not timed
    // apart (a slow tick, or this thread paused, brings two close together): over the span of
    // the keep-alives, at most one per 100 ms and a few over, where one per 10 ms tick would be
    // ten times as many.
    let pings: Vec<Instant> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    let span = *pings.last().unwrap() - pings[0];
    let most = span.as_millis() / 100 + 3;
    assert!(
        pings.len() as u128 <= most,
        "{} keep-alives in {span:?} (at most {most} every 100 ms)",
        pings.len()
    );

    signal(&daemon, "-HUP");
    let from = got.len();
    receive_until(&sock, &mut got, &mut daemon, &log, |g| {
        g[from..].iter().any(|(_, m)| m == "READY=1")
    });
    let after: Vec<&str> = got[from..]
        .iter()
        .map(|(_, m)| m.as_str())
        .filter(|m| *m != "WATCHDOG=1")
        .collect();
    assert!(after[0].starts_with("RELOADING=1"), "at SIGHUP: {after:?}");
    assert_eq!(after.last(), Some(&"READY=1"), "at SIGHUP: {after:?}");

    signal(&daemon, "-TERM");
    let from = got.len();
    receive_until(&sock, &mut got, &mut daemon, &log, |g| {
        g[from..].iter().any(|(_, m)| m == "STOPPING=1")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = daemon.0.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 30 s after SIGTERM; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    daemon.0 = None;
    assert!(status.success(), "{status}");
}
