//! Control of a job's process: stops, signals, stdin and the terminal's size.

use std::sync::Arc;

use flynn_api::ApiError;
use tokio::sync::broadcast;

use crate::job::StopAction;
use crate::runtime::Stdin;

use super::{to_completion, Change, Host, SIGKILL, SIGTERM};

impl Host {
    /// `DELETE /host/jobs/:id`.
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        let (action, change) = {
            let mut inner = self.lock();
            let a = inner.table.request_stop(id)?;
            // Also when asked before (that stop is under way): the state is queued again
            // only to answer once that stop is recorded too.
            let change = inner
                .table
                .get(id)
                .cloned()
                .map(|j| self.record(&mut inner, &j));
            (a, change)
        };
        // The stop is in the table: the rest runs to its end whatever becomes of the request
        // (a handler dropped when its client gives up). Cut short while the record was
        // written, the job was never signalled, and every later `DELETE` found the stop
        // under way and answered 200 doing nothing.
        let host = self.clone();
        let id = id.to_string();
        to_completion(async move { host.stopped(id, action, change).await }).await;
        Ok(())
    }

    /// What follows `stop`'s table change: once the stop is recorded, the job is signalled
    /// (or a start waiting for the network is woken).
    async fn stopped(self: Arc<Self>, id: String, action: StopAction, change: Option<Change>) {
        // Answered, and the job signalled, once the stop is on disk: a daemon restarted
        // after the job's end then finds it asked to stop (done, not crashed).
        if let Some(c) = change {
            self.settle(c, None).await;
        }
        if action == StopAction::None {
            return;
        }
        // Wakes a start waiting for the network.
        self.stops.send_modify(|n| *n = n.wrapping_add(1));
        if action == StopAction::Signal {
            tokio::spawn(async move { self.stop_process(&id).await });
        }
    }

    /// Deregisters, SIGTERMs, and SIGKILLs after the job's stop timeout. From the start of
    /// it the job's output waits for no attached client: its end (the supervisor taking the
    /// last output and the exit) must not wait for the one client of a `disable_log` job
    /// that stopped reading.
    pub(super) async fn stop_process(self: Arc<Self>, id: &str) {
        self.unblock_attach(id);
        self.deregister(id).await;
        let (signal, timeout) = {
            let inner = self.lock();
            match inner.ctl.get(id) {
                Some(c) => (c.signal.clone(), c.stop_timeout),
                None => return,
            }
        };
        let Some(signal) = signal else { return };
        if let Err(e) = signal(SIGTERM) {
            tracing::debug!(job = %id, error = %e, "SIGTERM failed");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.events.subscribe();
        loop {
            if self.current(id).is_none_or(|j| j.status.is_terminal()) {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = rx.recv() => if matches!(r, Err(broadcast::error::RecvError::Closed)) { return },
            }
        }
        if self.current(id).is_some_and(|j| !j.status.is_terminal()) {
            tracing::info!(job = %id, "stop timeout passed; sending SIGKILL");
            if let Err(e) = signal(SIGKILL) {
                tracing::debug!(job = %id, error = %e, "SIGKILL failed");
            }
        }
    }

    /// Job `id`'s output waits for no attached client from now on ([`Attachments::unblock`]),
    /// if it has not ended: checked under the table lock, under which its end is shown and
    /// forgotten by the attach clients (`broadcast`), so the mark is never left behind for
    /// a job whose end came first (it was, for ever, and the job's id's next use started
    /// with its one client not holding its output up).
    ///
    /// [`Attachments::unblock`]: crate::attach::Attachments::unblock
    pub(crate) fn unblock_attach(&self, id: &str) {
        let inner = self.lock();
        if inner
            .recorded
            .get(id)
            .is_some_and(|(_, j)| !j.status.is_terminal())
        {
            self.attach.unblock(id);
        }
    }

    /// Jobs whose attach clients hold up no output, marked so while they run.
    #[cfg(test)]
    pub(crate) fn attach_stopping(&self) -> usize {
        self.attach.stopping()
    }

    /// TEST ONLY: whether job `id` has a control entry.
    #[cfg(test)]
    pub(crate) fn has_control(&self, id: &str) -> bool {
        self.lock().ctl.contains_key(id)
    }

    /// The stdin of job `id`, while its process lives and if it was created with one.
    pub fn stdin(&self, id: &str) -> Option<Stdin> {
        self.lock().ctl.get(id).and_then(|c| c.stdin.clone())
    }

    /// Sets the window size of TTY job `id`'s terminal, while its process lives; nothing
    /// for other jobs (a resize is no error: attach clients send them whatever the job).
    pub fn resize(&self, id: &str, rows: u16, cols: u16) {
        let resize = self.lock().ctl.get(id).and_then(|c| c.resize.clone());
        if let Some(r) = resize {
            r(rows, cols);
        }
    }

    /// `PUT /host/jobs/:id/signal/:sig`.
    pub fn signal(&self, id: &str, sig: i32) -> Result<(), ApiError> {
        // Checked here for every caller (attach frames carry any u32): only 1-64 are ever
        // queued, so the queue of 64 different signals can never be full, and the stop
        // path's SIGTERM and SIGKILL always find room.
        if !(1..=64).contains(&sig) {
            return Err(ApiError::validation(
                Some("signal"),
                "must be an integer 1-64",
            ));
        }
        let inner = self.lock();
        if inner.table.get(id).is_none() {
            return Err(ApiError::object_not_found("host: unknown job"));
        }
        let signal = inner
            .ctl
            .get(id)
            .and_then(|c| c.signal.clone())
            .ok_or_else(|| ApiError::conflict("host: job is not running"))?;
        drop(inner);
        signal(sig).map_err(|e| {
            // The job ended between the check above and the signal (its shim is gone, or
            // its process group): the same answer as a moment later.
            if e.raw_os_error() == Some(nix::libc::ESRCH)
                || self.current(id).is_none_or(|j| j.status.is_terminal())
            {
                return ApiError::conflict("host: job is not running");
            }
            // The job's queue of signals waiting for its runtime is full: cannot happen
            // with signals 1-64 (one place each), kept as an answer rather than a panic.
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return ApiError::new(
                    flynn_api::ErrorCode::Ratelimited,
                    "host: too many signals waiting for the job; try again",
                )
                .with_retry(true);
            }
            tracing::warn!(job = %id, sig, error = %e, "signal failed");
            ApiError::validation(Some("signal"), &format!("could not be sent: {e}"))
        })
    }
}
