//! One core: its listeners, its upstream pool, its in-flight counts and its copy of the
//! route table. Nothing here is shared with other cores except read-only snapshots.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flynn_routes::Table;
use flynn_runtime::{Local, WorkerCtx};
use std::os::fd::AsRawFd;

use monoio::net::{TcpListener, TcpStream};

use crate::idle::IdleSet;
use crate::metrics::CoreMetrics;
use crate::pool::Pool;
use crate::shared::{CoreMsg, Settings, Shared};

/// What an HTTP listener tells the proxy about itself.
#[derive(Debug, Clone, Copy)]
pub struct ListenerInfo {
    /// The listener's own port (`X-Forwarded-Port`).
    pub port: u16,
    /// The port key routes use: 0 for the default listener.
    pub route_port: u16,
    /// HTTPS (TLS terminated here) rather than plain HTTP.
    pub tls: bool,
    /// Plain HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub h2c: bool,
}

/// Per-core state.
pub struct Core {
    pub index: usize,
    pub shared: Arc<Shared>,
    // An `Rc` around the shared `Arc`: requests clone a core-local, non-atomic count
    // instead of bumping the snapshot's cross-core atomic one.
    #[allow(clippy::redundant_allocation)]
    table: RefCell<Rc<Arc<Table>>>,
    local: RefCell<Local<Table>>,
    inflight: InflightMap,
    pub pool: Pool,
    /// HTTP/2 connections to gRPC backends, shared by this core's streams (id, handle).
    pub grpc: RefCell<HashMap<SocketAddr, (u64, h2::client::SendRequest<bytes::Bytes>)>>,
    /// Client connections open on this core, HTTP and TCP routes alike, against
    /// `--max-conns-per-core`.
    pub conns: Cell<usize>,
    /// Idle keep-alive client connections, expired by a sweep.
    pub idle: IdleSet,
    /// Open tunnels (TCP routes, upgrades), closed by the same sweep when idle.
    pub tunnels: crate::tunnels::Tunnels,
    /// Writes to HTTP/1 clients in progress, shut down by the sweep when one makes no
    /// progress for the idle timeout.
    pub sends: crate::tunnels::Tunnels,
    /// Fired when this process hands its listeners over: stop accepting, drain.
    pub stop: Stop,
    /// Idle connections parked without a task (None: epoll unavailable, never park).
    pub parked: Option<crate::park::Parked>,
    /// Free I/O buffers: idle connections hold none, busy ones borrow from here.
    bufs: RefCell<Vec<Vec<u8>>>,
    /// Free (empty) buffer sets for connections that become busy.
    /// Boxed because connections hold them as one pointer while busy.
    #[allow(clippy::vec_box)]
    bufsets: RefCell<Vec<Box<crate::proxy::Bufs>>>,
}

/// Size of the per-connection I/O buffers.
pub const BUF: usize = 16 * 1024;
/// Free buffers kept per core beyond what connections are using.
const FREE_BUFS: usize = 1024;

impl Core {
    pub fn metrics(&self) -> &CoreMetrics {
        &self.shared.cores[self.index].metrics
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// True once this process handed its listeners over and is draining.
    pub fn draining(&self) -> bool {
        self.stop.fired()
    }

    /// The idle sweep's limits, in its one-second ticks: between requests (the idle
    /// timeout), and before a connection's first request (the header timeout, no longer
    /// than the idle one: a connection that has not sent its first request yet is held no
    /// longer than a head may take, as nginx's `client_header_timeout` and Go's
    /// `ReadHeaderTimeout` do).
    pub fn idle_limits(&self) -> (u32, u32) {
        let secs = |d: std::time::Duration| d.as_secs().clamp(1, u32::MAX as u64) as u32;
        let limit = secs(self.settings().idle_timeout);
        (limit, secs(self.settings().header_timeout).min(limit))
    }

    /// Whether a connection that started at `start` (the idle sweep's clock) and has had
    /// no request yet is past its header timeout, as the sweep counts it.
    pub fn first_request_overdue(&self, start: u32) -> bool {
        self.idle.now().saturating_sub(start) > self.idle_limits().1
    }

    /// The table requests should use now (a core-local reference count, no atomics).
    #[allow(clippy::redundant_allocation)]
    pub fn table(&self) -> Rc<Arc<Table>> {
        self.table.borrow().clone()
    }

    fn refresh(&self) -> bool {
        let mut local = self.local.borrow_mut();
        if local.refresh(&self.shared.table) {
            *self.table.borrow_mut() = Rc::new(local.get().clone());
            true
        } else {
            false
        }
    }

    /// A cleared buffer of at least `BUF` bytes (reused, so no allocation in steady state).
    pub fn take_buf(&self) -> Vec<u8> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUF))
    }

    /// Returns a buffer to the free list (oversized or surplus ones are dropped).
    pub fn give_buf(&self, mut b: Vec<u8>) {
        if b.capacity() < BUF || b.capacity() > 4 * BUF {
            return;
        }
        let mut free = self.bufs.borrow_mut();
        if free.len() < FREE_BUFS {
            b.clear();
            free.push(b);
        }
    }

    pub fn take_bufs(&self) -> Box<crate::proxy::Bufs> {
        self.bufsets.borrow_mut().pop().unwrap_or_default()
    }

    /// Takes back a released (empty) buffer set.
    pub fn give_bufs(&self, b: Box<crate::proxy::Bufs>) {
        let mut free = self.bufsets.borrow_mut();
        if free.len() < FREE_BUFS {
            free.push(b);
        }
    }

    /// Makes sure `b` has a buffer from the free list.
    pub fn ensure_buf(&self, b: &mut Vec<u8>) {
        if b.capacity() == 0 {
            *b = self.take_buf();
        }
    }

    /// Hands `b`'s buffer back, leaving an empty, unallocated `Vec`.
    pub fn release_buf(&self, b: &mut Vec<u8>) {
        if b.capacity() > 0 {
            self.give_buf(std::mem::take(b));
        }
    }

    /// Counts a new client connection.
    pub fn conn_opened(&self) {
        self.conns.set(self.conns.get() + 1);
        CoreMetrics::inc(&self.metrics().connections_active);
    }

    /// A client connection ended.
    pub fn conn_closed(&self) {
        self.conns.set(self.conns.get() - 1);
        CoreMetrics::dec(&self.metrics().connections_active);
    }

    /// Parks an idle connection (see [`crate::park`]); false if it could not be.
    pub fn park(&self, c: crate::park::Conn) -> bool {
        let ok = self.parked.as_ref().is_some_and(|p| p.park(c).is_ok());
        self.note_parked();
        ok
    }

    /// `n` parked connections were closed (expired or drained).
    pub fn parked_closed(&self, n: usize) {
        for _ in 0..n {
            self.conn_closed();
        }
        self.note_parked();
    }

    pub fn note_parked(&self) {
        let n = self.parked.as_ref().map_or(0, |p| p.len());
        self.metrics()
            .connections_parked_active
            .store(n as u64, Ordering::Relaxed);
    }

    pub fn inflight(&self, addr: &SocketAddr) -> u32 {
        self.inflight.get(addr)
    }

    /// Counts a request in flight to `addr` until the guard drops.
    pub fn start_request(self: &Rc<Self>, addr: SocketAddr) -> InFlight {
        self.inflight.start(addr);
        InFlight {
            core: self.clone(),
            addr,
        }
    }
}

/// Requests in flight per backend address on one core. An address's entry stays at zero
/// between requests (no map insert per request) and is dropped at the next table change,
/// so backends that came and went (autoscaling, deploys) do not accumulate.
#[derive(Default)]
struct InflightMap(RefCell<HashMap<SocketAddr, u32>>);

impl InflightMap {
    fn get(&self, addr: &SocketAddr) -> u32 {
        self.0.borrow().get(addr).copied().unwrap_or(0)
    }
    fn start(&self, addr: SocketAddr) {
        *self.0.borrow_mut().entry(addr).or_insert(0) += 1;
    }
    fn end(&self, addr: &SocketAddr) {
        if let Some(n) = self.0.borrow_mut().get_mut(addr) {
            *n = n.saturating_sub(1);
        }
    }
    /// Forgets the addresses with nothing in flight.
    fn prune(&self) {
        self.0.borrow_mut().retain(|_, n| *n > 0);
    }
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
}

pub struct InFlight {
    core: Rc<Core>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.core.inflight.end(&self.addr);
    }
}

/// The worker's main future: serve HTTP listeners, follow table updates, and open or
/// close TCP route listeners to match the table. Without `serve` (a process taking over,
/// until the takeover is done) it accepts nothing, on `http` or TCP route ports, until
/// [`CoreMsg::Serve`]: connections wait in the listening sockets' queues, which the old
/// process accepts from meanwhile.
pub async fn run(
    ctx: WorkerCtx,
    shared: Arc<Shared>,
    http: Vec<(std::net::TcpListener, ListenerInfo)>,
    serve: bool,
) {
    let slot = &shared.cores[ctx.index];
    let _ = slot.driver.set(ctx.driver);
    let inbox = slot.inbox.lock().ok().and_then(|mut g| g.take());
    let local = Local::new(&shared.table);
    let core = Rc::new(Core {
        index: ctx.index,
        table: RefCell::new(Rc::new(local.get().clone())),
        local: RefCell::new(local),
        inflight: InflightMap::default(),
        pool: Pool::new(shared.settings.pool_idle_per_backend),
        grpc: RefCell::new(HashMap::new()),
        conns: Cell::new(0),
        bufs: RefCell::new(Vec::new()),
        bufsets: RefCell::new(Vec::new()),
        idle: IdleSet::default(),
        // A tunnel's survivor of its other side's reset lingers as an HTTP connection
        // does, for at most the time a lingering close waits for a quiet client.
        tunnels: crate::tunnels::Tunnels::lingering(
            shared
                .settings
                .lingering_time
                .min(crate::proxy::LINGER_QUIET),
        ),
        sends: Default::default(),
        stop: Stop::default(),
        parked: match crate::park::Parked::new() {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "idle connections will not be parked");
                None
            }
        },
        shared: shared.clone(),
    });
    monoio::spawn(sweep_idle(core.clone()));
    monoio::spawn(unpark(core.clone()));
    let mut tcp = crate::tcp::Listeners::default();
    // The HTTP listeners held until the core serves.
    let mut held = Some(http);
    if serve {
        start_serving(&core, &mut tcp, held.take().unwrap_or_default());
    }
    set_pool_backends(&core);
    slot.applied
        .store(core.table().version(), Ordering::Release);
    let Some(inbox) = inbox else { return };
    while let Ok(msg) = inbox.recv_async().await {
        match msg {
            CoreMsg::Table => {
                core.refresh();
                if held.is_none() {
                    tcp.reconcile(&core);
                }
                // Connections to backends no route has any more are closed now (idle
                // ones) or when their response is done (ones in use), not kept until
                // their address comes back.
                set_pool_backends(&core);
                forget_gone_backends(&core);
                slot.applied
                    .store(core.table().version(), Ordering::Release);
            }
            CoreMsg::Inflight(addr, reply) => {
                let _ = reply.send(core.inflight(&addr));
            }
            CoreMsg::Drain(grace) => {
                monoio::spawn(drain(core.clone(), grace));
            }
            CoreMsg::Serve(more, reply) => {
                let mut opened = Vec::new();
                if let Some(mut http) = held.take() {
                    for (addr, info) in more {
                        match flynn_runtime::reuseport_listener(addr) {
                            Ok(l) => {
                                if let Ok(bound) = l.local_addr() {
                                    opened.push((l.as_raw_fd(), info, bound));
                                }
                                http.push((l, info));
                            }
                            // Taken over already: this core goes without (the others
                            // accept there).
                            Err(e) => {
                                tracing::error!(%addr, core = ctx.index, error = %e, "cannot listen")
                            }
                        }
                    }
                    start_serving(&core, &mut tcp, http);
                }
                let _ = reply.send(opened);
            }
        }
    }
}

/// Starts the accept loops: on the HTTP listeners `http`, and on the TCP route ports.
fn start_serving(
    core: &Rc<Core>,
    tcp: &mut crate::tcp::Listeners,
    http: Vec<(std::net::TcpListener, ListenerInfo)>,
) {
    for (l, info) in http {
        match TcpListener::from_std(l) {
            Ok(l) => {
                monoio::spawn(accept_http(core.clone(), l, info));
            }
            Err(e) => tracing::error!(error = %e, "cannot register HTTP listener"),
        }
    }
    tcp.reconcile(core);
}

/// Tells the upstream pool which backends the table has (HTTP routes' backends: TCP
/// routes do not pool).
fn set_pool_backends(core: &Core) {
    let table = core.table();
    core.pool
        .set_backends(table.http_routes().flat_map(|r| r.backends.iter().copied()));
}

/// After a table change: in-flight counts at zero are dropped, and so are pooled gRPC
/// connections to backends no HTTP route has any more.
fn forget_gone_backends(core: &Core) {
    core.inflight.prune();
    let mut grpc = core.grpc.borrow_mut();
    if !grpc.is_empty() {
        let table = core.table();
        let live: std::collections::HashSet<SocketAddr> = table
            .http_routes()
            .flat_map(|r| r.backends.iter().copied())
            .collect();
        grpc.retain(|a, _| live.contains(a));
    }
}

/// Newly parked connections (since the last trim) that make the sweep trim the heap.
const TRIM_AFTER_PARKED: usize = 512;

async fn sweep_idle(core: Rc<Core>) {
    let (limit, first_limit) = core.idle_limits();
    let secs = |d: std::time::Duration| d.as_secs().min(u32::MAX as u64) as u32;
    let tunnel_limit = secs(core.settings().tunnel_timeout);
    let fin_limit = secs(core.settings().tunnel_fin_timeout);
    // Parked count at the last heap trim.
    let mut trimmed_at = 0usize;
    for tick in 1u64.. {
        monoio::time::sleep(std::time::Duration::from_secs(1)).await;
        core.idle.sweep(
            limit,
            first_limit,
            core.parked.is_some() && !core.draining(),
        );
        let closed = core.tunnels.sweep(tunnel_limit, fin_limit);
        for _ in 0..closed {
            CoreMetrics::inc(&core.metrics().tunnel_timeouts_total);
        }
        for _ in 0..core.sends.sweep(limit, 0) {
            CoreMetrics::inc(&core.metrics().client_send_timeouts_total);
        }
        if tick % 5 == 0 {
            // Upstream connections too old to reuse are closed (not kept open until a
            // request happens to look at them).
            core.pool.prune();
        }
        if let Some(p) = &core.parked {
            let n = p.expire(core.idle.now(), limit, first_limit);
            core.parked_closed(n);
            // Many tasks just ended for parking: return their memory (bulk only, rare).
            if p.len() >= trimmed_at + TRIM_AFTER_PARKED {
                flynn_runtime::park::trim_heap();
                trimmed_at = p.len();
            } else if p.len() < trimmed_at {
                trimmed_at = p.len();
            }
        }
    }
}

/// Brings parked connections back when their clients send (or close): waits for the
/// core's epoll set to turn readable, then respawns each ready connection's loop.
async fn unpark(core: Rc<Core>) {
    let Some(p) = &core.parked else { return };
    let set = match p.epoll.pollable().and_then(TcpStream::from_std) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "parking disabled: cannot watch the epoll set");
            return;
        }
    };
    let mut tokens = [0u64; 64];
    loop {
        if set.readable(false).await.is_err() {
            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        loop {
            let n = p.epoll.ready(&mut tokens);
            for t in &tokens[..n] {
                let Some(c) = p.take(*t) else { continue };
                core.note_parked();
                let std_stream = std::net::TcpStream::from(c.fd);
                let fd = std_stream.as_raw_fd();
                match TcpStream::from_std(std_stream) {
                    Ok(stream) => {
                        monoio::spawn(crate::proxy::serve_conn(
                            core.clone(),
                            stream,
                            fd,
                            None,
                            c.peer,
                            c.info,
                            crate::proxy::Start::Unparked {
                                first: c.first.then_some(c.since),
                            },
                        ));
                    }
                    Err(_) => core.conn_closed(),
                }
            }
            if n < tokens.len() {
                break;
            }
        }
    }
}

async fn accept_http(core: Rc<Core>, listener: TcpListener, info: ListenerInfo) {
    // Readiness, then non-blocking accepts: stopping (for a handover) drops only a
    // readiness wait, so no connection the kernel handed us can be lost on the way.
    // (A cancellable io_uring accept measured ~2x costlier per new connection here.)
    let fd = listener.as_raw_fd();
    let mut failing = AcceptFailing::default();
    // A pause due before the next accepts (after failures), ended early by a stop.
    let mut pause = None;
    loop {
        match accept_ready(&listener, pause.take(), core.stop.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                pause = Some(std::time::Duration::from_millis(10));
                continue;
            }
            Err(()) => return,
        }
        // Connections spawned in this batch: their tasks count themselves when they first
        // run, after the batch, so the cap check adds them (a batch of 64 accepts could
        // otherwise pass the cap by 63).
        let mut spawned = 0;
        for _ in 0..64 {
            let (std_stream, peer) = match flynn_runtime::handoff::accept_nonblocking(fd) {
                Ok(x) => {
                    failing.ok();
                    x
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    pause = failing.failed(&core, &e, "accept failed; backing off");
                    if pause.is_some() {
                        break;
                    }
                    continue;
                }
            };
            let Ok(stream) = TcpStream::from_std(std_stream) else {
                continue;
            };
            spawned += usize::from(spawn_conn(&core, stream, peer, info, spawned));
        }
    }
}

/// An accept loop's wait: `pause` first, if its failures called for one, then until
/// `l` may have a connection waiting (`Ok`: the readiness wait's result). `Err` with what
/// `stop` gave as soon as it resolves, pause or no pause: a TCP route's removal or a
/// handover must not wait out a pause of up to a second with the listener still bound
/// (it was slept outside the wait for the stop).
pub async fn accept_ready<T>(
    l: &TcpListener,
    pause: Option<std::time::Duration>,
    stop: impl std::future::Future<Output = T>,
) -> Result<std::io::Result<()>, T> {
    let ready = async {
        if let Some(p) = pause {
            monoio::time::sleep(p).await;
        }
        l.readable(false).await
    };
    monoio::select! {
        r = ready => Ok(r),
        s = stop => Err(s),
    }
}

/// An accept loop's failures ([`flynn_runtime::handoff::AcceptBackoff`]): one
/// connection's failure (aborted before it was accepted) is skipped, as pausing would let
/// any client stall the core's accepts; any other (out of descriptors or memory, refused
/// by a security module, the listener itself) pauses the loop, 5 ms doubling to 1 s until
/// an accept succeeds, with one warning per run of them. All are counted.
#[derive(Default)]
pub struct AcceptFailing(flynn_runtime::handoff::AcceptBackoff);

impl AcceptFailing {
    #[inline]
    pub fn ok(&mut self) {
        self.0.ok();
    }

    /// Counts `e`; `Some(pause)` when the loop should pause that long before accepting
    /// again.
    pub fn failed(
        &mut self,
        core: &Core,
        e: &std::io::Error,
        what: &'static str,
    ) -> Option<std::time::Duration> {
        CoreMetrics::inc(&core.metrics().accept_errors_total);
        let warned = self.0.pausing();
        let pause = self.0.failed(e);
        match pause {
            None => tracing::debug!(error = %e, "accept: connection skipped"),
            Some(pause) if !warned => tracing::warn!(error = %e, ?pause, "{what}"),
            Some(_) => {}
        }
        pause
    }
}

/// Spawns the task serving `stream`, unless the core is at `--max-conns-per-core` counting
/// `ahead` connections spawned but not yet running (then it is closed unserved); whether
/// it was spawned.
fn spawn_conn(
    core: &Rc<Core>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    info: ListenerInfo,
    ahead: usize,
) -> bool {
    let m = core.metrics();
    if core.conns.get() + ahead >= core.settings().max_conns_per_core {
        CoreMetrics::inc(&m.connections_rejected_total);
        return false;
    }
    CoreMetrics::inc(&m.connections_total);
    if info.h2c && core.settings().proxy_protocol_for(peer.ip()) {
        monoio::spawn(crate::proxy::serve_h2c(core.clone(), stream, peer, info));
    } else if info.h2c {
        let _ = stream.set_nodelay(true);
        monoio::spawn(crate::h2::serve(core.clone(), stream, peer, info));
    } else if info.tls {
        monoio::spawn(crate::proxy::serve_tls(core.clone(), stream, peer, info));
    } else if core.settings().proxy_protocol_for(peer.ip()) {
        monoio::spawn(crate::proxy::serve(core.clone(), stream, peer, info));
    } else {
        // The common case spawns the connection loop itself: no wrapper state, so an
        // idle connection's task stays small.
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        monoio::spawn(crate::proxy::serve_conn(
            core.clone(),
            stream,
            fd,
            None,
            peer,
            info,
            crate::proxy::Start::New,
        ));
    }
    true
}

/// A one-way signal for this core's tasks: accept loops stop on it, and HTTP/2
/// connections send GOAWAY. Every waiter holds a slot that it frees when dropped, so
/// per-connection waits (one per HTTP/2 request accepted) never pile up wakers.
#[derive(Default)]
pub struct Stop {
    fired: Cell<bool>,
    slots: RefCell<Vec<Option<std::task::Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl Stop {
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<_> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Resolves once [`Stop::fire`] ran (at once if it already had).
    pub fn wait(&self) -> StopWait<'_> {
        StopWait {
            stop: self,
            slot: None,
        }
    }
}

/// The future of [`Stop::wait`].
pub struct StopWait<'a> {
    stop: &'a Stop,
    slot: Option<usize>,
}

impl std::future::Future for StopWait<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let stop = self.stop;
        if stop.fired.get() {
            return std::task::Poll::Ready(());
        }
        let mut slots = stop.slots.borrow_mut();
        match self.slot {
            Some(i) => match &mut slots[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            },
            None => {
                let i = match stop.free.borrow_mut().pop() {
                    Some(i) => {
                        slots[i] = Some(cx.waker().clone());
                        i
                    }
                    None => {
                        slots.push(Some(cx.waker().clone()));
                        slots.len() - 1
                    }
                };
                drop(slots);
                self.slot = Some(i);
            }
        }
        std::task::Poll::Pending
    }
}

impl Drop for StopWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            if let Some(w) = self.stop.slots.borrow_mut().get_mut(i) {
                *w = None;
            }
            self.stop.free.borrow_mut().push(i);
        }
    }
}

/// Stops accepting, lets busy connections finish (their responses say
/// `Connection: close`), and after `grace` closes connections still idle.
async fn drain(core: Rc<Core>, grace: std::time::Duration) {
    core.stop.fire();
    monoio::time::sleep(grace).await;
    core.idle.expire_all();
    if let Some(p) = &core.parked {
        let n = p.expire_all();
        core.parked_closed(n);
    }
}

#[cfg(test)]
mod tests {
    use super::InflightMap;

    /// A stop ends an accept loop's pause at once (a TCP route's removal or a handover
    /// used to wait up to the whole pause, 1 s at most, with the listener still bound);
    /// without a stop the pause is kept.
    #[test]
    fn a_stop_ends_an_accept_pause_at_once() {
        use std::time::{Duration, Instant};
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            // A connection is waiting: only the pause holds the accept back.
            let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let start = Instant::now();
            let stop = monoio::time::sleep(Duration::from_millis(50));
            let r = super::accept_ready(&l, Some(Duration::from_secs(20)), stop).await;
            assert!(r.is_err(), "not stopped");
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(10),
                "the pause was waited out: {took:?}"
            );
            let start = Instant::now();
            let never = std::future::pending::<()>();
            let r = super::accept_ready(&l, Some(Duration::from_millis(200)), never).await;
            assert!(matches!(r, Ok(Ok(()))));
            assert!(start.elapsed() >= Duration::from_millis(200), "no pause");
        });
    }

    #[test]
    fn inflight_counts_and_prunes_idle_addresses() {
        let m = InflightMap::default();
        let (a, b) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        m.start(a);
        m.start(a);
        m.start(b);
        m.end(&a);
        assert_eq!((m.get(&a), m.get(&b)), (1, 1));
        m.end(&b);
        m.end(&b); // an extra end never goes below zero
        assert_eq!(m.get(&b), 0);
        m.prune();
        assert_eq!(
            m.len(),
            1,
            "only the address with a request in flight is kept"
        );
        assert_eq!(m.get(&a), 1);
        m.end(&a);
        m.prune();
        assert_eq!(m.len(), 0);
    }
}
