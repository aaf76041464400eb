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
//! This file is the registry (what the daemon records); `exposition` renders it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use wattd_collectors::cgroup::TrackerCounters;
use wattd_collectors::{Domain, MeterKey, Quality, SourceKind};

use crate::attribution::UnattributedReason;
use crate::sampler::{GapCause, Interval};

mod exposition;
pub mod section;

/// Default cap on the number of runs with exported series.
pub const DEFAULT_MAX_RUNS: usize = 10_000;

/// Upper bounds of the tick-duration histogram, seconds. A tick is usage + meters + attribution +
/// seal + fdatasync: milliseconds normally; the top buckets catch a slow disk.
pub const TICK_BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
            unclaimed_us: 1_234_567,
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
            "wattd_tracker_unclaimed_cpu_seconds 1.234567",
        ] {
            assert!(s.contains(&want), "missing {want:?} in\n{text}");
        }
        // An ack cursor ahead of the sealed seq (cannot happen; the spool refuses it) is 0.
        m.set_spool(0, 1, 2);
        assert!(m.render().contains("wattd_spool_unacked_batches 0\n"));
    }
}
