//! Starting the origin and each proxy on free loopback ports, with configs in a temp dir.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::handshake;
use crate::origin::SMALL_BODY;
use crate::procs::Proc;
use crate::tls;

/// The `Host` header every request carries (the Flynn route's domain).
pub const HOST: &str = "bench.local";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Direct,
    Flynn,
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        Ok(match s {
            "direct" => Kind::Direct,
            "flynn" => Kind::Flynn,
            "nginx" => Kind::Nginx,
            "haproxy" => Kind::Haproxy,
            _ => bail!("unknown target {s:?} (expected direct, flynn, nginx or haproxy)"),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Direct => "direct",
            Kind::Flynn => "flynn",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        })
    }
}

/// One row of the report: a target kind with a worker count (`None` for direct).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    pub workers: Option<usize>,
    pub kind: Kind,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.workers {
            Some(n) => write!(f, "{}×{n}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// A running target: where to send load and which process tree to measure.
pub struct Running {
    pub id: Id,
    pub port: u16,
    /// Root of the process tree to account CPU and memory to.
    pub pid: u32,
    /// `None` for direct (the origin belongs to the harness).
    pub proc: Option<Proc>,
    /// HTTPS (HTTP/1.1 over TLS) listener, when the session has TLS scenarios.
    pub tls_port: Option<u16>,
    /// HTTP/2 over TLS listener (ALPN h2), when the session has HTTP/2 scenarios and the
    /// target speaks HTTP/2.
    pub h2_port: Option<u16>,
    /// Plain TCP proxy listener to the origin (bytes relayed, no HTTP parsing), when the
    /// session has TCP scenarios; `Err(why)` when the target cannot proxy TCP. For direct it
    /// is the origin's own port.
    pub tcp: Option<Result<u16, String>>,
}

impl Running {
    /// Why the target can no longer be used, if its process has exited.
    pub fn dead(&mut self) -> Option<String> {
        let proc = self.proc.as_mut()?;
        let status = proc.exited()?;
        Some(format!(
            "{} exited ({status}): {}",
            proc.name(),
            proc.log_tail(5)
        ))
    }
}

/// Settings every target start needs.
pub struct Env<'a> {
    pub dir: &'a Path,
    pub origin_port: u16,
    pub nofile: u64,
    pub router_bin: &'a Path,
    /// Certificate for HTTPS listeners; `None`: plain HTTP only.
    pub tls: Option<&'a tls::Files>,
    /// Also open an HTTP/2 (ALPN h2) TLS listener where the target supports it.
    pub h2: bool,
    /// Also open a plain TCP proxy listener to the origin (TCP scenarios), with how nginx
    /// gets its stream module; `None`: no TCP listeners.
    pub tcp: Option<&'a NginxStream>,
}

/// How nginx gets the stream module (`stream {}`: its TCP proxy).
#[derive(Clone, Debug)]
pub enum NginxStream {
    /// Compiled in (`--with-stream`).
    Builtin,
    /// A dynamic module (`--with-stream=dynamic`, Debian's libnginx-mod-stream) that the
    /// config loads with `load_module`.
    Module(PathBuf),
    /// Not available, and why.
    Missing(String),
}

impl NginxStream {
    /// Reads `nginx -V`'s configure arguments and looks for the module file.
    pub fn detect() -> NginxStream {
        let out = match Command::new("nginx").arg("-V").output() {
            Ok(o) => o,
            Err(e) => return NginxStream::Missing(format!("cannot run `nginx -V`: {e}")),
        };
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        NginxStream::from_configure(&text, |p| p.is_file())
    }

    fn from_configure(text: &str, exists: impl Fn(&Path) -> bool) -> NginxStream {
        let args: Vec<&str> = text.split_whitespace().collect();
        if args.contains(&"--with-stream") {
            return NginxStream::Builtin;
        }
        if !args.contains(&"--with-stream=dynamic") {
            return NginxStream::Missing("nginx is built without the stream module".into());
        }
        let value = |key: &str| args.iter().find_map(|a| a.strip_prefix(key));
        let dir = match (value("--modules-path="), value("--prefix=")) {
            (Some(m), _) => PathBuf::from(m),
            (None, Some(p)) => Path::new(p).join("modules"),
            (None, None) => PathBuf::from("/usr/local/nginx/modules"),
        };
        let module = dir.join("ngx_stream_module.so");
        if exists(&module) {
            NginxStream::Module(module)
        } else {
            NginxStream::Missing(format!(
                "nginx builds the stream module dynamically and {} is not installed \
                 (apt-get install -y libnginx-mod-stream)",
                module.display()
            ))
        }
    }

    /// For the report header.
    pub fn describe(&self) -> String {
        match self {
            NginxStream::Builtin => "stream module built in".into(),
            NginxStream::Module(p) => format!("stream module loaded from {}", p.display()),
            NginxStream::Missing(why) => format!("no stream module: {why}"),
        }
    }
}

/// The listeners a target was started with.
struct Ports {
    http: u16,
    tls: Option<u16>,
    h2: Option<u16>,
    /// Plain TCP proxy to the origin.
    tcp: Option<u16>,
}

impl Ports {
    fn new(env: &Env, h2_capable: bool) -> Result<Ports> {
        Ok(Ports {
            http: free_port()?,
            tls: env.tls.map(|_| free_port()).transpose()?,
            h2: if env.tls.is_some() && env.h2 && h2_capable {
                Some(free_port()?)
            } else {
                None
            },
            tcp: env.tcp.map(|_| free_port()).transpose()?,
        })
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts the origin (this binary's `origin` subcommand) with `threads` threads.
pub fn start_origin(dir: &Path, threads: usize) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let exe = std::env::current_exe().context("locating flynn-perf")?;
    let mut cmd = Command::new(exe);
    cmd.arg("origin")
        .arg("--addr")
        .arg(addr(port).to_string())
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--parent-pid")
        .arg(std::process::id().to_string());
    let mut proc = Proc::spawn("origin", cmd, &dir.join("origin.log"))?;
    wait_ready(&mut proc, port, None)?;
    check_response(port).context("origin sanity request")?;
    Ok((proc, port))
}

/// Starts target `id` and waits until it answers a request correctly.
pub fn start(id: Id, env: &Env) -> Result<Running> {
    let workers = id.workers.unwrap_or(1);
    let (proc, ports, marker) = match id.kind {
        Kind::Direct => {
            return Ok(Running {
                id,
                port: env.origin_port,
                pid: 0,
                proc: None,
                tls_port: None,
                h2_port: None,
                tcp: env.tcp.map(|_| Ok(env.origin_port)),
            });
        }
        Kind::Flynn => {
            let (p, ports) = start_flynn(env, workers)?;
            (p, ports, Some("listening"))
        }
        Kind::Nginx => {
            let (p, ports) = start_nginx(env, workers)?;
            (p, ports, None)
        }
        Kind::Haproxy => {
            let (p, ports) = start_haproxy(env, workers)?;
            (p, ports, None)
        }
    };
    let mut proc = proc;
    wait_ready(&mut proc, ports.http, marker)?;
    check_response(ports.http).with_context(|| format!("{id} sanity request"))?;
    if let Some(tls_port) = ports.tls {
        wait_ready(&mut proc, tls_port, None)?;
        check_tls_response(tls_port).with_context(|| format!("{id} HTTPS sanity request"))?;
    }
    if let Some(h2_port) = ports.h2 {
        wait_ready(&mut proc, h2_port, None)?;
    }
    // A TCP listener that does not work costs this target its TCP rows only, not the
    // HTTP scenarios (and their ratios) too.
    let tcp_broken = ports.tcp.and_then(|tcp_port| {
        wait_ready(&mut proc, tcp_port, None)
            // The same HTTP request, relayed as bytes: the origin answers it.
            .and_then(|()| check_response(tcp_port))
            .with_context(|| format!("{id} TCP proxy sanity request"))
            .err()
            .map(|e| format!("not working: {e:#}"))
    });
    // ...unless the process itself is gone: then the target is.
    if let Some(status) = proc.exited() {
        bail!(
            "{id} exited during startup ({status}): {}",
            tcp_broken.unwrap_or_default()
        );
    }
    let tcp = env.tcp.map(|stream| match (ports.tcp, &tcp_broken) {
        (Some(_), Some(broken)) => Err(broken.clone()),
        (Some(p), None) => Ok(p),
        (None, _) => match stream {
            NginxStream::Missing(why) if id.kind == Kind::Nginx => {
                Err(format!("not supported: {why}"))
            }
            _ => Err("no TCP proxy listener".to_string()),
        },
    });
    let mut h2_port = ports.h2;
    if let (Kind::Flynn, true, Some(tls_port)) = (id.kind, env.h2, ports.tls) {
        // The router serves HTTP/2 on its HTTPS listener once it selects ALPN h2 there.
        if tls::negotiates_alpn(tls_port, "h2") {
            h2_port = Some(tls_port);
        }
    }
    Ok(Running {
        id,
        port: ports.http,
        pid: proc.pid(),
        proc: Some(proc),
        tls_port: ports.tls,
        h2_port,
        tcp,
    })
}

/// One HTTPS `GET /` with a full handshake (SNI `bench.local`); checks `200` and the body.
pub fn check_tls_response(port: u16) -> Result<()> {
    let cfg = handshake::client_config()?;
    match handshake::exchange(&cfg, port, HOST, HOST, "/")? {
        handshake::Exchange::Ok { body, .. } if body == SMALL_BODY => Ok(()),
        handshake::Exchange::Ok { body, .. } => bail!(
            "unexpected body {:?}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        ),
        handshake::Exchange::Status(s) => bail!("status {s}"),
    }
}

fn start_flynn(env: &Env, workers: usize) -> Result<(Proc, Ports)> {
    if !env.router_bin.exists() {
        bail!(
            "router binary {} not found (build it with `cargo build --release -p flynn-router`)",
            env.router_bin.display()
        );
    }
    // No separate h2 listener: `start` checks whether the HTTPS one selects ALPN h2.
    let ports = Ports::new(env, false)?;
    let port = ports.http;
    let api_port = free_port()?;
    let routes = env.dir.join(format!("flynn-routes-{workers}.json"));
    // A TLS client that connects to an IP address sends no usable SNI (wrk sends the IP,
    // which rustls ignores): only a catch-all route serves such handshakes.
    let catch_all = if env.tls.is_some() {
        r#",{"type":"http","domain":"*","service":"origin"}"#
    } else {
        ""
    };
    // A TCP route on a fixed port (outside `--tcp-ports`, which only `port: 0` routes draw
    // from) to the same service: the router relays its bytes to the origin.
    let tcp_route = ports
        .tcp
        .map(|p| format!(r#",{{"type":"tcp","port":{p},"service":"origin"}}"#))
        .unwrap_or_default();
    let json = format!(
        r#"{{"routes":[{{"type":"http","domain":"{HOST}","service":"origin"}}{catch_all}{tcp_route}],"services":{{"origin":[{{"addr":"127.0.0.1:{}"}}]}}}}"#,
        env.origin_port
    );
    std::fs::write(&routes, json).context("writing routes file")?;
    let mut cmd = Command::new(env.router_bin);
    cmd.arg("--http-addr")
        .arg(addr(port).to_string())
        .arg("--api-addr")
        .arg(addr(api_port).to_string())
        .arg("--threads")
        .arg(workers.to_string())
        .arg("--routes")
        .arg(&routes);
    if ports.tcp.is_some() {
        // TCP routes listen on 0.0.0.0 by default; everything here is on loopback.
        cmd.arg("--tcp-ip").arg("127.0.0.1");
    }
    if let (Some(files), Some(tls_port)) = (env.tls, ports.tls) {
        cmd.arg("--https-addr")
            .arg(addr(tls_port).to_string())
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key);
    }
    let proc = Proc::spawn(
        "flynn-router",
        cmd,
        &env.dir.join(format!("flynn-{workers}.log")),
    )?;
    Ok((proc, ports))
}

fn start_nginx(env: &Env, workers: usize) -> Result<(Proc, Ports)> {
    let mut ports = Ports::new(env, true)?;
    let port = ports.http;
    // The TCP proxy: a stream server relaying to the origin, in the same worker processes.
    // Stream defaults otherwise: `tcp_nodelay on`, 16 KiB `proxy_buffer_size`, no access log.
    let mut load_module = String::new();
    let mut stream_conf = String::new();
    match env.tcp {
        Some(NginxStream::Builtin | NginxStream::Module(_)) => {
            if let Some(NginxStream::Module(path)) = env.tcp {
                load_module = format!("load_module {};\n", path.display());
            }
            stream_conf = format!(
                "stream {{
    server {{
        listen 127.0.0.1:{tcp} reuseport backlog=4096;
        proxy_pass 127.0.0.1:{origin};
    }}
}}
",
                tcp = ports.tcp.context("no TCP port")?,
                origin = env.origin_port,
            );
        }
        Some(NginxStream::Missing(_)) => ports.tcp = None,
        None => {}
    }
    // nginx's defaults otherwise: no session cache (`ssl_session_cache none`), session tickets
    // on, 16 KiB TLS records. The h2 listener is separate so the HTTP/1.1 one matches the
    // router's (no ALPN callback).
    let mut tls_conf = String::new();
    if let (Some(files), Some(tls_port)) = (env.tls, ports.tls) {
        tls_conf = format!(
            "        listen 127.0.0.1:{tls_port} ssl reuseport backlog=4096;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
",
            files.cert.display(),
            files.key.display()
        );
        if let Some(h2_port) = ports.h2 {
            tls_conf.push_str(&format!(
                "        listen 127.0.0.1:{h2_port} ssl http2 reuseport backlog=4096;\n"
            ));
        }
    }
    let prefix = env.dir.join(format!("nginx-{workers}"));
    std::fs::create_dir_all(prefix.join("logs"))?;
    let p = prefix.display();
    let connections = env.nofile.saturating_sub(100).min(20_000);
    let conf = format!(
        "{load_module}worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
{tls_conf}        server_name {HOST};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
{stream_conf}",
        nofile = env.nofile,
        origin = env.origin_port,
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("logs/error.log"))
        .arg("-g")
        .arg("daemon off; master_process on;");
    let proc = Proc::spawn("nginx", cmd, &env.dir.join(format!("nginx-{workers}.log")))?;
    Ok((proc, ports))
}

fn start_haproxy(env: &Env, workers: usize) -> Result<(Proc, Ports)> {
    let ports = Ports::new(env, true)?;
    let port = ports.http;
    // HAProxy's defaults otherwise: session cache (tune.ssl.cachesize 20000) and tickets on.
    let mut tls_binds = String::new();
    if let (Some(files), Some(tls_port)) = (env.tls, ports.tls) {
        let pem = files.combined.display();
        tls_binds = format!("    bind 127.0.0.1:{tls_port} ssl crt {pem} ssl-min-ver TLSv1.2\n");
        if let Some(h2_port) = ports.h2 {
            tls_binds.push_str(&format!(
                "    bind 127.0.0.1:{h2_port} ssl crt {pem} ssl-min-ver TLSv1.2 alpn h2,http/1.1\n"
            ));
        }
    }
    // HAProxy sizes for two descriptors per connection and refuses to start when the hard
    // RLIMIT_NOFILE is below that; idle client connections hold one, so keep maxconn above 10k
    // and let `no strict-limits` turn the refusal into a warning.
    let maxconn = env.nofile.saturating_sub(500).clamp(1000, 30_000);
    // The TCP proxy, in the same process and threads, after a `mode tcp` defaults section
    // (the HTTP options above would only draw warnings there).
    let tcp_conf = match ports.tcp {
        Some(tcp) => format!(
            "defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend fe_tcp
    bind 127.0.0.1:{tcp}
    maxconn {maxconn}
    default_backend be_tcp
backend be_tcp
    server origin 127.0.0.1:{origin}
",
            origin = env.origin_port,
        ),
        None => String::new(),
    };
    let conf = format!(
        "global
    nbthread {workers}
    maxconn {maxconn}
    no strict-limits
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 30s
frontend fe
    bind 127.0.0.1:{port}
{tls_binds}    maxconn {maxconn}
    default_backend be
backend be
    server origin 127.0.0.1:{origin}
{tcp_conf}",
        origin = env.origin_port,
    );
    let cfg = env.dir.join(format!("haproxy-{workers}.cfg"));
    std::fs::write(&cfg, conf).context("writing haproxy.cfg")?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let proc = Proc::spawn(
        "haproxy",
        cmd,
        &env.dir.join(format!("haproxy-{workers}.log")),
    )?;
    Ok((proc, ports))
}

/// Waits (at most 10 s) until `port` accepts and, if `marker` is given, the log contains it
/// (or the port has accepted for 2 s without it).
pub(crate) fn wait_ready(proc: &mut Proc, port: u16, marker: Option<&str>) -> Result<()> {
    let start = Instant::now();
    let mut accepted_since: Option<Instant> = None;
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited during startup ({status}):\n{}",
                proc.name(),
                proc.log_tail(10)
            );
        }
        if accepted_since.is_none()
            && TcpStream::connect_timeout(&addr(port), Duration::from_millis(200)).is_ok()
        {
            accepted_since = Some(Instant::now());
        }
        if let Some(t) = accepted_since {
            let marked = match marker {
                None => true,
                Some(m) => std::fs::read_to_string(proc.log_path())
                    .map(|log| log.contains(m))
                    .unwrap_or(false),
            };
            if marked || t.elapsed() > Duration::from_secs(2) {
                return Ok(());
            }
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!(
                "{} not ready on port {port} within {READY_TIMEOUT:?}:\n{}",
                proc.name(),
                proc.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one `GET /` and checks for `200` with the origin's body.
pub fn check_response(port: u16) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).context("reading response")?;
    let text = String::from_utf8_lossy(&out);
    if !text.starts_with("HTTP/1.1 200") || !out.ends_with(SMALL_BODY) {
        bail!(
            "unexpected response: {:?}",
            text.chars().take(300).collect::<String>()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_stream_module_detection() {
        let debian = "nginx version: nginx/1.22.1\nconfigure arguments: --prefix=/usr/share/nginx \
                      --modules-path=/usr/lib/nginx/modules --with-stream=dynamic --with-threads";
        match NginxStream::from_configure(debian, |p| {
            p == Path::new("/usr/lib/nginx/modules/ngx_stream_module.so")
        }) {
            NginxStream::Module(p) => {
                assert_eq!(p, Path::new("/usr/lib/nginx/modules/ngx_stream_module.so"))
            }
            other => panic!("{other:?}"),
        }
        match NginxStream::from_configure(debian, |_| false) {
            NginxStream::Missing(why) => assert!(why.contains("libnginx-mod-stream"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            NginxStream::from_configure(
                "configure arguments: --with-stream --with-http_ssl_module",
                |_| false
            ),
            NginxStream::Builtin
        ));
        assert!(matches!(
            NginxStream::from_configure("configure arguments: --with-stream_ssl_module", |_| true),
            NginxStream::Missing(_)
        ));
        match NginxStream::from_configure("--prefix=/opt/ngx --with-stream=dynamic", |_| true) {
            NginxStream::Module(p) => {
                assert_eq!(p, Path::new("/opt/ngx/modules/ngx_stream_module.so"))
            }
            other => panic!("{other:?}"),
        }
    }
}
