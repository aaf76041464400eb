//! Record framing of spool segments, and a scanner that tells intact records from damage and
//! resynchronises after damage.
//!
//! A frame is `magic (4) | payload length u32 LE | CRC32C u32 LE | payload`. The CRC covers the
//! magic, the length and the payload, so a flipped length bit is caught like a flipped payload
//! bit. The magic lets the scanner find the next intact frame after damage without trying every
//! offset, and a zero-filled tail (what some file systems show after a power cut) can never
//! look like a frame.

use std::ops::Range;

/// Magic of a record frame (one `SignedBatch`).
pub const RECORD_MAGIC: [u8; 4] = *b"WREC";
/// Magic of the segment header frame, the first frame of every segment.
pub const SEGMENT_MAGIC: [u8; 4] = *b"WSEG";
pub const FRAME_HEADER_BYTES: usize = 12;
/// Largest record payload accepted. A sealed batch is bounded by the sealing policy far below
/// this; a length above it is damage, not a record.
pub const RECORD_MAX_BYTES: usize = 16 << 20;
/// Version of the segment layout.
pub const SEGMENT_FORMAT: u32 = 1;

fn frame_crc(header8: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header8), payload)
}

pub fn encode_frame(magic: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&magic);
    // Callers bound payloads by RECORD_MAX_BYTES, far below u32::MAX.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    let crc = frame_crc(&out[..8], payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Why the bytes at an offset are not a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a frame header, or than the length announces: a torn write.
    Truncated {
        have: usize,
        need: usize,
    },
    BadMagic,
    BadLength(u32),
    CrcMismatch,
}

impl std::error::Error for FrameError {}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { have, need } => {
                write!(f, "truncated frame ({have} of {need} bytes)")
            }
            Self::BadMagic => f.write_str("no frame magic"),
            Self::BadLength(n) => write!(f, "impossible frame length {n}"),
            Self::CrcMismatch => f.write_str("CRC32C mismatch"),
        }
    }
}

/// Parses the frame at `buf[pos..]`: its payload range and total length.
pub fn parse_frame(
    buf: &[u8],
    pos: usize,
    magic: [u8; 4],
) -> Result<(Range<usize>, usize), FrameError> {
    let rest = buf.get(pos..).unwrap_or_default();
    let avail = rest.len().min(4);
    if rest[..avail] != magic[..avail] {
        return Err(FrameError::BadMagic);
    }
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated {
            have: rest.len(),
            need: FRAME_HEADER_BYTES,
        });
    }
    let len32 = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let len = usize::try_from(len32).unwrap_or(usize::MAX);
    if len == 0 || len > RECORD_MAX_BYTES {
        return Err(FrameError::BadLength(len32));
    }
    let total = FRAME_HEADER_BYTES + len;
    if rest.len() < total {
        return Err(FrameError::Truncated {
            have: rest.len(),
            need: total,
        });
    }
    let crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    if frame_crc(&rest[..8], &rest[FRAME_HEADER_BYTES..total]) != crc {
        return Err(FrameError::CrcMismatch);
    }
    Ok((pos + FRAME_HEADER_BYTES..pos + total, total))
}

/// The first frame of a segment: whose it is and where its sequence starts, so that a segment
/// alone (even with all records acknowledged and its predecessors deleted) says where the
/// chain resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub node_id: String,
    /// seq of the first record this segment was created for.
    pub first_seq: u64,
    /// Chain hash of the record before `first_seq` (zeros for seq 1).
    pub prev_hash: [u8; 32],
    /// The running totals of the record before `first_seq`, so that a spool whose earlier
    /// segments were all acknowledged and freed still continues them at open. Written after
    /// the node id (readers that predate it ignore the trailing bytes).
    pub totals: Option<crate::totals::RunningTotals>,
}

const NODE_ID_MAX_BYTES: usize = 1024;

impl SegmentHeader {
    pub fn encode(&self) -> Vec<u8> {
        let node = self.node_id.as_bytes();
        let node = &node[..node.len().min(NODE_ID_MAX_BYTES)];
        let mut p = Vec::with_capacity(4 + 8 + 32 + 2 + node.len());
        p.extend_from_slice(&SEGMENT_FORMAT.to_le_bytes());
        p.extend_from_slice(&self.first_seq.to_le_bytes());
        p.extend_from_slice(&self.prev_hash);
        // NODE_ID_MAX_BYTES fits u16.
        p.extend_from_slice(&u16::try_from(node.len()).unwrap_or(0).to_le_bytes());
        p.extend_from_slice(node);
        if let Some(t) = &self.totals {
            use prost::Message as _;
            let mut carrier = wattd_proto::v1::Batch::default();
            t.write_into(&mut carrier);
            p.extend_from_slice(&carrier.encode_to_vec());
        }
        encode_frame(SEGMENT_MAGIC, &p)
    }

    fn decode_payload(p: &[u8]) -> Result<Self, String> {
        let fixed = 4 + 8 + 32 + 2;
        if p.len() < fixed {
            return Err(format!("segment header payload of {} bytes", p.len()));
        }
        let format = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        if format != SEGMENT_FORMAT {
            return Err(format!("unknown segment format {format}"));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&p[4..12]);
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&p[12..44]);
        let n = usize::from(u16::from_le_bytes([p[44], p[45]]));
        let node = p
            .get(fixed..fixed + n)
            .ok_or("segment header node id past its end")?;
        let node_id = String::from_utf8(node.to_vec()).map_err(|_| "node id not UTF-8")?;
        let rest = p.get(fixed + n..).unwrap_or_default();
        let totals = if rest.is_empty() {
            None
        } else {
            use prost::Message as _;
            let carrier = wattd_proto::v1::Batch::decode(rest)
                .map_err(|e| format!("segment header totals: {e}"))?;
            crate::totals::RunningTotals::of_batch(&carrier)
        };
        Ok(Self {
            node_id,
            first_seq: u64::from_le_bytes(seq),
            prev_hash,
            totals,
        })
    }
}

/// A stretch of a segment that is not an intact frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub len: u64,
    /// The damage runs to the end of the file: a torn tail if this is the segment being
    /// written, since nothing intact follows.
    pub reaches_end: bool,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanItem {
    /// An intact record frame: `payload` indexes the scanned bytes.
    Record {
        offset: u64,
        payload: Range<usize>,
    },
    Damage(Damage),
}

#[derive(Debug)]
pub struct SegmentScan {
    pub bytes: Vec<u8>,
    pub header: Result<SegmentHeader, Damage>,
    /// Byte length of the intact header (0 if damaged).
    pub header_len: usize,
    pub items: Vec<ScanItem>,
}

/// The next offset after `from` where an intact record frame starts.
fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let mut pos = from;
    while pos + 4 <= buf.len() {
        let hit = buf[pos..].windows(4).position(|w| w == RECORD_MAGIC)?;
        let at = pos + hit;
        if parse_frame(buf, at, RECORD_MAGIC).is_ok() {
            return Some(at);
        }
        pos = at + 1;
    }
    None
}

fn describe_damage(buf: &[u8], start: usize, end: usize, err: &FrameError) -> String {
    let span = &buf[start..end];
    if span.iter().all(|&b| b == 0) {
        format!("{} zero bytes ({err})", span.len())
    } else {
        format!("{} bytes not a valid record ({err})", span.len())
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Scans a whole segment: the header, then every intact record and every damaged stretch in
/// file order. Never panics, whatever the bytes.
pub fn scan_segment(bytes: Vec<u8>) -> SegmentScan {
    let mut items = Vec::new();
    let (header, mut pos) = match parse_frame(&bytes, 0, SEGMENT_MAGIC) {
        Ok((payload, total)) => match SegmentHeader::decode_payload(&bytes[payload]) {
            Ok(h) => (Ok(h), total),
            Err(detail) => (
                Err(Damage {
                    offset: 0,
                    len: as_u64(total),
                    reaches_end: total == bytes.len(),
                    detail: format!("segment header: {detail}"),
                }),
                total,
            ),
        },
        Err(e) => {
            let next = resync(&bytes, 0).unwrap_or(bytes.len());
            (
                Err(Damage {
                    offset: 0,
                    len: as_u64(next),
                    reaches_end: next == bytes.len(),
                    detail: format!("segment header: {}", describe_damage(&bytes, 0, next, &e)),
                }),
                next,
            )
        }
    };
    let header_len = if header.is_ok() { pos } else { 0 };
    while pos < bytes.len() {
        match parse_frame(&bytes, pos, RECORD_MAGIC) {
            Ok((payload, total)) => {
                items.push(ScanItem::Record {
                    offset: as_u64(pos),
                    payload,
                });
                pos += total;
            }
            Err(e) => {
                let next = resync(&bytes, pos + 1).unwrap_or(bytes.len());
                items.push(ScanItem::Damage(Damage {
                    offset: as_u64(pos),
                    len: as_u64(next - pos),
                    reaches_end: next == bytes.len(),
                    detail: describe_damage(&bytes, pos, next, &e),
                }));
                pos = next;
            }
        }
    }
    SegmentScan {
        bytes,
        header,
        header_len,
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[&[u8]]) -> Vec<u8> {
        let mut b = SegmentHeader {
            node_id: "n".into(),
            first_seq: 1,
            prev_hash: [0; 32],
            totals: None,
        }
        .encode();
        for r in records {
            b.extend(encode_frame(RECORD_MAGIC, r));
        }
        b
    }

    #[test]
    fn a_header_carries_the_running_totals_and_one_without_them_still_reads() {
        let t = crate::totals::RunningTotals::starting_at(3).after(&[wattd_proto::v1::Interval {
            domains: vec![wattd_proto::v1::DomainEnergy {
                domain: "package".into(),
                package: Some(1),
                measured_uj: 77,
                ..Default::default()
            }],
            ..Default::default()
        }]);
        for totals in [None, Some(t)] {
            let h = SegmentHeader {
                node_id: "node-x".into(),
                first_seq: 9,
                prev_hash: [4; 32],
                totals: totals.clone(),
            };
            let s = scan_segment(h.encode());
            assert_eq!(s.header.as_ref().ok(), Some(&h));
        }
    }

    #[test]
    fn intact_segment_scans_clean() {
        let s = scan_segment(segment(&[b"one", b"two"]));
        assert!(s.header.is_ok());
        assert_eq!(s.items.len(), 2);
        assert!(s.items.iter().all(|i| matches!(i, ScanItem::Record { .. })));
    }

    #[test]
    fn zero_tail_and_torn_tail_are_damage_reaching_the_end() {
        let mut b = segment(&[b"one"]);
        b.extend([0u8; 40]);
        let s = scan_segment(b);
        assert!(
            matches!(&s.items[1], ScanItem::Damage(d) if d.reaches_end && d.detail.contains("zero"))
        );

        let mut b = segment(&[b"one", b"two"]);
        b.truncate(b.len() - 1);
        let s = scan_segment(b);
        assert!(matches!(&s.items[1], ScanItem::Damage(d) if d.reaches_end));
    }

    #[test]
    fn flipped_bit_in_the_middle_resyncs_to_the_next_record() {
        let mut b = segment(&[b"one", b"two", b"three"]);
        let first_record = b.len() - 3 * FRAME_HEADER_BYTES - 11;
        b[first_record + 13] ^= 0x10; // inside "one"'s payload
        let s = scan_segment(b);
        let kinds: Vec<bool> = s
            .items
            .iter()
            .map(|i| matches!(i, ScanItem::Record { .. }))
            .collect();
        assert_eq!(kinds, vec![false, true, true]);
        assert!(
            matches!(&s.items[0], ScanItem::Damage(d) if !d.reaches_end && d.detail.contains("CRC"))
        );
    }
}
