//! The shipper's tail reader against the spool's own `read_sealed`: the same batches, in the
//! same order, from any starting seq, across segments, after acknowledged segments were deleted
//! under it, with new batches sealed between reads, and with a damaged record in the middle.

use std::fs;

use wattd::spool::{list_segments, SpoolReader};

use crate::records::common::{config, fill, sealer, TestResult};

fn seqs(batches: &[wattd::batch::StoredBatch]) -> Vec<u64> {
    batches.iter().map(|b| b.seq).collect()
}

fn drain(
    r: &mut SpoolReader,
    sealed: u64,
) -> Result<Vec<wattd::batch::StoredBatch>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    while let Some(b) = r.next(sealed)? {
        out.push(b);
    }
    Ok(out)
}

#[test]
fn reads_what_read_sealed_reads_from_every_start_across_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Small segments: about four batches each.
    let mut s = sealer(config(dir.path(), 1 << 10), 1)?;
    let mut index = 0;
    fill(&mut s, &mut index, 30, 1, 3)?;
    assert!(
        list_segments(dir.path())?.len() > 3,
        "the test needs several segments"
    );
    let sealed = s.spool().sealed_seq();
    for from in 1..=sealed + 1 {
        let mut r = SpoolReader::new(dir.path(), from);
        let got = drain(&mut r, sealed)?;
        let want = s.spool().read_sealed(from, usize::MAX)?;
        assert_eq!(got, want, "from seq {from}");
        assert_eq!(r.next_seq(), sealed.max(from - 1) + 1);
    }
    // Never past the sealed bound it is given.
    let mut r = SpoolReader::new(dir.path(), 1);
    assert_eq!(seqs(&drain(&mut r, 7)?), (1..=7).collect::<Vec<_>>());
    assert_eq!(seqs(&drain(&mut r, 9)?), vec![8, 9]);
    Ok(())
}

#[test]
fn follows_the_writer_and_survives_deleted_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut s = sealer(config(dir.path(), 1 << 10), 1)?;
    let mut index = 0;
    let mut r = SpoolReader::new(dir.path(), 1);
    let mut seen = Vec::new();
    for round in 0..12 {
        fill(&mut s, &mut index, 3, 1, 2)?;
        let sealed = s.spool().sealed_seq();
        seen.extend(seqs(&drain(&mut r, sealed)?));
        // Acknowledge all but the last few: whole segments are deleted under the reader.
        if round % 3 == 2 {
            s.spool_mut().ack(sealed.saturating_sub(2))?;
        }
    }
    let sealed = s.spool().sealed_seq();
    assert_eq!(seen, (1..=sealed).collect::<Vec<_>>());
    // A reader started after deletions begins at the first batch still there.
    let first_left = list_segments(dir.path())?[0].0;
    let mut late = SpoolReader::new(dir.path(), 1);
    let got = seqs(&drain(&mut late, sealed)?);
    assert_eq!(got.first().copied(), Some(first_left));
    assert_eq!(got.last().copied(), Some(sealed));
    // Rewind re-reads.
    r.rewind(sealed - 1);
    assert_eq!(seqs(&drain(&mut r, sealed)?), vec![sealed - 1, sealed]);
    Ok(())
}

#[test]
fn skips_a_damaged_record_like_read_sealed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut s = sealer(config(dir.path(), 1 << 20), 1)?;
    let mut index = 0;
    fill(&mut s, &mut index, 6, 1, 2)?;
    let sealed = s.spool().sealed_seq();
    let seg = list_segments(dir.path())?.pop().ok_or("no segment")?.1;
    let mut bytes = fs::read(&seg)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&seg, &bytes)?;
    let want = s.spool().read_sealed(1, usize::MAX)?;
    assert_eq!(want.len() as u64, sealed - 1, "one record is damaged");
    let mut r = SpoolReader::new(dir.path(), 1);
    assert_eq!(drain(&mut r, sealed)?, want);
    Ok(())
}
