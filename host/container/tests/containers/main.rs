//! Real containers (busybox image) through the shim: run as root.

mod clone;
mod isolation;
mod jobs;
mod limits;
mod reconnect;
mod spare;
mod support;
mod tty;
