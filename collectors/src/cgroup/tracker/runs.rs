//! The run lifecycle: opening a run's cgroup (kept descriptors, perf counters, the billing
//! start), control-plane announcements, and a run's end (read, claimed from its parent, or lost).

use super::reconcile::take_traced_gone_child;
use super::usage::{capture, perf_tail};
use super::*;

impl RunTracker {
    /// The run's cgroup is gone. Its usage is complete when it was seen settle empty; else its
    /// tail since the last read is claimed from its parent at the next reconcile point, or lost
    /// (counted, logged) when it has no family.
    pub(super) fn mark_gone(&mut self, id: &str) {
        let now = self.now_us();
        // What the trace counted from its creation, when it was traced (its parent watched
        // before it was made): the kernel's own final `usage_usec`.
        let traced = self
            .runs
            .get(id)
            .and_then(|r| r.dir_ino)
            .and_then(|ino| self.traced_us(ino));
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.finished {
            return;
        }
        if !run.final_read {
            self.counters.vanished_before_final_read += 1;
        }
        run.finished = true;
        if run.settled {
            run.final_usage = Some(FinalUsage::Read);
            self.counters.final_read += 1;
            if traced.is_some_and(|t| t != run.latest_us) {
                self.counters.trace_mismatches += 1;
                tracing::debug!(
                    run = %Shown::new(id),
                    read_us = run.latest_us,
                    traced_us = ?traced,
                    "the cgroup trace's count differs from the run's final cpu.stat read"
                );
            }
            return;
        }
        if let Some(t) = traced {
            // Its tail is in the parent's growth; the next point counts it as the run's, like
            // a read (`latest_us` past `scan_us`). A count below the last read (the trace
            // missed a slice) adds nothing: what it missed stays in the parent's residual.
            if t < run.latest_us {
                self.counters.trace_mismatches += 1;
                tracing::debug!(
                    run = %Shown::new(id),
                    read_us = run.latest_us,
                    traced_us = t,
                    "the cgroup trace counted less than the run's last read"
                );
            }
            run.latest_us = run.latest_us.max(t);
            run.final_usage = Some(FinalUsage::Traced);
            self.counters.final_traced += 1;
            return;
        }
        if self.trace.is_some() {
            tracing::debug!(
                run = %Shown::new(id),
                dir_ino = ?run.dir_ino,
                "run gone before its final read, and not traced (made before its parent was \
                 watched, a cgroup inside it, or its name held by an earlier one)"
            );
        }
        // Its perf counters outlive the cgroup (its kept cpu.stat fails with ENODEV now; one
        // opened by path could be a new cgroup of the same name): what they counted since its
        // last read weighs its claim, and is its tail if the parent cannot tell.
        let perf_us = perf_tail(run, &mut self.tc_scratch, self.perf_scale);
        if perf_us.is_none() {
            let _ = capture(run, &mut self.tc_scratch, now, self.read_memory);
        }
        let family = run.family.as_ref().and_then(|f| self.families.get_mut(f));
        match family {
            Some(f) => {
                // What it is expected to have used unobserved: the time since its last read (or
                // the last point) at its average rate so far; the family's when it has no history.
                let unobserved = now.saturating_sub(run.read_at_us.max(f.last_point_us));
                let span = run.read_at_us.saturating_sub(run.first_read.0);
                let used = run.latest_us.saturating_sub(run.first_read.1);
                let weight_us = if let Some(t) = perf_us {
                    t
                } else if span >= 10_000 {
                    let w = u128::from(unobserved) * u128::from(used) / u128::from(span);
                    crate::cgroup::family::weight_floor(
                        u64::try_from(w).unwrap_or(u64::MAX),
                        unobserved,
                    )
                } else {
                    f.unknown_weight(unobserved)
                };
                f.claimants.push(Claimant {
                    kind: ClaimantKind::Run(run.id.clone()),
                    weight_us,
                    perf_us,
                });
            }
            None if run.final_read => {
                // Read after it emptied; what the counters add is the exiting task's last slice.
                run.latest_us = run.latest_us.saturating_add(perf_us.unwrap_or(0));
                run.final_usage = Some(FinalUsage::Read);
                self.counters.final_read += 1;
            }
            None if perf_us.is_some() => {
                // The parent is the cgroup root: its counters are all there is.
                run.latest_us = run.latest_us.saturating_add(perf_us.unwrap_or(0));
                run.final_usage = Some(FinalUsage::PerfCounted);
                self.counters.final_perf_counted += 1;
            }
            None => {
                run.final_usage = Some(FinalUsage::Lost);
                self.counters.final_lost += 1;
                tracing::warn!(
                    run = %Shown::new(id),
                    cgroup = %Shown::new(&run.cgroup_rel),
                    "run cgroup removed before its final read, and its parent cannot be \
                     reconciled (the cgroup root): its CPU time since the last read is the host's"
                );
            }
        }
    }

    fn check_path_free(&self, id: &str, rel: &str) -> Result<(), HostError> {
        let conflict = |other: &str, how: &str| HostError::RunConflict {
            run_id: Shown::new(id),
            what: format!("cgroup {} {how} run {}", Shown::new(rel), Shown::new(other)),
        };
        if let Some(other) = self.paths.get(rel) {
            return Err(conflict(other, "is already tracked as"));
        }
        // An ancestor or descendant tracked as another run would count the same CPU twice.
        let mut cut = rel;
        while let Some((parent, _)) = cut.rsplit_once('/') {
            if let Some(other) = self.paths.get(parent) {
                return Err(conflict(other, "is nested in the cgroup of"));
            }
            cut = parent;
        }
        let prefix = format!("{rel}/");
        if let Some((p, other)) = self
            .paths
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .next()
        {
            if p.starts_with(&prefix) {
                return Err(conflict(other, "contains the cgroup of"));
            }
        }
        Ok(())
    }

    pub(super) fn add_run(
        &mut self,
        id: &str,
        rel: &str,
        labels: Arc<Labels>,
        origin: RunOrigin,
        billed_from: BilledFrom,
        pattern: Option<usize>,
    ) -> Result<(), HostError> {
        validate_run_id(id)?;
        validate_cgroup_rel(rel)?;
        self.check_path_free(id, rel)?;
        let dir = self.cgroup_root.join(rel);
        let len = dir.as_os_str().len();
        if len > PATH_MAX_BYTES {
            return Err(HostError::PathTooLong {
                path: dir,
                len,
                limit: PATH_MAX_BYTES,
            });
        }
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| HostError::io(&dir, e, HINT_GENERIC))?;
        if !meta.is_dir() {
            return Err(HostError::malformed(&dir, "not a cgroup directory"));
        }
        // Watch before the first read: a process that exits after the read then produces an
        // event, and one that exited before it is in the read.
        let events_wd = match self
            .inotify
            .add_watch(&dir.join("cgroup.events"), libc::IN_MODIFY)
        {
            Ok(wd) => Some(wd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Not a cgroup2 directory (or already removed): checked by cpu.stat below.
                None
            }
            Err(_) => {
                self.counters.watch_fallbacks += 1;
                None
            }
        };
        let result = self.open_run(
            id,
            rel,
            &dir,
            labels,
            origin,
            billed_from,
            pattern,
            events_wd,
        );
        if result.is_err() {
            if let Some(wd) = events_wd {
                self.inotify.rm_watch(wd);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn open_run(
        &mut self,
        id: &str,
        rel: &str,
        dir: &Path,
        labels: Arc<Labels>,
        origin: RunOrigin,
        billed_from: BilledFrom,
        pattern: Option<usize>,
        events_wd: Option<i32>,
    ) -> Result<(), HostError> {
        let mut kept = 0usize;
        let keep_cpu = self.kept_fds < self.fd_budget;
        // The directory's inode (its cgroup id, the trace's key) before its files are opened: a
        // cgroup removed while it is being opened still has the id of the files that were read.
        let ino_of = |dir: &Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        let ino_before = ino_of(dir);
        let cgroup_rel: Arc<str> = Arc::from(rel);
        let cpu_stat = Source::open(
            CgroupFile::new(&self.cgroup_root, &cgroup_rel, "cpu.stat"),
            keep_cpu,
        )?;
        if cpu_stat.is_kept() {
            kept += 1;
        } else {
            self.counters.fd_fallback_runs += 1;
        }
        // The counters first, then the first read, then the counters' first read: what the run
        // used while they were opening is in both reads, so they pair (see `perf_tail`).
        let perf = self.open_perf(dir, kept);
        if let Some(p) = &perf {
            kept += p.slots.len();
        }
        let latest_us = cpu_stat.read_cpu_usage_us()?;
        // `memory.current` only when the policy weighs by it: else neither a descriptor nor a
        // path per run (`set_read_memory` opens or closes them at a reload).
        let memory = if self.read_memory {
            open_memory(
                &self.cgroup_root,
                &cgroup_rel,
                self.kept_fds + kept < self.fd_budget,
            )?
        } else {
            None
        };
        if memory.as_ref().is_some_and(Source::is_kept) {
            kept += 1;
        }
        let memory_bytes = memory.as_ref().map(Source::read_u64).transpose()?;
        let reserved_millicpus = match read_reserved_millicpus(dir) {
            Ok(r) => r,
            Err(e) if e.is_gone() => return Err(e),
            Err(e) => {
                self.push_error(Some(id), e);
                None
            }
        };
        let dir_ino = match (ino_before, ino_of(dir)) {
            // Removed and made again while it was opened: which one was read is not known.
            (Some(a), Some(b)) if a != b => {
                return Err(HostError::NotFound {
                    path: dir.to_owned(),
                })
            }
            (Some(a), _) => Some(a),
            (None, b) => b,
        };
        let id: Arc<str> = Arc::from(id);
        let mut run = Run {
            id: id.clone(),
            cgroup_rel: cgroup_rel.clone(),
            labels,
            origin,
            billed_from,
            pattern,
            cpu_stat,
            memory: memory.map(Box::new),
            perf,
            events_wd,
            reserved_millicpus,
            reported_us: match billed_from {
                BilledFrom::Birth => 0,
                BilledFrom::Discovery => latest_us,
            },
            latest_us,
            memory_bytes,
            reported: false,
            finished: false,
            final_read: false,
            populated: None,
            settled: false,
            empty_tick_reads: 0,
            kept_fds: kept,
            family: None,
            scan_us: 0,
            dir_ino,
            read_at_us: 0,
            first_read: (0, 0),
            pending_reconciled_us: 0,
            reconciled_total_us: 0,
            final_usage: None,
        };
        if let Some(p) = &mut run.perf {
            // A failed read leaves them unpaired with `latest_us`: no tail from these counters
            // (see `perf_tail`). Counters start at 0 when opened (`reported_ns`); what ran
            // before is split by /proc/stat share.
            p.read(&mut self.tc_scratch);
        }
        if let Some(wd) = events_wd {
            self.watches.insert(wd, WatchTarget::RunEvents(id.clone()));
            // It may have emptied before the watch was set: then the read above is final.
            run.populated = read_populated(&dir.join("cgroup.events")).ok();
            if run.populated == Some(false) {
                run.final_read = true;
            }
        }
        run.read_at_us = self.now_us();
        run.first_read = (run.read_at_us, latest_us);
        // Counted once the run is kept (as its descriptors are), given back in `drop_run`.
        self.kept_fds += kept;
        self.perf_open += run.perf.as_ref().map_or(0, |p| p.slots.len());
        self.join_family(&mut run, billed_from);
        self.paths.insert(cgroup_rel, id.clone());
        self.runs.insert(id, Box::new(run));
        Ok(())
    }

    /// The run's perf counters, on every CPU of [`Self::perf_cpus`], and the package of each
    /// when they split the run across packages (empty when they do not).
    fn open_perf(&mut self, dir: &Path, kept_so_far: usize) -> Option<RunPerf> {
        let n = self.perf_cpus.len();
        let over_max = self.perf_open + n > self.perf_max;
        if self.perf_disabled.is_some()
            || self.kept_fds + kept_so_far + n > self.fd_budget
            || over_max
        {
            if over_max && self.perf_disabled.is_none() && !self.perf_max_reached {
                self.perf_max_reached = true;
                tracing::warn!(
                    open = self.perf_open,
                    max = self.perf_max,
                    per_run = n,
                    "runs.perf_counters_max reached: a run found while the open counters \
                     leave no room has none, for its whole life \
                     (wattd_tracker_perf_uncounted_runs_total)"
                );
            }
            self.counters.perf_fallback_runs += 1;
            self.counters.perf_uncounted_runs += 1;
            return None;
        }
        match TaskClock::open_each(dir, &self.perf_cpus) {
            Ok(p) => {
                if self.perf_split_off.is_some() {
                    self.counters.perf_fallback_runs += 1;
                    return Some(RunPerf::new(p, &[]));
                }
                let pkgs: Vec<u32> = self
                    .perf_cpus
                    .iter()
                    .map(|&c| self.topology.package_of(c).unwrap_or(0))
                    .collect();
                Some(RunPerf::new(p, &pkgs))
            }
            Err(e) => {
                self.counters.perf_fallback_runs += 1;
                self.counters.perf_uncounted_runs += 1;
                // Permission or kernel support is the same for every run: stop trying. (ENOENT
                // and ENODEV are this cgroup gone already, as runs removed at once often are.)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EACCES | libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL
                    )
                ) {
                    let why = format!("perf cgroup task-clock: {e} ({HINT_PERF})");
                    tracing::warn!(
                        reason = %why,
                        "no perf counters for runs: the per-package split falls back to \
                         /proc/stat, and the tail of a run removed before its final read is \
                         recovered from its parent"
                    );
                    self.perf_split_off = Some(why.clone());
                    self.perf_disabled = Some(why);
                }
                None
            }
        }
    }

    /// Where a run found now starts being billed. From its birth only if its cgroup was created
    /// after this tracker started and recently (within [`BIRTH_WINDOW`]): a cgroup that is
    /// older was either measured by a previous agent instance (its past is in that agent's
    /// records or in the agent-down gap) or already counted in the host bucket while no run
    /// claimed it (a run whose finish was forgotten, found again by a rescan); billing its past
    /// again would count it twice. Creation time is the oldest ctime of the directory and its
    /// `cpu.stat`: the directory's own ctime moves when children are created or it is chowned
    /// for delegation, the kernel-created `cpu.stat` keeps its creation time.
    pub(super) fn billing_start(&self, dir: &std::path::Path, wanted: BilledFrom) -> BilledFrom {
        fn ctime(p: &std::path::Path) -> Option<std::time::SystemTime> {
            use std::os::unix::fs::MetadataExt as _;
            let m = std::fs::metadata(p).ok()?;
            let secs = u64::try_from(m.ctime()).ok()?;
            Some(
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(secs, m.ctime_nsec().clamp(0, 999_999_999) as u32),
            )
        }
        if wanted == BilledFrom::Discovery {
            return wanted;
        }
        let created = match (ctime(dir), ctime(&dir.join("cpu.stat"))) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let recent = std::time::SystemTime::now()
            .checked_sub(BIRTH_WINDOW)
            .unwrap_or(std::time::UNIX_EPOCH);
        // kernfs stamps inodes with the coarse clock, up to a jiffy behind the real one.
        let started = self
            .started_at
            .checked_sub(CTIME_SLACK)
            .unwrap_or(std::time::UNIX_EPOCH);
        match created {
            Some(t) if t >= started && t >= recent => BilledFrom::Birth,
            // Unknown creation time: the safe side is never to bill a past twice.
            _ => BilledFrom::Discovery,
        }
    }

    /// The control plane announces a run. Idempotent: the same id on the same cgroup is
    /// `AlreadyTracked` (labels are adopted if the run had none, e.g. found by pattern first);
    /// the same id elsewhere, different labels, or a cgroup nested in another run's is an
    /// error. Billed from the cgroup's birth.
    pub fn run_started(
        &mut self,
        run_id: &str,
        cgroup_rel: &str,
        labels: Labels,
    ) -> Result<StartOutcome, HostError> {
        validate_run_id(run_id)?;
        validate_cgroup_rel(cgroup_rel)?;
        validate_labels(&labels)?;
        if let Some(run) = self.runs.get_mut(run_id) {
            if &*run.cgroup_rel != cgroup_rel {
                return Err(HostError::RunConflict {
                    run_id: Shown::new(run_id),
                    what: format!("already tracked at cgroup {}", Shown::new(&run.cgroup_rel)),
                });
            }
            if run.labels.is_empty() {
                run.labels = Arc::new(labels);
            } else if *run.labels != labels && !labels.is_empty() {
                return Err(HostError::RunConflict {
                    run_id: Shown::new(run_id),
                    what: "already tracked with different labels".to_owned(),
                });
            }
            return Ok(StartOutcome::AlreadyTracked);
        }
        if self.recently_finished_set.contains(run_id) {
            return Err(HostError::RunConflict {
                run_id: Shown::new(run_id),
                what: "already finished".to_owned(),
            });
        }
        // A cgroup created before this tracker started may have been billed by a previous agent
        // instance (the control plane re-announces runs after a restart); its usage before now
        // belongs to the recorded agent-down gap, never to this run twice.
        let billed_from = self.billing_start(&self.cgroup_root.join(cgroup_rel), BilledFrom::Birth);
        self.add_run(
            run_id,
            cgroup_rel,
            Arc::new(labels),
            RunOrigin::ControlPlane,
            billed_from,
            None,
        )?;
        Ok(StartOutcome::Started)
    }

    /// The control plane says a run is over: its final usage is read now, before the cgroup
    /// can be removed; the next tick reports it once more and drops it. A repeated finish is
    /// fine; an unknown run is [`HostError::UnknownRun`].
    pub fn run_finished(&mut self, run_id: &str) -> Result<(), HostError> {
        let now = self.now_us();
        if let Some(run) = self.runs.get_mut(run_id) {
            if run.finished {
                return Ok(());
            }
            match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                Ok(_) => {
                    run.final_read = true;
                    run.finished = true;
                    run.final_usage = Some(FinalUsage::Read);
                    self.counters.final_read += 1;
                }
                // Already removed: its tail is claimed from the parent like any other.
                Err(e) if e.is_gone() => self.mark_gone(run_id),
                Err(e) => {
                    if !run.final_read {
                        self.counters.vanished_before_final_read += 1;
                    }
                    run.finished = true;
                    if run.final_read {
                        run.final_usage = Some(FinalUsage::Read);
                        self.counters.final_read += 1;
                    } else {
                        run.final_usage = Some(FinalUsage::Lost);
                        self.counters.final_lost += 1;
                    }
                    self.push_error(Some(run_id), e);
                }
            }
            return Ok(());
        }
        if self.recently_finished_set.contains(run_id) {
            return Ok(());
        }
        Err(HostError::UnknownRun {
            run_id: Shown::new(run_id),
        })
    }

    pub(super) fn drop_run(&mut self, id: &str) {
        let Some(run) = self.runs.remove(id) else {
            return;
        };
        if let Some(wd) = run.events_wd {
            self.watches.remove(&wd);
            self.inotify.rm_watch(wd);
        }
        self.paths.remove(&*run.cgroup_rel);
        self.kept_fds = self.kept_fds.saturating_sub(run.kept_fds);
        if let Some(p) = &run.perf {
            self.perf_open = self.perf_open.saturating_sub(p.slots.len());
        }
        let dir = self.cgroup_root.join(&*run.cgroup_rel);
        // Read once: what it is now decides both whether it stays as an ordinary child and
        // whether the run's trace entry is still of use.
        let now_ino = std::fs::metadata(&dir)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.ino()
            });
        if let Some(f) = run.family.as_ref().and_then(|f| self.families.get_mut(f)) {
            f.runs.remove(&run.id);
            // Its name is no longer a run's: the next point lists the parent again.
            f.must_list = true;
            // Finished but still there (the control plane said so first): from now on an
            // ordinary child whose CPU time is the host's, read at each point like the others,
            // from where the run's reads left it. A directory made again under the same name
            // (another inode) is a new child: all of its CPU time is its own.
            if let (Some(name), Some(ino)) = (dir.file_name(), now_ino) {
                let same = run.dir_ino == Some(ino);
                // Listed already as a new child (made again): its baseline stays.
                f.others.entry(name.to_owned()).or_insert(Other {
                    cpu_stat: dir.join("cpu.stat"),
                    scan_us: if same { run.scan_us } else { 0 },
                });
            }
        }
        // Gone (or made again as another cgroup): its trace entry is of no more use.
        if let Some(ino) = run.dir_ino {
            if now_ino != Some(ino) {
                let parent = run
                    .family
                    .as_ref()
                    .and_then(|f| self.families.get(f))
                    .and_then(|f| f.trace_parent);
                if let Some(name) = dir.file_name() {
                    self.forget_traced(ino, parent, name);
                }
            }
        }
        self.remember_finished(run.id);
    }

    pub(super) fn remember_finished(&mut self, id: Arc<str>) {
        if self.recently_finished.len() >= RECENTLY_FINISHED_MAX {
            if let Some(old) = self.recently_finished.pop_front() {
                self.recently_finished_set.remove(&old);
            }
        }
        self.recently_finished.push_back(id.clone());
        self.recently_finished_set.insert(id);
    }

    /// A run cgroup seen created but gone before it could be opened. Billed from its parent
    /// when the parent has a family; else recorded with no usage, as lost.
    pub(super) fn add_ghost(&mut self, id: &str, rel: &str) {
        if self.ghosts.iter().any(|g| &*g.id == id) {
            return;
        }
        let Some(parent) = parent_rel(rel) else {
            return;
        };
        let now = self.now_us();
        let idx = self.ghosts.len();
        let mut ghost = Ghost {
            id: Arc::from(id),
            cgroup_rel: Arc::from(rel),
            usage_us: 0,
            final_usage: None,
        };
        self.counters.ghost_runs += 1;
        match self.families.get_mut(parent) {
            Some(f) => {
                // A child listed earlier as an ordinary one hands its claim over, and what it
                // used up to that listing's last read (counted then as a child's, so in no
                // residual) is its own.
                let name = Path::new(rel).file_name();
                if let Some(o) = name.and_then(|n| f.others.remove(n)) {
                    ghost.usage_us = o.scan_us;
                }
                let listed_us = ghost.usage_us;
                let traced = name.and_then(|n| {
                    take_traced_gone_child(self.trace.as_ref(), &self.cgroup_root, f, n, listed_us)
                });
                match traced {
                    // Traced from its creation: all of it.
                    Some(us) => {
                        if us < listed_us {
                            self.counters.trace_mismatches += 1;
                        }
                        ghost.usage_us = listed_us.max(us);
                        ghost.final_usage = Some(FinalUsage::Traced);
                        self.counters.final_traced += 1;
                    }
                    None => f.claimants.push(Claimant {
                        kind: ClaimantKind::Ghost(idx),
                        weight_us: f.unknown_weight(now.saturating_sub(f.last_point_us)),
                        perf_us: None,
                    }),
                }
            }
            None => {
                ghost.final_usage = Some(FinalUsage::Lost);
                self.counters.final_lost += 1;
                tracing::warn!(
                    run = %Shown::new(id),
                    "run cgroup created and removed between two reads, under a parent that \
                     cannot be reconciled: recorded with no usage"
                );
            }
        }
        self.ghosts.push(ghost);
    }
}

/// Whether runs get perf counters, and on which CPUs. The counters count on the running
/// kernel's CPUs, in the real cgroup hierarchy, so they need a cgroup root that is a cgroup2
/// mount (a simulated host's tree may link to the real one) and, off the live host, the
/// kernel's own CPU list rather than the simulated topology's.
pub(super) fn perf_counters_plan(
    enabled: bool,
    root: &HostRoot,
    cgroup_root: &Path,
    topology: &Topology,
) -> (Option<String>, Vec<u32>) {
    if !enabled {
        return (Some("disabled by configuration".to_owned()), Vec::new());
    }
    if let Some(why) = not_cgroup2(cgroup_root) {
        return (Some(why), Vec::new());
    }
    if root.is_live() {
        return (None, topology.cpus.iter().map(|c| c.id).collect());
    }
    match Topology::read(&HostRoot::live()) {
        Ok(t) => (None, t.cpus.iter().map(|c| c.id).collect()),
        Err(e) => (Some(format!("the running kernel's CPUs: {e}")), Vec::new()),
    }
}

/// The cgroup trace, when it is wanted and can be had; else why not. Its ids are the running
/// kernel's, so the cgroup root must be in the running kernel's cgroup2 hierarchy.
pub(super) fn cgroup_trace_plan(
    enabled: bool,
    cgroup_root: &Path,
) -> (Option<CgroupTrace>, Option<String>) {
    if !enabled {
        return (None, Some("disabled by configuration".to_owned()));
    }
    if let Some(why) = not_cgroup2(cgroup_root) {
        return (None, Some(why));
    }
    match CgroupTrace::load() {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

/// Why `cgroup_root` is not the running kernel's cgroup2 hierarchy (which perf counters and the
/// trace count in), if it is not or that cannot be told.
fn not_cgroup2(cgroup_root: &Path) -> Option<String> {
    let shown = || Shown::new(&cgroup_root.display().to_string());
    match is_cgroup2(cgroup_root) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{} is not in the running kernel's cgroup2 hierarchy",
            shown()
        )),
        Err(e) => Some(format!(
            "{}: is it in the running kernel's cgroup2 hierarchy? {}",
            shown(),
            Shown::new(&e)
        )),
    }
}

/// Whether `dir` is in the running kernel's cgroup2 hierarchy: on the same device as the
/// cgroup2 mount of this process's own mountinfo (a simulated host's tree may link to it; a
/// fixture tree of plain files is elsewhere).
fn is_cgroup2(dir: &Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt as _;
    let live = find_cgroup2_mount(&HostRoot::live()).map_err(|e| e.to_string())?;
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    Ok(dev(&live.mount_point)? == dev(dir)?)
}

/// A run's `memory.current`, kept open when `keep`; `None` where the memory controller is not
/// enabled for it.
pub(super) fn open_memory(
    root: &Arc<Path>,
    rel: &Arc<str>,
    keep: bool,
) -> Result<Option<Source>, HostError> {
    match Source::open(CgroupFile::new(root, rel, "memory.current"), keep) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}
