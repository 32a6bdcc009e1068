//! Accepting a job (`PUT /host/jobs/:id`) and starting it: image, network, spawn; a
//! start that fails.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flynn_api::host::{ActiveJob, EventKind, Job, JobStatus};
use flynn_api::ApiError;

use crate::job;
use crate::logship::now_rfc3339;
use crate::runtime::{BindMount, Launch, Limits, RuntimeError};
use crate::volumes;

use super::{end_event, to_completion, Change, Host, Inner, Running, STOPPED_BEFORE_START};

impl Host {
    /// `PUT /host/jobs/:id`: records the job and starts it in the background.
    pub async fn add_job(self: &Arc<Self>, job: Job) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                "host is shutting down",
            ));
        }
        if job.config.tty && !self.runtime.supports_tty() {
            return Err(ApiError::validation(
                Some("config.tty"),
                "is not supported by this host's runtime (no terminals without containers); use stdin",
            ));
        }
        let id = job.id.clone();
        let change = {
            let mut inner = self.lock();
            if inner.kept.contains(&job.id) {
                return Err(job::kept_conflict(&job.id));
            }
            if self.max_starting > 0 {
                let starting = inner
                    .table
                    .iter()
                    .filter(|j| j.status == JobStatus::Starting)
                    .count();
                if starting >= self.max_starting && inner.table.get(&job.id).is_none() {
                    return Err(ApiError::new(
                        flynn_api::ErrorCode::Ratelimited,
                        "host: too many jobs starting",
                    )
                    .with_retry(true));
                }
            }
            if inner.table.get(&job.id).is_none() {
                volumes::check_free(&inner.table, &inner.kept, &job)?;
            }
            let aj = inner.table.add(job, &self.id, now_rfc3339())?.clone();
            self.record(&mut inner, &aj)
        };
        // The job is in the table: the rest runs to its end whatever becomes of the request
        // (a handler dropped when its client gives up). Cut short while the record was
        // written, the job stayed starting for good, shown nowhere, counting against
        // `max_starting`, and a retried `PUT` was refused.
        let host = self.clone();
        to_completion(async move { host.added(id, change).await }).await
    }

    /// What follows `add_job`'s table change: once the job is recorded, it is shown,
    /// announced and started; a job whose record could not be written leaves the table.
    async fn added(self: Arc<Self>, id: String, change: Change) -> Result<(), ApiError> {
        // Recorded before anything runs: a job whose state cannot be saved would be
        // unknown to the next daemon, which kills what it finds of it.
        let Change {
            seq,
            job: aj,
            ticket,
        } = change;
        if let Err(e) = ticket.wait().await {
            let mut inner = self.lock();
            inner.table.unadd(&id);
            if inner.table.get(&id).is_none() {
                // After the failed write, which is then not tried again. A stop of the job
                // whose record replaced this one's in the queue may have shown it already.
                inner.recorded.remove(&id);
                self.store.remove(&id);
            }
            tracing::error!(job = %id, error = ?e, "persisting a new job failed; not starting it");
            return Err(ApiError::new(
                flynn_api::ErrorCode::UnknownError,
                format!("host: cannot record the job: {e}"),
            )
            .with_retry(true));
        }
        {
            let mut inner = self.lock();
            Self::show(&mut inner, seq, &aj);
            self.broadcast(EventKind::Create, &aj);
            // Clients that attached before the job was created: attached to it now, before
            // it starts, so they get all its output.
            self.attach.created(&aj);
        }
        // A shutdown that began while the record was written: this daemon starts nothing
        // more (the job ends as failed, not started by a daemon on its way out).
        if self.shutting_down.load(Ordering::SeqCst) {
            self.fail(&id, "host: shutting down".into()).await;
            return Ok(());
        }
        let host = self.clone();
        tokio::spawn(async move { host.start(id).await });
        Ok(())
    }

    pub(super) async fn fail(&self, id: &str, reason: String) {
        tracing::warn!(job = %id, reason = %reason, "job failed, or was lost by its runtime");
        self.prepare_next();
        self.release_volumes(id).await;
        let change = {
            let mut inner = self.lock();
            // A deregistration that came while it was starting left an entry: nothing runs.
            inner.ctl.remove(id);
            self.forget_deregistration(id);
            let Some(j) = inner.table.failed(id, reason, now_rfc3339()).cloned() else {
                return;
            };
            let change = self.record(&mut inner, &j);
            self.gc(&mut inner, &j);
            change
        };
        let kind = end_event(change.job.status);
        self.settle(change, Some(kind)).await;
    }

    /// Deletes the `delete_on_stop` volumes of job `id`, which is ending (its process is
    /// gone, or it failed to start), before its end is in the table: from then on they are
    /// in no job's hands and no other job can take them (a detached volume is `Deleting`),
    /// and their directories are renamed away (gone for a restarted daemon, see
    /// [`Volumes::release`]) before the end is queued to be recorded, so a daemon that dies
    /// once the end is on disk does not find them again. The rename runs on the blocking
    /// pool, without the table lock: a stalled disk holds up this job's end only, not the
    /// API and every other job (it ran under the table lock, on a runtime thread).
    ///
    /// [`Volumes::release`]: crate::volumes::Volumes::release
    pub(super) async fn release_volumes(&self, id: &str) {
        let Some(job) = self
            .current(id)
            .filter(|j| !j.status.is_terminal())
            .map(|j| j.job)
        else {
            return;
        };
        if !job.config.volumes.iter().any(|b| b.delete_on_stop) {
            return;
        }
        let vols = self.volumes.clone();
        let _ = tokio::task::spawn_blocking(move || vols.release(&job)).await;
    }

    pub(super) fn gc(&self, inner: &mut Inner, j: &ActiveJob) {
        for gone in inner.table.gc(j.job.app_id()) {
            inner.recorded.remove(&gone);
            self.store.remove(&gone);
        }
    }

    async fn start(self: Arc<Self>, id: String) {
        let Some(job) = self.current(&id).map(|j| j.job) else {
            return;
        };
        let t0 = std::time::Instant::now();
        self.runtime.starting();
        if let Err(reason) = job::check_partition(&job) {
            return self.fail(&id, reason).await;
        }
        let ports = match job::bind_ports(&job) {
            Ok(p) => p,
            Err(reason) => return self.fail(&id, reason).await,
        };
        let volume_mounts = match self.volumes.mounts(&job) {
            Ok(m) => m,
            Err(reason) => return self.fail(&id, reason).await,
        };
        let mut layers = Vec::new();
        if self.runtime.needs_image() {
            for m in &job.mountspecs {
                let sha = m.hashes.get("sha256").cloned().unwrap_or_default();
                let path = m.url.strip_prefix("file://").map(PathBuf::from);
                let rt = self.runtime.clone();
                // A stop while a layer imports gives the import up (at its next read of
                // the tarball) instead of waiting for it.
                let host = self.clone();
                let jid = id.clone();
                let res = tokio::task::spawn_blocking(move || {
                    rt.layer(path.as_deref(), &sha, &|| host.stop_requested(&jid))
                })
                .await;
                match res {
                    Ok(Ok(p)) => layers.push(p),
                    Ok(Err(RuntimeError::Cancelled)) => {
                        return self.fail(&id, STOPPED_BEFORE_START.into()).await
                    }
                    Ok(Err(e)) => return self.fail(&id, e.to_string()).await,
                    Err(e) => return self.fail(&id, format!("image: {e}")).await,
                }
            }
        }
        // A job stopped before its process exists ends as done (spec §5.3): checked after
        // the image, after the network wait and right before the spawn. A stop after that
        // is seen when the process reports it started.
        if self.stop_requested(&id) {
            return self.fail(&id, STOPPED_BEFORE_START.into()).await;
        }
        let t_image = t0.elapsed();
        let own_net = self.runtime.isolates_network() && !job.config.host_network;
        let net = if own_net {
            match self.wait_network(&id).await {
                Ok(n) => n,
                Err(e) => return self.fail(&id, e).await,
            }
        } else {
            None
        };
        let (ip, netns) = match (net, own_net) {
            (Some(net), true) => match net.setup(&id).await {
                Ok((ip, ns)) => (Some(ip), Some(ns)),
                Err(e) => return self.fail(&id, format!("network: {e}")).await,
            },
            _ => (None, None),
        };
        let t_net = t0.elapsed();
        let env_ip = ip.unwrap_or(self.external_ip);
        let durl = self.discoverd_url();
        let env = job::job_env(&job, &ports, Some(env_ip), durl.as_deref());
        let mut mounts = BindMount::of(&job.config);
        mounts.extend(volume_mounts);
        if netns.is_some() && !self.resolvers.is_empty() {
            match self.write_resolv_conf(&id) {
                Ok(path) => mounts.push(BindMount {
                    source: path,
                    target: "/etc/resolv.conf".into(),
                    readonly: true,
                }),
                Err(e) => {
                    self.teardown(&id, true).await;
                    return self.fail(&id, format!("resolv.conf: {e}")).await;
                }
            }
        }
        let launch = Launch {
            id: id.clone(),
            layers,
            args: job.config.args.clone(),
            env: env.clone(),
            cwd: job.config.working_dir.clone(),
            hostname: Some(id.chars().take(63).collect()),
            netns,
            mounts,
            limits: Limits::of(&job.resources),
            uid: job.config.uid.unwrap_or(0),
            gid: job.config.gid.unwrap_or(0),
            capabilities: job.config.linux_capabilities.clone(),
            stdin: job.config.stdin,
            tty: job.config.tty,
            // The size of a client that attached while the job was starting (`flynn run`
            // attaches right after adding the job): set before the job runs. One attaching
            // later resizes the running job.
            tty_size: if job.config.tty {
                self.attach.size(&id)
            } else {
                None
            },
            output_waits: job.config.disable_log,
        };
        if self.stop_requested(&id) {
            self.teardown(&id, ip.is_some()).await;
            return self.fail(&id, STOPPED_BEFORE_START.into()).await;
        }
        let rt = self.runtime.clone();
        let handle = match tokio::task::spawn_blocking(move || {
            // The runtime may need a tokio context for its readers.
            rt.spawn(launch)
        })
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                self.cleanup_failed_start(&id, ip.is_some()).await;
                return self.fail(&id, e.to_string()).await;
            }
            Err(e) => {
                self.cleanup_failed_start(&id, ip.is_some()).await;
                return self.fail(&id, format!("start: {e}")).await;
            }
        };
        tracing::debug!(job = %id, image = ?t_image, network = ?(t_net - t_image), shim = ?(t0.elapsed() - t_net), "job start phases");
        let stop_timeout = Duration::from_secs(
            job.config
                .stop_timeout
                .unwrap_or(job::DEFAULT_STOP_TIMEOUT_SECS),
        );
        self.supervise(
            job,
            handle,
            Running {
                ports,
                ip,
                env_ip,
                env,
                stop_timeout,
                adopted: false,
            },
        )
        .await;
    }

    fn resolv_conf_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("resolv").join(format!("{id}.conf"))
    }

    /// `<state-dir>/resolv/<id>.conf` with one `nameserver` line per `--resolver`.
    fn write_resolv_conf(&self, id: &str) -> std::io::Result<PathBuf> {
        let path = self.resolv_conf_path(id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text: String = self
            .resolvers
            .iter()
            .map(|r| format!("nameserver {r}\n"))
            .collect();
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// After a failed start: whatever the runtime got to (a shim that started but could not
    /// be reached, its state and cgroups) goes first, then the network the job would have used.
    async fn cleanup_failed_start(&self, id: &str, had_net: bool) {
        let rt = self.runtime.clone();
        let cid = id.to_string();
        let _ = tokio::task::spawn_blocking(move || rt.cleanup(&cid)).await;
        self.teardown(id, had_net).await;
    }

    pub(super) async fn teardown(&self, id: &str, had_net: bool) {
        let _ = std::fs::remove_file(self.resolv_conf_path(id));
        if had_net {
            // A network move (`configure_network`) takes the network out of service while
            // it checks that no job holds an address, under `net_config`; this job still
            // holds one, so the move puts the old network back. Waiting for it keeps the
            // job's namespace and address from being left behind.
            let net = match self.network() {
                Some(n) => Some(n),
                None => {
                    let _move_done = self.net_config.lock().await;
                    self.network()
                }
            };
            if let Some(net) = net {
                if let Err(e) = net.teardown(id).await {
                    tracing::warn!(job = %id, error = %e, "removing job network failed");
                }
            }
        }
    }
}
