//! flynn-host: the per-machine daemon that runs Flynn jobs (spec §5).
