//! `wattd run`: the daemon. One event loop over a closed set of events (tick, control-plane
//! message, cgroup change, signal), single-threaded so the tracker, sampler and sealer need no
//! locks. Each tick closes an interval, attributes it, seals it into the spool and commits it
//! (fdatasync) before the next. SIGTERM closes the interval in hand, seals and flushes it.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use prost::Message as _;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use wattd_collectors::cgroup::{RunTracker, TrackerConfig, UsageSnapshot};
use wattd_collectors::probe::{self, ProbeOptions};
use wattd_collectors::topology::Topology;
use wattd_collectors::HostRoot;
use wattd_proto::v1;

use crate::attribution::idle::IdleTracker;
use crate::attribution::totals::Totals;
use crate::attribution::{apportion, DramPolicy, Policy, RunUsage, Ties, Usage};
use crate::config::Config;
use crate::control::{self, ControlConfig, ControlServer};
use crate::metrics::{self, Metrics};
use crate::records;
use crate::sampler::{GapCause, GapRecord, Sampler, Stamp};
use crate::sealer::{SealPolicy, Sealer};
use crate::shipper::{signed_heartbeat, ShipState, Shipper, ShipperStats};
use crate::spool::SpoolConfig;

/// The longest NVML may take to initialise and enumerate GPUs at start.
const GPU_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The node id: configured, else `/etc/machine-id`, else the host name. The one rule: `wattd
/// identity` makes the node's key with it too (a key made under another id is refused here).
pub fn node_id(cfg: &Config) -> String {
    if let Some(id) = &cfg.node_id {
        return id.clone();
    }
    if let Ok(s) = std::fs::read_to_string("/etc/machine-id") {
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

/// Spreads a run's reserved CPUs over packages in proportion to their size, exactly.
fn spread_reserved(reserved: Option<u64>, package_cpus: &BTreeMap<u32, u32>) -> BTreeMap<u32, u64> {
    let Some(total) = reserved else {
        return BTreeMap::new();
    };
    let weights: Vec<(u32, u64)> = package_cpus.iter().map(|(p, n)| (*p, *n as u64)).collect();
    let shares = apportion(total, &weights, Ties::SmallestKey);
    weights
        .iter()
        .zip(shares)
        .map(|((p, _), s)| (*p, s))
        .filter(|(_, s)| *s > 0)
        .collect()
}

/// The tracker's snapshot in attribution's terms. The per-package usage maps are moved out
/// rather than copied (nothing after attribution reads them): no allocation per run per tick.
/// Public for the whole-tick bench.
pub fn usage_from(snap: &mut UsageSnapshot, package_cpus: &BTreeMap<u32, u32>) -> Usage {
    Usage {
        runs: snap
            .runs
            .iter_mut()
            .map(|r| RunUsage {
                run_id: r.run_id.clone(),
                cpu_us: std::mem::take(&mut r.usage_us_by_package),
                memory_bytes: r.memory_bytes,
                reserved_millicpus: spread_reserved(r.reserved_millicpus, package_cpus),
            })
            .collect(),
        // The host bucket is the tracker's balanced one: busy = runs + host.
        busy_us: snap
            .packages
            .iter()
            .map(|(p, u)| (*p, u.runs_us.saturating_add(u.host_us)))
            .collect(),
        package_cpus: package_cpus.clone(),
        host_memory_bytes: None,
        gpus: BTreeMap::new(),
        cpu_busy_unknown: !snap.busy_measured,
    }
}

/// The last interval a spool holds: its index and end, to continue the index sequence and to
/// record the time the agent was down as a gap.
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

/// Whether the tracker reads each run's `memory.current` at every tick: only the DRAM
/// `memory` policy weighs by it (else one read per run per tick is saved).
fn reads_memory(dram: DramPolicy) -> bool {
    dram == DramPolicy::Memory
}

/// A borrowed descriptor to wait on (the tracker's inotify fd, which the tracker owns).
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// How often, at most, the `/metrics` text is rendered (once per tick below 1 Hz).
const RENDER_EVERY: Duration = Duration::from_secs(1);

/// At most one warning this often about GPU processes whose cgroup cannot be read.
const UNATTRIBUTED_WARN_EVERY: Duration = Duration::from_secs(60);

/// Swaps the log filter (SIGHUP); returns why a filter was refused.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// When batches are sealed: `[spool] seal_every_ms` of `[sampling] interval_ms` intervals.
fn seal_policy(cfg: &Config) -> anyhow::Result<SealPolicy> {
    SealPolicy::by_time(
        Duration::from_millis(cfg.interval_ms),
        Duration::from_millis(cfg.spool_seal_every_ms),
    )
    .context("seal policy")
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the configuration file.
pub fn run(cfg: Config, log_reload: LogReload) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_async(cfg, log_reload))
}

async fn run_async(mut cfg: Config, log_reload: LogReload) -> anyhow::Result<()> {
    let root = HostRoot::new(&cfg.host_root);
    let node = node_id(&cfg);
    let boot = boot_id();

    // The spool first: if it cannot be opened there is nowhere to keep measurements.
    // The spool holds the node's private key and every measurement: owner only.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.spool_dir)
            .with_context(|| format!("creating spool dir {}", cfg.spool_dir.display()))?;
    }
    let mut spool_cfg = SpoolConfig::new(&cfg.spool_dir, &node).with_max_bytes(cfg.spool_max_bytes);
    spool_cfg.retain_acked = Duration::from_secs(cfg.spool_retain_acked_s);
    spool_cfg.retain_acked_bytes =
        SpoolConfig::retain_bytes_for(cfg.spool_max_bytes, cfg.spool_retain_acked_share);
    let policy_seal = seal_policy(&cfg)?;
    let (mut sealer, report) = Sealer::open(spool_cfg, policy_seal).context("opening the spool")?;
    // When the current key was made (its file's mtime: a rotation renames a fresh file into
    // place), for `[identity] rotate_after_s`.
    let mut key_born_unix_ns: i64 =
        std::fs::metadata(cfg.spool_dir.join(crate::identity::KEY_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    tracing::info!(dir = %cfg.spool_dir.display(), last_seq = report.last_seq, acked_seq = report.acked_seq,
        torn_tails = report.torn_tails.len(), damaged = report.damage.len(), "spool open");
    for t in &report.torn_tails {
        tracing::warn!(?t, "cut a torn tail from the spool");
    }
    if !report.reserve {
        tracing::warn!(dir = %cfg.spool_dir.display(), "no room for the spool's reserve file: a full file system may coarsen the next interval");
    }
    // A spool whose last batch cannot be read back still lets the agent measure: the downtime is
    // then recorded with an unknown start.
    let previous = match last_interval(&sealer) {
        Ok(p) => p,
        Err(error) => {
            tracing::error!(%error, "cannot read the last interval back from the spool");
            None
        }
    };
    if previous.is_none() && sealer.spool().last_seq() > 0 {
        tracing::warn!(last_seq = sealer.spool().last_seq(), "spool has batches but no interval was found in its tail; the downtime gap starts at an unknown time");
    }

    // Sources.
    let mut popts = ProbeOptions::new(root.clone());
    popts.estimator = cfg.estimator;
    popts.gpus = cfg.gpu.enabled;
    popts.hwmon = wattd_collectors::hwmon::MeterOptions {
        read_timeout: Duration::from_millis(cfg.gpu.read_timeout_ms),
        gpu_max_watts: cfg.gpu.max_watts,
    };
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
    // GPUs: probed on a thread with a deadline, read on their own thread; never fatal.
    let (gpu_report, gpu_collector) = crate::gpu::probe(&cfg.gpu, &root, GPU_PROBE_TIMEOUT);
    for d in gpu_report.devices.iter() {
        tracing::info!(gpu = d.index, uuid = ?d.uuid, name = ?d.name, status = d.status, source = ?d.source, usage = %d.usage, detail = ?d.detail, "GPU");
    }
    if let Some(reason) = &gpu_report.reason {
        tracing::info!(%reason, "GPU domain");
    }
    if let Some(problem) = &gpu_report.problem {
        tracing::warn!(%problem, "GPU present but not measured");
    }
    let mut gpu_unmeasured = gpu_report.unmeasured();
    let mut gpus = match gpu_collector {
        Some(c) => match crate::gpu::GpuSource::start(
            c,
            Duration::from_millis(cfg.gpu.read_timeout_ms),
            crate::gpu::POLL_PERIOD,
        ) {
            Ok(g) => Some(g),
            Err(error) => {
                tracing::error!(%error, "cannot start the NVML thread; GPUs are not measured");
                gpu_unmeasured += gpu_report.measured();
                None
            }
        },
        None => None,
    };
    let topo = Topology::read(&root).context("reading CPU topology")?;
    let package_cpus: BTreeMap<u32, u32> = topo
        .cpus_by_package()
        .into_iter()
        .map(|(p, c)| (p, c.len() as u32))
        .collect();

    // Runs.
    let mut tcfg = TrackerConfig::new(root.clone());
    tcfg.cgroup_root = cfg.cgroup_root.clone();
    tcfg.patterns = cfg.patterns.clone();
    tcfg.perf_counters = cfg.perf_counters;
    tcfg.perf_split = root.is_live();
    tcfg.read_memory = reads_memory(cfg.dram_policy);
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
    // SAFETY: the tracker owns this inotify descriptor and keeps it open, unreplaced, for as
    // long as it lives; `events` is dropped before `tracker` (declared after it, dropped first).
    let events = unsafe { AsyncFd::register(Fd(tracker.events_fd().as_raw_fd())) }
        .context("watching cgroup events")?;

    // The control socket is optional: without it, runs are still found by pattern.
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut control_rx = {
        // Under systemd, RuntimeDirectory= creates the socket's directory; by hand, create it.
        if let Some(dir) = cfg.control_socket.parent() {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt as _;
                let _ = std::fs::DirBuilder::new().mode(0o750).create(dir);
            }
        }
        let mut ccfg = ControlConfig::new(&cfg.control_socket);
        ccfg.allowed_uids = cfg.control_allowed_uids.clone();
        ccfg.allowed_gids = cfg.control_allowed_gids.clone();
        match ControlServer::bind(ccfg) {
            Ok((server, rx)) => {
                let mut stop = shutdown_rx.clone();
                tokio::spawn(server.serve(async move {
                    let _ = stop.wait_for(|s| *s).await;
                }));
                tracing::info!(path = %cfg.control_socket.display(), "control socket listening");
                Some(rx)
            }
            Err(error) => {
                tracing::warn!(%error, "control socket unavailable; runs are found by pattern only");
                None
            }
        }
    };

    // Metrics are optional too: a busy port or a bad address must not stop the measuring. The
    // HTTP task only reads the text rendered after each tick, never the registry itself.
    let mut metrics = Metrics::new(
        Duration::from_secs(cfg.metrics_finished_run_ttl_s),
        metrics::DEFAULT_MAX_RUNS,
    );
    metrics.set_gpu_unmeasured(gpu_unmeasured);
    // The first unattributable GPU process is warned about at once, then at most once a minute.
    let mut unattributed_warned: Option<Instant> = None;
    // A web configuration that cannot be read leaves the endpoint off: serving without the
    // TLS or authentication it asks for would be worse than not serving.
    let web = match &cfg.metrics_web_config {
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
            || cfg.metrics_listen.ip().is_loopback();
        let per_run = authenticates && private;
        metrics.serve_per_run(per_run);
        if authenticates && !private {
            tracing::warn!(listen = %cfg.metrics_listen, "metrics: per-run series are not served: basic auth without TLS on a non-loopback address would send passwords and tenants' data in clear (add tls_server_config)");
        } else if !per_run {
            tracing::info!("metrics: per-run series are not served; they need an endpoint that authenticates every request ([metrics] web_config with basic_auth_users or RequireAndVerifyClientCert)");
        }
    }
    let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(Arc::new(metrics.render()));
    let metrics_on = match web {
        Err(error) => {
            tracing::error!(%error, "metrics endpoint not started: its web configuration is unusable; measuring without it");
            false
        }
        Ok(web) => {
            let mode = web
                .as_ref()
                .map_or_else(|| "plain HTTP".to_owned(), wattd_web::WebConfig::describe);
            let mut stop = shutdown_rx.clone();
            // On a thread of its own: TLS handshakes and bcrypt never delay a tick.
            match wattd_web::MetricsEndpoint::spawn_thread(
                cfg.metrics_listen,
                metrics_rx,
                wattd_web::HttpLimits::default(),
                web,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            ) {
                Ok((_, stats)) => {
                    tracing::info!(listen = %cfg.metrics_listen, %mode, "metrics endpoint listening on /metrics");
                    metrics.set_endpoint(stats);
                    true
                }
                Err(error) => {
                    tracing::warn!(listen = %cfg.metrics_listen, %error, "metrics endpoint unavailable; measuring without it");
                    false
                }
            }
        }
    };

    // The shipper, when a ledger is configured: a task that reads sealed batches from the spool
    // files and streams them; its acknowledgements come back here, where the spool is moved.
    let (ship_tx, ship_rx) = tokio::sync::watch::channel(ShipState::default());
    let ship_stats = Arc::new(ShipperStats::default());
    let mut ack_rx = match &cfg.ledger {
        Some(lcfg) => {
            for problem in crate::shipper::check_tls_files(lcfg) {
                tracing::error!(%problem, "ledger TLS files: shipping will fail until this is fixed; batches stay in the spool");
            }
            let acked = sealer.spool().acked_seq();
            let (ack_tx, ack_rx) = tokio::sync::watch::channel(acked);
            let shipper = Shipper::new(
                lcfg.clone(),
                &cfg.spool_dir,
                acked,
                ship_rx,
                ack_tx,
                ship_stats.clone(),
            );
            tokio::spawn(shipper.run(shutdown_rx.clone()));
            tracing::info!(endpoint = %lcfg.endpoint, acked_seq = acked, "shipping to the ledger");
            Some(ack_rx)
        }
        None => {
            tracing::info!("no [ledger] configured: batches stay in the local spool");
            None
        }
    };
    metrics.set_ledger_configured(cfg.ledger.is_some());

    let policy = Policy {
        idle: cfg.idle_policy,
        dram: cfg.dram_policy,
        platform: cfg.platform_policy,
    };
    let idle = IdleTracker::new(
        cfg.idle_window_s.saturating_mul(1_000_000),
        cfg.idle_declared.clone(),
    );
    // The GPUs were opened (and have been gathering usage) since the probe: start them over now,
    // with the first interval.
    if let Some(g) = &mut gpus {
        g.rebaseline().await;
    }
    let start = Stamp::now();
    let next_index = previous.as_ref().map_or(0, |i| i.index + 1);
    let mut sampler = Sampler::new(sel.meters, idle, cfg.estimator, policy, next_index, start);
    // The BMC, for the platform meter: its own thread, never waited for. Changing `[platform]`
    // takes a restart (a reload keeps the thread it has).
    let bmc = match &cfg.platform {
        Some(p) => match crate::bmc::BmcSource::spawn(p.bmc.clone()) {
            Ok(b) => {
                sampler =
                    sampler.with_platform(p.max_gap_ms.saturating_mul(1_000_000), p.bmc.max_watts);
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
    let mut platform_warned: Option<Instant> = None;
    if let Some(prev) = &previous {
        // The agent was down from the end of the last sealed interval until now.
        let same_boot = prev.boot_id == boot && !boot.is_empty();
        let gap = GapRecord {
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
        };
        tracing::info!(
            from_unix_ns = prev.end_unix_ns,
            "recording the time the agent was down as a gap"
        );
        sealer.push_gap(records::gap(&gap), start.mono_ns);
        metrics.record_gap(GapCause::AgentDown);
    } else if sealer.spool().last_seq() > 0 {
        // The spool has batches but its last interval cannot be read back: the agent was down
        // from an unknown time, and interval indices start again at 0. Both are declared, so
        // the ledger does not take the restart for overlapping or repeated intervals.
        let gap = GapRecord {
            key: None,
            start: Stamp {
                mono_ns: 0,
                unix_ns: 0,
            },
            end: start,
            cause: GapCause::AgentDown,
            detail: "agent restarted; its last interval could not be read back, so the \
                     downtime's start is unknown and interval indices start again"
                .into(),
        };
        sealer.push_gap(records::gap(&gap), start.mono_ns);
        metrics.record_gap(GapCause::AgentDown);
    }

    let mut totals = Totals::default();
    let mut started_unix: BTreeMap<String, i64> = BTreeMap::new();
    // Runs whose labels are in a record already (until they finish).
    let mut labelled: std::collections::HashSet<String> = std::collections::HashSet::new();
    let period = Duration::from_millis(cfg.interval_ms);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut ready = false;
    let mut coarsened_intervals: u64 = 0;
    let mut last_render: Option<Instant> = None;

    loop {
        let stop = tokio::select! {
            _ = ticker.tick() => false,
            _ = sigterm.recv() => true,
            _ = sigint.recv() => true,
            _ = sighup.recv() => {
                // Reload without closing the interval in hand: the next tick's interval simply
                // spans the reload.
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                match crate::config::load(cfg.file.as_deref()) {
                    Ok(new) => {
                        if new.patterns != cfg.patterns {
                            match tracker.set_patterns(&new.patterns) {
                                Ok(()) => tracing::info!(patterns = ?new.patterns, "run patterns reloaded"),
                                Err(error) => tracing::error!(%error, "new run patterns refused; keeping the old ones"),
                            }
                        }
                        if new.interval_ms != cfg.interval_ms {
                            let p = Duration::from_millis(new.interval_ms);
                            ticker = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
                            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            tracing::info!(interval_ms = new.interval_ms, "sampling interval reloaded");
                        }
                        let policy = Policy { idle: new.idle_policy, dram: new.dram_policy , platform: new.platform_policy };
                        if policy != sampler.policy() {
                            tracker.set_read_memory(reads_memory(policy.dram));
                            sampler.set_policy(policy);
                            tracing::info!(?policy, "attribution policy reloaded");
                        }
                        if let Some(level) = &new.log_level {
                            if let Err(error) = log_reload(level) {
                                tracing::error!(%error, "log level refused");
                            }
                        }
                        if (new.interval_ms, new.spool_seal_every_ms) != (cfg.interval_ms, cfg.spool_seal_every_ms) {
                            match seal_policy(&new) {
                                Ok(p) => {
                                    sealer.set_policy(p);
                                    tracing::info!(max_intervals = p.max_intervals(), seal_every_ms = new.spool_seal_every_ms, "seal policy reloaded");
                                }
                                Err(error) => tracing::error!(%error, "new seal policy refused; keeping the old one"),
                            }
                        }
                        let (patterns, interval_ms, seal_every_ms, idle, dram, level) =
                            (new.patterns, new.interval_ms, new.spool_seal_every_ms, new.idle_policy, new.dram_policy, new.log_level);
                        cfg.patterns = patterns;
                        cfg.interval_ms = interval_ms;
                        cfg.spool_seal_every_ms = seal_every_ms;
                        cfg.idle_policy = idle;
                        cfg.dram_policy = dram;
                        cfg.log_level = level;
                        tracing::info!("configuration reloaded (other keys take effect at restart)");
                    }
                    Err(error) => tracing::error!(%error, "configuration reload refused; nothing changed"),
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                continue;
            }
            Some(req) = async { match control_rx.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                let result = control::apply(&mut tracker, &req.event);
                if let Err(e) = &result {
                    tracing::info!(error = %e, event = ?req.event, "control message refused");
                }
                req.respond(result);
                continue;
            }
            Ok(()) = async { match ack_rx.as_mut() { Some(rx) => rx.changed().await, None => std::future::pending().await } } => {
                let seq = ack_rx.as_mut().map_or(0, |rx| *rx.borrow_and_update());
                if seq < sealer.spool().acked_seq() {
                    // The ledger holds less than before (restored from a backup): the cursor
                    // goes back as far as the spool still holds, and the shipper re-sends.
                    let was = sealer.spool().acked_seq();
                    match sealer.spool_mut().rewind_ack(seq) {
                        Ok(to) => tracing::warn!(ledger_acked = seq, was, now = to, "acknowledged cursor moved back for a restored ledger"),
                        Err(e) if e.is_fatal() => {
                            return Err(anyhow::Error::new(e).context("moving the acknowledged cursor back (fatal)"));
                        }
                        Err(error) => tracing::warn!(%error, seq, "moving the acknowledged cursor back"),
                    }
                    continue;
                }
                match sealer.spool_mut().ack(seq) {
                    Ok(deleted) => {
                        for path in deleted {
                            tracing::debug!(path = %path.display(), "acknowledged segment deleted");
                        }
                    }
                    Err(e) if e.is_fatal() => {
                        return Err(anyhow::Error::new(e).context("recording the ledger's acknowledgement (fatal)"));
                    }
                    Err(error) => tracing::warn!(%error, seq, "recording the ledger's acknowledgement"),
                }
                continue;
            }
            guard = events.readable() => {
                if let Ok(mut g) = guard {
                    g.clear_ready();
                }
                if let Err(error) = tracker.poll_events() {
                    tracing::warn!(%error, "cgroup events");
                }
                continue;
            }
        };
        // Close the interval: usage first, then energy, read back to back. The GPUs' thread
        // closes its interval meanwhile; it is awaited with a deadline below.
        if let Some(g) = &mut gpus {
            g.request();
        }
        let tick_started = Instant::now();
        let now = Stamp::now();
        let elapsed_us = now.mono_ns.saturating_sub(sampler.last_stamp().mono_ns) / 1_000;
        let mut snap = tracker.tick(elapsed_us);
        for e in &snap.errors {
            tracing::debug!(run = ?e.run_id, error = %e.error, "usage read");
        }
        let gpu_interval = match &mut gpus {
            Some(g) => g.collect().await,
            None => crate::gpu::GpuInterval::default(),
        };
        // Without the host's busy time the runs would take the host's share of the CPU meters
        // too: those are left undivided (`cpu_busy_unknown`); the GPUs have their own usage.
        let mut u = usage_from(&mut snap, &package_cpus);
        // The snapshot's runs include those that finished this tick, so their GPU samples of
        // this interval still find them.
        let runs = crate::attribution::gpu::RunCgroups::new(
            snap.runs.iter().map(|r| (&r.cgroup, &r.run_id)),
        );
        u.gpus = crate::gpu::usage(&gpu_interval.observations, &runs);
        let unattributed: u64 = u
            .gpus
            .values()
            .map(|g| u64::from(g.unknown_cgroup_pids))
            .sum();
        if unattributed > 0 {
            metrics.add_gpu_unattributed_pids(unattributed);
            if unattributed_warned.map_or(true, |t| t.elapsed() >= UNATTRIBUTED_WARN_EVERY) {
                unattributed_warned = Some(Instant::now());
                tracing::warn!(
                    pids = unattributed,
                    "GPU-using processes whose cgroup cannot be read (exited before it was seen, \
                     another PID namespace, or /proc hidden from wattd): their share goes to the \
                     host bucket; see wattd_gpu_unattributed_pids_total"
                );
            }
        }
        let usage = Some(u);
        // The tick's end first, then the BMC's answers: one stamped before the end is in hand
        // (later ones wait in the meter for the next tick).
        let end = Stamp::now();
        if let Some(b) = &bmc {
            sampler.bmc_events(b.drain());
        }
        let interval = sampler.tick_with(end, usage, gpu_interval.readings);
        if let Some(p) = sampler.last_platform() {
            metrics.set_platform(p, bmc.as_ref().map_or(0, |b| b.dropped()));
            if let Some(why) = &p.waiting {
                if platform_warned.map_or(true, |t| t.elapsed() >= UNATTRIBUTED_WARN_EVERY) {
                    platform_warned = Some(Instant::now());
                    tracing::warn!(reason = %why, "platform meter: no platform energy (a gap)");
                }
            }
        }
        for r in snap.runs.iter().filter(|r| r.started) {
            started_unix.insert(r.run_id.to_string(), interval.start.unix_ns);
        }
        totals.add(interval.index, &interval.results);
        let mut record = records::interval(&interval, &boot, false);
        // Labels reach the records once per run, in the interval where the run first has them
        // (its start, or the tick the control plane's run_started gave them to a run found by
        // its pattern first), and again in its summary.
        for r in snap.runs.iter().filter(|r| !r.labels.is_empty()) {
            // Checked before inserting: no String is made for a run already recorded.
            if !labelled.contains(&*r.run_id) && labelled.insert(r.run_id.to_string()) {
                record.run_labels.push(wattd_proto::v1::RunLabels {
                    run_id: r.run_id.to_string(),
                    labels: records::labels(&r.labels),
                });
            }
        }
        // A run's labels (its account) and its summary exist only in this process: a batch
        // that carries either is sealed at this tick, not left to a crash's loss window.
        let mut seal_now = !record.run_labels.is_empty();
        if sealer.push_or_coarsen(record, now.mono_ns) {
            coarsened_intervals += 1;
            tracing::warn!(
                index = interval.index,
                coarsened_intervals,
                "spool full: interval merged into the pending one (coarser time, no energy lost)"
            );
        }
        for r in snap.runs.iter().filter(|r| r.finished) {
            seal_now = true;
            labelled.remove(&*r.run_id);
            let t = totals.finish(&r.run_id, interval.index);
            let started = started_unix
                .remove(&*r.run_id)
                .unwrap_or(interval.start.unix_ns);
            sealer.push_run_summary(
                records::run_summary(
                    &t,
                    started,
                    interval.end.unix_ns,
                    records::FinalUsageRecord {
                        how: r.final_usage,
                        reconciled_usage_us: r.reconciled_total_us,
                    },
                    &r.labels,
                ),
                now.mono_ns,
            );
        }
        // A batch per `[spool] seal_every_ms` of intervals (and everything pending at a stop):
        // what is not sealed yet is what a crash would lose to the next start's agent-down gap.
        let sealed = if stop || seal_now || sealer.seal_due(now.mono_ns) {
            sealer.seal(now.unix_ns)
        } else {
            Ok(None)
        };
        let merged = sealer.take_merged_at_refusal();
        if merged > 0 {
            coarsened_intervals += merged as u64;
            tracing::warn!(
                merged,
                coarsened_intervals,
                "spool full: the pending intervals were merged into a coarser one (no energy lost)"
            );
        }
        match sealed {
            Ok(_) => {}
            Err(e) if e.is_fatal() => {
                return Err(anyhow::Error::new(e)
                    .context("sealing a batch (fatal: exiting so the supervisor restarts us)"))
            }
            Err(e) => tracing::warn!(error = %e, "sealing deferred; the interval stays pending"),
        }
        if let Err(e) = sealer.commit() {
            return Err(anyhow::Error::new(e).context(
                "fdatasync of the spool failed (fatal: the kernel may have dropped the pages)",
            ));
        }
        let rotate_after_ns = i64::try_from(cfg.identity_rotate_after_s)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000_000);
        if rotate_after_ns > 0 && now.unix_ns.saturating_sub(key_born_unix_ns) >= rotate_after_ns {
            // Announced in a batch signed by the old key, synced, then the new key signs; a
            // crash at any step is finished or abandoned at the next start.
            match sealer.rotate_key(now.unix_ns) {
                Ok(seq) => {
                    key_born_unix_ns = now.unix_ns;
                    tracing::info!(
                        epoch = sealer.key().epoch(),
                        announced_seq = seq,
                        "node key rotated"
                    );
                }
                Err(e) if e.is_fatal() => {
                    return Err(anyhow::Error::new(e).context("rotating the node key (fatal)"));
                }
                Err(error) => {
                    // Tried again in a minute, not every tick (each try makes a key).
                    key_born_unix_ns = now
                        .unix_ns
                        .saturating_sub(rotate_after_ns)
                        .saturating_add(60_000_000_000);
                    tracing::warn!(%error, "node key rotation deferred; tried again in a minute");
                }
            }
        }
        if cfg.ledger.is_some() {
            let sealed = sealer.spool().sealed_seq();
            ship_tx.send_replace(ShipState {
                sealed_seq: sealed,
                heartbeat: Some(signed_heartbeat(sealer.key(), sealed, now.unix_ns)),
                signer: Some(sealer.shared_key()),
            });
        }
        metrics.record_interval(&interval);
        for r in snap.runs.iter().filter(|r| r.finished) {
            metrics.run_finished(&r.run_id, now.mono_ns);
        }
        metrics.expire(now.mono_ns);
        metrics.set_tracker(&snap.counters);
        let spool = sealer.spool();
        metrics.set_spool(spool.used_bytes(), spool.sealed_seq(), spool.acked_seq());
        metrics.set_coarsened(coarsened_intervals);
        metrics.set_shipper(&ship_stats);
        metrics.observe_tick(tick_started.elapsed());
        // Rendered here, so that a scrape costs the loop nothing, but at most once a second:
        // at 100 Hz, rendering and sealing every tick were together about half the tick's cost
        // (the daemon bench). A scrape sees the last render, at most a second (or an interval) old.
        // (Half an interval of slack: at 1 Hz a tick a little early still renders.)
        let render_after = RENDER_EVERY.saturating_sub(Duration::from_millis(cfg.interval_ms / 2));
        if metrics_on
            && (stop
                || last_render.map_or(true, |t| tick_started.duration_since(t) >= render_after))
        {
            metrics_tx.send_replace(Arc::new(metrics.render()));
            last_render = Some(tick_started);
        }
        if !ready {
            ready = true;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            tracing::info!(index = interval.index, "first interval closed; ready");
        } else {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
        if stop && !sealer.pending().is_empty() {
            // The spool was full: the stop may take the reserve's room beyond max_bytes, so the
            // coarsened intervals are sealed now rather than lost with the process.
            sealer.spool_mut().allow_final_overrun();
            let pending = sealer.pending().intervals.len();
            // Commit whatever was appended, even if a later chunk did not fit.
            let sealed = sealer.seal(now.unix_ns);
            let committed = sealer.commit();
            if let Ok(seq) = &committed {
                if cfg.ledger.is_some() {
                    ship_tx.send_replace(ShipState {
                        sealed_seq: *seq,
                        heartbeat: Some(signed_heartbeat(sealer.key(), *seq, now.unix_ns)),
                        signer: Some(sealer.shared_key()),
                    });
                }
            }
            match sealed.and(committed) {
                Ok(seq) => tracing::warn!(
                    pending,
                    sealed_seq = seq,
                    "stopping with a full spool: the last (coarsened) intervals were sealed beyond spool.max_bytes, into the reserve's room"
                ),
                Err(e) if e.is_fatal() => {
                    return Err(
                        anyhow::Error::new(e).context("sealing the last intervals at stop (fatal)")
                    )
                }
                Err(error) => tracing::error!(
                    %error,
                    pending,
                    left = sealer.pending().intervals.len(),
                    "stopping: not every pending interval could be sealed"
                ),
            }
        }
        if stop {
            if !sealer.pending().is_empty() {
                // The spool could not take the last intervals (full). Stopping anyway loses their
                // energy to the agent-down gap the next start records: say so, and exit non-zero
                // so the supervisor and the operator see it.
                let pending = sealer.pending().intervals.len();
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                anyhow::bail!(
                    "stopping with {pending} interval(s) that the full spool could not take; their time will be recorded as an agent-down gap"
                );
            }
            tracing::info!(counters = ?tracker.counters(), "run tracker counters at stop");
            tracing::info!(
                index = interval.index,
                "stopping: last interval sealed and flushed"
            );
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            break;
        }
    }
    // Give the shipper a moment to get the last batches acknowledged, so a planned stop leaves
    // nothing for the next start to send. Whatever is not acknowledged stays in the spool.
    if let (Some(rx), Some(lcfg)) = (ack_rx.as_mut(), &cfg.ledger) {
        let sealed = sealer.spool().sealed_seq();
        let deadline = tokio::time::Instant::now() + lcfg.drain;
        while *rx.borrow_and_update() < sealed {
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let acked = *rx.borrow();
        if let Err(error) = sealer.spool_mut().ack(acked) {
            tracing::warn!(%error, acked, "recording the ledger's last acknowledgement");
        }
        if acked < sealed {
            tracing::info!(
                acked,
                sealed,
                "stopping with batches not yet acknowledged; they are sent at the next start"
            );
        } else {
            tracing::info!(acked, "every sealed batch acknowledged by the ledger");
        }
    }
    let _ = shutdown_tx.send(true);
    // Let the control server see the shutdown and remove its socket file.
    for _ in 0..10 {
        if !Path::new(&cfg.control_socket).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
