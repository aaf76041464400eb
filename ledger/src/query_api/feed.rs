//! The Changes stream: its cursor (each node's last seq sent), the feed that walks the stored
//! batches after it and sends what the caller's role may see, with audit checkpoints and a
//! bounded buffer, and the deterministic id of each change.

use super::*;

/// Why a Changes cursor is refused (the reader's own text, never trusted).
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("cursor is {bytes} bytes, more than {CURSOR_MAX_BYTES}")]
    TooLong { bytes: usize },
    #[error("cursor does not start with \"v1.\": not a cursor of this ledger")]
    NotThisLedgers,
    #[error("cursor is not hex")]
    NotHex,
    #[error("cursor does not decode: {0}")]
    Decode(prost::DecodeError),
    #[error("cursor names node {node:?} at seq {seq} (empty, zero or twice)")]
    BadPosition { node: String, seq: u64 },
}

/// The Changes cursor: each node's highest seq whose changes were sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor(BTreeMap<String, u64>);

impl Cursor {
    /// `v1.` and the hex of an encoded [`ChangeCursor`]; "" is the beginning.
    pub fn parse(s: &str) -> Result<Cursor, CursorError> {
        if s.is_empty() {
            return Ok(Cursor::default());
        }
        if s.len() > CURSOR_MAX_BYTES {
            return Err(CursorError::TooLong { bytes: s.len() });
        }
        let hex = s.strip_prefix("v1.").ok_or(CursorError::NotThisLedgers)?;
        if hex.len() % 2 != 0 {
            return Err(CursorError::NotHex);
        }
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        let bytes = bytes.ok_or(CursorError::NotHex)?;
        let decoded = ChangeCursor::decode(bytes.as_slice()).map_err(CursorError::Decode)?;
        let mut map = BTreeMap::new();
        for p in decoded.positions {
            if p.node_id.is_empty() || p.seq == 0 || map.insert(p.node_id.clone(), p.seq).is_some()
            {
                return Err(CursorError::BadPosition {
                    node: p.node_id,
                    seq: p.seq,
                });
            }
        }
        Ok(Cursor(map))
    }

    pub fn text(&self) -> String {
        let msg = ChangeCursor {
            positions: self
                .0
                .iter()
                .map(|(n, s)| CursorPosition {
                    node_id: n.clone(),
                    seq: *s,
                })
                .collect(),
        };
        format!("v1.{}", wattd_records::durable::hex(&msg.encode_to_vec()))
    }

    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Marks `node`'s batches up to `seq` as sent.
    pub fn set(&mut self, node: &str, seq: u64) {
        self.0.insert(node.to_owned(), seq);
    }

    /// A position the ledger does not hold: a cursor from another ledger, or from before this
    /// one was restored from an older backup. Resuming from it would skip whatever is
    /// committed up to it again.
    pub fn ahead_of(&self, heads: &[(String, u64)]) -> Option<String> {
        let heads: HashMap<&str, u64> = heads.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        self.0.iter().find_map(|(node, &seq)| {
            let have = heads.get(node.as_str()).copied().unwrap_or(0);
            (seq > have).then(|| {
                format!(
                    "cursor is at node {node:?} seq {seq}, but this ledger holds that node only \
                     up to seq {have}: a cursor of another ledger, or this one restored from an \
                     older backup; nothing after it can be resumed safely"
                )
            })
        })
    }
}

/// The deterministic id of one change: hex SHA-256 of the tag, node, seq, run and domain, each
/// followed by a 0 byte.
pub fn change_id(node: &str, seq: u64, run: &str, domain: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in ["wattd.change.v1", node, &seq.to_string(), run, domain] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    wattd_records::durable::hex(&h.finalize())
}

/// The window of a stored batch: its first interval's start and its last interval's end.
fn window(signed_batch: &[u8]) -> (i64, i64) {
    let batch = wattd_proto::v1::SignedBatch::decode(signed_batch)
        .ok()
        .and_then(|s| wattd_proto::v1::Batch::decode(s.batch_bytes.as_slice()).ok());
    match batch {
        Some(b) => (
            b.intervals.first().map_or(0, |i| i.start_unix_ns),
            b.intervals
                .last()
                .map_or(b.sealed_unix_ns, |i| i.end_unix_ns),
        ),
        None => (0, 0),
    }
}

/// One Changes stream's producer.
pub(super) struct Feed<S: Store> {
    pub(super) store: Arc<S>,
    pub(super) account_label: String,
    pub(super) role: Role,
    /// Re-read every round: a reader removed from the file, or given another role, loses its
    /// open streams.
    pub(super) readers: Arc<ReadersFile>,
    pub(super) caller: Caller,
    pub(super) filters: String,
    pub(super) cursor: Cursor,
    pub(super) follow: bool,
    pub(super) keepalive: Duration,
    pub(super) tx: mpsc::Sender<Result<ChangesResponse, Status>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// Changes sent, and sent since the last audit checkpoint.
    pub(super) sent: u64,
    pub(super) unaudited: u64,
}

/// Why a feed ended.
type Ended = String;

impl<S: Store> Feed<S> {
    /// Streams until the present (or, following, until the consumer leaves or the ledger
    /// stops); returns the changes sent since the last audit checkpoint and why it ended.
    pub(super) async fn run(mut self) -> (u64, String) {
        let outcome = match self.pump().await {
            Ok(()) => "at the present".to_string(),
            Err(why) => why,
        };
        (
            self.unaudited,
            format!("{outcome} ({} changes in all)", self.sent),
        )
    }

    async fn send(&mut self, msg: Result<ChangesResponse, Status>) -> Result<(), Ended> {
        let mut stop = self.shutdown.clone();
        tokio::select! {
            r = tokio::time::timeout(STALLED_CONSUMER, self.tx.send(msg)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err("consumer gone".into()),
                Err(_) => {
                    self.metrics.inc(&self.metrics.changes_stalled);
                    Err(format!(
                        "consumer took no message for {} s: dropped",
                        STALLED_CONSUMER.as_secs()
                    ))
                }
            },
            _ = stop.wait_for(|s| *s) => Err("ledger shutting down".into()),
        }
    }

    async fn fail(&mut self, e: &StoreError) -> Ended {
        let _ = self.send(Err(store_status(e))).await;
        format!("store: {e}")
    }

    /// Ends the stream with `code` and `reason`.
    async fn end(&mut self, code: Code, reason: &'static str, why: String) -> Ended {
        let _ = self.send(Err(status(code, reason, why.clone()))).await;
        why
    }

    /// The cursor as sent: refused past the size a resume would accept.
    async fn cursor_text(&mut self) -> Result<String, Ended> {
        let text = self.cursor.text();
        if text.len() > CURSOR_MAX_BYTES {
            let why = format!(
                "the cursor would be {} bytes, more than the {CURSOR_MAX_BYTES} a resume accepts",
                text.len()
            );
            return Err(self
                .end(Code::ResourceExhausted, "cursor_too_large", why)
                .await);
        }
        Ok(text)
    }

    /// The reader still has the role the stream was opened with.
    async fn still_allowed(&mut self) -> Result<(), Ended> {
        let now = self.readers.current().role(&self.caller.reader).cloned();
        if now.as_ref() == Some(&self.role) {
            return Ok(());
        }
        let why = format!(
            "reader {:?} is no longer {} in the readers file",
            self.caller.reader,
            self.role.text()
        );
        Err(self.end(Code::PermissionDenied, "revoked", why).await)
    }

    /// One audit row for what was sent since the last; the stream ends if it cannot be written.
    async fn checkpoint(&mut self) -> Result<(), Ended> {
        let row = ReadAudit {
            at_unix_ns: crate::unix_now_ns(),
            reader: self.caller.reader.clone(),
            role: self.caller.role_text(),
            call: "Changes".into(),
            filters: self.filters.clone(),
            rows: self.unaudited,
            outcome: "ok: streaming".into(),
        };
        match self.store.record_read(row).await {
            Ok(()) => {
                self.unaudited = 0;
                Ok(())
            }
            Err(e) => {
                let why = format!("the read cannot be audited, so it is not continued: {e}");
                Err(self.end(Code::Unavailable, "audit", why).await)
            }
        }
    }

    async fn pump(&mut self) -> Result<(), Ended> {
        let mut last_message = Instant::now();
        let mut last_audit = Instant::now();
        let mut announced = self.cursor.text();
        loop {
            if *self.shutdown.borrow() {
                let why = "the ledger is shutting down; resume from the last cursor".to_string();
                return Err(self.end(Code::Unavailable, "shutting_down", why).await);
            }
            if self.tx.is_closed() {
                return Err("consumer gone".into());
            }
            self.still_allowed().await?;
            if last_audit.elapsed() >= AUDIT_EVERY {
                self.checkpoint().await?;
                last_audit = Instant::now();
            }
            let heads = match self.store.heads().await {
                Ok(h) => h,
                Err(e) => return Err(self.fail(&e).await),
            };
            let mut progressed = false;
            for (node, head) in heads {
                let from = self.cursor.get(&node);
                if head <= from {
                    continue;
                }
                let page = match self
                    .store
                    .batch_energy(&node, from, PAGE, &self.account_label)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => return Err(self.fail(&e).await),
                };
                for b in page {
                    let changes = match batch_changes(&b, &self.role) {
                        Ok(c) => c,
                        Err(e) => {
                            return Err(self
                                .end(Code::Internal, "total_above_u64", e.to_string())
                                .await)
                        }
                    };
                    self.cursor.set(&node, b.seq);
                    progressed = true;
                    if changes.is_empty() {
                        continue;
                    }
                    let n = changes.len() as u64;
                    let cursor = self.cursor_text().await?;
                    self.send(Ok(ChangesResponse {
                        changes,
                        cursor: cursor.clone(),
                    }))
                    .await?;
                    self.sent += n;
                    self.unaudited += n;
                    self.metrics.add(&self.metrics.changes_sent, n);
                    announced = cursor;
                    last_message = Instant::now();
                }
            }
            // Batches this reader may not see still move the cursor: say so (when caught up,
            // or at the keep-alive while catching up), so that a resume does not read them again.
            let caught_up = !progressed;
            let due = last_message.elapsed() >= self.keepalive;
            if caught_up || due {
                let now = self.cursor_text().await?;
                if now != announced || (self.follow && due) {
                    self.send(Ok(ChangesResponse {
                        changes: Vec::new(),
                        cursor: now.clone(),
                    }))
                    .await?;
                    announced = now;
                    last_message = Instant::now();
                }
            }
            if !caught_up {
                continue;
            }
            if !self.follow {
                return Ok(());
            }
            // Wait for a commit here (the counter moves), another process's (asked every
            // POLL_STORE), the keep-alive, the ledger stopping or the consumer leaving.
            let stored = self.metrics.stored_now();
            let idle_since = Instant::now();
            loop {
                let mut stop = self.shutdown.clone();
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    _ = stop.wait_for(|s| *s) => break,
                    () = self.tx.closed() => return Err("consumer gone".into()),
                }
                if self.metrics.stored_now() != stored
                    || idle_since.elapsed() >= POLL_STORE
                    || last_message.elapsed() >= self.keepalive
                {
                    break;
                }
            }
        }
    }
}

/// A run's energy in one domain of one batch that does not fit the feed's 64-bit field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node {node:?} seq {seq} run {run:?} {domain}: {uj} uJ in one batch does not fit 64 bits")]
pub struct ChangeTooLarge {
    pub node: String,
    pub seq: u64,
    pub run: String,
    pub domain: String,
    pub uj: u128,
}

/// The changes of one stored batch that `role` may see: per run and domain, its billed
/// allocations summed, with the deterministic id and the batch's window, hash and key.
pub fn batch_changes(b: &BatchEnergy, role: &Role) -> Result<Vec<Change>, ChangeTooLarge> {
    // (run, domain) -> (uJ, the run's account as read with the batch).
    let mut sums: BTreeMap<(&str, &str), (u128, Option<&String>)> = BTreeMap::new();
    for a in &b.allocations {
        let e = sums.entry((&a.run_id, &a.domain)).or_default();
        e.0 += u128::from(a.energy_uj);
        e.1 = a.account.as_ref();
    }
    let (start, end) = window(&b.signed_batch);
    let mut out = Vec::new();
    for ((run, domain), (uj, account)) in sums {
        if !role.sees(account.map(String::as_str)) {
            continue;
        }
        let energy_uj = u64::try_from(uj).map_err(|_| ChangeTooLarge {
            node: b.node_id.clone(),
            seq: b.seq,
            run: run.to_owned(),
            domain: domain.to_owned(),
            uj,
        })?;
        out.push(Change {
            id: change_id(&b.node_id, b.seq, run, domain),
            node_id: b.node_id.clone(),
            seq: b.seq,
            run_id: run.to_owned(),
            account: account.cloned().unwrap_or_default(),
            domain: domain.to_owned(),
            energy_uj,
            energy_wh: wh_text(uj),
            window_start_unix_ns: start,
            window_end_unix_ns: end,
            batch_hash: b.hash.to_vec(),
            key_epoch: b.key_epoch,
            key_id: b.key_id.to_vec(),
        });
    }
    Ok(out)
}
