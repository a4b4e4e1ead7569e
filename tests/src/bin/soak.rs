//! `cargo xtask soak`: 1,000 cut-overs (or `--flips N`) under continuous HTTP and UDP load in
//! namespaces, then the table of what went wrong (nothing, we expect). Exit status 1 if
//! anything was lost.

use std::time::Duration;

fn main() -> std::process::ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the soak builds network namespaces and attaches XDP: run it as root (`sudo ./x soak`)");
        return std::process::ExitCode::FAILURE;
    }
    let mut args = std::env::args().skip(1);
    let mut flips = 1_000;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--flips", Some(n)) => flips = n,
            _ => {
                eprintln!("usage: soak [--flips N]");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    println!("soak: {flips} cut-overs of web (HTTP) and dns (UDP) under load …");
    let report = switcher_tests::flips::run(flips, Duration::from_millis(25), true);
    println!("\n{}", report.table());
    if report.clean() {
        println!("soak OK: no failed request, no reset, no answer from a backend address, no wrong colour");
        std::process::ExitCode::SUCCESS
    } else {
        println!("soak FAILED");
        std::process::ExitCode::FAILURE
    }
}
