//! `switcher config check`: validate a configuration without touching anything.

use std::path::{Path, PathBuf};

use switcher_user::config::Config;

/// Check configuration files.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Validate a file (default: --config) and print what it configures; nothing is changed.
    /// Errors name the file, line and field. Exit status 1 when invalid.
    ///
    /// Example: switcher config check /etc/switcher/switcher.toml
    Check {
        /// The file to check.
        path: Option<PathBuf>,
    },
}

/// One line describing a valid config.
pub fn summary(path: &Path, c: &Config) -> String {
    let names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
    format!(
        "{}: ok — {} service{} ({}), interfaces {}, pins under {}",
        path.display(),
        c.services.len(),
        if c.services.len() == 1 { "" } else { "s" },
        switcher_user::config::short_list(&names),
        c.interfaces.join(", "),
        c.pin_path.display()
    )
}

pub fn run(default: &Path, args: Args) -> anyhow::Result<()> {
    let Action::Check { path } = args.action;
    let path = path.as_deref().unwrap_or(default);
    let config = Config::load_trusted(path)?;
    switcher_user::agent::check_socket_path(&config.socket).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("{}", summary(path, &config));
    Ok(())
}
