//! Reopening the log: entries, vote, purge and commit points survive; a torn tail is cut
//! off, any other damage is an error.

use std::io::Write;

use flynn_discoverd::store::{Command, LogStore, TypeConfig};
use openraft::alias::{EntryOf, LogIdOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, RaftLogReader};

type C = TypeConfig;

fn log_id(term: u64, index: u64) -> LogIdOf<C> {
    LogIdOf::<C>::new(
        openraft::impls::leader_id_adv::LeaderId::<u64, u64>::new(term, 1).to_committed(),
        index,
    )
}

fn entry(term: u64, index: u64) -> EntryOf<C> {
    EntryOf::<C>::new(
        log_id(term, index),
        EntryPayload::Normal(Command::RemoveService {
            service: format!("s{index}"),
        }),
    )
}

/// An entry whose record is about `size` bytes.
fn big_entry(term: u64, index: u64, size: usize) -> EntryOf<C> {
    EntryOf::<C>::new(
        log_id(term, index),
        EntryPayload::Normal(Command::RemoveService {
            service: format!("s{index}-{}", "x".repeat(size)),
        }),
    )
}

async fn append(log: &mut LogStore, entries: Vec<EntryOf<C>>) {
    let (tx, rx) = C::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

/// The log's segment files, in index order.
fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs
}

async fn indexes(log: &mut LogStore) -> Vec<u64> {
    log.try_get_log_entries(0..u64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.index())
        .collect()
}

#[tokio::test]
async fn entries_survive_reopen_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=10).map(|i| entry(1, i)).collect()).await;
        log.truncate_after(Some(log_id(1, 6))).await.unwrap();
        append(&mut log, (7..=8).map(|i| entry(2, i)).collect()).await;
        log.purge(log_id(1, 2)).await.unwrap();
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![3, 4, 5, 6, 7, 8]);
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(st.last_log_id, Some(log_id(2, 8)));
}

#[tokio::test]
async fn torn_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    }
    let seg = segments(dir.path()).remove(0);
    // A half-written record: a header promising more bytes than follow.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']).unwrap();
    drop(f);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
    append(&mut log, vec![entry(1, 4)]).await;
    drop(log);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4]);
}

/// A flipped byte in a record of the last segment is corruption, not a torn write (no
/// zeros where the record should be): opening fails, naming the file and the offset,
/// and nothing is cut (the fsynced, acknowledged entries after it used to be deleted).
#[tokio::test]
async fn corrupt_middle_record_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    }
    let seg = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[12] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let err = LogStore::open(dir.path())
        .err()
        .expect("a corrupt log opened");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let msg = err.to_string();
    assert!(msg.contains(&seg.display().to_string()), "{msg}");
    assert!(msg.contains("checksum mismatch at offset 0"), "{msg}");
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "the segment was changed"
    );
    // The same in the middle of the segment.
    bytes[12] ^= 0xff;
    let second = 8 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    bytes[second + 12] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let msg = LogStore::open(dir.path())
        .err()
        .expect("opened")
        .to_string();
    assert!(msg.contains(&format!("at offset {second}")), "{msg}");
    assert!(!dir.path().join(format!("{}.torn", seg.display())).exists());
}

/// The offset and length of each record of a segment (`len | crc | payload`).
fn records(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        out.push((at, 8 + len));
        at += 8 + len;
    }
    out
}

/// A crash while the last record was written left one of its sectors unwritten (zeros,
/// as the segment is zero-filled ahead): that record is torn and cut, the ones before it
/// stay, and the cut bytes are kept in `<segment>.torn`.
#[tokio::test]
async fn a_record_with_a_zero_sector_is_torn_and_only_it_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
        append(&mut log, vec![big_entry(1, 4, 3000)]).await;
    }
    let seg = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let recs = records(&bytes);
    assert_eq!(recs.len(), 4);
    let (at, len) = recs[3];
    let end = at + len;
    // The record's part of the last 512-byte sector it reaches.
    let sector = (end - 1) / 512 * 512;
    assert!(sector > at, "the record spans sectors");
    let cut = bytes[at..].to_vec();
    bytes[sector..end].fill(0);
    let torn = bytes[at..].to_vec();
    std::fs::write(&seg, &bytes).unwrap();

    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), at as u64);
    let kept = std::fs::read(format!("{}.torn", seg.display())).unwrap();
    // Up to the last non-zero byte: not the preallocated zeros after the record (~1 MiB,
    // which every copy used to carry).
    let nonzero = torn.iter().rposition(|b| *b != 0).unwrap() + 1;
    assert!(torn.len() > 1000 << 10, "{}", torn.len());
    assert_eq!(kept.len(), nonzero, "the copy has the zero tail");
    assert!(kept == torn[..nonzero], "the copy is not the torn bytes");
    // The record's zeroed last sector is part of the zeros dropped.
    assert!(nonzero <= sector - at && cut[..nonzero] == kept[..]);
    // The log goes on from there.
    append(&mut log, vec![entry(2, 4)]).await;
    drop(log);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4]);
}

/// A crash before the file's new size reached the disk: the last record runs past the
/// end of the file and is cut.
#[tokio::test]
async fn a_record_running_past_the_end_of_the_file_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=4).map(|i| entry(1, i)).collect()).await;
    }
    let seg = segments(dir.path()).remove(0);
    let bytes = std::fs::read(&seg).unwrap();
    let (at, len) = records(&bytes)[3];
    std::fs::write(&seg, &bytes[..at + len / 2]).unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
    let kept = std::fs::read(format!("{}.torn", seg.display())).unwrap();
    assert_eq!(kept, bytes[at..at + len / 2]);
    drop(log);
    // A second cut of the same segment keeps the first one's bytes.
    std::fs::write(&seg, &bytes[..records(&bytes)[2].0 + 3]).unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2]);
    assert!(std::path::Path::new(&format!("{}.torn.1", seg.display())).exists());
}

/// The copy of a torn tail is for a later look only (the torn bytes were never
/// acknowledged): when it cannot be written the cut goes ahead and the log opens. Here
/// every name a copy may take (`.torn`, `.torn.1` to `.torn.3`) is taken by a directory
/// left by earlier cuts: no fifth copy is made (a segment torn again and again no longer
/// fills the directory), and the open still succeeds with the cut.
#[tokio::test]
async fn a_torn_tail_is_cut_when_its_copy_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=4).map(|i| entry(1, i)).collect()).await;
    }
    let seg = segments(dir.path()).remove(0);
    let names = [".torn", ".torn.1", ".torn.2", ".torn.3", ".torn.4"]
        .map(|n| std::path::PathBuf::from(format!("{}{n}", seg.display())));
    for taken in &names[..4] {
        std::fs::create_dir_all(taken.join("x")).unwrap();
    }
    let bytes = std::fs::read(&seg).unwrap();
    let (at, len) = records(&bytes)[3];
    std::fs::write(&seg, &bytes[..at + len / 2]).unwrap();
    let mut log = LogStore::open(dir.path()).expect("open with a copy that fails");
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), at as u64);
    assert!(!names[4].exists(), "a fifth copy was made");
    append(&mut log, vec![entry(2, 4)]).await;
    drop(log);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4]);
}

/// A segment's torn-tail copies go with it when a purge removes it.
#[tokio::test]
async fn a_purged_segment_takes_its_torn_copies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=4).map(|i| entry(1, i)).collect()).await;
    }
    let seg = segments(dir.path()).remove(0);
    let bytes = std::fs::read(&seg).unwrap();
    let (at, len) = records(&bytes)[3];
    std::fs::write(&seg, &bytes[..at + len / 2]).unwrap();
    let torn = std::path::PathBuf::from(format!("{}.torn", seg.display()));
    let mut log = LogStore::open(dir.path()).unwrap();
    assert!(torn.exists());
    // Past the segment's end: the segment goes, a new one takes the next entries.
    log.purge(log_id(1, 3)).await.unwrap();
    append(&mut log, vec![entry(1, 4)]).await;
    assert!(!seg.exists(), "the segment was not purged");
    assert!(!torn.exists(), "the purged segment's torn copy stayed");
}

#[tokio::test]
async fn commit_point_survives_reopen_and_a_torn_record_reads_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        // Commit points within the log (one ahead of it is clamped on open, see below).
        append(&mut log, (1..=10).map(|i| entry(1, i)).collect()).await;
        log.save_committed(Some(log_id(3, 12345))).await.unwrap();
        // A shorter record overwrites a longer one in place.
        log.save_committed(Some(log_id(1, 7))).await.unwrap();
    }
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 7)));
        log.save_committed(None).await.unwrap();
    }
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
        log.save_committed(Some(log_id(2, 9))).await.unwrap();
    }
    // A torn write: the payload no longer matches its checksum.
    let path = dir.path().join("committed");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), None);
}

/// `save_committed` leaves the point to the log writer, which writes it after its next
/// batch or, with no write after it (a quiet cluster), after a short idle time: a node
/// killed outright (no destructor runs) still finds it on disk.
#[tokio::test]
async fn a_commit_point_reaches_the_disk_without_a_drop_or_a_later_write() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    append(&mut log, (1..=5).map(|i| entry(1, i)).collect()).await;
    log.save_committed(Some(log_id(1, 4))).await.unwrap();
    // What a SIGKILL would leave: the files as they are, the live store not dropped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let copy = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
        }
        let got = LogStore::open(copy.path())
            .unwrap()
            .read_committed()
            .await
            .unwrap();
        if got == Some(log_id(1, 4)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "commit point not on disk: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(log);
}

#[tokio::test]
async fn preallocated_segment_tail_is_not_a_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    }
    let seg = segments(dir.path()).remove(0);
    let bytes = std::fs::read(&seg).unwrap();
    assert!(bytes.len() >= 1 << 20, "segment zero-filled ahead");
    assert_eq!(*bytes.last().unwrap(), 0);
    {
        // Appends after a reopen go right after the last record, not after the zeros.
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
        append(&mut log, (4..=5).map(|i| entry(1, i)).collect()).await;
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(std::fs::read(&seg).unwrap().len(), bytes.len());
}

#[tokio::test]
async fn closed_segment_keeps_no_preallocated_tail() {
    let dir = tempfile::tempdir().unwrap();
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        // Past 16 MiB a segment is closed and the next entry starts a new one.
        for i in 1..=9 {
            append(&mut log, vec![big_entry(1, i, 2 << 20)]).await;
        }
        append(&mut log, vec![entry(1, 10)]).await;
    }
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 2);
    let first = std::fs::read(&segs[0]).unwrap();
    let recs = records(&first);
    let (at, len) = recs[recs.len() - 1];
    assert_eq!(first.len(), at + len, "no zero tail");
    assert!(size(&segs[1]) >= 1 << 20);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, (1..=10).collect::<Vec<_>>());
}

/// After a snapshot (the log purged past its last entry) the log goes on after the purge
/// point in a new segment, closing the old one.
#[tokio::test]
async fn the_log_goes_on_after_a_purge_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
        log.purge(log_id(1, 6)).await.unwrap();
        append(&mut log, (7..=8).map(|i| entry(1, i)).collect()).await;
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![7, 8]);
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 6)));
    assert_eq!(st.last_log_id, Some(log_id(1, 8)));
}

/// An append that does not follow the log's last entry (a hole) or the purge point, or
/// that overwrites entries without a truncation, is refused and changes nothing.
#[tokio::test]
async fn an_append_that_would_leave_a_hole_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    append(&mut log, (1..=10).map(|i| entry(1, i)).collect()).await;
    for bad in [vec![11, 13], vec![12], vec![10], vec![5, 6]] {
        let (tx, _rx) = C::oneshot();
        let entries = bad.iter().map(|i| entry(2, *i)).collect::<Vec<_>>();
        let err = log
            .append(entries, IOFlushed::signal(tx))
            .await
            .expect_err(&format!("{bad:?} appended after 10"));
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
    }
    assert_eq!(indexes(&mut log).await, (1..=10).collect::<Vec<_>>());
    // After a purge past the end the log goes on right after the purge point only.
    log.purge(log_id(1, 20)).await.unwrap();
    let (tx, _rx) = C::oneshot();
    assert!(log
        .append(vec![entry(2, 11)], IOFlushed::signal(tx))
        .await
        .is_err());
    append(&mut log, vec![entry(2, 21)]).await;
    drop(log);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![21]);
}

/// A log whose segments leave a hole above the purge point does not open.
#[tokio::test]
async fn a_hole_between_segments_is_an_error_at_open() {
    use flynn_discoverd::store::log::encode;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    }
    // A segment of its own for entries 6 and 7 (4 and 5 missing).
    let recs: Vec<u8> = (6..=7)
        .flat_map(|i| encode(&entry(1, i)).unwrap())
        .collect();
    std::fs::write(dir.path().join(format!("{:020}.seg", 6)), recs).unwrap();
    let err = LogStore::open(dir.path())
        .err()
        .expect("a log with a hole opened");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("hole"), "{err}");
    // Purged up to 5, the same files are a log of 6 and 7.
    std::fs::write(
        dir.path().join("purged.json"),
        serde_json::to_vec(&log_id(1, 5)).unwrap(),
    )
    .unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![6, 7]);
    drop(log);
    // A first entry past the purge point is a hole too.
    std::fs::write(
        dir.path().join("purged.json"),
        serde_json::to_vec(&log_id(1, 4)).unwrap(),
    )
    .unwrap();
    assert!(LogStore::open(dir.path()).is_err());
}

#[test]
fn segment_parser_stops_at_the_first_bad_record_and_says_why() {
    use flynn_discoverd::store::log::{encode, parse_segment};
    // The third record spans several 512-byte sectors.
    let recs: Vec<Vec<u8>> = (5..8)
        .map(|i| match i {
            7 => encode(&big_entry(1, i, 1500)).unwrap(),
            _ => encode(&entry(1, i)).unwrap(),
        })
        .collect();
    let good: Vec<u8> = recs.concat();
    let second = recs[0].len();
    let third = second + recs[1].len();
    assert!(third < 512 && good.len() > 1536, "{third} {}", good.len());

    let p = parse_segment(&good, 5);
    assert_eq!((p.bad, p.end, p.offsets.len()), (None, good.len(), 3));
    assert!(!p.torn);
    assert_eq!(p.offsets, vec![0, second as u64, third as u64]);
    assert_eq!(p.entries.last().map(|e| e.index()), Some(7));

    // Preallocated zeros after the records are not a record.
    let zeros = [good.clone(), vec![0; 4096]].concat();
    let p = parse_segment(&zeros, 5);
    assert_eq!((p.bad, p.end, p.entries.len()), (None, good.len(), 3));

    // A torn third record: short header, then short payload.
    let p = parse_segment(&good[..third + 5], 5);
    assert_eq!(
        (p.bad, p.end, p.entries.len(), p.torn),
        (Some("short header"), third, 2, true)
    );
    let p = parse_segment(&good[..good.len() - 1], 5);
    assert_eq!(
        (p.bad, p.end, p.entries.len(), p.torn),
        (Some("short record"), third, 2, true)
    );
    // A zeroed header with something after it.
    let mut zero_header = good.clone();
    zero_header[third..third + 8].fill(0);
    let p = parse_segment(&zero_header, 5);
    assert_eq!((p.end, p.entries.len(), p.torn), (third, 2, true));
    assert!(p.bad.is_some());
    // The third record's bytes in one 512-byte sector zeroed (a sector the crash kept
    // from the disk), here its last bytes, or its first ones: torn.
    let last_sector = (good.len() - 1) / 512 * 512;
    for zeroed in [last_sector..good.len(), third..512, 512..1024] {
        let mut z = good.clone();
        z[zeroed.clone()].fill(0);
        let p = parse_segment(&z, 5);
        assert_eq!((p.end, p.torn), (third, true), "{zeroed:?}");
    }
    // Zeros that do not fill the record's part of a sector: corruption.
    let mut z = good.clone();
    z[good.len() - 3..good.len() - 1].fill(0);
    let p = parse_segment(&z, 5);
    assert_eq!(
        (p.bad, p.end, p.torn),
        (Some("checksum mismatch"), third, false)
    );

    // A flipped payload byte in the second record.
    let mut flipped = good.clone();
    flipped[second + 20] ^= 0x01;
    let p = parse_segment(&flipped, 5);
    assert_eq!(
        (p.bad, p.end, p.entries.len(), p.torn),
        (Some("checksum mismatch"), second, 1, false)
    );

    // A record whose checksum is right but whose payload is not an entry.
    let mut junk = good[..third].to_vec();
    junk.extend_from_slice(&3u32.to_le_bytes());
    junk.extend_from_slice(&crc32fast::hash(b"{}x").to_le_bytes());
    junk.extend_from_slice(b"{}x");
    let p = parse_segment(&junk, 5);
    assert_eq!(
        (p.bad, p.end, p.torn),
        (Some("undecodable record"), third, false)
    );

    // The segment claims to start at 4, but its first record is index 5.
    let p = parse_segment(&good, 4);
    assert_eq!(
        (p.bad, p.end, p.entries.len(), p.torn),
        (Some("index out of sequence"), 0, 0, false)
    );
}

#[test]
fn metadata_floats_come_back_from_the_log_bit_for_bit() {
    use flynn_discoverd::store::log::{encode, parse_segment};
    // Without serde_json's `float_roundtrip`, 1e-307 came back as 1.0000000000000001e-307:
    // a follower (or a node replaying its log) would hold other metadata than the leader.
    for x in [
        "1e-307",
        "0.1",
        "2.2250738585072014e-308",
        "1.7976931348623157e308",
        "3.14159",
    ] {
        let cmd: Command = serde_json::from_str(&format!(
            r#"{{"op":"set_meta","service":"s","meta":{{"data":{{"x":{x}}},"index":0}}}}"#
        ))
        .unwrap();
        let e = EntryOf::<C>::new(log_id(1, 1), EntryPayload::Normal(cmd));
        let p = parse_segment(&encode(&e).unwrap(), 1);
        assert_eq!(p.bad, None);
        let (before, after) = (
            serde_json::to_string(&e).unwrap(),
            serde_json::to_string(&p.entries[0]).unwrap(),
        );
        assert_eq!(before, after, "{x}");
        let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let num = |v: serde_json::Value| v["payload"]["Normal"]["meta"]["data"]["x"].as_f64();
        assert_eq!(num(json(&after)), x.parse::<f64>().ok(), "{x}");
    }
}

/// openraft saves the commit point as soon as the cluster commits, which may be before
/// this node's own fsync of those entries: after a crash the saved point can name entries
/// the log never got. Opened again, it is clamped to the log's last entry (else openraft
/// refuses to start: it cannot re-apply entries it does not have).
#[tokio::test]
async fn a_commit_point_ahead_of_the_durable_log_is_clamped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
        log.save_committed(Some(log_id(1, 5))).await.unwrap();
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
    // A point within the log is kept as it is.
    log.save_committed(Some(log_id(1, 2))).await.unwrap();
    drop(log);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
}

/// openraft orders I/O by vote first: once a vote is reported saved, every append of an
/// older term queued before it counts as flushed. So `save_vote` returns only after those
/// appends are durable (their callbacks have run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_vote_follows_the_appends_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    for round in 0..20u64 {
        let first = round * 2000 + 1;
        let (tx, mut rx) = C::oneshot();
        log.append(
            (first..first + 2000)
                .map(|i| entry(1, i))
                .collect::<Vec<_>>(),
            IOFlushed::signal(tx),
        )
        .await
        .unwrap();
        let vote = openraft::alias::VoteOf::<C>::new(2 + round, 9);
        log.save_vote(&vote).await.unwrap();
        assert!(
            matches!(rx.try_recv(), Ok(Ok(()))),
            "round {round}: the vote was saved before the append queued ahead of it was flushed"
        );
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    }
}

/// An empty segment (a crash right after it was created) in front of later ones does not
/// stop purging for good: it goes with the first purge that passes it.
#[tokio::test]
async fn an_empty_segment_does_not_stop_purging() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("{:020}.seg", 5)), b"").unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    // As after installing a snapshot at 9: purged up to it, the log goes on at 10.
    log.purge(log_id(1, 9)).await.unwrap();
    append(&mut log, (10..=12).map(|i| entry(1, i)).collect()).await;
    log.purge(log_id(1, 11)).await.unwrap();
    // The writer purges in the background: wait for the empty segment to go.
    let empty = dir.path().join(format!("{:020}.seg", 5));
    for _ in 0..200 {
        if !empty.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!empty.exists(), "{:?}", segments(dir.path()));
    drop(log);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![12]);
}

/// openraft builds snapshots in a task of its own: a build that read the state before a
/// snapshot was installed must not write its older snapshot over the installed one (a
/// node restarted on it would find its log purged past its state and refuse to start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_during_an_install_never_replaces_it() {
    use flynn_discoverd::store::state::Data;
    use flynn_discoverd::store::StateMachine;
    use openraft::alias::{SnapshotMetaOf, StoredMembershipOf};
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    for round in 0..100 {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        let meta = SnapshotMetaOf::<C> {
            last_log_id: Some(log_id(1, 20)),
            last_membership: StoredMembershipOf::<C>::default(),
        };
        let data = serde_json::to_vec(&Data::default()).unwrap();
        let build = tokio::spawn(async move { builder.build_snapshot().await.map(|_| ()) });
        let install = tokio::spawn(async move {
            sm.install_snapshot(&meta, data).await.unwrap();
            sm
        });
        build.await.unwrap().unwrap();
        let mut sm = install.await.unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(
            current.meta.last_log_id,
            Some(log_id(1, 20)),
            "round {round}"
        );
        drop(sm);
        let mut again = StateMachine::open(dir.path()).unwrap();
        let (applied, _) = again.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 20)), "round {round}: reopened");
    }
}

/// The log writer runs under `SCHED_BATCH`, so the Raft core that wakes it with a new entry
/// is not preempted before it sends the entry to the followers.
#[tokio::test]
async fn the_log_writer_runs_under_sched_batch() {
    use std::time::{Duration, Instant};
    const SCHED_BATCH: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let _log = LogStore::open(dir.path()).unwrap();
    // Writers of other tests in this process may be starting too: any one will do.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut policies = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let t = t.unwrap().path();
            let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
            if comm.trim() != "raft-log-writer" {
                continue;
            }
            let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
            // Fields after the command's closing parenthesis start at field 3; the
            // scheduling policy is field 41.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            if let Some(p) = rest.split_whitespace().nth(41 - 3) {
                policies.push(p.parse::<u32>().unwrap());
            }
        }
        if policies.contains(&SCHED_BATCH) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log writer under SCHED_BATCH: {policies:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A purge point that cannot be saved fails every later append: openraft was told the
/// purge is done, and a log appended past it with the old point on disk could have a hole.
#[tokio::test]
async fn a_purge_point_that_cannot_be_saved_fails_later_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    append(&mut log, (1..=5).map(|i| entry(1, i)).collect()).await;
    // A non-empty directory where the point's file goes: the rename onto it fails.
    std::fs::create_dir_all(dir.path().join("purged.json").join("x")).unwrap();
    log.purge(log_id(1, 3)).await.unwrap();
    let (tx, rx) = C::oneshot();
    log.append(vec![entry(1, 6)], IOFlushed::signal(tx))
        .await
        .unwrap();
    let flushed = rx.await.unwrap();
    assert!(flushed.is_err(), "append after a failed purge: {flushed:?}");
}

/// A truncation that fails part-way (here: the segment cannot be opened to be cut) fails
/// every later vote and append, as a failed write does: the writer no longer knows what
/// the files hold.
#[tokio::test]
async fn a_failed_truncation_fails_later_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    append(&mut log, (1..=5).map(|i| entry(1, i)).collect()).await;
    let seg = segments(dir.path()).remove(0);
    std::fs::rename(&seg, dir.path().join("moved")).unwrap();
    std::fs::create_dir(&seg).unwrap();
    assert!(log.truncate_after(Some(log_id(1, 3))).await.is_err());
    let vote = openraft::alias::VoteOf::<C>::new(2, 9);
    assert!(
        log.save_vote(&vote).await.is_err(),
        "a vote saved after a failed truncation"
    );
    let (tx, rx) = C::oneshot();
    log.append(vec![entry(2, 4)], IOFlushed::signal(tx))
        .await
        .unwrap();
    let flushed = rx.await.unwrap();
    assert!(
        flushed.is_err(),
        "append after a failed truncation: {flushed:?}"
    );
}

/// A zero-length `committed.json` of an earlier version (a crash while it was written)
/// reads as an unknown commit point instead of stopping the node from starting; the
/// first save of the new record removes it.
#[tokio::test]
async fn an_unreadable_legacy_commit_point_is_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("committed"), b"").unwrap();
    std::fs::write(dir.path().join("committed.json"), b"").unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), None);
    append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    log.save_committed(Some(log_id(1, 2))).await.unwrap();
    drop(log);
    assert!(!dir.path().join("committed.json").exists());
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
}

/// A readable legacy point is still taken (and the file removed once the new one is
/// saved).
#[tokio::test]
async fn a_legacy_commit_point_is_read() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    }
    std::fs::write(
        dir.path().join("committed.json"),
        serde_json::to_vec(&Some(log_id(1, 2))).unwrap(),
    )
    .unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
    }
    // Dropped without a save: the old file stays until there is a new record.
    assert!(dir.path().join("committed.json").exists());
}

/// A purge point at the largest index (nothing openraft sends, but nothing to panic on).
#[tokio::test]
async fn a_purge_at_the_last_possible_index_does_not_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path()).unwrap();
    append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
    log.purge(log_id(1, u64::MAX)).await.unwrap();
    assert!(indexes(&mut log).await.is_empty());
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, u64::MAX)));
}
