//! The daemon's own sections (`[node]`, `[identity]`, `[sampling]`, `[host]`, `[runs]`,
//! `[estimator]`, `[log]`), and the assembly of every section into a [`Config`]: the others are
//! read beside their owners.

use std::path::PathBuf;

use wattd_collectors::estimator::EstimatorModel;

use super::*;

/// `[runs]` but its patterns (reloadable): the control socket and the per-run counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunsSection {
    /// `control_socket`.
    pub control_socket: PathBuf,
    /// `control_allowed_uids`: besides root and the daemon's own user.
    pub control_allowed_uids: Vec<u32>,
    /// `control_allowed_gids`.
    pub control_allowed_gids: Vec<u32>,
    /// `perf_counters`: per-run perf `task-clock` counters (the tails of runs removed before
    /// their final read: shares of the parent's residual, or counted; the per-package split on
    /// the live host).
    pub perf_counters: bool,
    /// `perf_counters_max`: the most perf counters open at once across runs (one per CPU per
    /// run, about 1.5 KB of the kernel's memory each); runs beyond it have none.
    pub perf_counters_max: usize,
    /// `cgroup_trace`: the kernel's CPU time of each run cgroup traced by eBPF from its
    /// creation (the exact usage of a run removed before its final read, or before it was
    /// known).
    pub cgroup_trace: bool,
}

impl Default for RunsSection {
    fn default() -> Self {
        RunsSection {
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            control_allowed_uids: Vec::new(),
            control_allowed_gids: Vec::new(),
            perf_counters: true,
            perf_counters_max: wattd_collectors::cgroup::DEFAULT_PERF_COUNTERS_MAX,
            cgroup_trace: true,
        }
    }
}

/// Every section of `raw`, each over its defaults, problems into `v`.
pub(super) fn read_all(v: &mut Validator<'_>, raw: &raw::File) -> Config {
    let mut cfg = Config::defaults();
    if let Some(t) = v.section("node", &raw.node) {
        cfg.node_id = node_id(v, &t.id);
    }
    if let Some(t) = v.section("identity", &raw.identity) {
        if let Some(s) = rotate_after_s(v, &t.rotate_after_s) {
            cfg.identity_rotate_after_s = s;
        }
    }
    if let Some(t) = v.section("sampling", &raw.sampling) {
        if let Some(ms) = v.int(&t.interval_ms, "sampling.interval_ms", 10, 60_000) {
            cfg.reloadable.interval_ms = ms;
        }
    }
    if let Some(t) = v.section("host", &raw.host) {
        if let Some(r) = v.string(&t.root, "host.root") {
            cfg.host_root = PathBuf::from(r);
        }
        if let Some(r) = v.string(&t.cgroup_root, "host.cgroup_root") {
            cfg.cgroup_root = Some(PathBuf::from(r));
        }
    }
    if let Some(t) = v.section("runs", &raw.runs) {
        cfg.runs = runs(v, t, &mut cfg.reloadable.patterns);
    }
    let attribution = v.section("attribution", &raw.attribution);
    let calibration = v.section("calibration", &raw.calibration);
    cfg.attribution =
        AttributionSection::read(attribution, calibration, v, &mut cfg.reloadable.policy);
    if let Some(t) = v.section("estimator", &raw.estimator) {
        cfg.estimator = estimator(v, t);
    }
    if let Some(t) = v.section("spool", &raw.spool) {
        cfg.spool = SpoolSection::read(t, v, &mut cfg.reloadable.spool_seal_every_ms);
    }
    if let Some(t) = v.section("ledger", &raw.ledger) {
        cfg.ledger = crate::shipper::ShipperConfig::read(t, v);
    }
    if let Some(t) = v.section("log", &raw.log) {
        if let Some(level) = v.string(&t.level, "log.level") {
            match tracing_subscriber::EnvFilter::try_new(&level) {
                Ok(_) => cfg.reloadable.log_level = Some(level),
                Err(e) => v.problem("log.level", format!("{level:?} is not a log filter: {e}")),
            }
        }
    }
    if let Some(t) = v.section("metrics", &raw.metrics) {
        cfg.metrics = MetricsSection::read(t, v);
    }
    if let Some(t) = v.section("gpu", &raw.gpu) {
        cfg.gpu = GpuConfig::read(t, v);
    }
    if let Some(t) = v.section("platform", &raw.platform) {
        cfg.platform = PlatformConfig::read(t, v);
    }
    if let Some(t) = v.section("hwmon", &raw.hwmon) {
        cfg.hwmon_power = hwmon_power(v, &t.power);
    }
    cfg
}

/// `[hwmon] power`: an array of tables `{ driver, channel, device?, domain, package? }`, each
/// a hwmon channel the operator declares the meaning of. Every problem is named with its entry
/// (its number, and its line where the array is written inline).
fn hwmon_power(
    v: &mut Validator<'_>,
    f: &raw::Field<Vec<toml::Value>>,
) -> Vec<wattd_collectors::hwmon::Declared> {
    use wattd_collectors::{hwmon::Declared, Domain, MeterKey};
    const KEY: &str = "hwmon.power";
    const KEYS: [&str; 5] = ["driver", "channel", "device", "domain", "package"];
    fn bad(v: &mut Validator<'_>, i: usize, msg: impl std::fmt::Display) {
        v.problem_in(KEY, i, format!("entry {}: {msg}", i + 1));
    }
    let Some(arr) = v.array(f, KEY, "must be an array of tables") else {
        return Vec::new();
    };
    let mut out: Vec<Declared> = Vec::new();
    // The entry number of each of `out`.
    let mut entry: Vec<usize> = Vec::new();
    for (i, item) in arr.iter().enumerate() {
        let Some(t) = item.as_table() else {
            bad(v, i, "must be a table { driver, channel, domain, package }");
            continue;
        };
        let mut ok = true;
        for k in t.keys().filter(|k| !KEYS.contains(&k.as_str())) {
            bad(
                v,
                i,
                format!("{k}: unknown key (known: {})", KEYS.join(", ")),
            );
            ok = false;
        }
        let mut text = |k: &str, required: bool| -> Option<String> {
            match t.get(k) {
                None if !required => None,
                Some(toml::Value::String(s))
                    if (1..=128).contains(&s.chars().count())
                        && !s.chars().any(char::is_control) =>
                {
                    Some(s.clone())
                }
                _ => {
                    bad(
                        v,
                        i,
                        format!("{k}: must be a string of 1 to 128 printable characters"),
                    );
                    ok = false;
                    None
                }
            }
        };
        let driver = text("driver", true);
        let channel = text("channel", true);
        let device = text("device", false);
        let domain = match t.get("domain").and_then(|d| d.as_str()) {
            Some("package") => Some(Domain::Package),
            Some("dram") => Some(Domain::Dram),
            Some("psys") => Some(Domain::Psys),
            _ => {
                bad(v, i, "domain: must be \"package\", \"dram\" or \"psys\"");
                None
            }
        };
        let package = match (domain, t.get("package")) {
            (Some(Domain::Psys), None) => Some(None),
            (Some(Domain::Psys), Some(_)) => {
                bad(
                    v,
                    i,
                    "package: psys is the whole platform's, without a package",
                );
                None
            }
            (_, Some(p)) => match p.as_integer().and_then(|p| u32::try_from(p).ok()) {
                Some(p) if p < 4096 => Some(Some(p)),
                _ => {
                    bad(v, i, "package: must be a package number from 0 to 4095");
                    None
                }
            },
            (Some(_), None) => {
                bad(v, i, "package: required for package and dram");
                None
            }
            (None, None) => None,
        };
        let (true, Some(driver), Some(channel), Some(domain), Some(package)) =
            (ok, driver, channel, domain, package)
        else {
            continue;
        };
        let key = MeterKey {
            domain,
            package,
            die: None,
        };
        if let Some(n) = out.iter().position(|x| x.key == key) {
            bad(
                v,
                i,
                format!("{key} is declared twice (entry {} too)", entry[n] + 1),
            );
            continue;
        }
        if let Some(n) = out
            .iter()
            .position(|x| x.driver == driver && x.channel == channel && x.device == device)
        {
            bad(v, i, format!("the same channel as entry {}", entry[n] + 1));
            continue;
        }
        entry.push(i);
        out.push(Declared {
            driver,
            channel,
            device,
            key,
        });
    }
    out
}

/// `[node] id`: 1 to 253 characters of a host name's alphabet.
fn node_id(v: &mut Validator<'_>, f: &raw::Field<String>) -> Option<String> {
    let id = v.string(f, "node.id")?;
    let ok = id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        v.problem(
            "node.id",
            "must be 1 to 253 characters of A-Z a-z 0-9 - _ .",
        );
        return None;
    }
    Some(id)
}

/// `[identity] rotate_after_s`: 0 (never), or at least 10 s, at most a year.
fn rotate_after_s(v: &mut Validator<'_>, f: &raw::Field<i64>) -> Option<u64> {
    let s = v.int(f, "identity.rotate_after_s", 0, 365 * 86_400)?;
    if s != 0 && s < 10 {
        v.problem(
            "identity.rotate_after_s",
            "must be 0 (never) or at least 10 seconds",
        );
        return None;
    }
    Some(s)
}

/// `[runs]`; the patterns into `patterns`.
fn runs(v: &mut Validator<'_>, t: &raw::Runs, patterns: &mut Vec<String>) -> RunsSection {
    let mut r = RunsSection::default();
    // The tracker's own grammar, so a pattern accepted here is one the daemon can run.
    let checked = v.strings(&t.patterns, "runs.patterns", |v, i, p| {
        match wattd_collectors::cgroup::RunPattern::parse(p) {
            Ok(_) => true,
            Err(wattd_collectors::HostError::BadRunRef { what, .. }) => {
                v.problem_in("runs.patterns", i, format!("{p:?} {what}"));
                false
            }
            Err(e) => {
                v.problem_in("runs.patterns", i, e.to_string());
                false
            }
        }
    });
    if let Some(pats) = checked {
        if matches!(&t.patterns, raw::Field::Given(Ok(a)) if a.is_empty()) {
            v.problem("runs.patterns", "must list at least one pattern");
        }
        *patterns = pats;
    }
    if let Some(s) = v.string(&t.control_socket, "runs.control_socket") {
        r.control_socket = PathBuf::from(s);
    }
    if let Some(ids) = v.ids(&t.control_allowed_uids, "runs.control_allowed_uids") {
        r.control_allowed_uids = ids;
    }
    if let Some(ids) = v.ids(&t.control_allowed_gids, "runs.control_allowed_gids") {
        r.control_allowed_gids = ids;
    }
    if let Some(b) = v.bool(&t.perf_counters, "runs.perf_counters") {
        r.perf_counters = b;
    }
    // Up to 16 million counters: 25 GB of the kernel's memory, far past any host's want.
    if let Some(n) = v.int(&t.perf_counters_max, "runs.perf_counters_max", 0, 1 << 24) {
        r.perf_counters_max = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(b) = v.bool(&t.cgroup_trace, "runs.cgroup_trace") {
        r.cgroup_trace = b;
    }
    r
}

/// `[estimator]`: watts as written, microwatts in the model.
fn estimator(v: &mut Validator<'_>, t: &raw::Estimator) -> EstimatorModel {
    let d = EstimatorModel::default();
    let uw = |w: f64| (w * 1e6).round() as u64;
    let idle = v.float(
        &t.idle_watts_per_package,
        "estimator.idle_watts_per_package",
        0.0,
        10_000.0,
    );
    let busy = v.float(
        &t.busy_watts_per_cpu,
        "estimator.busy_watts_per_cpu",
        0.0,
        1_000.0,
    );
    EstimatorModel {
        idle_uw_per_package: idle.map_or(d.idle_uw_per_package, uw),
        busy_uw_per_cpu: busy.map_or(d.busy_uw_per_cpu, uw),
    }
}
