//! The tick: every run's `cpu.stat` (and memory) read, the host's busy time from `/proc/stat`,
//! and each run's usage split across packages exactly.

use super::*;

impl RunTracker {
    /// Measures one tick: every run's usage since the last tick (since birth for a new run),
    /// split per package, and each package's busy and host time. `elapsed_us` is the tick's
    /// length as the daemon's clock saw it, carried into the snapshot.
    pub fn tick(&mut self, elapsed_us: u64) -> UsageSnapshot {
        let skip_read = std::mem::take(&mut self.skip_event_read) && self.events_drained;
        if let Err(e) = self.handle_events(!skip_read) {
            self.push_error(None, e);
        }
        for idx in 0..self.patterns.len() {
            // A parent that appeared since (the first run's slice) is armed and listed now.
            if self.arm_pattern(idx) {
                self.scan_pattern(idx, BilledFrom::Birth);
            }
        }
        if let Some(every) = self.rescan_every_us {
            if self.now_us().saturating_sub(self.last_rescan_us) >= every {
                self.rescan_all();
            }
        }
        let busy_by_pkg_us = self.read_busy(elapsed_us);
        let busy_measured = busy_by_pkg_us.is_some();
        let mut runs_out = Vec::with_capacity(self.runs.len());
        let mut runs_by_pkg: BTreeMap<u32, u64> = BTreeMap::new();
        let fallback_weights = proc_stat_weights(&busy_by_pkg_us, &self.cpus_by_package);
        let mut to_drop = Vec::new();
        let mut pending_errors = Vec::new();
        let mut gone = Vec::new();
        let (mut scale_us, mut scale_ns) = (0u128, 0u128);
        let now = self.now_us();
        // A quiet family's point is taken at the last tick before it would be more than
        // `quiet_every` after the one before (this tick's length standing for the next's), so
        // at any rate the points are at most that far apart: at every tick when the ticks are
        // that far apart or more. (Its last point's time is read later in a tick than `now`,
        // so the plain `now - last >= every` put a 1 s tick's points 2 s apart.)
        let quiet_every = self.quiet_point_every_us;
        let skips_point = |f: &Family| {
            f.is_quiet()
                && now
                    .saturating_sub(f.last_point_us)
                    .saturating_add(elapsed_us)
                    < quiet_every
        };
        for f in self.families.values_mut() {
            if skips_point(f) {
                continue;
            }
            f.pre_us = f.cpu_stat.read_cpu_usage_us().ok();
            f.pre_at_us = now;
        }
        // Reads first, all of them, back to back: the reconcile points below compare them with
        // the parents' reads (before and after), and the closer together, the smaller the noise.
        for run in self.runs.values_mut() {
            let skip = run.settled && run.populated == Some(false) && run.events_wd.is_some();
            if run.finished || skip {
                continue;
            }
            match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                Ok(Some((us, ns))) => {
                    scale_us += u128::from(us);
                    scale_ns += u128::from(ns);
                }
                Ok(None) => {}
                Err(e) => {
                    if e.is_gone() {
                        gone.push(run.id.clone());
                    } else {
                        pending_errors.push((run.id.clone(), e));
                    }
                    continue;
                }
            }
            // Only pattern runs settle: their parent is watched, so their removal is seen.
            // kernfs sends no event on a removed cgroup's own files, so an announced run
            // is read every tick, and ENODEV tells it is gone.
            // Two tick reads after it emptied, not one: the first may fall inside the
            // last task's exit, before its final CPU time is accounted.
            if run.populated == Some(false)
                && run.final_read
                && run.events_wd.is_some()
                && run.pattern.is_some()
            {
                run.empty_tick_reads = run.empty_tick_reads.saturating_add(1);
                run.settled = run.empty_tick_reads >= 2;
            }
        }
        // The runs' usage against their counters: the scale of a counted tail, over the recent
        // past (each tick's sums added to the running ones, which lose an eighth per tick).
        let (us, ns) = self.perf_scale;
        self.perf_scale = (us - us / 8 + scale_us, ns - ns / 8 + scale_ns);
        // Gone at this tick's read: the delta below uses the last good read, the tail is
        // claimed from the parent, and they are reported finished now.
        for id in gone {
            self.mark_gone(&id);
        }
        let failed: HashSet<Arc<str>> = pending_errors.iter().map(|(id, _)| id.clone()).collect();
        let rels: Vec<Arc<str>> = self
            .families
            .values()
            .filter(|f| !skips_point(f))
            .map(|f| f.rel.clone())
            .collect();
        for rel in rels {
            self.reconcile_family(&rel, false, &failed);
        }
        for run in self.runs.values_mut() {
            // A failed read carries no usage this tick; the next good read catches up.
            if failed.contains(&run.id) && !run.finished {
                continue;
            }
            let read_us = if run.latest_us >= run.reported_us {
                run.latest_us - run.reported_us
            } else {
                self.counters.usage_went_backwards += 1;
                run.latest_us
            };
            run.reported_us = run.latest_us;
            let reconciled_us = std::mem::take(&mut run.pending_reconciled_us);
            run.reconciled_total_us += reconciled_us;
            let usage_us = read_us.saturating_add(reconciled_us);
            let (by_pkg, split) = split_run(
                run,
                usage_us,
                &fallback_weights,
                &mut self.split_scratch,
                &mut self.package_split,
            );
            for (pkg, us) in &by_pkg {
                *runs_by_pkg.entry(*pkg).or_default() += us;
            }
            if let Some(p) = &mut run.perf {
                p.mark_reported();
            }
            runs_out.push(RunUsage {
                run_id: run.id.clone(),
                cgroup: run.cgroup_rel.clone(),
                labels: run.labels.clone(),
                origin: run.origin,
                billed_from: run.billed_from,
                usage_us,
                usage_us_by_package: by_pkg,
                split,
                memory_bytes: run.memory_bytes,
                reserved_millicpus: run.reserved_millicpus,
                started: !run.reported,
                finished: run.finished,
                reconciled_us,
                final_usage: if run.finished {
                    Some(run.final_usage.unwrap_or(FinalUsage::Lost))
                } else {
                    None
                },
                reconciled_total_us: run.reconciled_total_us,
            });
            run.reported = true;
            if run.finished {
                to_drop.push(run.id.clone());
            }
        }
        for (id, e) in pending_errors {
            self.push_error(Some(&id), e);
        }
        for g in std::mem::take(&mut self.ghosts) {
            // Its name is no longer excluded from the parent's listing: list it again.
            if let Some(f) = parent_rel(&g.cgroup_rel).and_then(|p| self.families.get_mut(p)) {
                f.must_list = true;
            }
            let by_pkg = split_exact(g.usage_us, &fallback_weights, &mut self.package_split);
            for (pkg, us) in &by_pkg {
                *runs_by_pkg.entry(*pkg).or_default() += us;
            }
            runs_out.push(RunUsage {
                run_id: g.id.clone(),
                cgroup: g.cgroup_rel,
                labels: Arc::new(Labels::new()),
                origin: RunOrigin::Pattern,
                billed_from: BilledFrom::Birth,
                usage_us: g.usage_us,
                usage_us_by_package: by_pkg,
                split: SplitSource::ProcStatShare,
                memory_bytes: None,
                reserved_millicpus: None,
                started: true,
                finished: true,
                reconciled_us: g.usage_us,
                final_usage: Some(g.final_usage.unwrap_or(FinalUsage::Lost)),
                reconciled_total_us: g.usage_us,
            });
            self.remember_finished(g.id);
        }
        for id in to_drop {
            self.drop_run(&id);
        }
        self.forget_idle_families();
        let mut packages = BTreeMap::new();
        for &pkg in self.cpus_by_package.keys() {
            // Signed: tick rounding can make a short interval's idle exceed its elapsed time.
            let busy_signed = busy_by_pkg_us
                .as_ref()
                .and_then(|m| m.get(&pkg).copied())
                .unwrap_or(0);
            let runs_us = runs_by_pkg.get(&pkg).copied().unwrap_or(0);
            if i128::from(runs_us) > busy_signed {
                self.counters.host_clamps += 1;
            }
            packages.insert(
                pkg,
                PackageUsage {
                    busy_signed_us: busy_signed,
                    runs_us,
                },
            );
        }
        self.refresh_trace_counts();
        UsageSnapshot {
            interval_us: elapsed_us,
            busy_measured,
            runs: runs_out,
            packages,
            errors: std::mem::take(&mut self.errors),
            counters: self.counters(),
            perf_disabled: self.perf_split_off.clone(),
            perf_counters_disabled: self.perf_disabled.clone(),
            cgroup_trace_disabled: self.trace_disabled.clone(),
        }
    }

    /// Per-package busy time since the last tick, from /proc/stat.
    /// Busy time is the interval's elapsed time (the caller's monotonic measure, the same one
    /// the energy interval uses) minus each CPU's idle time.
    fn read_busy(&mut self, elapsed_us: u64) -> Option<BTreeMap<u32, i128>> {
        let read = match self.proc_stat.as_mut() {
            Some(f) => f.read_into(&mut self.next_stat),
            None => ProcStatFile::open(&self.root).and_then(|mut f| {
                let s = f.read_into(&mut self.next_stat);
                self.proc_stat = Some(f);
                s
            }),
        };
        if let Err(e) = read {
            self.push_error(None, e);
            self.proc_stat = None;
            // The next good read is a new baseline: measuring from this stale one would
            // count two intervals' idle time against one interval's elapsed time.
            self.last_stat = None;
            return None;
        }
        let Some(last) = self.last_stat.as_mut() else {
            // A first good read (again): the baseline. Its storage is taken; the next read
            // parses into a new map.
            self.last_stat = Some(std::mem::take(&mut self.next_stat));
            return None;
        };
        // This read becomes the last; the one before it, the next read's storage.
        std::mem::swap(last, &mut self.next_stat);
        let (prev, now) = (&self.next_stat, &*last);
        let mut by_pkg: BTreeMap<u32, i128> = BTreeMap::new();
        for (&pkg, cpus) in &self.cpus_by_package {
            let us = crate::procstat::busy_us_signed(prev, now, cpus, self.user_hz, elapsed_us);
            by_pkg.insert(pkg, us);
        }
        Some(by_pkg)
    }
}

/// Reads a run's current usage (and perf counters and memory) into `latest_*`.
/// Returns, when usage moved and the counters were paired before and after, how far each moved
/// (usage microseconds, counter nanoseconds): the scale of a counted tail (`perf_scale`).
pub(super) fn capture(
    run: &mut Run,
    scratch: &mut Vec<u64>,
    now_us: u64,
    read_memory: bool,
) -> Result<Option<(u64, u64)>, HostError> {
    let usage = run.cpu_stat.read_cpu_usage_us()?;
    let mut moved = None;
    // The counters are read right after `cpu.stat` when it moved, so that their `latest_ns` pair
    // with `latest_us` (see `perf_tail`). A failed read unpairs them.
    if usage != run.latest_us {
        let before = paired_tc_ns(run);
        if let Some(p) = &mut run.perf {
            p.read(scratch);
        }
        if let (Some(p0), Some(p1)) = (before, paired_tc_ns(run)) {
            if usage > run.latest_us && p1 > p0 {
                moved = Some((usage - run.latest_us, p1 - p0));
            }
        }
    }
    run.latest_us = usage;
    run.read_at_us = now_us;
    run.memory_bytes = match &run.memory {
        Some(m) if read_memory => Some(m.read_u64()?),
        _ => None,
    };
    Ok(moved)
}

/// A removed run's tail by its perf counters: their count now (the final one: the cgroup is
/// gone) less the count read right after its last `cpu.stat` read, in microseconds (rounded).
/// Close, not exact, in `cpu.stat`'s terms: task-clock runs on the scheduler's raw clock (steal
/// and interrupt time in, which `usage_usec` leaves out: 0.4% more over whole runs on this VM),
/// and `cpu.stat` lags a running task by up to a scheduler tick, which this pair puts in no
/// tail. So it weighs the run's share of its parent's residual, which is exact in sum, and is
/// the amount only where the parent cannot tell. `None`: no counters, unpaired, unreadable.
pub(super) fn perf_tail(run: &mut Run, scratch: &mut Vec<u64>, scale: (u128, u128)) -> Option<u64> {
    let p = run.perf.as_mut()?;
    let paired = p.paired_total()?;
    let counted_ns = p.read_all(scratch).ok()?;
    p.paired = p.take(scratch);
    Some(scale_tail(counted_ns.saturating_sub(paired), scale))
}

/// Counter nanoseconds to `usage_usec` microseconds, rounded: by the runs' measured ratio
/// (`us` per `ns`) once it rests on at least [`PERF_SCALE_MIN_NS`], kept within
/// [[`PERF_SCALE_MIN_PPM`], 1] per 1,000 ns; else 1 us per 1,000 ns.
pub(super) fn scale_tail(tail_ns: u64, (us, ns): (u128, u128)) -> u64 {
    let tail_ns = u128::from(tail_ns);
    let ppm = if ns >= PERF_SCALE_MIN_NS {
        (us * 1_000_000_000 / ns).clamp(PERF_SCALE_MIN_PPM, 1_000_000)
    } else {
        1_000_000
    };
    u64::try_from((tail_ns * ppm / 1_000 + 500_000) / 1_000_000).unwrap_or(u64::MAX)
}

/// The sum of the run's counters as last read with its `cpu.stat`; `None` when unpaired.
fn paired_tc_ns(run: &Run) -> Option<u64> {
    run.perf.as_ref()?.paired_total()
}

/// Package weights from /proc/stat busy time; with none measured (first tick, idle host), each
/// package weighs its CPU count so the split is still exact and deterministic (the tracker's
/// map of CPUs by package, built once: not the topology's, rebuilt at every idle tick).
fn proc_stat_weights(
    busy: &Option<BTreeMap<u32, i128>>,
    cpus_by_package: &BTreeMap<u32, Vec<u32>>,
) -> Vec<(u32, u64)> {
    if let Some(b) = busy {
        if b.values().any(|&v| v > 0) {
            return b
                .iter()
                .map(|(&p, &v)| (p, u64::try_from(v.max(0)).unwrap_or(u64::MAX)))
                .collect();
        }
    }
    cpus_by_package
        .iter()
        .map(|(&p, cpus)| (p, cpus.len() as u64))
        .collect()
}

fn split_run(
    run: &Run,
    usage_us: u64,
    fallback: &[(u32, u64)],
    w: &mut Vec<(u32, u64)>,
    scratch: &mut PackageSplitScratch,
) -> (PackageShares, SplitSource) {
    if let Some(p) = run.perf.as_ref().filter(|p| p.split && p.paired) {
        // The counters' movement per package (in `w`, by package id), since the last tick or
        // over the run's whole life.
        let by_pkg = |w: &mut Vec<(u32, u64)>, whole_life: bool| {
            w.clear();
            for s in p.slots.iter() {
                let since = if whole_life { 0 } else { s.reported_ns };
                let v = s.latest_ns.saturating_sub(since);
                match w.iter_mut().find(|e| e.0 == s.pkg) {
                    Some(e) => e.1 = e.1.saturating_add(v),
                    None => w.push((s.pkg, v)),
                }
            }
            w.sort_unstable_by_key(|e| e.0);
        };
        by_pkg(w, false);
        // Usage with no counter movement of its own this tick (a tail recovered from the
        // parent) is split as the run's whole life was.
        if !w.iter().any(|&(_, v)| v > 0) {
            by_pkg(w, true);
        }
        if w.iter().any(|&(_, v)| v > 0) {
            return (
                split_exact(usage_us, w, scratch),
                SplitSource::PerfTaskClock,
            );
        }
    }
    (
        split_exact(usage_us, fallback, scratch),
        SplitSource::ProcStatShare,
    )
}

/// Buffers of [`split_exact`], kept by the tracker across runs and ticks.
#[derive(Debug, Default)]
pub struct PackageSplitScratch {
    weights: Vec<u64>,
    shares: Vec<u64>,
    split: SplitScratch,
}

/// Divides `total` in proportion to `weights` exactly ([`largest_remainder`], ties to the lower
/// package id, then the earlier weight), so per-package parts always sum to the run's usage;
/// with no weight at all, the first package (package 0 when there is none) gets it all.
pub fn split_exact(
    total: u64,
    weights: &[(u32, u64)],
    scratch: &mut PackageSplitScratch,
) -> PackageShares {
    if weights.iter().all(|&(_, w)| w == 0) {
        let p = weights.first().map_or(0, |&(p, _)| p);
        return PackageShares::from_pairs(vec![(p, total)]);
    }
    let PackageSplitScratch {
        weights: bare,
        shares,
        split,
    } = scratch;
    bare.clear();
    bare.extend(weights.iter().map(|&(_, w)| w));
    largest_remainder(
        total,
        bare,
        |a, b| (weights[a].0, a).cmp(&(weights[b].0, b)),
        Ties::SmallestKey,
        shares,
        split,
    );
    // In the weights' order; `from_pairs` sorts them by package.
    PackageShares::from_pairs(
        weights
            .iter()
            .map(|&(p, _)| p)
            .zip(shares.iter().copied())
            .collect(),
    )
}
