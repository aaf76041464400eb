//! Reconciliation through the parent: each run parent's family, the listing of its children,
//! and the share of what removed children used unread (see [`crate::cgroup::family`]).

use super::usage::capture;
use super::*;

/// The trace's count for the child `name` of the family `f` that went away, counted up to
/// `read_us` as a child's already: its final `usage_usec`, when the trace knew it from its
/// creation and holds all of it. What it used beyond `read_us` is in the parent's growth, so it
/// goes to the family's `traced_gone_us` (the children's at the next point, no residual). The
/// name's entry may be of a new cgroup made under it since (then it is that live directory's,
/// and the gone one is not known by name). Its entries are dropped: this is their last use.
pub(super) fn take_traced_gone_child(
    trace: Option<&CgroupTrace>,
    cgroup_root: &Path,
    f: &mut Family,
    name: &OsStr,
    read_us: u64,
) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let (trace, parent) = (trace?, f.trace_parent?);
    let id = trace.id_of(parent, name.as_bytes()).ok()??;
    let dir = cgroup_root.join(&*f.rel).join(name);
    if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
        return None;
    }
    let us = trace.usage(id).ok()??.usage_us();
    let _ = trace.forget(id, parent, name.as_bytes());
    let us = us?;
    f.traced_gone_us += us.saturating_sub(read_us);
    Some(us)
}

impl RunTracker {
    /// Puts a new run in its parent's family (made if needed) and sets its baseline for
    /// reconcile points.
    pub(super) fn join_family(&mut self, run: &mut Run, billed_from: BilledFrom) {
        let Some(parent) = parent_rel(&run.cgroup_rel) else {
            return;
        };
        let parent = parent.to_owned();
        if !self.ensure_family(&parent) {
            return;
        }
        let Some(f) = self.families.get_mut(parent.as_str()) else {
            return;
        };
        let name = Path::new(&*run.cgroup_rel).file_name().map(OsStr::to_owned);
        run.scan_us = match name.and_then(|n| f.others.remove(&n)) {
            // Listed at the family's last point: its usage up to then is in that baseline.
            Some(o) => o.scan_us.min(run.latest_us),
            // Born since the last point: all of it is new to the parent too.
            None if billed_from == BilledFrom::Birth => 0,
            None => run.latest_us,
        };
        f.runs.insert(run.id.clone());
        run.family = Some(f.rel.clone());
    }

    /// The trace's count for the cgroup `id` (a run's directory inode), when it was traced from
    /// its creation and holds all of its time.
    pub(super) fn traced_us(&self, id: u64) -> Option<u64> {
        self.trace.as_ref()?.usage(id).ok()??.usage_us()
    }

    /// Drops the trace's entries for the cgroup `id`, named `name` under the traced parent
    /// `parent`.
    pub(super) fn forget_traced(&self, id: u64, parent: Option<u64>, name: &OsStr) {
        if let Some(t) = &self.trace {
            let _ = match parent {
                Some(p) => t.forget(id, p, name.as_bytes()),
                None => t.forget_usage(id),
            };
        }
    }

    /// Drops the trace entries no one will ask for: of a cgroup that is gone and is no tracked
    /// run's, or under a parent that is no longer a family's. Their removal is normally seen
    /// (an event, a point) and the entry dropped then; this catches what was missed (an inotify
    /// overflow, a name made again before the first was claimed). An entry is dropped only when
    /// two sweeps in a row find it of no use, so a removal still on its way is not raced.
    pub(super) fn sweep_trace(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let Some(trace) = &self.trace else {
            return;
        };
        let Ok(entries) = trace.entries_list() else {
            return;
        };
        let parents: HashMap<u64, &Family> = self
            .families
            .values()
            .filter_map(|f| f.trace_parent.map(|p| (p, f)))
            .collect();
        let runs: HashSet<u64> = self.runs.values().filter_map(|r| r.dir_ino).collect();
        let mut useless = HashSet::new();
        let mut doomed = Vec::new();
        for super::super::trace::NamedEntry { parent, name, id } in entries.named {
            let alive = parents.get(&parent).is_some_and(|f| {
                let dir = self
                    .cgroup_root
                    .join(&*f.rel)
                    .join(OsStr::from_bytes(&name));
                std::fs::metadata(dir).is_ok_and(|m| m.ino() == id)
            });
            if alive || runs.contains(&id) {
                continue;
            }
            useless.insert(id);
            if self.trace_suspects.contains(&id) {
                doomed.push((id, Some((parent, name))));
            }
        }
        for id in entries.unnamed {
            if runs.contains(&id) {
                continue;
            }
            useless.insert(id);
            if self.trace_suspects.contains(&id) {
                doomed.push((id, None));
            }
        }
        for (id, named) in &doomed {
            let _ = match named {
                Some((parent, name)) => trace.forget(*id, *parent, name),
                None => trace.forget_usage(*id),
            };
            useless.remove(id);
        }
        self.counters.trace_swept += doomed.len() as u64;
        self.trace_suspects = useless;
    }

    /// Makes sure the parent `rel` (never the cgroup root) has a family: its `cpu.stat` kept
    /// open, a watch on its directory, and every child listed as a baseline. False when it
    /// cannot be had (then its runs' unread tails are lost, loudly).
    pub(super) fn ensure_family(&mut self, rel: &str) -> bool {
        if rel.is_empty() {
            return false;
        }
        if self.families.contains_key(rel) {
            return true;
        }
        let dir = self.cgroup_root.join(rel);
        let keep = self.kept_fds < self.fd_budget;
        let rel: Arc<str> = Arc::from(rel);
        let file = |name| CgroupFile::new(&self.cgroup_root, &rel, name);
        let Ok(cpu_stat) = Source::open(file("cpu.stat"), keep) else {
            return false;
        };
        let Ok(procs) = Source::open(file("cgroup.procs"), self.kept_fds + 1 < self.fd_budget)
        else {
            return false;
        };
        let listing = if self.kept_fds + 2 < self.fd_budget {
            std::fs::File::open(&dir).ok()
        } else {
            None
        };
        let kept = usize::from(cpu_stat.is_kept())
            + usize::from(procs.is_kept())
            + usize::from(listing.is_some());
        // Watched by the trace before its children are listed: a child made from here on is
        // traced from its creation; one made before is read from the listing's baseline.
        let trace_parent = self.trace.as_ref().and_then(|t| {
            use std::os::unix::fs::MetadataExt as _;
            let ino = std::fs::metadata(&dir).ok()?.ino();
            t.watch_parent(ino).ok().map(|()| ino)
        });
        // Children first, then the parent once. Not a point's order, on purpose: the children's
        // growth while they are listed is in the parent's read and not in theirs, so this
        // baseline can only make the first residuals low (runs under-billed, the host's share
        // up); a midpoint here would carry an error of either sign into every later balance,
        // where no hold-back covers it.
        let mut others = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = e.path().join("cpu.stat");
                let read = read_cpu_stat_once(&path);
                if let Ok(v) = read {
                    others.insert(
                        e.file_name(),
                        Other {
                            cpu_stat: path,
                            scan_us: v,
                        },
                    );
                }
            }
        }
        let Ok(last_us) = cpu_stat.read_cpu_usage_us() else {
            if let (Some(t), Some(p)) = (&self.trace, trace_parent) {
                let _ = t.forget_parent(p);
            }
            return false;
        };
        // The same inode as a pattern's parent gives the same wd: one target serves both.
        let wd = match self.inotify.add_watch(&dir, PARENT_MASK) {
            Ok(wd) => Some(wd),
            Err(_) => {
                self.counters.watch_fallbacks += 1;
                None
            }
        };
        if let Some(wd) = wd {
            if let WatchTarget::Parent(p) =
                self.watches.entry(wd).or_insert_with(WatchTarget::parent)
            {
                p.family = Some(rel.clone());
            }
        }
        self.kept_fds += kept;
        let now = self.now_us();
        self.families.insert(
            rel.clone(),
            Family {
                rel,
                cpu_stat,
                procs,
                dir: listing,
                must_list: true,
                last_us,
                last_point_us: now,
                wd,
                runs: BTreeSet::new(),
                others,
                departed: BTreeSet::new(),
                rate_ppm: None,
                claimants: Vec::new(),
                balance: 0,
                balance_since_us: now,
                kept_fds: kept,
                pre_us: None,
                pre_at_us: now,
                trace_parent,
                traced_gone_us: 0,
            },
        );
        true
    }

    /// A child of a family's parent was created or removed (after the patterns had their say).
    pub(super) fn family_child_event(
        &mut self,
        rel: &str,
        name: &OsStr,
        created: bool,
        removed: bool,
    ) {
        let child: String = format!("{rel}/{}", name.to_string_lossy());
        let run_id = self.paths.get(child.as_str()).cloned();
        if removed {
            if let Some(id) = &run_id {
                // An announced run: no pattern saw it go.
                self.mark_gone(id);
            }
        }
        // A creation event for a run already finished (found by a listing, gone and billed
        // before its event was read) or already a ghost is stale, not a new child.
        let stale_run = run_id.is_none() && self.names_finished_run(rel, name);
        let now = self.now_us();
        let exists = created && self.cgroup_root.join(&child).is_dir();
        let Some(f) = self.families.get_mut(rel) else {
            return;
        };
        if created {
            // Whatever this event is taken for, the next point lists the directory, as it did
            // at every point before listings were skipped: a name reused by a new cgroup is
            // found there as an ordinary child.
            f.must_list = true;
            if run_id.is_some() || stale_run || f.departed.contains(name) {
                return;
            }
            if exists {
                // Born since the last point (or listed already: then its baseline stays).
                f.others.entry(name.to_owned()).or_insert_with(|| Other {
                    cpu_stat: self.cgroup_root.join(&child).join("cpu.stat"),
                    scan_us: 0,
                });
            } else if !f.others.contains_key(name) {
                // Created and removed unread: what it used is in the parent, and the host's.
                f.departed.insert(name.to_owned());
                if take_traced_gone_child(self.trace.as_ref(), &self.cgroup_root, f, name, 0)
                    .is_none()
                {
                    f.claim_other(now);
                }
            }
        } else if removed {
            if f.departed.remove(name) {
                // Already found gone at a point, and claimed then.
                return;
            }
            if let Some(o) = f.others.remove(name) {
                let trace = self.trace.as_ref();
                if take_traced_gone_child(trace, &self.cgroup_root, f, name, o.scan_us).is_none() {
                    f.claim_other(now);
                }
            }
        }
    }

    /// Whether `name` under the family `rel` is a run of one of its patterns that finished or
    /// is a ghost.
    fn names_finished_run(&self, rel: &str, name: &OsStr) -> bool {
        self.family_run_ids(rel, name).any(|id| {
            self.recently_finished_set.contains(id.as_str())
                || self.ghosts.iter().any(|g| *g.id == *id)
        })
    }

    /// The run ids `name` has under the patterns whose parent is `rel`.
    fn family_run_ids<'a>(
        &'a self,
        rel: &'a str,
        name: &'a OsStr,
    ) -> impl Iterator<Item = String> + 'a {
        self.patterns
            .iter()
            .filter(move |p| p.parent().to_str() == Some(rel))
            .filter_map(move |p| match p.match_name(name) {
                NameMatch::Run(id) => Some(id),
                _ => None,
            })
    }

    /// Lists the parent's children at a point. On a busy host the creation events lag: a
    /// child that is there but not yet known would have its CPU time taken for that of the
    /// children that went away (and counted again once known). So every child is known before
    /// the parent is read: one not known yet is read as an ordinary child (cheap: no watch, no
    /// kept descriptor), from its birth. When its creation event is read and it is a run, it
    /// becomes one from that baseline, billed from its birth; when it goes away first and is a
    /// run's, it is billed as a ghost. False when the listing is incomplete (the directory could
    /// not be opened, rewound or read to its end): a child the parent counts may not be read.
    pub(super) fn list_family(&mut self, rel: &str) -> bool {
        let Some(f) = self.families.get(rel) else {
            return false;
        };
        // A watched parent with no event pending has made no child since the events were
        // last read and handled: nothing to find. Listed anyway: a family not listed since it
        // was set up (its watch came after its first listing), since an overflow, or since a
        // creation event (whatever it was taken for); and one whose directory is not kept
        // open (its reads go by path, so a parent removed and made again, whose watch kernfs
        // may drop without a word, is still read).
        if f.listing_current() && !self.inotify.pending() {
            self.listings_skipped += 1;
            return true;
        }
        // The kept directory rewound, else opened now. Gone or unreadable: the parent's own
        // read says so at this point.
        let opened;
        let fd = match &f.dir {
            Some(d) => {
                if rustix::fs::seek(d, rustix::fs::SeekFrom::Start(0)).is_err() {
                    return false;
                }
                d.as_fd()
            }
            None => match std::fs::File::open(self.cgroup_root.join(rel)) {
                Ok(d) => {
                    opened = d;
                    opened.as_fd()
                }
                Err(_) => return false,
            },
        };
        // Every child, every point: nothing allocated for the children already known.
        if self.dir_buf.capacity() < DIR_BUF_BYTES {
            self.dir_buf.reserve(DIR_BUF_BYTES);
        }
        let key = &mut self.child_key;
        let mut unknown: Vec<std::ffi::OsString> = Vec::new();
        let mut entries = rustix::fs::RawDir::new(fd, self.dir_buf.spare_capacity_mut());
        let mut complete = true;
        while let Some(entry) = entries.next() {
            let Ok(e) = entry else {
                // Read in part: what was listed is kept, and the next point lists again.
                complete = false;
                break;
            };
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let is_dir = match e.file_type() {
                rustix::fs::FileType::Directory => true,
                rustix::fs::FileType::Unknown => {
                    rustix::fs::statat(fd, e.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::Directory
                        })
                }
                _ => false,
            };
            if !is_dir || f.others.contains_key(name) || f.departed.contains(name) {
                continue;
            }
            key.clear();
            key.push_str(rel);
            key.push('/');
            key.push_str(&name.to_string_lossy());
            // A run's name: its cgroup, unless the directory is another inode (removed and made
            // again under the name before the run's removal was handled), which is a new child.
            let run_ino = self
                .paths
                .get(key.as_str())
                .map(|id| self.runs.get(id).and_then(|r| r.dir_ino));
            let remade = matches!(run_ino, Some(Some(ino)) if ino != e.ino());
            if (run_ino.is_some() && !remade) || self.ghosts.iter().any(|g| *g.cgroup_rel == **key)
            {
                continue;
            }
            unknown.push(name.to_owned());
        }
        self.counters.children_listed_early += unknown.len() as u64;
        let Some(f) = self.families.get_mut(rel) else {
            return false;
        };
        f.must_list = !complete;
        for name in unknown {
            let cpu_stat = self.cgroup_root.join(rel).join(&name).join("cpu.stat");
            f.others.insert(
                name,
                Other {
                    cpu_stat,
                    scan_us: 0,
                },
            );
        }
        complete
    }

    /// A child read as an ordinary one went away: when its name is a run's that no event has
    /// announced yet, it was a run created and removed between events, billed as a ghost (its
    /// usage up to its last read, `scan_us`, plus its share of the residual).
    fn other_was_ghost(&mut self, fam: &mut Family, name: &OsStr, scan_us: u64) -> bool {
        let rel = fam.rel.clone();
        let Some(id) = self.family_run_ids(&rel, name).next() else {
            return false;
        };
        if self.runs.contains_key(id.as_str()) || self.names_finished_run(&rel, name) {
            return false;
        }
        let Some(dir_name) = name.to_str() else {
            return false;
        };
        let now = self.now_us();
        self.counters.ghost_runs += 1;
        let mut ghost = Ghost {
            id: Arc::from(id.as_str()),
            cgroup_rel: Arc::from(format!("{rel}/{dir_name}")),
            usage_us: scan_us,
            final_usage: None,
        };
        match take_traced_gone_child(self.trace.as_ref(), &self.cgroup_root, fam, name, scan_us) {
            // Traced from its creation: all of it.
            Some(us) => {
                if us < scan_us {
                    self.counters.trace_mismatches += 1;
                }
                ghost.usage_us = scan_us.max(us);
                ghost.final_usage = Some(FinalUsage::Traced);
                self.counters.final_traced += 1;
            }
            None => fam.claimants.push(Claimant {
                kind: ClaimantKind::Ghost(self.ghosts.len()),
                weight_us: fam.unknown_weight(now.saturating_sub(fam.last_point_us)),
                perf_us: None,
            }),
        }
        self.ghosts.push(ghost);
        true
    }

    /// One reconcile point of the family `rel` (see [`crate::cgroup::family`]): the live children's
    /// reads (taken again when `recapture`; a tick has just taken them, and `failed` names the
    /// runs whose read failed then), then the parent's, then the residual to the children that
    /// went away unread since the last point.
    pub(super) fn reconcile_family(
        &mut self,
        rel: &str,
        recapture: bool,
        failed: &HashSet<Arc<str>>,
    ) {
        let now = self.now_us();
        let Some(ids) = self
            .families
            .get(rel)
            .map(|f| f.runs.iter().cloned().collect::<Vec<_>>())
        else {
            return;
        };
        // The reads: the parent before the children (`pre`; taken at the tick's start when not
        // `recapture`), the listing, the live children, the parent after (`post`). The midpoint
        // of the two parent reads stands for the moment of the children's, so the residual is off
        // by at most half of what the parent gained between them (the bracket). When that is
        // wide (this thread was preempted mid-way, as on a host whose runs take every CPU), the
        // reads are taken again, a few times at most.
        let mut attempt = 0u32;
        let mut post_at_us;
        let (others_read, post_read, bracket_us, incomplete) = loop {
            let fresh = recapture || attempt > 0;
            // A child the parent counts but this point could not read (its read failed, the
            // listing was cut short, the parent's first read failed) puts its CPU time in the
            // residual: such a point pays its claimants nothing (see below).
            let mut incomplete = false;
            if fresh {
                let at = self.now_us();
                if let Some(f) = self.families.get_mut(rel) {
                    f.pre_us = f.cpu_stat.read_cpu_usage_us().ok();
                    f.pre_at_us = at;
                }
            }
            // Listed after the parent's first read, never before: a child made before that read
            // has used CPU time the parent counts, so it must be read as a child too. (Listed
            // before it, a starved agent's point left out the children made in the seconds
            // between, paid what they had used to the removed ones as a residual, and took it
            // back at the next point into a balance that stayed negative: 5.7% over in total.)
            // A child made after it has used nothing the midpoint can count but its share of
            // the bracket.
            incomplete |= !self.list_family(rel);
            if fresh {
                let mut gone = Vec::new();
                for id in &ids {
                    let Some(run) = self.runs.get_mut(id) else {
                        continue;
                    };
                    let settled = run.settled && run.populated == Some(false);
                    if run.finished || settled {
                        continue;
                    }
                    match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                        Ok(_) => {}
                        Err(e) if e.is_gone() => gone.push(id.clone()),
                        Err(e) => {
                            incomplete = true;
                            self.push_error(Some(id), e);
                        }
                    }
                }
                for id in gone {
                    self.mark_gone(&id);
                }
            } else {
                incomplete |= ids.iter().any(|id| failed.contains(id));
            }
            let Some(f) = self.families.get(rel) else {
                return;
            };
            let others: Vec<(std::ffi::OsString, Result<u64, HostError>)> = f
                .others
                .iter()
                .map(|(name, o)| {
                    let v = read_cpu_stat_once(&o.cpu_stat);
                    (name.clone(), v)
                })
                .collect();
            let post = f.cpu_stat.read_cpu_usage_us();
            post_at_us = self.now_us();
            let bracket = match (&post, f.pre_us) {
                (Ok(post), Some(pre)) => post.saturating_sub(pre),
                // No first read: the point is as wide as it can be (tried again, then paid
                // nothing), not sharp.
                (Ok(_), None) => {
                    incomplete = true;
                    u64::MAX
                }
                _ => 0,
            };
            let children = ids.len() + others.len();
            if bracket > BRACKET_MAX_US
                && attempt < BRACKET_RETRIES
                && children <= BRACKET_RETRY_MAX_CHILDREN
            {
                attempt += 1;
                self.counters.reconcile_retries += 1;
                continue;
            }
            break (others, post, bracket, incomplete);
        };
        let Some(mut fam) = self.families.remove(rel) else {
            return;
        };
        let mut unreliable: Option<String> = None;
        let mut children: i128 = 0;
        let mut gone_others = Vec::new();
        for (name, read) in others_read {
            match read {
                Ok(v) => {
                    if let Some(o) = fam.others.get_mut(&name) {
                        children += i128::from(v.checked_sub(o.scan_us).unwrap_or(v));
                        o.scan_us = v;
                    }
                }
                Err(e) if e.is_gone() => gone_others.push(name),
                Err(e) => unreliable = Some(e.to_string()),
            }
        }
        for name in gone_others {
            let scan_us = fam.others.remove(&name).map_or(0, |o| o.scan_us);
            if !self.other_was_ghost(&mut fam, &name, scan_us) {
                let trace = self.trace.as_ref();
                if take_traced_gone_child(trace, &self.cgroup_root, &mut fam, &name, scan_us)
                    .is_none()
                {
                    fam.claim_other(now);
                }
            }
            // Claimed now; its removal event, when read, must not claim again.
            fam.departed.insert(name);
        }
        let (mut runs_delta, mut live) = (0u128, 0u128);
        for id in &fam.runs {
            if let Some(run) = self.runs.get_mut(id) {
                let d = run
                    .latest_us
                    .checked_sub(run.scan_us)
                    .unwrap_or(run.latest_us);
                children += i128::from(d);
                run.scan_us = run.latest_us;
                if !run.finished {
                    runs_delta += u128::from(d);
                    live += 1;
                }
            }
        }
        // Children gone unread whose tails the trace gave: theirs, not a residual.
        children += i128::from(std::mem::take(&mut fam.traced_gone_us));
        let since = u128::from(now.saturating_sub(fam.last_point_us));
        if live > 0 && since >= 10_000 {
            fam.rate_ppm = u64::try_from(runs_delta * 1_000_000 / (live * since)).ok();
        }
        let mut parent_gone = false;
        let pre = fam.pre_us.take();
        let read = post_read.map(|post| match pre {
            Some(pre) if pre <= post => pre + (post - pre) / 2,
            _ => post,
        });
        let residual = match read {
            Ok(p) if p >= fam.last_us => {
                let r = i128::from(p - fam.last_us) - children;
                fam.last_us = p;
                Some(r)
            }
            Ok(p) => {
                fam.last_us = p;
                unreliable = Some("the parent's usage went backwards (recreated)".to_owned());
                None
            }
            Err(e) => {
                parent_gone = e.is_gone();
                unreliable = Some(e.to_string());
                None
            }
        };
        let mut claimants = std::mem::take(&mut fam.claimants);
        // Checked at every point: a positive residual is timing noise to keep (it cancels
        // later) only when the parent has no processes of its own; else it is theirs.
        if unreliable.is_none() {
            match fam.procs.lists_a_number() {
                Ok(false) => {}
                Ok(true) => {
                    self.counters.reconcile_parent_busy += 1;
                    unreliable = Some(format!(
                        "{} lists processes: the parent's own CPU time cannot be told from \
                         its removed children's",
                        fam.procs.path().display()
                    ));
                }
                Err(e) => unreliable = Some(e.to_string()),
            }
        }
        self.counters.reconcile_points += 1;
        match (residual, unreliable) {
            (Some(mut r), None) => {
                // The residual is shared by the claimants' counters when every claimant has
                // them and the point is sharp. A point read too slowly (the bracket stayed wide:
                // hundreds of children, or this thread preempted) can be off by more than a
                // run's own counters, and a claimant without counters (a ghost, an ordinary
                // child) has only a guessed weight: there, each run with counters takes what
                // they counted, and the residual less that goes to the others.
                let counted_apart = incomplete
                    || bracket_us > BRACKET_MAX_US
                    || claimants.iter().any(|c| c.perf_us.is_none());
                let mut counted_us = 0u64;
                if counted_apart {
                    claimants.retain(|c| match (&c.kind, c.perf_us) {
                        (ClaimantKind::Run(id), Some(t)) => {
                            r -= i128::from(t);
                            counted_us = counted_us.saturating_add(t);
                            self.settle_counted(id, t);
                            false
                        }
                        _ => true,
                    });
                }
                // Timing noise is carried both ways, so it cancels over time instead of biasing
                // the claimants, and a positive residual waits for its claimant (a child that
                // went away before its creation event was read claims it as a ghost later, on
                // a starved host seconds later). The bounds are physical: what has built up
                // since the balance was last paid out cannot exceed what the whole machine
                // could run in that time, and noise owed back is at most a second of the whole
                // machine. Beyond either the counters disagree: the excess is the host's, and
                // counted. (A cap of one second of the machine lost 1% of a starved host's
                // runs, whose ghosts claimed late.)
                let ncpus = i128::from(self.cpus.len().max(1) as u32);
                let since = i128::from(post_at_us.saturating_sub(fam.balance_since_us));
                let (floor, cap) = (-ncpus * 1_000_000, ncpus * (since + BALANCE_SLACK_US));
                let unclamped = fam.balance + r;
                fam.balance = unclamped.clamp(floor, cap);
                let clamped = (unclamped - fam.balance).unsigned_abs();
                self.counters.reconcile_clamped_us = self
                    .counters
                    .reconcile_clamped_us
                    .saturating_add(u64::try_from(clamped).unwrap_or(u64::MAX));
                let mut paid_us = 0;
                if !claimants.is_empty() {
                    // An incomplete point's residual holds the CPU time of children it did not
                    // read: nothing of it is paid (the next point takes it back).
                    let uncertain_us = if incomplete { u64::MAX } else { bracket_us };
                    paid_us = payout(&mut fam.balance, uncertain_us, BRACKET_MAX_US);
                    let weights: Vec<u64> = claimants.iter().map(|c| c.weight_us).collect();
                    let shares = share_residual(paid_us, &weights);
                    let how = if claimants.len() > 1 {
                        FinalUsage::ReconciledShared
                    } else {
                        FinalUsage::Reconciled
                    };
                    for (c, share) in claimants.iter().zip(shares) {
                        self.settle_claim(&c.kind, share, how);
                    }
                }
                tracing::debug!(
                    parent = %Shown::new(rel),
                    children_us = %children,
                    bracket_us,
                    incomplete,
                    counted_us,
                    residual_us = %r,
                    balance_us = %unclamped,
                    clamped_us = %clamped,
                    claimants = claimants.len(),
                    paid_us,
                    left_us = %fam.balance,
                    span_us = self.now_us().saturating_sub(now),
                    recapture,
                    "reconcile point"
                );
            }
            (_, why) => {
                fam.balance = 0;
                let why = why.unwrap_or_default();
                for c in &claimants {
                    if let (ClaimantKind::Run(id), Some(t)) = (&c.kind, c.perf_us) {
                        // The parent cannot tell; the run's own counters can, nearly exactly.
                        self.settle_counted(id, t);
                        continue;
                    }
                    self.settle_claim(&c.kind, 0, FinalUsage::Lost);
                    if let ClaimantKind::Run(id) = &c.kind {
                        tracing::warn!(
                            run = %Shown::new(id),
                            parent = %Shown::new(rel),
                            reason = %why,
                            "run cgroup removed before its final read and its parent cannot be \
                             reconciled: its CPU time since the last read is the host's"
                        );
                    }
                }
            }
        }
        fam.last_point_us = now;
        if fam.balance <= 0 {
            // From this point's first parent read: what builds up from here is at most the
            // parent's growth since then (each point's midpoint lies between its two reads).
            fam.balance_since_us = if pre.is_some() { fam.pre_at_us } else { now };
        }
        if parent_gone {
            self.forget_family(fam, true);
        } else {
            self.families.insert(fam.rel.clone(), fam);
        }
    }

    /// A run's tail is what its perf counters counted (see `perf_tail`): added to its usage as
    /// read (its scan point too: the point it is settled at has already summed the children).
    fn settle_counted(&mut self, id: &str, tail_us: u64) {
        if let Some(r) = self.runs.get_mut(id) {
            r.latest_us = r.latest_us.saturating_add(tail_us);
            r.scan_us = r.scan_us.saturating_add(tail_us);
            r.final_usage = Some(FinalUsage::PerfCounted);
            self.counters.final_perf_counted += 1;
        }
    }

    fn settle_claim(&mut self, kind: &ClaimantKind, share: u64, how: FinalUsage) {
        let slot = match kind {
            ClaimantKind::Run(id) => self.runs.get_mut(id).map(|r| {
                r.pending_reconciled_us += share;
                &mut r.final_usage
            }),
            ClaimantKind::Ghost(i) => self.ghosts.get_mut(*i).map(|g| {
                g.usage_us += share;
                &mut g.final_usage
            }),
            ClaimantKind::Other => None,
        };
        let Some(slot) = slot else {
            return;
        };
        *slot = Some(how);
        match how {
            FinalUsage::Read => self.counters.final_read += 1,
            FinalUsage::Traced => self.counters.final_traced += 1,
            FinalUsage::PerfCounted => self.counters.final_perf_counted += 1,
            FinalUsage::Reconciled => self.counters.final_reconciled += 1,
            FinalUsage::ReconciledShared => self.counters.final_reconciled_shared += 1,
            FinalUsage::Lost => self.counters.final_lost += 1,
        }
        self.counters.reconciled_us += share;
    }

    /// Families that no longer serve anything: no run, no claim, not a pattern's parent.
    pub(super) fn forget_idle_families(&mut self) {
        let idle: Vec<Arc<str>> = self
            .families
            .values()
            .filter(|f| {
                f.runs.is_empty()
                    && f.claimants.is_empty()
                    && !self
                        .patterns
                        .iter()
                        .any(|p| p.parent().to_str() == Some(&*f.rel))
            })
            .map(|f| f.rel.clone())
            .collect();
        for rel in idle {
            if let Some(f) = self.families.remove(&rel) {
                self.forget_family(f, false);
            }
        }
    }

    /// Drops a family. When its parent directory is gone, the watch goes too, and the
    /// patterns it served are armed again when the directory comes back (kernfs does not
    /// always report a watched directory's own removal).
    fn forget_family(&mut self, f: Family, parent_gone: bool) {
        self.kept_fds = self.kept_fds.saturating_sub(f.kept_fds);
        if parent_gone {
            // Its children went before it: runs not yet seen go take the trace's count now,
            // before the parent's entries are dropped (without a family, that is all there is).
            for id in &f.runs {
                if let Some(r) = self.runs.get_mut(id) {
                    r.family = None;
                }
            }
            for id in &f.runs {
                self.mark_gone(id);
            }
        }
        if let (Some(t), Some(p)) = (&self.trace, f.trace_parent) {
            let _ = t.forget_parent(p);
        }
        for id in &f.runs {
            if let Some(r) = self.runs.get_mut(id) {
                r.family = None;
            }
        }
        let Some(wd) = f.wd else {
            return;
        };
        let Some(WatchTarget::Parent(p)) = self.watches.get_mut(&wd) else {
            return;
        };
        let ParentWatch { patterns, family } = &mut **p;
        *family = None;
        if parent_gone {
            for &i in patterns.iter() {
                if let Some(slot) = self.pattern_wds.get_mut(i) {
                    *slot = None;
                }
            }
            patterns.clear();
        }
        if patterns.is_empty() {
            self.watches.remove(&wd);
            self.inotify.rm_watch(wd);
        }
    }
}
