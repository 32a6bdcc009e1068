//! discoverd: where it is, this host's own registration, and the instances of jobs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flynn_api::host::DiscoverdNotify;
use flynn_api::ApiError;
use flynn_client::discoverd::{self, Instance};

use crate::job;

use super::{format_host_port, Announce, DiscoverdConn, Host, Running, HOST_SERVICE};

/// How long a stop (or a job's end) waits for discoverd to confirm that the job's instances
/// are gone before it goes on.
const DEREGISTER_WAIT: Duration = Duration::from_secs(2);

impl Host {
    /// `POST /host/discoverd`: discoverd tells the host where it listens (its `--notify`).
    /// Jobs started from now on get `DISCOVERD` and register there, and the host
    /// (re-)registers itself. Kept in `discoverd.json` for a restarted daemon.
    pub fn set_discoverd(self: &Arc<Self>, n: &DiscoverdNotify) -> Result<(), ApiError> {
        let url = n.url.trim_end_matches('/').to_string();
        if flynn_client::http_base(&url).as_ref() != Some(&url) {
            return Err(ApiError::validation(
                Some("url"),
                "must be discoverd's http:// URL, e.g. http://10.0.0.1:1111",
            ));
        }
        if !n.dns.is_empty() && n.dns.parse::<std::net::SocketAddr>().is_err() {
            return Err(ApiError::validation(Some("dns"), "must be ip:port"));
        }
        let n = DiscoverdNotify {
            url: url.clone(),
            ..n.clone()
        };
        let bytes = serde_json::to_vec(&n).unwrap_or_default();
        let path = self.state_dir.join("discoverd.json");
        self.store.syncer().write(&path, &bytes).map_err(|e| {
            tracing::warn!(error = %e, "saving discoverd.json failed");
            ApiError::unknown()
        })?;
        let changed = {
            let mut d = self.discoverd();
            let changed = d.as_ref().is_none_or(|d| d.url != url);
            match d.as_mut() {
                Some(d) if !changed => {
                    d.dns = n.dns.clone();
                    d.job_id = n.job_id.clone();
                }
                _ => *d = Some(DiscoverdConn::new(&n)),
            }
            changed
        };
        if changed {
            tracing::info!(%url, job = %n.job_id, "discoverd announced itself");
            self.reannounce_jobs();
            let host = self.clone();
            tokio::spawn(async move { host.register_host().await });
        }
        Ok(())
    }

    /// The discoverd a previous daemon was told about (`discoverd.json`), if any.
    pub fn load_discoverd(state_dir: &std::path::Path) -> Option<DiscoverdNotify> {
        let bytes = std::fs::read(state_dir.join("discoverd.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replaces the tags and re-registers the host with them.
    pub fn set_tags(self: &Arc<Self>, tags: BTreeMap<String, String>) {
        *self.tags.lock().unwrap_or_else(|e| e.into_inner()) = tags;
        let host = self.clone();
        tokio::spawn(async move { host.register_host().await });
    }

    /// Registers (or re-registers) this host in discoverd's `flynn-host` service with
    /// meta `id` and `tag:<key>` per tag, heartbeating until replaced. The address is the
    /// API's port on the external IP. No-op without `--discoverd`.
    pub async fn register_host(&self) {
        let Some(client) = self.discoverd_client() else {
            return;
        };
        // One registration at a time; the new one replaces the old (same instance id).
        // The tags are read under it, so the registration made last carries the newest
        // tags (read before it, a slower update's older tags could be registered last).
        let mut slot = self.self_registration.lock().await;
        let port = self
            .url
            .lock()
            .map(|u| u.rsplit(':').next().unwrap_or("").to_string())
            .unwrap_or_default();
        let mut meta: BTreeMap<String, String> = self
            .tags
            .lock()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| (format!("tag:{k}"), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        meta.insert("id".into(), self.id.clone());
        let inst = Instance {
            // `SocketAddr` brackets an IPv6 address (`[fd00::1]:1113`), as discoverd
            // requires (Go's `net.SplitHostPort`).
            addr: format_host_port(self.external_ip, &port),
            proto: "http".into(),
            meta,
            ..Instance::default()
        };
        if let Some(old) = slot.take() {
            // Same instance id: the new registration replaces the entry (discoverd sends
            // watchers an `update`). The old heartbeater stops without deleting it: a
            // delete first (`close`) took the host out of the service until the new one
            // came, so watchers saw it go down and up, and it lost its place in the
            // service's "oldest" leader election. Stopped (aborted and awaited) before the
            // new one starts; a heartbeat of the old tags already on the wire may still
            // land after the new registration, and the next beat (within 5 s) corrects it.
            old.abandon().await;
        }
        // Kept registered however long discoverd is away (it used to give up after 60 s).
        *slot = Some(client.keep_registered(HOST_SERVICE, inst, Some("oldest")));
    }

    /// Notes what the job announces and registers it in discoverd, if there is one yet.
    pub(super) fn register_services(self: &Arc<Self>, id: &str, r: &Running) {
        let a = Arc::new(Announce {
            ip: r.ip.unwrap_or(r.env_ip),
            ports: r.ports.clone(),
            meta: job::instance_meta(&r.env),
        });
        // The generation and the discoverd are read under the job lock, like
        // `reannounce_jobs` bumps and reads them, so whichever registers last for a move is
        // the one kept.
        let (generation, client) = {
            let mut inner = self.lock();
            let Some(c) = inner.ctl.get_mut(id) else {
                return;
            };
            // Asked not to be in discoverd (possibly while it was starting).
            if c.deregistered {
                return;
            }
            c.announce = Some(a.clone());
            (c.generation, self.discoverd_client())
        };
        if let Some(client) = client {
            self.announce(id, &a, &client, generation);
        }
    }

    /// Registers every running job that has something to announce with the discoverd
    /// just announced. After a move the old heartbeats stop without deleting the instances:
    /// the new registration has the same instance ids, and where the old address is another
    /// node of the same cluster a delete would remove the new entry; where it is not, the old
    /// entries expire after the TTL.
    fn reannounce_jobs(self: &Arc<Self>) {
        let (client, jobs, old) = {
            let mut inner = self.lock();
            let Some(client) = self.discoverd_client() else {
                return;
            };
            let mut old = Vec::new();
            let jobs: Vec<(String, Arc<Announce>, u64)> = inner
                .ctl
                .iter_mut()
                .filter(|(_, c)| !c.deregistered)
                .filter_map(|(id, c)| {
                    let a = c.announce.clone()?;
                    c.generation += 1;
                    old.append(&mut c.heartbeaters);
                    Some((id.clone(), a, c.generation))
                })
                .collect();
            (client, jobs, old)
        };
        tokio::spawn(async move {
            for hb in old {
                hb.abandon().await;
            }
        });
        for (id, a, generation) in jobs {
            tracing::info!(job = %id, "registering a running job with the new discoverd");
            self.announce(&id, &a, &client, generation);
        }
    }

    /// Registers `a`'s instances with `client` for registration `generation` of job `id`.
    fn announce(
        self: &Arc<Self>,
        id: &str,
        a: &Announce,
        client: &discoverd::Client,
        generation: u64,
    ) {
        for p in &a.ports {
            let Some(svc) = p.service.clone() else {
                continue;
            };
            let inst = Instance {
                addr: std::net::SocketAddr::new(a.ip, p.port).to_string(),
                proto: p.proto.clone(),
                meta: a.meta.clone(),
                ..Instance::default()
            };
            // Kept registered however long discoverd is away (a job started during an
            // outage used to be left out of its service for good after 60 s).
            let hb = client.keep_registered(&svc.name, inst, svc.create.then_some("oldest"));
            let mut inner = self.lock();
            match inner.ctl.get_mut(id) {
                Some(c) if !c.deregistered && c.generation == generation => c.heartbeaters.push(hb),
                // Registered anew meanwhile: the newer registration owns the instance
                // (same id), so this one stops without deleting it.
                Some(c) if !c.deregistered => {
                    drop(inner);
                    tokio::spawn(hb.abandon());
                }
                // Deregistered or ended meanwhile: dropping it deletes what it registered.
                _ => drop(hb),
            }
        }
    }

    /// Stops the job's discoverd heartbeats and removes its instances. `false` for an
    /// unknown job.
    pub async fn deregister(&self, id: &str) -> bool {
        let hbs = {
            let mut inner = self.lock();
            let Some(ended) = inner.table.get(id).map(|j| j.status.is_terminal()) else {
                return false;
            };
            let c = if ended {
                // Nothing will register it again, and nothing would remove a new entry:
                // only what its supervisor still holds (its end's cleanup) is closed.
                match inner.ctl.get_mut(id) {
                    Some(c) => c,
                    None => return true,
                }
            } else {
                // A job still starting has no control entry yet: this one, kept by the
                // supervisor, makes its start skip the registration.
                inner.ctl.entry(id.to_string()).or_default()
            };
            let first = !c.deregistered;
            c.deregistered = true;
            let hbs = std::mem::take(&mut c.heartbeaters);
            if first && !ended {
                // Kept across a daemon restart, which would otherwise register the job
                // again (an empty file per job, removed when the job ends; an ended job
                // is never re-adopted, so its own end's deregistration needs none).
                let marker = self.deregistered_marker(id);
                let saved = marker
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&marker, b""));
                if let Err(e) = saved {
                    tracing::warn!(job = %id, error = %e, "recording the deregistration failed; a daemon restart registers the job again");
                }
            }
            hbs
        };
        // All at once, and for a bounded time: a discoverd that stopped answering must not
        // hold back the job's SIGTERM (or its cleanup) for a request timeout per port. The
        // heartbeaters left behind still delete their instances when it answers; an
        // instance nobody deletes expires after the TTL.
        let closing: Vec<_> = hbs.into_iter().map(|hb| tokio::spawn(hb.close())).collect();
        let all = async {
            for c in closing {
                let _ = c.await;
            }
        };
        if tokio::time::timeout(DEREGISTER_WAIT, all).await.is_err() {
            tracing::warn!(job = %id, "discoverd did not confirm the deregistration in time; going on");
        }
        true
    }

    /// The file whose presence says job `id` was taken out of discoverd.
    pub(super) fn deregistered_marker(&self, id: &str) -> PathBuf {
        self.state_dir.join("deregistered").join(id)
    }

    /// The job ended: its deregistration need not be remembered.
    pub(super) fn forget_deregistration(&self, id: &str) {
        match std::fs::remove_file(self.deregistered_marker(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(job = %id, error = %e, "removing a deregistration record failed")
            }
            _ => {}
        }
    }

    /// TEST ONLY: whether job `id` has instances to announce in discoverd.
    #[cfg(test)]
    pub(crate) fn announced(&self, id: &str) -> bool {
        self.lock()
            .ctl
            .get(id)
            .is_some_and(|c| c.announce.is_some())
    }
}
