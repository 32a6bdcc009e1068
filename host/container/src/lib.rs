//! Job containers for flynn-host.
