//! Hidden `completions` and `man`: generated from the clap definitions (used by
//! `cargo xtask install`).

use std::io::Write as _;

/// Print shell completions.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// Print the man page (roff).
#[derive(Debug, clap::Args)]
pub struct ManArgs {}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = super::command();
    clap_complete::generate(args.shell, &mut cmd, "switcher", &mut std::io::stdout());
    Ok(())
}

pub fn man(_args: ManArgs) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(super::command()).render(&mut out)?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}
