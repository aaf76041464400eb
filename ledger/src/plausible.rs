//! Plausibility, per node: a signature proves which node wrote a batch, not that it is true. An
//! authentic batch whose intervals could not have happened (time that overlaps, runs ahead of
//! the ledger's clock, or energy above what the node's hardware can draw) is still stored and
//! chained (refusing it would stop the node forever: its successors chain to it), but the
//! allocations of its implausible intervals are quarantined with their reason: kept as
//! evidence, never billed, excluded from every total.
//!
//! The rules, judged in seq order inside the store's commit transaction (so two ledger
//! processes on one PostgreSQL judge against the same state):
//! - **Tiling.** Interval indices only increase. On one boot (same `boot_id`) an interval never
//!   starts before the previous one ended. A start after the previous end needs a declared gap
//!   in the interval (the agent records AGENT_DOWN when it restarts) or a declared lost range
//!   between the two batches; an undeclared hole is counted, not quarantined (it can only make
//!   the node bill less).
//! - **Clock.** The node's measured time (the sum of its accepted intervals' monotonic lengths)
//!   never runs ahead of the ledger's own clock since it first stored a batch of the node by
//!   more than `--max-ahead-s` (the backlog a node may bring to its first connection, plus
//!   skew).
//! - **Power.** The energy allocated to runs in one domain of one interval is at most the
//!   domain's declared `max_watts` times the interval's length.
//! - **CPU time.** A run's CPU time in one interval (package, psys, and DRAM under the `cpu`
//!   policy) is at most the node's declared `cpus` times the interval's length plus
//!   [`USAGE_CARRY_US`] (usage recovered late, from a removed cgroup's parent, lands in a later
//!   interval than it was spent in).
//!
//! Limits come from the enrolment file's `[limits]` table; the defaults are far above any real
//! host, so no honest node is quarantined by them, and still bound a forgery to physical values
//! (1 kWh in one interval of 1 ns is 3.6 PW).

use std::collections::BTreeMap;

/// Slack for a run's CPU time in one interval: usage read late (a ghost's claim, a tail
/// reconciled through the parent) is billed in the interval where it was recovered.
pub const USAGE_CARRY_US: u64 = 60_000_000;

/// Default `cpus` when the enrolment declares none: above any single host.
pub const DEFAULT_CPUS: u32 = 8192;

/// Default `max_watts` of one instance (package, GPU) of a domain when the enrolment declares
/// none.
pub fn default_max_watts(domain: &str) -> u32 {
    match domain {
        "package" => 2_000,
        "dram" => 2_000,
        "gpu" => 3_000,
        _ => 20_000,
    }
}

/// What an enrolment declares about a node's hardware (`[limits]` in its enrolment file).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    /// Logical CPUs.
    pub cpus: Option<u32>,
    /// Watts one instance of each domain can draw, by domain name (`package`, `dram`, `psys`,
    /// `gpu`).
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
            if let Some(what) = wattd_proto::names::domain_problem(d) {
                p.push(format!("limits.max_watts: domain {d:?}: {what}"));
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
}

/// Why an interval (or one domain of it) is implausible: the `reason` of a quarantined
/// allocation and of `wattd_ledger_implausible_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Implausible {
    /// Its end is before its start.
    NegativeLength,
    /// Its index is not above the node's previous interval's.
    IndexNotIncreasing,
    /// It starts before the previous interval on the same boot ended.
    Overlap,
    /// The node's measured time would run ahead of the ledger's clock.
    AheadOfClock,
    /// A domain's allocated energy is above max_watts times the length.
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

/// What the judge needs of one domain of one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    /// `domain` or `domain:package`, as the allocation rows name it.
    pub label: String,
    pub domain: String,
    /// The sum of its allocations (active + idle).
    pub allocated_uj: u128,
    /// The largest CPU time of one run, when usage is CPU time in this domain.
    pub max_run_cpu_us: Option<u64>,
}

/// What the judge needs of one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntervalFacts {
    pub index: u64,
    pub boot_id: String,
    pub start_mono_ns: u64,
    pub end_mono_ns: u64,
    /// The interval, or its batch, carries a gap record (a declared hole before it).
    pub declares_gap: bool,
    pub domains: Vec<DomainFacts>,
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
    pub undeclared_holes: u64,
    /// Intervals (or domains of one) judged implausible.
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
    /// By (interval position, domain label): that domain of the interval is.
    pub domains: BTreeMap<(usize, String), Implausible>,
}

impl Verdict {
    /// Why the allocation of `label` in the interval at `pos` is quarantined, if it is.
    pub fn reason(&self, pos: usize, label: &str) -> Option<Implausible> {
        self.intervals.get(&pos).copied().or_else(|| {
            self.domains
                .iter()
                .find(|((p, l), _)| *p == pos && l == label)
                .map(|(_, r)| *r)
        })
    }

    /// Every verdict, for the counters.
    pub fn all(&self) -> impl Iterator<Item = Implausible> + '_ {
        self.intervals
            .values()
            .chain(self.domains.values())
            .copied()
    }

    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty() && self.domains.is_empty()
    }
}

/// Judges batch `seq`'s intervals against the node's clock (`None`: nothing judged yet) at the
/// ledger's time `now_unix_ns`. Returns the verdict and the clock after the batch.
pub fn judge(
    limits: &NodeLimits,
    clock: Option<NodeClock>,
    seq: u64,
    intervals: &[IntervalFacts],
    now_unix_ns: i64,
) -> (Verdict, NodeClock) {
    let fresh = clock.is_none();
    let mut c = clock.unwrap_or_else(|| NodeClock::new(now_unix_ns));
    // A lost range (or the first batch judged) between the two: a hole is declared by it.
    let follows = !fresh && c.last_seq.checked_add(1) == Some(seq);
    let mut v = Verdict::default();
    let since_first = u64::try_from(now_unix_ns.saturating_sub(c.first_seen_unix_ns)).unwrap_or(0);
    let budget = since_first.saturating_add(u64::try_from(limits.max_ahead_ns).unwrap_or(0));
    for (pos, i) in intervals.iter().enumerate() {
        let whole = |v: &mut Verdict, r| {
            v.intervals.insert(pos, r);
        };
        let Some(len) = i.end_mono_ns.checked_sub(i.start_mono_ns) else {
            whole(&mut v, Implausible::NegativeLength);
            continue;
        };
        if c.last_index.is_some_and(|last| i.index <= last) {
            whole(&mut v, Implausible::IndexNotIncreasing);
            continue;
        }
        let same_boot = c.last_index.is_some() && !i.boot_id.is_empty() && i.boot_id == c.last_boot;
        if same_boot && i.start_mono_ns < c.last_end_mono_ns {
            whole(&mut v, Implausible::Overlap);
            continue;
        }
        if c.measured_ns.saturating_add(len) > budget {
            whole(&mut v, Implausible::AheadOfClock);
            continue;
        }
        let declared = i.declares_gap || (pos == 0 && !follows);
        if same_boot && i.start_mono_ns > c.last_end_mono_ns && !declared {
            c.undeclared_holes += 1;
        }
        c.measured_ns = c.measured_ns.saturating_add(len);
        c.last_index = Some(i.index);
        c.last_boot.clone_from(&i.boot_id);
        c.last_end_mono_ns = i.end_mono_ns;
        for d in &i.domains {
            // W x ns / 1000 = uJ.
            let max_uj = u128::from(limits.watts(&d.domain)) * u128::from(len) / 1000;
            let max_cpu_us =
                u64::from(limits.cpus).saturating_mul((len / 1000).saturating_add(USAGE_CARRY_US));
            let r = if d.allocated_uj > max_uj {
                Some(Implausible::AboveMaxWatts)
            } else if d.max_run_cpu_us.is_some_and(|u| u > max_cpu_us) {
                Some(Implausible::AboveCpus)
            } else {
                None
            };
            if let Some(r) = r {
                v.domains.insert((pos, d.label.clone()), r);
            }
        }
    }
    c.last_seq = seq;
    c.implausible = c
        .implausible
        .saturating_add(u64::try_from(v.intervals.len() + v.domains.len()).unwrap_or(u64::MAX));
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
                max_watts: [("package".to_owned(), 200)].into_iter().collect(),
            },
            3600 * S as i64,
        )
    }

    fn interval(index: u64, start_s: u64, end_s: u64, uj: u128, cpu_us: u64) -> IntervalFacts {
        IntervalFacts {
            index,
            boot_id: "b1".into(),
            start_mono_ns: start_s * S,
            end_mono_ns: end_s * S,
            declares_gap: false,
            domains: vec![DomainFacts {
                label: "package:0".into(),
                domain: "package".into(),
                allocated_uj: uj,
                max_run_cpu_us: Some(cpu_us),
            }],
        }
    }

    #[test]
    fn honest_intervals_pass_and_move_the_clock() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (v, c) = judge(
            &l,
            None,
            1,
            &[interval(0, 10, 11, 200_000_000, 4_000_000)],
            now,
        );
        assert!(v.is_empty(), "{v:?}");
        // 200 W for 1 s is 200 J: exactly at the limit. 4 CPUs for 1 s is at the limit too.
        let batch = [
            interval(1, 11, 12, 200_000_000, 4_000_000),
            // Long and coarsened: 100 s at 150 W.
            interval(2, 12, 112, 15_000_000_000, 1_000),
        ];
        let (v, c) = judge(&l, Some(c), 2, &batch, now);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(c.measured_ns, 102 * S);
        assert_eq!(c.last_index, Some(2));
        assert_eq!(c.undeclared_holes, 0);
        assert_eq!(c.implausible, 0);
        // Agent down for 50 s, declared; then a reboot (new boot id, clock from 0).
        let mut after = interval(3, 162, 163, 1, 1);
        after.declares_gap = true;
        let mut rebooted = interval(4, 5, 6, 1, 1);
        rebooted.boot_id = "b2".into();
        let (v, c) = judge(&l, Some(c), 3, &[after, rebooted], now);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(c.undeclared_holes, 0);
        assert_eq!(c.last_end_mono_ns, 6 * S);
        // An undeclared hole is counted, not quarantined; one after a lost range is declared.
        let mut after_b2 = interval(5, 20, 21, 1, 1);
        after_b2.boot_id = "b2".into();
        let (v, c1) = judge(&l, Some(c.clone()), 4, &[after_b2.clone()], now);
        assert!(v.is_empty());
        assert_eq!(c1.undeclared_holes, 1);
        let (v, c2) = judge(&l, Some(c), 9, &[after_b2], now);
        assert!(v.is_empty());
        assert_eq!(
            c2.undeclared_holes, 0,
            "after a lost range the hole is declared"
        );
    }

    #[test]
    fn the_forged_nanosecond_kilowatt_hour_and_overflow_values_are_quarantined() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (_, c) = judge(&l, None, 1, &[interval(0, 10, 11, 1, 1)], now);
        let kwh = 3_600_000_000_000u128;
        let mut forged = interval(1, 11, 11, kwh, 0);
        forged.end_mono_ns += 1;
        let (v, c) = judge(&l, Some(c), 2, &[forged], now);
        assert_eq!(v.reason(0, "package:0"), Some(Implausible::AboveMaxWatts));
        assert_eq!(c.implausible, 1);
        // 2^62 uJ needs 729 years at 200 W; an interval of ten years is ahead of the clock.
        let huge = 1u128 << 62;
        let ten_years = 10 * 365 * 86_400;
        let (v, c) = judge(
            &l,
            Some(c),
            3,
            &[interval(2, 12, 12 + ten_years, huge, 0)],
            now,
        );
        assert_eq!(v.reason(0, "package:0"), Some(Implausible::AheadOfClock));
        // CPU time above 4 CPUs plus the carry.
        let (v, _) = judge(
            &l,
            Some(c),
            4,
            &[interval(3, 12, 13, 1, 4 * 61_000_000 + 1)],
            now,
        );
        assert_eq!(v.reason(0, "package:0"), Some(Implausible::AboveCpus));
        assert_eq!(v.reason(0, "dram:0"), None, "only the implausible domain");
    }

    #[test]
    fn overlapping_and_backwards_intervals_are_quarantined_and_do_not_move_the_clock() {
        let l = limits();
        let now = 10_000 * S as i64;
        let (_, c) = judge(&l, None, 1, &[interval(5, 10, 20, 1, 1)], now);
        let batch = [
            interval(6, 15, 25, 1, 1), // overlaps 10..20
            interval(7, 30, 29, 1, 1), // ends before it starts
            interval(5, 20, 21, 1, 1), // index again
            interval(8, 20, 21, 1, 1), // fine
        ];
        let (v, c) = judge(&l, Some(c), 2, &batch, now);
        assert_eq!(v.intervals.get(&0), Some(&Implausible::Overlap));
        assert_eq!(v.intervals.get(&1), Some(&Implausible::NegativeLength));
        assert_eq!(v.intervals.get(&2), Some(&Implausible::IndexNotIncreasing));
        assert_eq!(v.reason(3, "package:0"), None);
        assert_eq!(c.last_end_mono_ns, 21 * S);
        assert_eq!(c.measured_ns, 11 * S);
        assert_eq!(c.implausible, 3);
    }

    #[test]
    fn measured_time_may_run_ahead_of_the_ledger_clock_by_the_allowance_only() {
        let l = limits(); // an hour ahead
        let t0 = 1_000 * S as i64;
        let (v, c) = judge(&l, None, 1, &[interval(0, 0, 3000, 1, 1)], t0);
        assert!(v.is_empty(), "a backlog within the allowance: {v:?}");
        let (v, c) = judge(&l, Some(c), 2, &[interval(1, 3000, 3601, 1, 1)], t0);
        assert_eq!(v.intervals.get(&0), Some(&Implausible::AheadOfClock));
        // Ten minutes later on the ledger's clock there is room.
        let (v, c) = judge(
            &l,
            Some(c),
            3,
            &[interval(2, 3000, 3601, 1, 1)],
            t0 + 600 * S as i64,
        );
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
        let d: Declared = toml::from_str("cpus = 64\nmax_watts = { package = 350 }").unwrap();
        assert!(d.problems().is_empty());
        let l = NodeLimits::new(&d, 0);
        assert_eq!(l.watts("package"), 350);
        assert_eq!(l.watts("gpu"), default_max_watts("gpu"));
    }
}
