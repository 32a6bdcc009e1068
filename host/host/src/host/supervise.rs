//! A job's process followed until it ends: its events, its output, its end recorded
//! and cleaned up after.

use std::sync::Arc;

use flynn_api::host::{EventKind, Job};

use crate::job::Exit;
use crate::logship::{now_rfc3339, Source};
use crate::runtime::{Handle, ProcEvent};

use super::{end_event, Ctl, Host, Running};

impl Host {
    /// Follows a job's process until it ends.
    pub(super) async fn supervise(self: Arc<Self>, job: Job, mut handle: Handle, r: Running) {
        let id = job.id.clone();
        {
            let mut inner = self.lock();
            // `discoverd-deregister` may have come while the job was starting.
            let deregistered = inner.ctl.get(&id).is_some_and(|c| c.deregistered);
            inner.ctl.insert(
                id.clone(),
                Ctl {
                    signal: Some(handle.signal.clone()),
                    stdin: handle.stdin.take(),
                    resize: handle.resize.take(),
                    stop_timeout: r.stop_timeout,
                    deregistered,
                    ..Ctl::default()
                },
            );
        }
        // A job being stopped before the restart is stopped again at once (its stop
        // deregistered it, or was about to, so it is not put back into discoverd below).
        let stopped_at_adoption = r.adopted && self.current(&id).is_some_and(|j| j.force_stop);
        if stopped_at_adoption {
            let host = self.clone();
            let id = id.clone();
            tokio::spawn(async move { host.stop_process(&id).await });
        }
        let src = Source::new(job.app_id(), job.process_type(), &id);
        let log = !job.config.disable_log;
        // The job's output, put together into lines for its log (clients get it as it
        // came). The events holding an incomplete line (a prompt) are not marked dealt with
        // until the line is complete (or cut, past `terminal::MAX_PARTIAL`), so the runtime
        // does not acknowledge them: a daemon that dies meanwhile leaves them to the next
        // one, and the log still gets the whole line.
        let mut log_lines = crate::terminal::LogLines::default();
        let mut end: Option<Result<Exit, String>> = None;
        let mut started = false;
        while let Some(ev) = handle.events.recv().await {
            // The job's last lines, if they had no newline, before its end; and partial
            // lines before output the runtime dropped (their newline may have been in it):
            // what comes after the gap starts a line of its own.
            let last = matches!(ev, ProcEvent::Exited { .. } | ProcEvent::Failed { .. });
            if (last || matches!(ev, ProcEvent::Dropped { .. })) && log {
                log_lines.finish(|s, l| self.logs.push(&src, s, l));
            }
            match ev {
                ProcEvent::Started { pid } => {
                    // An adopted job gets this too: its shim's first event, sent again to
                    // the new daemon (or made from its greeting once an earlier daemon
                    // acknowledged it). A job adopted as running stays as it is (no second
                    // `start` event); one adopted while starting runs from here.
                    // `stop_now`: asked to stop while starting, a stop that waited for the
                    // process; `stopping`: asked to stop at all (then never registered).
                    let (change, stop_now, stopping) = {
                        let mut inner = self.lock();
                        match inner.table.started(&id, pid, r.ip, now_rfc3339()).cloned() {
                            Some(j) => {
                                let change = self.record(&mut inner, &j);
                                (Some(change), j.force_stop, j.force_stop)
                            }
                            None => {
                                let stopping = inner.table.get(&id).is_some_and(|j| j.force_stop);
                                (None, false, stopping)
                            }
                        }
                    };
                    if let Some(c) = change {
                        self.settle(c, Some(EventKind::Start)).await;
                    }
                    self.attach.started(&id).await;
                    // A TTY job's terminal: the latest attached client's size, once (it
                    // started with it, unless a client attached since: the same size
                    // changes nothing).
                    if let Some((rows, cols)) = self.attach.size(&id) {
                        self.resize(&id, rows, cols);
                    }
                    let first = !started;
                    started = true;
                    if !r.adopted && first {
                        self.prepare_next();
                    }
                    // Registered once the job is recorded and announced as running, adopted
                    // or not (an adopted job used to be registered before its shim had said
                    // anything: one that had ended meanwhile, or never started, was put in
                    // discoverd). A job asked to stop is not announced at all.
                    if first && !stopping {
                        self.register_services(&id, &r);
                    }
                    // Not twice for a job adopted while being stopped (stopped above).
                    if stop_now && !stopped_at_adoption {
                        let host = self.clone();
                        let id = id.clone();
                        tokio::spawn(async move { host.stop_process(&id).await });
                    }
                }
                // Attached clients get the output as it came. The only client of a
                // `disable_log` job holds the output up until it has room for it, so the
                // event is not dealt with before: the runtime stops reading the job's output
                // and the job blocks on its writes.
                ProcEvent::Output {
                    stream,
                    line,
                    newline,
                } => {
                    if !self.fault_slow_output.is_zero() {
                        tokio::time::sleep(self.fault_slow_output).await;
                    }
                    if log {
                        log_lines.output(stream, &line, newline, |s, l| self.logs.push(&src, s, l));
                    }
                    self.attach.output(&id, stream, &line, newline).await;
                }
                ProcEvent::Terminal { data } => {
                    if log {
                        log_lines.terminal(&data, |s, l| self.logs.push(&src, s, l));
                    }
                    self.attach.terminal(&id, &data).await;
                }
                ProcEvent::Dropped { count } => self.logs.count_dropped(count),
                ProcEvent::Exited {
                    code,
                    signal,
                    oom_killed,
                } => {
                    end = Some(Ok(Exit {
                        code,
                        signal,
                        oom_killed,
                    }));
                }
                ProcEvent::Failed { reason } => end = Some(Err(reason)),
            }
            // Dealt with (its output handed to the host's log): the runtime may acknowledge it,
            // and the events held back for a line that is now complete (or cut).
            let done = if log { log_lines.release() } else { 1 };
            for _ in 0..done {
                handle.handled.mark();
            }
            if last {
                break;
            }
        }
        if !r.adopted && !started {
            self.prepare_next();
        }
        if log {
            log_lines.finish(|s, l| self.logs.push(&src, s, l));
        }
        let end = end.unwrap_or_else(|| Err("lost contact with the job".into()));
        self.release_volumes(&id).await;
        // The end is recorded (persisted, then announced) before anything else: a daemon
        // that dies during the cleanup below restores the job as ended (not as lost), and a
        // slow discoverd or runtime cleanup does not hold back the stop event.
        let change = {
            let mut inner = self.lock();
            if let Some(c) = inner.ctl.get_mut(&id) {
                // Nothing left to signal, and nothing to announce to a discoverd that
                // turns up before the deregistration below.
                c.signal = None;
                c.stdin = None;
                c.resize = None;
                c.announce = None;
            }
            // Without an exit (the runtime lost the job): failed if it never ran, crashed
            // if it did, done if it was being stopped.
            let j = match end {
                Ok(exit) => inner.table.exited(&id, exit, now_rfc3339()).cloned(),
                Err(reason) => inner.table.failed(&id, reason, now_rfc3339()).cloned(),
            };
            j.map(|j| {
                tracing::info!(job = %id, status = j.status.as_str(), exit = ?j.exit_status, error = ?j.error, "job ended");
                let change = self.record(&mut inner, &j);
                self.gc(&mut inner, &j);
                change
            })
        };
        if let Some(c) = change {
            let kind = end_event(c.job.status);
            self.settle(c, Some(kind)).await;
        }
        // Then its instances leave discoverd and the runtime removes what is left of the
        // container (state, rootfs, cgroup), then its namespace and veth go (the kernel's
        // teardown of those takes ~10–20 ms). Its address stays allocated until then; a
        // daemon that dies in between finishes the cleanup when it restores the job (see
        // `restore`).
        let t0 = std::time::Instant::now();
        self.deregister(&id).await;
        self.lock().ctl.remove(&id);
        // After the deregistration above, so nothing it does is left behind.
        self.forget_deregistration(&id);
        let t_dereg = t0.elapsed();
        let rt = self.runtime.clone();
        let cid = id.clone();
        let _ = tokio::task::spawn_blocking(move || rt.cleanup(&cid)).await;
        let t_cleanup = t0.elapsed();
        if self.fault_exit_before_teardown {
            tracing::warn!(job = %id, "fault injection: exiting before the network teardown");
            std::process::exit(3);
        }
        self.teardown(&id, r.ip.is_some()).await;
        tracing::debug!(job = %id, deregister = ?t_dereg, cleanup = ?(t_cleanup - t_dereg), network = ?(t0.elapsed() - t_cleanup), "job end phases");
    }
}
