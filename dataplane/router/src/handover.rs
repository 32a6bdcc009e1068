//! Zero-downtime upgrades: a new router process takes over the listening sockets of the
//! running one.
//!
//! The running router (`--upgrade-socket PATH`) listens on a Unix socket. A new one
//! started with `--takeover PATH` connects and asks; the old one replies with its route
//! state (routes, services) and the descriptors of all its HTTP, HTTPS and API listening
//! sockets (SCM_RIGHTS). Both processes now accept from the same sockets, so no
//! connection is refused. When the new one is serving it says `ready ack` and waits for
//! the old one's `ok`: from that answer on the takeover is done. The old one then
//! stops accepting (its accept loops wait on readiness, so stopping loses nothing), its
//! busy connections finish with `Connection: close`, idle ones are closed after a grace
//! period, and it exits when none are left (or after the drain timeout).
//! Until the `ok` the new process changes nothing the old one relies on: it serves
//! neither the admin API (a change it accepted would be lost with it if the takeover
//! failed) nor the upgrade socket's path (its socket waits at a temporary name beside
//! the path, renamed into place after the `ok`), so a takeover that fails (the new
//! process dies, or is too slow) leaves the old one serving as before, and it can be taken
//! over again. A successor from an older build binds the path before it says `ready`: if
//! that takeover fails, the old process binds the path again.
//! TCP route listeners are passed too (their ports after the HTTP listeners): the new
//! process accepts from the same sockets, and the old one stops accepting on `ready`, so
//! no queued TCP connection is reset; its open TCP streams count as connections to drain.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
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

/// Binds a Unix socket at `path`, replacing the file there.
fn bind_replacing(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Serves takeover requests on the upgrade socket `listener`, bound at `old.path` (a
/// thread of its own).
pub fn serve(old: Old, mut listener: UnixListener) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("router-handover".into())
        .spawn(move || {
            // Which file is ours: a successor commonly binds the same path (one
            // FLYNN_UPGRADE_SOCKET for every generation) before this process exits.
            let mut ours = file_id(&old.path);
            loop {
                let conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade socket accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&old, conn) {
                    Ok(()) => {
                        drain_and_exit(&old, ours);
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "takeover attempt failed");
                        // A successor that bound the path before it failed (a build before
                        // staged binding) left it to a socket no one serves: this process,
                        // which goes on, takes the path back, to be taken over again.
                        if ours.is_none() || file_id(&old.path) != ours {
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
        })?;
    Ok(())
}

fn hand_over(old: &Old, conn: UnixStream) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.trim() != "takeover" {
        bail!("unexpected request {line:?}");
    }
    // From the copy on, this process refuses changes (the new one serves the same API
    // socket once it runs, and changes made here would be lost with this process); they
    // are accepted again if the handover fails.
    let thaw = Thaw(&old.api);
    let (routes, services, certificates, file) = {
        let s = old
            .api
            .store
            .lock()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        old.api
            .frozen
            .store(true, std::sync::atomic::Ordering::SeqCst);
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
    flynn_runtime::handoff::send_with_fds(&conn, &data, &fds)?;
    tracing::info!(
        sockets = fds.len(),
        "listening sockets handed over; waiting for the new process"
    );
    line.clear();
    r.read_line(&mut line)?;
    match line.trim() {
        // The new process waits for this answer before it serves the API or the upgrade
        // socket's path: once it is sent, the takeover is done.
        "ready ack" => {
            (&conn)
                .write_all(b"ok\n")
                .context("the new process left before the takeover was confirmed")?;
        }
        // A build before the answer: it went on at once.
        "ready" => {}
        _ => bail!("the new process did not become ready ({line:?}); still serving"),
    }
    // Handed over: this process only drains now.
    std::mem::forget(thaw);
    Ok(())
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

/// The new side: asks the running router for its sockets and state.
pub fn take(path: &Path) -> anyhow::Result<(State, Vec<OwnedFd>, UnixStream)> {
    let mut conn =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    conn.write_all(b"takeover\n")?;
    let (data, fds) = flynn_runtime::handoff::recv_with_fds(&conn)?;
    let state: State = serde_json::from_slice(&data).context("parsing the handed-over state")?;
    let want = state.listeners.len() + state.tcp.len() + 1;
    if fds.len() != want {
        bail!("expected {want} sockets, got {}", fds.len());
    }
    Ok((state, fds, conn))
}

/// Tells the old process the new one is serving, and (`ack`: the old process answers)
/// waits for its `ok`: the takeover is done only then. Without it (the old process gave
/// up, or went away) this process must not go on: the old one still serves.
pub fn ready(mut conn: UnixStream, ack: bool) -> anyhow::Result<()> {
    if !ack {
        conn.write_all(b"ready\n")?;
        return Ok(());
    }
    conn.write_all(b"ready ack\n")?;
    conn.set_read_timeout(Some(READY_ACK_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .context("waiting for the running router to confirm the takeover")?;
    if line.trim() != "ok" {
        bail!("the running router did not confirm the takeover ({line:?}); it still serves");
    }
    Ok(())
}

/// How long a new process waits for the old one's `ok` (sent as soon as it reads `ready`).
const READY_ACK_TIMEOUT: Duration = Duration::from_secs(30);
