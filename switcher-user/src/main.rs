//! `switcher`: the blue-green traffic switcher's daemon and CLI.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switcher: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
