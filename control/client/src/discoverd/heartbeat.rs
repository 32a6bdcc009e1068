//! Keeping an instance registered: [`Client::heartbeat`] and [`Client::keep_registered`],
//! and the [`Heartbeater`] they return.

use std::time::Duration;

use flynn_api::ErrorCode;
use tokio::sync::oneshot;

use super::{
    check_id, check_service, expand_addr, instance_id, job_meta, Client, Error, Instance,
    JOB_META_ENV,
};

/// [`Client::heartbeat`]'s first registration (spec §2.6): tried for this long, at least
/// [`REGISTER_ATTEMPTS`] times, [`REGISTER_PAUSE`] apart, each attempt given up after
/// [`REGISTER_TIMEOUT`].
pub(super) const REGISTER_FOR: Duration = Duration::from_secs(60);
pub(super) const REGISTER_ATTEMPTS: u32 = 5;
const REGISTER_PAUSE: Duration = Duration::from_millis(200);

/// How long one attempt of [`Client::heartbeat`]'s first registration may take. Longer than
/// a heartbeat's [`HEARTBEAT_TIMEOUT`]: a discoverd slow to commit (an election, a busy
/// disk) gets to answer instead of being sent the write again while the one given up is
/// still queued there; short enough that [`REGISTER_ATTEMPTS`] attempts that get no answer
/// (a hung discoverd) and their pauses fit in [`REGISTER_FOR`] (it took five 30 s request
/// timeouts, 150 s).
pub(super) const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(
    REGISTER_TIMEOUT.as_millis() * REGISTER_ATTEMPTS as u128
        + REGISTER_PAUSE.as_millis() * (REGISTER_ATTEMPTS as u128 - 1)
        <= REGISTER_FOR.as_millis()
);

/// The job environment variables that go into an instance's meta (spec §0.4): who
/// Keeps an instance registered: PUT every 5 s − U(0, 2 s); every 200–400 ms after a
/// failure. Closing it unregisters the instance.
pub struct Heartbeater {
    stop: Option<oneshot::Sender<()>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
    pub id: String,
}

impl Heartbeater {
    /// Stops heartbeating and deletes the instance. The delete is given up after 3 s (a
    /// discoverd that does not answer): the instance then expires after its TTL.
    pub async fn close(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Stops heartbeating *without* deleting the instance: for handing the instance over to
    /// another heartbeater of the same id (a new registration of it, possibly through another
    /// discoverd node of the same cluster), whose entry a delete would remove. An instance
    /// nobody heartbeats any more expires after the TTL.
    pub async fn abandon(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        // The loop is gone: dropping its stop signal now deletes nothing.
        self.stop.take();
    }
}

impl Drop for Heartbeater {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Client {
    /// This client for a heartbeater, whose every request is cut at [`HEARTBEAT_TIMEOUT`]:
    /// it waits for a leader a little less than that, so a spell without one is logged as
    /// such (and retried by the heartbeater), not as a timeout.
    fn for_heartbeats(&self) -> Client {
        self.clone()
            .with_leader_wait(HEARTBEAT_TIMEOUT.saturating_sub(Duration::from_millis(500)))
    }

    /// Registers `inst` (retrying for up to 60 s, at least 5 attempts, 200 ms apart, each
    /// given up after 10 s) and keeps it registered until the [`Heartbeater`] is closed or
    /// dropped. An address `:port` is expanded with `$EXTERNAL_IP` (its id is then
    /// recomputed); without `EXTERNAL_IP` that fails at once with [`Error::NoExternalIp`].
    /// The job's [`job_meta`] (its [`JOB_META_ENV`] variables set and not empty) goes into
    /// `inst.meta`, except where it already has the key (spec §0.4).
    pub async fn heartbeat(&self, service: &str, inst: Instance) -> Result<Heartbeater, Error> {
        self.heartbeat_with(service, inst, |name| std::env::var(name).ok())
            .await
    }

    /// [`Client::heartbeat`] with the environment (`EXTERNAL_IP` and the job's variables)
    /// read through `env`.
    pub(super) async fn heartbeat_with(
        &self,
        service: &str,
        mut inst: Instance,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Heartbeater, Error> {
        let addr = expand_addr(&inst.addr, env("EXTERNAL_IP").as_deref())?;
        if addr != inst.addr {
            // An id given for the bare `:port` names no registrable address.
            inst.addr = addr;
            inst.id.clear();
        }
        if inst.proto.is_empty() {
            inst.proto = "tcp".into();
        }
        if inst.id.is_empty() {
            inst.id = instance_id(&inst.proto, &inst.addr);
        }
        let vars = JOB_META_ENV
            .iter()
            .filter_map(|name| env(name).map(|value| (*name, value)));
        for (name, value) in job_meta(vars) {
            inst.meta.entry(name).or_insert(value);
        }
        // A name that can never be registered fails at once, not after a minute of retries.
        check_service(service)?;
        check_id(&inst.id)?;
        // Each try is cut at REGISTER_TIMEOUT (a discoverd that accepts and never answers
        // would otherwise hold each one for the 30 s request timeout, five of them for
        // 150 s); the tries past the fewest are cut at the deadline too.
        let c = self.for_heartbeats();
        let deadline = tokio::time::Instant::now() + REGISTER_FOR;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let limit = if attempt <= REGISTER_ATTEMPTS {
                REGISTER_TIMEOUT
            } else {
                REGISTER_TIMEOUT
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            };
            let res = match tokio::time::timeout(limit, c.register(service, &inst)).await {
                Ok(r) => r,
                Err(_) => Err(Error::TimedOut { after: limit }),
            };
            match res {
                Ok(()) => break,
                Err(e)
                    if attempt < REGISTER_ATTEMPTS
                        || tokio::time::Instant::now() + REGISTER_PAUSE < deadline =>
                {
                    tracing::debug!(error = %e, attempt, "register failed; retrying");
                    tokio::time::sleep(REGISTER_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(heartbeat_loop(
            self.for_heartbeats(),
            service.to_string(),
            inst.clone(),
            None,
            stop_rx,
        ));
        Ok(Heartbeater {
            stop: Some(stop_tx),
            task: Some(task),
            id: inst.id,
        })
    }

    /// Keeps `inst` registered in `service` for as long as the returned [`Heartbeater`]
    /// lives, however long discoverd is unreachable. Unlike [`Client::heartbeat`] (which
    /// gives up after 60 s) it returns at once and keeps trying, 200 ms apart at first and
    /// then up to [`KEEP_RETRY_MAX`], until the first registration succeeds; then it
    /// heartbeats as usual. With `create` (a leader type) the service is created first (one
    /// that exists is fine). `inst` is used as given: its `addr` (no `EXTERNAL_IP`
    /// expansion) and its `meta` (nothing is read from this process's environment, which is
    /// not the registered job's: a daemon registering a job gives it the job's
    /// [`job_meta`]). For daemons whose instances must come back by themselves after an
    /// outage.
    pub fn keep_registered(
        &self,
        service: &str,
        mut inst: Instance,
        create: Option<&str>,
    ) -> Heartbeater {
        if inst.proto.is_empty() {
            inst.proto = "tcp".into();
        }
        if inst.id.is_empty() {
            inst.id = instance_id(&inst.proto, &inst.addr);
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keep_loop(
            self.for_heartbeats(),
            service.to_string(),
            inst.clone(),
            create.map(str::to_string),
            stop_rx,
        ));
        Heartbeater {
            stop: Some(stop_tx),
            task: Some(task),
            id: inst.id,
        }
    }
}

/// The longest pause between attempts of [`Client::keep_registered`]'s first registration.
pub const KEEP_RETRY_MAX: Duration = Duration::from_secs(5);

/// [`Client::keep_registered`]'s task: the first registration (and service creation),
/// retried until it succeeds or the heartbeater stops, then [`heartbeat_loop`].
async fn keep_loop(
    c: Client,
    service: String,
    inst: Instance,
    mut create: Option<String>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut pause = Duration::from_millis(200);
    let mut failures: u32 = 0;
    // Created again if it goes away later (deleted, or the cluster's state lost).
    let kind = create.clone();
    // Best effort, when stopped before the first registration returned.
    let unregister = || async {
        let _ = tokio::time::timeout(HEARTBEAT_TIMEOUT, c.unregister(&service, &inst.id)).await;
    };
    loop {
        let attempt = async {
            if let Some(kind) = &create {
                match c.add_service(&service, kind).await {
                    Ok(()) => {}
                    Err(e) if e.api().map(|a| a.code) == Some(ErrorCode::ObjectExists) => {}
                    Err(e) => return Err((e, true)),
                }
            }
            c.register(&service, &inst).await.map_err(|e| (e, false))
        };
        let res = tokio::select! {
            // Stopped before the first registration: anything an attempt cut short may
            // have registered is deleted (best effort).
            _ = &mut stop => {
                unregister().await;
                return;
            }
            r = tokio::time::timeout(HEARTBEAT_TIMEOUT, attempt) => r,
        };
        let err = match res {
            Ok(Ok(())) => break,
            // Refused as invalid (a bad service name or instance): no retry makes it valid.
            Ok(Err((e, _)))
                if matches!(e, Error::Invalid { .. })
                    || e.api().map(|a| a.code) == Some(ErrorCode::ValidationError) =>
            {
                tracing::warn!(service = %service, error = %e, "discoverd registration refused; giving up");
                return;
            }
            Ok(Err((e, creating))) => {
                // Created: not again on the next try, unless the registration found the
                // service gone (deleted, or the cluster's state lost, meanwhile).
                if !creating {
                    let gone = e.api().map(|a| a.code) == Some(ErrorCode::ObjectNotFound);
                    create = if gone { kind.clone() } else { None };
                }
                e.to_string()
            }
            Err(_) => "timed out".to_string(),
        };
        failures += 1;
        // The first failure and then about once a minute: an outage is not a log flood.
        if failures == 1 || failures.is_multiple_of(12) {
            tracing::warn!(service = %service, error = %err, failures, "discoverd registration failed; retrying");
        }
        tokio::select! {
            // As above: an attempt that timed out here may have registered the instance.
            _ = &mut stop => {
                unregister().await;
                return;
            }
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(KEEP_RETRY_MAX);
    }
    heartbeat_loop(c, service, inst, kind, stop).await
}

/// How long one heartbeat may take (the instance TTL is 10 s).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Heartbeats `inst` until stopped. `create`: the service's leader type, to create the
/// service again when a heartbeat finds it gone (404), as [`Client::keep_registered`]
/// promises its instance comes back by itself.
async fn heartbeat_loop(
    c: Client,
    service: String,
    inst: Instance,
    create: Option<String>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut delay = next_heartbeat(true);
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(delay) => {}
        }
        let beat = async {
            match c.register(&service, &inst).await {
                Err(e) if e.api().map(|a| a.code) == Some(ErrorCode::ObjectNotFound) => {
                    let Some(kind) = &create else { return Err(e) };
                    match c.add_service(&service, kind).await {
                        Ok(()) => {}
                        Err(e) if e.api().map(|a| a.code) == Some(ErrorCode::ObjectExists) => {}
                        Err(e) => return Err(e),
                    }
                    c.register(&service, &inst).await
                }
                r => r,
            }
        };
        // A request stuck on a dead peer (a kept-alive connection to a leader that lost
        // power) must not hold the heartbeats past the instance TTL: it is given up and
        // the fast retry takes over.
        let err = match tokio::time::timeout(HEARTBEAT_TIMEOUT, beat).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_string()),
        };
        let ok = err.is_none();
        match err {
            None => {
                if failures > 0 {
                    tracing::info!(service = %service, failures, "heartbeats succeed again");
                }
                failures = 0;
            }
            Some(error) => {
                failures += 1;
                // The first failure and then every 20th (about every 5 s at the fast
                // retry): an outage is not a log flood.
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(service = %service, error = %error, failures, "heartbeat failed");
                }
            }
        }
        delay = next_heartbeat(ok);
    }
    // Bounded like the heartbeats: closing a heartbeater against a hung discoverd returns
    // (the instance then expires after its TTL).
    match tokio::time::timeout(HEARTBEAT_TIMEOUT, c.unregister(&service, &inst.id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, service = %service, "unregister failed"),
        Err(_) => tracing::warn!(service = %service, "unregister timed out"),
    }
}

fn next_heartbeat(ok: bool) -> Duration {
    if ok {
        Duration::from_millis(5000 - fastrand::u64(0..2000))
    } else {
        Duration::from_millis(200 + fastrand::u64(0..200))
    }
}
