//! The per-job shim as a stand-alone program (`flynn-container-shim --flynn-shim <state> <id>`).
//! flynn-host runs the same code from its own executable.

fn main() {
    flynn_container::shim_main()
}
