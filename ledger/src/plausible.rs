//! Plausibility, per node: a signature proves which node wrote a batch, not that it is true. An
//! authentic batch whose intervals could not have happened (time that overlaps, runs ahead of
//! the ledger's clock, or energy above what the node's hardware can draw) is still stored and
//! chained (refusing it would stop the node forever: its successors chain to it), but the
//! allocations of its implausible intervals are quarantined with their reason: kept as
//! evidence, never billed, excluded from every total.
//!
//! The rules, judged in seq order inside the store's commit transaction (so two ledger
//! processes on one PostgreSQL judge against the same state):
//! - **Tiling.** On one boot (same `boot_id`) an interval never starts before the previous one
//!   ended (monotonic clock). Across boots, where the monotonic clock restarts, it never starts
//!   before the latest accepted interval's wall-clock end minus [`BOOT_SKEW_NS`]. Interval
//!   indices only increase, except after a declared gap (an agent that could not read its last
//!   interval back starts again at 0). A start after the previous end needs a declared gap (the
//!   agent records AGENT_DOWN when it restarts, in the interval or its batch, or in an earlier
//!   batch with no interval) or a declared lost range between the two batches; an undeclared hole
//!   is counted, not quarantined (it can only make the node bill less).
//! - **Clock.** The node's measured time (the sum of its accepted intervals' monotonic lengths)
//!   never runs ahead of the ledger's own clock since it first stored a batch of the node by
//!   more than `--max-ahead-s` (the backlog a node may bring to its first connection, plus
//!   skew).
//! - **Power.** The energy allocated to runs in one interval, per meter (`domain:package`,
//!   summed over every entry of that label), is at most the domain's declared `max_watts`
//!   times the interval's length; over the node (package, DRAM, GPU and other meters, or psys
//!   if it says more; core and uncore are inside their package), at most `max_watts.total`
//!   times it. Both with [`POWER_MARGIN`] and [`ENERGY_SLACK_UJ`] for counters read a little
//!   after the tick.
//! - **CPU time.** A run's CPU time in one interval and meter (package, psys, and DRAM under the
//!   `cpu` policy; summed over its rows) is at most the node's declared `cpus` times the
//!   interval's length plus [`USAGE_CARRY_US`] (usage recovered late, from a removed cgroup's
//!   parent or after failed reads, lands in a later interval than it was spent in).
//!
//! Limits come from the enrolment file's `[limits]` table; the defaults are far above any real
//! host, so no honest node is quarantined by them, and still bound a forgery to physical values
//! (1 kWh in one interval of 1 ns is 3.6 PW). Declare peak power (PL2, the GPU's power limit),
//! not TDP.

use std::collections::BTreeMap;

/// Slack for a run's CPU time in one interval: usage read late (a ghost's claim, a tail
/// reconciled through the parent, catch-up after failed reads) is billed in the interval where
/// it was recovered.
pub const USAGE_CARRY_US: u64 = 600_000_000;

/// How far an interval on a new boot may start before the last accepted interval's wall-clock
/// end (clocks set at boot before NTP).
pub const BOOT_SKEW_NS: i64 = 600_000_000_000;

/// The power limits are exceeded only by more than a quarter (numerator, denominator).
pub const POWER_MARGIN: (u128, u128) = (5, 4);

/// And by more than a joule per interval (a counter read after the tick).
pub const ENERGY_SLACK_UJ: u128 = 1_000_000;

/// Default `cpus` when the enrolment declares none: above any single host.
pub const DEFAULT_CPUS: u32 = 8192;

/// Default `max_watts` of one instance (package, GPU) of a domain when the enrolment declares
/// none, and of the whole node (`total`).
pub fn default_max_watts(domain: &str) -> u32 {
    match domain {
        "package" | "core" | "uncore" | "dram" => 2_000,
        "gpu" => 3_000,
        "total" => 50_000,
        _ => 20_000,
    }
}

/// What an enrolment declares about a node's hardware (`[limits]` in its enrolment file).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    /// Logical CPUs.
    pub cpus: Option<u32>,
    /// Peak watts one instance of each domain can draw, by domain name (`package`, `core`,
    /// `uncore`, `dram`, `psys`, `gpu`), and the whole node (`total`).
    #[serde(default)]
    pub max_watts: BTreeMap<String, u32>,
}

impl Declared {
    /// Every problem with the declared values.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(c) = self.cpus {
            if c == 0 || c > 1 << 20 {
                p.push(format!("limits.cpus = {c}: must be 1 to {}", 1 << 20));
            }
        }
        for (d, w) in &self.max_watts {
            if d != "total" {
                if let Some(what) = wattd_proto::names::domain_problem(d) {
                    p.push(format!("limits.max_watts: {d:?}: {what}, or total"));
                }
            }
            if *w == 0 || *w > 10_000_000 {
                p.push(format!(
                    "limits.max_watts.{d} = {w}: must be 1 to 10000000 W"
                ));
            }
        }
        p
    }
}

/// The limits one node is judged by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    pub cpus: u32,
    pub max_watts: BTreeMap<String, u32>,
    /// `--max-ahead-s`, in ns.
    pub max_ahead_ns: i64,
}

impl NodeLimits {
    pub fn new(declared: &Declared, max_ahead_ns: i64) -> Self {
        Self {
            cpus: declared.cpus.unwrap_or(DEFAULT_CPUS),
            max_watts: declared.max_watts.clone(),
            max_ahead_ns,
        }
    }

    pub fn watts(&self, domain: &str) -> u32 {
        self.max_watts
            .get(domain)
            .copied()
            .unwrap_or_else(|| default_max_watts(domain))
    }

    /// The most energy `watts` may account for over `len_ns`, with the margin and slack.
    fn energy_bound(watts: u32, len_ns: u64) -> u128 {
        // W x ns / 1000 = uJ.
        u128::from(watts) * u128::from(len_ns) / 1000 * POWER_MARGIN.0 / POWER_MARGIN.1
            + ENERGY_SLACK_UJ
    }
}

/// Why an interval (or one meter of it) is implausible: the `reason` of a quarantined
/// allocation and of `wattd_ledger_implausible_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Implausible {
    /// Its end is before its start.
    NegativeLength,
    /// Its index is not above the node's previous interval's, and no gap says why.
    IndexNotIncreasing,
    /// It starts before the previous interval on the same boot ended, or (on a new boot)
    /// before the last one's wall-clock end.
    Overlap,
    /// The node's measured time would run ahead of the ledger's clock.
    AheadOfClock,
    /// A meter's (or the node's) allocated energy is above its max_watts times the length.
    AboveMaxWatts,
    /// A run's CPU time is above cpus times the length (plus the carry).
    AboveCpus,
}

impl Implausible {
    pub const ALL: [Implausible; 6] = [
        Implausible::NegativeLength,
        Implausible::IndexNotIncreasing,
        Implausible::Overlap,
        Implausible::AheadOfClock,
        Implausible::AboveMaxWatts,
        Implausible::AboveCpus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Implausible::NegativeLength => "negative_length",
            Implausible::IndexNotIncreasing => "index_not_increasing",
            Implausible::Overlap => "overlap",
            Implausible::AheadOfClock => "ahead_of_clock",
            Implausible::AboveMaxWatts => "above_max_watts",
            Implausible::AboveCpus => "above_cpus",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What the judge needs of one meter of one interval (every entry with its label, summed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    /// `domain` or `domain:package`, as the allocation rows name it.
    pub label: String,
    pub domain: String,
    /// The sum of its allocations (active + idle).
    pub allocated_uj: u128,
    /// The largest CPU time of one run (its rows summed), when usage is CPU time here.
    pub max_run_cpu_us: Option<u128>,
}

/// What the judge needs of one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntervalFacts {
    pub index: u64,
    pub boot_id: String,
    pub start_mono_ns: u64,
    pub end_mono_ns: u64,
    pub start_unix_ns: i64,
    pub end_unix_ns: i64,
    /// The interval carries a gap record (a declared hole before it).
    pub declares_gap: bool,
    pub domains: Vec<DomainFacts>,
}

/// What the judge needs of one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchFacts {
    pub intervals: Vec<IntervalFacts>,
    /// The batch carries gap records of its own (AGENT_DOWN between two runs of the agent).
    pub declares_gap: bool,
}

/// The node's clock as the ledger has judged it so far (one row per node, in the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeClock {
    /// The ledger's clock when it first stored a batch of the node.
    pub first_seen_unix_ns: i64,
    /// The sum of the accepted intervals' lengths.
    pub measured_ns: u64,
    /// The seq of the last stored batch.
    pub last_seq: u64,
    pub last_index: Option<u64>,
    pub last_boot: String,
    pub last_end_mono_ns: u64,
    /// The latest wall-clock end of an accepted interval.
    pub last_end_unix_ns: i64,
    /// A gap was declared in a batch with no interval: the next hole is declared.
    pub gap_pending: bool,
    pub undeclared_holes: u64,
    /// Intervals (or meters of one) judged implausible.
    pub implausible: u64,
}

impl NodeClock {
    pub fn new(now_unix_ns: i64) -> Self {
        Self {
            first_seen_unix_ns: now_unix_ns,
            measured_ns: 0,
            last_seq: 0,
            last_index: None,
            last_boot: String::new(),
            last_end_mono_ns: 0,
            last_end_unix_ns: i64::MIN,
            gap_pending: false,
            undeclared_holes: 0,
            implausible: 0,
        }
    }
}

/// The judgement of one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// By interval position in the batch: the whole interval is implausible.
    pub intervals: BTreeMap<usize, Implausible>,
    /// By interval position, then meter label: that meter of the interval is.
    pub domains: BTreeMap<usize, BTreeMap<String, Implausible>>,
}

impl Verdict {
    /// Why the allocation of `label` in the interval at `pos` is quarantined, if it is.
    pub fn reason(&self, pos: usize, label: &str) -> Option<Implausible> {
        self.intervals
            .get(&pos)
            .or_else(|| self.domains.get(&pos).and_then(|d| d.get(label)))
            .copied()
    }

    /// Every verdict, for the counters.
    pub fn all(&self) -> impl Iterator<Item = Implausible> + '_ {
        self.intervals
            .values()
            .chain(self.domains.values().flat_map(BTreeMap::values))
            .copied()
    }

    pub fn count(&self) -> usize {
        self.intervals.len() + self.domains.values().map(BTreeMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty() && self.domains.is_empty()
    }
}

/// The node's allocated energy in one interval, for the `total` limit: package, DRAM and GPU
/// meters (and any other), or the platform meter (psys) if it says more, since psys includes
/// package and DRAM; core and uncore are parts of their package and are not added.
fn node_energy(domains: &[DomainFacts]) -> u128 {
    let mut parts = 0u128;
    let mut psys = 0u128;
    let mut platform = 0u128;
    for d in domains {
        match d.domain.as_str() {
            "psys" => psys += d.allocated_uj,
            // The wall less every other meter: on top of them, whichever they are.
            "platform" => platform += d.allocated_uj,
            "core" | "uncore" => {}
            _ => parts += d.allocated_uj,
        }
    }
    parts.max(psys) + platform
}

/// Judges batch `seq` against the node's clock (`None`: nothing judged yet) at the ledger's
/// time `now_unix_ns`. Returns the verdict and the clock after the batch.
pub fn judge(
    limits: &NodeLimits,
    clock: Option<NodeClock>,
    seq: u64,
    batch: &BatchFacts,
    now_unix_ns: i64,
) -> (Verdict, NodeClock) {
    let fresh = clock.is_none();
    let mut c = clock.unwrap_or_else(|| NodeClock::new(now_unix_ns));
    // A lost range (or the first batch judged) between the two: a hole is declared by it.
    let follows = !fresh && c.last_seq.checked_add(1) == Some(seq);
    let declared_before = batch.declares_gap || c.gap_pending || !follows;
    let mut gap = declared_before;
    let mut v = Verdict::default();
    let since_first = u64::try_from(now_unix_ns.saturating_sub(c.first_seen_unix_ns)).unwrap_or(0);
    let budget = since_first.saturating_add(u64::try_from(limits.max_ahead_ns).unwrap_or(0));
    let total_watts = limits.watts("total");
    for (pos, i) in batch.intervals.iter().enumerate() {
        let declared = gap || i.declares_gap;
        // A gap declares the hole right after it, not every later one.
        gap = false;
        let whole = |v: &mut Verdict, r| {
            v.intervals.insert(pos, r);
        };
        let Some(len) = i.end_mono_ns.checked_sub(i.start_mono_ns) else {
            whole(&mut v, Implausible::NegativeLength);
            continue;
        };
        if !declared && c.last_index.is_some_and(|last| i.index <= last) {
            whole(&mut v, Implausible::IndexNotIncreasing);
            continue;
        }
        let seen = c.last_index.is_some();
        let same_boot = seen && !i.boot_id.is_empty() && i.boot_id == c.last_boot;
        if same_boot && i.start_mono_ns < c.last_end_mono_ns {
            whole(&mut v, Implausible::Overlap);
            continue;
        }
        if seen && !same_boot && i.start_unix_ns < c.last_end_unix_ns.saturating_sub(BOOT_SKEW_NS) {
            whole(&mut v, Implausible::Overlap);
            continue;
        }
        if c.measured_ns.saturating_add(len) > budget {
            whole(&mut v, Implausible::AheadOfClock);
            continue;
        }
        if same_boot && i.start_mono_ns > c.last_end_mono_ns && !declared {
            c.undeclared_holes += 1;
        }
        c.measured_ns = c.measured_ns.saturating_add(len);
        c.last_index = Some(i.index);
        c.last_boot.clone_from(&i.boot_id);
        c.last_end_mono_ns = i.end_mono_ns;
        // A clock that ran fast must not poison later boots: never beyond the ledger's own.
        c.last_end_unix_ns = c
            .last_end_unix_ns
            .max(i.end_unix_ns.min(now_unix_ns.saturating_add(BOOT_SKEW_NS)));
        if node_energy(&i.domains) > NodeLimits::energy_bound(total_watts, len) {
            whole(&mut v, Implausible::AboveMaxWatts);
            continue;
        }
        let max_cpu_us =
            u128::from(limits.cpus) * u128::from((len / 1000).saturating_add(USAGE_CARRY_US));
        for d in &i.domains {
            let r = if d.allocated_uj > NodeLimits::energy_bound(limits.watts(&d.domain), len) {
                Some(Implausible::AboveMaxWatts)
            } else if d.max_run_cpu_us.is_some_and(|u| u > max_cpu_us) {
                Some(Implausible::AboveCpus)
            } else {
                None
            };
            if let Some(r) = r {
                v.domains.entry(pos).or_default().insert(d.label.clone(), r);
            }
        }
    }
    // A gap (or lost range) before a batch with no interval declares the next batch's first
    // hole.
    c.gap_pending = batch.intervals.is_empty() && declared_before;
    c.last_seq = seq;
    c.implausible = c
        .implausible
        .saturating_add(u64::try_from(v.count()).unwrap_or(u64::MAX));
    (v, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limits() -> NodeLimits {
        NodeLimits::new(
            &Declared {
                cpus: Some(4),
                max_watts: [("package".to_owned(), 200), ("total".to_owned(), 300)]
                    .into_iter()
                    .collect(),
            },
            3600 * S as i64,
        )
    }

    fn interval(index: u64, start_s: u64, end_s: u64, uj: u128, cpu_us: u128) -> IntervalFacts {
        IntervalFacts {
            index,
            boot_id: "b1".into(),
            start_mono_ns: start_s * S,
            end_mono_ns: end_s * S,
            start_unix_ns: (1_000_000 + start_s * S) as i64,
            end_unix_ns: (1_000_000 + end_s * S) as i64,
            declares_gap: false,
            domains: vec![DomainFacts {
                label: "package:0".into(),
                domain: "package".into(),
                allocated_uj: uj,
                max_run_cpu_us: Some(cpu_us),
            }],
        }
    }

    fn batch(intervals: Vec<IntervalFacts>) -> BatchFacts {
        BatchFacts {
            intervals,
            declares_gap: false,
        }
    }

    /// 200 W for one second, and the margin.
    const J200: u128 = 200_000_000;
    const MARGIN: u128 = J200 / 4 + ENERGY_SLACK_UJ;

    #[test]
    fn honest_intervals_pass_and_move_the_clock() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (v, c) = judge(
            &l,
            None,
            1,
            &batch(vec![interval(0, 10, 11, J200, 4_000_000)]),
            now,
        );
        assert!(v.is_empty(), "{v:?}");
        // At the limit with its margin; 4 CPUs for 1 s; long and coarsened: 100 s at 150 W.
        let b = batch(vec![
            interval(1, 11, 12, J200 + MARGIN, 4_000_000),
            interval(2, 12, 112, 15_000_000_000, 1_000),
        ]);
        let (v, c) = judge(&l, Some(c), 2, &b, now);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(c.measured_ns, 102 * S);
        assert_eq!(c.last_index, Some(2));
        assert_eq!((c.undeclared_holes, c.implausible), (0, 0));
        // Agent down for 50 s, declared by the batch; then a reboot (new boot id, monotonic
        // clock from 0, wall clock on).
        let after = interval(3, 162, 163, 1, 1);
        let mut rebooted = interval(4, 5, 6, 1, 1);
        rebooted.boot_id = "b2".into();
        rebooted.start_unix_ns = after.end_unix_ns + 60 * S as i64;
        rebooted.end_unix_ns = rebooted.start_unix_ns + S as i64;
        let mut b = batch(vec![after, rebooted]);
        b.declares_gap = true;
        let (v, c) = judge(&l, Some(c), 3, &b, now);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(c.undeclared_holes, 0);
        assert_eq!(c.last_end_mono_ns, 6 * S);
        // An undeclared hole is counted, not quarantined; after a lost range it is declared;
        // so is one after a batch that held only the gap.
        let mut later = interval(5, 20, 21, 1, 1);
        later.boot_id = "b2".into();
        let (v, c1) = judge(&l, Some(c.clone()), 4, &batch(vec![later.clone()]), now);
        assert!(v.is_empty());
        assert_eq!(c1.undeclared_holes, 1);
        let (_, c2) = judge(&l, Some(c.clone()), 9, &batch(vec![later.clone()]), now);
        assert_eq!(
            c2.undeclared_holes, 0,
            "after a lost range the hole is declared"
        );
        let mut only_gap = batch(Vec::new());
        only_gap.declares_gap = true;
        let (_, c3) = judge(&l, Some(c), 4, &only_gap, now);
        assert!(c3.gap_pending);
        let (_, c4) = judge(&l, Some(c3), 5, &batch(vec![later]), now);
        assert_eq!((c4.undeclared_holes, c4.gap_pending), (0, false));
    }

    #[test]
    fn the_forged_nanosecond_kilowatt_hour_and_overflow_values_are_quarantined() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (_, c) = judge(&l, None, 1, &batch(vec![interval(0, 10, 11, 1, 1)]), now);
        let kwh = 3_600_000_000_000u128;
        let mut forged = interval(1, 11, 11, kwh, 0);
        forged.end_mono_ns += 1;
        let (v, c) = judge(&l, Some(c), 2, &batch(vec![forged]), now);
        assert_eq!(v.reason(0, "package:0"), Some(Implausible::AboveMaxWatts));
        assert_eq!(c.implausible, 1);
        // 2^62 uJ needs 729 years at 200 W; an interval of ten years is ahead of the clock.
        let huge = 1u128 << 62;
        let ten_years = 10 * 365 * 86_400;
        let b = batch(vec![interval(2, 12, 12 + ten_years, huge, 0)]);
        let (v, c) = judge(&l, Some(c), 3, &b, now);
        assert_eq!(v.reason(0, "package:0"), Some(Implausible::AheadOfClock));
        // CPU time above 4 CPUs plus the carry.
        let cpu = 4 * (1_000_000 + u128::from(USAGE_CARRY_US)) + 1;
        let (v, _) = judge(
            &l,
            Some(c),
            4,
            &batch(vec![interval(3, 12, 13, 1, cpu)]),
            now,
        );
        assert_eq!(v.reason(0, "package:0"), Some(Implausible::AboveCpus));
        assert_eq!(v.reason(0, "dram:0"), None, "only the implausible meter");
    }

    #[test]
    fn psys_and_package_parts_are_not_added_to_the_node_twice() {
        let d = |domain: &str, uj: u128| DomainFacts {
            label: format!("{domain}:0"),
            domain: domain.into(),
            allocated_uj: uj,
            max_run_cpu_us: None,
        };
        assert_eq!(
            node_energy(&[d("package", 5), d("dram", 2), d("gpu", 3)]),
            10
        );
        assert_eq!(
            node_energy(&[d("psys", 8), d("package", 5), d("dram", 2)]),
            8
        );
        assert_eq!(
            node_energy(&[d("psys", 6), d("package", 5), d("gpu", 3)]),
            8
        );
        assert_eq!(
            node_energy(&[d("psys", 6), d("package", 5), d("platform", 4)]),
            10
        );
        assert_eq!(
            node_energy(&[d("package", 5), d("core", 4), d("uncore", 1)]),
            5
        );
    }

    #[test]
    fn a_lost_range_before_an_empty_batch_still_declares_the_next_hole() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (_, c) = judge(&l, None, 1, &batch(vec![interval(0, 10, 11, 1, 1)]), now);
        // Seqs 2..=4 lost; seq 5 holds only a heartbeat's worth: no interval.
        let (_, c) = judge(&l, Some(c), 5, &batch(Vec::new()), now);
        assert!(c.gap_pending);
        let (_, c) = judge(&l, Some(c), 6, &batch(vec![interval(9, 50, 51, 1, 1)]), now);
        assert_eq!(c.undeclared_holes, 0);
    }

    #[test]
    fn a_fast_clock_does_not_poison_later_boots() {
        let l = limits();
        let now = 10_000 * S as i64;
        let mut fast = interval(0, 10, 11, 1, 1);
        fast.start_unix_ns = now + 86_400 * S as i64;
        fast.end_unix_ns = fast.start_unix_ns + S as i64;
        let (_, c) = judge(&l, None, 1, &batch(vec![fast]), now);
        assert_eq!(c.last_end_unix_ns, now + BOOT_SKEW_NS);
        // After NTP and a reboot, an honest interval now.
        let mut honest = interval(1, 0, 1, 1, 1);
        honest.boot_id = "b2".into();
        honest.start_unix_ns = now;
        honest.end_unix_ns = now + S as i64;
        let (v, _) = judge(&l, Some(c), 2, &batch(vec![honest]), now);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn many_meters_cannot_add_up_past_the_node() {
        let l = limits(); // 200 W a package, 300 W the node
        let now = 10_000 * S as i64;
        let (_, c) = judge(&l, None, 1, &batch(vec![interval(0, 10, 11, 1, 1)]), now);
        let mut i = interval(1, 11, 12, 0, 0);
        i.domains = (0..3)
            .map(|p| DomainFacts {
                label: format!("package:{p}"),
                domain: "package".into(),
                allocated_uj: J200,
                max_run_cpu_us: None,
            })
            .collect();
        let (v, _) = judge(&l, Some(c), 2, &batch(vec![i]), now);
        assert_eq!(
            v.intervals.get(&0),
            Some(&Implausible::AboveMaxWatts),
            "{v:?}"
        );
        assert_eq!(v.reason(0, "package:2"), Some(Implausible::AboveMaxWatts));
    }

    #[test]
    fn overlapping_and_backwards_intervals_are_quarantined_and_do_not_move_the_clock() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (_, c) = judge(&l, None, 1, &batch(vec![interval(5, 10, 20, 1, 1)]), now);
        let b = batch(vec![
            interval(6, 15, 25, 1, 1), // overlaps 10..20
            interval(7, 30, 29, 1, 1), // ends before it starts
            interval(5, 20, 21, 1, 1), // index again, no gap
            interval(8, 20, 21, 1, 1), // fine
        ]);
        let (v, c) = judge(&l, Some(c), 2, &b, now);
        assert_eq!(v.intervals.get(&0), Some(&Implausible::Overlap));
        assert_eq!(v.intervals.get(&1), Some(&Implausible::NegativeLength));
        assert_eq!(v.intervals.get(&2), Some(&Implausible::IndexNotIncreasing));
        assert_eq!(v.reason(3, "package:0"), None);
        assert_eq!(c.last_end_mono_ns, 21 * S);
        assert_eq!(c.measured_ns, 11 * S);
        assert_eq!(c.implausible, 3);
        // Alternating boot ids do not escape: on a new boot the wall clock must go on.
        let mut other_boot = interval(9, 0, 5, 1, 1);
        other_boot.boot_id = "b2".into();
        other_boot.start_unix_ns = c.last_end_unix_ns - BOOT_SKEW_NS - 1;
        let (v, c) = judge(&l, Some(c), 3, &batch(vec![other_boot.clone()]), now);
        assert_eq!(v.intervals.get(&0), Some(&Implausible::Overlap));
        // Within the skew it passes (a clock set at boot before NTP).
        other_boot.start_unix_ns = c.last_end_unix_ns - BOOT_SKEW_NS + 1;
        let (v, c) = judge(&l, Some(c), 4, &batch(vec![other_boot]), now);
        assert!(v.is_empty(), "{v:?}");
        // An agent that lost its last interval starts its indices again, and says so.
        let mut restart = interval(0, 6, 7, 1, 1);
        restart.boot_id = "b2".into();
        restart.start_unix_ns = c.last_end_unix_ns;
        let mut b = batch(vec![restart]);
        b.declares_gap = true;
        let (v, _) = judge(&l, Some(c), 5, &b, now);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn measured_time_may_run_ahead_of_the_ledger_clock_by_the_allowance_only() {
        let l = limits(); // an hour ahead
        let t0 = 1_000 * S as i64;
        let (v, c) = judge(&l, None, 1, &batch(vec![interval(0, 0, 3000, 1, 1)]), t0);
        assert!(v.is_empty(), "a backlog within the allowance: {v:?}");
        let b = batch(vec![interval(1, 3000, 3601, 1, 1)]);
        let (v, c) = judge(&l, Some(c), 2, &b, t0);
        assert_eq!(v.intervals.get(&0), Some(&Implausible::AheadOfClock));
        // Ten minutes later on the ledger's clock there is room.
        let (v, c) = judge(&l, Some(c), 3, &b, t0 + 600 * S as i64);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(c.measured_ns, 3601 * S);
    }

    #[test]
    fn declared_limits_are_checked() {
        let d: Declared =
            toml::from_str("cpus = 0\nmax_watts = { package = 0, \"a b\" = 3 }").expect("parses");
        assert_eq!(d.problems().len(), 3, "{:?}", d.problems());
        assert!(
            toml::from_str::<Declared>("cpu = 4").is_err(),
            "unknown keys are refused"
        );
        let d: Declared =
            toml::from_str("cpus = 64\nmax_watts = { package = 350, total = 900 }").unwrap();
        assert!(d.problems().is_empty());
        let l = NodeLimits::new(&d, 0);
        assert_eq!(l.watts("package"), 350);
        assert_eq!(l.watts("total"), 900);
        assert_eq!(l.watts("gpu"), default_max_watts("gpu"));
    }
}
