//! The agent's bounded resources: how many control and metrics connections it serves at once,
//! and the file descriptors it needs, so that a flood of idle connections can never take the
//! descriptors the health checks and the audit log need.
//!
//! Budget: [`CONTROL_CONNECTIONS`] + [`METRICS_CONNECTIONS`] + one per checked backend (every
//! backend of a service is probed at once) + [`RESERVED_FDS`] (maps, links, the audit log, the
//! runtime, etcd, the journal). At start the daemon raises its soft `RLIMIT_NOFILE` to cover it
//! (up to the hard limit; `LimitNOFILE=` in the unit) and says so when it cannot.

/// Control connections served at once; more are answered "busy" and closed at once.
pub const CONTROL_CONNECTIONS: usize = 64;
/// Metrics connections served at once; more are closed at once (a scraper retries).
pub const METRICS_CONNECTIONS: usize = 16;
/// Descriptors kept for everything but connections and probes.
pub const RESERVED_FDS: u64 = 256;

/// The descriptors the agent needs with `probes` backends checked.
#[must_use]
pub fn fds_needed(probes: usize) -> u64 {
    (CONTROL_CONNECTIONS + METRICS_CONNECTIONS + probes) as u64 + RESERVED_FDS
}

/// Raises the soft limit on open files to at least `needed` (up to the hard limit); returns
/// the soft limit now in force, or why it could not be read or raised.
///
/// # Errors
/// The hard limit is below `needed`, or the limit could not be read or set.
pub fn ensure_fds(needed: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid resource and a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= needed {
        return Ok(lim.rlim_cur);
    }
    let want = libc::rlimit { rlim_cur: needed.min(lim.rlim_max), rlim_max: lim.rlim_max };
    // SAFETY: a valid resource and a valid pointer; the soft limit stays under the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) } != 0 {
        return Err(format!("setrlimit(RLIMIT_NOFILE, {}): {}", want.rlim_cur, std::io::Error::last_os_error()));
    }
    if want.rlim_cur < needed {
        return Err(format!(
            "the hard limit on open files is {}, below the {needed} needed; raise LimitNOFILE= in the unit",
            lim.rlim_max
        ));
    }
    Ok(want.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_file_gives_the_largest_configuration_its_descriptors() {
        // Every backend of every service checked: 4,096 services, two colours of 64.
        let most = fds_needed((switcher_common::MAX_SERVICES * 2 * switcher_common::MAX_POOL) as usize);
        let unit = include_str!("../../dist/switcher.service.in");
        let limit: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .and_then(|v| v.trim().parse().ok())
            .expect("dist/switcher.service.in sets LimitNOFILE=N");
        assert!(limit >= most, "LimitNOFILE={limit} is below the {most} descriptors the largest configuration needs");
    }

    #[test]
    fn the_soft_limit_is_raised_to_what_is_needed() {
        let now = ensure_fds(0).expect("read the limit");
        assert_eq!(ensure_fds(now).expect("no change"), now);
    }
}
