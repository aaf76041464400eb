//! `Daemon::start`: the spool first (if it cannot be opened there is nowhere to keep
//! measurements), then the energy sources, the run tracker, the control socket, the metrics
//! endpoint and the shipper, and the time the agent was down recorded as a gap.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use prost::Message as _;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use wattd_collectors::cgroup::{RunTracker, TrackerConfig};
use wattd_collectors::probe::{self, ProbeOptions};
use wattd_collectors::topology::Topology;
use wattd_collectors::HostRoot;
use wattd_proto::v1;

use super::ticker::Ticker;
use super::{Daemon, Fd, LogReload, Shipping, Signals};
use crate::attribution::host::HostBalance;
use crate::attribution::idle::IdleTracker;
use crate::attribution::totals::Totals;
use crate::attribution::DramPolicy;
use crate::config::{Config, Reloadable};
use crate::control::{ControlConfig, ControlRequest, ControlServer};
use crate::gpu::GpuSource;
use crate::metrics::{self, Metrics};
use crate::records;
use crate::sampler::{GapCause, GapRecord, Meters, Sampler, Stamp};
use crate::sealer::{SealPolicy, Sealer};
use crate::shipper::{ShipState, Shipper, ShipperStats};
use crate::spool::SpoolConfig;

/// The longest NVML may take to initialise and enumerate GPUs at start.
const GPU_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The node id: configured (`[node] id`), else the host's `/etc/machine-id` (under `[host]
/// root`, like every other host file), else the host name. The one rule: `wattd identity` makes
/// the node's key with it too (a key made under another id is refused here).
pub fn node_id(cfg: &Config) -> String {
    if let Some(id) = &cfg.node_id {
        return id.clone();
    }
    let path = HostRoot::new(&cfg.host_root).join("etc/machine-id");
    if let Ok(s) = wattd_collectors::hostfs::read_bounded(&path, 128, "") {
        let s = s.trim();
        if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return s.to_owned();
        }
    }
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(h) if !h.is_empty() => h.to_owned(),
        _ => "unknown-node".to_owned(),
    }
}

/// The kernel's boot id: the frame of reference of monotonic timestamps. Read from the running
/// kernel, not under the host root: the timestamps are this kernel's clock even when the
/// counters come from a simulated or captured tree.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether the tracker reads each run's `memory.current` at every tick: only the DRAM
/// `memory` policy weighs by it (else one read per run per tick is saved).
pub(super) fn reads_memory(dram: DramPolicy) -> bool {
    dram == DramPolicy::Memory
}

/// When batches are sealed: `[spool] seal_every_ms` of `[sampling] interval_ms` intervals.
pub(super) fn seal_policy(r: &Reloadable) -> anyhow::Result<SealPolicy> {
    SealPolicy::by_time(
        Duration::from_millis(r.interval_ms),
        Duration::from_millis(r.spool_seal_every_ms),
    )
    .context("seal policy")
}

/// A ticker of `interval_ms`, its first tick one period from now.
pub(super) fn ticker(interval_ms: u64) -> anyhow::Result<Ticker> {
    Ticker::new(Duration::from_millis(interval_ms))
        .with_context(|| format!("the sampling clock (a timerfd of {interval_ms} ms)"))
}

impl Daemon {
    /// Builds the daemon from its configuration: opens the spool and every source, starts the
    /// control socket, the metrics endpoint and the shipper, and records the time since the
    /// last sealed interval as an agent-down gap. Must run inside a tokio runtime. Fails where
    /// measuring or keeping measurements is impossible (the spool, an energy source, the
    /// topology, the tracker and its events, the signal handlers); the optional parts (GPUs,
    /// BMC, control socket, metrics, shipper) are logged and left off.
    pub async fn start(cfg: Config, log_reload: LogReload) -> anyhow::Result<Daemon> {
        let root = HostRoot::new(&cfg.host_root);
        let node = node_id(&cfg);
        let boot = boot_id();

        let (mut sealer, key_born_unix_ns) = open_spool(&cfg, &node)?;
        let previous = previous_interval(&sealer);

        // Sources.
        let mut popts = ProbeOptions::new(root.clone());
        popts.estimator = cfg.estimator;
        popts.gpus = cfg.gpu.enabled;
        popts.hwmon = wattd_collectors::hwmon::MeterOptions {
            read_timeout: Duration::from_millis(cfg.gpu.read_timeout_ms),
            gpu_max_watts: cfg.gpu.max_watts,
        };
        popts.hwmon_declared = cfg.hwmon_power.clone();
        let sel = probe::select(&popts);
        if sel.meters.is_empty() {
            bail!("no energy source can be used on this host; `wattd probe` says why");
        }
        for c in &sel.report.chosen {
            tracing::info!(domain = %c.domain, package = ?c.package, source = %c.source, quality = ?c.quality, "energy source chosen");
        }
        for p in &sel.report.problems {
            tracing::warn!(problem = %p, "probe");
        }
        let (mut gpus, gpu_unmeasured) = start_gpus(&cfg, &root);
        let topo = Topology::read(&root).context("reading CPU topology")?;
        let package_cpus: BTreeMap<u32, u32> = topo
            .cpus_by_package()
            .into_iter()
            .map(|(p, c)| (p, c.len() as u32))
            .collect();

        // The code of the start so far (configuration, spool, probe) runs once: unmapped before
        // the tracker's first listing, the peak of a start among many runs has less of it.
        release_cold_code("probe");

        // Runs.
        let mut tcfg = TrackerConfig::new(root.clone());
        tcfg.cgroup_root = cfg.cgroup_root.clone();
        tcfg.patterns = cfg.reloadable.patterns.clone();
        tcfg.perf_counters = cfg.runs.perf_counters;
        tcfg.perf_counters_max = cfg.runs.perf_counters_max;
        tcfg.cgroup_trace = cfg.runs.cgroup_trace;
        tcfg.perf_split = root.is_live();
        tcfg.read_memory = reads_memory(cfg.reloadable.policy.dram);
        let mut tracker = RunTracker::new(tcfg).context("starting the run tracker")?;
        // Baseline: runs already there are billed from now on, not for their past.
        let baseline = tracker.tick(0);
        if let Some(why) = &baseline.perf_counters_disabled {
            tracing::warn!(
                reason = %why,
                "no perf counters for runs: the tail of a run removed before its final read is \
                 recovered from its parent only, and is lost where the parent cannot tell"
            );
        }
        match &baseline.cgroup_trace_disabled {
            Some(why) => tracing::warn!(
                reason = %why,
                "no cgroup trace (eBPF): a run removed before its final read, or before it was \
                 known, is billed from its parent's residual rather than exactly"
            ),
            None => tracing::info!(
                "cgroup trace (eBPF) on: runs made from now on are counted from their creation"
            ),
        }
        // SAFETY: the tracker owns this inotify descriptor and keeps it open, unreplaced, for as
        // long as it lives; `Daemon::events` is declared before `Daemon::tracker`, so dropped
        // first.
        let events = unsafe { AsyncFd::register(Fd(tracker.events_fd().as_raw_fd())) }
            .context("watching cgroup events")?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let control = start_control(&cfg, &shutdown_rx);
        let mut metrics = Metrics::new(
            Duration::from_secs(cfg.metrics.finished_run_ttl_s),
            metrics::DEFAULT_MAX_RUNS,
        );
        metrics.set_gpu_unmeasured(gpu_unmeasured);
        let metrics_text = start_metrics_endpoint(&cfg, &mut metrics, &shutdown_rx);
        let ship_stats = Arc::new(ShipperStats::default());
        let shipping = start_shipper(&cfg, &sealer, &ship_stats, &shutdown_rx);
        metrics.set_ledger_configured(cfg.ledger.is_some());

        let idle = IdleTracker::new(
            cfg.attribution.idle_window_s.saturating_mul(1_000_000),
            cfg.attribution.idle_declared.clone(),
        );
        // The GPUs were opened (and have been gathering usage) since the probe: start them over
        // now, with the first interval.
        if let Some(g) = &mut gpus {
            g.rebaseline().await;
        }
        let start = Stamp::now();
        let meters = Meters::open(sel.meters);
        let next_index = previous.as_ref().map_or(0, |i| i.index + 1);
        let mut sampler = Sampler::new(
            idle,
            cfg.estimator,
            cfg.reloadable.policy,
            next_index,
            start,
        );
        // The BMC, for the platform meter: its own thread, never waited for.
        let bmc = match &cfg.platform {
            Some(p) => match crate::bmc::BmcSource::spawn(p.bmc.clone()) {
                Ok(b) => {
                    sampler = sampler
                        .with_platform(p.max_gap_ms.saturating_mul(1_000_000), p.bmc.max_watts);
                    tracing::info!(url = %p.bmc.url, "platform meter: polling the BMC over Redfish");
                    Some(b)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "platform meter disabled: cannot start the BMC thread");
                    None
                }
            },
            None => None,
        };
        if let Some(gap) = downtime_gap(previous.as_ref(), &sealer, &boot, start) {
            sealer.push_gap(records::gap(&gap), start.mono_ns);
            metrics.record_gap(GapCause::AgentDown);
        }

        let signals = Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        };
        Ok(Daemon {
            ticker: ticker(cfg.reloadable.interval_ms)?,
            cfg,
            log_reload,
            boot,
            host: HostBalance::new(package_cpus.values().sum()),
            package_cpus,
            events,
            tracker,
            meters,
            readings: Vec::new(),
            sampler,
            sealer,
            gpus,
            bmc,
            control,
            shipping,
            ship_stats,
            metrics,
            metrics_text,
            shutdown,
            signals,
            totals: Totals::default(),
            started_unix: BTreeMap::new(),
            labelled: HashSet::new(),
            ready: false,
            watchdog: super::watchdog::Watchdog::from_env(),
            coarsened_intervals: 0,
            last_render: None,
            key_born_unix_ns,
            unattributed_warned: None,
            platform_warned: None,
        })
    }
}

/// [`crate::resident::release_cold_code`], logged (`after`: what start-up had done).
pub(super) fn release_cold_code(after: &str) {
    match crate::resident::release_cold_code() {
        Ok(r) => tracing::debug!(
            after,
            mappings = r.mappings,
            kib = r.bytes / 1024,
            "start-up code unmapped"
        ),
        Err(e) => tracing::debug!(after, error = %e, "start-up code not (all) unmapped"),
    }
}

/// Opens (or creates) the spool, with the node's key; returns the sealer and when the current
/// key was made.
fn open_spool(cfg: &Config, node: &str) -> anyhow::Result<(Sealer, i64)> {
    // The spool holds the node's private key and every measurement: owner only.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.spool.dir)
            .with_context(|| format!("creating spool dir {}", cfg.spool.dir.display()))?;
    }
    let mut spool_cfg = SpoolConfig::new(&cfg.spool.dir, node).with_max_bytes(cfg.spool.max_bytes);
    spool_cfg.retain_acked = Duration::from_secs(cfg.spool.retain_acked_s);
    spool_cfg.retain_acked_bytes =
        SpoolConfig::retain_bytes_for(cfg.spool.max_bytes, cfg.spool.retain_acked_share);
    let policy_seal = seal_policy(&cfg.reloadable)?;
    let (sealer, report) = Sealer::open(spool_cfg, policy_seal).context("opening the spool")?;
    // When the current key was made (its file's mtime: a rotation renames a fresh file into
    // place), for `[identity] rotate_after_s`.
    let key_born_unix_ns: i64 = std::fs::metadata(cfg.spool.dir.join(crate::identity::KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    tracing::info!(dir = %cfg.spool.dir.display(), last_seq = report.last_seq, acked_seq = report.acked_seq,
        torn_tails = report.torn_tails.len(), damaged = report.damage.len(), "spool open");
    for t in &report.torn_tails {
        tracing::warn!(?t, "cut a torn tail from the spool");
    }
    if !report.reserve {
        tracing::warn!(dir = %cfg.spool.dir.display(), "no room for the spool's reserve file: a full file system may coarsen the next interval");
    }
    Ok((sealer, key_born_unix_ns))
}

/// The last interval the spool holds, to continue the index sequence and to record the time the
/// agent was down as a gap. A spool whose last batch cannot be read back still lets the agent
/// measure: the downtime is then recorded with an unknown start.
fn previous_interval(sealer: &Sealer) -> Option<v1::Interval> {
    let previous = match last_interval(sealer) {
        Ok(p) => p,
        Err(error) => {
            tracing::error!(%error, "cannot read the last interval back from the spool");
            None
        }
    };
    if previous.is_none() && sealer.spool().last_seq() > 0 {
        tracing::warn!(last_seq = sealer.spool().last_seq(), "spool has batches but no interval was found in its tail; the downtime gap starts at an unknown time");
    }
    previous
}

/// The last interval a spool holds: its index and end.
fn last_interval(sealer: &Sealer) -> anyhow::Result<Option<v1::Interval>> {
    let spool = sealer.spool();
    let mut seq = spool.last_seq();
    // Walk back over batches without intervals (a batch of only gaps or summaries).
    let stop = seq.saturating_sub(64);
    while seq > 0 && seq > stop {
        let batches = spool
            .read_sealed(seq, 1)
            .context("reading the spool's last batch")?;
        if let Some(b) = batches.first() {
            let signed =
                v1::SignedBatch::decode(b.bytes.as_slice()).context("decoding the last batch")?;
            let batch = v1::Batch::decode(signed.batch_bytes.as_slice())
                .context("decoding the last batch")?;
            if let Some(i) = batch.intervals.into_iter().max_by_key(|i| i.index) {
                return Ok(Some(i));
            }
        }
        seq -= 1;
    }
    Ok(None)
}

/// The time the agent was down, from the end of the last sealed interval (unknown when the
/// spool has batches but none could be read back) to `start`; `None` on a fresh spool.
fn downtime_gap(
    previous: Option<&v1::Interval>,
    sealer: &Sealer,
    boot: &str,
    start: Stamp,
) -> Option<GapRecord> {
    if let Some(prev) = previous {
        let same_boot = prev.boot_id == boot && !boot.is_empty();
        tracing::info!(
            from_unix_ns = prev.end_unix_ns,
            "recording the time the agent was down as a gap"
        );
        return Some(GapRecord {
            key: None,
            start: Stamp {
                mono_ns: if same_boot { prev.end_monotonic_ns } else { 0 },
                unix_ns: prev.end_unix_ns,
            },
            end: start,
            cause: GapCause::AgentDown,
            detail: if same_boot {
                "agent restarted".into()
            } else {
                "host rebooted or agent restarted after a reboot".into()
            },
        });
    }
    if sealer.spool().last_seq() == 0 {
        return None;
    }
    // The spool has batches but its last interval cannot be read back: the agent was down from
    // an unknown time, and interval indices start again at 0. Both are declared, so the ledger
    // does not take the restart for overlapping or repeated intervals.
    Some(GapRecord {
        key: None,
        start: Stamp {
            mono_ns: 0,
            unix_ns: 0,
        },
        end: start,
        cause: GapCause::AgentDown,
        detail: "agent restarted; its last interval could not be read back, so the downtime's \
                 start is unknown and interval indices start again"
            .into(),
    })
}

/// GPUs: probed on a thread with a deadline, read on their own thread; never fatal. Returns the
/// source and how many GPUs are present but not measured.
fn start_gpus(cfg: &Config, root: &HostRoot) -> (Option<GpuSource>, usize) {
    let (report, collector) = crate::gpu::probe(&cfg.gpu, root, GPU_PROBE_TIMEOUT);
    let amd = crate::gpu::probe_amd(&cfg.gpu, root, GPU_PROBE_TIMEOUT);
    let mut reports = vec![("nvml", &report)];
    if let Some((r, _)) = &amd {
        reports.push(("amd_smi", r));
    }
    for (library, r) in &reports {
        for d in r.devices.iter() {
            tracing::info!(library, gpu = d.index, uuid = ?d.uuid, name = ?d.name, status = d.status, source = ?d.source, usage = %d.usage, detail = ?d.detail, "GPU");
        }
        if let Some(reason) = &r.reason {
            tracing::info!(library, %reason, "GPU domain");
        }
    }
    if let Some(problem) = &report.problem {
        tracing::warn!(%problem, "GPU present but not measured");
    }
    if let Some(problem) = amd.as_ref().and_then(|(r, _)| r.problem.as_ref()) {
        tracing::warn!(%problem, "AMD GPUs");
    }
    let mut unmeasured = report.unmeasured() + amd.as_ref().map_or(0, |(r, _)| r.unmeasured());
    let measured = report.measured() + amd.as_ref().map_or(0, |(r, _)| r.measured());
    let collectors: Vec<_> = collector
        .into_iter()
        .chain(amd.and_then(|(_, c)| c))
        .collect();
    let source = if collectors.is_empty() {
        None
    } else {
        match GpuSource::start(
            collectors,
            Duration::from_millis(cfg.gpu.read_timeout_ms),
            crate::gpu::POLL_PERIOD,
        ) {
            Ok(g) => Some(g),
            Err(error) => {
                tracing::error!(%error, "cannot start the GPU thread; GPUs are not measured");
                unmeasured += measured;
                None
            }
        }
    };
    (source, unmeasured)
}

/// The control socket is optional: without it, runs are still found by pattern.
fn start_control(
    cfg: &Config,
    shutdown: &watch::Receiver<bool>,
) -> Option<mpsc::Receiver<ControlRequest>> {
    // Under systemd, RuntimeDirectory= creates the socket's directory; by hand, create it.
    if let Some(dir) = cfg.runs.control_socket.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            let _ = std::fs::DirBuilder::new().mode(0o750).create(dir);
        }
    }
    let mut ccfg = ControlConfig::new(&cfg.runs.control_socket);
    ccfg.allowed_uids = cfg.runs.control_allowed_uids.clone();
    ccfg.allowed_gids = cfg.runs.control_allowed_gids.clone();
    match ControlServer::bind(ccfg) {
        Ok((server, rx)) => {
            let mut stop = shutdown.clone();
            tokio::spawn(server.serve(async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
            tracing::info!(path = %cfg.runs.control_socket.display(), "control socket listening");
            Some(rx)
        }
        Err(error) => {
            tracing::warn!(%error, "control socket unavailable; runs are found by pattern only");
            None
        }
    }
}

/// Metrics are optional too: a busy port or a bad address must not stop the measuring. The
/// HTTP thread only reads the text rendered after each tick, never the registry itself. A web
/// configuration that cannot be read leaves the endpoint off: serving without the TLS or
/// authentication it asks for would be worse than not serving. Returns where to send the text,
/// `None` when the endpoint is off.
fn start_metrics_endpoint(
    cfg: &Config,
    metrics: &mut Metrics,
    shutdown: &watch::Receiver<bool>,
) -> Option<watch::Sender<Arc<String>>> {
    let web = match &cfg.metrics.web_config {
        None => Ok(None),
        Some(path) => wattd_web::WebConfig::load(path).map(Some),
    };
    if let Ok(web) = &web {
        // Basic auth without TLS sends the password, and the tenants' series, in clear: only on
        // loopback is that no one else's to read.
        let authenticates = web
            .as_ref()
            .is_some_and(wattd_web::WebConfig::authenticates);
        let private = web.as_ref().is_some_and(|w| w.tls().is_some())
            || cfg.metrics.listen.ip().is_loopback();
        let per_run = authenticates && private;
        metrics.serve_per_run(per_run);
        if authenticates && !private {
            tracing::warn!(listen = %cfg.metrics.listen, "metrics: per-run series are not served: basic auth without TLS on a non-loopback address would send passwords and tenants' data in clear (add tls_server_config)");
        } else if !per_run {
            tracing::info!("metrics: per-run series are not served; they need an endpoint that authenticates every request ([metrics] web_config with basic_auth_users or RequireAndVerifyClientCert)");
        }
    }
    let web = match web {
        Ok(web) => web,
        Err(error) => {
            tracing::error!(%error, "metrics endpoint not started: its web configuration is unusable; measuring without it");
            return None;
        }
    };
    let (tx, rx) = watch::channel(Arc::new(metrics.render()));
    let mode = web
        .as_ref()
        .map_or_else(|| "plain HTTP".to_owned(), wattd_web::WebConfig::describe);
    let mut stop = shutdown.clone();
    // On a thread of its own: TLS handshakes and bcrypt never delay a tick.
    match wattd_web::MetricsEndpoint::spawn_thread(
        cfg.metrics.listen,
        rx,
        wattd_web::HttpLimits::default(),
        web,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ) {
        Ok((_, stats)) => {
            tracing::info!(listen = %cfg.metrics.listen, %mode, "metrics endpoint listening on /metrics");
            metrics.set_endpoint(stats);
            Some(tx)
        }
        Err(error) => {
            tracing::warn!(listen = %cfg.metrics.listen, %error, "metrics endpoint unavailable; measuring without it");
            None
        }
    }
}

/// The shipper, when a ledger is configured: a task that reads sealed batches from the spool
/// files and streams them; its acknowledgements come back to the loop, where the spool is moved.
fn start_shipper(
    cfg: &Config,
    sealer: &Sealer,
    stats: &Arc<ShipperStats>,
    shutdown: &watch::Receiver<bool>,
) -> Option<Shipping> {
    let Some(lcfg) = &cfg.ledger else {
        tracing::info!("no [ledger] configured: batches stay in the local spool");
        return None;
    };
    for problem in crate::shipper::check_tls_files(lcfg) {
        tracing::error!(%problem, "ledger TLS files: shipping will fail until this is fixed; batches stay in the spool");
    }
    let (state, state_rx) = watch::channel(ShipState::default());
    let acked = sealer.spool().acked_seq();
    let (ack_tx, ack_rx) = watch::channel(acked);
    let shipper = Shipper::new(
        lcfg.clone(),
        &cfg.spool.dir,
        acked,
        state_rx,
        ack_tx,
        stats.clone(),
    );
    tokio::spawn(shipper.run(shutdown.clone()));
    tracing::info!(endpoint = %lcfg.endpoint, acked_seq = acked, "shipping to the ledger");
    Some(Shipping {
        state,
        acked: ack_rx,
        drain: lcfg.drain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_id_is_configured_else_the_host_roots_machine_id_else_the_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::defaults();
        cfg.host_root = dir.path().to_owned();
        let uname = rustix::system::uname();
        let host_name = uname
            .nodename()
            .to_str()
            .unwrap_or("unknown-node")
            .to_owned();
        // No machine-id under the host root: the host name (the live /etc/machine-id is not
        // read for a simulated or captured host).
        assert_eq!(node_id(&cfg), host_name);
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let id_file = dir.path().join("etc/machine-id");
        std::fs::write(&id_file, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(node_id(&cfg), "0123456789abcdef0123456789abcdef");
        // Not an id (a hostile or damaged file): the host name, never the file's text.
        std::fs::write(&id_file, "../../etc/passwd\n").unwrap();
        assert_eq!(node_id(&cfg), host_name);
        std::fs::write(&id_file, "a".repeat(4096)).unwrap();
        assert_eq!(node_id(&cfg), host_name);
        cfg.node_id = Some("worker-17".into());
        assert_eq!(node_id(&cfg), "worker-17");
    }
}
