//! Host volumes (spec §5.3 storage API, without ZFS): a directory per volume that outlives
//! the jobs using it.
//!
//! Layout under the volume directory (`--volume-dir`, default `<state-dir>/volumes`):
//! `<id>/volume.json` (the [`Volume`] record, written to a temp file and renamed into
//! place, fsynced by the [`Syncer`] like the job records) and `<id>/data/` (what jobs
//! see at their binding's `target`). A volume being deleted is first renamed to
//! `.deleting-<id>-<nonce>` (one atomic step: it is gone for a restarted daemon; a name of
//! its own, so a leftover of an earlier deletion of the same id, whose removal failed or is
//! still running, never blocks it), then removed; leftovers of that kind are removed in the
//! background at start-up. A directory without a readable record is logged and left alone,
//! never deleted.
//!
//! No file I/O happens under the volume table's lock (nor under the job table's, which
//! [`Volumes::detach`] is called with): a create takes its id in the table first (as
//! being created, shown nowhere), makes the directory and record without the lock, then
//! shows the volume; a deletion marks the volume as being deleted (gone for the API and for
//! new jobs at once), then renames and removes its directory without the lock. A slow disk
//! holds up only the create or delete waiting on it. (One exception: a job's
//! `delete_on_stop` volumes are renamed away as its end is recorded, under the job table's
//! lock, so a daemon that dies right after never finds them again; one `rename`, whose
//! directory fsync is left to the syncer. Only their removal runs in the background.)
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

/// A volume id's place in the table.
enum Slot {
    Ready(Volume),
    /// Its directory and record are being made: the id is taken, the volume not shown.
    Creating,
    /// Its directory is being renamed away: gone for the API and for new jobs.
    Deleting,
}

struct Shared {
    dir: PathBuf,
    host_id: String,
    sync: Syncer,
    vols: Mutex<BTreeMap<String, Slot>>,
    /// TEST ONLY: where the volume I/O can be held up.
    #[cfg(test)]
    faults: Arc<Faults>,
}

/// A volume taken out of service by [`Volumes::detach`] whose directory is still in place:
/// hand it to [`Volumes::delete`] (blocking I/O: without locks, off the runtime). Dropped
/// instead (a deletion that never ran: its task dropped at shutdown, or a panic), it is
/// back in service.
#[must_use = "a detached volume is back in service when dropped"]
pub struct Detached {
    vols: Volumes,
    /// `None` once deleted.
    vol: Option<Volume>,
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detached").field("vol", &self.vol).finish()
    }
}

impl Detached {
    pub fn id(&self) -> &str {
        self.vol.as_ref().map_or("", |v| v.id.as_str())
    }

    /// The volume, no longer put back when this is dropped.
    fn take(&mut self) -> Volume {
        self.vol.take().expect("a detached volume is taken once")
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(vol) = self.vol.take() {
            let mut vols = self.vols.lock();
            if matches!(vols.get(&vol.id), Some(Slot::Deleting)) {
                tracing::warn!(volume = %vol.id, "a volume deletion did not run; the volume is kept");
                vols.insert(vol.id.clone(), Slot::Ready(vol));
            }
        }
    }
}

/// Takes a create's id back out of the table unless the create completed (a failed or
/// panicking create leaves the id free).
struct Reservation<'a> {
    vols: &'a Volumes,
    id: String,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.vols.lock().remove(&self.id);
        }
    }
}

/// The host's volumes; cheap to clone.
#[derive(Clone)]
pub struct Volumes {
    shared: Arc<Shared>,
}

impl Volumes {
    /// Opens (creating) `dir` and loads every volume with a readable record. Deletions a
    /// previous daemon left half done are finished by a background thread.
    pub fn open(dir: &Path, host_id: &str, sync: Syncer) -> Result<Volumes, VolumeError> {
        Self::open_with(
            dir,
            host_id,
            sync,
            #[cfg(test)]
            Arc::default(),
        )
    }

    fn open_with(
        dir: &Path,
        host_id: &str,
        sync: Syncer,
        #[cfg(test)] faults: Arc<Faults>,
    ) -> Result<Volumes, VolumeError> {
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
                #[cfg(test)]
                faults,
            }),
        };
        let (loaded, leftovers) = v.load();
        *v.lock() = loaded
            .into_iter()
            .map(|(id, vol)| (id, Slot::Ready(vol)))
            .collect();
        v.purge_leftovers(leftovers);
        Ok(v)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        self.shared.vols.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The volumes with a readable record, and the directories of deletions a previous
    /// daemon did not finish.
    fn load(&self) -> (BTreeMap<String, Volume>, Vec<PathBuf>) {
        let mut out = BTreeMap::new();
        let mut leftovers = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return (out, leftovers);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if name.starts_with(DELETING) {
                leftovers.push(path);
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
        (out, leftovers)
    }

    /// Removes what deletions cut short by a previous daemon left, on a thread of its own:
    /// a big volume takes a while, and the daemon's start does not wait for it.
    fn purge_leftovers(&self, leftovers: Vec<PathBuf>) {
        if leftovers.is_empty() {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("volume-purge".into())
            .spawn(move || {
                #[cfg(test)]
                me.shared.faults.purge.pass();
                for path in leftovers {
                    tracing::info!(path = %path.display(), "finishing an interrupted volume deletion");
                    me.purge(&path);
                }
            });
        if let Err(e) = spawned {
            // Left for the next start.
            tracing::error!(error = %e, "cannot start removing the leftovers of volume deletions");
        }
    }

    /// Creates a volume (a new random UUID unless the request names one). Blocking I/O,
    /// done without the table's lock: only the id is taken under it.
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
        let mut reserved = {
            let mut vols = self.lock();
            // Also one being created or deleted (its directory is still there).
            if vols.contains_key(&id) {
                return Err(VolumeError::Exists { id });
            }
            vols.insert(id.clone(), Slot::Creating);
            Reservation {
                vols: self,
                id: id.clone(),
                done: false,
            }
        };
        self.make(&vol)?;
        self.lock().insert(id, Slot::Ready(vol.clone()));
        reserved.done = true;
        Ok(vol)
    }

    /// Makes `vol`'s directory, data directory and record.
    fn make(&self, vol: &Volume) -> Result<(), VolumeError> {
        let root = self.dir().join(&vol.id);
        // `create_dir`, not `_all`: a directory already there (a record this daemon could
        // not read) is somebody's data and is not reused.
        match std::fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VolumeError::Exists { id: vol.id.clone() });
            }
            Err(source) => return Err(VolumeError::Io { path: root, source }),
        }
        let record = root.join(RECORD);
        // As the job records are written: data fsynced before the rename (a power cut
        // finds the record or no record, never an empty one), the file and `root` fsynced
        // again in the syncer's next pass.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir(root.join(DATA_DIR))?;
            #[cfg(test)]
            self.shared.faults.write.pass();
            self.shared
                .sync
                .write(&record, &serde_json::to_vec(vol).unwrap_or_default())
        };
        if let Err(source) = write() {
            // Only what was made just now.
            let _ = std::fs::remove_dir_all(&root);
            return Err(VolumeError::Io { path: root, source });
        }
        // The new volume's name in the volume directory.
        self.shared.sync.dir(self.dir());
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Volume> {
        match self.lock().get(id) {
            Some(Slot::Ready(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// Every volume, oldest first.
    pub fn list(&self) -> Vec<Volume> {
        let mut v: Vec<Volume> = self
            .lock()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(v) => Some(v.clone()),
                _ => None,
            })
            .collect();
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

    /// Where volume `id`'s data is on the host (`None` also while it is being created or
    /// deleted).
    pub fn data_path(&self, id: &str) -> Option<PathBuf> {
        matches!(self.lock().get(id), Some(Slot::Ready(_)))
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

    /// Takes volume `id` out of service, in memory only (no I/O: called with the job
    /// table locked): it is gone for the API and no job can mount it. `None` for an unknown
    /// volume (or one being created or deleted). Its directory goes with
    /// [`Volumes::delete`]; until then its id stays taken.
    pub fn detach(&self, id: &str) -> Option<Detached> {
        let mut vols = self.lock();
        let slot = vols.get_mut(id)?;
        if !matches!(slot, Slot::Ready(_)) {
            return None;
        }
        match std::mem::replace(slot, Slot::Deleting) {
            Slot::Ready(vol) => Some(Detached {
                vols: self.clone(),
                vol: Some(vol),
            }),
            _ => unreachable!("checked above"),
        }
    }

    /// Renames a detached volume's directory to `.deleting-<id>-<nonce>` (from then on it is
    /// gone for a restarted daemon too, and its id is free), then removes it (blocking; may
    /// take a while for a big volume). When the rename fails the volume is back in service.
    pub fn delete(&self, d: Detached) -> Result<(), VolumeError> {
        let to = self.rename_away(d)?;
        self.purge(&to);
        Ok(())
    }

    /// The rename of [`Volumes::delete`] (one `rename`; the directory's fsync is left to
    /// the syncer): where the directory went.
    fn rename_away(&self, mut d: Detached) -> Result<PathBuf, VolumeError> {
        let vol = d.take();
        let id = vol.id.clone();
        let from = self.dir().join(&id);
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let to = self.dir().join(format!("{DELETING}{id}-{nonce}"));
        if let Err(source) = std::fs::rename(&from, &to) {
            self.lock().insert(id, Slot::Ready(vol));
            return Err(VolumeError::Io { path: from, source });
        }
        self.shared.sync.dir(self.dir());
        self.lock().remove(&id);
        Ok(to)
    }

    /// Removes a renamed volume's directory (blocking; may take a while for big volumes).
    fn purge(&self, path: &Path) {
        if let Err(e) = std::fs::remove_dir_all(path) {
            tracing::error!(path = %path.display(), error = %e, "removing a deleted volume failed");
        }
        self.shared.sync.dir(self.dir());
    }

    /// Deletes `job`'s `delete_on_stop` volumes: called as the job ends, before its end is
    /// in the job table (see `Host::release_volumes`), so no other job can take a volume
    /// between the job's end and its deletion. Blocking: not for a runtime thread, nor
    /// under the job table's lock. Each directory is renamed away here (one `rename`, its fsync left to the syncer), so
    /// a daemon that dies once the job's end is recorded does not find the volume again;
    /// its removal runs in the background (on the runtime's blocking pool, or at once
    /// without a runtime; a daemon that dies first leaves it to the next one's start).
    pub fn release(&self, job: &Job) {
        for b in job.config.volumes.iter().filter(|b| b.delete_on_stop) {
            let Some(d) = self.detach(&b.volume) else {
                continue;
            };
            tracing::info!(job = %job.id, volume = %b.volume, "deleting volume on stop");
            #[cfg(test)]
            self.shared.faults.rename.pass();
            let to = match self.rename_away(d) {
                Ok(to) => to,
                Err(e) => {
                    tracing::error!(job = %job.id, volume = %b.volume, error = ?e, "deleting volume on stop failed");
                    continue;
                }
            };
            let me = self.clone();
            let purge = move || {
                #[cfg(test)]
                me.shared.faults.release.pass();
                me.purge(&to);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(purge)),
                Err(_) => purge(),
            }
        }
    }

    /// Waits until every change so far is on disk.
    pub fn flush(&self) {
        self.shared.sync.flush();
    }

    /// TEST ONLY: where the volume I/O can be held up.
    #[cfg(test)]
    pub(crate) fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

/// TEST ONLY: points where the volume I/O can be held (as a stalled disk would).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    /// A create, just before its record is written (fsynced).
    pub write: Gate,
    /// The start-up removal of leftovers, before it begins.
    pub purge: Gate,
    /// The background part of [`Volumes::release`], before it begins.
    pub release: Gate,
    /// The rename of [`Volumes::release`], before it begins.
    pub rename: Gate,
}

/// TEST ONLY: while held, whoever passes waits (counted in `stalled`).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Gate {
    held: Mutex<bool>,
    cv: std::sync::Condvar,
    pub stalled: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Gate {
    pub fn hold(&self, on: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = on;
        self.cv.notify_all();
    }

    fn pass(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if *held {
            self.stalled
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        while *held {
            held = self.cv.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits (at most 10 s) until `n` callers are held here.
    pub fn wait_stalled(&self, n: usize) {
        let t0 = std::time::Instant::now();
        while self.stalled.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "never stalled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
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
}
