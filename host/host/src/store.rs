//! The daemon's persistent state: one JSON file per job under `<state-dir>/jobs/`,
//! written atomically (temp file + rename), so a restarted daemon knows its jobs.

use std::path::{Path, PathBuf};

use flynn_api::host::ActiveJob;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Store { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn save(&self, job: &ActiveJob) -> Result<(), StoreError> {
        let path = self.path(&job.job.id);
        let tmp = self.dir.join(format!(".{}.tmp", job.job.id));
        let data = serde_json::to_vec(job).unwrap_or_default();
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        // Written, synced, renamed, and the directory synced: after a crash the file is the
        // old state or the new one, never empty or torn.
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(io)
    }

    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.path(id));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut j = ActiveJob::default();
        j.job.id = "h-1".into();
        j.status = flynn_api::host::JobStatus::Running;
        s.save(&j).unwrap();
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
        assert!(s.load().is_empty());
    }
}
