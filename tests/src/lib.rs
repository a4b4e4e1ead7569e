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
pub mod net;
pub mod proc;
pub mod trace;

#[cfg(test)]
mod tests;

/// Whether the tests that need root can run here; prints why not when they cannot.
#[must_use]
pub fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping {test}: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run `./x test` as root");
    }
    root
}
