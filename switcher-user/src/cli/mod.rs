//! Command-line interface: one module per verb, each with its `Args` and `run`.

mod backend;
mod config;
mod cutover;
mod daemon;
mod docs;
mod drill;
mod fleet;
mod flows;
mod reload;
mod rollback;
mod rollout;
mod shadow;
mod status;
mod uninstall;
mod weight;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switcher_user::{
    config::{DEFAULT_CONFIG, DEFAULT_SOCKET},
    protocol,
};

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

    /// Configuration file: the daemon's, and where the CLI finds the pinned maps when the
    /// daemon is down.
    #[arg(long, short, global = true, env = "SWITCHER_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Daemon(daemon::Args),
    Cutover(cutover::Args),
    Rollback(rollback::Args),
    Weight(weight::Args),
    Rollout(rollout::Args),
    Drill(drill::Args),
    Shadow(shadow::Args),
    Backend(backend::Args),
    Status(status::Args),
    Flows(flows::Args),
    Reload(reload::Args),
    Config(config::Args),
    Fleet(fleet::Args),
    Uninstall(uninstall::Args),
    #[command(hide = true)]
    Completions(docs::CompletionsArgs),
    #[command(hide = true)]
    Man(docs::ManArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(args) => daemon::run(&cli.config, args),
        Command::Cutover(args) => cutover::run(&cli.socket, &cli.config, args),
        Command::Rollback(args) => rollback::run(&cli.socket, &cli.config, args),
        Command::Weight(args) => weight::run(&cli.socket, args),
        Command::Rollout(args) => rollout::run(&cli.socket, args),
        Command::Drill(args) => drill::run(&cli.socket, args),
        Command::Shadow(args) => shadow::run(&cli.socket, args),
        Command::Backend(args) => backend::run(&cli.socket, args),
        Command::Status(args) => status::run(&cli.socket, args),
        Command::Flows(args) => flows::run(&cli.socket, &cli.config, args),
        Command::Reload(args) => reload::run(&cli.socket, args),
        Command::Config(args) => config::run(&cli.config, args),
        Command::Fleet(args) => fleet::run(&cli.socket, args),
        Command::Uninstall(args) => uninstall::run(&cli.config, args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}

/// The CLI's definition, for completions and the man page.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// A progress bar on stderr in `template` (indicatif's syntax), redrawn in place on a
/// terminal and hidden otherwise (a log gets the callers' plain lines instead).
fn progress_bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(1), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("#>-"));
    }
    bar
}

/// A colour word clap already checked (`value_parser = ["blue", "green"]`, which also lists
/// them in `--help`), as the protocol's type.
fn colour(word: &str) -> anyhow::Result<protocol::Colour> {
    word.parse().map_err(|e| anyhow::anyhow!("{word:?}: {e}"))
}

/// Sends a request and turns a refusal into an error.
fn ask(socket: &std::path::Path, req: &protocol::Request) -> anyhow::Result<protocol::Response> {
    let resp = protocol::request(socket, req)?;
    if resp.ok {
        Ok(resp)
    } else {
        anyhow::bail!("{}", resp.error.unwrap_or_else(|| "the daemon refused without saying why".into()))
    }
}

/// Sends a change to the daemon; when no daemon is running, applies it to the pinned maps
/// instead (the emergency path) and says so. `None`: the emergency path did it. When nothing
/// answers on the socket but a daemon holds the pins (a wrong `--socket`), it fails, naming
/// both: a direct write would go behind that daemon's back.
fn ask_or_emergency(
    socket: &std::path::Path,
    config: &std::path::Path,
    req: &protocol::Request,
    service: &str,
    action: switcher_user::emergency::Action,
) -> anyhow::Result<Option<protocol::Response>> {
    use switcher_user::emergency::{self, EmergencyError, Scope};
    match protocol::request(socket, req) {
        Ok(resp) if resp.ok => Ok(Some(resp)),
        Ok(resp) => anyhow::bail!("{}", resp.error.unwrap_or_else(|| "the daemon refused without saying why".into())),
        Err(protocol::ClientError::NotRunning { .. }) => {
            let cfg = switcher_user::config::Config::load(config).map_err(|e| {
                anyhow::anyhow!(
                    "nothing answers on {}, and the emergency path needs the daemon's config: {e}",
                    socket.display()
                )
            })?;
            let local = req.scope().is_some_and(|s| s.local);
            let (done, scope) = emergency::switch(&cfg, service, action, local).map_err(|e| match e {
                EmergencyError::DaemonRunning { .. } => {
                    anyhow::anyhow!("nothing answers on {}, but {e}; nothing changed", socket.display())
                }
                e => anyhow::anyhow!("the daemon is not running; emergency path: {e}"),
            })?;
            println!("{done}");
            let then = match scope {
                Scope::Node => "The daemon adopts this state when it starts.".to_owned(),
                Scope::FleetLocal => format!(
                    "This node is in a fleet: when its daemon starts it keeps this as a local override of the fleet's desired state, until that desired state of {service} changes (`switcher fleet status` shows it)."
                ),
            };
            eprintln!(
                "note: the switcher daemon is not running: this was written straight into the pinned maps (emergency path); health checks were not consulted. {then}"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
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
    fn man_page_and_completions_are_generated_from_the_cli() {
        let mut man = Vec::new();
        clap_mangen::Man::new(command()).render(&mut man).expect("man");
        let man = String::from_utf8_lossy(&man);
        assert!(man.contains(".TH switcher 1") && man.contains("cutover"), "{man}");
        let mut bash = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut command(), "switcher", &mut bash);
        let bash = String::from_utf8_lossy(&bash);
        assert!(bash.contains("rollback") && bash.contains("--drain-timeout"));
    }

    #[test]
    fn colours_are_checked_before_anything_is_sent() {
        let e = Cli::try_parse_from(["switcher", "cutover", "web", "red"]).expect_err("red");
        assert!(e.to_string().contains("invalid value 'red'"), "{e}");
        let c = Cli::try_parse_from(["switcher", "--socket", "/tmp/x", "cutover", "web"]).expect("ok");
        assert_eq!(c.socket, PathBuf::from("/tmp/x"));
    }
}
