//! `switcher backend`: change a colour's pool while it runs.

use std::path::Path;

use switcher_user::protocol::Request;

/// Add or remove a backend of a colour.
///
/// The colour's Maglev table is rebuilt and swapped in with one write: about 1/N of new flows
/// move, open flows never do. A removed backend keeps its open flows until they end.
///
/// Example: switcher backend add web green 198.51.100.19:8080 --weight 2
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Add a backend, or change its weight.
    Add {
        service: String,
        #[arg(value_parser = ["blue", "green"])]
        colour: String,
        /// ADDRESS:PORT ([v6]:PORT for IPv6).
        address: String,
        /// Relative share of the colour's new flows (0 keeps it in the pool without new flows).
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend.
    Remove {
        service: String,
        #[arg(value_parser = ["blue", "green"])]
        colour: String,
        address: String,
    },
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let req = match args.action {
        Action::Add { service, colour, address, weight } => {
            Request::BackendAdd { service, colour: super::colour(&colour)?, address, weight: Some(weight) }
        }
        Action::Remove { service, colour, address } => {
            Request::BackendRemove { service, colour: super::colour(&colour)?, address }
        }
    };
    let resp = super::ask(socket, &req)?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}
