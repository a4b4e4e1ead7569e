//! `switcher rollback`: back to the previous colour.

use std::path::Path;

use switcher_user::{emergency::Action, protocol::Request};

/// Switch a service back to the colour that was active before its last switch.
///
/// Like a cut-over, it is one map write and only moves new flows; it never arms the watch
/// window. When no daemon runs it writes the pinned maps directly (the emergency path) and
/// says so; in a fleet that needs --local. In a fleet it rolls back the fleet's desired
/// state (every node); when etcd is unreachable, this node only.
///
/// Example: switcher rollback web
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name, as in the config's [[service]] table.
    service: String,
    /// Roll back even when the old colour fails its health checks.
    #[arg(long)]
    force: bool,
    /// Wait, showing progress, until the colour rolled back from has drained (in a fleet:
    /// until every node has applied the rollback and drained).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    scope: super::fleet::ScopeArgs,
}

pub fn run(socket: &Path, config: &Path, args: Args) -> anyhow::Result<()> {
    let req = Request::Rollback { service: args.service.clone(), force: args.force, scope: args.scope.scope() };
    let Some(resp) = super::ask_or_emergency(socket, config, &req, &args.service, Action::Rollback)? else {
        return Ok(());
    };
    if let Some(m) = resp.message {
        println!("{m}");
    }
    if args.wait {
        match resp.revision {
            Some(rev) => super::fleet::wait(socket, &args.service, rev)?,
            None => super::cutover::wait_for_drain(socket, &args.service)?,
        }
    }
    Ok(())
}
