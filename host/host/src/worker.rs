//! A background thread that lives as long as the handles to it: [`Worker`] owns the
//! thread and its shared state, and its drop (that of the last handle's `Arc`) closes the
//! state and joins the thread. The syncer and the job-record writer are such threads.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The state a [`Worker`]'s thread runs on.
pub(crate) trait Closes: Send + Sync + 'static {
    /// Tells the thread to finish (it ends after its last pass) and wakes it.
    fn close(&self);
}

pub(crate) struct Worker<S: Closes> {
    pub(crate) shared: Arc<S>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<S: Closes> Worker<S> {
    /// Starts thread `name` running `run` on `shared`.
    pub(crate) fn spawn(name: &str, shared: S, run: fn(&S)) -> Arc<Worker<S>> {
        let shared = Arc::new(shared);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&s))
            .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"));
        Arc::new(Worker {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl<S: Closes> Drop for Worker<S> {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}
