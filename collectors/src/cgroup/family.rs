//! Reconciliation through the parent: the CPU time of run cgroups removed before their final
//! read is recovered from their parent's `cpu.stat`.
//!
//! cgroup v2 folds a removed child's CPU time into its parent, so over any stretch of time
//!
//! ```text
//! parent delta = sum of the deltas of the children still there + the parent's own processes
//!              + what the children that went away used and nobody read
//! ```
//!
//! A [`Family`] is one parent directory of tracked runs (never the cgroup root, whose
//! `cpu.stat` is the whole machine). At each *reconcile point* (every tick, and right after a
//! batch of cgroup events in which a child went away unread) the tracker reads the parent, lists
//! its directory, reads every live child it has not seen settle empty, then the parent again,
//! and the residual (from the midpoint of the two parent reads) goes to the children that
//! went away since the previous point (the *claimants*). One claimant gets it all; several share
//! it by [`share_residual`], the stated rule: in proportion to what each one's perf `task-clock`
//! counters counted since its last read (they outlive the cgroup), or, for a claimant without
//! them, the CPU time it is expected to have used since it was last read (that time at its
//! average rate so far; when it has no history, at the family's average run rate). Where the
//! residual is worse than the counters (a point read too slowly, a stretch shared with
//! claimants without counters) or cannot be had, runs with counters take their count instead
//! (see the tracker's `reconcile_family`). Reading the children and then the parent is not
//! atomic, so the residual carries a little noise (CPU time the live children used between their
//! read and the parent's); it cancels between consecutive points, so a negative residual is
//! carried to the next point (bounded) rather than clamped, a positive one with no claimant
//! is the host's (it is what the parent's own processes or timing noise used), and a point read
//! too slowly pays out only what it holds beyond its own error ([`payout`]), so the claimants
//! together are never billed more than the parent used.
//!
//! The rule holds only when the parent holds no processes of its own (cgroup v2's
//! no-internal-process rule, when controllers are enabled below it); when `cgroup.procs` of the
//! parent is not empty at a point with claimants, their tails are recorded as lost, loudly.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::files::Source;
use crate::shares::{largest_remainder, SplitScratch, Ties};

/// How a finished run's last stretch of usage was obtained (the words are in its summary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalUsage {
    /// Its cgroup went away before a complete final read (or before it was known: a ghost),
    /// and the cgroup trace had counted it from its creation: the kernel's own `usage_usec`,
    /// exact (see [`crate::cgroup::trace`]).
    Traced,
    /// Read from the run's own `cpu.stat` after it emptied (twice, so the last task's final
    /// slice is in) or when the control plane declared it finished.
    Read,
    /// Its cgroup went away before a complete final read, and its parent's residual could not
    /// be had or was too noisy to be sharper: what it used since its last read was counted by
    /// its perf `task-clock` counters, which outlive the cgroup (on the raw clock: steal time on
    /// a VM is in, a few milliseconds at worst).
    PerfCounted,
    /// Its cgroup went away before a complete final read; what it used since its last read was
    /// recovered exactly from its parent's `cpu.stat`.
    Reconciled,
    /// As `Reconciled`, but other children went away unread in the same stretch: the recovered
    /// time was shared among them by [`share_residual`].
    ReconciledShared,
    /// Its cgroup went away before a complete final read and its parent could not tell (the
    /// parent is the cgroup root, was removed too, or holds processes of its own): the tail
    /// since its last read is in the host bucket. Counted and logged.
    Lost,
}

impl FinalUsage {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalUsage::Traced => "traced",
            FinalUsage::Read => "read",
            FinalUsage::PerfCounted => "perf_counted",
            FinalUsage::Reconciled => "reconciled",
            FinalUsage::ReconciledShared => "reconciled_shared",
            FinalUsage::Lost => "lost",
        }
    }
}

/// Who a share of the residual goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ClaimantKind {
    /// A tracked run whose cgroup went away unread.
    Run(Arc<str>),
    /// A run whose cgroup was created and removed before the tracker could open it: known only
    /// from its creation event (index into the tracker's ghost list).
    Ghost(usize),
    /// A child that is no run: its share is the host's.
    Other,
}

#[derive(Clone, Debug)]
pub(super) struct Claimant {
    pub kind: ClaimantKind,
    /// CPU microseconds it is expected to have used unobserved: the time from its last read
    /// (or the previous reconcile point, whichever is later) to when its removal was seen,
    /// times its average rate so far (with no history: a run read once, a ghost, an ordinary
    /// child, the family's average run rate; see [`Family::unknown_weight`]).
    pub weight_us: u64,
    /// What its perf counters counted since its last read, when it has them: its weight, and
    /// its tail when the parent cannot tell.
    pub perf_us: Option<u64>,
}

/// A child of the parent that is not a tracked run (another workload, a finished run's
/// lingering cgroup, a name the patterns refuse). Its usage is the host's; it is read at each
/// point only so that it is not mistaken for a vanished run's.
#[derive(Debug)]
pub(super) struct Other {
    pub cpu_stat: PathBuf,
    /// Usage at the last point.
    pub scan_us: u64,
}

#[derive(Debug)]
pub(super) struct Family {
    /// The parent, relative to the cgroup root.
    pub rel: Arc<str>,
    pub cpu_stat: Source,
    /// Its `cgroup.procs`: when it lists a process, the residual is not the children's alone.
    pub procs: Source,
    /// The parent directory, kept open to list the children at every point (rewound, read
    /// into the tracker's buffer); `None` above the descriptor budget: opened each time.
    pub dir: Option<std::fs::File>,
    /// The next point lists the directory even with no inotify event pending (see
    /// `RunTracker::list_family`).
    pub must_list: bool,
    /// Parent usage at the last point.
    pub last_us: u64,
    /// Tracker clock (microseconds) of the last point.
    pub last_point_us: u64,
    /// The inotify watch on the parent directory (shared with a pattern's, when it is one).
    pub wd: Option<i32>,
    pub runs: BTreeSet<Arc<str>>,
    pub others: BTreeMap<OsString, Other>,
    /// Children found gone at a point (and claimed then) whose removal event is still to be
    /// read: that event, and a stale creation event before it, are not new news.
    pub departed: BTreeSet<OsString>,
    /// The live runs' average rate over the last stretch between points, in millionths of a
    /// CPU: the expected rate of a child that went away with no history of its own (never read
    /// twice, a ghost, an ordinary child). One CPU until measured.
    pub rate_ppm: Option<u64>,
    pub claimants: Vec<Claimant>,
    /// Residual carried between points: timing noise to be made up (negative), or CPU time
    /// waiting for the claimant that will say whose it is (positive).
    pub balance: i128,
    /// Tracker clock when the balance was last zero or below: what built up since cannot exceed
    /// the whole machine's time since then.
    pub balance_since_us: u64,
    /// Descriptors it keeps (its `cpu.stat`, `cgroup.procs` and directory, within the budget).
    pub kept_fds: usize,
    /// The parent's cgroup id (its directory's inode) when the cgroup trace watches it: its
    /// children made since are traced from their creation.
    pub trace_parent: Option<u64>,
    /// CPU time of children gone unread whose tails the trace gave exactly, since the last
    /// point: in the parent's growth, and no residual (the next point counts it as the
    /// children's).
    pub traced_gone_us: u64,
    /// The parent's usage read right before the children's at the point in progress ...
    pub pre_us: Option<u64>,
    /// ... and when (tracker clock).
    pub pre_at_us: u64,
}

impl Family {
    /// Nothing for a point to settle: no child known (run or other), no claim waiting, no
    /// traced tail to count, and its listing current (watched, its directory kept, nothing to
    /// list again). A child made since the events were read is found by its creation event at
    /// the next wake-up, as between any two points. Such a family's point only reads the
    /// parent (its growth, with no child known: a child made and gone between two points, or
    /// processes of the parent's own) and notices the parent gone, so it need not come at
    /// every tick (`TrackerConfig::quiet_point_every`).
    pub fn is_quiet(&self) -> bool {
        self.runs.is_empty()
            && self.others.is_empty()
            && self.claimants.is_empty()
            && self.traced_gone_us == 0
            && self.listing_current()
    }

    /// Watched, its directory kept, and nothing asking for a new listing: it needs one only
    /// when an inotify event is pending (why, in `RunTracker::list_family`).
    pub fn listing_current(&self) -> bool {
        self.wd.is_some() && self.dir.is_some() && !self.must_list
    }

    /// A child that is no run went away with CPU time unread: a claimant whose share is the
    /// host's, weighed as a child with no history since the last point.
    pub fn claim_other(&mut self, now_us: u64) {
        let weight_us = self.unknown_weight(now_us.saturating_sub(self.last_point_us));
        self.claimants.push(Claimant {
            kind: ClaimantKind::Other,
            weight_us,
            perf_us: None,
        });
    }

    /// What a child with no history of its own is expected to have used in `unobserved_us`:
    /// that time at the family's average run rate (one CPU until measured).
    pub fn unknown_weight(&self, unobserved_us: u64) -> u64 {
        let rate = u128::from(self.rate_ppm.unwrap_or(1_000_000));
        let w = u64::try_from(u128::from(unobserved_us) * rate / 1_000_000).unwrap_or(u64::MAX);
        weight_floor(w, unobserved_us)
    }
}

/// What a reconcile point pays its claimants out of the family's `balance` (which it reduces by
/// as much). The residual is measured at the midpoint of the point's two parent reads, so it is
/// off by up to half of what the parent gained between them (`bracket_us`); the next point
/// takes that error back. A sharp point (a bracket of at most `sharp_us`) pays the whole
/// positive balance: its error is below a millisecond. A wide one (this thread preempted
/// mid-way, hundreds of children read on a starved host) pays only what the balance holds
/// beyond that error: paid out, an error in the claimants' favour could never be taken back
/// from them when no claimant comes after it (the last runs of a family end, the noise is
/// corrected at the next point into a balance that stays negative), and the runs would be
/// billed more CPU time than their parent used (seen: 2% over on a starved host, once in ten).
/// What is held back stays in the balance: the next point pays it, or it is the host's.
pub fn payout(balance: &mut i128, bracket_us: u64, sharp_us: u64) -> u64 {
    let held = if bracket_us > sharp_us {
        i128::from(bracket_us / 2)
    } else {
        0
    };
    let pay = u64::try_from((*balance - held).max(0)).unwrap_or(u64::MAX);
    *balance -= i128::from(pay);
    pay
}

/// No claimant weighs nothing: a child that went away used at least its own exit (a process's
/// last CPU time), so each is expected to have run at least a thousandth of a CPU while
/// unobserved (and a microsecond), and none is left out of a share (seen on a starved host: a
/// run read idle once, then gone, got 0 us).
pub fn weight_floor(weight_us: u64, unobserved_us: u64) -> u64 {
    weight_us.max(unobserved_us / 1000).max(1)
}

/// Divides `total` microseconds among claimants in proportion to `weights` (the CPU time each
/// is expected to have used unobserved, see [`Claimant`]), exactly ([`largest_remainder`], ties
/// to the earlier claimant). All-zero weights share equally. The parts sum to `total`.
pub fn share_residual(total: u64, weights: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(weights.len());
    if weights.is_empty() {
        return out;
    }
    let ones;
    let weights = if weights.iter().all(|&w| w == 0) {
        ones = vec![1; weights.len()];
        &ones
    } else {
        weights
    };
    largest_remainder(
        total,
        weights,
        |a, b| a.cmp(&b),
        Ties::SmallestKey,
        &mut out,
        &mut SplitScratch::default(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_claimant_weighs_nothing() {
        // Read idle, then gone 2 s later: still a thousandth of a CPU over those 2 s.
        assert_eq!(weight_floor(0, 2_000_000), 2_000);
        // Gone the same microsecond: one microsecond, so it still takes part in a share.
        assert_eq!(weight_floor(0, 0), 1);
        // An estimate above the floor is kept.
        assert_eq!(weight_floor(500_000, 2_000_000), 500_000);
        // With the floor, an idle run shares a residual instead of getting nothing.
        let shares = share_residual(1_000, &[weight_floor(0, 1_000_000), 9_000]);
        assert!(shares[0] > 0, "{shares:?}");
        assert_eq!(shares.iter().sum::<u64>(), 1_000);
    }

    /// A family's life as a sequence of points: at each, what the claimants truly used
    /// unobserved (`tail_us`, 0 when none went away) and the bracket of the point's reads, with
    /// the midpoint's error somewhere inside it (`error_permille` of half the bracket, either
    /// way), taken back at the next point. Returns (paid, truly used).
    fn simulate(points: &[(u64, u64, i64)]) -> (u128, u128) {
        let (mut balance, mut last_error) = (0i128, 0i128);
        let (mut paid, mut used) = (0u128, 0u128);
        for &(tail_us, bracket_us, error_permille) in points {
            let error = i128::from(bracket_us / 2) * i128::from(error_permille) / 1000;
            balance += i128::from(tail_us) + error - last_error;
            last_error = error;
            used += u128::from(tail_us);
            if tail_us > 0 {
                paid += u128::from(payout(&mut balance, bracket_us, 1_000));
            }
        }
        (paid, used)
    }

    #[test]
    fn a_wide_points_error_is_not_paid_out_for_good() {
        // The last claimant's point is wide (the reader was preempted for 400 ms, 2 CPUs busy),
        // its midpoint 300 ms high; nothing goes away after it. Paying the whole balance billed
        // 300 ms the parent never used.
        let points = [
            (5_000, 200, 0),
            (80_000, 800_000, 750),
            (0, 300, 0),
            (0, 200, 0),
        ];
        let (paid, used) = simulate(&points);
        assert!(paid <= used, "paid {paid} us of {used} us used");
        // What was held back at the wide point is paid at the next sharp one with a claimant.
        let later = [(5_000, 200, 0), (80_000, 800_000, 750), (1_000, 300, 0)];
        assert_eq!(simulate(&later), (86_000, 86_000));
        // A sharp point pays all it has (its error is within half a millisecond).
        let mut b = 12_345i128;
        assert_eq!(payout(&mut b, 900, 1_000), 12_345);
        assert_eq!(b, 0);
        let mut owed = -7i128;
        assert_eq!(payout(&mut owed, 100, 1_000), 0);
        assert_eq!(owed, -7);
    }

    proptest::proptest! {
        /// Whatever the points' brackets and errors, the claimants are never paid more than
        /// they used but for the error of the sharp points (half a millisecond each at most).
        #[test]
        fn claimants_are_never_paid_more_than_their_parent_shows(
            points in proptest::collection::vec(
                (0u64..200_000, proptest::prop_oneof![0u64..=1_000, 1_001u64..2_000_000], -1000i64..=1000),
                1..40,
            )
        ) {
            let (paid, used) = simulate(&points);
            let sharp_error: u128 = points
                .iter()
                .filter(|p| p.0 > 0 && p.1 <= 1_000)
                .map(|p| u128::from(p.1 / 2))
                .max()
                .unwrap_or(0);
            proptest::prop_assert!(paid <= used + sharp_error, "paid {} of {}", paid, used);
        }
    }

    #[test]
    fn one_claimant_gets_everything() {
        assert_eq!(share_residual(12_345, &[7]), vec![12_345]);
        assert_eq!(share_residual(12_345, &[0]), vec![12_345]);
    }

    #[test]
    fn shares_follow_unobserved_time_and_sum_exactly() {
        assert_eq!(share_residual(100, &[1, 1, 1]), vec![34, 33, 33]);
        assert_eq!(share_residual(1_000, &[900, 100]), vec![900, 100]);
        assert_eq!(share_residual(7, &[0, 0]), vec![4, 3]);
        for total in [0u64, 1, 2, 999, 1_000_003, u64::MAX / 3] {
            let s = share_residual(total, &[3, 5, 0, 11, u64::MAX / 2]);
            assert_eq!(
                s.iter().map(|&v| u128::from(v)).sum::<u128>(),
                u128::from(total)
            );
        }
        assert!(share_residual(5, &[]).is_empty());
    }
}
