//! `cargo xtask`: the project's automation. `./x` installs the toolchains first and then runs
//! this, so `./x test` and `./x demo` work on a fresh machine.

mod cmd;
mod package;

use clap::{Parser, Subcommand};

/// switcher's build, test and demo automation.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the `switcher` binary (with its XDP program embedded).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests, data-path tests (BPF_PROG_TEST_RUN) and the network-namespace
    /// integration tests (these need root and skip with a message without it).
    Test {
        /// Then run `bench --quick` into a scratch directory, only to check that the
        /// benchmarks still work (no speed checks). On by default when `CI` is set and no test
        /// filter is given.
        #[arg(long)]
        bench_smoke: bool,
        /// Arguments passed to the test binaries, e.g. a name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the live blue → green → blue cut-over demo in network namespaces (needs root).
    Demo,
    /// Benchmarks: per-packet cost, scaling, cut-over latency, footprint → BENCHMARKS.md (root).
    Bench {
        /// A shorter run (fewer repeats and flips).
        #[arg(long)]
        quick: bool,
        /// Write BENCHMARKS.md and bench.svg into this directory instead of the repository.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// 1,000 cut-overs under continuous HTTP and UDP load, then the table of losses (needs root).
    Soak {
        /// How many cut-overs.
        #[arg(long, default_value_t = 1000)]
        flips: u32,
    },
    /// Check formatting and run clippy on the workspace.
    Lint,
    /// Build a release binary and install it with its systemd unit, example config, sysctl
    /// settings, shell completions and man page.
    /// Build a Debian package (.deb) with dpkg-deb: the binary in /usr/bin, the systemd unit,
    /// sysctl settings, the example config (a conffile), completions, man page, logrotate
    /// stanza, Grafana dashboard and Prometheus alerts. README: "Installing the package".
    ///
    /// Example: ./x package && sudo apt install ./target/debian/switcher_*.deb
    Package {
        /// Package this binary instead of building the release binary (CI reuses one it built).
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
        /// Write the .deb into this directory (default: target/debian).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// The package's Maintainer field (default: $DEBFULLNAME <$DEBEMAIL>, else the project).
        #[arg(long)]
        maintainer: Option<String>,
        /// How the package's files are compressed.
        #[arg(long, value_enum, default_value = "xz")]
        compression: package::Compression,
    },
    Install {
        /// Where binaries and docs go.
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        /// Stage everything under this directory instead of / (packaging, tests).
        #[arg(long, default_value = "/")]
        destdir: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build { release } => cmd::build(release),
        Command::Test { args, bench_smoke } => cmd::test(&args).and_then(|()| {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
            if bench_smoke || (ci && args.is_empty()) { cmd::bench_smoke() } else { Ok(()) }
        }),
        Command::Demo => cmd::demo(),
        Command::Soak { flips } => cmd::soak(flips),
        Command::Bench { quick, out } => cmd::bench(quick, out.as_deref()),
        Command::Lint => cmd::lint(),
        Command::Install { prefix, destdir } => cmd::install(&prefix, &destdir),
        Command::Package { binary, out, maintainer, compression } => {
            let maintainer =
                maintainer.unwrap_or_else(|| match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
                    (Ok(name), Ok(mail)) if !name.is_empty() && !mail.is_empty() => format!("{name} <{mail}>"),
                    _ => "switcher developers <switcher@packages.invalid>".to_owned(),
                });
            package::package(&package::Options { binary, out, maintainer, compression }).map(|_| ())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
