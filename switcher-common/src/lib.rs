//! The contract between the switcher XDP program and user space.
//!
//! Everything here is part of the ABI of the maps: the types are `#[repr(C)]`, hold only
//! fixed-width integers and byte arrays, have explicit padding and a size asserted at compile
//! time. Addresses and ports are stored as the raw bytes found on the wire (network byte order),
//! so neither side ever has to guess an endianness. IPv4 and IPv6 share one layout: a 16-byte
//! address field and a family byte; an IPv4 address fills the first 4 bytes, the rest is zero.
//! Any layout change bumps [`ABI_VERSION`].
//!
//! Pure decision logic (flow hash, canary split, flow expiry) and checksum arithmetic live here
//! too, as `no_std` functions that the eBPF program calls and host unit tests cover.
#![no_std]

pub mod csum;
#[cfg(feature = "user")]
pub mod user;

use core::mem::size_of;

/// Bumped on any change to a map's layout, key/value type or meaning.
pub const ABI_VERSION: u32 = 8;

/// Name of the XDP program in the object file.
pub const PROG_NAME: &str = "switcher";
/// A program of the benchmarks' own object (`switcher-bench`, never loaded by the daemon) that
/// only returns `XDP_PASS`: the benchmarks' baseline.
pub const BASELINE_PROG: &str = "baseline";

/// `ServiceKey` → `Service`; written by the daemon.
pub const MAP_SERVICES: &str = "SERVICES";
/// `u32` slot `pool_slot(service, colour, i)` → `Backend`; written by the daemon.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// The Maglev slab: `u32` element → `RingChunk` of backend indices. Each (service, colour)
/// table takes a run of elements sized to its pool; written by the daemon, which sizes the
/// slab to its config at start.
pub const MAP_RING: &str = "RING";
/// `u32` `colour_slot(service, colour)` → `u32` the live table of that colour
/// (`ring_live`: where in `RING` it starts and its size), or `RING_NONE`.
pub const MAP_RING_LIVE: &str = "RING_LIVE";
/// `u32` service id → `u32` switch state (`switch_state`); the one map a cut-over writes.
pub const MAP_STATE: &str = "STATE";
/// Set index → `FlowSet`: `FlowKey` (client → VIP) and `Flow` in sets of `FLOW_WAYS` slots;
/// written by the data path (expired entries are treated as absent and left for new flows to
/// reuse); the daemon rewrites flows only at a drain timeout, and removes a removed service's.
pub const MAP_FLOWS: &str = "FLOWS";
/// `BackendKey` (a backend's address, port, protocol) → `Reverse` (the VIPs and ports it
/// serves); written by the daemon with the pools. A backend's packet is translated back only
/// when the flow on the reversed tuple is live and was given that backend.
pub const MAP_REVERSE: &str = "REVERSE";
/// `u32` 0 → `u64` the daemon's `CLOCK_MONOTONIC_COARSE` (ns), written about once a second:
/// open TCP flows are stamped with it, so their packets read no clock.
pub const MAP_NOW: &str = "NOW";
/// per-CPU, `u32` `colour_slot(service, colour)` → `ColourCounters`; written by the data path.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// per-CPU, `u32` reason → `u64` packets; written by the data path on every exit.
pub const MAP_STATS: &str = "STATS";
/// `u32` 0 → `u32` ABI version; written by the daemon at load.
pub const MAP_META: &str = "META";

/// per-CPU, `u32` 0 → working space of the data path (keys and values too large for the
/// 512-byte BPF stack, this CPU's clock reading). Nobody else reads it, and it is not pinned
/// (see [`MAP_NOT_PINNED`]).
pub const MAP_SCRATCH: &str = "SCRATCH";

/// Maps the daemon does not pin: each load of the program makes its own. `SCRATCH` holds
/// nothing a new program needs from the old one, so its layout may change without an ABI bump
/// (a stale pin of it from an earlier build is left alone).
pub const MAP_NOT_PINNED: [&str; 1] = [MAP_SCRATCH];

/// The maps the daemon pins: [`MAP_NAMES`] but [`MAP_NOT_PINNED`].
pub fn pinned_map_names() -> impl Iterator<Item = &'static str> {
    MAP_NAMES.into_iter().filter(|n| !MAP_NOT_PINNED.contains(n))
}

/// `u32` port → `u8` bits: `PORT_SERVICE` if some service (or preview) listens on it,
/// `PORT_BACKEND` if some backend does. Written by the daemon. A packet whose destination port
/// is no service's and whose source port is no backend's passes without a hash lookup.
pub const MAP_PORTS: &str = "PORTS";
/// `u32` `vip_slot(address)` → `u8` 1 if some service's VIP falls in that slot. Written by the
/// daemon before the `SERVICES` keys that need it; lets traffic to other addresses on a
/// service port pass without a hash lookup.
pub const MAP_VIPS: &str = "VIPS";
/// Slots of `VIPS`.
pub const VIP_SLOTS: u32 = 65_536;

/// The `VIPS` slot of an address: its last two bytes (of the four of an IPv4 address, which
/// the 16-byte field holds first).
#[inline(always)]
#[must_use]
pub const fn vip_slot(addr: &[u8; 16], family: u8) -> u32 {
    if family == FAMILY_V6 {
        ((addr[14] as u32) << 8) | addr[15] as u32
    } else {
        ((addr[2] as u32) << 8) | addr[3] as u32
    }
}

/// `PORTS` bit: a service port.
pub const PORT_SERVICE: u8 = 1;
/// `PORTS` bit: a backend port (replies come from it).
pub const PORT_BACKEND: u8 = 2;

/// `u32` 0 → the live-frame benchmark's 64-byte frame; a map of the benchmarks' own object
/// (`switcher-bench`), not of the daemon's.
pub const MAP_BENCH_FRAME: &str = "BENCH_FRAME";

/// Every map name the data path uses, for the object-file test; the daemon pins all but
/// [`MAP_NOT_PINNED`].
pub const MAP_NAMES: [&str; 20] = [
    MAP_PORTS,
    MAP_VIPS,
    MAP_SCRATCH,
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_RING,
    MAP_RING_LIVE,
    MAP_STATE,
    MAP_FLOWS,
    MAP_REVERSE,
    MAP_NOW,
    MAP_COUNTERS,
    MAP_STATS,
    MAP_META,
    MAP_SHADOW,
    MAP_SHADOW_FLOWS,
    MAP_SHADOW_REPLY,
    MAP_SHADOW_COUNTERS,
    MAP_SHADOW_BUCKET,
    MAP_SHADOW_SCRATCH,
];

/// Services (VIP, port, protocol) the maps hold by default; ids are `0..max_services` (the
/// daemon sizes the per-service maps from its config's `max_services`). A service with a
/// preview port takes two `SERVICES` keys but one id.
pub const MAX_SERVICES: u32 = 4_096;
/// Backends per colour of a service.
pub const MAX_POOL: u32 = 64;
/// Maglev slots per `RING` element.
pub const RING_CHUNK: u32 = 256;
/// Table sizes (primes): class `c` has `RING_SIZES[c]` slots, just below `256 << c`, so it
/// takes `1 << c` elements of `RING`. A colour's table is sized to its pool
/// (`ring_class`); the largest, 65,521 slots, is the size Katran uses for every VIP.
pub const RING_SIZES: [u32; 9] = [251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521];
/// A table has at least this many slots per backend: with equal weights each backend gets
/// `⌊M/N⌋` or `⌈M/N⌉` slots, so the load imbalance is at most `N/M` ≤ 0.5 %.
pub const RING_SLOTS_PER_BACKEND: u32 = 200;
/// `RING_LIVE` value of a colour with no table (no backends): zero, what a new map holds.
pub const RING_NONE: u32 = 0;
/// A ring slot with no backend (the colour's pool is empty).
pub const RING_EMPTY: u16 = u16::MAX;
/// Flows the table is sized for by default (`max_flows`): `FLOWS` has [`flow_slots`] of it.
pub const MAX_FLOWS: u32 = 262_144;
/// Slots per set of `FLOWS`: a flow lives in one of the [`FLOW_WAYS`] slots of the set its
/// 5-tuple hashes to ([`flow_set_hash`]); a new flow takes a free slot of its set, else the
/// one of a flow that has ended, else that of the flow seen longest ago.
pub const FLOW_WAYS: u32 = 4;
/// Sets of `FLOWS` (its entries) for `max_flows` flows: twice the slots, with `max_flows`
/// rounded up to a power of two, so that a set overflows — evicting a live flow before the
/// table holds `max_flows` — rarely.
#[must_use]
pub const fn flow_sets(max_flows: u32) -> u32 {
    flow_capacity(max_flows) * 2 / FLOW_WAYS
}
/// What a table made for `max_flows` is said to hold: `max_flows` rounded up to a power of
/// two (at least 16), half its slots.
#[must_use]
pub const fn flow_capacity(max_flows: u32) -> u32 {
    let n = if max_flows < 16 { 16 } else { max_flows };
    match n.checked_next_power_of_two() {
        Some(n) => n,
        None => 1 << 31,
    }
}

/// Capacity of `REVERSE`: distinct backend address:port:protocol triples (every backend of
/// every colour of every service, at most).
pub const MAX_REVERSE: u32 = MAX_SERVICES * COLOURS * MAX_POOL;
/// (VIP, port) pairs one backend address:port may serve in NAT mode: a service's port and its
/// preview port, or the same backend behind a few VIPs. The daemon refuses more.
pub const REVERSE_WAYS: usize = 4;

/// Colour values.
pub const COLOUR_BLUE: u32 = 0;
pub const COLOUR_GREEN: u32 = 1;
/// Number of colours; slot arithmetic is `service * COLOURS + colour`.
pub const COLOURS: u32 = 2;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Address families as stored in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `Service::flags`: this key is the service's preview port (traffic goes to the idle colour).
pub const SERVICE_PREVIEW: u32 = 1;
/// `Service::flags`: L2 direct server return (only the destination MAC is rewritten).
pub const SERVICE_DSR: u32 = 2;

/// `Flow::flags`: a FIN or RST was seen; the flow still routes but no longer counts as live.
pub const FLOW_CLOSING: u8 = 1;
/// `Flow::flags`: the drain timeout expired with `reset`: the next client packet is answered
/// with a TCP RST and the flow is forgotten.
pub const FLOW_RESET: u8 = 2;
/// `Flow` flag: the flow records its service's mode (`FLOW_DSR` or NAT), so its packets can be
/// forwarded from the flow entry alone, before the service lookup. Entries without it (written
/// by an older program, or by user space) take the full path.
pub const FLOW_KNOWN: u8 = 4;
/// `Flow` flag: the flow's service is DSR (with `FLOW_KNOWN`).
pub const FLOW_DSR: u8 = 8;
/// `Flow` flag (UDP): the client's last datagram from this port went straight to the flow's
/// backend, not to the VIP, so the backend's answers are the direct conversation's and pass
/// untouched; the client's next datagram to the VIP clears it.
pub const FLOW_DIRECT: u8 = 16;
/// `Flow` flag (NAT TCP): the flow began with a SYN at `Flow::syn_time` and its backend has not
/// answered it yet (no SYN-ACK, RST or ICMP unreachable). The first answer clears it and is
/// counted (`ColourCounters::handshakes` or `refused`).
pub const FLOW_PENDING: u8 = 32;

/// Basis points in 100 %: canary weights are in steps of 0.01 %.
pub const BP_ALL: u32 = 10_000;

/// Index into `COUNTERS`, `RING_LIVE` for a service's colour.
#[inline(always)]
#[must_use]
pub const fn colour_slot(service: u32, colour: u32) -> u32 {
    service * COLOURS + (colour & 1)
}

/// Index into `BACKENDS` of backend `i` of a service's colour.
#[inline(always)]
#[must_use]
pub const fn pool_slot(service: u32, colour: u32, i: u32) -> u32 {
    colour_slot(service, colour) * MAX_POOL + i
}

/// The size class of a table for `backends` pool members: the smallest with
/// `RING_SLOTS_PER_BACKEND` slots per member (the largest for big pools).
#[must_use]
pub const fn ring_class(backends: u32) -> u32 {
    let mut c = 0;
    while c + 1 < RING_SIZES.len() && RING_SIZES[c] < backends.saturating_mul(RING_SLOTS_PER_BACKEND) {
        c += 1;
    }
    c as u32
}

/// `RING_LIVE` value of a table of class `class` (`0..=8`) starting at element `offset`
/// (`< 1 << 23`): the class plus one in bits 28–31 (so zero, what a new map holds, is "no
/// table"), `(256 << class) - size` in bits 23–27, the offset below, so the data path finds
/// the size with a shift and a subtraction.
#[must_use]
pub const fn ring_live(class: u32, offset: u32) -> u32 {
    let class = if class as usize >= RING_SIZES.len() { RING_SIZES.len() as u32 - 1 } else { class };
    let delta = (RING_CHUNK << class) - RING_SIZES[class as usize];
    ((class + 1) << 28) | (delta << 23) | (offset & RING_OFFSET_MASK)
}

/// Largest element offset a `RING_LIVE` value holds, plus one.
pub const RING_OFFSET_MASK: u32 = (1 << 23) - 1;

/// The live table a `RING_LIVE` value names: `(first element, slots)`, or `None` for
/// `RING_NONE` or a value no daemon writes.
#[inline(always)]
#[must_use]
pub const fn ring_table(live: u32) -> Option<(u32, u32)> {
    let field = live >> 28;
    if field == 0 || field as usize > RING_SIZES.len() {
        return None;
    }
    let class = field - 1;
    let size = (RING_CHUNK << class) - ((live >> 23) & 31);
    Some((live & RING_OFFSET_MASK, size))
}

/// The switch state of a service, one `u32` so that a cut-over or a weight change is one
/// atomic map write: the active colour in bit 16, and in the low 16 bits the share of new flows
/// (basis points, `0..=BP_ALL`) that go to the other colour instead — the canary. Bits 17–18
/// remember the colour before the last switch (bit 18 set: there is one, bit 17: which), so a
/// rollback works from the pinned map alone; the data path ignores them.
#[inline(always)]
#[must_use]
pub const fn switch_state(active: u32, canary_bp: u32) -> u32 {
    ((active & 1) << 16) | (if canary_bp > BP_ALL { BP_ALL } else { canary_bp })
}

/// `state` with the colour before the last switch recorded.
#[inline(always)]
#[must_use]
pub const fn with_previous(state: u32, previous: Option<u32>) -> u32 {
    let state = state & !(0b11 << 17);
    match previous {
        Some(p) => state | (1 << 18) | ((p & 1) << 17),
        None => state,
    }
}

/// The colour before the last switch, if the state records one.
#[inline(always)]
#[must_use]
pub const fn state_previous(state: u32) -> Option<u32> {
    if state & (1 << 18) != 0 { Some((state >> 17) & 1) } else { None }
}

/// `state` with the drain flag set or cleared: while a service drains, a TCP packet that is
/// not a SYN and finds no flow goes to the previous colour (its connection most likely began
/// there, on this node or another) instead of the active one. Bit 19; needs a previous colour.
#[inline(always)]
#[must_use]
pub const fn with_draining(state: u32, draining: bool) -> u32 {
    if draining { state | (1 << 19) } else { state & !(1 << 19) }
}

/// The colour a TCP packet of no known flow is sent to while its service drains (see
/// [`with_draining`]): the previous colour, if the state is draining and records one.
#[inline(always)]
#[must_use]
pub const fn state_second_chance(state: u32) -> Option<u32> {
    if state & (1 << 19) != 0 { state_previous(state) } else { None }
}

/// The active colour of a switch state.
#[inline(always)]
#[must_use]
pub const fn state_active(state: u32) -> u32 {
    (state >> 16) & 1
}

/// The canary share (basis points) of a switch state.
#[inline(always)]
#[must_use]
pub const fn state_canary_bp(state: u32) -> u32 {
    let bp = state & 0xffff;
    if bp > BP_ALL { BP_ALL } else { bp }
}

/// The colour a new flow goes to: the idle colour for a preview key, else the active colour,
/// or the other one when the flow's canary hash falls under the canary share.
#[inline(always)]
#[must_use]
pub fn new_flow_colour(state: u32, preview: bool, canary_hash: u32) -> u32 {
    let active = state_active(state);
    if preview {
        return active ^ 1;
    }
    if canary_hash % BP_ALL < state_canary_bp(state) { active ^ 1 } else { active }
}

/// Key of `SERVICES`: where clients send traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub vip: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into `STATE`, and (with a colour) into the per-colour maps.
    pub id: u32,
    /// `SERVICE_PREVIEW`, `SERVICE_DSR`.
    pub flags: u32,
}
const _: () = assert!(size_of::<Service>() == 8);

/// Value of `BACKENDS`: one backend of a colour's pool.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Backend>() == 20);

impl Backend {
    #[inline(always)]
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.family != 0
    }
}

/// Value of `RING`: a run of Maglev slots, each the index of a backend in the pool (or
/// `RING_EMPTY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingChunk {
    pub slots: [u16; RING_CHUNK as usize],
}
const _: () = assert!(size_of::<RingChunk>() == 512);

/// Key of `FLOWS`: a packet's 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Value of `FLOWS`: the backend a client flow was given when it started.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub backend: Backend,
    pub service: u32,
    pub colour: u8,
    /// `FLOW_CLOSING`, `FLOW_RESET`, `FLOW_KNOWN`, `FLOW_DSR`.
    pub flags: u8,
    /// Index of the backend in its colour's pool when the flow started.
    pub backend_idx: u16,
    /// With `FLOW_PENDING`: when the SYN came, `syn_clock` of `bpf_ktime_get_ns` (units of
    /// 1,024 ns, wrapping every ~73 minutes); 0 otherwise.
    pub syn_time: u32,
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC_COARSE`) of the flow's last packet,
    /// refreshed at most once per `LAST_SEEN_GRANULARITY_NS`.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<Flow>() == 40);

/// A slot of `FLOWS`: a flow and its 5-tuple. An empty slot has `key.family == 0`; the data
/// path writes a slot's family last, so a slot being written is empty to its readers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSlot {
    pub key: FlowKey,
    pub flow: Flow,
}
const _: () = assert!(size_of::<FlowSlot>() == 80 && align_of::<FlowSlot>() == 8);

/// Value of `FLOWS`: one set of slots (see [`FLOW_WAYS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSet {
    pub slots: [FlowSlot; FLOW_WAYS as usize],
}
const _: () = assert!(size_of::<FlowSet>() == 320);

/// Key of `REVERSE`: where a backend's replies come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<BackendKey>() == 20);

/// A VIP and port a backend's replies are translated back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipPort {
    pub vip: [u8; 16],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<VipPort>() == 20);

/// Value of `REVERSE`: the first `count` entries of `to` are the (VIP, port) pairs a backend
/// serves; the data path looks the flow of the reversed tuple up for each, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reverse {
    pub count: u32,
    pub to: [VipPort; REVERSE_WAYS],
}
const _: () = assert!(size_of::<Reverse>() == 84);

/// Value of `COUNTERS`: traffic of one colour of one service, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ColourCounters {
    /// Client → backend packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
    /// Backend → client replies.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows this colour was given.
    pub flows: u64,
    /// Of those, TCP flows found mid-connection (not a SYN, no entry) while the service
    /// drained, and given to this, the previous, colour: connections moved here from another
    /// node, or whose entry was evicted.
    pub rescued: u64,
    /// TCP flows begun by a SYN (of `flows`). In NAT mode, a retransmitted SYN counts again.
    pub syns: u64,
    /// NAT: SYN-ACKs from the backend answering a flow's SYN (`FLOW_PENDING`): completed
    /// handshakes, as far as the backend goes.
    pub handshakes: u64,
    /// NAT: SYNs answered by an RST or an ICMP unreachable instead (of `backend_resets` and
    /// `icmp_unreachables`): refused connections.
    pub refused: u64,
    /// NAT: RSTs from a backend on a flow that was not closing yet.
    pub backend_resets: u64,
    /// NAT: ICMP/ICMPv6 destination unreachables from a backend about a live flow.
    pub icmp_unreachables: u64,
    /// DSR: SYNs on a 5-tuple whose flow is open (the client got no SYN-ACK in time).
    pub syn_retransmits: u64,
    /// RSTs from the client on a flow that was not closing yet (NAT and DSR).
    pub client_resets: u64,
    /// Open flows of this colour whose slot a new flow took: their set of `FLOW_WAYS` slots
    /// was full of flows that had not ended (the table is too small for the load).
    pub evicted: u64,
    /// NAT: SYN → SYN-ACK latency of `handshakes`, by bucket of `SYN_LATENCY_BOUNDS`
    /// (the last bucket: at or above the last bound).
    pub syn_latency: [u64; SYN_BUCKETS],
}
const _: () = assert!(size_of::<ColourCounters>() == 152);

/// Buckets of `ColourCounters::syn_latency`.
pub const SYN_BUCKETS: usize = 5;
/// Upper bounds (exclusive) of the first `SYN_BUCKETS - 1` latency buckets, in ns: 0.1, 1, 10
/// and 100 ms. Compared in `syn_clock` units (1,024 ns), so each bound is ~2 % coarse.
pub const SYN_LATENCY_BOUNDS_NS: [u64; SYN_BUCKETS - 1] = [100_000, 1_000_000, 10_000_000, 100_000_000];

/// A `bpf_ktime_get_ns` reading as `Flow::syn_time` stores it: units of 1,024 ns, the low 32
/// bits (wraps every ~73 minutes; differences are taken with wrapping arithmetic). Never 0, so
/// 0 can mean "no time".
#[inline(always)]
#[must_use]
pub const fn syn_clock(ktime_ns: u64) -> u32 {
    let t = (ktime_ns >> 10) as u32;
    if t == 0 { 1 } else { t }
}

/// SYNs (of NAT services) each CPU times in full per tick of the daemon's clock (`NOW`, about
/// a second) before it samples: reading the precise clock is most of a new flow's cost that
/// is not the flow table's.
pub const SYN_TIMED_PER_TICK: u32 = 64;
/// Past `SYN_TIMED_PER_TICK` in a tick, one SYN in this many is timed.
pub const SYN_SAMPLE_EVERY: u32 = 8;

/// Whether the `seen`-th SYN of a CPU in a tick (from 1) is timed. An untimed SYN still marks
/// its flow pending: its handshake or refusal is counted, only its latency is not.
#[inline(always)]
#[must_use]
pub const fn syn_timed(seen: u32) -> bool {
    seen <= SYN_TIMED_PER_TICK || seen.is_multiple_of(SYN_SAMPLE_EVERY)
}

/// The latency bucket of a SYN-ACK at `now` (a `syn_clock`) for a SYN at `syn`.
#[inline(always)]
#[must_use]
pub const fn syn_bucket(syn: u32, now: u32) -> usize {
    let d = now.wrapping_sub(syn) as u64;
    if d < SYN_LATENCY_BOUNDS_NS[0] >> 10 {
        0
    } else if d < SYN_LATENCY_BOUNDS_NS[1] >> 10 {
        1
    } else if d < SYN_LATENCY_BOUNDS_NS[2] >> 10 {
        2
    } else if d < SYN_LATENCY_BOUNDS_NS[3] >> 10 {
        3
    } else {
        4
    }
}

/// Load-time global: nanoseconds after which an idle UDP flow is forgotten.
pub const GLOBAL_UDP_IDLE_NS: &str = "UDP_IDLE_NS";
/// Global of the program: the number of sets of `FLOWS` minus one (they are a power of
/// two), set at load from the map's size.
pub const GLOBAL_FLOW_SET_MASK: &str = "FLOW_SET_MASK";
/// Default of [`GLOBAL_UDP_IDLE_NS`]: 30 s, like conntrack's unreplied UDP timeout.
pub const DEFAULT_UDP_IDLE_NS: u64 = 30_000_000_000;
/// A TCP flow that saw FIN or RST keeps its backend this long (for the closing handshake
/// and retransmissions), then is forgotten.
pub const TCP_CLOSING_NS: u64 = 10_000_000_000;
/// Load-time global: how rewritten NAT packets leave, one of `FORWARD_*`.
pub const GLOBAL_FORWARD_MODE: &str = "FORWARD_MODE";
/// Pass every rewritten packet to the kernel's stack to route (works on any interface).
pub const FORWARD_KERNEL: u32 = 0;
/// Redirect straight out of the egress interface when the FIB has a complete answer.
pub const FORWARD_REDIRECT: u32 = 1;
/// How stale `Flow::last_seen_ns` may get before a packet refreshes it (saves map writes).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Seeds of the two flow hashes: one picks the Maglev slot, the other the canary split, so the
/// two choices are independent. Fixed, so every node computes the same.
pub const SEED_RING: u32 = 0x5eed_0001;
pub const SEED_CANARY: u32 = 0x5eed_0002;
pub const SEED_FLOW_SET: u64 = 0x5eed_0003;

/// Why the data path returned what it returned; the index into `STATS`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    /// Not IP (ARP, LLDP, other ethertypes): passed.
    pub const NOT_IP: Reason = Reason(0);
    /// More VLAN tags than parsed (two are): passed.
    pub const VLAN: Reason = Reason(1);
    /// A header is cut short or malformed: passed.
    pub const MALFORMED: Reason = Reason(2);
    /// IPv4 fragment or IPv6 fragment header: passed.
    pub const FRAGMENT: Reason = Reason(3);
    /// Neither TCP, UDP, nor an ICMP error about a tracked flow: passed.
    pub const OTHER_L4: Reason = Reason(4);
    /// Not for a service and not a reply of a tracked flow: passed.
    pub const NO_MATCH: Reason = Reason(5);
    /// The chosen colour has no backend: passed.
    pub const NO_BACKEND: Reason = Reason(6);
    /// TTL / hop limit would expire here: passed so the kernel answers with ICMP.
    pub const TTL: Reason = Reason(7);
    /// Service packet rewritten and redirected to the backend's interface.
    pub const FWD_REDIRECT: Reason = Reason(8);
    /// Service packet rewritten and passed to the kernel to route.
    pub const FWD_KERNEL: Reason = Reason(9);
    /// Reply rewritten to come from the VIP and redirected to the client's interface.
    pub const REPLY_REDIRECT: Reason = Reason(10);
    /// Reply rewritten and passed to the kernel to route.
    pub const REPLY_KERNEL: Reason = Reason(11);
    /// A map that must hold the slot did not (an invariant broke): passed.
    pub const INTERNAL: Reason = Reason(12);
    /// DSR: MAC rewritten, frame sent to the backend.
    pub const DSR: Reason = Reason(13);
    /// DSR: no complete FIB answer (route or neighbour) for the backend: dropped, because the
    /// kernel would route the VIP elsewhere. The daemon keeps DSR neighbours resolved.
    pub const DSR_NO_NEIGH: Reason = Reason(14);
    /// ICMP error about a tracked flow, translated and sent to the flow's backend.
    pub const ICMP_FWD: Reason = Reason(15);
    /// ICMP error from a backend about a tracked flow, translated and sent to the client.
    pub const ICMP_REPLY: Reason = Reason(16);
    /// The drain timeout reset the flow: the packet was turned into a TCP RST to the client.
    pub const RESET: Reason = Reason(17);
    /// IPv6 extension-header chain longer than parsed: passed.
    pub const IPV6_EXT: Reason = Reason(18);
    /// From a backend's address and port, but the flow of the reversed tuple is not live (none,
    /// expired, closed, or given another backend): a direct connection, passed untouched.
    pub const NOT_LIVE: Reason = Reason(19);
    /// A datagram of a shadowed flow: rewritten to its backend and passed to the kernel with
    /// metadata, so that the `shadow` TC program copies it to the idle colour (see `shadow`).
    pub const SHADOW_FWD: Reason = Reason(20);
    /// A reply from the idle colour to a shadowed flow's copy: dropped, it never reaches the
    /// client.
    pub const SHADOW_REPLY: Reason = Reason(21);

    /// Number of slots in `STATS`.
    pub const COUNT: u32 = 32;

    /// Stable names, indexed by the reason's value.
    pub const NAMES: [&'static str; 22] = [
        "not_ip",
        "vlan",
        "malformed",
        "fragment",
        "other_l4",
        "no_match",
        "no_backend",
        "ttl",
        "fwd_redirect",
        "fwd_kernel",
        "reply_redirect",
        "reply_kernel",
        "internal",
        "dsr",
        "dsr_no_neigh",
        "icmp_fwd",
        "icmp_reply",
        "reset",
        "ipv6_ext",
        "not_live",
        "shadow_fwd",
        "shadow_reply",
    ];
}

/// TCP flag bits in the 14th byte of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a packet starts a new flow, so that a colour must be chosen afresh even when a stale
/// entry for the same 5-tuple is still in `FLOWS`: a TCP SYN without ACK does.
#[inline(always)]
#[must_use]
pub fn starts_flow(proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a packet ends its flow: a TCP FIN or RST.
#[inline(always)]
#[must_use]
pub fn ends_flow(proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Whether a tracked flow is over: UDP flows after `udp_idle_ns` without packets, closing TCP
/// flows `TCP_CLOSING_NS` after their last packet. Other TCP flows end by a SYN on their
/// 5-tuple or by giving their slot to a new flow (see `FLOW_WAYS`).
#[inline(always)]
#[must_use]
pub fn flow_expired(proto: u8, flags: u8, now_ns: u64, last_seen_ns: u64, udp_idle_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(last_seen_ns);
    if proto == PROTO_UDP { idle > udp_idle_ns } else { flags & FLOW_CLOSING != 0 && idle > TCP_CLOSING_NS }
}

/// Whether a backend's packet belongs to the live flow found on its reversed tuple (whose
/// backend it came from): not when the flow has expired, and not when it is a TCP SYN-ACK for
/// a flow that already saw FIN or RST — that is a new connection on the same tuple (a client
/// talking to the backend directly from a port it used for the VIP moments ago).
#[inline(always)]
#[must_use]
pub fn reply_belongs(
    proto: u8,
    tcp_flags: u8,
    flow_flags: u8,
    now_ns: u64,
    last_seen_ns: u64,
    udp_idle_ns: u64,
) -> bool {
    if flow_expired(proto, flow_flags, now_ns, last_seen_ns, udp_idle_ns) {
        return false;
    }
    !(proto == PROTO_TCP && flow_flags & FLOW_CLOSING != 0 && tcp_flags & TCP_SYN != 0)
}

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// The set of `FLOWS` a 5-tuple lives in, from its key read as five native-endian 64-bit
/// words (`word(i)`, bytes `8i..8i+8`): a multiply-xorshift mix with its own seed, so a set
/// says nothing of the Maglev slot. The set is `hash & (sets - 1)`.
#[inline(always)]
#[must_use]
pub fn flow_set_hash(word: impl Fn(usize) -> u64) -> u32 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = SEED_FLOW_SET;
    let mut i = 0;
    while i < size_of::<FlowKey>() / 8 {
        h = (h ^ word(i)).wrapping_mul(K);
        h ^= h >> 32;
        i += 1;
    }
    h = h.wrapping_mul(K);
    (h >> 32) as u32
}

/// A 32-bit hash of a flow's 5-tuple (murmur3's mixing): `SEED_RING` picks the Maglev slot,
/// `SEED_CANARY` the canary split.
#[inline(always)]
#[must_use]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let w = |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut h = seed;
    h = mix(h, w(&key.src, 0));
    h = mix(h, w(&key.src, 4));
    h = mix(h, w(&key.src, 8));
    h = mix(h, w(&key.src, 12));
    h = mix(h, w(&key.dst, 0));
    h = mix(h, w(&key.dst, 4));
    h = mix(h, w(&key.dst, 8));
    h = mix(h, w(&key.dst, 12));
    h = mix(h, u32::from_ne_bytes([key.sport[0], key.sport[1], key.dport[0], key.dport[1]]));
    h = mix(h, u32::from(key.proto) | (u32::from(key.family) << 8));
    // fmix32
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_table_has_twice_the_slots_of_max_flows_rounded_up() {
        assert_eq!((flow_capacity(MAX_FLOWS), flow_sets(MAX_FLOWS)), (MAX_FLOWS, MAX_FLOWS * 2 / FLOW_WAYS));
        assert_eq!((flow_capacity(1_000), flow_sets(1_000)), (1_024, 512));
        assert_eq!((flow_capacity(1), flow_sets(16)), (16, 8));
        assert_eq!(flow_sets(16_777_216) * FLOW_WAYS, 33_554_432);
    }

    #[test]
    fn flow_sets_spread_evenly() {
        // 64 sets, 64 × 64 keys that differ only in the client port: every set is used, and
        // none holds more than twice its share.
        let mut per_set = [0u32; 64];
        for port in 0..4096u16 {
            // A `FlowKey`'s bytes: source port at 32, protocol at 36, family at 37.
            let mut bytes = [0u8; 40];
            bytes[32..34].copy_from_slice(&port.to_be_bytes());
            (bytes[36], bytes[37]) = (6, 2);
            let h = flow_set_hash(|i| u64::from_ne_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap_or([0; 8])));
            per_set[(h & 63) as usize] += 1;
        }
        assert!(per_set.iter().all(|&n| n > 0 && n <= 128), "{per_set:?}");
    }

    #[test]
    fn syns_are_all_timed_up_to_the_tick_budget_then_one_in_eight() {
        let timed = |from: u32, to: u32| (from..=to).filter(|&n| syn_timed(n)).count();
        assert_eq!(timed(1, SYN_TIMED_PER_TICK), SYN_TIMED_PER_TICK as usize);
        assert_eq!(timed(SYN_TIMED_PER_TICK + 1, SYN_TIMED_PER_TICK + 800), 100);
        assert!(syn_timed(u32::MAX - 7) && !syn_timed(u32::MAX));
    }

    #[test]
    fn syn_latency_buckets_are_log_scale_and_survive_the_wrap() {
        let at = |ns: u64| syn_clock(ns);
        let t0 = 5_000_000_000u64;
        assert_eq!(syn_bucket(at(t0), at(t0 + 50_000)), 0, "50 µs");
        assert_eq!(syn_bucket(at(t0), at(t0 + 500_000)), 1, "0.5 ms");
        assert_eq!(syn_bucket(at(t0), at(t0 + 5_000_000)), 2, "5 ms");
        assert_eq!(syn_bucket(at(t0), at(t0 + 50_000_000)), 3, "50 ms");
        assert_eq!(syn_bucket(at(t0), at(t0 + 3_000_000_000)), 4, "3 s");
        // Across the 32-bit wrap of the clock (every ~73 minutes).
        let wrap = (1u64 << 42) - 20_000;
        assert_eq!(syn_bucket(at(wrap), at(wrap + 60_000)), 0);
        assert_ne!(syn_clock(0), 0, "0 means no time");
    }

    #[test]
    fn syn_starts_a_flow_and_fin_or_rst_ends_it() {
        assert!(starts_flow(PROTO_TCP, TCP_SYN));
        assert!(!starts_flow(PROTO_TCP, TCP_SYN | TCP_ACK));
        assert!(!starts_flow(PROTO_TCP, TCP_ACK));
        assert!(!starts_flow(PROTO_UDP, TCP_SYN));
        assert!(ends_flow(PROTO_TCP, TCP_FIN | TCP_ACK));
        assert!(ends_flow(PROTO_TCP, TCP_RST));
        assert!(!ends_flow(PROTO_TCP, TCP_ACK));
        assert!(!ends_flow(PROTO_UDP, TCP_FIN));
    }

    #[test]
    fn flows_expire_as_documented() {
        let idle = DEFAULT_UDP_IDLE_NS;
        assert!(!flow_expired(PROTO_UDP, 0, 10 + idle, 10, idle));
        assert!(flow_expired(PROTO_UDP, 0, 11 + idle, 10, idle));
        assert!(!flow_expired(PROTO_TCP, 0, u64::MAX, 0, idle), "open TCP flows end by SYN or eviction");
        assert!(!flow_expired(PROTO_TCP, FLOW_CLOSING, TCP_CLOSING_NS, 0, idle));
        assert!(flow_expired(PROTO_TCP, FLOW_CLOSING, TCP_CLOSING_NS + 1, 0, idle));
        assert!(!flow_expired(PROTO_UDP, 0, 5, 10, idle), "a clock behind the stamp is not expiry");
    }

    #[test]
    fn a_reply_belongs_only_to_a_live_flow() {
        let idle = DEFAULT_UDP_IDLE_NS;
        assert!(reply_belongs(PROTO_TCP, TCP_SYN | TCP_ACK, 0, 5, 0, idle), "the flow's own SYN-ACK");
        assert!(reply_belongs(PROTO_TCP, TCP_FIN | TCP_ACK, FLOW_CLOSING, 5, 0, idle), "its closing handshake");
        assert!(!reply_belongs(PROTO_TCP, TCP_SYN | TCP_ACK, FLOW_CLOSING, 5, 0, idle), "a new connection");
        assert!(!reply_belongs(PROTO_TCP, TCP_ACK, FLOW_CLOSING, TCP_CLOSING_NS + 1, 0, idle), "closed and gone");
        assert!(reply_belongs(PROTO_UDP, 0, 0, idle, 0, idle));
        assert!(!reply_belongs(PROTO_UDP, 0, 0, idle + 1, 0, idle), "idle UDP flow");
    }

    #[test]
    fn draining_sends_unknown_tcp_to_the_previous_colour() {
        let s = with_previous(switch_state(COLOUR_GREEN, 0), Some(COLOUR_BLUE));
        assert_eq!(state_second_chance(s), None, "not draining");
        let d = with_draining(s, true);
        assert_eq!(state_second_chance(d), Some(COLOUR_BLUE));
        assert_eq!((state_active(d), state_canary_bp(d), state_previous(d)), (COLOUR_GREEN, 0, Some(COLOUR_BLUE)));
        assert_eq!(with_draining(d, false), s);
        assert_eq!(state_second_chance(with_draining(switch_state(COLOUR_GREEN, 0), true)), None, "no previous");
    }

    #[test]
    fn switch_state_round_trips_and_clamps() {
        let s = switch_state(COLOUR_GREEN, 500);
        assert_eq!((state_active(s), state_canary_bp(s)), (COLOUR_GREEN, 500));
        assert_eq!(state_canary_bp(switch_state(COLOUR_BLUE, 20_000)), BP_ALL);
        assert_eq!(state_canary_bp(0xffff), BP_ALL, "a corrupt value is clamped");
    }

    #[test]
    fn the_previous_colour_rides_along_without_changing_the_data_path() {
        let s = with_previous(switch_state(COLOUR_GREEN, 250), Some(COLOUR_BLUE));
        assert_eq!((state_active(s), state_canary_bp(s), state_previous(s)), (COLOUR_GREEN, 250, Some(COLOUR_BLUE)));
        let s = with_previous(s, Some(COLOUR_GREEN));
        assert_eq!(state_previous(s), Some(COLOUR_GREEN));
        assert_eq!(state_previous(switch_state(COLOUR_BLUE, 0)), None);
        assert_eq!(with_previous(s, None), switch_state(COLOUR_GREEN, 250));
    }

    #[test]
    fn canary_zero_and_full_are_exact() {
        for h in [0, 1, 9_999, 10_000, u32::MAX] {
            assert_eq!(new_flow_colour(switch_state(COLOUR_BLUE, 0), false, h), COLOUR_BLUE);
            assert_eq!(new_flow_colour(switch_state(COLOUR_BLUE, BP_ALL), false, h), COLOUR_GREEN);
            assert_eq!(new_flow_colour(switch_state(COLOUR_GREEN, 0), true, h), COLOUR_BLUE, "preview goes to idle");
        }
    }

    #[test]
    fn canary_share_follows_the_weight() {
        let state = switch_state(COLOUR_BLUE, 1_000);
        let mut green = 0;
        for i in 0..100_000u32 {
            let key = FlowKey {
                src: [192, 0, 2, (i % 250) as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                sport: ((i / 250) as u16 + 1024).to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                ..FlowKey::default()
            };
            if new_flow_colour(state, false, flow_hash(&key, SEED_CANARY)) == COLOUR_GREEN {
                green += 1;
            }
        }
        assert!((9_500..=10_500).contains(&green), "10 % of 100k flows, got {green}");
    }

    #[test]
    fn the_two_hashes_are_independent() {
        let key =
            FlowKey { src: [1; 16], dst: [2; 16], sport: [0, 1], dport: [0, 80], proto: 6, family: 6, _pad: [0; 2] };
        assert_ne!(flow_hash(&key, SEED_RING), flow_hash(&key, SEED_CANARY));
        let mut other = key;
        other.sport = [0, 2];
        assert_ne!(flow_hash(&key, SEED_RING), flow_hash(&other, SEED_RING));
    }

    #[test]
    fn slots_do_not_overlap() {
        assert_eq!(colour_slot(0, COLOUR_GREEN), 1);
        assert_eq!(pool_slot(0, COLOUR_GREEN, 0), MAX_POOL);
        assert_eq!(pool_slot(MAX_SERVICES - 1, COLOUR_GREEN, MAX_POOL - 1), MAX_SERVICES * COLOURS * MAX_POOL - 1);
    }

    #[test]
    fn ring_sizes_are_primes_that_fill_their_elements() {
        for (c, &m) in RING_SIZES.iter().enumerate() {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m} is prime");
            assert!(m <= RING_CHUNK << c && m > RING_CHUNK << c >> 1, "{m} fits {} elements", 1 << c);
            assert!(m < u32::from(u16::MAX), "slot indices fit a u16");
        }
    }

    #[test]
    fn ring_classes_give_every_backend_its_slots() {
        assert_eq!(ring_class(0), 0);
        assert_eq!(ring_class(1), 0);
        assert_eq!(ring_class(2), 1);
        assert_eq!(ring_class(MAX_POOL), 6);
        assert_eq!(ring_class(10_000), 8, "big pools get the largest table");
        for n in 1..=MAX_POOL {
            assert!(RING_SIZES[ring_class(n) as usize] >= n * RING_SLOTS_PER_BACKEND, "{n} backends");
        }
    }

    #[test]
    fn ring_live_values_round_trip() {
        for c in 0..RING_SIZES.len() as u32 {
            for offset in [0, 1, 4_096, RING_OFFSET_MASK] {
                assert_eq!(ring_table(ring_live(c, offset)), Some((offset, RING_SIZES[c as usize])));
            }
        }
        assert_eq!(ring_table(RING_NONE), None);
        assert_eq!(ring_table(0), None, "a new map's zeros are no table");
        assert_eq!(ring_table(u32::MAX), None);
    }

    #[test]
    fn every_reason_has_a_name() {
        assert_eq!(Reason::NAMES.len(), Reason::SHADOW_REPLY.0 as usize + 1);
        assert!(Reason::NAMES.len() <= Reason::COUNT as usize);
    }
}

// Shadow traffic (issue #16): a share of a UDP service's new flows is also copied to the idle
// colour by the `shadow` TC program; the idle colour's replies are dropped and counted.

/// The TC (clsact ingress) program that copies shadowed datagrams to the idle colour.
pub const SHADOW_PROG: &str = "shadow";

/// service id → `ShadowConfig` (share, ceiling). Written by the daemon.
pub const MAP_SHADOW: &str = "SHADOW";
/// client → VIP 5-tuple of a shadowed flow → `ShadowFlow`. Written by the data path.
pub const MAP_SHADOW_FLOWS: &str = "SHADOW_FLOWS";
/// idle backend → client 5-tuple (the copy's replies) → the shadowed flow's `FlowKey`.
pub const MAP_SHADOW_REPLY: &str = "SHADOW_REPLY";
/// per CPU, `colour_slot(service, colour)` → `ShadowCounters`. Written by the data path.
pub const MAP_SHADOW_COUNTERS: &str = "SHADOW_COUNTERS";
/// service id → `ShadowBucket`: the copies' token bucket. Written by the data path.
pub const MAP_SHADOW_BUCKET: &str = "SHADOW_BUCKET";

/// Per-CPU working space of the shadow code (`SCRATCH`'s counterpart).
pub const MAP_SHADOW_SCRATCH: &str = "SHADOW_SCRATCH";

/// Seed of the flow hash that picks the shadowed share: independent of the ring and canary
/// hashes, so the shadowed flows are spread evenly over both.
pub const SEED_SHADOW: u32 = 0x5eed_0003;
/// Entries of `SHADOW_FLOWS` and `SHADOW_REPLY` (LRU): shadowed flows tracked at once.
pub const SHADOW_MAX_FLOWS: u32 = 65_536;
/// Copies per second per service when the config does not say.
pub const DEFAULT_SHADOW_CEILING: u32 = 10_000;
/// First word of `ShadowMeta`, so the TC program never mistakes other metadata for ours.
pub const SHADOW_META_MAGIC: u32 = 0x5348_4457;

/// Value of `SHADOW`: the share of new flows copied to the idle colour, in basis points (0:
/// off), and the ceiling on copies per second.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowConfig {
    pub share_bp: u32,
    pub ceiling: u32,
}
const _: () = assert!(size_of::<ShadowConfig>() == 8);

/// Value of `SHADOW_FLOWS`: where a shadowed flow's copies go and when its last request and
/// copy left (for the reply latency of each colour).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowFlow {
    /// The idle colour's backend for this flow (the Maglev choice a real flow would get).
    pub backend: Backend,
    pub service: u32,
    /// The flow's (live) colour and the colour its copies go to.
    pub live: u8,
    pub idle: u8,
    pub _pad: [u8; 6],
    /// `bpf_ktime_get_ns` of the last request not yet answered by each colour (0: answered).
    pub live_sent_ns: u64,
    pub idle_sent_ns: u64,
    /// `bpf_ktime_get_ns` of the flow's last datagram: idle replies older than the UDP idle
    /// timeout are not the flow's.
    pub last_ns: u64,
}
const _: () = assert!(size_of::<ShadowFlow>() == 56);

/// Value of `SHADOW_BUCKET`: tokens in billionths of a copy, refilled at `ceiling` per second
/// up to one second's worth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowBucket {
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<ShadowBucket>() == 16);

/// Value of `SHADOW_COUNTERS`: shadow traffic of one colour of one service, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowCounters {
    /// Datagrams of shadowed flows this colour served (the live side).
    pub shadowed: u64,
    /// Copies sent to this colour (the idle side).
    pub sent: u64,
    /// Copies not made: over the ceiling.
    pub ceiling: u64,
    /// Copies that could not be made or sent (no backend, no route or neighbour, metadata or
    /// redirect refused).
    pub failed: u64,
    /// Replies of this colour to copies, dropped.
    pub replies: u64,
    /// Reply latency of this colour on shadowed flows: sum (ns) and count.
    pub latency_ns: u64,
    pub latency_count: u64,
}
const _: () = assert!(size_of::<ShadowCounters>() == 56);

/// The metadata the XDP program leaves in front of a shadowed datagram for the TC program:
/// where the headers are and which backend gets the copy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowMeta {
    pub magic: u32,
    pub service: u16,
    /// The colour the copy goes to.
    pub colour: u8,
    /// 1: IPv6.
    pub v6: u8,
    /// Offsets of the IP and UDP headers from the start of the frame.
    pub l3: u16,
    pub l4: u16,
    pub backend: Backend,
}
const _: () = assert!(size_of::<ShadowMeta>() == 32);

/// Whether a flow (by its `SEED_SHADOW` hash) is in the shadowed share.
#[inline(always)]
#[must_use]
pub const fn shadow_chosen(shadow_hash: u32, share_bp: u32) -> bool {
    shadow_hash % BP_ALL < share_bp
}

/// The token bucket: refills `bucket` for `now_ns` at `ceiling` per second (at most one
/// second's worth) and takes one token. `false`: over the ceiling, no copy.
#[inline(always)]
#[must_use]
pub fn shadow_take(bucket: &mut ShadowBucket, ceiling: u32, now_ns: u64) -> bool {
    const SECOND: u64 = 1_000_000_000;
    let full = u64::from(ceiling) * SECOND;
    let elapsed = now_ns.saturating_sub(bucket.last_ns).min(SECOND);
    bucket.last_ns = now_ns;
    let tokens = (bucket.tokens + elapsed * u64::from(ceiling)).min(full);
    if tokens < SECOND {
        bucket.tokens = tokens;
        return false;
    }
    bucket.tokens = tokens - SECOND;
    true
}

#[cfg(test)]
mod shadow_tests {
    use super::*;

    #[test]
    fn the_bucket_holds_the_ceiling() {
        let mut b = ShadowBucket::default();
        let second = 1_000_000_000;
        // A fresh bucket fills within a second; then exactly `ceiling` copies per second pass.
        let mut passed = 0;
        for i in 0..3_000u64 {
            if shadow_take(&mut b, 100, second + i * (second / 1_000)) {
                passed += 1;
            }
        }
        // One second's burst (100) plus 100 per second over the 3 s.
        assert!((300..=400).contains(&passed), "{passed}");
        let mut off = ShadowBucket::default();
        assert!(!shadow_take(&mut off, 0, second), "a ceiling of 0 passes nothing");
    }

    #[test]
    fn the_share_is_a_fraction_of_the_hash() {
        assert!(!shadow_chosen(0, 0));
        assert!(shadow_chosen(9_999, BP_ALL));
        assert!(shadow_chosen(10_000, 1) && !shadow_chosen(10_001, 1));
    }
}
