//! `switcher rollback`: back to the previous colour.

use std::path::Path;

use switcher_user::control::Request;

/// Switch a service back to the colour that was active before its last switch.
///
/// Like a cut-over, it is one map write and only moves new flows.
///
/// Example: switcher rollback web
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name, as in the config's [[service]] table.
    service: String,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let resp = super::ask(socket, &Request::Rollback { service: args.service })?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}
