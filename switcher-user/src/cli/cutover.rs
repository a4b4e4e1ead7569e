//! `switcher cutover`: make a colour live.

use std::path::Path;

use switcher_user::control::Request;

/// Send new flows of a service to a colour (default: the idle one).
///
/// One BPF map write: the next new connection goes to the new colour; connections already
/// open stay where they are. Roll back with `switcher rollback SERVICE`.
///
/// Example: switcher cutover web green
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name, as in the config's [[service]] table.
    service: String,
    /// Colour to make active: blue or green. Default: the one that is idle now.
    #[arg(value_parser = ["blue", "green"])]
    colour: Option<String>,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let req = Request::Cutover { service: args.service, colour: args.colour };
    let resp = super::ask(socket, &req)?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}
