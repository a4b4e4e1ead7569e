//! The contract between the switcher XDP program and user space.
//!
//! Everything here is part of the ABI of the pinned maps: the types are `#[repr(C)]`, hold only
//! fixed-width integers and byte arrays, have explicit padding and a size asserted at compile
//! time. Addresses and ports are stored as the raw bytes found on the wire (network byte order),
//! so neither side ever has to guess an endianness. Any layout change bumps [`ABI_VERSION`].
//!
//! Pure decision logic and checksum arithmetic live here too, as `no_std` functions that the
//! eBPF program calls and host unit tests cover without root.
#![no_std]

pub mod csum;
#[cfg(feature = "user")]
pub mod user;

use core::mem::size_of;

/// Bumped on any change to a map's layout, key/value type or meaning.
pub const ABI_VERSION: u32 = 1;

/// Name of the XDP program in the object file.
pub const PROG_NAME: &str = "switcher";

/// `ServiceKey` → `Service`; written by the daemon when it applies the config.
pub const MAP_SERVICES: &str = "SERVICES";
/// `u32` slot `service * 2 + colour` → `Backend`; written by the daemon.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// `u32` service id → `u32` active colour; the one map a cut-over writes.
pub const MAP_ACTIVE: &str = "ACTIVE";
/// `FlowKey` (client → VIP) → `Flow`; written by the data path on a flow's first packet.
pub const MAP_FLOWS: &str = "FLOWS";
/// `FlowKey` (backend → client) → `Reply`; written by the data path next to `FLOWS`.
pub const MAP_REPLIES: &str = "REPLIES";
/// per-CPU, `u32` slot `service * 2 + colour` → `ColourCounters`; written by the data path.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// per-CPU, `u32` reason → `u64` packets; written by the data path on every exit.
pub const MAP_STATS: &str = "STATS";
/// `u32` 0 → `u32` ABI version; written by the daemon at load.
pub const MAP_META: &str = "META";

/// Every map name, for the object-file test and for pinning.
pub const MAP_NAMES: [&str; 8] =
    [MAP_SERVICES, MAP_BACKENDS, MAP_ACTIVE, MAP_FLOWS, MAP_REPLIES, MAP_COUNTERS, MAP_STATS, MAP_META];

/// Capacity of `SERVICES` and `ACTIVE`; service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 1024;
/// Capacity of `FLOWS` and of `REPLIES` (LRU: the least recently used flow is evicted).
pub const MAX_FLOWS: u32 = 262_144;

/// Colour values as stored in `ACTIVE` and `Flow::colour`.
pub const COLOUR_BLUE: u32 = 0;
pub const COLOUR_GREEN: u32 = 1;
/// Number of colours; slot arithmetic is `service * COLOURS + colour`.
pub const COLOURS: u32 = 2;

/// IP protocol numbers of the services switcher handles.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Index into `BACKENDS` and `COUNTERS` for a service's colour.
#[inline(always)]
#[must_use]
pub const fn colour_slot(service: u32, colour: u32) -> u32 {
    service * COLOURS + (colour & 1)
}

/// Key of `SERVICES`: where clients send traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub vip: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 8);

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into `ACTIVE`, and (with a colour) into `BACKENDS` and `COUNTERS`.
    pub id: u32,
    /// Reserved, zero.
    pub flags: u32,
}
const _: () = assert!(size_of::<Service>() == 8);

/// Value of `BACKENDS`: where one colour of a service is served. An all-zero address means
/// "no backend": such packets pass untouched and are counted as `NO_BACKEND`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Backend>() == 8);

impl Backend {
    #[inline(always)]
    #[must_use]
    pub fn is_set(&self) -> bool {
        u32::from_ne_bytes(self.addr) != 0
    }
}

/// Key of `FLOWS` and `REPLIES`: a packet's 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 16);

/// Value of `FLOWS`: the backend a client flow was given when it started.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub backend: Backend,
    pub service: u32,
    pub colour: u32,
    /// `bpf_ktime_get_coarse_ns` of the flow's last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<Flow>() == 24);

/// Load-time global of the program: nanoseconds after which an idle UDP flow is forgotten,
/// so the next datagram of its 5-tuple is a new flow on the active colour.
pub const GLOBAL_UDP_IDLE_NS: &str = "UDP_IDLE_NS";
/// Default of [`GLOBAL_UDP_IDLE_NS`]: 30 s, like conntrack's unreplied UDP timeout.
pub const DEFAULT_UDP_IDLE_NS: u64 = 30_000_000_000;
/// Load-time global of the program: how rewritten packets leave, one of `FORWARD_*`.
pub const GLOBAL_FORWARD_MODE: &str = "FORWARD_MODE";
/// Pass every rewritten packet to the kernel's stack to route (works on any interface).
pub const FORWARD_KERNEL: u32 = 0;
/// Redirect straight out of the egress interface when the FIB has a complete answer.
pub const FORWARD_REDIRECT: u32 = 1;

/// How stale `Flow::last_seen_ns` may get before a packet refreshes it (saves map writes).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Value of `REPLIES`: what a backend's reply must look like to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reply {
    pub vip: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub service: u32,
    pub colour: u32,
}
const _: () = assert!(size_of::<Reply>() == 16);

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
}
const _: () = assert!(size_of::<ColourCounters>() == 40);

/// Why the data path returned what it returned; the index into `STATS`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    /// Not IPv4 (ARP, IPv6, other ethertypes): passed.
    pub const NOT_IPV4: Reason = Reason(0);
    /// VLAN-tagged frame: passed (not parsed in this version).
    pub const VLAN: Reason = Reason(1);
    /// A header is cut short or malformed: passed.
    pub const MALFORMED: Reason = Reason(2);
    /// IPv4 fragment: passed (ports are only in the first fragment).
    pub const FRAGMENT: Reason = Reason(3);
    /// Neither TCP nor UDP: passed.
    pub const OTHER_L4: Reason = Reason(4);
    /// Not for a service and not a reply of a tracked flow: passed.
    pub const NO_MATCH: Reason = Reason(5);
    /// The active colour has no backend: passed.
    pub const NO_BACKEND: Reason = Reason(6);
    /// TTL would expire here: passed so the kernel answers with ICMP.
    pub const TTL: Reason = Reason(7);
    /// Service packet rewritten and redirected to the backend's interface.
    pub const FWD_REDIRECT: Reason = Reason(8);
    /// Service packet rewritten and passed to the kernel to route (no neighbour yet).
    pub const FWD_KERNEL: Reason = Reason(9);
    /// Reply rewritten to come from the VIP and redirected to the client's interface.
    pub const REPLY_REDIRECT: Reason = Reason(10);
    /// Reply rewritten and passed to the kernel to route.
    pub const REPLY_KERNEL: Reason = Reason(11);
    /// A map that must hold the slot did not (an invariant broke): passed.
    pub const INTERNAL: Reason = Reason(12);

    /// Number of slots in `STATS`.
    pub const COUNT: u32 = 16;

    /// Stable names, indexed by the reason's value.
    pub const NAMES: [&'static str; 13] = [
        "not_ipv4",
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
    ];
}

/// TCP flag bits in the 14th byte of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a packet starts a new flow, so that the active colour must be chosen afresh even
/// when a stale entry for the same 5-tuple is still in `FLOWS`: a TCP SYN without ACK does.
/// Other packets keep the flow where it is, or start one if the table has none.
#[inline(always)]
#[must_use]
pub fn starts_flow(proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a tracked flow is over: UDP flows end after `udp_idle_ns` without packets; TCP
/// flows end when a SYN starts a new one (see [`starts_flow`]) or when the LRU evicts them.
#[inline(always)]
#[must_use]
pub fn flow_expired(proto: u8, now_ns: u64, last_seen_ns: u64, udp_idle_ns: u64) -> bool {
    proto == PROTO_UDP && now_ns.saturating_sub(last_seen_ns) > udp_idle_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_starts_a_flow_and_synack_does_not() {
        assert!(starts_flow(PROTO_TCP, TCP_SYN));
        assert!(!starts_flow(PROTO_TCP, TCP_SYN | TCP_ACK));
        assert!(!starts_flow(PROTO_TCP, TCP_ACK));
        assert!(!starts_flow(PROTO_UDP, TCP_SYN));
    }

    #[test]
    fn only_idle_udp_flows_expire() {
        let idle = DEFAULT_UDP_IDLE_NS;
        assert!(!flow_expired(PROTO_UDP, 10 + idle, 10, idle));
        assert!(flow_expired(PROTO_UDP, 11 + idle, 10, idle));
        assert!(!flow_expired(PROTO_TCP, u64::MAX, 0, idle), "TCP flows end by SYN or eviction");
        assert!(!flow_expired(PROTO_UDP, 5, 10, idle), "a clock behind the stamp is not expiry");
    }

    #[test]
    fn slots_do_not_overlap() {
        assert_eq!(colour_slot(0, COLOUR_BLUE), 0);
        assert_eq!(colour_slot(0, COLOUR_GREEN), 1);
        assert_eq!(colour_slot(1, COLOUR_BLUE), 2);
        assert_eq!(colour_slot(MAX_SERVICES - 1, COLOUR_GREEN), MAX_SERVICES * COLOURS - 1);
    }

    #[test]
    fn every_reason_has_a_name() {
        assert_eq!(Reason::NAMES.len(), Reason::INTERNAL.0 as usize + 1);
        assert!(Reason::NAMES.len() <= Reason::COUNT as usize);
    }
}
