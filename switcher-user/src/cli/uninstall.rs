//! `switcher uninstall`: take the data path away.

use std::path::{Path, PathBuf};

use switcher_user::{config::Config, pins::Pins};

/// Detach the XDP program from every interface and remove all pinned maps and links.
///
/// Traffic to the VIPs stops being switched at once; flows and counters are gone. Refused
/// while a daemon runs on these pins: stop it first (`systemctl stop switcher`).
///
/// Example: switcher uninstall
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pin root (default: `pin_path` from --config, else /sys/fs/bpf/switcher).
    #[arg(long)]
    pin_path: Option<PathBuf>,
}

pub fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let root = match args.pin_path {
        Some(p) => p,
        None => {
            Config::load(config).map_or_else(|_| PathBuf::from(switcher_user::pins::DEFAULT_PIN_PATH), |c| c.pin_path)
        }
    };
    let pins = Pins::new(&root);
    if !pins.exists() && pins.linked_interfaces().is_empty() {
        println!("nothing pinned under {}: already uninstalled", pins.version_dir().display());
        return Ok(());
    }
    let _lock = pins.lock().map_err(|_| {
        anyhow::anyhow!(
            "a switcher daemon is running on the pins at {}: stop it first (`systemctl stop switcher`)",
            root.display()
        )
    })?;
    let links = pins.linked_interfaces();
    pins.remove().map_err(|e| anyhow::anyhow!("remove the pins under {}: {e}", root.display()))?;
    println!(
        "detached from {} and removed the pins under {}",
        if links.is_empty() { "no interface".into() } else { links.join(", ") },
        root.display()
    );
    Ok(())
}
