//! Keeps the workspace's dependency arrows honest (docs/ARCHITECTURE.md), from
//! `cargo metadata`.

use std::process::Command;

use serde_json::Value;

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("metadata JSON")
}

struct Pkg {
    name: String,
    path: String,
    /// Normal (non-dev, non-build) dependencies.
    deps: Vec<String>,
    lib: bool,
}

fn packages() -> Vec<Pkg> {
    let m = metadata();
    m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pkg {
            name: p["name"].as_str().unwrap().to_string(),
            path: p["manifest_path"].as_str().unwrap().to_string(),
            deps: p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect(),
            lib: p["targets"].as_array().unwrap().iter().any(|t| {
                t["kind"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k == "lib" || k == "rlib")
            }),
        })
        .collect()
}

#[test]
fn api_depends_on_no_flynn_crate() {
    let pkgs = packages();
    let api = pkgs
        .iter()
        .find(|p| p.name == "flynn-api")
        .expect("flynn-api exists");
    let bad: Vec<_> = api
        .deps
        .iter()
        .filter(|d| d.starts_with("flynn-"))
        .collect();
    assert!(bad.is_empty(), "flynn-api depends on {bad:?}");
}

#[test]
fn hot_path_libraries_stay_small() {
    let forbidden = [
        "tokio",
        "sqlx",
        "hyper",
        "axum",
        "reqwest",
        "flynn-client",
        "monoio",
    ];
    for p in packages()
        .iter()
        .filter(|p| p.name == "flynn-http" || p.name == "flynn-routes")
    {
        for d in &p.deps {
            assert!(
                !forbidden.contains(&d.as_str()),
                "{} depends on {d}",
                p.name
            );
            if d.starts_with("flynn-") {
                assert_eq!(d, "flynn-api", "{} depends on {d}", p.name);
            }
        }
    }
}

#[test]
fn dataplane_uses_no_control_crates_but_api_and_client() {
    let pkgs = packages();
    let control: Vec<&str> = pkgs
        .iter()
        .filter(|p| p.path.contains("/control/"))
        .map(|p| p.name.as_str())
        .filter(|n| *n != "flynn-api" && *n != "flynn-client")
        .collect();
    for p in pkgs.iter().filter(|p| p.path.contains("/dataplane/")) {
        for d in &p.deps {
            assert!(
                !control.contains(&d.as_str()),
                "{} depends on control crate {d}",
                p.name
            );
            assert_ne!(d, "sqlx", "{} depends on sqlx", p.name);
        }
    }
}

#[test]
fn nothing_depends_on_a_binary_only_crate() {
    let pkgs = packages();
    for p in &pkgs {
        for d in &p.deps {
            if let Some(target) = pkgs.iter().find(|q| &q.name == d) {
                assert!(target.lib, "{} depends on binary-only crate {d}", p.name);
            }
        }
    }
}

#[test]
fn every_crate_is_named_flynn() {
    for p in packages() {
        assert!(
            p.name.starts_with("flynn"),
            "crate {} is not named flynn-*",
            p.name
        );
    }
}

#[test]
fn only_flynn_container_uses_libcontainer() {
    let pkgs = packages();
    for p in &pkgs {
        if p.name != "flynn-container" {
            for banned in ["libcontainer", "libcgroups"] {
                assert!(
                    !p.deps.iter().any(|d| d == banned),
                    "{} depends on {banned}: containers go through flynn-container",
                    p.name
                );
            }
        }
    }
    let c = pkgs
        .iter()
        .find(|p| p.name == "flynn-container")
        .expect("flynn-container exists");
    assert!(c.deps.iter().any(|d| d == "libcontainer"));
}

#[test]
fn netlab_is_test_and_benchmark_support_only() {
    // flynn-netlab shells out to `ip`; product crates configure the kernel through netlink and may
    // use it only as a dev-dependency. The benchmark harness is the one normal user.
    for p in packages() {
        if p.deps.iter().any(|d| d == "flynn-netlab") {
            assert_eq!(
                p.name, "flynn-perf",
                "{} depends on flynn-netlab outside its tests",
                p.name
            );
        }
    }
}
