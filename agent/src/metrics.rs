//! Prometheus metrics: a registry the daemon loop updates after each tick, rendered to the text
//! exposition format (version 0.0.4). The endpoint that serves the last rendering on
//! `GET /metrics` is [`wattd_web::MetricsEndpoint`] (hyper; TLS and basic auth from
//! `[metrics] web_config`).
//!
//! The registry is owned by the single-threaded daemon loop, like the tracker and the sealer; the
//! HTTP side only ever sees an immutable, already-rendered snapshot through a `watch` channel, so
//! a scrape can never block a tick, see a half-updated registry, or touch host state.
//!
//! Per-run series (`wattd_run_energy_joules_total`, labelled with run ids) belong to tenants:
//! they are rendered only when the endpoint authenticates every request
//! ([`Metrics::serve_per_run`]); otherwise any local user could read every tenant's runs.
//!
//! Energy is kept in integer microjoules, like everything else in wattd, and printed as exact
//! decimal joules (`12.000345`), so the text carries full microjoule precision whatever the
//! scraper then does with it. Label cardinality is bounded: domains, sources, packages and causes
//! are closed sets, and per-run series are capped (`max_runs`) and dropped a fixed time after the
//! run finishes.
//!
//! Ledger connection metrics (state, lag) are not here yet: there is no shipper to report them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use wattd_collectors::cgroup::TrackerCounters;
use wattd_collectors::{Domain, MeterKey, Quality, SourceKind};

use crate::attribution::UnattributedReason;
use crate::sampler::{GapCause, Interval};

/// Default cap on the number of runs with exported series.
pub const DEFAULT_MAX_RUNS: usize = 10_000;

/// Upper bounds of the tick-duration histogram, seconds. A tick is usage + meters + attribution +
/// seal + fdatasync: milliseconds normally; the top buckets catch a slow disk.
pub const TICK_BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The parts of the host bucket's energy.
const PART_ACTIVE: &str = "active";
const PART_IDLE: &str = "idle";
const PART_UNATTRIBUTED: &str = "unattributed";

/// One run's exported state.
#[derive(Debug, Default)]
struct RunEntry {
    /// Energy (active + idle) per domain, microjoules, since the run's series appeared.
    energy_uj: BTreeMap<Domain, u128>,
    /// CLOCK_MONOTONIC ns of the finish; the series goes `finished_run_ttl` later.
    finished_at_ns: Option<u64>,
}

/// A histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; cumulated when rendered.
    counts: Vec<u64>,
    /// Observations above the last bound (the `+Inf` bucket only).
    over: u64,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            over: 0,
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        // A NaN or negative duration cannot happen with a monotonic clock; count it in the
        // lowest bucket rather than poisoning the sum.
        let v = if v.is_finite() && v >= 0.0 { v } else { 0.0 };
        match self.bounds.iter().position(|b| v <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
        self.sum += v;
        self.count += 1;
    }
}

/// The registry: every exported value, updated by the daemon loop.
#[derive(Debug)]
pub struct Metrics {
    finished_run_ttl_ns: u64,
    max_runs: usize,
    runs: BTreeMap<Arc<str>, RunEntry>,
    /// The finished runs of `runs`, by finish time: expiry and eviction take the oldest without
    /// scanning every run (up to `max_runs` of them) each tick.
    finished: BTreeSet<(u64, Arc<str>)>,
    /// Runs refused because the cap was reached, remembered (bounded) so each is counted once.
    refused: BTreeSet<Arc<str>>,
    runs_dropped: u64,
    /// (domain, source, part) -> uJ.
    host_uj: BTreeMap<(Domain, SourceKind, &'static str), u128>,
    /// (domain, package, source, quality) -> uJ.
    measured_uj: BTreeMap<(Domain, Option<u32>, SourceKind, &'static str), u128>,
    /// (domain, package) -> watts over the last interval.
    power_w: BTreeMap<(Domain, Option<u32>), f64>,
    tick: Histogram,
    intervals: u64,
    /// Time the closed intervals cover, microseconds.
    measured_us: u64,
    /// Indexed by `cause_index`.
    gaps: [u64; 3],
    quarantined: u64,
    /// NVIDIA GPUs the driver holds that are not measured (set once at start).
    gpu_unmeasured: u64,
    /// GPU-using pids whose cgroup could not be read, per interval and GPU.
    gpu_unattributed_pids: u64,
    /// The platform meter's BMC, when one is configured.
    platform: Option<PlatformStats>,
    spool_bytes: u64,
    spool_unacked: u64,
    delivery: DeliveryLag,
    coarsened: u64,
    tracker: TrackerCounters,
    ledger: LedgerSnapshot,
    /// Whether per-run series are rendered (only behind authentication).
    per_run: bool,
    /// The endpoint's refusal counters, once it serves.
    endpoint: Option<Arc<wattd_web::EndpointStats>>,
}

/// Microseconds as an exact decimal number of seconds.
fn us_as_seconds(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

/// When batches were sealed, to the second, for the age of the oldest one the ledger has not
/// acknowledged. One entry per second with sealing, dropped once acknowledged; bounded (a week
/// of one-second entries) by merging the oldest.
#[derive(Clone, Debug, Default)]
pub struct DeliveryLag {
    /// (highest seq sealed by then, when): increasing in both.
    sealed_by: std::collections::VecDeque<(u64, std::time::Instant)>,
}

impl DeliveryLag {
    const ENTRIES_MAX: usize = 7 * 86_400;

    pub fn update(&mut self, sealed_seq: u64, acked_seq: u64, now: std::time::Instant) {
        let last = self.sealed_by.back().copied();
        match last {
            Some((seq, _)) if sealed_seq <= seq => {}
            // Sealed more within the same second: the entry covers these seqs too.
            Some((_, t)) if now.duration_since(t) < std::time::Duration::from_secs(1) => {
                if let Some(b) = self.sealed_by.back_mut() {
                    b.0 = sealed_seq;
                }
            }
            _ => self.sealed_by.push_back((sealed_seq, now)),
        }
        // Entries whose seqs are all acknowledged are done with.
        while self
            .sealed_by
            .front()
            .is_some_and(|&(seq, _)| seq <= acked_seq)
        {
            self.sealed_by.pop_front();
        }
        while self.sealed_by.len() > Self::ENTRIES_MAX {
            // The oldest keeps its time and takes the next one's seqs (the age stays right).
            if let (Some(first), Some(second)) =
                (self.sealed_by.pop_front(), self.sealed_by.front_mut())
            {
                second.1 = first.1;
            }
        }
    }

    /// Age of the oldest unacknowledged batch (at most a second short); zero when none.
    pub fn oldest_unacked_age(&self, now: std::time::Instant) -> std::time::Duration {
        self.sealed_by
            .front()
            .map_or(std::time::Duration::ZERO, |&(_, t)| now.duration_since(t))
    }
}

/// The shipper's state as of the last tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LedgerSnapshot {
    configured: bool,
    connected: bool,
    sessions: u64,
    batches_sent: u64,
    heartbeats_sent: u64,
    acks: u64,
    acked_seq: u64,
    bad_acks: u64,
    missing_from: u64,
    rewinds: u64,
    rewind_unheld: u64,
    /// (statements sent, distinct batches declared lost) by reason: damaged, not_retained.
    losses: [(u64, u64); 2],
    session_errors: Vec<(String, u64)>,
}

const CAUSES: [GapCause; 3] = [
    GapCause::CounterReset,
    GapCause::SourceFailure,
    GapCause::AgentDown,
];

fn cause_index(c: GapCause) -> usize {
    match c {
        GapCause::CounterReset => 0,
        GapCause::SourceFailure => 1,
        GapCause::AgentDown => 2,
    }
}

fn cause_name(c: GapCause) -> &'static str {
    match c {
        GapCause::CounterReset => "counter_reset",
        GapCause::SourceFailure => "source_failure",
        GapCause::AgentDown => "agent_down",
    }
}

fn quality_name(q: Quality) -> &'static str {
    match q {
        Quality::Measured => "measured",
        Quality::Estimated => "estimated",
    }
}

/// The `package` label: the package id, or `all` for platform-wide meters (psys), so every
/// series of a family has the same label names.
fn package_label(p: Option<u32>) -> String {
    p.map_or_else(|| "all".to_owned(), |p| p.to_string())
}

impl Metrics {
    pub fn new(finished_run_ttl: Duration, max_runs: usize) -> Self {
        Metrics {
            finished_run_ttl_ns: u64::try_from(finished_run_ttl.as_nanos()).unwrap_or(u64::MAX),
            max_runs,
            runs: BTreeMap::new(),
            finished: BTreeSet::new(),
            refused: BTreeSet::new(),
            runs_dropped: 0,
            host_uj: BTreeMap::new(),
            measured_uj: BTreeMap::new(),
            power_w: BTreeMap::new(),
            tick: Histogram::new(&TICK_BUCKETS_S),
            intervals: 0,
            measured_us: 0,
            gaps: [0; 3],
            quarantined: 0,
            gpu_unmeasured: 0,
            gpu_unattributed_pids: 0,
            platform: None,
            spool_bytes: 0,
            spool_unacked: 0,
            delivery: DeliveryLag::default(),
            coarsened: 0,
            tracker: TrackerCounters::default(),
            ledger: LedgerSnapshot::default(),
            per_run: false,
            endpoint: None,
        }
    }

    /// Whether the per-run series are rendered: only when the endpoint authenticates every
    /// request (`[metrics] web_config` with basic auth or required client certificates). Off
    /// by default.
    pub fn serve_per_run(&mut self, on: bool) {
        self.per_run = on;
    }

    /// The endpoint's refusal counters, rendered as `wattd_metrics_requests_refused_total`.
    pub fn set_endpoint(&mut self, stats: Arc<wattd_web::EndpointStats>) {
        self.endpoint = Some(stats);
    }

    /// Whether a `[ledger]` is configured (the shipper families are exported either way).
    pub fn set_ledger_configured(&mut self, configured: bool) {
        self.ledger.configured = configured;
    }

    /// The shipper's counters, copied once per tick.
    pub fn set_shipper(&mut self, s: &crate::shipper::ShipperStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let l = &mut self.ledger;
        l.connected = s.connected.load(Relaxed);
        l.sessions = s.sessions_total.load(Relaxed);
        l.batches_sent = s.batches_sent_total.load(Relaxed);
        l.heartbeats_sent = s.heartbeats_sent_total.load(Relaxed);
        l.acks = s.acks_total.load(Relaxed);
        l.acked_seq = s.acked_seq.load(Relaxed);
        l.bad_acks = s.bad_acks_total.load(Relaxed);
        l.missing_from = s.ledger_missing_from.load(Relaxed);
        l.rewinds = s.rewinds_total.load(Relaxed);
        l.rewind_unheld = s.rewind_unheld_batches_total.load(Relaxed);
        l.losses = [
            (
                s.loss_statements_damaged_total.load(Relaxed),
                s.lost_batches_damaged_total.load(Relaxed),
            ),
            (
                s.loss_statements_not_retained_total.load(Relaxed),
                s.lost_batches_not_retained_total.load(Relaxed),
            ),
        ];
        l.session_errors = s.session_errors();
    }

    /// Adds one attributed interval: per-run, host and measured energy, power, gaps and
    /// quarantined samples.
    pub fn record_interval(&mut self, interval: &Interval) {
        self.intervals += 1;
        for g in &interval.gaps {
            self.record_gap(g.cause);
        }
        let elapsed_us = interval.elapsed_us();
        self.measured_us = self.measured_us.saturating_add(elapsed_us);
        // Power is per (domain, package); several dies of one package add up.
        let mut power_uj: BTreeMap<(Domain, Option<u32>), u64> = BTreeMap::new();
        let mut no_power: BTreeSet<(Domain, Option<u32>)> = BTreeSet::new();
        for r in &interval.results {
            let MeterKey {
                domain, package, ..
            } = r.key;
            let quarantined = r
                .unattributed
                .iter()
                .any(|(why, _)| *why == UnattributedReason::Quarantined);
            if quarantined {
                self.quarantined += 1;
            }
            if r.gap || quarantined {
                // The interval's power is unknown (gap) or implausible (quarantined): export no
                // number rather than a wrong one.
                no_power.insert((domain, package));
            } else {
                let e = power_uj.entry((domain, package)).or_default();
                *e = e.saturating_add(r.measured_uj);
            }
            if r.gap {
                continue;
            }
            *self
                .measured_uj
                .entry((domain, package, r.source, quality_name(r.quality)))
                .or_default() += r.measured_uj as u128;
            let unattributed: u128 = r.unattributed.iter().map(|(_, e)| *e as u128).sum();
            for (part, uj) in [
                (PART_ACTIVE, r.host_active_uj as u128),
                (PART_IDLE, r.host_idle_uj as u128),
                (PART_UNATTRIBUTED, unattributed),
            ] {
                *self.host_uj.entry((domain, r.source, part)).or_default() += uj;
            }
            for (id, share) in r.shares() {
                let uj = share.active_uj as u128 + share.idle_uj as u128;
                if let Some(entry) = self.admit(id) {
                    *entry.energy_uj.entry(domain).or_default() += uj;
                }
            }
        }
        self.power_w.clear();
        if elapsed_us > 0 {
            for (k, uj) in power_uj {
                if !no_power.contains(&k) {
                    // uJ per us is W.
                    self.power_w.insert(k, uj as f64 / elapsed_us as f64);
                }
            }
        }
    }

    /// The run's entry, creating it if the cap allows; `None` if the run is refused.
    fn admit(&mut self, run_id: &Arc<str>) -> Option<&mut RunEntry> {
        if !self.runs.contains_key(run_id) && self.runs.len() >= self.max_runs {
            // Make room by dropping the run that finished first, if any run has finished: its
            // final value has most likely been scraped already. A live run is never evicted,
            // so that no counter of a live run vanishes and comes back reset.
            match self.finished.pop_first() {
                Some((_, id)) => {
                    self.runs.remove(&id);
                    self.runs_dropped += 1;
                }
                None => {
                    if self.refused.len() >= self.max_runs {
                        // Bounded memory: forget the refused set; a run refused again later is
                        // counted again (the counter is then an upper bound).
                        self.refused.clear();
                    }
                    if self.refused.insert(run_id.clone()) {
                        self.runs_dropped += 1;
                    }
                    return None;
                }
            }
        }
        Some(self.runs.entry(run_id.clone()).or_default())
    }

    /// Counts a gap recorded outside an interval (the agent-down gap at start).
    pub fn record_gap(&mut self, cause: GapCause) {
        self.gaps[cause_index(cause)] += 1;
    }

    /// Marks a run finished at `now_ns` (CLOCK_MONOTONIC): its series go `finished_run_ttl`
    /// later.
    pub fn run_finished(&mut self, run_id: &str, now_ns: u64) {
        if let Some(e) = self.runs.get_mut(run_id) {
            if e.finished_at_ns.is_none() {
                e.finished_at_ns = Some(now_ns);
                self.finished.insert((now_ns, Arc::from(run_id)));
            }
        }
        self.refused.remove(run_id);
    }

    /// Drops the series of runs that finished at least `finished_run_ttl` before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        while let Some((t, _)) = self.finished.first() {
            if now_ns.saturating_sub(*t) < self.finished_run_ttl_ns {
                break;
            }
            if let Some((_, id)) = self.finished.pop_first() {
                self.runs.remove(&id);
            }
        }
    }

    /// The tracker's cumulative counters and gauges, as of its last snapshot.
    pub fn set_tracker(&mut self, c: &TrackerCounters) {
        self.tracker = *c;
    }

    /// The spool's size and the batches sealed but not yet acknowledged by the ledger.
    pub fn set_spool(&mut self, used_bytes: u64, sealed_seq: u64, acked_seq: u64) {
        self.spool_bytes = used_bytes;
        self.spool_unacked = sealed_seq.saturating_sub(acked_seq);
        self.delivery
            .update(sealed_seq, acked_seq, std::time::Instant::now());
    }

    /// NVIDIA GPUs present and held by the `nvidia` driver that the probe could not measure.
    pub fn set_gpu_unmeasured(&mut self, n: usize) {
        self.gpu_unmeasured = n as u64;
    }

    /// Adds the GPU-using pids of one interval whose cgroup could not be read.
    pub fn add_gpu_unattributed_pids(&mut self, n: u64) {
        self.gpu_unattributed_pids = self.gpu_unattributed_pids.saturating_add(n);
    }

    /// The platform meter's last tick and the BMC thread's dropped answers.
    pub fn set_platform(&mut self, t: &crate::platform::PlatformTick, dropped: u64) {
        let p = self.platform.get_or_insert_with(PlatformStats::default);
        p.readings = p.readings.saturating_add(t.readings);
        p.failures = p.failures.saturating_add(t.failures);
        p.lost = p.lost.saturating_add(t.lost.len() as u64);
        p.dropped = dropped;
        p.refused = p.refused.saturating_add(t.dropped);
        p.carry_uj = t.carry_uj;
        p.wall_power_mw = t.wall_power_mw;
        p.baseline = t.waiting.is_none();
    }

    /// The daemon's running count of intervals merged into a coarsened one (spool full).
    pub fn set_coarsened(&mut self, total: u64) {
        self.coarsened = total;
    }

    pub fn observe_tick(&mut self, d: Duration) {
        self.tick.observe(d.as_secs_f64());
    }

    /// Number of runs with exported series.
    pub fn runs_exported(&self) -> usize {
        self.runs.len()
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut w = Writer::with_capacity(4096 + self.runs.len() * 160);

        w.family(
            "wattd_build_info",
            "gauge",
            "The running wattd's version; always 1.",
        );
        w.sample(
            "wattd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1u64,
        );

        w.family(
            "wattd_metrics_per_run_series",
            "gauge",
            "1 when the per-run series are served (the endpoint authenticates every request: \
             [metrics] web_config), 0 when only host-level series are.",
        );
        w.sample("wattd_metrics_per_run_series", &[], u64::from(self.per_run));
        if self.per_run {
            w.family(
                "wattd_run_energy_joules_total",
                "counter",
                "Energy attributed to a workflow run (active + idle share), by domain, since its \
                 series appeared. Series of finished runs are dropped after \
                 metrics.finished_run_ttl_s.",
            );
            for (id, e) in &self.runs {
                for (domain, uj) in &e.energy_uj {
                    w.sample(
                        "wattd_run_energy_joules_total",
                        &[("run_id", id), ("domain", domain.as_str())],
                        Joules(*uj),
                    );
                }
            }
        }
        if let Some(stats) = &self.endpoint {
            w.family(
                "wattd_metrics_requests_refused_total",
                "counter",
                "Requests to this endpoint refused, by reason: busy (every connection slot \
                 taken), tls_failed (handshake failed: no or an unverified client certificate), \
                 unauthenticated (no or wrong basic-auth credentials), throttled (too many \
                 unverified credentials tried).",
            );
            for (reason, n) in stats.by_reason() {
                w.sample(
                    "wattd_metrics_requests_refused_total",
                    &[("reason", reason)],
                    n,
                );
            }
        }
        if self.per_run {
            w.family(
                "wattd_metrics_runs_exported",
                "gauge",
                "Runs with series in wattd_run_energy_joules_total.",
            );
            w.sample("wattd_metrics_runs_exported", &[], self.runs.len() as u64);
        }
        w.family(
            "wattd_metrics_runs_dropped_total",
            "counter",
            "Runs whose series were refused or dropped early because the per-run series cap was \
             reached.",
        );
        w.sample("wattd_metrics_runs_dropped_total", &[], self.runs_dropped);

        w.family(
            "wattd_host_energy_joules_total",
            "counter",
            "Energy not billed to any run: the host bucket's active and idle shares, and energy \
             left unattributed (quarantined, no usage data, no CPU in package).",
        );
        for ((domain, source, part), uj) in &self.host_uj {
            w.sample(
                "wattd_host_energy_joules_total",
                &[
                    ("domain", domain.as_str()),
                    ("source", source.as_str()),
                    ("part", part),
                ],
                Joules(*uj),
            );
        }

        w.family(
            "wattd_measured_energy_joules_total",
            "counter",
            "Energy measured (or estimated, quality=\"estimated\") by each billed meter; gaps \
             excluded.",
        );
        for ((domain, package, source, quality), uj) in &self.measured_uj {
            let package = package_label(*package);
            w.sample(
                "wattd_measured_energy_joules_total",
                &[
                    ("domain", domain.as_str()),
                    ("package", &package),
                    ("source", source.as_str()),
                    ("quality", quality),
                ],
                Joules(*uj),
            );
        }

        w.family(
            "wattd_power_watts",
            "gauge",
            "Average power of each billed meter over the last interval; absent when that interval \
             was a gap or quarantined.",
        );
        for ((domain, package), watts) in &self.power_w {
            let package = package_label(*package);
            w.sample(
                "wattd_power_watts",
                &[("domain", domain.as_str()), ("package", &package)],
                Float(*watts),
            );
        }

        w.histogram(
            "wattd_tick_duration_seconds",
            "Time to close one interval: usage, meters, attribution, seal and fdatasync.",
            &self.tick,
        );
        w.family(
            "wattd_intervals_total",
            "counter",
            "Intervals closed and attributed.",
        );
        w.sample("wattd_intervals_total", &[], self.intervals);
        w.family(
            "wattd_measured_seconds_total",
            "counter",
            "Time the closed intervals cover: an energy counter's increase over this one's is \
             the average power between two scrapes, whenever the text was rendered.",
        );
        w.sample(
            "wattd_measured_seconds_total",
            &[],
            us_as_seconds(self.measured_us),
        );
        w.family(
            "wattd_gaps_total",
            "counter",
            "Gap records: spans of unknown energy, by cause.",
        );
        for c in CAUSES {
            w.sample(
                "wattd_gaps_total",
                &[("cause", cause_name(c))],
                self.gaps[cause_index(c)],
            );
        }
        w.family(
            "wattd_quarantined_total",
            "counter",
            "Meter readings quarantined: a delta above the domain's physical ceiling.",
        );
        w.sample("wattd_quarantined_total", &[], self.quarantined);
        w.family(
            "wattd_gpu_unmeasured_devices",
            "gauge",
            "NVIDIA GPUs on the PCI bus, bound to the nvidia driver, that wattd cannot measure \
             (device access, NVML permission, library): their energy is not billed. \
             `wattd probe` says why.",
        );
        w.sample("wattd_gpu_unmeasured_devices", &[], self.gpu_unmeasured);
        w.family(
            "wattd_gpu_unattributed_pids_total",
            "counter",
            "GPU-using processes whose cgroup could not be read (/proc hidden or gone), so \
             their share of the GPU went to the host bucket; counted once per interval and GPU.",
        );
        w.sample(
            "wattd_gpu_unattributed_pids_total",
            &[],
            self.gpu_unattributed_pids,
        );
        if let Some(p) = &self.platform {
            p.render(&mut w);
        }
        w.family(
            "wattd_spool_bytes",
            "gauge",
            "Bytes of all spool segments on disk.",
        );
        w.sample("wattd_spool_bytes", &[], self.spool_bytes);
        w.family(
            "wattd_spool_unacked_batches",
            "gauge",
            "Batches sealed in the spool and not yet acknowledged by the ledger.",
        );
        w.sample("wattd_spool_unacked_batches", &[], self.spool_unacked);
        w.family(
            "wattd_spool_oldest_unacked_age_seconds",
            "gauge",
            "How long the oldest batch not yet acknowledged by the ledger has been sealed (to \
             the second; 0 when all are acknowledged). Growing: delivery is stalled.",
        );
        w.sample(
            "wattd_spool_oldest_unacked_age_seconds",
            &[],
            self.delivery
                .oldest_unacked_age(std::time::Instant::now())
                .as_secs(),
        );
        w.family(
            "wattd_spool_coarsened_intervals_total",
            "counter",
            "Intervals merged into a coarser pending one because the spool was full (no energy \
             lost).",
        );
        w.sample("wattd_spool_coarsened_intervals_total", &[], self.coarsened);

        let l = &self.ledger;
        for (name, help, value) in [
            ("wattd_ledger_configured", "1 when a [ledger] is configured and the shipper runs.", u64::from(l.configured)),
            ("wattd_ledger_connected", "1 while a stream to the ledger is open.", u64::from(l.connected)),
            ("wattd_ledger_acked_seq", "Highest batch seq the ledger acknowledged as durably stored.", l.acked_seq),
            ("wattd_ledger_missing_from_seq", "First seq the ledger last reported missing (a hole it holds batches above); 0 if none.", l.missing_from),
        ] {
            w.family(name, "gauge", help);
            w.sample(name, &[], value);
        }
        for (name, help, value) in [
            (
                "wattd_ledger_sessions_total",
                "Streams started (connect attempts included).",
                l.sessions,
            ),
            (
                "wattd_ledger_batches_sent_total",
                "Batches sent on a stream (re-sends after a reconnect included).",
                l.batches_sent,
            ),
            (
                "wattd_ledger_heartbeats_sent_total",
                "Signed heartbeats sent.",
                l.heartbeats_sent,
            ),
            (
                "wattd_ledger_acks_total",
                "Acknowledgements received.",
                l.acks,
            ),
            (
                "wattd_ledger_rewinds_total",
                "Sessions that opened with the ledger acknowledging less than before (restored \
                 from a backup): batches re-sent from the spool.",
                l.rewinds,
            ),
            (
                "wattd_ledger_rewind_unheld_batches_total",
                "Batches a restored ledger lacked that the spool no longer held (could not be \
                 re-sent; see spool.retain_acked_s).",
                l.rewind_unheld,
            ),
            (
                "wattd_ledger_bad_acks_total",
                "Acknowledgements refused: beyond the seq this node has sealed.",
                l.bad_acks,
            ),
        ] {
            w.family(name, "counter", help);
            w.sample(name, &[], value);
        }
        for (name, help, pick) in [
            (
                "wattd_ledger_loss_statements_total",
                "Signed loss statements sent to the ledger (sent again when it did not take \
                 them), by reason: damaged (sealed records damaged in the spool), not_retained \
                 (a restored ledger asked for batches the spool no longer holds).",
                0usize,
            ),
            (
                "wattd_ledger_lost_batches_total",
                "Distinct batches declared lost to the ledger, by reason (their energy is known \
                 from the running totals of the batches around them).",
                1usize,
            ),
        ] {
            w.family(name, "counter", help);
            for (i, reason) in ["damaged", "not_retained"].into_iter().enumerate() {
                let v = if pick == 0 {
                    l.losses[i].0
                } else {
                    l.losses[i].1
                };
                w.sample(name, &[("reason", reason)], v);
            }
        }
        w.family(
            "wattd_ledger_session_errors_total",
            "counter",
            "Streams that ended, by reason (connect, tls_files, endpoint, ack_timeout, closed, \
             spool_read, status_<grpc code>).",
        );
        for (reason, n) in &l.session_errors {
            w.sample(
                "wattd_ledger_session_errors_total",
                &[("reason", reason)],
                *n,
            );
        }

        // Destructured field by field so that a counter added to the tracker fails to compile
        // here until it is exported too.
        let TrackerCounters {
            runs_tracked,
            kept_fds,
            fd_budget,
            fd_fallback_runs,
            perf_fallback_runs,
            perf_uncounted_runs,
            hostile_names_skipped,
            host_clamps,
            vanished_at_discovery,
            vanished_before_final_read,
            read_errors,
            watch_fallbacks,
            inotify_overflows,
            rescans,
            usage_went_backwards,
            final_read,
            final_perf_counted,
            final_reconciled,
            final_reconciled_shared,
            final_lost,
            ghost_runs,
            reconciled_us,
            reconcile_points,
            reconcile_parent_busy,
            run_id_reused,
            children_listed_early,
            reconcile_clamped_us,
            reconcile_retries,
        } = self.tracker;
        w.family(
            "wattd_tracker_final_usage_total",
            "counter",
            "Finished runs by how their last usage was obtained: read from their own cpu.stat, \
             counted by their perf task-clock counters after the cgroup was removed, \
             reconciled through the parent (alone or shared with others that went away in the \
             same stretch), or lost (the tail since the last read is the host's).",
        );
        for (how, v) in [
            ("read", final_read),
            ("perf_counted", final_perf_counted),
            ("reconciled", final_reconciled),
            ("reconciled_shared", final_reconciled_shared),
            ("lost", final_lost),
        ] {
            w.sample("wattd_tracker_final_usage_total", &[("how", how)], v);
        }
        for (name, kind, help, v) in [
            (
                "wattd_runs_tracked",
                "gauge",
                "Runs the tracker follows.",
                runs_tracked,
            ),
            (
                "wattd_tracker_kept_fds",
                "gauge",
                "File descriptors the tracker keeps open for runs.",
                kept_fds,
            ),
            (
                "wattd_tracker_fd_budget",
                "gauge",
                "File descriptors the tracker may keep open for runs.",
                fd_budget,
            ),
            (
                "wattd_tracker_fd_fallback_runs_total",
                "counter",
                "Runs read open-read-close because the descriptor budget was full.",
                fd_fallback_runs,
            ),
            (
                "wattd_tracker_perf_fallback_runs_total",
                "counter",
                "Runs split over packages by /proc/stat share because perf counters were \
                 unavailable.",
                perf_fallback_runs,
            ),
            (
                "wattd_tracker_perf_uncounted_runs_total",
                "counter",
                "Runs without perf task-clock counters (disabled, not permitted, descriptor \
                 budget full): the tail of one removed before its final read comes from its \
                 parent.",
                perf_uncounted_runs,
            ),
            (
                "wattd_tracker_hostile_names_skipped_total",
                "counter",
                "Cgroup names shaped like a run but with a refused run id.",
                hostile_names_skipped,
            ),
            (
                "wattd_tracker_host_clamps_total",
                "counter",
                "Package intervals where runs' usage exceeded measured busy time.",
                host_clamps,
            ),
            (
                "wattd_tracker_vanished_at_discovery_total",
                "counter",
                "Cgroups that vanished between being listed and opened.",
                vanished_at_discovery,
            ),
            (
                "wattd_tracker_vanished_before_final_read_total",
                "counter",
                "Runs whose cgroup went away before a final read (usage may be missing).",
                vanished_before_final_read,
            ),
            (
                "wattd_tracker_read_errors_total",
                "counter",
                "Failed reads of run cgroup files.",
                read_errors,
            ),
            (
                "wattd_tracker_watch_fallbacks_total",
                "counter",
                "Runs without a cgroup.events watch (inotify limit): measured at ticks only.",
                watch_fallbacks,
            ),
            (
                "wattd_tracker_inotify_overflows_total",
                "counter",
                "inotify queue overflows (each forces a rescan).",
                inotify_overflows,
            ),
            (
                "wattd_tracker_rescans_total",
                "counter",
                "Full rescans of the cgroup tree.",
                rescans,
            ),
            (
                "wattd_tracker_usage_went_backwards_total",
                "counter",
                "Times a run's usage_usec decreased (cgroup recreated under the same name).",
                usage_went_backwards,
            ),
            (
                "wattd_tracker_ghost_runs_total",
                "counter",
                "Runs created and removed before they could be opened, billed from their parent.",
                ghost_runs,
            ),
            (
                "wattd_tracker_reconcile_points_total",
                "counter",
                "Reconcile points: a parent's cpu.stat read against its children's.",
                reconcile_points,
            ),
            (
                "wattd_tracker_reconcile_parent_busy_total",
                "counter",
                "Reconcile points where the parent held processes of its own, so removed \
                 children's tails were recorded as lost.",
                reconcile_parent_busy,
            ),
            (
                "wattd_tracker_run_id_reused_total",
                "counter",
                "Cgroups that appeared under a finished run's name (not billed as that run again).",
                run_id_reused,
            ),
            (
                "wattd_tracker_children_listed_early_total",
                "counter",
                "Children of a reconciled parent found by listing it before their creation event \
                 was read (a lagging event queue).",
                children_listed_early,
            ),
            (
                "wattd_tracker_reconcile_retries_total",
                "counter",
                "Reconcile points read again because the parent moved too much between its two \
                 reads (the agent was preempted mid-point).",
                reconcile_retries,
            ),
        ] {
            w.family(name, kind, help);
            w.sample(name, &[], v);
        }
        // CPU time in seconds (exact: microseconds as a decimal), as Prometheus names units.
        for (name, help, us) in [
            (
                "wattd_tracker_reconciled_cpu_seconds_total",
                "CPU time of removed run cgroups recovered from their parents' cpu.stat.",
                reconciled_us,
            ),
            (
                "wattd_tracker_reconcile_clamped_cpu_seconds_total",
                "CPU time of a parent's residual beyond what the machine could have run (not 0: \
                 the parent's and children's counters disagreed; the excess is the host's).",
                reconcile_clamped_us,
            ),
        ] {
            w.family(name, "counter", help);
            w.sample(name, &[], us_as_seconds(us));
        }
        w.out
    }
}

/// What the platform meter's BMC did (rendered only when a BMC is configured).
#[derive(Debug, Default)]
struct PlatformStats {
    readings: u64,
    failures: u64,
    lost: u64,
    dropped: u64,
    refused: u64,
    carry_uj: i128,
    wall_power_mw: Option<u64>,
    baseline: bool,
}

impl PlatformStats {
    fn render(&self, w: &mut Writer) {
        w.family(
            "wattd_bmc_readings_total",
            "counter",
            "Readings of the node's wall power or energy from the BMC (Redfish).",
        );
        w.sample("wattd_bmc_readings_total", &[], self.readings);
        w.family(
            "wattd_bmc_failures_total",
            "counter",
            "BMC polls that failed (unreachable, timed out, refused, garbage): see the log.",
        );
        w.sample("wattd_bmc_failures_total", &[], self.failures);
        w.family(
            "wattd_bmc_dropped_total",
            "counter",
            "BMC answers dropped because the measuring loop did not take them in time.",
        );
        w.sample("wattd_bmc_dropped_total", &[], self.dropped);
        w.family(
            "wattd_bmc_readings_refused_total",
            "counter",
            "BMC readings the platform meter could not use: out of order, over its pending bound, \
             or older than any interval whose components are known (after a component's gap).",
        );
        w.sample("wattd_bmc_readings_refused_total", &[], self.refused);
        w.family(
            "wattd_platform_lost_spans_total",
            "counter",
            "Spans whose platform energy is unknown (recorded as gaps): the BMC silent past \
             max_gap_ms, its counter reset or jumped, or a component meter's gap.",
        );
        w.sample("wattd_platform_lost_spans_total", &[], self.lost);
        w.family(
            "wattd_platform_carry_joules",
            "gauge",
            "Platform energy carried to later ticks: negative while the wall reads below the \
             components (a late or low BMC, a coarse counter between steps), positive while a \
             lump above max_watts per tick is paid out. Carried, never clamped.",
        );
        w.sample(
            "wattd_platform_carry_joules",
            &[],
            Float(self.carry_uj as f64 / 1e6),
        );
        w.family(
            "wattd_platform_measuring",
            "gauge",
            "1 while the platform meter has a baseline reading from the BMC, 0 while its energy \
             is a gap.",
        );
        w.sample("wattd_platform_measuring", &[], u8::from(self.baseline));
        if let Some(mw) = self.wall_power_mw {
            w.family(
                "wattd_wall_power_watts",
                "gauge",
                "The node's power as its BMC last stated it.",
            );
            w.sample("wattd_wall_power_watts", &[], Float(mw as f64 / 1e3));
        }
    }
}

/// Integer microjoules shown as exact decimal joules.
#[derive(Clone, Copy, Debug)]
struct Joules(u128);

impl fmt::Display for Joules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        // Trailing zeros trimmed: 1500000 uJ is "1.5".
        let (mut frac, mut width) = (frac, 6usize);
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        write!(f, "{whole}.{frac:0width$}")
    }
}

/// A float in the exposition format's spelling (`NaN`, `+Inf`, `-Inf`).
#[derive(Clone, Copy, Debug)]
struct Float(f64);

impl fmt::Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v.is_infinite() {
            f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
        } else {
            // Rust's shortest round-trip representation; never an exponent, always parseable.
            write!(f, "{v}")
        }
    }
}

/// Appends a label value escaped for the text format: backslash, double quote and newline.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends HELP text escaped for the text format: backslash and newline.
fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Builds the exposition text.
#[derive(Debug)]
struct Writer {
    out: String,
}

impl Writer {
    fn with_capacity(n: usize) -> Self {
        Writer {
            out: String::with_capacity(n),
        }
    }

    pub(crate) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.out, "# HELP {name} ");
        escape_help(&mut self.out, help);
        let _ = write!(self.out, "\n# TYPE {name} {kind}\n");
    }

    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let le = Float(*bound).to_string();
            self.sample(&bucket, &[("le", &le)], cumulative);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count);
        self.sample(&format!("{name}_sum"), &[], Float(h.sum));
        self.sample(&format!("{name}_count"), &[], h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{DramPolicy, IdleEstimate, IdlePolicy, IdleSource, MeterResult};
    use crate::attribution::{Policy, RunShare};
    use crate::sampler::{GapRecord, Stamp};

    fn key(domain: Domain, package: Option<u32>) -> MeterKey {
        MeterKey {
            domain,
            package,
            die: None,
        }
    }

    fn result(k: MeterKey, measured: u64, runs: &[(&str, u64, u64)]) -> MeterResult {
        let to_runs: u64 = runs.iter().map(|(_, a, i)| a + i).sum();
        MeterResult {
            key: k,
            source: SourceKind::Powercap,
            quality: Quality::Measured,
            measured_uj: measured,
            gap: false,
            idle: IdleEstimate {
                power_uw: 0,
                source: IdleSource::Window,
            },
            idle_uj: 0,
            run_ids: runs
                .iter()
                .map(|(id, _, _)| Arc::<str>::from(*id))
                .collect(),
            runs: runs
                .iter()
                .enumerate()
                .map(|(n, (_, a, i))| RunShare {
                    run: n as u32,
                    active_uj: *a,
                    idle_uj: *i,
                    usage: 1,
                })
                .collect(),
            host_active_uj: measured - to_runs,
            host_idle_uj: 0,
            host_usage: 0,
            unattributed: Vec::new(),
            gpu: None,
        }
    }

    fn interval(elapsed_s: u64, results: Vec<MeterResult>, gaps: Vec<GapRecord>) -> Interval {
        Interval {
            index: 0,
            start: Stamp {
                mono_ns: 0,
                unix_ns: 0,
            },
            end: Stamp {
                mono_ns: elapsed_s * 1_000_000_000,
                unix_ns: 0,
            },
            wall_jump_ns: 0,
            policy: Policy {
                idle: IdlePolicy::Proportional,
                dram: DramPolicy::Cpu,
                platform: crate::attribution::PlatformPolicy::Proportional,
            },
            results,
            gaps,
        }
    }

    /// The sample lines (not comments) of a rendering, for exact lookups.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn joules_are_exact_decimals_of_microjoules() {
        let cases: [(u128, &str); 7] = [
            (0, "0"),
            (1, "0.000001"),
            (1_500_000, "1.5"),
            (12_000_345, "12.000345"),
            (3_000_000, "3"),
            (999_999, "0.999999"),
            // Beyond f64's 2^53: still exact in the text.
            (
                18_446_744_073_709_551_615_000_001,
                "18446744073709551615.000001",
            ),
        ];
        for (uj, want) in cases {
            assert_eq!(Joules(uj).to_string(), want, "{uj}");
        }
    }

    #[test]
    fn floats_use_the_exposition_spellings() {
        assert_eq!(Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Float(0.25).to_string(), "0.25");
        assert_eq!(Float(10.0).to_string(), "10");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut w = Writer::with_capacity(0);
        w.sample("m", &[("a", "q\"b\\s\nn"), ("b", "plain")], 1u64);
        assert_eq!(w.out, "m{a=\"q\\\"b\\\\s\\nn\",b=\"plain\"} 1\n");
        let mut h = String::new();
        escape_help(&mut h, "a\\b\nc\"d");
        assert_eq!(h, "a\\\\b\\nc\"d");
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        m.serve_per_run(true);
        m.record_interval(&interval(
            1,
            vec![result(
                key(Domain::Package, Some(0)),
                5_000_000,
                &[("r1", 1, 2)],
            )],
            Vec::new(),
        ));
        let text = m.render();
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped: BTreeSet<String> = BTreeSet::new();
        let mut last_family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(helped.insert(name.clone()), "HELP twice for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let name = it.next().unwrap().to_owned();
                let kind = it.next().unwrap().to_owned();
                assert!(helped.contains(&name), "TYPE before HELP for {name}");
                assert!(typed.insert(name.clone(), kind).is_none(), "TYPE twice");
                last_family = name;
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                // A sample belongs to the family declared just before it (histogram samples
                // carry a suffix); families are never interleaved.
                let base = name
                    .strip_suffix("_bucket")
                    .or_else(|| name.strip_suffix("_sum"))
                    .or_else(|| name.strip_suffix("_count"))
                    .filter(|b| typed.get(*b).map(String::as_str) == Some("histogram"))
                    .unwrap_or(name);
                assert_eq!(base, last_family, "{line}");
                if typed[base] == "counter" {
                    assert!(
                        base.ends_with("_total"),
                        "counter {base} must end in _total"
                    );
                }
                let value = line.rsplit(' ').next().unwrap();
                assert!(
                    value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
                    "{line}"
                );
            }
        }
        for family in [
            "wattd_run_energy_joules_total",
            "wattd_host_energy_joules_total",
            "wattd_measured_energy_joules_total",
            "wattd_power_watts",
            "wattd_tick_duration_seconds",
            "wattd_intervals_total",
            "wattd_gaps_total",
            "wattd_quarantined_total",
            "wattd_spool_bytes",
            "wattd_spool_unacked_batches",
            "wattd_spool_oldest_unacked_age_seconds",
            "wattd_spool_coarsened_intervals_total",
            "wattd_runs_tracked",
            "wattd_metrics_runs_dropped_total",
            "wattd_tracker_read_errors_total",
            "wattd_tracker_hostile_names_skipped_total",
            "wattd_tracker_fd_fallback_runs_total",
        ] {
            assert!(typed.contains_key(family), "{family} missing");
        }
    }

    #[test]
    fn microseconds_render_as_exact_seconds() {
        assert_eq!(us_as_seconds(0), "0.000000");
        assert_eq!(us_as_seconds(1), "0.000001");
        assert_eq!(us_as_seconds(2_500_000), "2.500000");
        assert_eq!(us_as_seconds(u64::MAX), "18446744073709.551615");
    }

    #[test]
    fn delivery_lag_is_the_age_of_the_oldest_unacknowledged_batch() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut d = DeliveryLag::default();
        d.update(0, 0, at(0));
        assert_eq!(d.oldest_unacked_age(at(5)), Duration::ZERO);
        // Sealed 1..=3 at 10 s, 4..=6 at 20 s; nothing acknowledged.
        d.update(3, 0, at(10));
        d.update(6, 0, at(20));
        assert_eq!(d.oldest_unacked_age(at(30)), Duration::from_secs(20));
        // Up to 3 acknowledged: the oldest unacknowledged (4) was sealed at 20 s.
        d.update(6, 3, at(30));
        assert_eq!(d.oldest_unacked_age(at(30)), Duration::from_secs(10));
        // All acknowledged.
        d.update(6, 6, at(31));
        assert_eq!(d.oldest_unacked_age(at(40)), Duration::ZERO);
        // Many seals within one second share an entry.
        for i in 0..100 {
            d.update(7 + i, 6, at(50) + Duration::from_millis(i));
        }
        assert_eq!(d.sealed_by.len(), 1);
        assert_eq!(d.oldest_unacked_age(at(52)), Duration::from_secs(2));
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        m.serve_per_run(true);
        for ms in [0.2, 3.0, 3.0, 40.0, 20_000.0] {
            m.observe_tick(Duration::from_secs_f64(ms / 1000.0));
        }
        let text = m.render();
        let s = samples(&text);
        let get = |needle: &str| -> &str {
            s.iter()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} missing:\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
        };
        assert_eq!(
            get("wattd_tick_duration_seconds_bucket{le=\"0.0005\"}"),
            "1"
        );
        assert_eq!(
            get("wattd_tick_duration_seconds_bucket{le=\"0.0025\"}"),
            "1"
        );
        assert_eq!(get("wattd_tick_duration_seconds_bucket{le=\"0.005\"}"), "3");
        assert_eq!(get("wattd_tick_duration_seconds_bucket{le=\"0.05\"}"), "4");
        assert_eq!(get("wattd_tick_duration_seconds_bucket{le=\"10\"}"), "4");
        assert_eq!(get("wattd_tick_duration_seconds_bucket{le=\"+Inf\"}"), "5");
        assert_eq!(get("wattd_tick_duration_seconds_count "), "5");
        let sum: f64 = get("wattd_tick_duration_seconds_sum ").parse().unwrap();
        assert!((sum - 20.0462).abs() < 1e-9, "{sum}");
        // The buckets never decrease.
        let counts: Vec<u64> = s
            .iter()
            .filter(|l| l.starts_with("wattd_tick_duration_seconds_bucket"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(counts.len(), TICK_BUCKETS_S.len() + 1);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    }

    #[test]
    fn energy_power_gaps_and_quarantine_are_accounted() {
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        m.serve_per_run(true);
        let mut psys = result(key(Domain::Psys, None), 9_000_000, &[]);
        psys.host_active_uj = 0;
        psys.unattributed = vec![(UnattributedReason::Quarantined, 9_000_000)];
        let mut dram = result(key(Domain::Dram, Some(0)), 0, &[]);
        dram.gap = true;
        let gap = GapRecord {
            key: Some(key(Domain::Dram, Some(0))),
            start: Stamp {
                mono_ns: 0,
                unix_ns: 0,
            },
            end: Stamp {
                mono_ns: 2,
                unix_ns: 0,
            },
            cause: GapCause::CounterReset,
            detail: String::new(),
        };
        // 2 s, package 0: 30 J = 15 W; r1 gets 10.5 J, r2 4.000001 J, the host the rest.
        let pkg = result(
            key(Domain::Package, Some(0)),
            30_000_000,
            &[("r1", 10_000_000, 500_000), ("r2", 4_000_001, 0)],
        );
        m.record_interval(&interval(2, vec![pkg, psys, dram], vec![gap]));
        m.record_gap(GapCause::AgentDown);
        m.set_gpu_unmeasured(1);
        m.add_gpu_unattributed_pids(2);
        m.add_gpu_unattributed_pids(3);
        let text = m.render();
        // The whole text, as a scraper sees it (the version aside): a reviewed diff when it
        // changes.
        wattd_testkit::golden::check(
            env!("CARGO_MANIFEST_DIR"),
            "tests/golden/metrics.prom",
            &text.replace(
                &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
                "version=\"VERSION\"",
            ),
        );
        let s = samples(&text);
        for want in [
            "wattd_gpu_unmeasured_devices 1",
            "wattd_gpu_unattributed_pids_total 5",
            "wattd_run_energy_joules_total{run_id=\"r1\",domain=\"package\"} 10.5",
            "wattd_run_energy_joules_total{run_id=\"r2\",domain=\"package\"} 4.000001",
            "wattd_host_energy_joules_total{domain=\"package\",source=\"powercap\",part=\"active\"} 15.499999",
            "wattd_host_energy_joules_total{domain=\"package\",source=\"powercap\",part=\"idle\"} 0",
            "wattd_host_energy_joules_total{domain=\"psys\",source=\"powercap\",part=\"unattributed\"} 9",
            "wattd_measured_energy_joules_total{domain=\"package\",package=\"0\",source=\"powercap\",quality=\"measured\"} 30",
            "wattd_measured_energy_joules_total{domain=\"psys\",package=\"all\",source=\"powercap\",quality=\"measured\"} 9",
            "wattd_power_watts{domain=\"package\",package=\"0\"} 15",
            "wattd_quarantined_total 1",
            "wattd_gaps_total{cause=\"counter_reset\"} 1",
            "wattd_gaps_total{cause=\"source_failure\"} 0",
            "wattd_gaps_total{cause=\"agent_down\"} 1",
            "wattd_intervals_total 1",
            "wattd_measured_seconds_total 2.000000",
        ] {
            assert!(s.contains(&want), "missing {want:?} in\n{text}");
        }
        // No power for a gap or a quarantined reading, and no measured energy for a gap.
        assert!(
            !text.contains("wattd_power_watts{domain=\"psys\""),
            "{text}"
        );
        assert!(
            !text.contains("wattd_power_watts{domain=\"dram\""),
            "{text}"
        );
        assert!(
            !text.contains("wattd_measured_energy_joules_total{domain=\"dram\""),
            "{text}"
        );
        // Counters accumulate over intervals.
        let pkg = result(key(Domain::Package, Some(0)), 1, &[("r1", 1, 0)]);
        m.record_interval(&interval(1, vec![pkg], Vec::new()));
        let text = m.render();
        assert!(
            samples(&text).contains(
                &"wattd_run_energy_joules_total{run_id=\"r1\",domain=\"package\"} 10.500001"
            ),
            "{text}"
        );
    }

    /// The BMC's series appear only with a BMC, and count what every tick said.
    #[test]
    fn platform_meter_series() {
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        assert!(!m.render().contains("wattd_bmc"), "no BMC, no series");
        let tick =
            |readings, failures, carry_uj, waiting: Option<&str>| crate::platform::PlatformTick {
                measured: crate::attribution::Measured::Energy { energy_uj: 0 },
                source: SourceKind::Redfish,
                quality: Quality::Measured,
                lost: Vec::new(),
                readings,
                failures,
                dropped: 1,
                carry_uj,
                wall_power_mw: Some(374_500),
                shares: Default::default(),
                waiting: waiting.map(str::to_owned),
            };
        m.set_platform(&tick(10, 0, 0, None), 0);
        m.set_platform(
            &tick(3, 7, -2_500_000, Some("BMC https://bmc: timed out")),
            4,
        );
        let text = m.render();
        for want in [
            "wattd_bmc_readings_total 13",
            "wattd_bmc_failures_total 7",
            "wattd_bmc_dropped_total 4",
            "wattd_bmc_readings_refused_total 2",
            "wattd_platform_carry_joules -2.5",
            "wattd_platform_measuring 0",
            "wattd_wall_power_watts 374.5",
        ] {
            assert!(text.lines().any(|l| l == want), "{want}\n{text}");
        }
    }

    #[test]
    fn per_run_series_are_rendered_only_when_served() {
        let pkg = key(Domain::Package, Some(0));
        let iv = interval(
            1,
            vec![result(pkg, 10_000_000, &[("tenant-a-run", 6_000_000, 0)])],
            vec![],
        );
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        m.record_interval(&iv);
        let text = m.render();
        assert!(!text.contains("tenant-a-run"), "{text}");
        assert!(!text.contains("run_id="), "{text}");
        assert!(text.contains("wattd_metrics_per_run_series 0\n"), "{text}");
        assert!(
            text.contains("wattd_measured_energy_joules_total{"),
            "{text}"
        );
        m.serve_per_run(true);
        let text = m.render();
        assert!(text.contains("run_id=\"tenant-a-run\""), "{text}");
        assert!(text.contains("wattd_metrics_per_run_series 1\n"), "{text}");
    }

    #[test]
    fn finished_runs_expire_after_the_ttl() {
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        m.serve_per_run(true);
        let pkg = result(
            key(Domain::Package, Some(0)),
            2,
            &[("a", 1, 0), ("b", 1, 0)],
        );
        m.record_interval(&interval(1, vec![pkg], Vec::new()));
        m.run_finished("a", 1_000_000_000);
        m.expire(1_000_000_000 + 299_999_999_999);
        assert_eq!(m.runs_exported(), 2);
        m.expire(1_000_000_000 + 300_000_000_000);
        assert_eq!(m.runs_exported(), 1);
        let text = m.render();
        assert!(!text.contains("run_id=\"a\""), "{text}");
        assert!(text.contains("run_id=\"b\""), "{text}");
        // A live run never expires.
        m.expire(u64::MAX);
        assert_eq!(m.runs_exported(), 1);
    }

    #[test]
    fn the_run_cap_evicts_finished_runs_first_and_counts_refusals_once() {
        let mut m = Metrics::new(Duration::from_secs(300), 2);
        m.serve_per_run(true);
        let tick = |m: &mut Metrics, runs: &[(&str, u64, u64)]| {
            let e: u64 = runs.iter().map(|(_, a, i)| a + i).sum();
            let pkg = result(key(Domain::Package, Some(0)), e, runs);
            m.record_interval(&interval(1, vec![pkg], Vec::new()));
        };
        tick(&mut m, &[("a", 1, 0), ("b", 1, 0)]);
        // Full: c is refused, and counted once however many intervals it shows up in.
        tick(&mut m, &[("a", 1, 0), ("b", 1, 0), ("c", 1, 0)]);
        tick(&mut m, &[("c", 1, 0)]);
        assert_eq!(m.runs_exported(), 2);
        let text = m.render();
        assert!(
            samples(&text).contains(&"wattd_metrics_runs_dropped_total 1"),
            "{text}"
        );
        assert!(!text.contains("run_id=\"c\""), "{text}");
        // Once a finishes, a newcomer takes its place (a's early drop is counted too).
        m.run_finished("a", 5);
        tick(&mut m, &[("d", 1, 0)]);
        let text = m.render();
        assert!(!text.contains("run_id=\"a\""), "{text}");
        assert!(text.contains("run_id=\"d\""), "{text}");
        assert!(
            samples(&text).contains(&"wattd_metrics_runs_dropped_total 2"),
            "{text}"
        );
    }

    #[test]
    fn spool_and_tracker_values_are_exported() {
        let mut m = Metrics::new(Duration::from_secs(300), 10);
        m.serve_per_run(true);
        m.set_spool(4096, 10, 7);
        m.set_coarsened(3);
        m.set_tracker(&TrackerCounters {
            runs_tracked: 5,
            hostile_names_skipped: 2,
            read_errors: 9,
            ..TrackerCounters::default()
        });
        let text = m.render();
        let s = samples(&text);
        for want in [
            "wattd_spool_bytes 4096",
            "wattd_spool_unacked_batches 3",
            "wattd_spool_coarsened_intervals_total 3",
            "wattd_runs_tracked 5",
            "wattd_tracker_hostile_names_skipped_total 2",
            "wattd_tracker_read_errors_total 9",
            "wattd_tracker_usage_went_backwards_total 0",
        ] {
            assert!(s.contains(&want), "missing {want:?} in\n{text}");
        }
        // An ack cursor ahead of the sealed seq (cannot happen; the spool refuses it) is 0.
        m.set_spool(0, 1, 2);
        assert!(m.render().contains("wattd_spool_unacked_batches 0\n"));
    }
}
