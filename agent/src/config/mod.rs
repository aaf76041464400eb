//! Configuration: the file's text read by the [`crate::schema`]'s two layers (serde into raw
//! sections, then each section validated beside the component that owns it), every
//! problem of a file reported at once with file, line and key. Every key is optional; unknown
//! keys are errors. The keys and their meaning are the stable contract of the design brief; each
//! default is defined once, by its section's `Default`.

use std::fmt;
use std::path::{Path, PathBuf};

use wattd_collectors::estimator::EstimatorModel;

use crate::attribution::section::AttributionSection;
use crate::attribution::Policy;
use crate::metrics::section::MetricsSection;
use crate::schema::raw;
use crate::schema::Validator;
use crate::spool::section::SpoolSection;

pub use crate::bmc::PlatformConfig;
pub use crate::gpu::GpuConfig;
pub use crate::schema::Problem;
pub use sections::RunsSection;

mod sections;

/// The default pattern of run cgroups, relative to the cgroup root.
pub const DEFAULT_PATTERN: &str = "flowzart.slice/run-{run_id}.scope";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/wattd/control.sock";
/// `[identity] rotate_after_s` by default: a day.
pub const DEFAULT_ROTATE_AFTER_S: u64 = 86_400;
/// `[sampling] interval_ms` by default.
pub const DEFAULT_INTERVAL_MS: u64 = 1_000;

/// A validated configuration: one validated section per component, the reloadable keys apart.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it came from; `None` for the embedded defaults.
    pub file: Option<PathBuf>,
    /// `[node] id`.
    pub node_id: Option<String>,
    /// `[host] root`.
    pub host_root: PathBuf,
    /// `[host] cgroup_root`.
    pub cgroup_root: Option<PathBuf>,
    /// `[runs]` but its patterns (reloadable).
    pub runs: RunsSection,
    /// `[attribution]` but its policies (reloadable), and `[calibration]`.
    pub attribution: AttributionSection,
    /// `[estimator]`.
    pub estimator: EstimatorModel,
    /// `[spool]` but `seal_every_ms` (reloadable).
    pub spool: SpoolSection,
    /// `[identity] rotate_after_s`: the node key's lifetime; the daemon rotates it (announced
    /// in the chain, signed by the old key) once it is this old. 0: never.
    pub identity_rotate_after_s: u64,
    /// The `[ledger]` section: where and how the shipper streams batches.
    pub ledger: Option<crate::shipper::ShipperConfig>,
    /// `[metrics]`.
    pub metrics: MetricsSection,
    /// `[gpu]`: NVIDIA GPUs through NVML.
    pub gpu: GpuConfig,
    /// The keys SIGHUP applies without a restart.
    pub reloadable: Reloadable,
    /// `[platform]`: the node's BMC, for the platform meter (none by default).
    pub platform: Option<PlatformConfig>,
    /// `[hwmon] power`: hwmon channels the operator declares the meaning of (none by default).
    pub hwmon_power: Vec<wattd_collectors::hwmon::Declared>,
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
    /// `[attribution] idle_policy`, `dram_policy` and `platform_policy`.
    pub policy: Policy,
    /// `[spool] seal_every_ms`: intervals are sealed into one batch (one signature, one
    /// fdatasync) at most this often; at 1 Hz sampling and the default, every interval is its own
    /// batch. What a crash can lose (to the agent-down gap of the next start) is at most this
    /// much time, plus the interval in hand.
    pub spool_seal_every_ms: u64,
    /// Log filter (`[log] level`, tracing's EnvFilter syntax: `info`, `wattd=debug,warn`);
    /// `RUST_LOG` wins at start.
    pub log_level: Option<String>,
}

impl Default for Reloadable {
    fn default() -> Self {
        Reloadable {
            interval_ms: DEFAULT_INTERVAL_MS,
            patterns: vec![DEFAULT_PATTERN.to_owned()],
            policy: Policy::DEFAULT,
            spool_seal_every_ms: crate::sealer::SealPolicy::DEFAULT_SEAL_EVERY_MS,
            log_level: None,
        }
    }
}

impl Config {
    /// The embedded defaults: every section's own.
    pub fn defaults() -> Self {
        Config {
            file: None,
            node_id: None,
            host_root: PathBuf::from("/"),
            cgroup_root: None,
            runs: RunsSection::default(),
            attribution: AttributionSection::default(),
            estimator: EstimatorModel::default(),
            spool: SpoolSection::default(),
            identity_rotate_after_s: DEFAULT_ROTATE_AFTER_S,
            ledger: None,
            metrics: MetricsSection::default(),
            gpu: GpuConfig::default(),
            reloadable: Reloadable::default(),
            platform: None,
            hwmon_power: Vec::new(),
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
        Ok(b) if b.len() > 1 << 20 => return Err(one(&label, "larger than 1 MiB")),
        Ok(b) => match String::from_utf8(b) {
            Ok(s) => s,
            Err(_) => return Err(one(&label, "not valid UTF-8")),
        },
        Err(e) => return Err(one(&label, &format!("cannot read: {e}"))),
    };
    let mut c = parse(&label, &text)?;
    c.file = Some(path.to_owned());
    Ok(c)
}

/// A problem of the whole file.
fn one(file: &str, msg: &str) -> ConfigError {
    let mut v = Validator::new(file, "");
    v.problem_at(None, msg);
    ConfigError {
        problems: v.into_problems(),
    }
}

/// Parses and validates config text. `file` labels problems.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let mut v = Validator::new(file, text);
    let raw = match raw::read(text) {
        Ok(r) => r,
        Err(e) => {
            let msg = e.message().to_owned();
            v.problem_at(e.span(), format!("TOML syntax: {msg}"));
            return Err(ConfigError {
                problems: v.into_problems(),
            });
        }
    };
    for name in raw.unknown.keys() {
        v.unknown_section(name, &raw::SECTIONS);
    }
    let cfg = sections::read_all(&mut v, &raw);
    let problems = v.into_problems();
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError { problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{IdleEstimate, IdlePolicy, IdleSource};
    use std::time::Duration;
    use wattd_collectors::Domain;

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

    /// `[hwmon] power`: declared channels; every problem named with its entry's line.
    #[test]
    fn hwmon_power_declarations() {
        let ok = parse(
            "f",
            "[hwmon]\npower = [\n  { driver = \"power_meter\", channel = \"CPU Power Socket 0\", \
             domain = \"package\", package = 0 },\n  { driver = \"apm_xgene\", channel = \"power2\", \
             device = \"APMC0D29:00\", domain = \"psys\" },\n]\n",
        )
        .unwrap();
        let keys: Vec<String> = ok.hwmon_power.iter().map(|d| d.key.to_string()).collect();
        assert_eq!(ok.hwmon_power.len(), 2, "{keys:?}");
        assert_eq!(ok.hwmon_power[0].channel, "CPU Power Socket 0");
        assert_eq!(ok.hwmon_power[0].key.package, Some(0));
        assert_eq!(ok.hwmon_power[1].key.domain, Domain::Psys);
        assert_eq!(ok.hwmon_power[1].device.as_deref(), Some("APMC0D29:00"));
        assert!(Config::defaults().hwmon_power.is_empty());
        let err = parse(
            "f",
            "[hwmon]\npower = [\n  \"power1\",\n  { driver = \"x\", channel = \"power1\", domain = \"gpu\", package = 0 },\n  \
             { driver = \"x\", channel = \"power1\", domain = \"psys\", package = 1 },\n  \
             { driver = \"x\", channel = \"power1\", domain = \"package\" },\n  \
             { driver = \"\", channel = \"power1\", domain = \"dram\", package = 0, watts = 3 },\n  \
             { driver = \"x\", channel = \"a\", domain = \"package\", package = 0 },\n  \
             { driver = \"y\", channel = \"b\", domain = \"package\", package = 0 },\n  \
             { driver = \"x\", channel = \"a\", domain = \"package\", package = 1 },\n  \
             { driver = \"x\\u0007\", channel = { a = 1 }, domain = \"package\", package = -1 },\n]\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "f:3: hwmon.power: entry 1: must be a table",
            "f:4: hwmon.power: entry 2: domain: must be \"package\", \"dram\" or \"psys\"",
            "f:5: hwmon.power: entry 3: package: psys is the whole platform's",
            "f:6: hwmon.power: entry 4: package: required for package and dram",
            "f:7: hwmon.power: entry 5: watts: unknown key",
            "f:7: hwmon.power: entry 5: driver: must be a string",
            "f:9: hwmon.power: entry 7: package/package-0 is declared twice (entry 6 too)",
            "f:10: hwmon.power: entry 8: the same channel as entry 6",
            "f:11: hwmon.power: entry 9: driver: must be a string of 1 to 128 printable",
            "f:11: hwmon.power: entry 9: channel: must be a string",
            "f:11: hwmon.power: entry 9: package: must be a package number",
        ] {
            assert!(err.contains(want), "{want:?} not in:\n{err}");
        }
        // Written as an array of tables: every problem still names its entry.
        let err = parse(
            "f",
            "[[hwmon.power]]\ndriver = \"x\"\nchannel = \"c\"\ndomain = \"package\"\npackage = 0\n\
             [[hwmon.power]]\ndriver = \"x\"\nchannel = \"d\"\ndomain = \"dram\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("hwmon.power: entry 2: package: required"),
            "{err}"
        );
        let long = "c".repeat(129);
        let err = parse(
            "f",
            &format!("[hwmon]\npower = [{{ driver = \"x\", channel = \"{long}\", domain = \"psys\" }}]\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("entry 1: channel: must be a string of 1 to 128"),
            "{err}"
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
            ok.reloadable.policy.platform,
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
perf_counters_max = 4096
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
        assert_eq!(c.reloadable.policy.idle, IdlePolicy::Reserved);
        assert_eq!(c.reloadable.patterns.len(), 2);
        assert_eq!(
            c.attribution.idle_declared[&Domain::Package],
            IdleEstimate {
                power_uw: 12_500_000,
                source: IdleSource::Config
            }
        );
        assert_eq!(
            c.attribution.idle_declared[&Domain::Dram],
            IdleEstimate {
                power_uw: 1_500_000,
                source: IdleSource::Calibration
            }
        );
        assert_eq!(c.estimator.busy_uw_per_cpu, 4_000_000);
        assert_eq!(c.spool.retain_acked_s, 3600);
        assert_eq!(c.identity_rotate_after_s, 3600);
        assert_eq!(c.spool.retain_acked_share, 0.5);
        assert_eq!(c.reloadable.spool_seal_every_ms, 5000);
        assert!(c.ledger.is_some());
        assert_eq!(c.metrics.finished_run_ttl_s, 60);
        assert!(!c.runs.perf_counters);
        assert_eq!(c.runs.perf_counters_max, 4096);
        assert!(parse("f", "").unwrap().runs.perf_counters);
        assert_eq!(
            parse("f", "").unwrap().runs.perf_counters_max,
            wattd_collectors::cgroup::DEFAULT_PERF_COUNTERS_MAX
        );
        let e = parse("f", "[runs]\nperf_counters_max = -1\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("f:2: runs.perf_counters_max: -1 is out of range 0 ..= 16777216"),
            "{e}"
        );
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
            c.metrics.web_config.as_deref(),
            Some(Path::new("/nonexistent/web.yml"))
        );
        assert_eq!(parse("wattd.toml", "").unwrap().metrics.web_config, None);
        let e = parse("wattd.toml", "[metrics]\nweb_config = \"\"\n").unwrap_err();
        assert!(
            e.problems[0]
                .to_string()
                .starts_with("wattd.toml:2: metrics.web_config: must not be empty"),
            "{e}"
        );
    }

    /// The problems of `e`, in order, each starting with its line of `want`.
    fn assert_problems(e: &ConfigError, want: &[&str]) {
        let lines: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
        for (got, want) in lines.iter().zip(want) {
            assert!(got.starts_with(want), "{got} does not start with {want}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_line_and_key() {
        let text = "[sampling]\ninterval_ms = 5\nbogus = 1\n[runs]\npatterns = [\"/abs/{run_id}\", \"no-id\"]\n[attribution]\nidle_policy = \"evenly\"\n[mystery]\n[metrics]\nlisten = \"nowhere\"\nfinished_run_ttl_s = 0\n";
        let e = parse("wattd.toml", text).unwrap_err();
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
        assert_problems(&e, &want);
    }

    /// Each entry of an array on its own line; tables made implicitly (`[a.b]` without `[a]`),
    /// a section that is not a table and a date where a table belongs: each named on its line,
    /// none ending the reading of the rest.
    #[test]
    fn odd_shapes_are_named_on_their_lines() {
        let text = "node = 1979-05-27\n[runs]\npatterns = [\n  \"ok/{run_id}\",\n  \"/abs/{run_id}\",\n  7,\n]\ncontrol_allowed_uids = [1, \"x\"]\n[sampling.interval_ms]\nx = 1\n[gpu.sub]\ny = 2\n[log]\nlevel = 5\nlog = 5\nmetrics = 3\n";
        let e = parse("w.toml", text).unwrap_err();
        let want = [
            "w.toml:1: node: must be a table, like [node]",
            "w.toml:5: runs.patterns: \"/abs/{run_id}\" must be relative",
            "w.toml:6: runs.patterns: every entry must be a string",
            "w.toml:8: runs.control_allowed_uids: every entry must be an id",
            "w.toml:9: sampling.interval_ms: must be an integer",
            "w.toml:11: gpu.sub: unknown key (known: enabled, library, amd_smi, amd_smi_library, read_timeout_ms, max_watts)",
            "w.toml:14: log.level: must be a string",
            "w.toml:15: log.log: unknown key",
            "w.toml:16: log.metrics: unknown key",
        ];
        assert_problems(&e, &want);
    }

    /// A date is no string (toml's own conversion would make it one); a table where a value
    /// belongs is refused, never read as a default (the old reader took `[runs.perf_counters]`
    /// for false); a hostile key named like toml's private date key is a value problem, not a
    /// syntax error that hides the file's other problems; a section may be an inline table.
    #[test]
    fn dates_tables_and_hostile_keys_where_values_belong() {
        let text = "[node]\nid = 1979-05-27\n[host]\nroot = { \"$__toml_private_datetime\" = \"x\" }\n[runs.perf_counters]\n[gpu]\nenabled.x = true\n[runs.patterns]\n";
        let e = parse("d.toml", text).unwrap_err();
        let want = [
            "d.toml:2: node.id: must be a string",
            "d.toml:4: host.root: must be a string",
            "d.toml:5: runs.perf_counters: must be true or false",
            "d.toml:7: gpu.enabled: must be true or false",
            "d.toml:8: runs.patterns: must be an array of strings",
        ];
        assert_problems(&e, &want);
        let inline = parse(
            "i.toml",
            "node = { id = \"w1\" }\nsampling = { interval_ms = 250 }\n",
        )
        .unwrap();
        assert_eq!(inline.node_id.as_deref(), Some("w1"));
        assert_eq!(inline.reloadable.interval_ms, 250);
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
