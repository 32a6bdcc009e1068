//! TCP routes (spec §1.8): a listener per route port on every core, backends dialled
//! in shuffled order, bytes piped both ways with half-close.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use monoio::io::Splitable;
use monoio::net::{TcpListener, TcpStream};

use crate::balance::shuffled;
use crate::io::pipe;
use crate::metrics::CoreMetrics;
use crate::proxy::dial;
use crate::worker::Core;

struct Running {
    fd: i32,
    stop: Rc<Cell<bool>>,
}

/// The TCP route listeners of one core.
#[derive(Default)]
pub struct Listeners {
    open: HashMap<u16, Running>,
}

impl Listeners {
    /// Opens listeners for new route ports and closes those whose route is gone.
    pub fn reconcile(&mut self, core: &Rc<Core>) {
        let table = core.table();
        let gone: Vec<u16> = self
            .open
            .keys()
            .copied()
            .filter(|p| table.tcp_route(*p).is_none())
            .collect();
        for port in gone {
            if let Some(r) = self.open.remove(&port) {
                r.stop.set(true);
                flynn_runtime::sock::shutdown(r.fd);
            }
        }
        for port in table.tcp_ports() {
            if self.open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(core.settings().tcp_ip, port);
            let l = match flynn_runtime::reuseport_listener(addr).and_then(TcpListener::from_std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot listen for TCP route");
                    continue;
                }
            };
            let stop = Rc::new(Cell::new(false));
            self.open.insert(
                port,
                Running {
                    fd: l.as_raw_fd(),
                    stop: stop.clone(),
                },
            );
            monoio::spawn(accept(core.clone(), l, port, stop));
        }
    }
}

async fn accept(core: Rc<Core>, l: TcpListener, port: u16, stop: Rc<Cell<bool>>) {
    loop {
        let res = l.accept().await;
        if stop.get() {
            return;
        }
        match res {
            Ok((s, _)) => {
                CoreMetrics::inc(&core.metrics().tcp_connections_total);
                monoio::spawn(proxy(core.clone(), s, port));
            }
            Err(e) => {
                tracing::warn!(port, error = %e, "TCP route accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn proxy(core: Rc<Core>, c: TcpStream, port: u16) {
    let table = core.table();
    let Some(route) = table.tcp_route(port) else {
        return;
    };
    let mut order = [SocketAddr::from(([0, 0, 0, 0], 0)); 16];
    let n = shuffled(&route.backends, &mut order);
    let mut up = None;
    for addr in &order[..n] {
        if let Ok(s) = dial(*addr).await {
            up = Some((s, *addr));
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
    let (cr, cw) = c.into_split();
    let (ur, uw) = up.into_split();
    let a = pipe(cr, uw, Vec::with_capacity(16 * 1024));
    let b = pipe(ur, cw, Vec::with_capacity(16 * 1024));
    let _ = monoio::join!(a, b);
}
