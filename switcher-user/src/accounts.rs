//! User and group lookups for the agent, safe to use from async code: the reentrant libc
//! calls (`getpwuid_r`, `getgrnam_r`: `getpwuid` and `getgrnam` share static storage between
//! threads), run on a blocking thread with a time bound by [`off_worker`], because NSS may ask
//! a directory service over the network and must not stall an async worker.

use std::{ffi::CStr, time::Duration};

/// How long a lookup may take before the agent goes on without its answer.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest buffer offered to the `_r` calls (a group with thousands of members needs more
/// than the first guess).
const MAX_BUFFER: usize = 1 << 20;

/// Runs `f` on tokio's blocking threads and waits at most `limit` for it; `None` when it
/// did not finish in time (it is left to finish on its own) or panicked.
pub async fn off_worker<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await.ok()?.ok()
}

/// The name of a user id (blocking; see [`off_worker`]).
#[must_use]
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain old data; zeroed is a valid value to be overwritten.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and the buffer's length is passed.
        let rc = unsafe { libc::getpwuid_r(uid, &raw mut pw, buf.as_mut_ptr().cast(), buf.len(), &raw mut found) };
        if rc == libc::ERANGE && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || found.is_null() || pw.pw_name.is_null() {
            return None;
        }
        // SAFETY: non-null, and a C string inside `buf`, which is alive.
        return Some(unsafe { CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned());
    }
}

/// The id of a group name (blocking; see [`off_worker`]).
#[must_use]
pub fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: group is plain old data; zeroed is a valid value to be overwritten.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and the buffer's length is passed.
        let rc =
            unsafe { libc::getgrnam_r(c.as_ptr(), &raw mut gr, buf.as_mut_ptr().cast(), buf.len(), &raw mut found) };
        if rc == libc::ERANGE && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || found.is_null() {
            return None;
        }
        return Some(gr.gr_gid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_and_nonsense_is_not() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-switcher"), None);
        assert_eq!(group_id("nul\0inside"), None);
        assert_eq!(user_name(4_000_000_000), None);
    }

    #[tokio::test]
    async fn a_lookup_runs_off_the_async_worker_and_a_hung_one_is_abandoned() {
        // current_thread runtime: the async code runs on this very thread.
        let here = std::thread::current().id();
        let there = off_worker(LOOKUP_TIMEOUT, || std::thread::current().id()).await;
        assert!(there.is_some_and(|t| t != here), "the lookup ran on the async thread");
        // A lookup that never returns (NSS waiting on a dead directory server).
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let r = off_worker(Duration::from_millis(50), move || hung.recv().ok()).await;
        assert_eq!(r, None, "a hung lookup is given up on");
        drop(release);
        // And the runtime still runs.
        assert_eq!(off_worker(LOOKUP_TIMEOUT, || 7).await, Some(7));
    }
}
