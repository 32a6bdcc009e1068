//! Compiles `bpf/*.bpf.c` with clang into `$OUT_DIR` (embedded by `src/object.rs`) and measures
//! the C map layouts (`bpf/layout.c`, run on the build host) for the layout test.
//!
//! Needs clang (Debian package `clang`) and the libbpf headers (Debian package `libbpf-dev`); the
//! build stops with a message naming the package when either is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["fastpath"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    let bpf = Path::new("bpf");
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => fail(&format!(
            "`{clang}` not found: the eBPF fast path is compiled with clang; install the Debian package `clang` (apt-get install clang)"
        )),
    }
    let multiarch = multiarch();
    let arch_include = format!("/usr/include/{multiarch}");
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail("libbpf headers (bpf/bpf_helpers.h) not found: install the Debian package `libbpf-dev` (apt-get install libbpf-dev)");
    }
    if !Path::new(&arch_include).join("asm/types.h").exists() {
        fail(&format!(
            "{arch_include}/asm/types.h not found: install the Debian package `linux-libc-dev` (comes with build-essential)"
        ));
    }

    for name in PROGRAMS {
        let src = bpf.join(format!("{name}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        let o = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{arch_include}"))
            .arg("-I")
            .arg(bpf)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
        if !o.status.success() {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let hint = if stderr.contains("bpf/bpf_helpers.h") {
                " (install the Debian package `libbpf-dev`)"
            } else {
                ""
            };
            fail(&format!(
                "clang failed on {}{hint}:\n{stderr}",
                src.display()
            ));
        }
    }

    // Layout of the shared structs as the C compiler sees them (host ABI equals BPF ABI for these
    // fixed-width fields; the BPF side is also checked by the kernel's BTF at load).
    let exe = out.join("layout");
    let o = Command::new(&clang)
        .arg(format!("-I{arch_include}"))
        .arg("-I")
        .arg(bpf)
        .arg(bpf.join("layout.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
    if !o.status.success() {
        fail(&format!(
            "clang failed on bpf/layout.c:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let o = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| fail(&format!("running {}: {e}", exe.display())));
    if !o.status.success() {
        fail("bpf/layout.c program failed");
    }
    std::fs::write(out.join("layout.rs"), &o.stdout).expect("write layout.rs");
}

/// The Debian multiarch tuple (`x86_64-linux-gnu`) for `/usr/include/<tuple>/asm`.
fn multiarch() -> String {
    for (cmd, args) in [
        ("gcc", &["-print-multiarch"][..]),
        ("dpkg-architecture", &["-qDEB_HOST_MULTIARCH"][..]),
    ] {
        if let Ok(o) = Command::new(cmd).args(args).output() {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() && !s.is_empty() {
                return s;
            }
        }
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    format!("{arch}-linux-gnu")
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}
