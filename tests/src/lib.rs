//! Helpers for switcher's privileged tests and its demo: network namespaces joined by veth,
//! backend servers and clients that run inside them, and the `switcher` daemon as a child
//! process. Everything created here is removed by `Drop`, also when a test panics.
//!
//! The topology (one per test, names made unique by a prefix):
//!
//! ```text
//!  client 192.0.2.2 ──── 192.0.2.1 [lb] 198.51.100.1  ──── 198.51.100.2  blue
//!                                       198.51.100.17 ──── 198.51.100.18 green
//!  VIP 203.0.113.10 is routed to lb; the lb's XDP program owns it.
//!  blue and green hold three IPv4 backends each (.2–.4, .18–.20) and one IPv6 one; IPv6:
//!  client 2001:db8:c::2, blue 2001:db8:1::2, green 2001:db8:2::2, VIP 2001:db8:10::10.
//! ```

pub mod corpus;
pub mod fleet;
pub mod flips;
pub mod flows;
pub mod net;
pub mod proc;
pub mod trace;

#[cfg(test)]
mod tests;

/// The environment variable naming a file where each skipped test appends its name, one a
/// line; `./x test` sets it, counts the names and reports them as skipped, not passed (a test
/// that returns early is "ok" to cargo).
pub const SKIPPED_FILE_ENV: &str = "SWITCHER_SKIPPED_FILE";

/// Whether the tests that need root can run here; prints why not when they cannot, and records
/// the skip (see [`skip`]).
#[must_use]
pub fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(test, "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run `./x test` as root");
    }
    root
}

/// Says that `test` skips and why, on stderr, and appends its name to the file named by
/// [`SKIPPED_FILE_ENV`] so that the run counts it as skipped. The caller then returns.
pub fn skip(test: &str, why: &str) {
    eprintln!("skipping {test}: {why}");
    if let Some(file) = std::env::var_os(SKIPPED_FILE_ENV) {
        record_skip(std::path::Path::new(&file), test);
    }
}

/// Appends `test` to the skip list; a failure to record is said loudly (the run would count
/// the test as passed).
fn record_skip(file: &std::path::Path, test: &str) {
    use std::io::Write as _;
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(format!("{test}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "warning: cannot record that {test} skipped in {}: {e}; it will be counted as passed",
            file.display()
        );
    }
}

#[cfg(test)]
mod skip_tests {
    #[test]
    fn a_skip_is_recorded_one_name_a_line() {
        let file = std::env::temp_dir().join(format!("switcher-skip-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        super::record_skip(&file, "first_test");
        super::record_skip(&file, "second_test");
        let text = std::fs::read_to_string(&file).expect("the skip file was written");
        let _ = std::fs::remove_file(&file);
        assert_eq!(text, "first_test\nsecond_test\n");
    }
}
