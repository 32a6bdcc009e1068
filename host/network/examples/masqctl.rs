//! Installs, removes or checks the overlay's outbound NAT table (`flynn_network::masq`) in the
//! current network namespace, as the agent does at start: for benchmarks (the `overlay` harness
//! of `flynn-perf` runs it in its host namespaces) and for operators checking a host.
//!
//! `masqctl install 100.100.0.0/16 [vxlan-port, default 8472]` | `masqctl remove` | `masqctl present`

use flynn_network::{masq, Subnet};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["install", net] | ["install", net, _] => match net.parse::<Subnet>() {
            Ok(n) => {
                let port = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(8472);
                masq::install(&n, port).map(|()| "installed".to_string())
            }
            Err(e) => {
                eprintln!("masqctl: bad network {net:?}: {e}");
                std::process::exit(2);
            }
        },
        ["remove"] => masq::remove().map(|()| "removed".to_string()),
        ["present"] => masq::present().map(|p| if p { "present" } else { "absent" }.to_string()),
        _ => {
            eprintln!("usage: masqctl install <network/len> [vxlan-port] | remove | present");
            std::process::exit(2);
        }
    };
    match result {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("masqctl: {e}");
            std::process::exit(1);
        }
    }
}
