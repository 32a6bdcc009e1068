//! Host volumes (spec §5.3 storage API, without ZFS): a directory per volume that outlives
//! the jobs using it.
//!
//! Layout under the volume directory (`--volume-dir`, default `<state-dir>/volumes`):
//! `<id>/volume.json` (the [`Volume`] record, written to a temp file and renamed into
//! place, fsynced by the [`Syncer`] like the job records) and `<id>/data/` (what jobs
//! see at their binding's `target`). A volume being deleted is first renamed to
//! `.deleting-<id>` (one atomic step: it is gone for the API and for a restarted daemon),
//! then removed; leftovers of that kind are removed at start-up. A directory without a
//! readable record is logged and left alone, never deleted.
//!
//! Which job holds a volume is not stored separately: it follows from the job table
//! (a starting or running job binding it), so re-adopted jobs hold their volumes after a
//! daemon restart with nothing more to restore.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use flynn_api::host::{Job, Volume, VolumeCreate};
use flynn_api::ApiError;

use crate::job::{Kept, Table};
use crate::runtime::BindMount;
use crate::syncer::Syncer;

/// The only volume type: a host directory.
pub const DATA: &str = "data";
/// The only provider.
pub const DEFAULT_PROVIDER: &str = "default";

const RECORD: &str = "volume.json";
const DATA_DIR: &str = "data";
const DELETING: &str = ".deleting-";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {id} already exists")]
    Exists { id: String },
}

/// Volume ids name directories: a lowercase hyphenated UUID, as created here.
pub fn valid_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// Checks a create request; 400 with the offending field otherwise.
pub fn validate_create(req: &VolumeCreate) -> Result<(), ApiError> {
    if !req.kind.is_empty() && req.kind != DATA {
        return Err(ApiError::validation(Some("type"), "must be \"data\""));
    }
    if !req.id.is_empty() && !valid_id(&req.id) {
        return Err(ApiError::validation(
            Some("id"),
            "must be a lowercase hyphenated UUID",
        ));
    }
    Ok(())
}

/// Checks a job's volume bindings (shape only; whether the volumes exist is checked
/// when the job starts).
pub fn validate_bindings(job: &Job) -> Result<(), ApiError> {
    for (i, b) in job.config.volumes.iter().enumerate() {
        if !valid_id(&b.volume) {
            return Err(ApiError::validation(
                Some(&format!("config.volumes[{i}].volume")),
                "must be a volume id (a lowercase hyphenated UUID)",
            ));
        }
        let t = Path::new(&b.target);
        let bad = !crate::job::valid_mount_target(&b.target)
            || t.parent().is_none()
            || t.components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        if bad {
            return Err(ApiError::validation(
                Some(&format!("config.volumes[{i}].target")),
                "must be an absolute path below / without `..`",
            ));
        }
    }
    Ok(())
}

/// The starting or running job (other than `except`) that binds `volume`: one in the
/// table, or a job kept running with an unreadable record.
pub fn holder(table: &Table, kept: &Kept, volume: &str, except: &str) -> Option<String> {
    table
        .iter()
        .filter(|j| !j.status.is_terminal() && j.job.id != except)
        .find(|j| j.job.config.volumes.iter().any(|b| b.volume == volume))
        .map(|j| j.job.id.clone())
        .or_else(|| kept.holder(volume).map(str::to_string))
}

/// 409 when one of `job`'s volumes is held by another starting or running job (spec
/// §5.3: "volumes already used by a starting/running job → error").
pub fn check_free(table: &Table, kept: &Kept, job: &Job) -> Result<(), ApiError> {
    for b in &job.config.volumes {
        if let Some(other) = holder(table, kept, &b.volume, &job.id) {
            return Err(ApiError::conflict(format!(
                "volume {} is in use by job {other}",
                b.volume
            )));
        }
    }
    Ok(())
}

struct Shared {
    dir: PathBuf,
    host_id: String,
    sync: Syncer,
    vols: Mutex<BTreeMap<String, Volume>>,
}

/// The host's volumes; cheap to clone.
#[derive(Clone)]
pub struct Volumes {
    shared: Arc<Shared>,
}

impl Volumes {
    /// Opens (creating) `dir`, removes deletions a previous daemon left half done and
    /// loads every volume with a readable record.
    pub fn open(dir: &Path, host_id: &str, sync: Syncer) -> Result<Volumes, VolumeError> {
        // Absolute: the data directories are bind-mount sources.
        let dir = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::canonicalize(dir))
            .map_err(|source| VolumeError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let v = Volumes {
            shared: Arc::new(Shared {
                dir,
                host_id: host_id.to_string(),
                sync,
                vols: Mutex::new(BTreeMap::new()),
            }),
        };
        let loaded = v.load();
        *v.lock() = loaded;
        Ok(v)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Volume>> {
        self.shared.vols.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn load(&self) -> BTreeMap<String, Volume> {
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if name.starts_with(DELETING) {
                tracing::info!(path = %path.display(), "finishing an interrupted volume deletion");
                self.purge(&path);
                continue;
            }
            match read_record(&path, &name) {
                Ok(v) => {
                    out.insert(v.id.clone(), v);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable volume")
                }
            }
        }
        out
    }

    /// Creates a volume (a new random UUID unless the request names one).
    pub fn create(&self, req: VolumeCreate, now: String) -> Result<Volume, VolumeError> {
        let id = if req.id.is_empty() {
            uuid::Uuid::new_v4().hyphenated().to_string()
        } else {
            req.id
        };
        let vol = Volume {
            id: id.clone(),
            kind: DATA.into(),
            host_id: self.shared.host_id.clone(),
            meta: req.meta,
            created_at: now,
        };
        let mut vols = self.lock();
        if vols.contains_key(&id) {
            return Err(VolumeError::Exists { id });
        }
        let root = self.dir().join(&id);
        // `create_dir`, not `_all`: a directory already there (a record this daemon could
        // not read) is somebody's data and is not reused.
        match std::fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VolumeError::Exists { id });
            }
            Err(source) => return Err(VolumeError::Io { path: root, source }),
        }
        let record = root.join(RECORD);
        // As the job records are written: data fsynced before the rename (a power cut
        // finds the record or no record, never an empty one), the file and `root` fsynced
        // again in the syncer's next pass.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir(root.join(DATA_DIR))?;
            self.shared
                .sync
                .write(&record, &serde_json::to_vec(&vol).unwrap_or_default())
        };
        if let Err(source) = write() {
            // Only what was made just now.
            let _ = std::fs::remove_dir_all(&root);
            return Err(VolumeError::Io { path: root, source });
        }
        // The new volume's name in the volume directory.
        self.shared.sync.dir(self.dir());
        vols.insert(id, vol.clone());
        Ok(vol)
    }

    pub fn get(&self, id: &str) -> Option<Volume> {
        self.lock().get(id).cloned()
    }

    /// Every volume, oldest first.
    pub fn list(&self) -> Vec<Volume> {
        let mut v: Vec<Volume> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        v
    }

    /// The volume whose data directory is `source` (a bind mount's source), if it is one.
    pub fn volume_of(&self, source: &Path) -> Option<String> {
        let rest = source.strip_prefix(self.dir()).ok()?;
        let mut parts = rest.components();
        let id = parts.next()?.as_os_str().to_str()?.to_string();
        let data = parts.next()?.as_os_str() == DATA_DIR;
        (data && parts.next().is_none()).then_some(id)
    }

    /// Where volume `id`'s data is on the host.
    pub fn data_path(&self, id: &str) -> Option<PathBuf> {
        self.lock()
            .contains_key(id)
            .then(|| self.dir().join(id).join(DATA_DIR))
    }

    /// The bind mounts for `job`'s volumes; an error naming the first unknown volume.
    pub fn mounts(&self, job: &Job) -> Result<Vec<BindMount>, String> {
        job.config
            .volumes
            .iter()
            .map(|b| {
                let source = self
                    .data_path(&b.volume)
                    .ok_or_else(|| format!("volume: unknown volume {}", b.volume))?;
                Ok(BindMount {
                    source,
                    target: b.target.clone().into(),
                    readonly: !b.writeable,
                })
            })
            .collect()
    }

    /// Takes volume `id` out of service: it is gone for the API and, once this returns,
    /// for a restarted daemon too (its directory renamed to `.deleting-<id>`). Returns that
    /// path for [`Volumes::purge`]; `None` for an unknown volume.
    pub fn detach(&self, id: &str) -> Result<Option<PathBuf>, VolumeError> {
        let mut vols = self.lock();
        if !vols.contains_key(id) {
            return Ok(None);
        }
        let from = self.dir().join(id);
        let to = self.dir().join(format!("{DELETING}{id}"));
        std::fs::rename(&from, &to).map_err(|source| VolumeError::Io {
            path: from.clone(),
            source,
        })?;
        self.shared.sync.dir(self.dir());
        vols.remove(id);
        Ok(Some(to))
    }

    /// Removes a detached volume's directory (blocking; may take a while for big volumes).
    pub fn purge(&self, path: &Path) {
        if let Err(e) = std::fs::remove_dir_all(path) {
            tracing::error!(path = %path.display(), error = %e, "removing a deleted volume failed");
        }
        self.shared.sync.dir(self.dir());
    }

    /// Deletes `job`'s `delete_on_stop` volumes: called as the job ends, with the job table
    /// locked, so no other job can take a volume between the job's end and its deletion.
    /// The directories are removed in the background.
    pub fn release(&self, job: &Job) {
        for b in job.config.volumes.iter().filter(|b| b.delete_on_stop) {
            match self.detach(&b.volume) {
                Ok(Some(path)) => {
                    tracing::info!(job = %job.id, volume = %b.volume, "deleting volume on stop");
                    let me = self.clone();
                    match tokio::runtime::Handle::try_current() {
                        Ok(h) => drop(h.spawn_blocking(move || me.purge(&path))),
                        Err(_) => me.purge(&path),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job = %job.id, volume = %b.volume, error = ?e, "deleting volume on stop failed")
                }
            }
        }
    }

    /// Waits until every change so far is on disk.
    pub fn flush(&self) {
        self.shared.sync.flush();
    }
}

/// The record of the volume directory `path` named `name`.
fn read_record(path: &Path, name: &str) -> Result<Volume, String> {
    if !path.is_dir() {
        return Err("not a directory".into());
    }
    let bytes = std::fs::read(path.join(RECORD)).map_err(|e| format!("{RECORD}: {e}"))?;
    let v: Volume = serde_json::from_slice(&bytes).map_err(|e| format!("{RECORD}: {e}"))?;
    if !valid_id(&v.id) || v.id != name {
        return Err(format!(
            "volume id {:?} does not match the directory name",
            v.id
        ));
    }
    if v.kind != DATA {
        return Err(format!("unknown volume type {:?}", v.kind));
    }
    if !path.join(DATA_DIR).is_dir() {
        return Err(format!("{DATA_DIR}/ is missing"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
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

        let doomed = again.detach(&a.id).unwrap().unwrap();
        assert!(again.get(&a.id).is_none() && again.data_path(&a.id).is_none());
        assert_eq!(again.detach(&a.id).unwrap(), None);
        // A daemon that died before the removal finishes it at start-up.
        let third = open(d.path());
        assert!(!doomed.exists());
        assert_eq!(third.list(), vec![b.clone()]);
        let p = third.detach(&b.id).unwrap().unwrap();
        third.purge(&p);
        assert!(!p.exists() && !d.path().join(&b.id).exists());
        assert!(open(d.path()).list().is_empty());
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
        assert!(!d.path().join(format!(".deleting-{}", drop_.id)).exists());
        let e = v.mounts(&j).unwrap_err();
        assert_eq!(e, format!("volume: unknown volume {}", drop_.id));
    }
}
