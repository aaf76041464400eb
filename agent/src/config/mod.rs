//! Configuration in two phases: parse the TOML text, then validate every key into typed values,
//! reporting every problem at once with file, line and key. Every key is optional; unknown keys
//! are errors. The keys and their meaning are the stable contract of the design brief.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, Table, Value};
use wattd_collectors::estimator::EstimatorModel;
use wattd_collectors::Domain;

use crate::attribution::{DramPolicy, IdleEstimate, IdlePolicy, IdleSource};

mod sections;

/// The default pattern of run cgroups, relative to the cgroup root.
pub const DEFAULT_PATTERN: &str = "flowzart.slice/run-{run_id}.scope";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/wattd/control.sock";
/// `[identity] rotate_after_s` by default: a day.
pub const DEFAULT_ROTATE_AFTER_S: u64 = 86_400;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it came from; `None` for the embedded defaults.
    pub file: Option<PathBuf>,
    pub node_id: Option<String>,
    pub host_root: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub control_allowed_uids: Vec<u32>,
    pub control_allowed_gids: Vec<u32>,
    /// `[runs] perf_counters`: per-run perf `task-clock` counters (the tails of runs removed
    /// before their final read: shares of the parent's residual, or counted; the per-package
    /// split on the live host).
    pub perf_counters: bool,
    pub idle_window_s: u64,
    /// Declared idle power per domain, with its origin (`[attribution] idle_watts_*` is config;
    /// `[calibration]` is what `wattd calibrate` measured).
    pub idle_declared: BTreeMap<Domain, IdleEstimate>,
    pub estimator: EstimatorModel,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// `[spool] retain_acked_s`: how long acknowledged batches are kept for a restored ledger.
    pub spool_retain_acked_s: u64,
    /// `[spool] retain_acked_share`: at most this share of `max_bytes` of them.
    pub spool_retain_acked_share: f64,
    /// `[identity] rotate_after_s`: the node key's lifetime; the daemon rotates it (announced
    /// in the chain, signed by the old key) once it is this old. 0: never.
    pub identity_rotate_after_s: u64,
    /// The `[ledger]` section: where and how the shipper streams batches.
    pub ledger: Option<crate::shipper::ShipperConfig>,
    pub metrics_listen: SocketAddr,
    /// Seconds a finished run's metric series stay exported (`[metrics] finished_run_ttl_s`).
    pub metrics_finished_run_ttl_s: u64,
    /// `[metrics] web_config`: TLS and basic auth of the endpoint, in the Prometheus exporter
    /// toolkit's YAML format. Per-run series are served only when it authenticates every request.
    pub metrics_web_config: Option<PathBuf>,
    /// `[gpu]`: NVIDIA GPUs through NVML.
    pub gpu: GpuConfig,
    /// The keys SIGHUP applies without a restart.
    pub reloadable: Reloadable,
    /// `[platform]`: the node's BMC, for the platform meter (none by default).
    pub platform: Option<PlatformConfig>,
}

/// The keys a running daemon takes on SIGHUP; every other key takes effect at a restart. The
/// daemon keeps the one it runs on and replaces it whole by the reloaded file's (a key whose new
/// value its component refuses keeps the old value).
#[derive(Clone, Debug, PartialEq)]
pub struct Reloadable {
    /// `[sampling] interval_ms`.
    pub interval_ms: u64,
    /// `[runs] patterns`.
    pub patterns: Vec<String>,
    /// `[attribution] idle_policy`.
    pub idle_policy: IdlePolicy,
    /// `[attribution] dram_policy`.
    pub dram_policy: DramPolicy,
    /// `[attribution] platform_policy`: how the platform meter's energy is divided.
    pub platform_policy: crate::attribution::PlatformPolicy,
    /// `[spool] seal_every_ms`: intervals are sealed into one batch (one signature, one
    /// fdatasync) at most this often; at 1 Hz sampling and the default, every interval is its own
    /// batch. What a crash can lose (to the agent-down gap of the next start) is at most this
    /// much time, plus the interval in hand.
    pub spool_seal_every_ms: u64,
    /// Log filter (`[log] level`, tracing's EnvFilter syntax: `info`, `wattd=debug,warn`);
    /// `RUST_LOG` wins at start.
    pub log_level: Option<String>,
}

impl Reloadable {
    /// The attribution policy these keys name.
    pub fn policy(&self) -> crate::attribution::Policy {
        crate::attribution::Policy {
            idle: self.idle_policy,
            dram: self.dram_policy,
            platform: self.platform_policy,
        }
    }
}

/// `[platform]`: the BMC whose wall energy, less the other meters, is the platform meter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    pub bmc: crate::bmc::BmcConfig,
    /// `max_gap_ms`: power readings further apart are not integrated across (a gap).
    pub max_gap_ms: u64,
}

/// `[gpu]`: whether and how NVIDIA GPUs are measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// `enabled` (default true): probe NVML at start; without libnvidia-ml, the driver or
    /// permission the GPU domain is disabled with the reason, never fatal.
    pub enabled: bool,
    /// `library`: libnvidia-ml to load; default `libnvidia-ml.so.1` from the loader's path.
    pub library: Option<PathBuf>,
    /// `read_timeout_ms`: the most one interval waits for NVML; a read that takes longer is a
    /// SOURCE_FAILURE gap of every GPU, and the loop goes on.
    pub read_timeout_ms: u64,
    /// `max_watts`: the most one GPU can draw; deltas above 3x this over an interval are
    /// quarantined.
    pub max_watts: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            library: None,
            read_timeout_ms: 1_000,
            max_watts: Domain::Gpu.default_max_watts(),
        }
    }
}

impl Config {
    /// The embedded defaults.
    pub fn defaults() -> Self {
        Config {
            file: None,
            node_id: None,
            host_root: PathBuf::from("/"),
            cgroup_root: None,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            control_allowed_uids: Vec::new(),
            control_allowed_gids: Vec::new(),
            perf_counters: true,
            idle_window_s: 600,
            idle_declared: BTreeMap::new(),
            estimator: EstimatorModel::default(),
            spool_dir: crate::spool::default_data_dir(),
            spool_max_bytes: crate::spool::SpoolConfig::DEFAULT_MAX_BYTES,
            spool_retain_acked_s: crate::spool::SpoolConfig::DEFAULT_RETAIN_ACKED_S,
            spool_retain_acked_share: crate::spool::SpoolConfig::DEFAULT_RETAIN_ACKED_SHARE,
            identity_rotate_after_s: DEFAULT_ROTATE_AFTER_S,
            ledger: None,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9447)),
            metrics_finished_run_ttl_s: 300,
            metrics_web_config: None,
            gpu: GpuConfig::default(),
            reloadable: Reloadable {
                interval_ms: 1000,
                patterns: vec![DEFAULT_PATTERN.to_owned()],
                idle_policy: IdlePolicy::Proportional,
                dram_policy: DramPolicy::Cpu,
                platform_policy: crate::attribution::PlatformPolicy::Proportional,
                spool_seal_every_ms: crate::sealer::SealPolicy::DEFAULT_SEAL_EVERY_MS,
                log_level: None,
            },
            platform: None,
        }
    }
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

/// Every problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} problem{} in the configuration",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Loads a config file, or the embedded defaults when `path` is `None`.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let Some(path) = path else {
        return Ok(Config::defaults());
    };
    let label = path.display().to_string();
    let text = match std::fs::read(path) {
        Ok(b) if b.len() > 1 << 20 => return Err(one(&label, 0, "", "larger than 1 MiB")),
        Ok(b) => match String::from_utf8(b) {
            Ok(s) => s,
            Err(_) => return Err(one(&label, 0, "", "not valid UTF-8")),
        },
        Err(e) => return Err(one(&label, 0, "", &format!("cannot read: {e}"))),
    };
    let mut c = parse(&label, &text)?;
    c.file = Some(path.to_owned());
    Ok(c)
}

fn one(file: &str, line: usize, key: &str, msg: &str) -> ConfigError {
    ConfigError {
        problems: vec![Problem {
            file: file.to_owned(),
            line,
            key: key.to_owned(),
            message: msg.to_owned(),
        }],
    }
}

/// Walks the document, checking every key against the schema.
struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn line_of(&self, span: Option<std::ops::Range<usize>>) -> usize {
        span.map_or(0, |s| {
            self.text.as_bytes()[..s.start.min(self.text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        })
    }

    fn problem(&mut self, span: Option<std::ops::Range<usize>>, key: &str, msg: impl Into<String>) {
        let line = self.line_of(span);
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            key: key.to_owned(),
            message: msg.into(),
        });
    }

    /// Checks a section: it must be a table whose keys are all in `known`.
    fn section<'t>(&mut self, root: &'t Table, name: &str, known: &[&str]) -> Option<&'t Table> {
        let (k, item) = root.get_key_value(name)?;
        let Some(t) = item.as_table() else {
            self.problem(
                k.span(),
                name,
                "must be a table, like [".to_owned() + name + "]",
            );
            return None;
        };
        for (key, _) in t.iter() {
            if !known.contains(&key) {
                let span = t.get_key_value(key).and_then(|(k, _)| k.span());
                self.problem(
                    span,
                    &format!("{name}.{key}"),
                    format!("unknown key (known: {})", known.join(", ")),
                );
            }
        }
        Some(t)
    }

    fn get<'t>(
        &self,
        t: &'t Table,
        key: &str,
    ) -> Option<(&'t Value, Option<std::ops::Range<usize>>)> {
        let (k, item) = t.get_key_value(key)?;
        match item {
            Item::Value(v) => Some((v, v.span().or_else(|| k.span()))),
            _ => Some((&DUMMY_NOT_A_VALUE, k.span())),
        }
    }

    fn string(&mut self, t: &Table, sec: &str, key: &str) -> Option<String> {
        let (v, span) = self.get(t, key)?;
        match v.as_str() {
            Some(s) if !s.is_empty() && !s.contains('\0') => Some(s.to_owned()),
            Some(_) => {
                self.problem(
                    span,
                    &format!("{sec}.{key}"),
                    "must not be empty or contain NUL",
                );
                None
            }
            None => {
                self.problem(span, &format!("{sec}.{key}"), "must be a string");
                None
            }
        }
    }

    fn int(&mut self, t: &Table, sec: &str, key: &str, lo: i64, hi: i64) -> Option<u64> {
        let (v, span) = self.get(t, key)?;
        match v.as_integer() {
            Some(i) if (lo..=hi).contains(&i) => Some(i as u64),
            Some(i) => {
                self.problem(
                    span,
                    &format!("{sec}.{key}"),
                    format!("{i} is out of range {lo} ..= {hi}"),
                );
                None
            }
            None => {
                self.problem(span, &format!("{sec}.{key}"), "must be an integer");
                None
            }
        }
    }

    fn float(&mut self, t: &Table, sec: &str, key: &str, lo: f64, hi: f64) -> Option<f64> {
        let (v, span) = self.get(t, key)?;
        let f = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        match f {
            Some(f) if f.is_finite() && (lo..=hi).contains(&f) => Some(f),
            Some(f) => {
                self.problem(
                    span,
                    &format!("{sec}.{key}"),
                    format!("{f} is out of range {lo} ..= {hi}"),
                );
                None
            }
            None => {
                self.problem(span, &format!("{sec}.{key}"), "must be a number");
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        t: &Table,
        sec: &str,
        key: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(t, sec, key)?;
        match options.iter().find(|(n, _)| *n == s) {
            Some((_, v)) => Some(*v),
            None => {
                let span = self.get(t, key).and_then(|(_, s)| s);
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.problem(
                    span,
                    &format!("{sec}.{key}"),
                    format!("{s:?} is not one of {}", names.join(", ")),
                );
                None
            }
        }
    }

    fn id_list(&mut self, t: &Table, sec: &str, key: &str) -> Option<Vec<u32>> {
        let (v, span) = self.get(t, key)?;
        let Some(arr) = v.as_array() else {
            self.problem(
                span,
                &format!("{sec}.{key}"),
                "must be an array of integers",
            );
            return None;
        };
        let mut out = Vec::new();
        for item in arr.iter() {
            match item.as_integer().and_then(|i| u32::try_from(i).ok()) {
                Some(i) => out.push(i),
                None => self.problem(
                    item.span().or(span.clone()),
                    &format!("{sec}.{key}"),
                    "every entry must be an id from 0 to 4294967295",
                ),
            }
        }
        Some(out)
    }
}

static DUMMY_NOT_A_VALUE: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| Value::from(false));

/// Parses and validates config text. `file` labels problems.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let doc = match ImDocument::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let mut c = Checker {
                file,
                text,
                problems: Vec::new(),
            };
            let msg = e.message().to_owned();
            c.problem(e.span(), "", format!("TOML syntax: {msg}"));
            return Err(ConfigError {
                problems: c.problems,
            });
        }
    };
    let mut c = Checker {
        file,
        text,
        problems: Vec::new(),
    };
    let mut cfg = Config::defaults();
    let root: &Table = &doc;
    const SECTIONS: [&str; 14] = [
        "gpu",
        "log",
        "node",
        "identity",
        "sampling",
        "host",
        "runs",
        "attribution",
        "calibration",
        "estimator",
        "spool",
        "ledger",
        "metrics",
        "platform",
    ];
    for (key, _) in root.iter() {
        if !SECTIONS.contains(&key) {
            let span = root.get_key_value(key).and_then(|(k, _)| k.span());
            c.problem(
                span,
                key,
                format!("unknown section (known: {})", SECTIONS.join(", ")),
            );
        }
    }
    sections::read_all(&mut c, root, &mut cfg);
    if c.problems.is_empty() {
        Ok(cfg)
    } else {
        c.problems.sort_by_key(|p| p.line);
        Err(ConfigError {
            problems: c.problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under systemd (User=wattd, StateDirectory=wattd) the default spool is the state
    /// directory, not a relative `wattd-data` under a read-only `/`; another service's state
    /// directory is not taken.
    #[test]
    fn default_spool_is_wattds_state_directory_under_systemd() {
        use crate::spool::data_dir_for;
        let state = |v: &str| Some(std::ffi::OsString::from(v));
        assert_eq!(
            data_dir_for(false, state("/var/lib/wattd")),
            PathBuf::from("/var/lib/wattd")
        );
        assert_eq!(
            data_dir_for(true, state("/var/lib/other:/srv/state/wattd")),
            PathBuf::from("/srv/state/wattd")
        );
        // Unset, empty, relative, or another service's: the old defaults.
        assert_eq!(data_dir_for(false, None), PathBuf::from("./wattd-data"));
        assert_eq!(
            data_dir_for(true, state("")),
            PathBuf::from("/var/lib/wattd")
        );
        assert_eq!(
            data_dir_for(false, state("wattd")),
            PathBuf::from("./wattd-data")
        );
        assert_eq!(
            data_dir_for(false, state("/var/lib/gitlab-runner")),
            PathBuf::from("./wattd-data")
        );
    }

    /// `[platform]`: the BMC; every problem named with its key and line.
    #[test]
    fn platform_section() {
        let ok = parse(
            "f",
            "[attribution]\nplatform_policy = \"host\"\n[platform]\nurl = \"https://bmc:8443\"\n\
             ca_file = \"/etc/wattd/bmc-ca.pem\"\npoll_ms = 500\n",
        )
        .unwrap();
        let p = ok.platform.unwrap();
        assert_eq!(p.bmc.url, "https://bmc:8443");
        assert_eq!(p.bmc.poll, std::time::Duration::from_millis(500));
        assert_eq!(p.bmc.read_timeout, std::time::Duration::from_millis(2000));
        assert_eq!(p.max_gap_ms, 5000);
        assert_eq!(
            ok.reloadable.platform_policy,
            crate::attribution::PlatformPolicy::Host
        );
        assert_eq!(Config::defaults().platform, None);
        let err = parse(
            "f",
            "[platform]\nurl = \"http://bmc\"\npoll_ms = 2000\nmax_gap_ms = 1000\nsource = \"ipmi\"\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "platform.url: \"http://bmc\": must start with https://",
            "platform.ca_file: is required",
            "platform.max_gap_ms: must be at least poll_ms + read_timeout_ms (2000 + 2000)",
            "platform.source",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("f", "").unwrap(), Config::defaults());
    }

    #[test]
    fn full_contract_parses() {
        let text = r#"
[node]
id = "worker-17"
[identity]
rotate_after_s = 3600
[sampling]
interval_ms = 250
[host]
root = "/host"
cgroup_root = "/sys/fs/cgroup"
[runs]
patterns = ["flowzart.slice/run-{run_id}.scope", "other/{run_id}"]
control_socket = "/run/wattd/c.sock"
control_allowed_uids = [1000]
perf_counters = false
[attribution]
idle_policy = "reserved"
dram_policy = "memory"
idle_watts_package = 12.5
[calibration]
idle_watts_package = 11.0
idle_watts_dram = 1.5
[estimator]
idle_watts_per_package = 20.0
busy_watts_per_cpu = 4
[spool]
dir = "/var/lib/wattd"
max_bytes = 1073741824
retain_acked_s = 3600
retain_acked_share = 0.5
seal_every_ms = 5000
[ledger]
endpoint = "https://ledger.example:7443"
ca = "/etc/wattd/ledger-ca.pem"
cert = "/etc/wattd/node.pem"
key = "/etc/wattd/node.key"
[metrics]
listen = "127.0.0.1:9447"
finished_run_ttl_s = 60
"#;
        let c = parse("f", text).unwrap();
        assert_eq!(c.reloadable.interval_ms, 250);
        assert_eq!(c.reloadable.idle_policy, IdlePolicy::Reserved);
        assert_eq!(c.reloadable.patterns.len(), 2);
        assert_eq!(
            c.idle_declared[&Domain::Package],
            IdleEstimate {
                power_uw: 12_500_000,
                source: IdleSource::Config
            }
        );
        assert_eq!(
            c.idle_declared[&Domain::Dram],
            IdleEstimate {
                power_uw: 1_500_000,
                source: IdleSource::Calibration
            }
        );
        assert_eq!(c.estimator.busy_uw_per_cpu, 4_000_000);
        assert_eq!(c.spool_retain_acked_s, 3600);
        assert_eq!(c.identity_rotate_after_s, 3600);
        assert_eq!(c.spool_retain_acked_share, 0.5);
        assert_eq!(c.reloadable.spool_seal_every_ms, 5000);
        assert!(c.ledger.is_some());
        assert_eq!(c.metrics_finished_run_ttl_s, 60);
        assert!(!c.perf_counters);
        assert!(parse("f", "").unwrap().perf_counters);
        let e = parse("f", "[runs]\nperf_counters = \"yes\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("f:2: runs.perf_counters: must be true or false"),
            "{e}"
        );
    }

    #[test]
    fn the_metrics_web_config_is_a_path_read_later() {
        // Not read here: a file that does not exist (or would not load) is the daemon's and
        // `wattd validate`'s to report.
        let c = parse(
            "wattd.toml",
            "[metrics]\nweb_config = \"/nonexistent/web.yml\"\n",
        )
        .unwrap();
        assert_eq!(
            c.metrics_web_config.as_deref(),
            Some(Path::new("/nonexistent/web.yml"))
        );
        assert_eq!(parse("wattd.toml", "").unwrap().metrics_web_config, None);
        let e = parse("wattd.toml", "[metrics]\nweb_config = \"\"\n").unwrap_err();
        assert!(
            e.problems[0]
                .to_string()
                .starts_with("wattd.toml:2: metrics.web_config: must not be empty"),
            "{e}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_line_and_key() {
        let text = "[sampling]\ninterval_ms = 5\nbogus = 1\n[runs]\npatterns = [\"/abs/{run_id}\", \"no-id\"]\n[attribution]\nidle_policy = \"evenly\"\n[mystery]\n[metrics]\nlisten = \"nowhere\"\nfinished_run_ttl_s = 0\n";
        let e = parse("wattd.toml", text).unwrap_err();
        let lines: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        let want = [
            "wattd.toml:2: sampling.interval_ms: 5 is out of range 10 ..= 60000",
            "wattd.toml:3: sampling.bogus: unknown key",
            "wattd.toml:5: runs.patterns: \"/abs/{run_id}\" must be relative",
            "wattd.toml:5: runs.patterns: \"no-id\" must contain {run_id} exactly once",
            "wattd.toml:7: attribution.idle_policy: \"evenly\" is not one of proportional, reserved, host",
            "wattd.toml:8: mystery: unknown section",
            "wattd.toml:10: metrics.listen: \"nowhere\" is not an address:port",
            "wattd.toml:11: metrics.finished_run_ttl_s: 0 is out of range 1 ..= 86400",
        ];
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
        for (got, want) in lines.iter().zip(want) {
            assert!(got.starts_with(want), "{got} does not start with {want}");
        }
    }

    #[test]
    fn key_rotation_is_never_or_at_least_ten_seconds() {
        let e = parse("w.toml", "[identity]\nrotate_after_s = 5\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("w.toml:2: identity.rotate_after_s: must be 0 (never) or at least 10"),
            "{e}"
        );
        assert_eq!(
            parse("w.toml", "[identity]\nrotate_after_s = 0\n")
                .unwrap()
                .identity_rotate_after_s,
            0
        );
        assert_eq!(Config::defaults().identity_rotate_after_s, 86_400);
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = parse("w.toml", "[node]\nid = \n").unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert_eq!(e.problems[0].line, 2, "{}", e);
        assert!(e.to_string().contains("TOML syntax"));
    }

    #[test]
    fn ledger_tuning_keys_apply_and_are_bounded() {
        let base = "[ledger]\nendpoint = \"https://l:7443\"\nca = \"/c\"\ncert = \"/n.pem\"\nkey = \"/n.key\"\n";
        let c = parse("l.toml", &format!("{base}window = 8\nheartbeat_s = 2\nmax_batches_per_s = 50\nbackoff_max_s = 9\nack_timeout_s = 4\ndrain_s = 0\n")).unwrap();
        let l = c.ledger.unwrap();
        assert_eq!(l.window, 8);
        assert_eq!(l.heartbeat, Duration::from_secs(2));
        assert_eq!(l.max_batches_per_s.get(), 50);
        assert_eq!(l.max_backoff, Duration::from_secs(9));
        assert_eq!(l.ack_timeout, Duration::from_secs(4));
        assert_eq!(l.drain, Duration::ZERO);
        let d = parse("l.toml", base).unwrap().ledger.unwrap();
        assert_eq!(d.window, crate::shipper::ShipperConfig::DEFAULT_WINDOW);
        let e = parse(
            "l.toml",
            &format!("{base}window = 0\nmax_batches_per_s = 1000000\nwindw = 3\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("l.toml:6: ledger.window: 0 is out of range 1 ..= 4096"),
            "{e}"
        );
        assert!(
            e.contains("l.toml:7: ledger.max_batches_per_s: 1000000 is out of range"),
            "{e}"
        );
        assert!(e.contains("l.toml:8: ledger.windw: unknown key"), "{e}");
    }

    #[test]
    fn wrong_types_and_partial_ledger() {
        let e = parse("w.toml", "[sampling]\ninterval_ms = \"fast\"\n[ledger]\nendpoint = \"http://x\"\n[node]\nid = \"a b\"\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("w.toml:2: sampling.interval_ms: must be an integer"),
            "{s}"
        );
        assert!(
            s.contains("w.toml:4: ledger.endpoint: must be an https:// URL"),
            "{s}"
        );
        assert!(
            s.contains("ledger: needs all of endpoint, ca, cert and key"),
            "{s}"
        );
        assert!(s.contains("w.toml:6: node.id"), "{s}");
    }
}
