//! A restarted daemon's jobs: re-adopted, failed, cleaned up after, or left alone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::job;
use crate::logship::Source;
use crate::runtime::{Handle, ProcEvent};

use super::{Host, Running, SIGKILL};

impl Host {
    /// Loads persisted jobs and re-attaches to the ones still running.
    pub async fn restore(self: &Arc<Self>) {
        let stored = self.store.load();
        // A job whose record is on disk but could not be read (logged by `load`): nothing of
        // it is touched, so a record fixed by hand brings it back with the next daemon.
        let loaded: Vec<String> = stored.iter().map(|j| j.job.id.clone()).collect();
        let unreadable = |id: &str| !loaded.iter().any(|l| l == id) && self.store.exists(id);
        // Deregistrations of jobs that ended (or vanished) while no daemon ran.
        if let Ok(dir) = std::fs::read_dir(self.state_dir.join("deregistered")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let live = stored
                    .iter()
                    .any(|j| j.job.id == name && !j.status.is_terminal());
                if !live && !unreadable(&name) {
                    self.forget_deregistration(&name);
                }
            }
        }
        let rt = self.runtime.clone();
        let mut adopted: HashMap<String, Handle> =
            tokio::task::spawn_blocking(move || rt.adopt().into_iter().collect())
                .await
                .unwrap_or_default();
        for j in stored {
            let id = j.job.id.clone();
            let live = !j.status.is_terminal();
            let handle = adopted.remove(&id);
            {
                // On disk: shown as it is.
                let mut inner = self.lock();
                inner.table.restore(j.clone());
                inner.changes += 1;
                let seq = inner.changes;
                inner.recorded.insert(id.clone(), (seq, j.clone()));
            }
            match handle {
                Some(h) if live => {
                    tracing::info!(job = %id, "re-adopted running job");
                    if self.deregistered_marker(&id).exists() {
                        // Taken out of discoverd before the restart: kept out.
                        self.lock().ctl.entry(id.clone()).or_default().deregistered = true;
                    }
                    let ports = job::bind_ports(&j.job).unwrap_or_default();
                    // A job that had not reported running yet has its address only in
                    // the allocator.
                    let ip: Option<IpAddr> = j
                        .internal_ip
                        .parse()
                        .ok()
                        .or_else(|| self.network().and_then(|n| n.address_of(&id)));
                    let env_ip = ip.unwrap_or(self.external_ip);
                    let durl = self.discoverd_url();
                    let env = job::job_env(&j.job, &ports, Some(env_ip), durl.as_deref());
                    let stop_timeout = Duration::from_secs(
                        j.job
                            .config
                            .stop_timeout
                            .unwrap_or(job::DEFAULT_STOP_TIMEOUT_SECS),
                    );
                    let host = self.clone();
                    let run = Running {
                        ports,
                        ip,
                        env_ip,
                        env,
                        stop_timeout,
                        adopted: true,
                    };
                    tokio::spawn(host.supervise(j.job, h, run));
                }
                None if live => {
                    tracing::warn!(job = %id, "job was not found after a restart");
                    self.fail(&id, "host: job lost across a daemon restart".into())
                        .await;
                    let had_net = self.network().is_some_and(|n| n.address_of(&id).is_some());
                    self.teardown(&id, had_net).await;
                }
                ended => {
                    // Ended, but the cleanup that follows the recorded end may not have
                    // run: the container's remains (in the background) and the network.
                    if let Some(h) = ended {
                        tracing::info!(job = %id, "removing what is left of an ended job's container");
                        self.reap(id.clone(), h);
                    }
                    if self.network().is_some_and(|n| n.address_of(&id).is_some()) {
                        self.teardown(&id, true).await;
                    }
                }
            }
        }
        for (id, h) in adopted {
            if unreadable(&id) {
                tracing::error!(job = %id, "leaving a running container alone: its stored record cannot be read");
                self.keep(id, h);
                continue;
            }
            tracing::warn!(job = %id, "killing a running container the host has no state for");
            self.reap(id, h);
        }
        if let Some(n) = self.network() {
            n.release_strays(|id| {
                let inner = self.lock();
                inner.table.get(id).is_some() || inner.kept.contains(id)
            })
            .await;
        }
        self.await_agent_block().await;
    }

    /// Leaves job `id`, running with a record that cannot be read, as it is: its id stays
    /// taken (a `PUT` of it is a 409), its address held, and the volumes and host ports its
    /// container was started with (from the runtime's copy of its spec) count as in use
    /// while it runs. Its events are taken and acknowledged, so the runtime keeps reading
    /// its output (a shim whose unacknowledged events fill its buffer stops reading the
    /// job's pipes and the job blocks): output lines go to the host's log under the app and
    /// process type of its environment when the record still reads as JSON and does not say
    /// `disable_log`, else they are dropped once acknowledged.
    fn keep(self: &Arc<Self>, id: String, mut h: Handle) {
        let described = self.runtime.describe(&id).unwrap_or_default();
        let volumes = described
            .mount_sources
            .iter()
            .filter_map(|s| self.volumes.volume_of(s))
            .collect();
        let host_ports = if described.host_network {
            described.ports()
        } else {
            Vec::new()
        };
        self.lock().kept.insert(&id, volumes, host_ports);
        let log = self.store.raw(&id).is_some_and(|r| {
            r.pointer("/job/config/disable_log")
                .and_then(serde_json::Value::as_bool)
                != Some(true)
        });
        let src = Source::new(
            described.env("FLYNN_APP_ID"),
            described.env("FLYNN_PROCESS_TYPE"),
            &id,
        );
        let host = self.clone();
        tokio::spawn(async move {
            let mut log_lines = crate::terminal::LogLines::default();
            while let Some(ev) = h.events.recv().await {
                let last = matches!(ev, ProcEvent::Exited { .. } | ProcEvent::Failed { .. });
                match ev {
                    ProcEvent::Output {
                        stream,
                        line,
                        newline,
                    } if log => {
                        log_lines.output(stream, &line, newline, |s, l| host.logs.push(&src, s, l))
                    }
                    ProcEvent::Terminal { data } if log => {
                        log_lines.terminal(&data, |s, l| host.logs.push(&src, s, l))
                    }
                    ProcEvent::Dropped { count } => {
                        if log {
                            log_lines.finish(|s, l| host.logs.push(&src, s, l));
                        }
                        host.logs.count_dropped(count)
                    }
                    _ => {}
                }
                if last && log {
                    log_lines.finish(|s, l| host.logs.push(&src, s, l));
                }
                h.handled.mark();
                if last {
                    // Acknowledged too: the shim exits, and its status file keeps the end
                    // for a start that finds the record fixed (the real exit status).
                    tracing::info!(job = %id, "a job left running with an unreadable record ended");
                    host.lock().kept.ended(&id);
                    break;
                }
            }
            // Held, not dropped, until the daemon exits: dropping it closes the job's stdin.
            let _untouched = h;
            std::future::pending::<()>().await
        });
    }

    /// Kills what may still run of a container the host will not supervise, waits for its
    /// end and has the runtime remove it, in the background.
    fn reap(&self, id: String, mut h: Handle) {
        let _ = (h.signal)(SIGKILL);
        let rt = self.runtime.clone();
        tokio::spawn(async move {
            while h.events.recv().await.is_some() {
                h.handled.mark();
            }
            let _ = tokio::task::spawn_blocking(move || rt.cleanup(&id)).await;
        });
    }
}
