//! Opening a spool: the directory made or checked, the acknowledgement cursor read, every
//! segment walked and its torn tail cut or quarantined (nothing before it is lost), the chain
//! checked across segments, the reserve file made.

use super::*;

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir`: scans every segment, cuts a torn tail off the
    /// last one (saving the cut bytes beside it), deletes fully acknowledged segments, and
    /// resumes sequence and chain from the last intact record.
    pub fn open(cfg: SpoolConfig) -> Result<(Self, OpenReport), SpoolError> {
        crate::identity::create_data_dir(&cfg.dir)
            .map_err(|e| SpoolError::io(&cfg.dir, io::Error::other(e.to_string())))?;
        let dir = cfg.dir.clone();
        let mut report = OpenReport::default();
        let (acked_seq, ack_warning) = read_ack(&dir)?;
        report.ack_warning = ack_warning;

        let listed = list_segments(&dir)?;
        let mut segments: Vec<Segment> = Vec::new();
        // (seq, hash) of the last intact record, or the resume point a header gives.
        let mut last: Option<(u64, ChainHash)> = None;
        let mut last_rotation = None;
        // The bytes of the record `last` names, if it is a record: its running totals; or,
        // when `last` comes from a segment header, the totals that header carries.
        let mut last_bytes: Option<Vec<u8>> = None;
        let mut header_totals: Option<RunningTotals> = None;
        let count = listed.len();
        for (i, (name_seq, path)) in listed.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let bytes = cfg.fs.read_from_device(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                    SpoolError::io(&path, e)
                }
                _ => SpoolError::SyncFailed {
                    path: path.clone(),
                    source: e,
                },
            })?;
            let scan = scan_segment(bytes);
            match &scan.header {
                Ok(h) if h.node_id != cfg.node_id => {
                    return Err(SpoolError::ForeignSegment {
                        path,
                        found: h.node_id.clone(),
                        expected: cfg.node_id.clone(),
                    })
                }
                Ok(h) if h.first_seq != name_seq => {
                    return Err(SpoolError::Inconsistent {
                        path,
                        detail: format!(
                            "header says first seq {}, name says {name_seq}",
                            h.first_seq
                        ),
                    })
                }
                Ok(h) => {
                    // The header says where the chain stood before this segment: the resume
                    // point when the records before it are gone (acknowledged and deleted).
                    if let Some(before) = h.first_seq.checked_sub(1) {
                        if last.map_or(true, |(s, _)| s < before) {
                            last = Some((before, h.prev_hash));
                            last_bytes = None;
                            header_totals = h.totals.clone();
                        }
                    }
                }
                Err(d) => {
                    let has_records = scan
                        .items
                        .iter()
                        .any(|i| matches!(i, ScanItem::Record { .. }));
                    if is_last && !has_records && d.reaches_end {
                        // A segment whose creation a crash cut short: it never held a record.
                        report
                            .torn_tails
                            .push(quarantine(&cfg, &path, &scan.bytes, 0)?);
                        std::fs::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
                        sync_dir(&cfg, &dir)?;
                        continue;
                    }
                    report.damage.push((path.clone(), d.clone()));
                }
            }
            let mut len = u64::try_from(scan.bytes.len()).unwrap_or(u64::MAX);
            for item in &scan.items {
                match item {
                    ScanItem::Record { offset, payload } => {
                        let bytes = scan.bytes[payload.clone()].to_vec();
                        match StoredBatch::from_bytes(bytes) {
                            Ok((_, h)) if h.node_id != cfg.node_id => {
                                return Err(SpoolError::ForeignSegment {
                                    path,
                                    found: h.node_id,
                                    expected: cfg.node_id.clone(),
                                });
                            }
                            Ok((b, h)) => {
                                if last.is_some_and(|(s, _)| b.seq <= s) {
                                    report.damage.push((
                                        path.clone(),
                                        Damage {
                                            offset: *offset,
                                            len: 0,
                                            reaches_end: false,
                                            detail: format!(
                                                "record seq {} out of order, ignored",
                                                b.seq
                                            ),
                                        },
                                    ));
                                    continue;
                                }
                                report.records += 1;
                                last = Some((b.seq, b.hash));
                                last_bytes = Some(b.bytes);
                                header_totals = None;
                                last_rotation = h
                                    .key_rotation
                                    .and_then(|r| KeyId::try_from(r.new_key_id.as_slice()).ok());
                            }
                            Err(detail) => report.damage.push((
                                path.clone(),
                                Damage {
                                    offset: *offset,
                                    len: 0,
                                    reaches_end: false,
                                    detail: format!("undecodable record: {detail}"),
                                },
                            )),
                        }
                    }
                    ScanItem::Damage(d) if is_last && d.reaches_end => {
                        report
                            .torn_tails
                            .push(quarantine(&cfg, &path, &scan.bytes, d.offset)?);
                        let f = open_rw(&path)?;
                        f.set_len(d.offset).map_err(|e| SpoolError::io(&path, e))?;
                        cfg.fs
                            .sync_data(&f)
                            .map_err(|source| SpoolError::SyncFailed {
                                path: path.clone(),
                                source,
                            })?;
                        len = d.offset;
                    }
                    ScanItem::Damage(d) => report.damage.push((path.clone(), d.clone())),
                }
            }
            let written = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| std::time::SystemTime::now());
            segments.push(Segment {
                first_seq: name_seq,
                path,
                len,
                written,
            });
        }

        let (last_seq, last_hash) =
            match (last, segments.is_empty()) {
                (Some(l), _) => l,
                (None, true) if acked_seq == 0 => (0, GENESIS_HASH),
                (None, true) => {
                    return Err(SpoolError::Inconsistent {
                        path: dir.join(ACK_FILE),
                        detail: format!(
                        "seq {acked_seq} acknowledged but no segment left: the spool was tampered \
                         with; resuming would reuse sequence numbers"
                    ),
                    })
                }
                (None, false) => return Err(SpoolError::Inconsistent {
                    path: segments
                        .last()
                        .map(|s| s.path.clone())
                        .unwrap_or(dir.clone()),
                    detail:
                        "no intact record or segment header: cannot tell where the chain resumes"
                            .into(),
                }),
            };
        if acked_seq > last_seq {
            return Err(SpoolError::Inconsistent {
                path: dir.join(ACK_FILE),
                detail: format!(
                    "seq {acked_seq} acknowledged but the spool ends at seq {last_seq}: an \
                     acknowledged batch was lost; resuming would reuse its sequence number"
                ),
            });
        }

        let active = if segments.is_empty() {
            let (seg, file) = create_segment(&cfg, last_seq + 1, last_hash, None)?;
            segments.push(seg);
            file
        } else {
            let seg = segments.last().map(|s| s.path.clone()).unwrap_or_default();
            let f = open_rw(&seg)?;
            // What we scanned may still sit in the page cache of a process that crashed; make
            // it durable before we treat it as sealed.
            cfg.fs
                .sync_data(&f)
                .map_err(|source| SpoolError::SyncFailed { path: seg, source })?;
            f
        };
        let durable_len = segments.last().map_or(0, |s| s.len);
        let total_bytes = segments.iter().map(|s| s.len).sum();
        report.segments = segments.len();
        let last_totals = match &last_bytes {
            Some(b) => totals_of(b),
            None => header_totals,
        };
        report.acked_seq = acked_seq;
        report.last_seq = last_seq;
        let mut spool = Self {
            cfg,
            segments,
            active,
            durable_len,
            last_seq,
            last_hash,
            synced_seq: last_seq,
            acked_seq,
            total_bytes,
            last_rotation,
            poisoned: false,
            space_short: false,
            final_overrun: false,
            last_totals,
        };
        report.deleted_segments = spool.delete_acknowledged()?;
        // The cursor gets its final length now, while there is room, so that every later
        // acknowledgement is written in place.
        write_ack(&spool.cfg, acked_seq)
            .map_err(|e| SpoolError::io(&spool.cfg.dir.join(ACK_FILE), e.into_io()))?;
        report.reserve = make_reserve(&spool.cfg);
        Ok((spool, report))
    }
}

/// The running totals a SignedBatch's bytes carry.
fn totals_of(signed_batch_bytes: &[u8]) -> Option<RunningTotals> {
    use prost::Message as _;
    let signed = wattd_proto::v1::SignedBatch::decode(signed_batch_bytes).ok()?;
    let batch = wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice()).ok()?;
    wattd_records::totals::RunningTotals::of_batch(&batch)
}

fn read_ack(dir: &Path) -> Result<(u64, Option<String>), SpoolError> {
    let path = dir.join(ACK_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(SpoolError::io(&path, e)),
    };
    let parsed = std::str::from_utf8(&text).ok().and_then(|t| {
        let (seq, crc) = t.trim_end().split_once(' ')?;
        let crc = u32::from_str_radix(crc, 16).ok()?;
        (crc32c::crc32c(seq.as_bytes()) == crc).then_some(())?;
        seq.parse::<u64>().ok()
    });
    Ok(match parsed {
        Some(seq) => (seq, None),
        None => (
            0,
            Some(format!(
                "{}: malformed acknowledged cursor, treated as 0 (unacknowledged batches are re-sent; the ledger dedupes)",
                path.display()
            )),
        ),
    })
}

/// Saves the bytes of a torn tail (from `offset` to the end) beside the segment before they
/// are cut, unless they are all zero (nothing to learn from).
fn quarantine(
    cfg: &SpoolConfig,
    path: &Path,
    bytes: &[u8],
    offset: u64,
) -> Result<TornTail, SpoolError> {
    let start = usize::try_from(offset)
        .unwrap_or(bytes.len())
        .min(bytes.len());
    let tail = &bytes[start..];
    let mut saved_to = None;
    if tail.iter().any(|&b| b != 0) {
        let name = format!(
            "{}.torn-{offset}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("segment")
        );
        durable::write_atomic(&cfg.dir, &name, tail, 0o640, true).map_err(|e| match e {
            AtomicWriteError::Sync(source) => SpoolError::SyncFailed {
                path: cfg.dir.join(&name),
                source,
            },
            e => SpoolError::io(&cfg.dir.join(&name), e.into_io()),
        })?;
        saved_to = Some(cfg.dir.join(name));
    }
    Ok(TornTail {
        file: path.to_owned(),
        offset,
        bytes: u64::try_from(tail.len()).unwrap_or(u64::MAX),
        saved_to,
    })
}
