//! Command-line interface: one module per verb, each with its `Args` and `run`.

mod backend;
mod cutover;
mod daemon;
mod rollback;
mod status;
mod weight;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switcher_user::{config::DEFAULT_SOCKET, control};

/// Blue-green traffic switcher in the kernel's XDP hook.
///
/// Run `switcher daemon` on each load-balancer node; it attaches the XDP program to the
/// configured interfaces and serves a control socket. The other commands talk to it:
/// a cut-over is one BPF map write and takes effect on the next new flow, while established
/// flows stay on the colour they started on.
///
/// Example: switcher cutover web green && switcher status web
#[derive(Debug, Parser)]
#[command(name = "switcher", version, propagate_version = true)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "SWITCHER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Daemon(daemon::Args),
    Cutover(cutover::Args),
    Rollback(rollback::Args),
    Weight(weight::Args),
    Backend(backend::Args),
    Status(status::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(args) => daemon::run(args),
        Command::Cutover(args) => cutover::run(&cli.socket, args),
        Command::Rollback(args) => rollback::run(&cli.socket, args),
        Command::Weight(args) => weight::run(&cli.socket, args),
        Command::Backend(args) => backend::run(&cli.socket, args),
        Command::Status(args) => status::run(&cli.socket, args),
    }
}

/// Sends a request and turns a refusal into an error.
fn ask(socket: &std::path::Path, req: &control::Request) -> anyhow::Result<control::Response> {
    let resp = control::request(socket, req)?;
    if resp.ok {
        Ok(resp)
    } else {
        anyhow::bail!("{}", resp.error.unwrap_or_else(|| "the daemon refused without saying why".into()))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn colours_are_checked_before_anything_is_sent() {
        let e = Cli::try_parse_from(["switcher", "cutover", "web", "red"]).expect_err("red");
        assert!(e.to_string().contains("invalid value 'red'"), "{e}");
        let c = Cli::try_parse_from(["switcher", "--socket", "/tmp/x", "cutover", "web"]).expect("ok");
        assert_eq!(c.socket, PathBuf::from("/tmp/x"));
    }
}
