//! `switcher daemon`: the agent.

use std::path::Path;

use anyhow::Context as _;
use switcher_user::config::Config;
use tracing_subscriber::EnvFilter;

/// Run the agent: the data path, health checks, control socket and metrics.
///
/// Pins the XDP program's maps and links under `pin_path` (mounting bpffs if needed) and
/// adopts what a previous daemon pinned there, so restarts, crashes and upgrades never
/// interrupt traffic: flows, counters and switch states carry on. Serves the control socket,
/// checks backends, follows drains, reloads the config on SIGHUP. On SIGTERM or SIGINT it
/// stops and leaves the data path running, unless --detach-on-exit. Logs go to stderr (the
/// journal under systemd); set RUST_LOG (e.g. RUST_LOG=debug) for more.
///
/// Example: switcher daemon --config /etc/switcher/switcher.toml
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only check the configuration and exit (as `switcher config check`).
    #[arg(long)]
    check: bool,
    /// On exit, detach the program and remove the pins (default: keep forwarding).
    #[arg(long)]
    detach_on_exit: bool,
}

pub fn run(config_path: &Path, args: Args) -> anyhow::Result<()> {
    let config = Config::load_trusted(config_path)?;
    if args.check {
        switcher_user::agent::check_socket_path(&config.socket)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        println!("{}", super::config::summary(config_path, &config));
        return Ok(());
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let opts =
        switcher_user::agent::Options { config_path: config_path.to_owned(), detach_on_exit: args.detach_on_exit };
    rt.block_on(switcher_user::agent::run(config, opts, shutdown_signal()))
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
