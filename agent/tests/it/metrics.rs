//! The metrics endpoint end to end: the real `wattd run` binary on a generated host tree whose
//! package counter and one run's `cpu.stat` a driver thread advances, scraped like Prometheus
//! would (plain HTTP, or HTTPS with basic auth from a web configuration), by another local user
//! with curl under setpriv, and checked by `promtool check metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wattd_collectors::synth::{HostTree, ZoneSpec};

/// Kills the daemon if the test fails before stopping it.
pub(crate) struct Daemon(pub(crate) Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port nobody listens on right now (bind port 0, read it, let it go).
pub(crate) fn free_port() -> u16 {
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

/// The simulated host: a package counter at 10 W and one run, `abc`, busy on half a CPU,
/// advanced by a driver thread until dropped.
pub(crate) struct Host {
    pub(crate) root: String,
    stop: Arc<AtomicBool>,
    driver: Option<std::thread::JoinHandle<()>>,
}

impl Host {
    pub(crate) fn start(dir: &Path) -> Host {
        let host = HostTree::new(dir.join("host"));
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
        Host {
            root: host.root().display().to_string(),
            stop,
            driver: Some(driver),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
    }
}

/// A `wattd run` on the host, its metrics at `addr`, with `[metrics] extra` keys.
fn start_daemon(work: &Path, host: &Host, addr: SocketAddr, extra: &str) -> (Daemon, PathBuf) {
    std::fs::create_dir_all(work).unwrap();
    let config = work.join("wattd.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"it-metrics\"\n[sampling]\ninterval_ms = 200\n[host]\nroot = {:?}\n\
             cgroup_root = \"/sys/fs/cgroup\"\n[runs]\ncontrol_socket = {:?}\n[spool]\ndir = {:?}\n\
             [metrics]\nlisten = \"{addr}\"\nfinished_run_ttl_s = 60\n{extra}",
            host.root,
            work.join("control.sock").display().to_string(),
            work.join("spool").display().to_string(),
        ),
    )
    .unwrap();
    let log_path = work.join("wattd.log");
    let daemon = Daemon(Some(
        Command::new(env!("CARGO_BIN_EXE_wattd"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    ));
    (daemon, log_path)
}

/// Scrapes with `fetch` until `ready` holds of the samples (30 s at most); the last body.
fn scrape_until(
    daemon: &mut Daemon,
    log_path: &Path,
    mut fetch: impl FnMut() -> Option<String>,
    ready: impl Fn(&[(String, f64)]) -> bool,
) -> String {
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
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
        if let Some(body) = fetch() {
            let (_, samples) = parse_exposition(&body);
            if ready(&samples) {
                return body;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the daemon with SIGTERM; its exit status.
fn sigterm(mut daemon: Daemon) -> std::process::ExitStatus {
    let mut child = daemon.0.take().unwrap();
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

/// Stops the daemon with SIGTERM; it must exit cleanly, having served.
fn stop_daemon(daemon: Daemon, log_path: &Path) {
    let status = sigterm(daemon);
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    assert!(status.success(), "{status}; log:\n{log}");
    assert!(log.contains("metrics endpoint listening"), "log:\n{log}");
}

/// `curl` run as uid/gid 65534 (nobody, another local user), with `args`: the HTTP status (0
/// when no HTTP answer came) and the body. `None` (skipped loudly) without root, setpriv or curl.
fn curl_as_nobody(test: &str, args: &[&str]) -> Option<(u16, String)> {
    if !wattd_testkit::is_root() {
        wattd_testkit::skip(test, "root (to scrape as another user with setpriv)");
        return None;
    }
    for tool in ["setpriv", "curl"] {
        if wattd_testkit::need::which(tool).is_none() {
            wattd_testkit::skip(test, format!("{tool} (Debian packages util-linux, curl)"));
            return None;
        }
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["curl", "-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Some((code.trim().parse().unwrap_or(0), body.to_owned()))
}

const RUN_SERIES: &str = "wattd_run_energy_joules_total{run_id=\"abc\",domain=\"package\"}";

/// Without a web configuration the endpoint is plain HTTP, open to every local user, and so
/// serves the host-level series only: no run id, no tenant's energy.
#[test]
fn without_authentication_only_host_level_series_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path());
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (mut daemon, log) = start_daemon(&dir.path().join("work"), &host, addr, "");
    let body = scrape_until(
        &mut daemon,
        &log,
        || http(addr, "GET /metrics HTTP/1.1\r\nHost: it\r\n\r\n").map(|(_, b)| b),
        |s| {
            value(s, "wattd_intervals_total").unwrap_or(0.0) >= 3.0
                && value(s, "wattd_runs_tracked").unwrap_or(0.0) >= 1.0
        },
    );
    let (_, samples) = parse_exposition(&body);
    assert!(!body.contains("run_id=") && !body.contains("abc"), "{body}");
    assert_eq!(value(&samples, "wattd_metrics_per_run_series"), Some(0.0));
    // The run is tracked and measured all the same: only its series are withheld.
    assert_eq!(value(&samples, "wattd_runs_tracked"), Some(1.0), "{body}");
    let measured = value(
        &samples,
        "wattd_measured_energy_joules_total{domain=\"package\",package=\"0\",source=\"powercap\",quality=\"measured\"}",
    )
    .unwrap_or(0.0);
    assert!(measured > 0.0, "{body}");
    // Another local user sees the same: nothing of the tenant.
    let test = "without_authentication_only_host_level_series_are_served";
    if let Some((code, other)) = curl_as_nobody(test, &[&format!("http://{addr}/metrics")]) {
        assert_eq!(code, 200, "{other}");
        assert!(other.contains("wattd_intervals_total"), "{other}");
        assert!(
            !other.contains("abc") && !other.contains("run_id="),
            "{other}"
        );
    }
    promtool_check(&body);
    stop_daemon(daemon, &log);
}

/// With a web configuration (TLS, basic auth with bcrypt hashes): another local user without
/// credentials is refused (401) and learns nothing; a scraper with them gets every series,
/// per-run ones included, well formed (promtool), conserving the measured energy; refusals are
/// counted.
#[test]
fn behind_tls_and_basic_auth_a_scraper_with_credentials_gets_the_runs() {
    let test = "behind_tls_and_basic_auth_a_scraper_with_credentials_gets_the_runs";
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path());
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = wattd_tests::tls::TestCa::new(&pki, "metrics");
    let web = ca.web_config(
        &pki.join("web.yml"),
        "metrics-server",
        &[("prometheus", "correct horse")],
        None,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (mut daemon, log) = start_daemon(
        &dir.path().join("work"),
        &host,
        addr,
        &format!("web_config = {:?}\n", web.display().to_string()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = |user: Option<&str>, password: &str| {
        wattd_web::ScrapeClient::new(
            addr,
            &wattd_web::ClientOptions {
                ca: Some(ca.ca_pem.clone()),
                server_name: Some("localhost".into()),
                user: user.map(str::to_owned),
                password: user.map(|_| password.to_owned()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let good = client(Some("prometheus"), "correct horse");
    let body = scrape_until(
        &mut daemon,
        &log,
        || match rt.block_on(good.get("/metrics")) {
            Ok((status, body)) if status == 200 => Some(body),
            _ => None,
        },
        |s| {
            value(s, "wattd_intervals_total").unwrap_or(0.0) >= 3.0
                && value(s, RUN_SERIES).unwrap_or(0.0) > 0.0
        },
    );

    // Another user, without credentials, with a wrong password, or in plain HTTP.
    let url = format!("https://{addr}/metrics");
    if let Some((code, other)) = curl_as_nobody(test, &["-k", &url]) {
        assert_eq!(code, 401, "{other}");
        assert!(
            !other.contains("abc") && !other.contains("wattd_"),
            "{other}"
        );
        let (code, other) = curl_as_nobody(test, &["-k", "-u", "prometheus:guess", &url]).unwrap();
        assert_eq!(code, 401, "{other}");
        let (code, other) = curl_as_nobody(test, &[&format!("http://{addr}/metrics")]).unwrap();
        assert_ne!(code, 200, "{other}");
        assert!(!other.contains("abc"), "{other}");
    }
    for wrong in [
        client(None, ""),
        client(Some("prometheus"), "Correct horse"),
    ] {
        let (status, other) = rt.block_on(wrong.get("/metrics")).unwrap();
        assert_eq!(status, 401, "{other}");
    }

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
        ("wattd_gpu_unmeasured_devices", "gauge"),
        ("wattd_gpu_unattributed_pids_total", "counter"),
        ("wattd_spool_bytes", "gauge"),
        ("wattd_spool_unacked_batches", "gauge"),
        ("wattd_spool_coarsened_intervals_total", "counter"),
        ("wattd_runs_tracked", "gauge"),
        ("wattd_metrics_runs_dropped_total", "counter"),
        ("wattd_metrics_per_run_series", "gauge"),
        ("wattd_metrics_requests_refused_total", "counter"),
        ("wattd_tracker_read_errors_total", "counter"),
    ] {
        assert_eq!(
            types.get(family).map(String::as_str),
            Some(kind),
            "{family}:\n{body}"
        );
    }
    let get = |s: &str| value(&samples, s).unwrap_or_else(|| panic!("{s} missing:\n{body}"));
    assert_eq!(get("wattd_metrics_per_run_series"), 1.0);
    let measured = get(
        "wattd_measured_energy_joules_total{domain=\"package\",package=\"0\",source=\"powercap\",quality=\"measured\"}",
    );
    assert!(measured > 0.0, "{body}");
    // Conservation, as far as floats allow: what the run got plus the host's parts is what was
    // measured (the run is the only one).
    let host_parts: f64 = ["active", "idle", "unattributed"]
        .iter()
        .map(|p| {
            get(&format!(
                "wattd_host_energy_joules_total{{domain=\"package\",source=\"powercap\",part=\"{p}\"}}"
            ))
        })
        .sum();
    assert!(
        (get(RUN_SERIES) + host_parts - measured).abs() < 1e-5,
        "{body}"
    );
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
    promtool_check(&body);

    // Anything but /metrics is a 404; the refusals above are counted (after the next tick).
    let (status, _) = rt.block_on(good.get("/")).unwrap();
    assert_eq!(status, 404);
    let refused = "wattd_metrics_requests_refused_total{reason=\"unauthenticated\"}";
    let body = scrape_until(
        &mut daemon,
        &log,
        || rt.block_on(good.get("/metrics")).ok().map(|(_, b)| b),
        |s| value(s, refused).unwrap_or(0.0) >= 2.0,
    );
    assert!(body.contains(refused), "{body}");
    stop_daemon(daemon, &log);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("TLS, basic auth (1 users)"),
        "the log says how the endpoint is secured"
    );
}

/// A web configuration the daemon cannot use (here: TLS without its key) leaves the endpoint
/// off, never serving without the security it asks for, and the measuring on.
#[test]
fn an_unusable_web_config_leaves_the_endpoint_off_and_the_measuring_on() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path());
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: /nonexistent/c.pem\n",
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let work = dir.path().join("work");
    let (mut daemon, log_path) = start_daemon(
        &work,
        &host,
        addr,
        &format!("web_config = {:?}\n", web.display().to_string()),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Measuring: the run's energy reaches the spool.
    loop {
        assert!(
            Instant::now() < deadline,
            "nothing measured; log:\n{}",
            log()
        );
        if let Some(c) = daemon.0.as_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("wattd exited ({status}); log:\n{}", log());
            }
        }
        let out = Command::new(env!("CARGO_BIN_EXE_wattd"))
            .args(["runs", "--format", "json", "--data-dir"])
            .arg(work.join("spool"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("\"abc\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        log().contains("metrics endpoint not started: its web configuration is unusable"),
        "{}",
        log()
    );
    assert!(
        log().contains("cert_file and key_file are both required"),
        "{}",
        log()
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "something listens on {addr}"
    );
    assert!(sigterm(daemon).success(), "{}", log());
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
