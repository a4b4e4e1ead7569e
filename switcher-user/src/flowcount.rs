//! Counting the open flows without holding anything up: a thread walks `FLOWS` (mapped, see
//! [`crate::flowtable`]) in batches of [`BATCH`] entries, counting as it goes (no list of all
//! flows is ever built), and publishes each complete pass as a [`FlowSnapshot`].
//! `status`, metrics, the fleet and the drains read the last complete pass and say how old
//! it is; a cut-over asks for a new pass and answers at once.
//!
//! The walk takes no lock: the board's lock is never held across its syscalls, so a
//! cut-over, a scrape or the fleet's keep-alive does not wait for it, however many flows are
//! open. A pass is followed by a rest at least as long as it took (at most half of one core),
//! and passes start at least every [`PERIOD`] otherwise, or as soon as one is asked for.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Condvar, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use switcher_common::{BackendKey, FLOW_CLOSING, PROTO_TCP, flow_expired, user::Colour};

pub use crate::flowtable::BATCH;
use crate::{
    dataplane::{FlowCounts, now_coarse_ns},
    flowtable::FlowTable,
};

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
    table: Arc<FlowTable>,
    shared: Weak<Shared>,
    udp_idle_ns: u64,
    /// Open TCP flows stamped before this (coarse clock) are not judged idle until
    /// `tcp_idle_timeout` after it (see `Dataplane`).
    started_ns: u64,
}

/// A walker on `table` and its readers' end.
#[must_use]
pub fn counter(
    table: Arc<FlowTable>,
    udp_idle: Duration,
    tcp_idle: Duration,
    started_ns: u64,
) -> (FlowCounter, FlowWalker) {
    let shared = Arc::new(Shared {
        last: Mutex::new(None),
        asked: Mutex::new(false),
        wake: Condvar::new(),
        tcp_idle_ns: AtomicU64::new(ns(tcp_idle)),
    });
    let walker = FlowWalker { table, shared: Arc::downgrade(&shared), udp_idle_ns: ns(udp_idle), started_ns };
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
            let s = self.pass(tcp_idle_ns, pass);
            let took = started.elapsed();
            let Some(shared) = self.shared.upgrade() else { return };
            tracing::trace!(pass, flows = s.walked, took_ms = took.as_millis(), "counted the open flows");
            *shared.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(s));
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
    fn pass(&self, tcp_idle_ns: u64, pass: u64) -> FlowSnapshot {
        count(&self.table, self.udp_idle_ns, tcp_idle_ns, self.started_ns, pass)
    }
}

/// One pass over the flow table: counts per (service, colour) and the backends in use,
/// batch by batch. Timeouts in nanoseconds; `started_ns` as in [`FlowWalker`].
#[must_use]
pub fn count(table: &FlowTable, udp_idle_ns: u64, tcp_idle_ns: u64, started_ns: u64, pass: u64) -> FlowSnapshot {
    let started = Instant::now();
    let now = now_coarse_ns();
    let mut counts: HashMap<(u32, Colour), FlowCounts> = HashMap::new();
    let mut in_use = HashSet::new();
    let mut walked = 0u64;
    // Most flows share few backends: a set insertion only when the backend changes.
    let mut last_backend = None;
    table.walk(|keys, flows| {
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
    });
    FlowSnapshot { counts, in_use, started, finished: Instant::now(), walked, pass }
}
