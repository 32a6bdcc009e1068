//! Reopening the log: entries, vote, purge and commit points survive; a torn tail is cut
//! off.

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
    // Only segment, so it is the tail: everything from the bad record on is cut.
    let mut log = LogStore::open(dir.path()).unwrap();
    assert!(indexes(&mut log).await.is_empty());
}

#[tokio::test]
async fn commit_point_survives_reopen_and_a_torn_record_reads_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
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
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i)).collect()).await;
        // An index that does not follow the last one (as after a snapshot) starts a
        // new segment and closes the first.
        append(&mut log, (7..=8).map(|i| entry(1, i)).collect()).await;
    }
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 2);
    let first = std::fs::read(&segs[0]).unwrap();
    assert!(
        first.len() < 4096 && *first.last().unwrap() != 0,
        "no zero tail"
    );
    assert!(std::fs::read(&segs[1]).unwrap().len() >= 1 << 20);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 7, 8]);
}

#[test]
fn segment_parser_stops_at_the_first_bad_record_and_says_why() {
    use flynn_discoverd::store::log::{encode, parse_segment};
    let recs: Vec<Vec<u8>> = (5..8).map(|i| encode(&entry(1, i)).unwrap()).collect();
    let good: Vec<u8> = recs.concat();
    let second = recs[0].len();
    let third = second + recs[1].len();

    let p = parse_segment(&good, 5);
    assert_eq!((p.bad, p.end, p.offsets.len()), (None, good.len(), 3));
    assert_eq!(p.offsets, vec![0, second as u64, third as u64]);
    assert_eq!(p.entries.last().map(|e| e.index()), Some(7));

    // Preallocated zeros after the records are not a record.
    let zeros = [good.clone(), vec![0; 4096]].concat();
    let p = parse_segment(&zeros, 5);
    assert_eq!((p.bad, p.end, p.entries.len()), (None, good.len(), 3));

    // A torn third record: short header, then short payload.
    let p = parse_segment(&good[..third + 5], 5);
    assert_eq!(
        (p.bad, p.end, p.entries.len()),
        (Some("short header"), third, 2)
    );
    let p = parse_segment(&good[..good.len() - 1], 5);
    assert_eq!(
        (p.bad, p.end, p.entries.len()),
        (Some("short record"), third, 2)
    );

    // A flipped payload byte in the second record.
    let mut flipped = good.clone();
    flipped[second + 20] ^= 0x01;
    let p = parse_segment(&flipped, 5);
    assert_eq!(
        (p.bad, p.end, p.entries.len()),
        (Some("checksum mismatch"), second, 1)
    );

    // A record whose checksum is right but whose payload is not an entry.
    let mut junk = good[..third].to_vec();
    junk.extend_from_slice(&3u32.to_le_bytes());
    junk.extend_from_slice(&crc32fast::hash(b"{}x").to_le_bytes());
    junk.extend_from_slice(b"{}x");
    let p = parse_segment(&junk, 5);
    assert_eq!((p.bad, p.end), (Some("undecodable record"), third));

    // The segment claims to start at 4, but its first record is index 5.
    let p = parse_segment(&good, 4);
    assert_eq!(
        (p.bad, p.end, p.entries.len()),
        (Some("index out of sequence"), 0, 0)
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
