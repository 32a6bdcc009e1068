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
