//! Discovery: the inotify events on pattern parents and runs' `cgroup.events`, pattern scans,
//! and the final read a run gets the moment it empties.

use super::usage::capture;
use super::*;

impl RunTracker {
    /// Waits up to `timeout` for cgroup events and handles them; true if any came.
    pub fn wait_events(&mut self, timeout: Duration) -> Result<bool, HostError> {
        let ready = self.inotify.wait(timeout).map_err(inotify_err)?;
        if ready {
            self.poll_events()?;
        }
        Ok(ready)
    }

    /// Handles every pending cgroup event without blocking: new runs are opened, emptied runs
    /// get their final read at once, removed runs are marked finished.
    pub fn poll_events(&mut self) -> Result<(), HostError> {
        self.handle_events(true)
    }

    /// [`Self::poll_events`], the queue read only when `read`.
    pub(super) fn handle_events(&mut self, read: bool) -> Result<(), HostError> {
        let mut res = Ok(());
        if read {
            // A caller's word that nothing was readable is older than this read: not kept.
            self.skip_event_read = false;
            let mut events = std::mem::take(&mut self.events);
            events.clear();
            res = self.inotify.read_events(&mut events).map_err(inotify_err);
            self.events_drained = res.is_ok();
            if !events.is_empty() {
                self.trace_counts_at_us = None;
            }
            for ev in &events {
                self.handle_event(ev);
            }
            self.events = events;
        }
        self.reread_emptied();
        // A child went away unread: settle its tail against the parent now, while the stretch
        // is short and few others can have ended in it.
        let claimed: Vec<Arc<str>> = self
            .families
            .values()
            .filter(|f| !f.claimants.is_empty())
            .map(|f| f.rel.clone())
            .collect();
        for rel in claimed {
            self.reconcile_family(&rel, true, &HashSet::new());
        }
        res
    }

    /// Re-reads runs that emptied but still exist. The read at the `populated 0` event races
    /// the last task's exit: the kernel drops it from the cgroup before it is descheduled for
    /// the last time, so up to a scheduler tick of its CPU time may not be in `cpu.stat` yet.
    /// Every later chance to read, while the cgroup is still there, closes that gap.
    fn reread_emptied(&mut self) {
        let mut gone = Vec::new();
        let now = self.now_us();
        for run in self.runs.values_mut() {
            if run.final_read && !run.finished && !run.settled {
                if let Err(e) = capture(run, &mut self.tc_scratch, now, self.read_memory) {
                    if e.is_gone() {
                        gone.push(run.id.clone());
                    }
                }
            }
        }
        for id in gone {
            self.mark_gone(&id);
        }
    }

    fn handle_event(&mut self, ev: &Event) {
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            self.counters.inotify_overflows += 1;
            // Events were lost: no run's state can be trusted until read again.
            for run in self.runs.values_mut() {
                run.settled = false;
                run.populated = None;
            }
            // Nor which removal events are still to come, nor which children were made: the
            // listing at the next point finds every child that is there.
            for f in self.families.values_mut() {
                f.departed.clear();
                f.must_list = true;
            }
            self.rescan_all();
            return;
        }
        match self.watches.get(&ev.wd) {
            Some(WatchTarget::Parent(p)) => {
                let idxs = p.patterns.clone();
                let family = p.family.clone();
                if ev.mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0 {
                    self.watches.remove(&ev.wd);
                    for i in idxs {
                        self.pattern_wds[i] = None;
                    }
                    if let Some(rel) = family {
                        if let Some(f) = self.families.get_mut(&rel) {
                            f.wd = None;
                        }
                        // The parent is gone: its children's unread tails cannot be told.
                        self.reconcile_family(&rel, true, &HashSet::new());
                    }
                    return;
                }
                let Some(name) = ev.name.as_deref() else {
                    return;
                };
                let created = ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
                let removed = ev.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0;
                for idx in idxs {
                    if created {
                        if self.consider(idx, name, BilledFrom::Birth).is_none() {
                            if let NameMatch::Run(id) = self.patterns[idx].match_name(name) {
                                // Unless the event is stale: a listing found that child, and
                                // it went away and was billed (as a ghost) first.
                                let stale = self.patterns[idx]
                                    .parent()
                                    .to_str()
                                    .and_then(|rel| self.families.get(rel))
                                    .is_some_and(|f| f.departed.contains(name));
                                if !stale && self.recently_finished_set.contains(id.as_str()) {
                                    self.counters.run_id_reused += 1;
                                    tracing::warn!(
                                        run = %Shown::new(&id),
                                        "a cgroup reappeared under a finished run's name: not \
                                         billed as that run again (its CPU time is the host's)"
                                    );
                                }
                            }
                        }
                    } else if removed {
                        if let NameMatch::Run(id) = self.patterns[idx].match_name(name) {
                            if self
                                .runs
                                .get(id.as_str())
                                .is_some_and(|r| r.pattern == Some(idx))
                            {
                                self.mark_gone(&id);
                            }
                        }
                    }
                }
                if let Some(rel) = family {
                    self.family_child_event(&rel, name, created, removed);
                }
            }
            Some(WatchTarget::RunEvents(id)) => {
                let id = id.clone();
                if ev.mask & libc::IN_IGNORED != 0 {
                    self.watches.remove(&ev.wd);
                    if let Some(r) = self.runs.get_mut(&id) {
                        r.events_wd = None;
                        r.settled = false;
                    }
                    return;
                }
                if ev.mask & libc::IN_MODIFY != 0 {
                    self.on_events_modified(&id);
                }
            }
            None => {}
        }
    }

    /// `cgroup.events` changed: if the run emptied, read its usage now, while the cgroup is
    /// certain to exist; whoever emptied it may remove it right after.
    fn on_events_modified(&mut self, id: &str) {
        let now = self.now_us();
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.finished {
            return;
        }
        let path = self
            .cgroup_root
            .join(&*run.cgroup_rel)
            .join("cgroup.events");
        run.settled = false;
        run.empty_tick_reads = 0;
        let populated = read_populated(&path);
        run.populated = populated.as_ref().ok().copied();
        match populated {
            Ok(false) => match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                Ok(_) => run.final_read = true,
                Err(e) if e.is_gone() => self.mark_gone(id),
                Err(e) => self.push_error(Some(id), e),
            },
            Ok(true) => run.final_read = false,
            Err(e) if e.is_gone() => self.mark_gone(id),
            Err(e) => self.push_error(Some(id), e),
        }
    }

    pub(super) fn push_error(&mut self, run_id: Option<&str>, error: HostError) {
        self.counters.read_errors += 1;
        // Bounded: a host that fails every read must not grow this without limit.
        if self.errors.len() < 1024 {
            self.errors.push(TickError {
                run_id: run_id.map(Arc::from),
                error,
            });
        }
    }

    pub(super) fn arm_pattern(&mut self, idx: usize) -> bool {
        if self.pattern_wds[idx].is_some() {
            return false;
        }
        let dir = self.cgroup_root.join(self.patterns[idx].parent());
        match self.inotify.add_watch(&dir, PARENT_MASK) {
            Ok(wd) => {
                self.pattern_wds[idx] = Some(wd);
                match self.watches.entry(wd).or_insert_with(WatchTarget::parent) {
                    WatchTarget::Parent(p) => {
                        if !p.patterns.contains(&idx) {
                            p.patterns.push(idx);
                        }
                    }
                    // A wd is per inode; a run's cgroup.events is never a pattern's parent.
                    WatchTarget::RunEvents(_) => {}
                }
                // Before the scan that follows: children listed now are its baseline.
                if let Some(parent) = self.patterns[idx].parent().to_str() {
                    let parent = parent.to_owned();
                    self.ensure_family(&parent);
                }
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn rescan_all(&mut self) {
        self.counters.rescans += 1;
        self.last_rescan_us = self.now_us();
        // Also the bound on trusting events: a settled run whose removal produced no event
        // (a control-plane run's parent is not watched) is read, found gone and finished here.
        for run in self.runs.values_mut() {
            run.settled = false;
        }
        for idx in 0..self.patterns.len() {
            self.arm_pattern(idx);
            self.scan_pattern(idx, BilledFrom::Birth);
        }
        self.sweep_trace();
        if let Some(n) = self.trace.as_ref().and_then(|t| t.skipped().ok()) {
            self.trace_skipped = n;
        }
        self.trace_counts_at_us = None;
    }

    /// Lists a pattern's parent: adds runs not yet tracked, marks tracked ones that are no
    /// longer listed as gone.
    pub(super) fn scan_pattern(&mut self, idx: usize, billed_from: BilledFrom) {
        let dir = self.cgroup_root.join(self.patterns[idx].parent());
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.mark_pattern_runs_gone(idx, &HashSet::new());
                return;
            }
            Err(e) => {
                self.push_error(None, HostError::io(&dir, e, HINT_GENERIC));
                return;
            }
        };
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        for entry in rd {
            let Ok(entry) = entry else { continue };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            if let Some(id) = self.consider(idx, &name, billed_from) {
                seen.insert(id);
            }
        }
        self.mark_pattern_runs_gone(idx, &seen);
    }

    fn mark_pattern_runs_gone(&mut self, idx: usize, seen: &HashSet<Arc<str>>) {
        let gone: Vec<Arc<str>> = self
            .runs
            .values()
            .filter(|r| r.pattern == Some(idx) && !r.finished && !seen.contains(&r.id))
            .map(|r| r.id.clone())
            .collect();
        for id in gone {
            self.mark_gone(&id);
        }
    }

    /// A directory name under a pattern's parent: track it if it is a new run. Returns the
    /// run id when the name is a run of this pattern (tracked before or now).
    fn consider(&mut self, idx: usize, name: &OsStr, billed_from: BilledFrom) -> Option<Arc<str>> {
        let wanted = billed_from;
        let id = match self.patterns[idx].match_name(name) {
            NameMatch::Run(id) => id,
            NameMatch::NoMatch => return None,
            NameMatch::Hostile(_) => {
                self.counters.hostile_names_skipped += 1;
                return None;
            }
        };
        if let Some(r) = self.runs.get(id.as_str()) {
            return Some(r.id.clone());
        }
        if self.recently_finished_set.contains(id.as_str()) {
            return None;
        }
        // Only for a run new to the tracker: a rescan lists every tracked one again.
        let billed_from = match billed_from {
            BilledFrom::Birth => {
                let dir = self
                    .cgroup_root
                    .join(self.patterns[idx].parent())
                    .join(name);
                self.billing_start(&dir, BilledFrom::Birth)
            }
            other => other,
        };
        // match_name only accepts UTF-8 ids, and prefix/suffix come from a UTF-8 pattern.
        let dir_name = name.to_str()?;
        let rel = self.patterns[idx].cgroup_rel(dir_name);
        match self.add_run(
            &id,
            &rel,
            Arc::new(Labels::new()),
            RunOrigin::Pattern,
            billed_from,
            Some(idx),
        ) {
            Ok(()) => self.runs.get(id.as_str()).map(|r| r.id.clone()),
            Err(e) if e.is_gone() => {
                self.counters.vanished_at_discovery += 1;
                // Created and removed before it could be opened: billed from its parent.
                if wanted == BilledFrom::Birth {
                    self.add_ghost(&id, &rel);
                }
                None
            }
            Err(e) => {
                self.push_error(Some(&id), e);
                None
            }
        }
    }

    /// Replaces the run patterns (configuration reload). Runs found by an old pattern stay
    /// tracked until they finish, so none loses its final reading; cgroups that only the new
    /// patterns match are tracked from now on (billed from discovery: their past CPU time was in
    /// the host bucket and must not be billed twice). Invalid patterns change nothing.
    pub fn set_patterns(&mut self, patterns: &[String]) -> Result<(), HostError> {
        let parsed: Vec<RunPattern> = patterns
            .iter()
            .map(|p| RunPattern::parse(p))
            .collect::<Result<_, _>>()?;
        for wd in self.pattern_wds.iter().flatten() {
            // A watch that also serves a family stays; it only stops serving patterns.
            if let Some(WatchTarget::Parent(p)) = self.watches.get_mut(wd) {
                if p.family.is_some() {
                    p.patterns.clear();
                    continue;
                }
            }
            self.watches.remove(wd);
            self.inotify.rm_watch(*wd);
        }
        let old: Vec<String> = self
            .patterns
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect();
        for run in self.runs.values_mut() {
            if let Some(i) = run.pattern {
                run.pattern = old
                    .get(i)
                    .and_then(|o| parsed.iter().position(|n| n.as_str() == o));
            }
        }
        let n = parsed.len();
        self.patterns = parsed;
        self.pattern_wds = vec![None; n];
        for idx in 0..n {
            self.arm_pattern(idx);
            self.scan_pattern(idx, BilledFrom::Discovery);
        }
        Ok(())
    }
}

fn inotify_err(e: io::Error) -> HostError {
    HostError::Io {
        path: PathBuf::from("inotify"),
        source: e,
    }
}
