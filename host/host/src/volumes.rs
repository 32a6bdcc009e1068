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
mod tests;
