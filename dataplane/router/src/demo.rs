//! The quick-start demo: two small backends on loopback and a sample route set, so a
//! fresh checkout shows the router working with one command.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use flynn_api::BackendAddr;

use crate::RoutesFile;

const SAMPLE: &str = include_str!("../examples/routes.json");

/// Starts the demo backends and returns the routes to load.
pub fn setup() -> anyhow::Result<RoutesFile> {
    let mut file = RoutesFile::parse(SAMPLE, false)?;
    let web: Vec<SocketAddr> = (1..=2)
        .map(|i| backend(&format!("demo-{i}")))
        .collect::<Result<_, _>>()?;
    let api = backend("demo-api")?;
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| BackendAddr {
                addr: a.to_string(),
                leader: false,
                app: "demo".into(),
                job_id: String::new(),
            })
            .collect::<Vec<_>>()
    };
    file.services.insert("demo".into(), list(&web));
    file.services.insert("demo-api".into(), list(&[api]));
    Ok(file)
}

fn backend(name: &str) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || serve(s, &name));
            }
        })?;
    Ok(addr)
}

/// A deliberately simple keep-alive responder that echoes what it received.
fn serve(s: TcpStream, name: &str) {
    let Ok(w) = s.try_clone() else { return };
    let mut w = w;
    let mut r = BufReader::new(s);
    loop {
        let mut head = Vec::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let text = format!(
            "Hello from {name}!\n\nThe router forwarded:\n{}\n",
            head.join("\n")
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
