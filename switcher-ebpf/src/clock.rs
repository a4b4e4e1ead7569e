//! The data path's clocks. Every stamp and every expiry is judged on `CLOCK_MONOTONIC_COARSE`,
//! the clock the daemon reads too, in one of two ways:
//!
//! - [`now`]: the coarse clock, read through a per-CPU cache ([`Clock`], in the scratch
//!   space) keyed by `jiffies`. The coarse clock only moves when the kernel's tick moves
//!   `jiffies`, and `bpf_jiffies64` is one load (the verifier inlines it on 64-bit JITs),
//!   where `bpf_ktime_get_coarse_ns` is a helper call that cost ~30 ns per UDP packet here. So
//!   a CPU calls the helper once per tick, not once per packet. The cached value can lag the
//!   helper's by at most one tick (the tick advances `jiffies` just before the clock), which
//!   is far below `LAST_SEEN_GRANULARITY_NS` and every timeout.
//! - [`daemon_now`]: the daemon's reading (`NOW`, about once a second), for open TCP flows,
//!   whose packets decide no expiry.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, generated::bpf_jiffies64};

use crate::prog::NOW;

/// A CPU's last reading of the coarse clock and the `jiffies` it was read in. Lives in the
/// per-CPU scratch space (`nat::Scratch`); zero before the first reading.
#[repr(C)]
pub struct Clock {
    jiffies: u64,
    ns: u64,
}

/// `CLOCK_MONOTONIC_COARSE` in ns, read at most once per tick per CPU (see the module).
#[inline(always)]
pub fn now(c: &mut Clock) -> u64 {
    // SAFETY: plain helper call (inlined by the verifier into a load of `jiffies_64`).
    let jiffies = unsafe { bpf_jiffies64() };
    if c.jiffies != jiffies || c.ns == 0 {
        // SAFETY: plain helper call.
        c.ns = unsafe { bpf_ktime_get_coarse_ns() };
        c.jiffies = jiffies;
    }
    c.ns
}

/// The daemon's clock (`NOW`): the same clock, read about once a second by the daemon. 0 when
/// no daemon ever wrote it (the data-path tests): open TCP flows do not expire by time.
#[inline(always)]
pub fn daemon_now() -> u64 {
    NOW.get(0).copied().unwrap_or(0)
}
