//! `switcher reload`: re-read the daemon's configuration.

use std::path::Path;

use switcher_user::protocol::Request;

/// Make the daemon re-read and apply its configuration file (like SIGHUP).
///
/// New services are installed, removed ones taken out, changed pools rebuilt; services that
/// stay keep their state, flows and health (backends that failed their checks stay out).
/// A pool changed at runtime with `switcher backend` is kept when the file did not change
/// it; a file that changes it too is rejected with what it would undo. An invalid file, or
/// a change that needs a restart (interfaces, socket, socket_group, metrics, audit_log,
/// pins, …), is rejected by name and nothing changes.
///
/// Example: switcher reload
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(socket: &Path, _args: Args) -> anyhow::Result<()> {
    let resp = super::ask(socket, &Request::Reload)?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}
