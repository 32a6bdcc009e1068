//! Tests of host volumes: create, reload, delete and release on a temporary directory, with
//! stalled and failing disks.

use super::*;
use flynn_api::host::{ActiveJob, JobStatus, VolumeBinding};

fn open(dir: &Path) -> Volumes {
    Volumes::open(dir, "h1", Syncer::start()).unwrap()
}

/// A kept job's bind-mount sources name a volume only when they are exactly a volume's
/// data directory.
#[test]
fn volume_of_takes_only_a_volumes_data_directory() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let a = v
        .create(VolumeCreate::default(), "2026-01-01T00:00:00Z".into())
        .unwrap();
    let data = v.data_path(&a.id).unwrap();
    assert_eq!(v.volume_of(&data).as_deref(), Some(a.id.as_str()));
    for other in [
        data.join("sub"),
        data.parent().unwrap().to_path_buf(),
        v.dir().join(&a.id).join("other"),
        PathBuf::from("/etc/resolv.conf"),
        d.path().join("elsewhere").join(&a.id).join(DATA_DIR),
    ] {
        assert_eq!(v.volume_of(&other), None, "{}", other.display());
    }
}

#[test]
fn create_reload_delete() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let a = v
        .create(
            VolumeCreate {
                meta: [("k".to_string(), "v".to_string())].into(),
                ..VolumeCreate::default()
            },
            "2026-01-01T00:00:00.000001Z".into(),
        )
        .unwrap();
    assert!(valid_id(&a.id));
    assert_eq!((a.kind.as_str(), a.host_id.as_str()), ("data", "h1"));
    let named = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let b = v
        .create(
            VolumeCreate {
                id: named.into(),
                ..VolumeCreate::default()
            },
            "2026-01-01T00:00:01.000000Z".into(),
        )
        .unwrap();
    assert_eq!(b.id, named);
    assert!(matches!(
        v.create(
            VolumeCreate {
                id: named.into(),
                ..VolumeCreate::default()
            },
            "t".into()
        ),
        Err(VolumeError::Exists { .. })
    ));
    let data = v.data_path(&a.id).unwrap();
    assert!(data.is_dir());
    std::fs::write(data.join("f"), b"kept").unwrap();
    v.flush();

    let again = open(d.path());
    assert_eq!(again.list(), vec![a.clone(), b.clone()]);
    assert_eq!(
        std::fs::read(again.data_path(&a.id).unwrap().join("f")).unwrap(),
        b"kept"
    );

    // A daemon that died between the rename and the removal.
    let detached = again.detach(&a.id).unwrap();
    assert!(again.get(&a.id).is_none() && again.data_path(&a.id).is_none());
    assert!(again.detach(&a.id).is_none());
    let doomed = d.path().join(format!(".deleting-{}-0123", a.id));
    std::fs::rename(d.path().join(&a.id), &doomed).unwrap();
    drop(detached);
    // The next one finishes it at start-up (in the background).
    let third = open(d.path());
    assert_eq!(third.list(), vec![b.clone()]);
    wait_gone(&doomed);
    let detached = third.detach(&b.id).unwrap();
    assert_eq!(detached.id(), b.id);
    third.delete(detached).unwrap();
    assert!(!d.path().join(&b.id).exists());
    assert_eq!(leftovers(d.path()), Vec::<String>::new());
    assert!(open(d.path()).list().is_empty());
}

fn wait_gone(p: &Path) {
    let t0 = std::time::Instant::now();
    while p.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{} never removed",
            p.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The `.deleting-` entries of `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(DELETING))
        .collect();
    v.sort();
    v
}

/// Runs `f` on a thread of its own: its answer, or `None` when it takes over 2 s.
fn within_2s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(2)).ok()
}

/// Lets a held gate go when dropped (a failing test must not leave threads stuck).
struct Release<'a>(&'a Gate);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.hold(false);
    }
}

/// A create whose record write is stalled (a slow fsync) holds up no other volume call:
/// the table's lock used to be held across the create's I/O, so `get`, `list`, job
/// starts (`mounts`) and deletions (`detach`, called with the job table locked) all
/// waited for the disk. Its id is taken meanwhile, and it shows once made.
#[test]
fn a_stalled_create_holds_up_no_other_call() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let other = v.create(VolumeCreate::default(), "t0".into()).unwrap();
    let named = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let _release = Release(&v.faults().write);
    v.faults().write.hold(true);
    let creating = std::thread::spawn({
        let v = v.clone();
        move || {
            v.create(
                VolumeCreate {
                    id: named.into(),
                    ..VolumeCreate::default()
                },
                "t1".into(),
            )
        }
    });
    v.faults().write.wait_stalled(1);
    let v2 = v.clone();
    let oid = other.id.clone();
    let got = within_2s(move || {
        let listed = v2.list();
        let got = v2.get(&oid);
        let unseen = v2.get(named).is_none() && v2.data_path(named).is_none();
        let taken = matches!(
            v2.create(
                VolumeCreate {
                    id: named.into(),
                    ..VolumeCreate::default()
                },
                "t".into()
            ),
            Err(VolumeError::Exists { .. })
        );
        let deleted = v2.detach(&oid).map(|d| v2.delete(d).is_ok());
        (listed, got, unseen, taken, deleted)
    })
    .expect("volume calls held up by a stalled create");
    assert_eq!(
        got,
        (
            vec![other.clone()],
            Some(other.clone()),
            true,
            true,
            Some(true)
        )
    );
    v.faults().write.hold(false);
    let made = creating.join().unwrap().unwrap();
    assert_eq!(v.list(), vec![made]);
    assert!(v.data_path(named).unwrap().is_dir());
}

/// A failed create frees its id.
#[test]
fn a_failed_create_frees_its_id() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let id = "11111111-2222-4333-8444-555555555555";
    // A plain file where its directory would go: the create fails.
    std::fs::write(d.path().join(id), b"x").unwrap();
    let req = VolumeCreate {
        id: id.into(),
        ..VolumeCreate::default()
    };
    assert!(matches!(
        v.create(req.clone(), "t".into()),
        Err(VolumeError::Exists { .. })
    ));
    std::fs::remove_file(d.path().join(id)).unwrap();
    assert_eq!(v.create(req, "t".into()).unwrap().id, id);
}

/// A leftover `.deleting-<id>` (an earlier deletion of the same id whose removal
/// failed, or is still running) does not make the volume undeletable: deletions rename
/// to a name of their own. It used to be the fixed `.deleting-<id>`, and the rename
/// onto a non-empty directory failed (500) until the daemon restarted.
#[test]
fn a_leftover_of_an_earlier_deletion_blocks_no_deletion() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let id = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let stale = d.path().join(format!(".deleting-{id}"));
    std::fs::create_dir_all(stale.join("data")).unwrap();
    std::fs::write(stale.join("data").join("f"), b"old").unwrap();
    let req = || VolumeCreate {
        id: id.into(),
        ..VolumeCreate::default()
    };
    v.create(req(), "t".into()).unwrap();
    v.delete(v.detach(id).unwrap()).unwrap();
    assert!(v.get(id).is_none() && !d.path().join(id).exists());
    // Twice: the first deletion's name is not reused either.
    v.create(req(), "t".into()).unwrap();
    let mut j = Job::default();
    j.config.volumes = vec![VolumeBinding {
        target: "/d".into(),
        volume: id.into(),
        delete_on_stop: true,
        ..VolumeBinding::default()
    }];
    v.release(&j);
    assert!(v.get(id).is_none() && !d.path().join(id).exists());
    assert_eq!(leftovers(d.path()), [format!(".deleting-{id}")]);
}

/// Leftovers of deletions are removed in the background at start-up: a daemon killed
/// while deleting a big volume does not wait for that removal before serving.
#[test]
fn leftovers_are_removed_in_the_background_at_start() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path())
        .create(VolumeCreate::default(), "t".into())
        .unwrap();
    let stale = d
        .path()
        .join(".deleting-11111111-2222-4333-8444-555555555555-abc");
    std::fs::create_dir_all(stale.join("data")).unwrap();
    let faults = Arc::new(Faults::default());
    let _release = Release(&faults.purge);
    faults.purge.hold(true);
    let path = d.path().to_path_buf();
    let f2 = faults.clone();
    let opened = within_2s(move || {
        Volumes::open_with(&path, "h1", Syncer::start(), f2)
            .unwrap()
            .list()
    })
    .expect("the start waited for the removal of a deletion's leftovers");
    assert_eq!(opened, [a]);
    faults.purge.wait_stalled(1);
    assert!(stale.exists());
    faults.purge.hold(false);
    wait_gone(&stale);
}

/// The record is written the way job records are ([`Syncer::write`]: its data fsynced
/// before the rename, then file and directory fsynced by the syncer), not with a plain
/// write and rename that a power cut can leave as an empty record.
#[test]
fn records_are_written_through_the_syncer() {
    let d = tempfile::tempdir().unwrap();
    let sync = Syncer::start();
    let v = Volumes::open(d.path(), "h1", sync.clone()).unwrap();
    let a = v.create(VolumeCreate::default(), "t".into()).unwrap();
    let root = v.dir().join(&a.id);
    assert_eq!(sync.written(), [root.join(RECORD)]);
    // No temporary file left behind.
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, [DATA_DIR, RECORD]);
    v.flush();
    assert_eq!(sync.errors(), 0);
    assert_eq!(open(d.path()).list(), [a]);
}

#[test]
fn bad_records_are_skipped_not_deleted() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let good = v.create(VolumeCreate::default(), "t".into()).unwrap();
    v.flush();
    let id2 = "11111111-2222-4333-8444-555555555555";
    let id3 = "11111111-2222-4333-8444-666666666666";
    let id4 = "11111111-2222-4333-8444-777777777777";
    // Garbage record.
    std::fs::create_dir_all(d.path().join(id2).join("data")).unwrap();
    std::fs::write(d.path().join(id2).join("volume.json"), b"{nope").unwrap();
    // A record naming another volume.
    std::fs::create_dir_all(d.path().join(id3).join("data")).unwrap();
    let mut other = good.clone();
    other.id = id2.into();
    std::fs::write(
        d.path().join(id3).join("volume.json"),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    // No record at all (a create cut short), and a stray file.
    std::fs::create_dir_all(d.path().join(id4)).unwrap();
    std::fs::write(d.path().join("stray"), b"x").unwrap();
    let again = open(d.path());
    assert_eq!(again.list(), vec![good]);
    for p in [id2, id3, id4, "stray"] {
        assert!(d.path().join(p).exists(), "{p} was deleted");
    }
    // A create may not take over a directory it could not read.
    assert!(matches!(
        again.create(
            VolumeCreate {
                id: id4.into(),
                ..VolumeCreate::default()
            },
            "t".into()
        ),
        Err(VolumeError::Exists { .. })
    ));
    assert!(d.path().join(id4).exists());
}

#[test]
fn ids_and_bindings_are_validated() {
    assert!(valid_id("0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f"));
    for bad in [
        "",
        "..",
        "0B7E7D3C-6B55-4D6F-9D77-0A1C2B3D4E5F",
        "0b7e7d3c6b554d6f9d770a1c2b3d4e5f",
        "../0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f",
    ] {
        assert!(!valid_id(bad), "{bad}");
    }
    let e = validate_create(&VolumeCreate {
        kind: "squashfs".into(),
        ..VolumeCreate::default()
    })
    .unwrap_err();
    assert_eq!(e.detail.unwrap()["field"], "type");
    let e = validate_create(&VolumeCreate {
        id: "x".into(),
        ..VolumeCreate::default()
    })
    .unwrap_err();
    assert_eq!(e.detail.unwrap()["field"], "id");

    let vid = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let cases = [
        ("/data", vid, None),
        ("/a/b", vid, None),
        ("data", vid, Some("config.volumes[0].target")),
        ("/", vid, Some("config.volumes[0].target")),
        ("/a/../etc", vid, Some("config.volumes[0].target")),
        ("/data", "nope", Some("config.volumes[0].volume")),
    ];
    for (target, volume, field) in cases {
        let mut j = Job::default();
        j.config.volumes = vec![VolumeBinding {
            target: target.into(),
            volume: volume.into(),
            ..VolumeBinding::default()
        }];
        match (validate_bindings(&j), field) {
            (Ok(()), None) => {}
            (Err(e), Some(f)) => assert_eq!(e.detail.unwrap()["field"], f, "{target}"),
            (r, f) => panic!("{target} {volume}: {r:?}, want {f:?}"),
        }
    }
}

#[test]
fn a_volume_is_held_by_one_live_job() {
    let vid = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let job = |id: &str| {
        let mut j = Job {
            id: id.into(),
            ..Job::default()
        };
        j.config.volumes = vec![VolumeBinding {
            target: "/data".into(),
            volume: vid.into(),
            ..VolumeBinding::default()
        }];
        j
    };
    let mut t = Table::default();
    t.restore(ActiveJob {
        job: job("a"),
        status: JobStatus::Running,
        ..ActiveJob::default()
    });
    t.restore(ActiveJob {
        job: job("old"),
        status: JobStatus::Done,
        ..ActiveJob::default()
    });
    let mut kept = Kept::default();
    assert_eq!(holder(&t, &kept, vid, "").as_deref(), Some("a"));
    assert_eq!(holder(&t, &kept, vid, "a"), None);
    let e = check_free(&t, &kept, &job("b")).unwrap_err();
    assert_eq!(e.status(), 409);
    assert_eq!(e.message, format!("volume {vid} is in use by job a"));
    t.restore(ActiveJob {
        job: job("a"),
        status: JobStatus::Crashed,
        ..ActiveJob::default()
    });
    check_free(&t, &kept, &job("b")).unwrap();
    // A job kept running with an unreadable record holds what its container binds.
    kept.insert("k", vec![vid.to_string()], Vec::new());
    let e = check_free(&t, &kept, &job("b")).unwrap_err();
    assert_eq!(e.message, format!("volume {vid} is in use by job k"));
    kept.ended("k");
    check_free(&t, &kept, &job("b")).unwrap();
}

/// A `delete_on_stop` volume is gone for a restarted daemon as soon as the job's end
/// is (`release` is called as it is recorded): its directory used to be renamed away in
/// the background, and a daemon that died first found the volume again, ready.
#[test]
fn a_released_volume_is_gone_for_a_daemon_restarted_at_once() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let a = v.create(VolumeCreate::default(), "t".into()).unwrap();
    std::fs::write(v.data_path(&a.id).unwrap().join("f"), b"x").unwrap();
    v.flush();
    let _release = Release(&v.faults().release);
    v.faults().release.hold(true);
    let mut j = Job {
        id: "j".into(),
        ..Job::default()
    };
    j.config.volumes = vec![VolumeBinding {
        target: "/d".into(),
        volume: a.id.clone(),
        delete_on_stop: true,
        ..VolumeBinding::default()
    }];
    rt.block_on(async { v.release(&j) });
    assert!(v.get(&a.id).is_none());
    // The background part is held: a daemon dying now finds no volume.
    v.faults().release.wait_stalled(1);
    let again = open(d.path());
    assert!(again.get(&a.id).is_none(), "the released volume came back");
    assert!(again.list().is_empty());
    v.faults().release.hold(false);
    let t0 = std::time::Instant::now();
    while !leftovers(d.path()).is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "never removed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(!d.path().join(&a.id).exists());
}

/// A detached volume whose deletion never ran (its task dropped at shutdown, a panic)
/// is back in service: it stayed "deleting" for good, gone for the API and jobs, its id
/// taken. One that was deleted is not put back.
#[test]
fn a_dropped_detached_volume_is_back_in_service() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let a = v.create(VolumeCreate::default(), "t".into()).unwrap();
    let detached = v.detach(&a.id).unwrap();
    assert!(v.get(&a.id).is_none() && v.data_path(&a.id).is_none());
    drop(detached);
    assert_eq!(v.get(&a.id), Some(a.clone()));
    assert!(v.data_path(&a.id).unwrap().is_dir());
    // Deleted: gone for good.
    v.delete(v.detach(&a.id).unwrap()).unwrap();
    assert!(v.get(&a.id).is_none());
    assert!(v.list().is_empty());
    // A rename that fails puts it back once (not twice, nor a stale copy later).
    let b = v.create(VolumeCreate::default(), "t".into()).unwrap();
    std::fs::rename(d.path().join(&b.id), d.path().join("moved")).unwrap();
    assert!(v.delete(v.detach(&b.id).unwrap()).is_err());
    assert_eq!(v.get(&b.id), Some(b));
}

#[test]
fn release_deletes_only_delete_on_stop_volumes() {
    let d = tempfile::tempdir().unwrap();
    let v = open(d.path());
    let keep = v.create(VolumeCreate::default(), "t".into()).unwrap();
    let drop_ = v.create(VolumeCreate::default(), "t".into()).unwrap();
    let mut j = Job {
        id: "j".into(),
        ..Job::default()
    };
    for (vol, del, w) in [(&keep, false, true), (&drop_, true, false)] {
        j.config.volumes.push(VolumeBinding {
            target: format!("/{}", vol.id),
            volume: vol.id.clone(),
            writeable: w,
            delete_on_stop: del,
        });
    }
    let m = v.mounts(&j).unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[0].source.clone(), m[0].readonly),
        (v.data_path(&keep.id).unwrap(), false)
    );
    assert!(m[1].readonly);
    v.release(&j);
    assert_eq!(v.list(), vec![keep.clone()]);
    assert!(!d.path().join(&drop_.id).exists());
    assert_eq!(leftovers(d.path()), Vec::<String>::new());
    let e = v.mounts(&j).unwrap_err();
    assert_eq!(e, format!("volume: unknown volume {}", drop_.id));
}
