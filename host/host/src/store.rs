//! The daemon's persistent state: one JSON file per job under `<state-dir>/jobs/`, written
//! atomically (temp file + `fdatasync` + rename) by the [`Writeback`] thread, off the
//! runtime and the job table's lock; the job table waits for a change's [`Ticket`] before
//! it announces the change, so a restarted daemon knows its jobs as announced. Directories
//! are fsynced in group commits by the [`Syncer`].

use std::path::{Path, PathBuf};

use flynn_api::host::ActiveJob;

use crate::syncer::Syncer;
use crate::writeback::{Op, Ticket, Writeback};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    sync: Syncer,
    records: Writeback,
}

impl Store {
    pub fn open(state_dir: &Path, sync: Syncer) -> Result<Store, StoreError> {
        let dir = state_dir.join("jobs");
        crate::private_dir(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        sweep_temporaries(&dir);
        Ok(Store {
            dir,
            records: Writeback::start(sync.clone()),
            sync,
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Queues `job` to be written over its record; the ticket says when it is in place
    /// (a failed write is tried again in the background until it works or a newer state
    /// of the job replaces it). Call it under the job table's lock, so the records are
    /// written in the table's order; wait for the ticket without it.
    pub fn save(&self, job: &ActiveJob) -> Ticket {
        let data = serde_json::to_vec(job).unwrap_or_default();
        self.records.queue(&self.path(&job.job.id), Op::Write(data))
    }

    /// Whether a record of job `id` is on disk, readable or not.
    pub fn exists(&self, id: &str) -> bool {
        self.path(id).exists()
    }

    /// Job `id`'s record as plain JSON, for one that does not load as a job (fields from a
    /// newer version): `None` when it is not JSON at all.
    pub fn raw(&self, id: &str) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Queues the removal of job `id`'s record, after any write of it queued before.
    pub fn remove(&self, id: &str) {
        // Nothing waits for it: a record left by a failed removal is an ended job's, which
        // the next daemon loads as ended and collects again.
        drop(self.records.queue(&self.path(id), Op::Remove));
    }

    /// The syncer the store's files go through (for the daemon's other state files).
    pub fn syncer(&self) -> &Syncer {
        &self.sync
    }

    /// Waits until every save and removal so far is on disk (failed ones tried once more);
    /// false when some could not be written. Blocks: not for a runtime thread.
    pub fn flush(&self) -> bool {
        let written = self.records.flush();
        self.sync.flush();
        written
    }

    /// TEST ONLY: the record disk's faults (failing or stalled writes).
    #[cfg(test)]
    pub(crate) fn faults(&self) -> &crate::writeback::Faults {
        self.records.faults()
    }

    /// Every stored job; unreadable files are logged and skipped (never deleted).
    pub fn load(&self) -> Vec<ActiveJob> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            // The id names files, cgroups and namespaces: one that is not valid, or not the
            // file's own name (it could never be saved over or removed), is not trusted.
            let stem = p.file_stem().and_then(|x| x.to_str()).unwrap_or("");
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ActiveJob>(&b).map_err(|e| e.to_string()))
                .and_then(|j| {
                    if !crate::job::valid_id(&j.job.id) || j.job.id != stem {
                        Err(format!(
                            "job id {:?} does not match the file name",
                            j.job.id
                        ))
                    } else {
                        Ok(j)
                    }
                }) {
                Ok(j) => out.push(j),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "skipping unreadable job state")
                }
            }
        }
        out
    }
}

/// Removes the temporary files of record writes that a crash (or a power cut) cut short
/// (`.<id>.json.<n>.tmp`, see `Syncer::write`): nothing reads them, and each holds a job's
/// environment, secrets among it. Only a daemon starting up calls this, before any write.
fn sweep_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a leftover temporary record");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record write cut short by a crash leaves its temporary file (a job's environment
    /// in it); the next daemon's store removes it, and only such files.
    #[test]
    fn leftover_temporary_records_are_removed_at_open() {
        let d = tempfile::tempdir().unwrap();
        let jobs = d.path().join("jobs");
        std::fs::create_dir_all(&jobs).unwrap();
        std::fs::write(jobs.join(".h-1.json.7.tmp"), b"{\"half").unwrap();
        std::fs::write(jobs.join("h-2.json"), b"{}").unwrap();
        let _s = Store::open(d.path(), Syncer::start()).unwrap();
        assert!(!jobs.join(".h-1.json.7.tmp").exists(), "left behind");
        assert!(jobs.join("h-2.json").exists(), "a record was removed");
    }

    #[test]
    fn round_trip_and_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), Syncer::start()).unwrap();
        let mut j = ActiveJob::default();
        j.job.id = "h-1".into();
        j.status = flynn_api::host::JobStatus::Running;
        s.save(&j).wait_blocking().unwrap();
        // In place as soon as its ticket says so (what a restarted daemon reads), before
        // any fsync pass of its directory.
        assert_eq!(
            serde_json::from_slice::<ActiveJob>(
                &std::fs::read(d.path().join("jobs/h-1.json")).unwrap()
            )
            .unwrap(),
            j
        );
        assert!(s.flush());
        std::fs::write(d.path().join("jobs/bad.json"), b"{nope").unwrap();
        let loaded = s.load();
        assert_eq!(loaded, vec![j.clone()]);
        assert!(d.path().join("jobs/bad.json").exists());
        // A file whose job id is not its name, or not a valid id, is skipped.
        let mut other = j.clone();
        other.job.id = "../../evil".into();
        std::fs::write(
            d.path().join("jobs/x.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        other.job.id = "h-2".into();
        std::fs::write(
            d.path().join("jobs/h-3.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert_eq!(s.load(), vec![j.clone()]);
        std::fs::remove_file(d.path().join("jobs/x.json")).unwrap();
        std::fs::remove_file(d.path().join("jobs/h-3.json")).unwrap();
        assert!(!d.path().join("jobs/.h-1.tmp").exists());
        s.remove("h-1");
        assert!(s.flush());
        assert!(s.load().is_empty());
    }
}
