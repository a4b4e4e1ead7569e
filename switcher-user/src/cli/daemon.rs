//! `switcher daemon`: the agent.

use std::path::PathBuf;

use anyhow::Context as _;
use switcher_user::config::{Config, DEFAULT_CONFIG};
use tracing_subscriber::EnvFilter;

/// Run the agent: attach the XDP program and serve the control socket.
///
/// Loads the program, attaches it to every interface in the config, fills the service maps and
/// serves the control socket until SIGTERM or SIGINT, then detaches and removes the socket.
/// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.
///
/// Example: switcher daemon --config /etc/switcher/switcher.toml
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Only check the configuration and exit.
    #[arg(long)]
    check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    if args.check {
        println!(
            "{}: ok ({} services, interfaces: {})",
            args.config.display(),
            config.services.len(),
            config.interfaces.join(", ")
        );
        return Ok(());
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(switcher_user::daemon::run(config, shutdown_signal()))
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn init_logging() {
    // aya and aya-log log through `log`; bridge them into tracing.
    let _ = tracing_log::LogTracer::init();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
