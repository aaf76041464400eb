//! The batch sealer: turns intervals (plus gaps and run summaries) into signed, hash-chained,
//! sequence-numbered batches and appends them to the spool.
//!
//! Sealing policy: a batch is due when `max_intervals` intervals are pending or the oldest
//! pending one waited `max_age`; both are bounded so a batch (and the energy at risk in memory)
//! stays small. The daemon calls [`Sealer::seal`] then [`Sealer::commit`] (one fdatasync for
//! every batch sealed since the last commit: group commit).

use std::path::PathBuf;
use std::time::Duration;

use wattd_proto::v1::{Gap, Interval, RunSummary};

use crate::identity::{self, IdentityError, NodeKey};
use crate::spool::{OpenReport, Spool, SpoolConfig, SpoolError};
use wattd_records::totals::{stamp, RunTotals, RunningTotals};

/// When to seal. Construct with [`SealPolicy::new`], which enforces the bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealPolicy {
    max_intervals: usize,
    max_age_ns: u64,
}

impl SealPolicy {
    pub const MAX_INTERVALS_LIMIT: usize = 3600;
    pub const MAX_AGE_LIMIT: Duration = Duration::from_secs(3600);

    pub fn new(max_intervals: usize, max_age: Duration) -> Result<Self, SealError> {
        if !(1..=Self::MAX_INTERVALS_LIMIT).contains(&max_intervals) {
            return Err(SealError::Policy(format!(
                "max_intervals {max_intervals} outside 1..={}",
                Self::MAX_INTERVALS_LIMIT
            )));
        }
        if max_age.is_zero() || max_age > Self::MAX_AGE_LIMIT {
            return Err(SealError::Policy(format!(
                "max_age {max_age:?} outside (0, {:?}]",
                Self::MAX_AGE_LIMIT
            )));
        }
        Ok(Self {
            max_intervals,
            max_age_ns: u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX),
        })
    }

    pub fn max_intervals(&self) -> usize {
        self.max_intervals
    }

    /// Default `[spool] seal_every_ms`: a batch a second (every interval its own batch at the
    /// default 1 Hz sampling; a hundred intervals a batch at 100 Hz).
    pub const DEFAULT_SEAL_EVERY_MS: u64 = 1000;

    /// The daemon's policy: one batch per `every` of intervals of `interval` each, so that the
    /// signature and the fdatasync are paid once per `every` whatever the sampling rate. A batch
    /// holds `every / interval` intervals (at least one); it is also sealed once its first
    /// content is `max(every, interval)` old, so ticks that come late (a loaded host) do not
    /// hold intervals longer than that.
    pub fn by_time(interval: Duration, every: Duration) -> Result<Self, SealError> {
        let n = every.as_nanos() / interval.as_nanos().max(1);
        let n = usize::try_from(n)
            .unwrap_or(usize::MAX)
            .clamp(1, Self::MAX_INTERVALS_LIMIT);
        Self::new(n, every.max(interval).min(Self::MAX_AGE_LIMIT))
    }
}

impl Default for SealPolicy {
    /// 10 intervals or 10 s, whichever comes first.
    fn default() -> Self {
        Self {
            max_intervals: 10,
            max_age_ns: 10_000_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("invalid sealing policy: {0}")]
    Policy(String),
    /// The pending batch holds `max_intervals` already: seal it (or coarsen) first.
    #[error("{0} intervals pending, the most a batch holds; seal first")]
    PendingFull(usize),
}

impl SealError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Spool(e) if e.is_fatal())
    }

    pub fn is_full(&self) -> bool {
        matches!(self, Self::Spool(e) if e.is_full())
    }
}

// Building and signing a batch is pure and shared with the ledger's tests and tools.
use wattd_records::seal::sign_batch_keeping;
pub use wattd_records::seal::{sign_batch, BatchContent};

/// Owns the node key and the spool; the daemon's one handle on the record pipeline.
#[derive(Debug)]
pub struct Sealer {
    dir: PathBuf,
    /// Shared with the shipper, which signs loss statements with it.
    key: std::sync::Arc<NodeKey>,
    spool: Spool,
    policy: SealPolicy,
    pending: BatchContent,
    pending_since_monotonic_ns: Option<u64>,
    /// A policy set while content was pending: it applies once that content is sealed, so the
    /// pending batch is never found "full" (and coarsened) by a smaller bound than it grew under.
    next_policy: Option<SealPolicy>,
    /// The spool refused the last seal (full): intervals coarsen until a seal goes through.
    refused: bool,
    /// Intervals merged when a seal was refused, not yet reported (see
    /// [`Sealer::take_merged_at_refusal`]).
    merged_at_refusal: usize,
    /// The running totals as of the last sealed batch (see `wattd_records::totals`).
    totals: RunningTotals,
    /// Per-run energy for the checkpoints (`wattd_records::totals::RunTotals`).
    run_totals: RunTotals,
}

impl Sealer {
    /// Loads (or creates) the node key in the spool dir, opens the spool, and finishes or
    /// abandons a key rotation a crash interrupted.
    pub fn open(cfg: SpoolConfig, policy: SealPolicy) -> Result<(Self, OpenReport), SealError> {
        let dir = cfg.dir.clone();
        identity::create_data_dir(&dir)?;
        let (key, _) = NodeKey::load_or_create(&dir, &cfg.node_id)?;
        let (spool, report) = Spool::open(cfg)?;
        let key = identity::recover_rotation(&dir, key, spool.last_rotation())?;
        Ok((Self::with_parts(dir, key, spool, policy), report))
    }

    /// A sealer over an already open spool and key. Its running totals continue those of the
    /// spool's last batch (or of the header of a segment created after it), else start at the
    /// next seq.
    pub fn with_parts(dir: PathBuf, key: NodeKey, spool: Spool, policy: SealPolicy) -> Self {
        let totals = spool
            .last_totals()
            .cloned()
            .unwrap_or_else(|| RunningTotals::starting_at(spool.last_seq() + 1));
        let run_totals = restore_run_totals(&spool);
        Self {
            run_totals,
            totals,
            dir,
            key: std::sync::Arc::new(key),
            spool,
            policy,
            pending: BatchContent::default(),
            pending_since_monotonic_ns: None,
            next_policy: None,
            refused: false,
            merged_at_refusal: 0,
        }
    }

    /// How many pending intervals were merged because the spool refused their batch (full)
    /// since the last call: coarsened intervals that [`Sealer::push_or_coarsen`] did not report.
    pub fn take_merged_at_refusal(&mut self) -> usize {
        std::mem::take(&mut self.merged_at_refusal)
    }

    pub fn policy(&self) -> SealPolicy {
        self.next_policy.unwrap_or(self.policy)
    }

    /// Changes when batches are sealed (a reload): at once when nothing is pending, else after
    /// the pending content is sealed under the policy it was gathered under.
    pub fn set_policy(&mut self, policy: SealPolicy) {
        if self.pending.is_empty() {
            self.policy = policy;
            self.next_policy = None;
        } else {
            self.next_policy = Some(policy);
        }
    }

    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// The current key, to share (it changes at a rotation).
    pub fn shared_key(&self) -> std::sync::Arc<NodeKey> {
        std::sync::Arc::clone(&self.key)
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn spool_mut(&mut self) -> &mut Spool {
        &mut self.spool
    }

    /// The running totals as of the last sealed batch.
    pub fn totals(&self) -> &RunningTotals {
        &self.totals
    }

    pub fn pending(&self) -> &BatchContent {
        &self.pending
    }

    fn touch(&mut self, now_monotonic_ns: u64) {
        self.pending_since_monotonic_ns
            .get_or_insert(now_monotonic_ns);
    }

    /// Queues an interval for the next batch (never coarsens: the daemon uses
    /// [`Sealer::push_or_coarsen`]).
    pub fn push_interval(
        &mut self,
        interval: Interval,
        now_monotonic_ns: u64,
    ) -> Result<(), SealError> {
        if self.pending.intervals.len() >= self.policy.max_intervals {
            return Err(SealError::PendingFull(self.pending.intervals.len()));
        }
        self.pending.intervals.push(interval);
        self.touch(now_monotonic_ns);
        Ok(())
    }

    /// Queues a gap not tied to one interval (e.g. the agent was down).
    pub fn push_gap(&mut self, gap: Gap, now_monotonic_ns: u64) {
        self.pending.gaps.push(gap);
        self.touch(now_monotonic_ns);
    }

    /// Queues an interval, or, when the pending batch is already full (the spool refused to take
    /// it: `spool.max_bytes` or ENOSPC), merges it into the last pending interval, which then
    /// covers a longer span at coarser resolution and is marked `coarsened`. Energy is never
    /// dropped; only time resolution is lost while the spool cannot take more. Returns whether
    /// the interval was coarsened.
    pub fn push_or_coarsen(&mut self, interval: Interval, now_monotonic_ns: u64) -> bool {
        if !self.refused && self.pending.intervals.len() < self.policy.max_intervals {
            self.pending.intervals.push(interval);
            self.touch(now_monotonic_ns);
            return false;
        }
        self.coarsen_into_last(interval, now_monotonic_ns)
    }

    /// Merges the pending intervals into coarse ones (after the spool refused them: full), so
    /// that what waits for space, and what a stop must seal into the reserve's room, is as
    /// small as it was when every interval was its own batch. Returns how many were merged.
    fn coarsen_pending(&mut self, now_monotonic_ns: u64) -> usize {
        let intervals = std::mem::take(&mut self.pending.intervals);
        let mut merged = 0;
        for i in intervals {
            if self.pending.intervals.is_empty() {
                self.pending.intervals.push(i);
            } else if self.coarsen_into_last(i, now_monotonic_ns) {
                merged += 1;
            }
        }
        merged
    }

    /// Merges `interval` into the last pending one (with its SPOOL_FULL gap), or starts a new
    /// coarse one when that one is as large as one may grow. Returns whether it was merged.
    fn coarsen_into_last(&mut self, interval: Interval, now_monotonic_ns: u64) -> bool {
        let coarse_max = self.coarse_max();
        let full_enough = self.pending.intervals.last().map_or(true, |last| {
            use prost::Message as _;
            last.coarsened && last.encoded_len() >= coarse_max
        });
        let last = match self.pending.intervals.last_mut() {
            Some(last) if !full_enough => last,
            _ => {
                // The coarse interval is as large as one may grow: start the next one.
                self.pending.intervals.push(interval);
                self.touch(now_monotonic_ns);
                return false;
            }
        };
        crate::records::merge_interval(last, interval);
        // One SPOOL_FULL gap per coarsened stretch, spanning it: the record says when the
        // resolution was lost (its energy is all in the coarsened interval).
        let (start, end) = (last.start_monotonic_ns, last.end_monotonic_ns);
        let (start_unix, end_unix) = (last.start_unix_ns, last.end_unix_ns);
        let cause = wattd_proto::v1::GapCause::SpoolFull as i32;
        match self
            .pending
            .gaps
            .iter_mut()
            .find(|g| g.cause == cause && g.start_monotonic_ns == start)
        {
            Some(g) => {
                g.end_monotonic_ns = end;
                g.end_unix_ns = end_unix;
            }
            None => self.pending.gaps.push(Gap {
                domain: String::new(),
                package: None,
                start_monotonic_ns: start,
                end_monotonic_ns: end,
                start_unix_ns: start_unix,
                end_unix_ns: end_unix,
                cause,
                detail: "spool full: intervals merged into one (coarser time resolution, no \
                         energy lost)"
                    .into(),
            }),
        }
        self.touch(now_monotonic_ns);
        true
    }

    /// Queues a finished run's summary.
    pub fn push_run_summary(&mut self, summary: RunSummary, now_monotonic_ns: u64) {
        self.pending.run_summaries.push(summary);
        self.touch(now_monotonic_ns);
    }

    /// A coarsened interval takes merges until it encodes to this many bytes (or half the
    /// chunk size of a small spool); the next interval then starts a new one, so no interval
    /// outgrows a record.
    pub const COARSE_INTERVAL_MAX_BYTES: usize = 1 << 20;
    /// Pending content that was coarsened is sealed in batches of at most about this size, or
    /// half a segment of a small spool (a record holds 16 MiB).
    pub const CHUNK_MAX_BYTES: usize = 4 << 20;

    fn chunk_max(&self) -> usize {
        let half_segment =
            usize::try_from(self.spool.max_segment_bytes() / 2).unwrap_or(usize::MAX);
        Self::CHUNK_MAX_BYTES.min(half_segment).max(4096)
    }

    fn coarse_max(&self) -> usize {
        Self::COARSE_INTERVAL_MAX_BYTES.min(self.chunk_max() / 2)
    }

    /// How much of the pending content goes into the next batch: (intervals, run summaries).
    /// Everything, when it is one plain interval and not very many summaries; otherwise as
    /// much as fits [`Self::CHUNK_MAX_BYTES`], at least one item.
    fn next_chunk(&self) -> (usize, usize) {
        let p = &self.pending;
        let coarse = p.intervals.iter().any(|i| i.coarsened);
        // Several intervals (sealing by time) are measured too: at 100 Hz with many runs, a
        // minute of them would outgrow a record.
        if !coarse && p.intervals.len() <= 1 && p.run_summaries.len() <= 4096 {
            return (p.intervals.len(), p.run_summaries.len());
        }
        use prost::Message as _;
        let mut budget = self.chunk_max();
        let mut take = |len: usize, first: bool| {
            if first || len <= budget {
                budget = budget.saturating_sub(len);
                true
            } else {
                false
            }
        };
        let mut n_iv = 0;
        for i in &p.intervals {
            if !take(i.encoded_len() + 8, n_iv == 0) {
                return (n_iv, 0);
            }
            n_iv += 1;
        }
        let mut n_rs = 0;
        for r in &p.run_summaries {
            if !take(r.encoded_len() + 8, n_iv == 0 && n_rs == 0) {
                break;
            }
            n_rs += 1;
        }
        (n_iv, n_rs)
    }

    /// Whether the policy says the pending batch should be sealed now.
    pub fn seal_due(&self, now_monotonic_ns: u64) -> bool {
        self.pending.intervals.len() >= self.policy.max_intervals
            || self
                .pending_since_monotonic_ns
                .is_some_and(|t| now_monotonic_ns.saturating_sub(t) >= self.policy.max_age_ns)
    }

    /// Seals the pending content into the next batch and appends it to the spool (not yet
    /// durable: call [`Sealer::commit`]). Returns its seq, or None if nothing was pending. On
    /// error the content stays pending: nothing is lost, the daemon may coarsen and retry.
    ///
    /// Content that a full spool made the daemon coarsen is sealed in several batches of
    /// bounded size (in order; gaps go with the first); if one of them fails, those before it
    /// are appended and the rest stays pending.
    pub fn seal(&mut self, now_unix_ns: i64) -> Result<Option<u64>, SealError> {
        let mut sealed = None;
        while !self.pending.is_empty() {
            let (n_iv, n_rs) = self.next_chunk();
            let all =
                n_iv == self.pending.intervals.len() && n_rs == self.pending.run_summaries.len();
            let seq = self.spool.last_seq() + 1;
            // All of it is moved out and back (sealing must not clone every interval); a part is
            // copied, and the pending content trimmed once it is appended.
            let mut content = if all {
                std::mem::take(&mut self.pending)
            } else {
                BatchContent {
                    intervals: self.pending.intervals[..n_iv].to_vec(),
                    run_summaries: self.pending.run_summaries[..n_rs].to_vec(),
                    gaps: self.pending.gaps.clone(),
                    key_rotation: None,
                    totals: None,
                    run_checkpoint: None,
                    run_counts_since_seq: 0,
                }
            };
            // What the content held before the stamp, to put it back as it was on a failure.
            let unstamped = (
                content.totals.clone(),
                content.run_checkpoint.clone(),
                content.run_counts_since_seq,
            );
            let st = stamp(seq, &mut content, &self.totals, &self.run_totals);
            let (stored, mut content) =
                sign_batch_keeping(&self.key, seq, self.spool.last_hash(), now_unix_ns, content);
            if let Err(e) = self.spool.append(&stored) {
                if all {
                    (
                        content.totals,
                        content.run_checkpoint,
                        content.run_counts_since_seq,
                    ) = unstamped;
                    self.pending = content;
                }
                let e = SealError::from(e);
                if e.is_full() && !self.refused {
                    // From now until a seal goes through, intervals coarsen: those pending first.
                    self.refused = true;
                    let now = self.pending_since_monotonic_ns.unwrap_or(0);
                    self.merged_at_refusal += self.coarsen_pending(now);
                }
                return Err(e);
            }
            self.spool.note_totals(st.totals());
            st.apply(
                seq,
                &content.intervals,
                &content.run_summaries,
                &mut self.totals,
                &mut self.run_totals,
            );
            sealed = Some(seq);
            if !all {
                self.pending.intervals.drain(..n_iv);
                self.pending.run_summaries.drain(..n_rs);
                self.pending.gaps.clear();
            }
        }
        self.pending_since_monotonic_ns = None;
        self.refused = false;
        if let Some(p) = self.next_policy.take() {
            self.policy = p;
        }
        Ok(sealed)
    }

    /// Makes every sealed batch durable (one fdatasync). Returns the sealed seq.
    pub fn commit(&mut self) -> Result<u64, SealError> {
        Ok(self.spool.sync()?)
    }

    /// Rotates to a new key epoch: seals the pending content together with a KeyRotation into
    /// a batch signed by the current key, commits it, then switches to the new key for every
    /// later batch. Returns the announcing batch's seq.
    pub fn rotate_key(&mut self, now_unix_ns: i64) -> Result<u64, SealError> {
        // What is pending (sealing by time: many intervals) goes first, in batches of bounded
        // size; the announcement is a small batch of its own.
        if !self.pending.is_empty() {
            self.seal(now_unix_ns)?;
        }
        let seq = self.spool.last_seq() + 1;
        let (next, rotation) =
            identity::prepare_rotation(&self.dir, &self.key, seq + 1, now_unix_ns)?;
        let mut content = self.pending.clone();
        content.key_rotation = Some(rotation);
        let st = stamp(seq, &mut content, &self.totals, &self.run_totals);
        let stored = sign_batch(&self.key, seq, self.spool.last_hash(), now_unix_ns, content);
        if let Err(e) = self.spool.append_rotation(&stored, next.key_id()) {
            // Not announced: the pending key must go, or a restart could not tell.
            if let Err(abandon) = identity::abandon_rotation(&self.dir) {
                tracing::error!(error = %abandon, "could not drop the unannounced next key");
            }
            return Err(e.into());
        }
        self.spool.note_totals(st.totals());
        st.apply(
            seq,
            &self.pending.intervals,
            &self.pending.run_summaries,
            &mut self.totals,
            &mut self.run_totals,
        );
        self.pending = BatchContent::default();
        self.pending_since_monotonic_ns = None;
        // If this fails the daemon exits; on restart `recover_rotation` sees whether the
        // announcement reached the disk and finishes or abandons the rotation accordingly.
        self.spool.sync()?;
        identity::commit_rotation(&self.dir, &next)?;
        self.key = std::sync::Arc::new(next);
        Ok(seq)
    }
}

/// The per-run totals as of the spool's last batch: its newest checkpoint (at most
/// `RUN_CHECKPOINT_EVERY` batches back) plus the batches after it. Empty when the spool no
/// longer holds them: the runs' counts then start again (with a new `since_seq`).
fn restore_run_totals(spool: &Spool) -> RunTotals {
    use prost::Message as _;
    use wattd_records::totals::RUN_CHECKPOINT_EVERY;
    let last = spool.last_seq();
    let cp_seq = last - last % RUN_CHECKPOINT_EVERY;
    if last == 0 {
        return RunTotals::starting_at(1);
    }
    // What is used when the checkpoint cannot be read back: counts from the next seq on, and
    // every checkpoint says so (`run_counts_since_seq`).
    let fresh = || RunTotals::starting_at(last + 1);
    let from = cp_seq.max(1);
    let Ok(stored) = spool.read_sealed(from, usize::MAX) else {
        return fresh();
    };
    let batches: Vec<wattd_proto::v1::Batch> = stored
        .iter()
        .filter_map(|b| {
            let signed = wattd_proto::v1::SignedBatch::decode(b.bytes.as_slice()).ok()?;
            wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice()).ok()
        })
        .collect();
    // Every batch from the checkpoint (or seq 1) to the last must be readable.
    let contiguous = batches.len() as u64 == last - from + 1
        && batches.first().is_some_and(|b| b.seq == from)
        && batches.last().is_some_and(|b| b.seq == last);
    if !contiguous {
        return fresh();
    }
    if cp_seq == 0 {
        let mut t = RunTotals::starting_at(1);
        for b in &batches {
            t.apply(b.seq, &b.intervals, &b.run_summaries);
        }
        return t;
    }
    batches
        .split_first()
        .and_then(|(cp, rest)| RunTotals::from_checkpoint(cp, rest))
        .unwrap_or_else(fresh)
}
