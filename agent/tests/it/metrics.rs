//! The metrics endpoint end to end: the real `wattd run` binary on a generated host tree whose
//! package counter and one run's `cpu.stat` a driver thread advances, scraped over plain TCP like
//! Prometheus would, and checked by `promtool check metrics` when it is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wattd_collectors::synth::{HostTree, ZoneSpec};

/// Kills the daemon if the test fails before stopping it.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port nobody listens on right now (bind port 0, read it, let it go).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP exchange; `None` while nothing listens yet.
fn http(addr: SocketAddr, request: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8(out).expect("the response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    Some((head.to_owned(), body.to_owned()))
}

/// Rewrites a counter file in place with one same-size write: the agent keeps these files open
/// and preads them, so a rename would leave it reading the old inode, and a truncating write
/// could be seen empty.
fn pwrite(path: &Path, text: &str) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(text.as_bytes(), 0).unwrap();
}

/// Every sample line parsed, with checks that the text is well formed: a HELP and a TYPE for
/// every family before its samples, a float value on every sample.
fn parse_exposition(text: &str) -> (BTreeMap<String, String>, Vec<(String, f64)>) {
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helps.insert(name.to_owned()), "two HELP lines for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "odd type: {line}"
            );
            assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
        } else {
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "odd line {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample before TYPE: {line}");
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            samples.push((series.to_owned(), v));
        }
    }
    (types, samples)
}

fn value(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

#[test]
fn a_running_daemon_serves_well_formed_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostTree::new(dir.path().join("host"));
    host.cpus(1, 2, 1).unwrap();
    host.proc_stat(&[(100, 100), (100, 100)]).unwrap();
    // Zero-padded counters, so every update is one same-size write.
    let zone = host
        .zone(&ZoneSpec::new(
            "intel-rapl:0",
            "package-0",
            &format!("{:020}", 1_000_000),
        ))
        .unwrap();
    let energy_file = zone.join("energy_uj");
    let run_dir = "sys/fs/cgroup/flowzart.slice/run-abc.scope";
    let cpu_stat = host
        .write(
            format!("{run_dir}/cpu.stat"),
            format!("usage_usec {:020}\n", 0),
        )
        .unwrap();
    host.write(format!("{run_dir}/cgroup.events"), "populated 1\n")
        .unwrap();

    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("wattd.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"it-metrics\"\n[sampling]\ninterval_ms = 200\n[host]\nroot = {:?}\n\
             cgroup_root = \"/sys/fs/cgroup\"\n[runs]\ncontrol_socket = {:?}\n[spool]\ndir = {:?}\n\
             [metrics]\nlisten = \"{addr}\"\nfinished_run_ttl_s = 60\n",
            host.root().display().to_string(),
            work.join("control.sock").display().to_string(),
            work.join("spool").display().to_string(),
        ),
    )
    .unwrap();

    // The driver: 10 W on the package, the run busy on half a CPU.
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut energy, mut usage) = (1_000_000u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                energy += 200_000;
                usage += 10_000;
                pwrite(&energy_file, &format!("{energy:020}\n"));
                pwrite(&cpu_stat, &format!("usage_usec {usage:020}\n"));
            }
        })
    };

    let log_path = work.join("wattd.log");
    let mut daemon = Daemon(Some(
        Command::new(env!("CARGO_BIN_EXE_wattd"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    ));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Scrape until a few intervals have been attributed to the run.
    let deadline = Instant::now() + Duration::from_secs(30);
    let run_series = "wattd_run_energy_joules_total{run_id=\"abc\",domain=\"package\"}";
    let (head, body) = loop {
        assert!(
            Instant::now() < deadline,
            "no useful scrape within 30 s; log:\n{}",
            log()
        );
        if let Some(c) = daemon.0.as_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("wattd exited early ({status}); log:\n{}", log());
            }
        }
        if let Some((head, body)) = http(addr, "GET /metrics HTTP/1.1\r\nHost: it\r\n\r\n") {
            let (_, samples) = parse_exposition(&body);
            let intervals = value(&samples, "wattd_intervals_total").unwrap_or(0.0);
            let run = value(&samples, run_series).unwrap_or(0.0);
            if intervals >= 3.0 && run > 0.0 {
                break (head, body);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let (types, samples) = parse_exposition(&body);
    for (family, kind) in [
        ("wattd_run_energy_joules_total", "counter"),
        ("wattd_host_energy_joules_total", "counter"),
        ("wattd_measured_energy_joules_total", "counter"),
        ("wattd_power_watts", "gauge"),
        ("wattd_tick_duration_seconds", "histogram"),
        ("wattd_intervals_total", "counter"),
        ("wattd_gaps_total", "counter"),
        ("wattd_quarantined_total", "counter"),
        ("wattd_spool_bytes", "gauge"),
        ("wattd_spool_unacked_batches", "gauge"),
        ("wattd_spool_coarsened_intervals_total", "counter"),
        ("wattd_runs_tracked", "gauge"),
        ("wattd_metrics_runs_dropped_total", "counter"),
        ("wattd_tracker_read_errors_total", "counter"),
    ] {
        assert_eq!(
            types.get(family).map(String::as_str),
            Some(kind),
            "{family}:\n{body}"
        );
    }
    let get = |s: &str| value(&samples, s).unwrap_or_else(|| panic!("{s} missing:\n{body}"));
    let measured = get(
        "wattd_measured_energy_joules_total{domain=\"package\",package=\"0\",source=\"powercap\",quality=\"measured\"}",
    );
    assert!(measured > 0.0, "{body}");
    // Conservation, as far as floats allow: what the run got plus the host's parts is what was
    // measured (the run is the only one).
    let host: f64 = ["active", "idle", "unattributed"]
        .iter()
        .map(|p| {
            get(&format!(
                "wattd_host_energy_joules_total{{domain=\"package\",source=\"powercap\",part=\"{p}\"}}"
            ))
        })
        .sum();
    assert!((get(run_series) + host - measured).abs() < 1e-5, "{body}");
    let watts = get("wattd_power_watts{domain=\"package\",package=\"0\"}");
    assert!(watts > 0.0 && watts < 100.0, "{watts} W:\n{body}");
    assert_eq!(get("wattd_runs_tracked"), 1.0, "{body}");
    assert!(get("wattd_spool_bytes") > 0.0, "{body}");
    assert!(get("wattd_tick_duration_seconds_count") >= 3.0, "{body}");
    assert_eq!(
        get("wattd_tick_duration_seconds_bucket{le=\"+Inf\"}"),
        get("wattd_tick_duration_seconds_count"),
        "{body}"
    );

    // Anything but /metrics is a 404.
    let (head, _) = http(addr, "GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    promtool_check(&body);

    stop.store(true, Ordering::Relaxed);
    driver.join().unwrap();
    let mut child = daemon.0.take().unwrap();
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}; log:\n{}", log());
    assert!(
        log().contains("metrics endpoint listening"),
        "log:\n{}",
        log()
    );
}

/// `promtool check metrics` on a real scrape (Debian package `prometheus`).
fn promtool_check(body: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            wattd_testkit::skip(
                "promtool check of the scrape",
                format!("promtool ({e}; Debian package prometheus)"),
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
