//! Starting flynn-logagg and rsyslog on loopback, checking that each stores a line, and
//! reading how many messages each has processed.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::Proc;
use crate::targets::{free_port, wait_ready};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Flynn,
    Rsyslog,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        Ok(match s {
            "flynn" => Kind::Flynn,
            "rsyslog" => Kind::Rsyslog,
            _ => bail!("unknown target {s:?} (expected flynn or rsyslog)"),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Flynn => "flynn-logagg",
            Kind::Rsyslog => "rsyslog",
        })
    }
}

/// One report row: flynn-logagg with a thread count, or rsyslog (`threads: None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    pub kind: Kind,
    pub threads: Option<usize>,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.threads {
            Some(n) => write!(f, "{}×{n}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// A running aggregator.
pub struct Target {
    pub id: Id,
    pub proc: Proc,
    pub syslog: SocketAddr,
    /// flynn-logagg's HTTP API.
    pub api: Option<SocketAddr>,
    /// rsyslog's output file.
    pub out_file: Option<PathBuf>,
    /// Bytes rsyslog writes per message (payload + '\n').
    pub line_bytes: u64,
    /// What the target said about itself at startup (io driver), for the report.
    pub note: String,
    /// flynn-logagg's `/metrics` over one keep-alive connection (the completion polling).
    pub poller: Option<MetricsPoller>,
}

impl Target {
    pub fn dead(&mut self) -> Option<String> {
        let status = self.proc.exited()?;
        Some(format!(
            "{} exited ({status}): {}",
            self.proc.name(),
            self.proc.log_tail(5)
        ))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Messages processed so far: flynn-logagg's `flynn_logagg_messages_total` summed over
    /// sources (over one keep-alive connection: the harness polls this every few ms); for
    /// rsyslog, bytes in its output file ÷ bytes per line.
    pub fn processed(&mut self) -> Result<u64> {
        match (self.api, &self.out_file) {
            (Some(api), _) => Ok(self
                .poller
                .get_or_insert_with(|| MetricsPoller::new(api))
                .get()?
                .messages),
            (None, Some(file)) => {
                let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                Ok(len / self.line_bytes.max(1))
            }
            _ => bail!("no way to count processed messages"),
        }
    }

    /// Empties rsyslog's output file between runs (omfile appends, so it keeps writing at
    /// the new end).
    pub fn reset_output(&self) {
        if let Some(file) = &self.out_file {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(file) {
                let _ = f.set_len(0);
            }
        }
    }
}

/// The figures the harness reads from flynn-logagg's `/metrics`.
#[derive(Default, Debug)]
pub struct Metrics {
    /// `flynn_logagg_messages_total`, all sources.
    pub messages: u64,
    /// `flynn_logagg_duplicates_total`, all sources.
    pub duplicates: u64,
    /// `flynn_logagg_memory_bytes`.
    pub memory: u64,
}

pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .with_context(|| format!("reading GET {path}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path}: {:?}",
            text.chars().take(200).collect::<String>()
        );
    }
    Ok(text)
}

pub fn metrics(api: SocketAddr) -> Result<Metrics> {
    parse_metrics(&http_get(api, "/metrics")?)
}

/// The figures of a `/metrics` response (head and body, or the body alone). Every line the
/// harness reads must parse, and `flynn_logagg_memory_bytes` and at least one
/// `flynn_logagg_messages_total` must be there: a truncated or changed exposition is an error,
/// never a count of 0.
pub fn parse_metrics(text: &str) -> Result<Metrics> {
    let mut m = Metrics::default();
    let (mut have_messages, mut have_memory) = (false, false);
    for line in text.lines().map(str::trim_end) {
        let value = || -> Result<u64> {
            let v = line.rsplit(' ').next().unwrap_or_default();
            let x: f64 = v
                .parse()
                .with_context(|| format!("unparsable metrics line {line:?}"))?;
            anyhow::ensure!(
                x.is_finite() && x >= 0.0,
                "unexpected value in metrics line {line:?}"
            );
            Ok(x as u64)
        };
        if line.starts_with("flynn_logagg_messages_total{") {
            m.messages += value()?;
            have_messages = true;
        } else if line.starts_with("flynn_logagg_duplicates_total{") {
            m.duplicates += value()?;
        } else if line.starts_with("flynn_logagg_memory_bytes ") {
            m.memory = value()?;
            have_memory = true;
        }
    }
    anyhow::ensure!(have_messages, "no flynn_logagg_messages_total in /metrics");
    anyhow::ensure!(have_memory, "no flynn_logagg_memory_bytes in /metrics");
    Ok(m)
}

/// `GET /metrics` over one keep-alive HTTP/1.1 connection, reconnecting when the server
/// closes it: the completion polling costs the target a request, not a TCP accept and
/// teardown as well, every few milliseconds.
pub struct MetricsPoller {
    api: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl MetricsPoller {
    pub fn new(api: SocketAddr) -> MetricsPoller {
        MetricsPoller { api, conn: None }
    }

    pub fn get(&mut self) -> Result<Metrics> {
        if let Some(conn) = self.conn.as_mut() {
            // A kept connection the server has closed meanwhile fails here: one fresh try.
            if let Ok((body, keep)) = get_on(conn, "/metrics") {
                if !keep {
                    self.conn = None;
                }
                return parse_metrics(&body);
            }
            self.conn = None;
        }
        let s = TcpStream::connect_timeout(&self.api, Duration::from_secs(2))
            .with_context(|| format!("connecting to {}", self.api))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        let mut conn = BufReader::new(s);
        let (body, keep) = get_on(&mut conn, "/metrics")?;
        if keep {
            self.conn = Some(conn);
        }
        parse_metrics(&body)
    }
}

/// One keep-alive `GET path` on `conn`: the body, and whether the connection stays open.
fn get_on(conn: &mut BufReader<TcpStream>, path: &str) -> Result<(String, bool)> {
    write!(
        conn.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )?;
    let mut line = String::new();
    anyhow::ensure!(conn.read_line(&mut line)? > 0, "connection closed");
    if !line.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {:?}", line.trim_end());
    }
    let (mut len, mut chunked, mut keep) = (None, false, true);
    loop {
        line.clear();
        anyhow::ensure!(
            conn.read_line(&mut line)? > 0,
            "connection closed in the head"
        );
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => len = Some(value.parse::<usize>().context("content-length")?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => keep = !value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = len {
        body.resize(n, 0);
        conn.read_exact(&mut body)?;
    } else {
        conn.read_to_end(&mut body)?;
        keep = false;
    }
    Ok((String::from_utf8_lossy(&body).into_owned(), keep))
}

/// A one-off octet-counted message to app `app`.
fn one_message(addr: SocketAddr, app: &str, text: &str) -> Result<String> {
    let msg = format!(
        "<190>1 2026-11-26T09:00:00.000000Z sanity {app} web.job-1 ID1 [flynn seq=\"1\"] {text}"
    );
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    write!(s, "{} {msg}", msg.len())?;
    s.flush()?;
    Ok(msg)
}

/// Starts `flynn-logagg --threads N` on port 0 and waits for `listening syslog=… api=…`.
pub fn start_flynn(bin: &Path, dir: &Path, threads: usize) -> Result<Target> {
    if !bin.exists() {
        bail!(
            "{} not found (build it with `cargo build --release -p flynn-logagg`)",
            bin.display()
        );
    }
    let mut cmd = Command::new(bin);
    cmd.args(["--syslog-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--no-udp");
    let log = dir.join(format!("flynn-logagg-{threads}.log"));
    let mut proc = Proc::spawn("flynn-logagg", cmd, &log)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (syslog, api) = loop {
        if let Some(status) = proc.exited() {
            bail!(
                "flynn-logagg exited during startup ({status}):\n{}",
                proc.log_tail(10)
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with("listening syslog=")) {
            let mut syslog = None;
            let mut api = None;
            for word in line.split_whitespace() {
                if let Some(a) = word.strip_prefix("syslog=") {
                    syslog = a.parse::<SocketAddr>().ok();
                } else if let Some(a) = word.strip_prefix("api=") {
                    api = a.parse::<SocketAddr>().ok();
                }
            }
            match (syslog, api) {
                (Some(s), Some(a)) => break (s, a),
                _ => bail!("cannot parse {line:?}"),
            }
        }
        if Instant::now() > deadline {
            bail!(
                "flynn-logagg did not print `listening` within 10 s:\n{}",
                proc.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !syslog.ip().is_loopback() || !api.ip().is_loopback() {
        bail!("flynn-logagg bound {syslog}/{api}, not loopback");
    }
    wait_ready(&mut proc, syslog.port(), Some("listening"))?;
    // Sanity: one line in, the same line out of the history API.
    one_message(syslog, "perf-sanity", "sanity check")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = http_get(api, "/log/perf-sanity?lines=1").unwrap_or_default();
        if body.contains("\"msg\":\"sanity check\"") {
            break;
        }
        if Instant::now() > deadline {
            bail!("flynn-logagg sanity line not readable back: {body:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let note = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let l = strip_ansi(l);
            l.find("drivers=").map(|i| l[i..].trim().to_string())
        })
        .unwrap_or_default();
    Ok(Target {
        id: Id {
            kind: Kind::Flynn,
            threads: Some(threads),
        },
        proc,
        syslog,
        api: Some(api),
        out_file: None,
        line_bytes: 0,
        note,
        poller: Some(MetricsPoller::new(api)),
    })
}

/// `s` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

/// rsyslog's config: imtcp on 127.0.0.1 only, no imuxsock/imklog, everything it writes in
/// `dir`, every TCP message written raw to `dir/out.log` by one omfile action.
pub fn rsyslog_conf(d: &str, port: &str) -> String {
    format!(
        r#"# flynn-perf logagg: rsyslog with imtcp on loopback, writing raw lines to a file.
global(workDirectory="{d}" maxMessageSize="8k")
module(load="imtcp")
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="bench") {{
    action(type="omfile" file="{d}/out.log" template="raw"
           ioBufferSize="256k" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="bench")
"#
    )
}

/// Starts `rsyslogd -n -f CONF -i PIDFILE` with the config above in `dir/rsyslog/`.
pub fn start_rsyslog(dir: &Path, payload: usize) -> Result<Target> {
    let dir = dir.join("rsyslog");
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        rsyslog_conf(&dir.display().to_string(), &port.to_string()),
    )
    .context("writing rsyslog.conf")?;
    let mut cmd = Command::new("rsyslogd");
    cmd.arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"));
    let mut proc = Proc::spawn("rsyslogd", cmd, &dir.join("rsyslogd.log"))?;
    wait_ready(&mut proc, port, None)?;
    let syslog = SocketAddr::from(([127, 0, 0, 1], port));
    let out_file = dir.join("out.log");
    let sent = one_message(syslog, "perf-sanity", "sanity check")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&out_file).unwrap_or_default();
        if text.contains(&sent) {
            if text != format!("{sent}\n") {
                bail!("rsyslog wrote {text:?}, expected {sent:?} and a newline");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "rsyslog did not write the sanity line within 5 s (file: {text:?}):\n{}",
                proc.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = Target {
        id: Id {
            kind: Kind::Rsyslog,
            threads: None,
        },
        proc,
        syslog,
        api: None,
        out_file: Some(out_file),
        line_bytes: payload as u64 + 1,
        note: String::new(),
        poller: None,
    };
    target.reset_output();
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const METRICS: &str = "# HELP flynn_logagg_messages_total syslog messages received
# TYPE flynn_logagg_messages_total counter
flynn_logagg_messages_total{source=\"tcp-0\"} 1200
flynn_logagg_messages_total{source=\"tcp-1\"} 34
# TYPE flynn_logagg_duplicates_total counter
flynn_logagg_duplicates_total{source=\"tcp-0\"} 2
# TYPE flynn_logagg_memory_bytes gauge
flynn_logagg_memory_bytes 4096
# TYPE flynn_logagg_memory_limit_bytes gauge
flynn_logagg_memory_limit_bytes 1073741824
";

    #[test]
    fn parses_metrics() {
        let m = parse_metrics(METRICS).unwrap();
        assert_eq!((m.messages, m.duplicates, m.memory), (1234, 2, 4096));
    }

    #[test]
    fn unparsable_or_truncated_metrics_are_errors() {
        // A value cut off mid-line, a value that is not a number.
        let cut = &METRICS[..METRICS.find("1200").unwrap() + 2];
        assert!(parse_metrics(cut).is_err(), "{:?}", parse_metrics(cut));
        let bad = METRICS.replace("} 34", "} x34");
        assert!(parse_metrics(&bad).is_err());
        let cut = &METRICS[..METRICS.find("flynn_logagg_memory_bytes 4096").unwrap()];
        assert!(parse_metrics(cut).is_err());
        assert!(parse_metrics("").is_err());
        assert!(parse_metrics("HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    /// Serves `GET /metrics` on one connection as long as the client keeps it; counts accepts.
    fn serve(listener: TcpListener, responses: usize) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut accepted = 0;
            let mut served = 0;
            while served < responses {
                let (s, _) = listener.accept().unwrap();
                accepted += 1;
                let mut r = BufReader::new(s);
                let mut line = String::new();
                while served < responses {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if line != "\r\n" {
                        continue;
                    }
                    served += 1;
                    let body = METRICS.replace("1200", &format!("{}", 1200 + served));
                    let head = if served % 2 == 0 {
                        // Chunked, in two chunks.
                        let (a, b) = body.split_at(40);
                        format!(
                            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                            a.len(),
                            b.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    r.get_mut().write_all(head.as_bytes()).unwrap();
                }
            }
            accepted
        })
    }

    #[test]
    fn poller_keeps_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve(listener, 4);
        let mut p = MetricsPoller::new(addr);
        for i in 1..=4 {
            assert_eq!(p.get().unwrap().messages, 1234 + i);
        }
        assert_eq!(server.join().unwrap(), 1, "one connection for every poll");
    }
}
