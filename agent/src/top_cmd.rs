//! `wattd top`: a live terminal view of a running wattd, read from its metrics endpoint (never by
//! measuring a second time): per run the current watts by domain and the energy so far; the
//! host, idle and unattributed shares; each meter's source and quality. Refreshes once per
//! interval, fits the terminal (80x24 over SSH), `s` changes the sort, `q` quits.
//!
//! Per-run series are served only by an endpoint that authenticates every request
//! (`[metrics] web_config`): `top` then needs the same credentials as a Prometheus scraper (the
//! server's CA for HTTPS, a client certificate if required, a basic-auth user and its password
//! from a file).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent's configuration, for `metrics.listen`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The metrics endpoint to read (overrides the configuration), e.g. 127.0.0.1:9447.
    #[arg(long, value_name = "ADDR")]
    pub endpoint: Option<SocketAddr>,
    /// Refresh period.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub interval_ms: u64,
    /// HTTPS: the CA (PEM) the endpoint's certificate must chain to (its web configuration's
    /// tls_server_config).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The name the endpoint's certificate must carry (default: the endpoint's IP address).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// A client certificate (PEM), for an endpoint that requires one; with --tls-key.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Basic-auth user (one of the web configuration's basic_auth_users); with --password-file.
    #[arg(long, value_name = "NAME", requires = "password_file")]
    pub user: Option<String>,
    /// File whose first line is the basic-auth password (never on the command line).
    #[arg(long, value_name = "FILE", requires = "user")]
    pub password_file: Option<PathBuf>,
}

/// One sample line of the exposition format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses Prometheus text exposition (only what `wattd` writes: no timestamps, no escapes
/// beyond `\\`, `\"`, `\n`). Malformed lines are skipped.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let Some(body) = rest.strip_suffix('}') else {
                    continue;
                };
                (name.to_owned(), parse_labels(body))
            }
        };
        out.push((name, labels, value));
    }
    out
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => break,
                },
                '"' => break,
                o => val.push(o),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// The endpoint's client and a runtime to drive it from this synchronous loop.
struct Scraper {
    client: wattd_web::ScrapeClient,
    rt: tokio::runtime::Runtime,
}

impl Scraper {
    fn new(addr: SocketAddr, args: &TopArgs) -> anyhow::Result<Scraper> {
        let password = match &args.password_file {
            None => None,
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("--password-file {}", f.display()))?;
                Some(text.lines().next().unwrap_or_default().to_owned())
            }
        };
        let opts = wattd_web::ClientOptions {
            ca: args.tls_ca.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            server_name: args.tls_server_name.clone(),
            user: args.user.clone(),
            password,
            host: None,
        };
        let client = wattd_web::ScrapeClient::new(addr, &opts)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the scrape runtime")?;
        Ok(Scraper { client, rt })
    }

    fn scrape(&self) -> anyhow::Result<String> {
        let (status, body) = self.rt.block_on(self.client.get("/metrics"))?;
        match status.as_u16() {
            200 => Ok(body),
            401 => anyhow::bail!(
                "the endpoint requires credentials (401): --user and --password-file, as in its \
                 web configuration's basic_auth_users"
            ),
            code => anyhow::bail!("the endpoint answered {code}: {}", body.trim()),
        }
    }
}

/// What one screen shows, computed from two scrapes.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// run -> domain -> (watts now, joules so far)
    pub runs: BTreeMap<String, BTreeMap<String, (f64, f64)>>,
    /// domain -> (active, idle, unattributed) joules of the host bucket
    pub host: BTreeMap<String, [f64; 3]>,
    /// "domain package" -> (watts, source, quality)
    pub meters: BTreeMap<String, (f64, String, String)>,
    /// The endpoint said it serves no per-run series (`wattd_metrics_per_run_series 0`).
    pub runs_withheld: bool,
    /// The node's power as its BMC last stated it (`wattd_wall_power_watts`), with a BMC.
    pub wall_w: Option<f64>,
}

/// The time between two scrapes as the agent measured it: the increase of
/// `wattd_measured_seconds_total`, so that power is energy over the time it was measured in
/// (the text is rendered at most once a second, not at each scrape). None when the text was not
/// rendered again in between; `wall` when the agent does not export it (an older one).
pub fn measured_span(prev: &[Sample], now: &[Sample], wall: f64) -> Option<f64> {
    let at = |s: &[Sample]| {
        s.iter()
            .find(|(n, _, _)| n == "wattd_measured_seconds_total")
            .map(|(_, _, v)| *v)
    };
    match (at(prev), at(now)) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        (Some(a), Some(b)) if b == a => None,
        _ => Some(wall),
    }
}

pub fn view(prev: &[Sample], now: &[Sample], dt_s: f64) -> View {
    let key = |l: &BTreeMap<String, String>, k: &str| l.get(k).cloned().unwrap_or_default();
    let prev_energy: BTreeMap<(String, String), f64> = prev
        .iter()
        .filter(|(n, _, _)| n == "wattd_run_energy_joules_total")
        .map(|(_, l, v)| ((key(l, "run_id"), key(l, "domain")), *v))
        .collect();
    let mut v = View::default();
    for (name, l, val) in now {
        match name.as_str() {
            "wattd_run_energy_joules_total" => {
                let (run, dom) = (key(l, "run_id"), key(l, "domain"));
                let before = prev_energy
                    .get(&(run.clone(), dom.clone()))
                    .copied()
                    .unwrap_or(*val);
                let watts = if dt_s > 0.0 {
                    (val - before).max(0.0) / dt_s
                } else {
                    0.0
                };
                v.runs.entry(run).or_default().insert(dom, (watts, *val));
            }
            "wattd_host_energy_joules_total" => {
                let slot = match key(l, "part").as_str() {
                    "active" => 0,
                    "idle" => 1,
                    _ => 2,
                };
                v.host.entry(key(l, "domain")).or_default()[slot] += val;
            }
            "wattd_measured_energy_joules_total" => {
                let m = format!("{} {}", key(l, "domain"), key(l, "package"));
                let e = v.meters.entry(m).or_default();
                e.1 = key(l, "source");
                e.2 = key(l, "quality");
            }
            "wattd_metrics_per_run_series" => v.runs_withheld = *val == 0.0,
            "wattd_wall_power_watts" => v.wall_w = Some(*val),
            "wattd_power_watts" => {
                let m = format!("{} {}", key(l, "domain"), key(l, "package"));
                v.meters.entry(m).or_default().0 = *val;
            }
            _ => {}
        }
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Power,
    Energy,
    Run,
}

/// Renders a view into at most `rows` lines of at most `cols` characters.
pub fn render(v: &View, sort: Sort, cols: usize, rows: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let meters: Vec<String> = v
        .meters
        .iter()
        .map(|(m, (w, src, q))| format!("{m}: {w:.1} W {src}/{q}"))
        .collect();
    lines.push(format!("wattd top   sort: {:?} (s)   quit: q", sort));
    lines.push(format!("measured  {}", meters.join("  ")));
    let host: Vec<String> = v
        .host
        .iter()
        .map(|(d, [a, i, u])| format!("{d}: host {a:.1} J idle {i:.1} J unattributed {u:.1} J"))
        .collect();
    lines.push(format!("host      {}", host.join("  ")));
    if let Some(wall) = v.wall_w {
        // The wall against its parts: the components (psys, else package and DRAM; plus the
        // GPUs) and the platform meter, as measured over the last interval.
        let watts = |dom: &str| {
            v.meters
                .iter()
                .filter(|(m, _)| m.split(' ').next() == Some(dom))
                .map(|(_, (w, _, _))| *w)
                .sum::<f64>()
        };
        let comp = if v.meters.keys().any(|m| m.starts_with("psys ")) {
            watts("psys") + watts("gpu")
        } else {
            watts("package") + watts("dram") + watts("gpu")
        };
        let plat = watts("platform");
        lines.push(format!(
            "wall      bmc {wall:.1} W   components {comp:.1} W + platform {plat:.1} W = {:.1} W",
            comp + plat
        ));
    }
    lines.push(format!(
        "{:<32} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "RUN", "PKG W", "DRAM W", "PSYS W", "PLAT W", "ENERGY J"
    ));
    let mut runs: Vec<(&String, f64, f64, [f64; 4])> = v
        .runs
        .iter()
        .map(|(r, d)| {
            let w = |dom: &str| d.get(dom).map_or(0.0, |x| x.0);
            let total_w = d.values().map(|x| x.0).sum::<f64>();
            let energy = d.values().map(|x| x.1).sum::<f64>();
            (
                r,
                total_w,
                energy,
                [w("package"), w("dram"), w("psys"), w("platform")],
            )
        })
        .collect();
    match sort {
        Sort::Power => runs.sort_by(|a, b| b.1.total_cmp(&a.1)),
        Sort::Energy => runs.sort_by(|a, b| b.2.total_cmp(&a.2)),
        Sort::Run => runs.sort_by(|a, b| a.0.cmp(b.0)),
    }
    if v.runs_withheld {
        lines.push(
            "(per-run series are not served: the endpoint has no authentication; see \
             [metrics] web_config)"
                .to_owned(),
        );
    }
    for (r, _, e, [p, d, s, pl]) in runs {
        lines.push(format!(
            "{:<32} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>12.3}",
            r, p, d, s, pl, e
        ));
    }
    lines.truncate(rows.max(1));
    lines
        .into_iter()
        .map(|l| l.chars().take(cols.max(1)).collect())
        .collect()
}

fn terminal_size() -> (usize, usize) {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(ws) if ws.ws_col > 0 && ws.ws_row > 0 => (ws.ws_col as usize, ws.ws_row as usize),
        _ => (80, 24),
    }
}

/// Puts the terminal in non-canonical, no-echo mode and restores it on drop.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn new() -> Self {
        use rustix::termios::{
            tcgetattr, tcsetattr, LocalModes, OptionalActions, SpecialCodeIndex,
        };
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut t = saved.clone();
        t.local_modes &= !(LocalModes::ICANON | LocalModes::ECHO);
        t.special_codes[SpecialCodeIndex::VMIN] = 0;
        t.special_codes[SpecialCodeIndex::VTIME] = 0;
        let _ = tcsetattr(&stdin, OptionalActions::Now, &t);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}

/// Waits up to `timeout` for a key on stdin.
fn key(timeout: Duration) -> Option<u8> {
    let stdin = std::io::stdin();
    // Beyond what a timespec holds: no bound.
    let timeout = rustix::time::Timespec::try_from(timeout).ok();
    let mut fds = [rustix::event::PollFd::new(
        &stdin,
        rustix::event::PollFlags::IN,
    )];
    if !matches!(rustix::event::poll(&mut fds, timeout.as_ref()), Ok(n) if n > 0) {
        return None;
    }
    // Unbuffered: the terminal's bytes are read one at a time, as they are polled.
    let mut b = [0u8; 1];
    matches!(rustix::io::read(&stdin, &mut b), Ok(1)).then_some(b[0])
}

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let addr = match args.endpoint {
        Some(a) => a,
        None => {
            wattd::config::load(args.config.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .metrics
                .listen
        }
    };
    let period = Duration::from_millis(args.interval_ms.clamp(100, 60_000));
    let _raw = RawMode::new();
    let mut out = std::io::stdout();
    let mut sort = Sort::Power;
    let scraper = Scraper::new(addr, args)?;
    let mut prev = parse_exposition(&scraper.scrape()?);
    let mut prev_at = Instant::now();
    let mut last: Option<View> = None;
    loop {
        let deadline = Instant::now() + period;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match key(left) {
                Some(b'q') | Some(b'Q') => {
                    let _ = writeln!(out, "\x1b[0m");
                    return Ok(());
                }
                Some(b's') | Some(b'S') => {
                    sort = match sort {
                        Sort::Power => Sort::Energy,
                        Sort::Energy => Sort::Run,
                        Sort::Run => Sort::Power,
                    }
                }
                _ => {}
            }
        }
        let now = match scraper.scrape() {
            Ok(t) => parse_exposition(&t),
            Err(e) => {
                let _ = write!(out, "\x1b[H\x1b[2Jwattd top: {e:#} (retrying; q quits)\r\n");
                let _ = out.flush();
                continue;
            }
        };
        let wall = prev_at.elapsed().as_secs_f64();
        let v = match measured_span(&prev, &now, wall) {
            Some(dt) => {
                prev_at = Instant::now();
                let v = view(&prev, &now, dt);
                prev = now;
                last = Some(v.clone());
                v
            }
            // Not rendered again since the last scrape (the agent renders at most once a
            // second): the last view stays, rather than a screen of zeros.
            None => match &last {
                Some(v) => v.clone(),
                None => view(&prev, &now, wall),
            },
        };
        let (cols, rows) = terminal_size();
        let mut screen = String::from("\x1b[H\x1b[2J");
        for l in render(&v, sort, cols, rows.saturating_sub(1)) {
            screen.push_str(&l);
            screen.push_str("\r\n");
        }
        out.write_all(screen.as_bytes())
            .context("writing to the terminal")?;
        out.flush().context("writing to the terminal")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE_A: &str = "# HELP x y\n# TYPE wattd_run_energy_joules_total counter\nwattd_run_energy_joules_total{run_id=\"a\",domain=\"package\"} 10.5\nwattd_run_energy_joules_total{run_id=\"b\\\"q\",domain=\"package\"} 1\nwattd_power_watts{domain=\"package\",package=\"0\"} 42.5\nwattd_measured_energy_joules_total{domain=\"package\",package=\"0\",source=\"powercap\",quality=\"measured\"} 100\nwattd_host_energy_joules_total{domain=\"package\",source=\"powercap\",part=\"idle\"} 7\ngarbage line\n";

    #[test]
    fn parses_what_wattd_writes_and_skips_garbage() {
        let s = parse_exposition(SCRAPE_A);
        assert_eq!(s.len(), 5);
        assert_eq!(s[1].1["run_id"], "b\"q");
        assert_eq!(s[0].2, 10.5);
    }

    /// Power is energy over the time the agent measured it in, not over the time between
    /// scrapes: the agent renders at most once a second, so a scrape may see one, two or no new
    /// renders (10 J over 2 s measured is 5 W whether 1 or 3 s passed between scrapes).
    #[test]
    fn power_is_over_the_measured_time_between_renders() {
        let at = |s: f64, j: f64| {
            parse_exposition(&format!(
                "wattd_measured_seconds_total {s}\nwattd_run_energy_joules_total{{run_id=\"a\",domain=\"package\"}} {j}\n"
            ))
        };
        let (a, b) = (at(10.0, 100.0), at(12.0, 110.0));
        let dt = measured_span(&a, &b, 3.0).unwrap();
        assert_eq!(dt, 2.0);
        assert_eq!(view(&a, &b, dt).runs["a"]["package"].0, 5.0);
        assert_eq!(measured_span(&b, &b, 1.0), None, "not rendered again");
        let old = parse_exposition(SCRAPE_A);
        assert_eq!(measured_span(&old, &old, 1.5), Some(1.5), "an older agent");
    }

    /// With a BMC, a line sets the wall beside its parts; without one there is none.
    #[test]
    fn the_wall_against_the_components() {
        let text = "wattd_wall_power_watts 120.5\n\
            wattd_power_watts{domain=\"package\",package=\"0\"} 40\n\
            wattd_power_watts{domain=\"dram\",package=\"0\"} 5\n\
            wattd_power_watts{domain=\"core\",package=\"0\"} 30\n\
            wattd_power_watts{domain=\"gpu\",package=\"0\"} 60\n\
            wattd_power_watts{domain=\"platform\",package=\"\"} 15.5\n\
            wattd_run_energy_joules_total{run_id=\"a\",domain=\"platform\"} 2\n";
        let s = parse_exposition(text);
        let lines = render(&view(&s, &s, 1.0), Sort::Power, 200, 24);
        let wall = lines.iter().find(|l| l.starts_with("wall")).unwrap();
        assert!(
            wall.contains("bmc 120.5 W")
                && wall.contains("components 105.0 W + platform 15.5 W = 120.5 W"),
            "{wall}"
        );
        assert!(lines.iter().any(|l| l.contains("PLAT W")));
        let plain = parse_exposition(SCRAPE_A);
        let lines = render(&view(&plain, &plain, 1.0), Sort::Power, 200, 24);
        assert!(!lines.iter().any(|l| l.starts_with("wall")), "{lines:?}");
    }

    #[test]
    fn watts_from_two_scrapes_and_an_80x24_screen() {
        let a = parse_exposition(SCRAPE_A);
        let b = parse_exposition(&SCRAPE_A.replace("} 10.5", "} 30.5"));
        let v = view(&a, &b, 2.0);
        assert_eq!(v.runs["a"]["package"], (10.0, 30.5));
        assert_eq!(v.runs["b\"q"]["package"].0, 0.0);
        let lines = render(&v, Sort::Power, 80, 24);
        assert!(lines.iter().all(|l| l.chars().count() <= 80));
        assert!(lines.len() <= 24);
        let first_run = lines.iter().position(|l| l.starts_with("a ")).unwrap();
        let second = lines.iter().position(|l| l.starts_with("b\"q")).unwrap();
        assert!(first_run < second, "sorted by power: {lines:?}");
        assert!(lines[1].contains("powercap/measured"));
        assert!(render(&v, Sort::Run, 20, 3).len() == 3);
        assert!(!lines.iter().any(|l| l.contains("not served")));
        let hidden = parse_exposition("wattd_metrics_per_run_series 0\n");
        let lines = render(&view(&hidden, &hidden, 1.0), Sort::Power, 200, 24);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("per-run series are not served")),
            "{lines:?}"
        );
    }
}
