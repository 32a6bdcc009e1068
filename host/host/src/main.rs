use clap::Parser;

fn main() -> std::process::ExitCode {
    // `flynn-host shim ...`: a job's shim (flynn-container), single-threaded, before
    // anything else starts a thread.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(flynn_host::container::SHIM_COMMAND))
    {
        flynn_container::shim_main();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYNN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = flynn_host::Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("flynn-host: {e}");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flynn-host: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(flynn_host::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flynn-host: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
