//! Counts hits of the `xdp:xdp_exception` tracepoint (fired when an XDP program returns
//! `XDP_ABORTED` or a redirect fails) with `perf_event_open`, one counter per CPU. No kprobes,
//! no BPF: a plain tracepoint counter.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
};

/// A running count of `xdp:xdp_exception`, on every CPU.
pub struct ExceptionCounter {
    fds: Vec<OwnedFd>,
    /// tracefs mounted by us, to unmount on drop.
    mounted: Option<PathBuf>,
}

impl ExceptionCounter {
    /// Opens the counters (mounting tracefs privately if it is not mounted).
    ///
    /// # Errors
    /// The tracepoint or perf events are unavailable.
    pub fn open() -> io::Result<ExceptionCounter> {
        let (dir, mounted) = tracefs()?;
        let id: u64 = std::fs::read_to_string(dir.join("events/xdp/xdp_exception/id"))?
            .trim()
            .parse()
            .map_err(io::Error::other)?;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mut fds = Vec::new();
        for cpu in 0..cpus {
            // struct perf_event_attr: type (u32), size (u32), config (u64), … flags (u64 at 40).
            let mut attr = [0u64; 16];
            attr[0] = 2 | (128 << 32); // PERF_TYPE_TRACEPOINT, size 128
            attr[1] = id;
            // SAFETY: a valid attribute block; pid -1 + a cpu counts system-wide on that CPU.
            let fd = unsafe {
                libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), -1, i32::try_from(cpu).unwrap_or(0), -1, 0)
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new fd from the kernel.
            fds.push(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) });
        }
        if let Some(m) = &mounted {
            // The events stay open; the mount is not needed any more.
            let _ = Command::new("umount").arg(m).status();
            let _ = std::fs::remove_dir(m);
        }
        Ok(ExceptionCounter { fds, mounted: None })
    }

    /// Hits so far, summed over CPUs.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.fds
            .iter()
            .map(|fd| {
                let mut v = 0u64;
                // SAFETY: reading 8 bytes into a u64 we own.
                let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
                if n == 8 { v } else { 0 }
            })
            .sum()
    }
}

impl Drop for ExceptionCounter {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
    }
}

/// Where tracefs is, mounting a private instance when it is nowhere.
fn tracefs() -> io::Result<(PathBuf, Option<PathBuf>)> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let p = PathBuf::from(p);
        if p.join("events").exists() {
            return Ok((p, None));
        }
    }
    let dir = std::env::temp_dir().join(format!("switcher-tracefs-{}", crate::net::unique_prefix()));
    std::fs::create_dir_all(&dir)?;
    let ok = Command::new("mount").args(["-t", "tracefs", "nodev"]).arg(&dir).status()?.success();
    if !ok {
        return Err(io::Error::other("cannot mount tracefs"));
    }
    Ok((dir.clone(), Some(dir)))
}
