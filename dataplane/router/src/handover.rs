//! Zero-downtime upgrades: a new router process takes over the listening sockets of the
//! running one.
//!
//! The running router (`--upgrade-socket PATH`) listens on a Unix socket. A new one
//! started with `--takeover PATH` connects and asks; the old one replies with its route
//! state (routes, services) and the descriptors of all its HTTP, HTTPS and API listening
//! sockets (SCM_RIGHTS). The new one starts its cores on them, without accepting yet, says
//! `ready ack` and waits for the old one's answer: `ok`, and from that answer on the
//! takeover is done. Only then does the new process accept connections (and open the
//! sockets of its cores beyond those handed over), serve the admin API and bind the
//! upgrade socket's path; the old one stops accepting (its accept loops wait on
//! readiness, so stopping loses nothing: connections wait in the shared sockets' queues
//! until the new one accepts them), its busy connections finish with `Connection: close`,
//! idle ones are closed after a grace period, and it exits when none are left (or after
//! the drain timeout).
//! Until the `ok` the new process changes nothing the old one relies on: it accepts no
//! connection (one it accepted would be reset if it gave up), serves no admin API (a
//! change it accepted would be lost with it if the takeover failed) and not the upgrade
//! socket's path (its socket waits at a temporary name beside the path, renamed into place
//! after the `ok`), so a takeover that fails leaves the old one serving as before, and it
//! can be taken over again. A takeover fails when the old process says `no`, gives no
//! answer within 30 s (the new one then shuts its end down before it gives up, so an `ok`
//! written after that fails on the old side, which goes on), or closes the connection while
//! it still runs. If it closed because it went away (its upgrade socket refuses a probe
//! connection within 2 s: see [`old_gone`]), the new process is the only router left and
//! goes on as if confirmed. The new process waits at most 90 s for the state. A successor from an older build binds the path before it says `ready`: if
//! that takeover fails, the old process binds the path again.
//! TCP route listeners are passed too (their ports after the HTTP listeners): the new
//! process accepts from the same sockets once the takeover is done, and the old one stops
//! accepting then, so no queued TCP connection is reset; its open TCP streams count as
//! connections to drain.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flynn_api::{BackendAddr, Route};
use serde::{Deserialize, Serialize};

use crate::api::Api;
use crate::shared::CoreMsg;
use crate::worker::ListenerInfo;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ListenerMeta {
    pub addr: SocketAddr,
    pub tls: bool,
    #[serde(default)]
    pub h2c: bool,
    pub route_port: u16,
}

/// What the old process hands over with the descriptors (in the same order as
/// `listeners`, then one per entry of `tcp`, then the API listener last).
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub listeners: Vec<ListenerMeta>,
    pub api: SocketAddr,
    /// The port of each TCP route listening socket handed over.
    #[serde(default)]
    pub tcp: Vec<u16>,
    pub routes: Vec<Route>,
    pub services: BTreeMap<String, Vec<BackendAddr>>,
    /// What the routes file put there, so the new process's reloads diff against it.
    #[serde(default)]
    pub file: crate::reload::FileRecord,
    /// Every stored certificate, oldest first, so ids survive the takeover (and so do
    /// certificates no route uses yet). Absent from an older process: ids are then new.
    #[serde(default)]
    pub certificates: Vec<flynn_api::Certificate>,
    /// TLS session-ticket keys (base64), the encrypting one first, so clients resume
    /// across the takeover. Absent from an older process: new keys.
    #[serde(default)]
    pub ticket_keys: Vec<String>,
    /// How long the first of them has been encrypting (so rotation keeps its schedule).
    #[serde(default)]
    pub ticket_key_age_secs: u64,
    /// Services whose backends came from discoverd ([`Api::discovered`]). Absent from an
    /// older process: none (clears it owed are not made).
    #[serde(default)]
    pub discovered: Vec<String>,
    /// Of those, the ones whose clear was still owed ([`Api::owed`]).
    #[serde(default)]
    pub owed: Vec<String>,
    /// The old process answers `ready ack` with `ok`. Absent from an older process: the
    /// new one says `ready` and goes on without an answer.
    #[serde(default)]
    pub ready_ack: bool,
}

/// The running side's view of its sockets.
pub struct Sockets {
    pub listeners: Vec<(RawFd, ListenerInfo, SocketAddr)>,
    pub api: (RawFd, SocketAddr),
}

pub struct Old {
    pub path: PathBuf,
    pub api: Arc<Api>,
    pub sockets: Sockets,
    pub api_stop: tokio::sync::watch::Sender<bool>,
    pub grace: Duration,
    pub drain_timeout: Duration,
}

/// The upgrade socket, bound but not yet where takeovers look for it (see
/// [`Upgrade::install`]).
pub struct Upgrade {
    path: PathBuf,
    listener: Option<UnixListener>,
    /// The temporary name it is bound at, until it is renamed to `path`.
    staged: Option<PathBuf>,
}

impl Upgrade {
    /// Binds the upgrade socket. `staged` (a process taking over): at a temporary name
    /// beside `path`, the path itself being the running router's until the takeover is
    /// done. If that name cannot be bound (too long for a socket address, say), the
    /// socket is bound at `path` by [`Upgrade::install`] instead.
    pub fn bind(path: &Path, staged: bool) -> anyhow::Result<Upgrade> {
        sweep_staged(path);
        if !staged {
            let listener = bind_replacing(path)?;
            return Ok(Upgrade {
                path: path.to_path_buf(),
                listener: Some(listener),
                staged: None,
            });
        }
        let tmp = path.file_name().map(|name| {
            path.with_file_name(format!(
                ".{}.{}",
                name.to_string_lossy(),
                std::process::id()
            ))
        });
        let bound = tmp.and_then(|tmp| match bind_replacing(&tmp) {
            Ok(l) => Some((l, tmp)),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "upgrade socket bound only after the takeover");
                None
            }
        });
        let (listener, staged) = bound.unzip();
        Ok(Upgrade {
            path: path.to_path_buf(),
            listener,
            staged,
        })
    }

    /// Puts the socket at its path (renaming it over the previous process's socket file,
    /// if it has the same path), ready to be served.
    pub fn install(mut self) -> anyhow::Result<(PathBuf, UnixListener)> {
        let listener = match (self.listener.take(), self.staged.take()) {
            (Some(l), Some(tmp)) => {
                if let Err(e) = std::fs::rename(&tmp, &self.path) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e)
                        .with_context(|| format!("renaming {} into place", tmp.display()));
                }
                l
            }
            (Some(l), None) => l,
            (None, _) => bind_replacing(&self.path)?,
        };
        Ok((std::mem::take(&mut self.path), listener))
    }
}

impl Drop for Upgrade {
    /// Not installed (the takeover failed): the temporary name goes.
    fn drop(&mut self) {
        if let Some(tmp) = &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Removes the temporary names (`.<name>.<pid>`, see [`Upgrade::bind`]) left beside `path`
/// by processes that are gone (a successor killed before its takeover was done): those
/// that refuse connections (ECONNREFUSED), twice a moment apart (a socket is bound before
/// it listens). The pid in the name does not decide: from another pid namespace it may
/// name another process, or none, while the successor runs.
fn sweep_staged(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let socket = e.file_type().is_ok_and(|t| t.is_socket());
        if socket && pid as u32 != std::process::id() && pid > 0 && refuses(&e.path()) {
            let stale = e.path();
            if std::fs::remove_file(&stale).is_ok() {
                tracing::info!(path = %stale.display(), "removed a stale staged upgrade socket");
            }
        }
    }
}

/// Whether the Unix socket at `path` refuses connections (no process listens on it),
/// checked twice, 50 ms apart.
fn refuses(path: &Path) -> bool {
    let refused = || {
        matches!(
            UnixStream::connect(path).map_err(|e| e.raw_os_error()),
            Err(Some(code)) if code == nix::errno::Errno::ECONNREFUSED as i32
        )
    };
    refused() && {
        std::thread::sleep(Duration::from_millis(50));
        refused()
    }
}

/// Binds a Unix socket at `path`, replacing the file there.
fn bind_replacing(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Starts the thread that serves takeover requests on the upgrade socket: it waits for
/// `gate` to give it the socket (`listener`, bound at `old.path`) once this process serves
/// (started before, so that nothing is left to fail then); a gate closed without it ends
/// the thread.
pub fn serve(gate: std::sync::mpsc::Receiver<(Old, UnixListener)>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("router-handover".into())
        .spawn(move || {
            // Ended alone, it would leave the router impossible to take over (or, draining,
            // never exiting) while it looks healthy.
            flynn_runtime::abort_on_panic();
            let Ok((old, mut listener)) = gate.recv() else {
                return;
            };
            // Which file is ours: a successor commonly binds the same path (one
            // FLYNN_UPGRADE_SOCKET for every generation) before this process exits.
            let mut ours = file_id(&old.path);
            // A failure that persists (out of descriptors) is logged once a minute, not at
            // every retry.
            let mut accept_failing = Every::new(Duration::from_secs(60));
            loop {
                let conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) => {
                        if let Some(quiet) = accept_failing.due(Instant::now()) {
                            tracing::warn!(error = %e, since_last_warning = quiet, "upgrade socket accept failed");
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let mut handed = false;
                match hand_over(&old, conn, &mut handed) {
                    Ok(true) => {
                        drain_and_exit(&old, ours);
                    }
                    // A probe (a new process checking this one still runs): nothing asked.
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "takeover attempt failed");
                        // A successor that bound the path before it failed (a build before
                        // staged binding) left it to a socket no one serves: this process,
                        // which goes on, takes the path back, to be taken over again. Only
                        // after an attempt that got the state (a connection that asked for
                        // nothing, a probe, cannot have been such a successor).
                        if rebind_needed(handed, ours, file_id(&old.path)) {
                            match bind_replacing(&old.path) {
                                Ok(l) => {
                                    listener = l;
                                    ours = file_id(&old.path);
                                    tracing::info!(path = %old.path.display(), "upgrade socket bound again");
                                }
                                Err(e) => tracing::error!(error = %format!("{e:#}"), "the upgrade socket could not be bound again; no takeover is possible"),
                            }
                        }
                    }
                }
            }
        })
        .context("starting the upgrade socket's thread")?;
    Ok(())
}

/// Whether the upgrade socket's path is bound again after a failed takeover: only after
/// one that got the state (`handed`), and when the file at the path (`now`) is not the one
/// this process bound (`ours`; unknown counts as not).
fn rebind_needed(handed: bool, ours: Option<(u64, u64)>, now: Option<(u64, u64)>) -> bool {
    handed && (ours.is_none() || now != ours)
}

/// A warning for a failure that may repeat many times a second, due at most once per
/// `every`; `due` returns how many were not logged since the last one.
struct Every {
    every: Duration,
    last: Option<Instant>,
    quiet: u64,
}

impl Every {
    fn new(every: Duration) -> Self {
        Every {
            every,
            last: None,
            quiet: 0,
        }
    }

    fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.quiet += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.quiet))
            }
        }
    }
}

/// One takeover attempt on `conn`; `handed` is set once the state and sockets are sent.
/// `Ok(true)`: handed over, this process drains; `Ok(false)`: a connection that sent
/// nothing and closed (a probe: see [`old_gone`]), not a takeover attempt.
fn hand_over(old: &Old, conn: UnixStream, handed: &mut bool) -> anyhow::Result<bool> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(false);
    }
    if line.trim() != "takeover" {
        bail!("unexpected request {line:?}");
    }
    // From the copy on, this process refuses changes (the new one serves the same API
    // socket once it runs, and changes made here would be lost with this process); they
    // are accepted again if the handover fails.
    let thaw = Thaw(&old.api);
    // Until the state is sent, a panic is a failed attempt, not the end of the process:
    // nothing is handed over yet, so this process serves on (Thaw accepts changes again,
    // the connection closes and the successor gives up) and can be taken over again.
    // Aborting here would leave no router at all. From the send on, the thread is marked
    // again: a panic then, with the sockets handed over, aborts (both would serve).
    let (data, fds, _dups) = match flynn_runtime::recoverable(|| prepare(old)) {
        Ok(prepared) => prepared?,
        Err(panic) => {
            // The store's lock was taken unpoisoned (else `prepare` gave up) and only read
            // under it: a poison now is this panic's, over a store left as it was.
            old.api.store.clear_poison();
            let panic = flynn_runtime::panic_message(&*panic);
            bail!("preparing the state to hand over panicked ({panic}); still serving");
        }
    };
    *handed = true;
    flynn_runtime::handoff::send_with_fds(&conn, &data, &fds)?;
    tracing::info!(
        sockets = fds.len(),
        "listening sockets handed over; waiting for the new process"
    );
    line.clear();
    let read = r.read_line(&mut line);
    match (read, line.trim()) {
        // The new process waits for this answer before it accepts connections, serves the
        // API or the upgrade socket's path: once it is sent, the takeover is done. A new
        // process that gave up shut its end down first, so this write then fails.
        (Ok(_), "ready ack") => {
            (&conn)
                .write_all(b"ok\n")
                .context("the new process left before the takeover was confirmed")?;
        }
        // A build before the answer: it went on at once.
        (Ok(_), "ready") => {}
        (read, _) => {
            // Said so (a process that only closed the connection could have died: the new
            // one would then go on alone).
            let _ = (&conn).write_all(b"no\n");
            read.context("waiting for the new process to become ready")?;
            bail!("the new process did not become ready ({line:?}); still serving");
        }
    }
    // Handed over: this process only drains now.
    std::mem::forget(thaw);
    Ok(true)
}

/// What [`hand_over`] sends: the state's JSON and the descriptors, and the duplicates of
/// the TCP route listeners among them (open until sent).
type Prepared = (Vec<u8>, Vec<RawFd>, Vec<(u16, OwnedFd)>);

/// [`Prepared`] for `old`. Freezes the store (see [`Thaw`]).
fn prepare(old: &Old) -> anyhow::Result<Prepared> {
    let (routes, services, certificates, file) = {
        let s = old
            .api
            .store
            .lock()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        old.api
            .frozen
            .store(true, std::sync::atomic::Ordering::SeqCst);
        fault(HANDOVER_FAULT);
        let mut certs = s.certs.list();
        certs.reverse();
        (
            s.list(None),
            s.services().clone(),
            certs,
            old.api.file_record(),
        )
    };
    // After the freeze: routes no longer change, and a service dropped by a change just
    // before it is still listed (discovery updates the set only once it has cleared it).
    let listed = |set: &std::sync::Mutex<std::collections::BTreeSet<String>>| -> Vec<String> {
        set.lock()
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    };
    let (discovered, owed) = (listed(&old.api.discovered), listed(&old.api.owed));
    let tcp = old.api.shared.dup_tcp_listeners()?;
    let (ticket_keys, ticket_age) = old.api.shared.settings.tickets.export();
    let state = State {
        listeners: old
            .sockets
            .listeners
            .iter()
            .map(|(_, info, addr)| ListenerMeta {
                addr: *addr,
                tls: info.tls,
                h2c: info.h2c,
                route_port: info.route_port,
            })
            .collect(),
        api: old.sockets.api.1,
        tcp: tcp.iter().map(|(port, _)| *port).collect(),
        routes,
        services,
        certificates,
        file,
        ticket_keys,
        ticket_key_age_secs: ticket_age.as_secs(),
        discovered,
        owed,
        ready_ack: true,
    };
    let mut fds: Vec<RawFd> = old.sockets.listeners.iter().map(|(fd, _, _)| *fd).collect();
    fds.extend(tcp.iter().map(|(_, fd)| fd.as_raw_fd()));
    fds.push(old.sockets.api.0);
    let data = serde_json::to_vec(&state)?;
    Ok((data, fds, tcp))
}

/// The environment variable that injects a fault for tests (see [`fault`]).
const FAULT_ENV: &str = "FLYNN_ROUTER_TEST_FAULT";

/// The fault point in [`prepare`], under the store's lock with the store frozen.
const HANDOVER_FAULT: &str = "handover-prepare";

/// A panic at the fault point `point` if [`FAULT_ENV`] names it, the first time it is
/// reached in this process (tests only: a takeover whose preparation panics).
fn fault(point: &str) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if std::env::var_os(FAULT_ENV).is_some_and(|v| v == point)
        && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        panic!("fault injected at {point} ({FAULT_ENV})");
    }
}

/// Accepts API changes again when dropped (a handover that failed).
struct Thaw<'a>(&'a crate::api::Api);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0
            .frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.shared.settings.tickets.thaw();
    }
}

fn drain_and_exit(old: &Old, ours: Option<(u64, u64)>) -> ! {
    tracing::info!("new process ready: draining");
    let _ = old.api_stop.send(true);
    for c in &old.api.shared.cores {
        let _ = c.notify.send(CoreMsg::Drain(old.grace));
    }
    let deadline = Instant::now() + old.drain_timeout;
    // Let the cores stop their accept loops before counting connections.
    std::thread::sleep(Duration::from_millis(50));
    while old.api.shared.open_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = old.api.shared.open_connections();
    // API requests accepted before the switch are answered first (the API thread drops its
    // end of `api_stop` once they are done; it waits at most a few seconds for them).
    let api_deadline = Instant::now() + Duration::from_secs(5);
    while !old.api_stop.is_closed() && Instant::now() < api_deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(left, "drained; exiting");
    // Only our own socket file: the successor's at the same path stays for the next upgrade.
    if ours.is_some() && file_id(&old.path) == ours {
        let _ = std::fs::remove_file(&old.path);
    }
    std::process::exit(0);
}

/// Device and inode of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The running router, as a process taking over talks to it.
pub struct Peer {
    conn: UnixStream,
    /// The upgrade socket's path: whether it still accepts connections tells a refusal
    /// from a process that went away (see [`old_gone`]).
    path: PathBuf,
    /// Its process id (SO_PEERCRED), if known (0 from another pid namespace is unknown):
    /// a second sign (see [`old_gone`]).
    pid: Option<i32>,
}

/// The new side: asks the running router for its sockets and state.
pub fn take(path: &Path) -> anyhow::Result<(State, Vec<OwnedFd>, Peer)> {
    take_within(path, TAKE_TIMEOUT)
}

/// [`take`], waiting at most `timeout` for the state (a wedged old process must not hang
/// this one for ever: nothing is served yet, so giving up is safe).
fn take_within(path: &Path, timeout: Duration) -> anyhow::Result<(State, Vec<OwnedFd>, Peer)> {
    let mut conn =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    let pid = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid())
        .filter(|p| *p > 0);
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(b"takeover\n")?;
    let (data, fds) = match flynn_runtime::handoff::recv_with_fds(&conn) {
        Ok(got) => got,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => bail!(
            "the running router at {} did not hand its state over within {timeout:?} (wedged?); nothing taken over",
            path.display()
        ),
        Err(e) => return Err(e).context("receiving the handed-over state"),
    };
    let state: State = serde_json::from_slice(&data).context("parsing the handed-over state")?;
    let want = state.listeners.len() + state.tcp.len() + 1;
    if fds.len() != want {
        bail!("expected {want} sockets, got {}", fds.len());
    }
    Ok((
        state,
        fds,
        Peer {
            conn,
            path: path.to_path_buf(),
            pid,
        },
    ))
}

/// How a takeover ended for the new process, when it goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// The old process confirmed (`ok`), or is a build that does not answer: it drains.
    Confirmed,
    /// The old process went away (it died, or exited) before it answered: this one is
    /// the only router now.
    OldGone,
}

/// Tells the old process the new one is ready to serve, and (`ack`: the old process
/// answers) waits for its `ok`: the takeover is done only then. An error (the old process
/// said `no`, gave no answer in time, or closed the connection while it still runs) means
/// this process must not go on: the old one still serves.
pub fn ready(peer: Peer, ack: bool) -> anyhow::Result<Taken> {
    let mut conn = peer.conn;
    if !ack {
        conn.write_all(b"ready\n")?;
        return Ok(Taken::Confirmed);
    }
    confirm(&conn, &peer.path, peer.pid, READY_ACK_TIMEOUT, GONE_WAIT)
}

/// [`ready`]'s exchange on `conn`: `ready ack`, then the answer within `timeout`. A
/// connection closed without one is a refusal unless the old process is gone within
/// `gone_wait` (see [`old_gone`]: its upgrade socket at `path` refuses connections).
fn confirm(
    conn: &UnixStream,
    path: &Path,
    pid: Option<i32>,
    timeout: Duration,
    gone_wait: Duration,
) -> anyhow::Result<Taken> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    let mut w = conn;
    let sent = w.write_all(b"ready ack\n");
    let read = match sent {
        Ok(()) => {
            conn.set_read_timeout(Some(timeout))?;
            r.read_line(&mut line)
        }
        // Closed already: as an end of the connection.
        Err(_) => Ok(0),
    };
    let read = match read {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            // No answer in time. The old process must not take a late `ok` as accepted
            // (it would drain while this one exits): with the read side shut, its write
            // fails. One written just before that is still here to read, and stands.
            let _ = conn.shutdown(std::net::Shutdown::Read);
            match r.read_line(&mut line) {
                Ok(_) if line.trim() == "ok" => return Ok(Taken::Confirmed),
                _ => bail!(
                    "the running router did not confirm the takeover within {timeout:?}; it still serves"
                ),
            }
        }
        read => read,
    };
    match (read, line.trim()) {
        (Ok(_), "ok") => Ok(Taken::Confirmed),
        (Ok(_), "no") => {
            bail!("the running router refused the takeover (it did not confirm); it still serves")
        }
        // The end of the connection (or an error reading it): gone, or gave up.
        (Ok(0), _) | (Err(_), _) => {
            if old_gone(path, pid, gone_wait) {
                Ok(Taken::OldGone)
            } else {
                bail!("the running router closed the connection and did not confirm the takeover; it still serves")
            }
        }
        (Ok(_), other) => {
            bail!("the running router did not confirm the takeover ({other:?}); it still serves")
        }
    }
}

/// Whether the old process, which closed the takeover connection without an answer, is
/// gone (it died) within `wait`. Its upgrade socket at `path` says so: a connection to it
/// is refused (ECONNREFUSED: no process listens there any more; ENOENT: no socket), as a
/// process that exits closes it. That holds across pid namespaces and with a /proc that
/// hides other processes, and a reused pid does not mislead it. The probe sends nothing,
/// which the old process takes for no takeover attempt (see [`hand_over`]). A socket that
/// accepts means it still runs (a dying process may close the connection a moment before
/// its listener, so the probe is repeated until `wait` is over). Only if the path cannot
/// tell (another error) does the pid (`pid`, from SO_PEERCRED) decide.
fn old_gone(path: &Path, pid: Option<i32>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        match probe(path) {
            Probe::Gone => return true,
            Probe::Listening => {}
            Probe::Unknown => {
                if pid.is_some_and(|p| !alive(p)) {
                    return true;
                }
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What connecting to an upgrade socket (or a staged one) tells of its process.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// Refused, or no socket there: no process listens.
    Gone,
    /// Accepted (or the queue is full): a process listens.
    Listening,
    /// Another error (no permission, say): no sign either way.
    Unknown,
}

/// Connects to the Unix socket at `path` and closes the connection at once, having sent
/// nothing.
fn probe(path: &Path) -> Probe {
    use nix::errno::Errno;
    match UnixStream::connect(path) {
        Ok(_) => Probe::Listening,
        Err(e) => match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ECONNREFUSED | Errno::ENOENT) => Probe::Gone,
            Some(Errno::EAGAIN) => Probe::Listening,
            _ => Probe::Unknown,
        },
    }
}

/// Whether process `pid` runs (in this process's pid namespace, as /proc shows it): a
/// zombie (exited, not yet reaped) does not. Not listed in /proc counts as gone only if
/// `kill(pid, 0)` says there is no such process (ESRCH): with `hidepid` a live process of
/// another user is not listed. Without a usable /proc it counts as running.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)` (comm may hold any byte).
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X' | 'x')
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::metadata("/proc/self/stat").is_err()
                || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    != Err(nix::errno::Errno::ESRCH)
        }
        Err(_) => true,
    }
}

/// How long a new process waits for the old one's state and sockets.
const TAKE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a new process waits for the old one's `ok` (sent as soon as it reads `ready`).
const READY_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a process that closed the takeover connection without an answer is given to
/// be gone (it died) before the close counts as a refusal.
const GONE_WAIT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests;
