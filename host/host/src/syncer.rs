//! Group commit for the daemon's small state files.
//!
//! Every state file (a job's record, the address allocator) is written to a temporary file
//! and renamed into place before the change is used or announced, so a crash of the daemon
//! loses nothing: the kernel holds the new file. Making it survive a power loss takes two
//! fsyncs (the file, then its directory) of ~1–10 ms each on ordinary disks; doing them
//! inline put six of them on every job start. Instead the writer marks the path here and a
//! background thread fsyncs everything marked since its last pass, each directory once, so
//! concurrent changes share one round of fsyncs and none of them waits for it. A power loss
//! can lose the last few milliseconds of changes — and it also ends every job they describe.
//! [`Syncer::flush`] waits until everything marked before it is durable (shutdown, tests).

use crate::worker::{Closes, Worker};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    /// Passes asked for (bumped by every mark) and passes completed.
    wanted: u64,
    done: u64,
    closed: bool,
    /// fsyncs that failed (a failing disk: logged once per pass, counted for tests).
    errors: u64,
    /// Paths written through [`Syncer::write`] (tests: which files take the fsynced path).
    #[cfg(test)]
    written: Vec<PathBuf>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Closes for Shared {
    fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }
}

/// Cheap to clone; the thread ends when the last clone is dropped (after a final pass).
#[derive(Clone)]
pub struct Syncer {
    owner: Arc<Worker<Shared>>,
}

impl Syncer {
    pub fn start() -> Syncer {
        let shared = Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            finished: Condvar::new(),
        };
        Syncer {
            owner: Worker::spawn("state-sync", shared, run),
        }
    }

    fn shared(&self) -> &Shared {
        &self.owner.shared
    }

    /// Writes `bytes` to `path` through a temp file, fsynced, renamed into place (a crash
    /// finds the old content or the new, never a torn or empty file), then has the
    /// directory (and the file again) fsynced in the next pass.
    pub fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        // A temporary name of this write's own: two writers of one file (two API calls at
        // once) must not rename each other's half-written file, or fail on a rename of a
        // name the other already moved.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.{n}.tmp"));
        let written = (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Owner only: job records hold each job's environment, secrets among it.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            // The data reaches the disk before the rename can: a rename whose file data was
            // never written can leave an empty file after a power cut (XFS; ext4 mounted
            // `noauto_da_alloc`), and an empty state file stops the daemon's next start.
            f.sync_data()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            // No temporary file left behind per failed write (a full disk, retried).
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        #[cfg(test)]
        self.shared().lock().written.push(path.to_path_buf());
        self.file(path);
        Ok(())
    }

    /// `path` was just written and renamed into place: fsync it and its directory.
    pub fn file(&self, path: &Path) {
        let mut st = self.shared().lock();
        st.files.insert(path.to_path_buf());
        if let Some(d) = path.parent() {
            st.dirs.insert(d.to_path_buf());
        }
        st.wanted += 1;
        drop(st);
        self.shared().work.notify_one();
    }

    /// An entry of `dir` was created, renamed or removed: fsync the directory.
    pub fn dir(&self, dir: &Path) {
        let mut st = self.shared().lock();
        st.dirs.insert(dir.to_path_buf());
        st.wanted += 1;
        drop(st);
        self.shared().work.notify_one();
    }

    /// Waits until everything marked before this call has been fsynced.
    pub fn flush(&self) {
        let sh = self.shared();
        let mut st = sh.lock();
        let target = st.wanted;
        while st.done < target && !st.closed {
            st = sh.finished.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// fsyncs that failed so far.
    pub fn errors(&self) -> u64 {
        self.shared().lock().errors
    }

    /// TEST ONLY: the paths written through [`Syncer::write`] so far, in order.
    #[cfg(test)]
    pub(crate) fn written(&self) -> Vec<PathBuf> {
        self.shared().lock().written.clone()
    }
}

fn run(sh: &Shared) {
    loop {
        let (files, dirs, upto) = {
            let mut st = sh.lock();
            while st.done == st.wanted && !st.closed {
                st = sh.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.done == st.wanted && st.closed {
                return;
            }
            (
                std::mem::take(&mut st.files),
                std::mem::take(&mut st.dirs),
                st.wanted,
            )
        };
        let mut failed = 0u64;
        // Files first, then the directories holding their new names.
        for f in &files {
            match std::fs::File::open(f) {
                Ok(h) => {
                    if let Err(e) = h.sync_data() {
                        failed += 1;
                        tracing::error!(path = %f.display(), error = %e, "fsync of state failed");
                    }
                }
                // Removed since (a finished job collected): nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed += 1;
                    tracing::error!(path = %f.display(), error = %e, "opening state to fsync failed");
                }
            }
        }
        for d in &dirs {
            if let Err(e) = std::fs::File::open(d).and_then(|h| h.sync_all()) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    failed += 1;
                    tracing::error!(path = %d.display(), error = %e, "fsync of state directory failed");
                }
            }
        }
        let mut st = sh.lock();
        st.errors += failed;
        st.done = upto;
        drop(st);
        sh.finished.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_of_one_file_at_once_never_fail_or_mix() {
        let d = tempfile::tempdir().unwrap();
        let s = Syncer::start();
        let p = d.path().join("x.json");
        std::thread::scope(|sc| {
            for t in 0..4u8 {
                let (s, p) = (&s, &p);
                sc.spawn(move || {
                    for _ in 0..200 {
                        s.write(p, &[t; 4096]).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(got.len() == 4096 && got.iter().all(|b| *b == got[0]));
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "x.json")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn flush_waits_for_marked_files_and_the_thread_ends_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let s = Syncer::start();
        let p = d.path().join("a.json");
        std::fs::write(&p, b"{}").unwrap();
        for _ in 0..100 {
            s.file(&p);
        }
        s.dir(d.path());
        // A path removed before its pass is not an error.
        s.file(&d.path().join("gone.json"));
        s.flush();
        {
            let st = s.shared().lock();
            assert_eq!(st.done, st.wanted);
            assert_eq!(st.wanted, 102);
            assert!(st.files.is_empty() && st.dirs.is_empty());
        }
        assert_eq!(s.errors(), 0);
        let shared = s.owner.shared.clone();
        let clone = s.clone();
        drop(s);
        assert!(!shared.lock().closed, "a clone keeps it open");
        drop(clone);
        assert!(shared.lock().closed);
    }

    #[test]
    fn flush_with_nothing_marked_returns() {
        let s = Syncer::start();
        s.flush();
        assert_eq!(s.errors(), 0);
    }
}
