//! Counting the open flows without holding anything up: a thread walks `FLOWS` in batches of
//! [`BATCH`] entries on its own file descriptor of the map, counting as it goes (no list of
//! all flows is ever built), and publishes each complete pass as a [`FlowSnapshot`].
//! `status`, metrics, the fleet and the drains read the last complete pass and say how old
//! it is; a cut-over asks for a new pass and answers at once.
//!
//! The walk takes no lock: the board's lock is never held across its syscalls, so a
//! cut-over, a scrape or the fleet's keep-alive does not wait for it, however many flows are
//! open. A pass is followed by a rest at least as long as it took (at most half of one core),
//! and passes start at least every [`PERIOD`] otherwise, or as soon as one is asked for.

use std::{
    collections::{HashMap, HashSet},
    ops::ControlFlow,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc, Condvar, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use switcher_common::{BackendKey, FLOW_CLOSING, Flow, FlowKey, PROTO_TCP, flow_expired, user::Colour};

use crate::dataplane::{FlowCounts, now_coarse_ns};

/// Entries read per `BPF_MAP_LOOKUP_BATCH`.
pub const BATCH: usize = 4096;
/// A pass starts at least this often.
pub const PERIOD: Duration = Duration::from_secs(1);
/// The shortest rest between passes, however short they are.
const MIN_REST: Duration = Duration::from_millis(50);
/// The longest rest a long pass earns.
const MAX_REST: Duration = Duration::from_secs(5);

/// One complete pass over the flow table.
#[derive(Clone, Debug)]
pub struct FlowSnapshot {
    /// Open flows per (service, colour); expired ones are not counted.
    pub counts: HashMap<(u32, Colour), FlowCounts>,
    /// The backends the counted flows use (for the `REVERSE` table's garbage collection).
    pub in_use: HashSet<BackendKey>,
    /// When the pass began: a flow that existed from then until it ended was counted.
    pub started: Instant,
    /// When it ended.
    pub finished: Instant,
    /// Entries it read (expired ones included).
    pub walked: u64,
    /// Its number, from 1.
    pub pass: u64,
}

impl FlowSnapshot {
    /// A pass that found `counts`, begun and ended now (for the unit tests' fake maps).
    #[must_use]
    pub fn now(counts: HashMap<(u32, Colour), FlowCounts>, pass: u64) -> FlowSnapshot {
        let now = Instant::now();
        FlowSnapshot { counts, in_use: HashSet::new(), started: now, finished: now, walked: 0, pass }
    }

    /// The counts of one service's colour.
    #[must_use]
    pub fn of(&self, id: u32, colour: Colour) -> FlowCounts {
        self.counts.get(&(id, colour)).copied().unwrap_or_default()
    }

    /// How old the counts are: since the pass ended.
    #[must_use]
    pub fn age(&self) -> Duration {
        self.finished.elapsed()
    }
}

/// What the walker and its readers share.
#[derive(Debug)]
struct Shared {
    last: Mutex<Option<Arc<FlowSnapshot>>>,
    /// Whether a pass was asked for since the last one began.
    asked: Mutex<bool>,
    wake: Condvar,
    /// `tcp_idle_timeout` in nanoseconds: a reload may change it.
    tcp_idle_ns: AtomicU64,
}

/// The readers' end: the last complete pass, and a way to ask for a new one. Dropping it
/// stops the walker after its current pass.
#[derive(Debug)]
pub struct FlowCounter {
    shared: Arc<Shared>,
}

impl FlowCounter {
    /// The last complete pass, if one ended.
    #[must_use]
    pub fn last(&self) -> Option<Arc<FlowSnapshot>> {
        self.shared.last.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Asks for a new pass to begin as soon as the walker's rest allows.
    pub fn ask(&self) {
        *self.shared.asked.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_one();
    }

    /// Changes how long an open TCP flow may idle before it stops counting as live.
    pub fn set_tcp_idle_timeout(&self, timeout: Duration) {
        self.shared.tcp_idle_ns.store(ns(timeout), Ordering::Relaxed);
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The walker's end: runs passes on its own descriptor of `FLOWS` until its
/// [`FlowCounter`] is dropped.
#[derive(Debug)]
pub struct FlowWalker {
    fd: OwnedFd,
    shared: Weak<Shared>,
    udp_idle_ns: u64,
    /// Open TCP flows stamped before this (coarse clock) are not judged idle until
    /// `tcp_idle_timeout` after it (see `Dataplane`).
    started_ns: u64,
}

/// A walker on `fd` (a descriptor of `FLOWS` of its own) and its readers' end.
#[must_use]
pub fn counter(fd: OwnedFd, udp_idle: Duration, tcp_idle: Duration, started_ns: u64) -> (FlowCounter, FlowWalker) {
    let shared = Arc::new(Shared {
        last: Mutex::new(None),
        asked: Mutex::new(false),
        wake: Condvar::new(),
        tcp_idle_ns: AtomicU64::new(ns(tcp_idle)),
    });
    let walker = FlowWalker { fd, shared: Arc::downgrade(&shared), udp_idle_ns: ns(udp_idle), started_ns };
    (FlowCounter { shared }, walker)
}

impl FlowWalker {
    /// Walks until the [`FlowCounter`] goes: a pass, a rest, the next pass.
    pub fn run(self) {
        let mut pass = 0;
        loop {
            let Some(shared) = self.shared.upgrade() else { return };
            *shared.asked.lock().unwrap_or_else(PoisonError::into_inner) = false;
            let tcp_idle_ns = shared.tcp_idle_ns.load(Ordering::Relaxed);
            drop(shared);
            pass += 1;
            let started = Instant::now();
            let snapshot = match self.pass(tcp_idle_ns, pass) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("counting the open flows: {e}");
                    None
                }
            };
            let took = started.elapsed();
            let Some(shared) = self.shared.upgrade() else { return };
            if let Some(s) = snapshot {
                tracing::trace!(pass, flows = s.walked, took_ms = took.as_millis(), "counted the open flows");
                *shared.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(s));
            }
            // Rest at least as long as the pass took; then until the period is over, unless
            // a pass is asked for.
            let rest = took.clamp(MIN_REST, MAX_REST);
            drop(shared);
            std::thread::sleep(rest);
            let Some(shared) = self.shared.upgrade() else { return };
            let until = started + PERIOD;
            let asked = shared.asked.lock().unwrap_or_else(PoisonError::into_inner);
            let timeout = until.saturating_duration_since(Instant::now());
            drop(shared.wake.wait_timeout_while(asked, timeout, |asked| !*asked));
        }
    }

    /// One pass: counts per (service, colour) and the backends in use.
    fn pass(&self, tcp_idle_ns: u64, pass: u64) -> std::io::Result<FlowSnapshot> {
        count(&self.fd, self.udp_idle_ns, tcp_idle_ns, self.started_ns, pass)
    }
}

/// One pass over the flow table on `fd`: counts per (service, colour) and the backends in
/// use, batch by batch. Timeouts in nanoseconds; `started_ns` as in [`FlowWalker`].
///
/// # Errors
/// A read of the map failed.
pub fn count(
    fd: &impl std::os::fd::AsFd,
    udp_idle_ns: u64,
    tcp_idle_ns: u64,
    started_ns: u64,
    pass: u64,
) -> std::io::Result<FlowSnapshot> {
    let started = Instant::now();
    let now = now_coarse_ns();
    let mut counts: HashMap<(u32, Colour), FlowCounts> = HashMap::new();
    let mut in_use = HashSet::new();
    let mut walked = 0u64;
    // Most flows share few backends: a set insertion only when the backend changes.
    let mut last_backend = None;
    walk(fd, |keys, flows| {
        for (key, flow) in keys.iter().zip(flows) {
            walked += 1;
            if flow_expired(key.proto, flow.flags, now, flow.last_seen_ns, udp_idle_ns) {
                continue;
            }
            let b = &flow.backend;
            let backend = BackendKey { addr: b.addr, port: b.port, proto: key.proto, family: b.family };
            if last_backend != Some(backend) {
                in_use.insert(backend);
                last_backend = Some(backend);
            }
            let c = counts.entry((flow.service, Colour::from_u32(u32::from(flow.colour)))).or_default();
            if flow.flags & FLOW_CLOSING != 0 {
                c.closing += 1;
            } else if key.proto == PROTO_TCP && now.saturating_sub(flow.last_seen_ns.max(started_ns)) > tcp_idle_ns {
                c.idle += 1;
            } else {
                c.live += 1;
            }
        }
    })?;
    Ok(FlowSnapshot { counts, in_use, started, finished: Instant::now(), walked, pass })
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's "operation not supported" (not in libc: internal to the kernel, yet returned).
const ENOTSUPP: i32 = 524;

/// Calls `each` with the entries of the flow table on `fd`, [`BATCH`] at a time, read with
/// `BPF_MAP_LOOKUP_BATCH` (falls back to a walk key by key, in batches as well, where batches
/// are not supported). Entries the data path adds or removes meanwhile may or may not be seen;
/// `each` may change or delete entries it was given.
///
/// # Errors
/// A read failed other than by reaching the end.
pub fn walk(fd: &impl std::os::fd::AsFd, mut each: impl FnMut(&[FlowKey], &[Flow])) -> std::io::Result<()> {
    walk_until(fd, |keys, flows| {
        each(keys, flows);
        ControlFlow::Continue(())
    })
    .map(drop)
}

/// [`walk`], until `each` says to stop (a limit reached, a deadline passed): nothing more is
/// read after a batch it answered [`ControlFlow::Break`] to. Returns whether it was stopped.
///
/// # Errors
/// A read failed other than by reaching the end.
pub fn walk_until(
    fd: &impl std::os::fd::AsFd,
    mut each: impl FnMut(&[FlowKey], &[Flow]) -> ControlFlow<()>,
) -> std::io::Result<bool> {
    let fd = u64::try_from(fd.as_fd().as_raw_fd()).unwrap_or(0);
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![Flow::default(); BATCH];
    let (mut in_batch, mut out_batch) = (0u32, 0u32);
    let mut first = true;
    loop {
        // struct { in_batch, out_batch, keys, values: u64; count, map_fd: u32; elem_flags, flags: u64 }
        let mut attr = [0u64; 16];
        attr[0] = if first { 0 } else { (&raw const in_batch) as u64 };
        attr[1] = (&raw mut out_batch) as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = BATCH as u64 | (fd << 32);
        // SAFETY: the buffers hold BATCH keys and values of the map's sizes, and live across
        // the call; the attribute block is ours.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, attr.as_mut_ptr(), 128) };
        let err = std::io::Error::last_os_error();
        let got = ((attr[4] & 0xffff_ffff) as usize).min(BATCH);
        let end = rc != 0 && err.raw_os_error() == Some(libc::ENOENT);
        if (rc == 0 || end) && each(&keys[..got], &values[..got]).is_break() {
            return Ok(true);
        }
        if end {
            return Ok(false);
        }
        if rc != 0 {
            if first && matches!(err.raw_os_error(), Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)) {
                tracing::debug!("BPF_MAP_LOOKUP_BATCH on FLOWS: {err}; walking key by key");
                return walk_by_key(fd, &mut keys, &mut values, each);
            }
            return Err(err);
        }
        in_batch = out_batch;
        first = false;
    }
}

/// One flow of the table on `fd`, if it is there.
#[must_use]
pub fn lookup(fd: &impl std::os::fd::AsFd, key: &FlowKey) -> Option<Flow> {
    let mut value = Flow::default();
    // struct { map_fd: u32, pad; key, value: u64; flags: u64 }
    let mut attr = [0u64; 16];
    attr[0] = u64::try_from(fd.as_fd().as_raw_fd()).unwrap_or(0);
    attr[1] = std::ptr::from_ref(key) as u64;
    attr[2] = (&raw mut value) as u64;
    // SAFETY: a FlowKey and a Flow we own, of the map's key and value sizes, alive across
    // the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, attr.as_mut_ptr(), 128) };
    (rc == 0).then_some(value)
}

/// Replaces a flow of the table on `fd`, only if its key is still there.
///
/// # Errors
/// The key is gone (`ENOENT`), or the write failed.
pub fn update(fd: &impl std::os::fd::AsFd, key: &FlowKey, flow: &Flow) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_EXIST: u64 = 2;
    let mut attr = [0u64; 16];
    attr[0] = u64::try_from(fd.as_fd().as_raw_fd()).unwrap_or(0);
    attr[1] = std::ptr::from_ref(key) as u64;
    attr[2] = std::ptr::from_ref(flow) as u64;
    attr[3] = BPF_EXIST;
    // SAFETY: as in `lookup`; the kernel only reads key and value.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, attr.as_mut_ptr(), 128) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The walk of [`walk`] with two syscalls per entry (kernels without batch lookups). An entry
/// evicted between the two is skipped.
fn walk_by_key(
    fd: u64,
    keys: &mut [FlowKey],
    values: &mut [Flow],
    mut each: impl FnMut(&[FlowKey], &[Flow]) -> ControlFlow<()>,
) -> std::io::Result<bool> {
    let mut prev: Option<FlowKey> = None;
    let mut n = 0;
    loop {
        let mut next = FlowKey::default();
        // struct { map_fd: u32, pad; key, next_key: u64 }
        let mut attr = [0u64; 16];
        attr[0] = fd;
        attr[1] = prev.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64);
        attr[2] = (&raw mut next) as u64;
        // SAFETY: key and next key are FlowKeys we own, alive across the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_GET_NEXT_KEY, attr.as_mut_ptr(), 128) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let stopped = each(&keys[..n], &values[..n]).is_break();
            return if stopped || err.raw_os_error() == Some(libc::ENOENT) { Ok(stopped) } else { Err(err) };
        }
        let mut value = Flow::default();
        // struct { map_fd: u32, pad; key, value: u64; flags: u64 }
        let mut attr = [0u64; 16];
        attr[0] = fd;
        attr[1] = (&raw const next) as u64;
        attr[2] = (&raw mut value) as u64;
        // SAFETY: as above, with a Flow we own as the value.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, attr.as_mut_ptr(), 128) };
        if rc == 0 {
            keys[n] = next;
            values[n] = value;
            n += 1;
            if n == keys.len() {
                if each(&keys[..n], &values[..n]).is_break() {
                    return Ok(true);
                }
                n = 0;
            }
        }
        prev = Some(next);
    }
}
