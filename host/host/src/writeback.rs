//! Write-behind for the job records: the writes (temp file, `fdatasync`, rename, through the
//! [`Syncer`]) and removals of `<state-dir>/jobs/<id>.json` happen on a thread of their own,
//! never on a runtime thread or under the job table's lock.
//!
//! A record change is queued under the table lock ([`Writeback::queue`]), so the queue sees a
//! job's changes in the order the table made them; the caller then lets the lock go and waits
//! for its [`Ticket`] before it announces the change (an event, an API answer). Per path only
//! the newest queued operation is kept: a change queued while an older one for the same file
//! waits replaces it (both tickets answer with its outcome), and one queued while an older
//! one is being written is done after it. One thread does them in order, so the last write of
//! a record is always its newest state, never an older one written late. A slow or stalled
//! disk holds up only the callers waiting for their own records.
//!
//! A write that fails (a full or failing disk) is reported to its tickets and kept: it is
//! tried again 1 s, 2 s, 4 s, 8 s, then every 10 s later, until it works or a newer operation
//! for the path replaces it, so the file a restarted daemon reads catches up with the job.
//! A replacing operation's pauses start again from 1 s. A panic while an operation is done
//! counts as its failure: the thread lives on, so every ticket is answered.
//! A removal that fails is reported and logged, not tried again.
//! [`Writeback::flush`] tries everything queued at once and waits for it (shutdown, tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::syncer::Syncer;
use crate::worker::{Closes, Worker};

/// Why a queued operation did not reach the disk.
#[derive(Debug, Clone, thiserror::Error)]
#[error("writing {path}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: Arc<std::io::Error>,
}

/// What is done to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Its whole new content.
    Write(Vec<u8>),
    /// Removed (gone already counts as done).
    Remove,
}

/// The outcome of a queued operation, or of the newer one for the same path that replaced it.
#[must_use = "a record change is announced only once its ticket says it is written"]
pub struct Ticket {
    path: PathBuf,
    rx: oneshot::Receiver<Result<(), Arc<std::io::Error>>>,
}

impl Ticket {
    /// Waits until the operation is done (or failed; it is then tried again in the
    /// background).
    pub async fn wait(self) -> Result<(), WriteError> {
        let r = self.rx.await;
        Self::outcome(self.path, r)
    }

    /// [`Ticket::wait`] for a thread that is not a runtime's.
    pub fn wait_blocking(self) -> Result<(), WriteError> {
        let r = self.rx.blocking_recv();
        Self::outcome(self.path, r)
    }

    fn outcome(
        path: PathBuf,
        r: Result<Result<(), Arc<std::io::Error>>, oneshot::error::RecvError>,
    ) -> Result<(), WriteError> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(WriteError { path, source }),
            Err(_) => Err(WriteError {
                path,
                source: Arc::new(std::io::Error::other("the state writer stopped")),
            }),
        }
    }
}

type Waiter = oneshot::Sender<Result<(), Arc<std::io::Error>>>;

struct Entry {
    op: Op,
    waiters: Vec<Waiter>,
    /// Failed tries of this path's operations so far (the pause before the next grows).
    failures: u32,
    /// When it is tried again after a failure; `None`: as soon as the thread gets to it.
    due: Option<Instant>,
}

#[derive(Default)]
struct State {
    queue: BTreeMap<PathBuf, Entry>,
    /// A batch taken off the queue is being done.
    busy: bool,
    closed: bool,
}

impl State {
    fn ready(&self, now: Instant) -> bool {
        self.queue.values().any(|e| e.due.is_none_or(|d| d <= now))
    }
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    idle: Condvar,
    sync: Syncer,
    #[cfg(test)]
    faults: Faults,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// TEST ONLY: a disk that fails or stalls.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    /// Writes still to fail.
    pub(crate) fail: std::sync::atomic::AtomicU32,
    /// Operations still to panic (a bug in the writer or the syncer).
    pub(crate) panic: std::sync::atomic::AtomicU32,
    /// While set, every operation waits before it starts (a disk that stopped answering).
    hold: Mutex<bool>,
    held: Condvar,
    /// Operations waiting at `hold` now.
    pub(crate) stalled: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Faults {
    pub(crate) fn hold(&self, on: bool) {
        *self.hold.lock().unwrap() = on;
        self.held.notify_all();
    }

    fn apply(&self, op: &Op) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .panic
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("injected writer panic");
        }
        let mut hold = self.hold.lock().unwrap();
        if *hold {
            self.stalled.fetch_add(1, SeqCst);
            while *hold {
                hold = self.held.wait(hold).unwrap();
            }
            self.stalled.fetch_sub(1, SeqCst);
        }
        let fail = matches!(op, Op::Write(_))
            && self
                .fail
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if fail {
            return Err(std::io::Error::other("injected write failure"));
        }
        Ok(())
    }
}

impl Closes for Shared {
    fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }
}

/// Cheap to clone; the thread ends when the last clone is dropped, after one last try of
/// everything still queued.
#[derive(Clone)]
pub struct Writeback {
    owner: Arc<Worker<Shared>>,
}

impl Writeback {
    /// Writes go through `sync` (data fsynced before the rename, directories by its passes).
    pub fn start(sync: Syncer) -> Writeback {
        let shared = Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            sync,
            #[cfg(test)]
            faults: Faults::default(),
        };
        Writeback {
            owner: Worker::spawn("state-write", shared, run),
        }
    }

    fn shared(&self) -> &Shared {
        &self.owner.shared
    }

    /// Queues `op` for `path`, replacing an older operation still waiting for it. Never
    /// blocks on the disk.
    pub fn queue(&self, path: &Path, op: Op) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let mut st = self.shared().lock();
        match st.queue.get_mut(path) {
            Some(e) => {
                // A new operation: tried at once, and its pauses after failures start
                // again from 1 s (an older one's count made them up to 10 s from the first).
                e.op = op;
                e.waiters.push(tx);
                e.failures = 0;
                e.due = None;
            }
            None => {
                st.queue.insert(
                    path.to_path_buf(),
                    Entry {
                        op,
                        waiters: vec![tx],
                        failures: 0,
                        due: None,
                    },
                );
            }
        }
        drop(st);
        self.shared().work.notify_one();
        Ticket {
            path: path.to_path_buf(),
            rx,
        }
    }

    /// Tries everything queued now (failed writes too, without waiting for their next try)
    /// and waits until that is done; true when nothing is left failing.
    pub fn flush(&self) -> bool {
        let sh = self.shared();
        let mut st = sh.lock();
        for e in st.queue.values_mut() {
            e.due = None;
        }
        sh.work.notify_one();
        while st.busy || st.ready(Instant::now()) {
            if st.closed {
                break;
            }
            st = sh.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.queue.is_empty()
    }

    /// TEST ONLY: the disk's faults.
    #[cfg(test)]
    pub(crate) fn faults(&self) -> &Faults {
        &self.shared().faults
    }
}

/// The pause before the next try after `failures` failed ones: 1 s doubling up to 10 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(4)).min(Duration::from_secs(10))
}

fn apply(sh: &Shared, path: &Path, op: &Op) -> std::io::Result<()> {
    #[cfg(test)]
    sh.faults.apply(op)?;
    match op {
        Op::Write(bytes) => sh.sync.write(path, bytes),
        Op::Remove => match std::fs::remove_file(path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sh.sync.dir(dir);
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// [`apply`], a panic in it (the writer's or the syncer's) turned into a failed operation:
/// the thread lives on, so every ticket is answered. A writer that died used to leave every
/// later ticket unanswered, and what waited for one (a new job, a stop) hung.
fn apply_caught(sh: &Shared, path: &Path, op: &Op) -> std::io::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(sh, path, op))).unwrap_or_else(
        |p| {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(std::io::Error::other(format!(
                "the state writer panicked: {what}"
            )))
        },
    )
}

fn run(sh: &Shared) {
    loop {
        let batch: Vec<(PathBuf, Entry)> = {
            let mut st = sh.lock();
            loop {
                let now = Instant::now();
                // Closing: one last try of everything, whenever it was due.
                let closing = st.closed;
                let ready: Vec<PathBuf> = st
                    .queue
                    .iter()
                    .filter(|(_, e)| closing || e.due.is_none_or(|d| d <= now))
                    .map(|(p, _)| p.clone())
                    .collect();
                if !ready.is_empty() {
                    st.busy = true;
                    break ready
                        .into_iter()
                        .filter_map(|p| st.queue.remove(&p).map(|e| (p, e)))
                        .collect();
                }
                if closing {
                    return;
                }
                let next = st.queue.values().filter_map(|e| e.due).min();
                st = match next {
                    Some(d) => {
                        sh.work
                            .wait_timeout(st, d.saturating_duration_since(now))
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => sh.work.wait(st).unwrap_or_else(|e| e.into_inner()),
                };
            }
        };
        let done: Vec<_> = batch
            .into_iter()
            .map(|(path, e)| {
                let r = apply_caught(sh, &path, &e.op);
                (path, e, r)
            })
            .collect();
        let mut answers = Vec::new();
        let mut st = sh.lock();
        st.busy = false;
        let now = Instant::now();
        for (path, mut e, r) in done {
            let waiters = std::mem::take(&mut e.waiters);
            match r {
                Ok(()) => {
                    if e.failures > 0 {
                        tracing::info!(path = %path.display(), failures = e.failures, "state written after earlier failures");
                    }
                    answers.push((waiters, Ok(())));
                }
                Err(err) => {
                    e.failures += 1;
                    if st.closed {
                        tracing::error!(path = %path.display(), error = %err, "state not written; the next daemon finds it as last written");
                    } else if st.queue.contains_key(&path) {
                        // A newer operation for the path came meanwhile: it replaces this.
                    } else if e.op == Op::Remove {
                        // Not tried again: what it leaves is a record of a job that has
                        // ended or never started, which the next daemon handles as such.
                        tracing::warn!(path = %path.display(), error = %err, "removing state failed");
                    } else {
                        let pause = backoff(e.failures);
                        tracing::error!(path = %path.display(), error = %err, retry_in = ?pause, "writing state failed; trying again");
                        e.due = Some(now + pause);
                        st.queue.insert(path.clone(), e);
                    }
                    answers.push((waiters, Err(Arc::new(err))));
                }
            }
        }
        drop(st);
        sh.idle.notify_all();
        for (waiters, r) in answers {
            for w in waiters {
                let _ = w.send(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;

    fn stalled(w: &Writeback, n: usize) {
        let t0 = Instant::now();
        while w.faults().stalled.load(SeqCst) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the writer never got to it"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// However changes of one record are queued (while it waits, while an older one is
    /// being written), the file ends with the newest, and every ticket is answered.
    #[test]
    fn the_newest_state_is_written_last() {
        let d = tempfile::tempdir().unwrap();
        let w = Writeback::start(Syncer::start());
        let p = d.path().join("j.json");
        let other = d.path().join("k.json");
        w.faults().hold(true);
        // "1" is taken and stalls on the disk; "2" waits; "3" replaces it.
        let t1 = w.queue(&p, Op::Write(b"1".to_vec()));
        stalled(&w, 1);
        let t2 = w.queue(&p, Op::Write(b"2".to_vec()));
        let t3 = w.queue(&p, Op::Write(b"3".to_vec()));
        let tk = w.queue(&other, Op::Write(b"k".to_vec()));
        assert!(!p.exists(), "written while the disk stalls");
        w.faults().hold(false);
        for t in [t1, t2, t3, tk] {
            t.wait_blocking().unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"3");
        assert_eq!(std::fs::read(&other).unwrap(), b"k");
        // From many threads at once, each queueing its own growing sequence under one lock
        // (as the job table does): the last queued is what stays.
        let order = Mutex::new(0u32);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let t = {
                            let mut n = order.lock().unwrap();
                            *n += 1;
                            w.queue(&p, Op::Write(n.to_string().into_bytes()))
                        };
                        t.wait_blocking().unwrap();
                    }
                });
            }
        });
        assert!(w.flush());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "800");
        // A removal queued after a write is the last word too.
        w.faults().hold(true);
        let tw = w.queue(&other, Op::Write(b"k2".to_vec()));
        stalled(&w, 1);
        let tr = w.queue(&other, Op::Remove);
        w.faults().hold(false);
        tw.wait_blocking().unwrap();
        tr.wait_blocking().unwrap();
        assert!(!other.exists());
    }

    /// A failed write is reported to its ticket and tried again until it works; a newer
    /// operation replaces it.
    #[test]
    fn failed_writes_are_tried_again() {
        let d = tempfile::tempdir().unwrap();
        let w = Writeback::start(Syncer::start());
        let p = d.path().join("j.json");
        w.faults().fail.store(1, SeqCst);
        let e = w.queue(&p, Op::Write(b"1".to_vec())).wait_blocking();
        assert_eq!(e.unwrap_err().path, p);
        assert!(!p.exists());
        // Tried again after a second.
        let t0 = Instant::now();
        while !p.exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"1");
        // Failing again, then replaced by a removal before its next try.
        w.faults().fail.store(1, SeqCst);
        assert!(w
            .queue(&p, Op::Write(b"2".to_vec()))
            .wait_blocking()
            .is_err());
        w.queue(&p, Op::Remove).wait_blocking().unwrap();
        assert!(w.flush(), "the failed write was replaced");
        assert!(!p.exists());
        // `flush` tries a failed write at once and says whether it worked. The disk fails
        // every write until it is healed: a timed retry that comes before the flush (1 s
        // after the failure, when this thread is held up) fails too and changes nothing.
        w.faults().fail.store(u32::MAX, SeqCst);
        assert!(w
            .queue(&p, Op::Write(b"3".to_vec()))
            .wait_blocking()
            .is_err());
        assert!(!w.flush(), "failed again");
        assert!(!p.exists());
        healed(&w);
        assert!(w.flush(), "not tried at once");
        assert_eq!(std::fs::read(&p).unwrap(), b"3");
    }

    /// Makes writes work again, and waits until no try that may have seen the disk failing
    /// is still under way (its failure would be queued for a later try, not flushed).
    fn healed(w: &Writeback) {
        w.faults().fail.store(0, SeqCst);
        let t0 = Instant::now();
        while w.shared().lock().busy {
            assert!(t0.elapsed() < Duration::from_secs(5), "a try never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The failures and next try of the operation queued for `p`, once it is not being tried.
    fn queued(w: &Writeback, p: &Path) -> (u32, Instant) {
        let t0 = Instant::now();
        loop {
            if let Some(e) = w.shared().lock().queue.get(p) {
                return (e.failures, e.due.expect("tried again later"));
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "nothing queued");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A panic while an operation is done fails that operation (tried again like any failed
    /// write) and the writer lives on: a thread that died left every later ticket unanswered.
    #[test]
    fn a_panic_in_a_write_fails_it_and_the_writer_lives_on() {
        let d = tempfile::tempdir().unwrap();
        let w = Writeback::start(Syncer::start());
        let p = d.path().join("j.json");
        let other = d.path().join("k.json");
        w.faults().panic.store(1, SeqCst);
        let wait = |t: Ticket| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(t.wait_blocking());
            });
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a ticket never answered")
        };
        let e = wait(w.queue(&p, Op::Write(b"1".to_vec()))).unwrap_err();
        assert!(
            e.source.to_string().contains("injected writer panic"),
            "{e:?}"
        );
        wait(w.queue(&other, Op::Write(b"k".to_vec()))).unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"k");
        // The failed write is kept and tried again.
        assert!(w.flush());
        assert_eq!(std::fs::read(&p).unwrap(), b"1");
    }

    /// An operation that replaces a failed one waiting for its next try starts its pauses
    /// afresh: it kept the older one's count, so its first retry could come 10 s later
    /// rather than 1 s.
    #[test]
    fn a_replacing_operation_starts_its_backoff_afresh() {
        let d = tempfile::tempdir().unwrap();
        let w = Writeback::start(Syncer::start());
        let p = d.path().join("j.json");
        // The disk fails every write until it is healed: a timed retry that comes between
        // this thread's steps (when it is held up for a second or more) fails too.
        w.faults().fail.store(u32::MAX, SeqCst);
        assert!(w
            .queue(&p, Op::Write(b"1".to_vec()))
            .wait_blocking()
            .is_err());
        for _ in 0..5 {
            assert!(!w.flush());
        }
        // Six failures or more: its next try is 10 s away.
        let (before, _) = queued(&w, &p);
        assert!(before >= 6, "{before} failures");
        // Replaced, and failing.
        assert!(w
            .queue(&p, Op::Write(b"2".to_vec()))
            .wait_blocking()
            .is_err());
        let answered = Instant::now();
        let (failures, due) = queued(&w, &p);
        // Counted afresh: one failure, or a few more when this thread was held up for
        // seconds and timed retries (1 s, 3 s, 7 s … after the failure) failed meanwhile;
        // the older count went on from `before`.
        assert!(
            failures < before,
            "{failures} failures, {before} before the replacement"
        );
        if failures == 1 {
            // Its next try was set when it failed, before its ticket was answered.
            assert!(
                due <= answered + Duration::from_secs(1),
                "next try in {:?}",
                due.saturating_duration_since(answered)
            );
        }
        healed(&w);
        assert!(w.flush());
        assert_eq!(std::fs::read(&p).unwrap(), b"2");
    }

    #[test]
    fn the_backoff_grows_to_ten_seconds() {
        let s: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 10, 10, 10]);
    }
}
