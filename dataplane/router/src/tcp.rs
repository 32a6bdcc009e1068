//! TCP routes (spec §1.8): a listener per route port on every core, backends dialled
//! in shuffled order, bytes piped both ways with half-close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};

use monoio::io::Splitable;
use monoio::net::{TcpListener, TcpStream};

use crate::balance::DialOrder;
use crate::io::pipe;
use crate::metrics::CoreMetrics;
use crate::proxy::dial_counted;
use crate::shared::CoreMsg;
use crate::worker::{accept_ready, AcceptFailing, Core, Stop};

struct Running {
    fd: i32,
    stop: Rc<Stop>,
    /// The listener, while its accept task holds it (the task owns it: once the task
    /// ended, handed over say, `fd` may be closed and its number reused).
    listener: Weak<TcpListener>,
}

/// The TCP route listeners of one core.
#[derive(Default)]
pub struct Listeners {
    open: HashMap<u16, Vec<Running>>,
    adopted: bool,
}

impl Listeners {
    /// Opens listeners for new route ports and closes those whose route is gone. On the
    /// first call, listeners taken over from a previous process are adopted first.
    pub fn reconcile(&mut self, core: &Rc<Core>) {
        let table = core.table();
        let gone: Vec<u16> = self
            .open
            .keys()
            .copied()
            .filter(|p| table.tcp_route(*p).is_none())
            .collect();
        for port in gone {
            for r in self.open.remove(&port).unwrap_or_default() {
                // Out of the registry first, so a handover never sends a closed fd.
                unregister(core, port, r.fd);
                // Then out of LISTEN now, not when the accept task next runs and drops
                // (closes) the socket (with io_uring, later still: its pending poll holds
                // it until cancelled): the removal counts as applied once this returns,
                // and a route may take the port again as soon as every core applied it,
                // which the exclusive bind check (`Store::unbindable`) would refuse while
                // a socket no longer registered as ours still listens there. On Linux a
                // shutdown takes a listening socket out of LISTEN (connections queued
                // and not accepted are reset, as a close would) and wakes its pending
                // poll. Not on a core that stopped (handed over or draining): its
                // sockets may serve the process that took over.
                if !core.stop.fired() {
                    if let Some(l) = r.listener.upgrade() {
                        flynn_runtime::sock::shutdown(l.as_raw_fd());
                    }
                }
                r.stop.fire();
            }
        }
        if !self.adopted {
            self.adopted = true;
            let mine = core
                .shared
                .inherited_tcp
                .lock()
                .map(|mut v| std::mem::take(&mut v[core.index]))
                .unwrap_or_default();
            for (port, l) in mine {
                if table.tcp_route(port).is_none() {
                    continue; // dropped: closed
                }
                match TcpListener::from_std(l) {
                    Ok(l) => self.run(core, l, port),
                    Err(e) => tracing::error!(port, error = %e, "cannot adopt TCP listener"),
                }
            }
        }
        // Listeners whose accept task ended while this core serves (their socket was shut
        // down by another process and no stop came, see `accept`): forgotten, so their
        // ports reopen below.
        // (On a core that stopped, a task ends when its socket was handed over: not
        // reopened.)
        if !core.stop.fired() {
            self.open.retain(|_, rs| {
                rs.retain(|r| r.listener.strong_count() > 0);
                !rs.is_empty()
            });
        }
        for port in table.tcp_ports() {
            if self.open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(core.settings().tcp_ip, port);
            match flynn_runtime::reuseport_listener(addr).and_then(TcpListener::from_std) {
                Ok(l) => self.run(core, l, port),
                Err(e) => tracing::error!(%addr, error = %e, "cannot listen for TCP route"),
            }
        }
    }

    fn run(&mut self, core: &Rc<Core>, l: TcpListener, port: u16) {
        let fd = l.as_raw_fd();
        let stop = Rc::new(Stop::default());
        let l = Rc::new(l);
        core.shared
            .tcp_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(port)
            .or_default()
            .push(fd);
        self.open.entry(port).or_default().push(Running {
            fd,
            stop: stop.clone(),
            listener: Rc::downgrade(&l),
        });
        monoio::spawn(accept(core.clone(), l, port, stop));
    }
}

fn unregister(core: &Core, port: u16, fd: i32) {
    let mut fds = core
        .shared
        .tcp_fds
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(list) = fds.get_mut(&port) {
        list.retain(|f| *f != fd);
        if list.is_empty() {
            fds.remove(&port);
        }
    }
}

/// How long a core that still serves waits, after its TCP route listener was shut down by
/// another process, before it reopens the port: longer than an old process waits for the
/// new one's answer in a takeover (60 s), after which a takeover that went through has
/// stopped the core.
const REOPEN_AFTER: std::time::Duration = std::time::Duration::from_secs(65);

/// Readiness, then non-blocking accepts (as for HTTP): stopping, for a route removal
/// or a handover, drops only a readiness wait, never an accepted connection.
async fn accept(core: Rc<Core>, l: Rc<TcpListener>, port: u16, stop: Rc<Stop>) {
    let fd = l.as_raw_fd();
    let mut failing = AcceptFailing::default();
    // A pause due before the next accepts (after failures), ended early by a stop.
    let mut pause = None;
    loop {
        // True: handed over.
        let stopped = async {
            monoio::select! {
                _ = stop.wait() => false,
                _ = core.stop.wait() => true,
            }
        };
        match accept_ready(&l, pause.take(), stopped).await {
            // Woken by the removal's shutdown: nothing more to accept (and accepting from
            // a socket out of LISTEN would fail, to no one's interest).
            Ok(_) if stop.fired() => return,
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                pause = Some(std::time::Duration::from_millis(10));
                continue;
            }
            Err(false) => return,
            Err(true) => {
                // Handed over: the new process accepts from the same socket.
                unregister(&core, port, fd);
                return;
            }
        }
        for _ in 0..64 {
            let std_stream = match flynn_runtime::handoff::accept_nonblocking(fd) {
                Ok((s, _)) => {
                    failing.ok();
                    s
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // Out of LISTEN, and not by this process's removal (that fired `stop`): a
                // process that took this socket over shut it down, having removed its
                // route before this core stopped. Nothing more to accept here: as a stop.
                // If this core still serves, the shutdown came before its stop: a takeover
                // still waiting for the new process's answer (which stops the core if it
                // comes, within the old process's 60 s wait for it), or one that failed, the
                // old process going on with the route in its table, or another program.
                // Warned, and, if no stop came meanwhile, the core reconciles its TCP
                // listeners again after [`REOPEN_AFTER`], which reopens the port (this
                // task's listener is gone by then); quiet on a core that stopped.
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
                    unregister(&core, port, fd);
                    if !core.stop.fired() {
                        tracing::warn!(
                            port,
                            reopen_after_secs = REOPEN_AFTER.as_secs(),
                            "TCP route listener shut down by another process while this one \
                             serves; reopened later unless this process is handed over"
                        );
                        let stopped = monoio::select! {
                            _ = core.stop.wait() => true,
                            _ = stop.wait() => true,
                            _ = monoio::time::sleep(REOPEN_AFTER) => false,
                        };
                        if !stopped {
                            let _ = core.shared.cores[core.index].notify.send(CoreMsg::Table);
                        }
                    }
                    return;
                }
                Err(e) => {
                    let what = "TCP route accept failed; backing off";
                    pause = failing.failed(&core, &e, what);
                    if pause.is_some() {
                        break;
                    }
                    continue;
                }
            };
            // The same per-core cap as HTTP connections (they share the descriptors):
            // one past it is closed unserved.
            if core.conns.get() >= core.settings().max_conns_per_core {
                CoreMetrics::inc(&core.metrics().connections_rejected_total);
                continue;
            }
            let Ok(s) = TcpStream::from_std(std_stream) else {
                continue;
            };
            CoreMetrics::inc(&core.metrics().tcp_connections_total);
            // Counted now, not when its task first runs, so a burst of accepts cannot
            // overshoot the cap.
            let active = Active::new(&core);
            monoio::spawn(proxy(core.clone(), s, port, active));
        }
    }
}

/// Counts a TCP route connection as open, against the per-core cap and for a draining
/// process (which waits for it), until dropped.
struct Active(Rc<Core>);

impl Active {
    fn new(core: &Rc<Core>) -> Active {
        core.conns.set(core.conns.get() + 1);
        CoreMetrics::inc(&core.metrics().tcp_connections_active);
        Active(core.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.conns.set(self.0.conns.get() - 1);
        CoreMetrics::dec(&self.0.metrics().tcp_connections_active);
    }
}

async fn proxy(core: Rc<Core>, c: TcpStream, port: u16, _active: Active) {
    let table = core.table();
    let Some(route) = table.tcp_route(port) else {
        return;
    };
    let mut order = DialOrder::new(&route.backends, None);
    // The same route (not another one that took its port meanwhile).
    let now = || {
        core.table()
            .tcp_route(port)
            .filter(|r| r.id == route.id)
            .map(|r| r.backends.clone())
    };
    let mut up = None;
    while let Some(addr) = order.next(now) {
        if let Ok(s) = dial_counted(&core, addr).await {
            up = Some((s, addr));
            break;
        }
    }
    drop(table);
    let Some((up, addr)) = up else {
        CoreMetrics::inc(&core.metrics().tcp_connect_errors_total);
        return;
    };
    let _inflight = core.start_request(addr);
    let _ = c.set_nodelay(true);
    // Long-lived: a peer on either side that vanishes without a FIN is noticed.
    let _ = flynn_runtime::sock::set_keepalive(c.as_raw_fd());
    let _ = flynn_runtime::sock::set_keepalive(up.as_raw_fd());
    let tunnel = core.tunnels.open(c.as_raw_fd(), up.as_raw_fd());
    let (mut cr, mut cw) = c.into_split();
    let (mut ur, mut uw) = up.into_split();
    // Side 0 is the client, 1 the backend, as opened.
    let a = pipe(&mut cr, &mut uw, Vec::with_capacity(16 * 1024), &tunnel, 0);
    let b = pipe(&mut ur, &mut cw, Vec::with_capacity(16 * 1024), &tunnel, 1);
    let _ = monoio::join!(a, b);
    // The sockets close as this returns, with no await in between.
    tunnel.finish();
}
