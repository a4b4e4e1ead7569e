//! Which backend a service packet goes to, the flow table that keeps it there, and which of a
//! backend's packets are replies of a live flow.
//!
//! A packet of a tracked flow (in `FLOWS`, not expired) goes where the flow went first. A new
//! flow — a TCP SYN, or any packet the table does not know, e.g. after eviction — takes the
//! colour `new_flow_colour` picks (active, canary or, on a preview port, idle) and that
//! colour's backend from its live Maglev table (sized to the pool), slot `flow_hash % size`: the same
//! 5-tuple always hashes to the same backend while the pool is unchanged. While a service
//! drains, a TCP packet that is not a SYN and finds no flow is a connection that began before
//! the switch (moved here from another node, or evicted): it goes to the previous colour.
//!
//! A packet from a backend is translated back to the VIP only when the flow on its reversed
//! tuple — one per (VIP, port) the daemon lists for that backend in `REVERSE` — is live and
//! was given that backend. There is no per-flow reply entry: a flow that ended takes its
//! replies with it, and a client's direct connection to a backend is never touched.
//!
//! Clocks (see `clock`): an open TCP flow's packets read no clock; they are stamped with the
//! daemon's `NOW` (refreshed about once a second). UDP packets and TCP FIN/RST read the
//! coarse clock, since they decide expiry, through this CPU's cache of it (one helper call
//! per tick, not per packet). Keys and values are built in the per-CPU `Scratch`, not on the
//! stack.
//!
//! Signals (`ColourCounters`, per service colour), for rollouts to judge: in NAT mode a SYN
//! marks its new flow `FLOW_PENDING`, with the time (`bpf_ktime_get_ns`, the one clock read of
//! a new flow beyond the stamp) if it is timed — each CPU times all its SYNs up to
//! `SYN_TIMED_PER_TICK` per tick of the daemon's clock, then a sample (`syn_timed`), as the
//! clock costs ~45 ns — and the backend's first answer clears it: a SYN-ACK counts a
//! handshake and, for a timed SYN, its latency bucket (a second clock read), an RST or an
//! ICMP unreachable (`icmp.rs`) a refusal. RSTs are counted by side on flows not yet closing (backend resets,
//! client resets); in DSR mode a SYN on a 5-tuple whose flow is open is a retransmission, the
//! one extra `FLOWS` lookup, made for DSR services' SYNs only. Established packets pay one
//! flag test on replies and nothing else: no clock, no lookup.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use switcher_common::{
    FLOW_CLOSING, FLOW_DIRECT, FLOW_DSR, FLOW_KNOWN, FLOW_PENDING, FLOW_RESET, Flow, FlowKey, LAST_SEEN_GRANULARITY_NS,
    MAX_POOL, PROTO_TCP, PROTO_UDP, REVERSE_WAYS, RING_CHUNK, RING_EMPTY, Reason, SEED_CANARY, SEED_RING, SERVICE_DSR,
    SERVICE_PREVIEW, SYN_BUCKETS, Service, TCP_RST, TCP_SYN, colour_slot, ends_flow, flow_expired, flow_hash,
    new_flow_colour, pool_slot, reply_belongs, ring_table, starts_flow, state_canary_bp, state_second_chance,
    syn_bucket, syn_clock, syn_timed,
};

use crate::{
    clock::{self, Clock, daemon_now},
    mem,
    nat::{self, Scratch, Verdict},
    parse::Packet,
    prog::{BACKENDS, COUNTERS, REVERSE, RING, RING_LIVE, STATE, UDP_IDLE_NS},
    table,
};

/// Picks the packet's backend (its flow is `scratch.key`) and forwards it there.
/// `untracked`: the flow table is known to hold nothing for it (a SYN, or an entry the caller
/// just looked for and did not find).
#[inline(never)]
pub fn to_backend(pkt: &Packet, scratch: &mut Scratch, service: Service, untracked: bool) -> Verdict {
    match pick(pkt, scratch, service, untracked) {
        Ok(v) => v,
        Err(reason) => Verdict::pass(reason),
    }
}

/// A packet of a tracked flow that records its mode (`FLOW_KNOWN`), forwarded from the flow
/// entry alone, before any service lookup: the common case costs one flow-table lookup.
/// Anything else is for the full path: `Verdict::NO_FLOW` when there is no entry,
/// `Verdict::UNHANDLED` for an expired one, a reset or an entry without `FLOW_KNOWN`. The
/// daemon removes the flows of a service it removes, so an entry found here belongs to a live
/// service. Its lookup is inlined here, and a UDP datagram that changes nothing makes no
/// call: on this kernel every return from a function costs a return thunk, and this is the
/// path most packets take. The function itself is not inlined: in the entry point, its
/// registers would spill around every other path (measured: established and replies +7 to
/// +12 ns).
#[inline(never)]
pub fn established(pkt: &Packet, s: &mut Scratch) -> Verdict {
    let Some(flow) = table::get_inline(&s.key) else { return Verdict::NO_FLOW };
    if flow.flags & FLOW_KNOWN == 0 || flow.flags & FLOW_RESET != 0 {
        return Verdict::UNHANDLED;
    }
    // An open TCP flow's packet only restamps it, and a UDP datagram within a second of the
    // flow's stamp changes nothing: no call for either.
    if open_tcp(flow, pkt.proto, pkt.tcp_flags) {
        stamp(flow);
    } else {
        let now = clock::now(&mut s.clock);
        if !(pkt.proto == PROTO_UDP && fresh_udp(flow, now)) && !touch(flow, pkt.proto, pkt.tcp_flags, now) {
            return Verdict::UNHANDLED;
        }
    }
    mem::copy(&mut s.flow, flow);
    forward_tracked(pkt, s, s.flow.flags & FLOW_DSR != 0)
}

/// Whether a client's datagram finds its UDP flow live, stamped within
/// `LAST_SEEN_GRANULARITY_NS` and not marked `FLOW_DIRECT`: then [`touch`] would change
/// nothing.
#[inline(always)]
fn fresh_udp(flow: &Flow, now: u64) -> bool {
    flow.flags & FLOW_DIRECT == 0
        && now.saturating_sub(flow.last_seen_ns) <= LAST_SEEN_GRANULARITY_NS
        && !flow_expired(PROTO_UDP, flow.flags, now, flow.last_seen_ns, UDP_IDLE_NS.load())
}

/// Whether a packet is one of an open TCP flow that it does not end (no clock decides it).
#[inline(always)]
fn open_tcp(flow: &Flow, proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_TCP && flow.flags & FLOW_CLOSING == 0 && !ends_flow(proto, tcp_flags)
}

/// Stamps an open TCP flow with the daemon's clock, if it moved.
#[inline(always)]
fn stamp(flow: &mut Flow) {
    let now = daemon_now();
    if now > flow.last_seen_ns {
        flow.last_seen_ns = now;
    }
}

/// Marks a packet of a tracked flow, in either direction: closing on FIN/RST; last-seen stamp
/// at most once per `LAST_SEEN_GRANULARITY_NS` (UDP) or when the daemon's clock moved (open
/// TCP, which reads no clock). `false`: the flow has expired (or, for a backend's packet,
/// `reply_belongs` says the packet is not the flow's); nothing is changed then. Not inlined:
/// three callers, and the BPF stack is 512 bytes for the whole call chain.
#[inline(never)]
fn touch_as(flow: &mut Flow, proto: u8, tcp_flags: u8, reply: bool, now: u64) -> bool {
    let ends = ends_flow(proto, tcp_flags);
    if open_tcp(flow, proto, tcp_flags) {
        stamp(flow);
        return true;
    }
    let idle = UDP_IDLE_NS.load();
    let live = if reply {
        reply_belongs(proto, tcp_flags, flow.flags, now, flow.last_seen_ns, idle)
    } else {
        !flow_expired(proto, flow.flags, now, flow.last_seen_ns, idle)
    };
    if !live {
        return false;
    }
    if !reply {
        // The client talks to the VIP again: the backend's answers are the flow's.
        flow.flags &= !FLOW_DIRECT;
    }
    if ends && flow.flags & FLOW_CLOSING == 0 {
        if tcp_flags & TCP_RST != 0 {
            reset(flow, reply);
        }
        flow.flags |= FLOW_CLOSING;
        flow.last_seen_ns = now;
    } else if now.saturating_sub(flow.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
    }
    true
}

/// [`touch_as`] for a client's packet.
#[inline(always)]
fn touch(flow: &mut Flow, proto: u8, tcp_flags: u8, now: u64) -> bool {
    touch_as(flow, proto, tcp_flags, false, now)
}

/// Whether a tracked flow is live (not expired), without marking it: for ICMP errors about it.
/// Not inlined: it keeps the ICMP path's frame within the 512-byte stack of the call chain.
#[inline(never)]
pub fn live(flow: &Flow, proto: u8, c: &mut Clock) -> bool {
    if proto == PROTO_TCP && flow.flags & FLOW_CLOSING == 0 {
        return true;
    }
    !flow_expired(proto, flow.flags, clock::now(c), flow.last_seen_ns, UDP_IDLE_NS.load())
}

/// Counts and forwards a packet of the tracked flow in `s.flow`.
#[inline(always)]
fn forward_tracked(pkt: &Packet, s: &mut Scratch, dsr: bool) -> Verdict {
    count(s.flow.service, u32::from(s.flow.colour), pkt.ip_len, false, NEW_NONE);
    send(pkt, s, dsr)
}

/// Sends the packet to the backend of the flow in `s.flow`: by DSR or NAT.
#[inline(always)]
fn send(pkt: &Packet, s: &mut Scratch, dsr: bool) -> Verdict {
    if dsr {
        return nat::dsr(pkt, &s.flow.backend, &mut s.fib);
    }
    if crate::shadow::wanted(pkt, s) {
        return Verdict::SHADOW;
    }
    nat::forward(pkt, &s.flow.backend, &mut s.fib)
}

#[inline(always)]
fn pick(pkt: &Packet, s: &mut Scratch, service: Service, untracked: bool) -> Result<Verdict, Reason> {
    let tracked = if untracked { None } else { table::get(&s.key) };
    let mut have = false;
    if let Some(flow) = tracked {
        if touch(flow, pkt.proto, pkt.tcp_flags, clock::now(&mut s.clock)) {
            mem::copy(&mut s.flow, flow);
            have = true;
        }
    }
    if have && s.flow.flags & FLOW_RESET != 0 {
        // The drain timed out with `reset`: a TCP client is told with an RST, a UDP flow
        // simply starts again on the active colour.
        table::remove(&s.key);
        if pkt.proto == PROTO_TCP {
            let tcp = crate::parse::recheck(pkt, pkt.ports)?;
            return Ok(nat::reset(pkt, tcp));
        }
        have = false;
    }
    let dsr = service.flags & SERVICE_DSR != 0;
    if have {
        return Ok(forward_tracked(pkt, s, dsr));
    }
    let syn = starts_flow(pkt.proto, pkt.tcp_flags);
    if syn && dsr {
        retransmitted(&s.key);
    }
    let ending = ends_flow(pkt.proto, pkt.tcp_flags);
    // An open TCP flow is stamped with the daemon's clock, like its later packets.
    let now = if pkt.proto == PROTO_TCP && !ending { daemon_now() } else { clock::now(&mut s.clock) };
    let rescued = new_flow(pkt, &s.key, service, now, ending, &mut s.flow)?;
    if syn && !dsr {
        // NAT: the backend's answer to this SYN will be seen; time it (all of this CPU's
        // first SYNs of a tick, then a sample: `syn_timed`).
        s.flow.flags |= FLOW_PENDING;
        if s.syn_tick != now {
            s.syn_tick = now;
            s.syn_seen = 0;
        }
        s.syn_seen = s.syn_seen.saturating_add(1);
        if syn_timed(s.syn_seen) {
            // SAFETY: plain helper call.
            s.flow.syn_time = syn_clock(unsafe { bpf_ktime_get_ns() });
        }
    }
    table::insert(&s.key, &s.flow);
    let new = if rescued {
        NEW_RESCUED
    } else if syn {
        NEW_SYN
    } else {
        NEW_FLOW
    };
    count(service.id, u32::from(s.flow.colour), pkt.ip_len, false, new);
    Ok(send(pkt, s, dsr))
}

/// The colour and backend of a flow the table does not have, written into `flow`. Returns
/// whether it was rescued: a TCP packet in mid-connection sent to the previous colour because
/// the service drains.
#[inline(always)]
fn new_flow(
    pkt: &Packet,
    key: &FlowKey,
    service: Service,
    now: u64,
    ending: bool,
    flow: &mut Flow,
) -> Result<bool, Reason> {
    let state = *STATE.get(service.id).ok_or(Reason::INTERNAL)?;
    let preview = service.flags & SERVICE_PREVIEW != 0;
    let mid_connection = pkt.proto == PROTO_TCP && !starts_flow(pkt.proto, pkt.tcp_flags);
    let (colour, rescued) = match state_second_chance(state) {
        Some(previous) if mid_connection && !preview => (previous, true),
        _ => {
            // The canary hash only matters when there is a canary share.
            let canary = if state_canary_bp(state) != 0 { flow_hash(key, SEED_CANARY) } else { 0 };
            (new_flow_colour(state, preview, canary), false)
        }
    };
    let live = *RING_LIVE.get(colour_slot(service.id, colour)).ok_or(Reason::INTERNAL)?;
    let (first, size) = ring_table(live).ok_or(Reason::NO_BACKEND)?;
    let slot = flow_hash(key, SEED_RING) % size;
    let chunk = RING.get(first + slot / RING_CHUNK).ok_or(Reason::INTERNAL)?;
    let idx = chunk.slots[(slot % RING_CHUNK) as usize];
    if idx == RING_EMPTY || u32::from(idx) >= MAX_POOL {
        return Err(Reason::NO_BACKEND);
    }
    let backend = BACKENDS.get(pool_slot(service.id, colour, u32::from(idx))).ok_or(Reason::INTERNAL)?;
    if !backend.is_set() {
        return Err(Reason::NO_BACKEND);
    }
    mem::copy(&mut flow.backend, backend);
    flow.service = service.id;
    flow.colour = colour as u8;
    let mode = if service.flags & SERVICE_DSR != 0 { FLOW_KNOWN | FLOW_DSR } else { FLOW_KNOWN };
    flow.flags = if ending { FLOW_CLOSING | mode } else { mode };
    flow.backend_idx = idx;
    flow.syn_time = 0;
    flow.last_seen_ns = now;
    Ok(rescued)
}

/// Two addresses compared as two 8-byte words (no `memcmp` in BPF).
#[inline(always)]
pub fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]])
    };
    w(a, 0) == w(b, 0) && w(a, 8) == w(b, 8)
}

/// The flow a backend's packet (`s.key`, backend → client) would be a reply of: for each
/// (VIP, port) `REVERSE` lists for the backend, the flow on the reversed tuple (`s.other`,
/// client → VIP), if it was given this backend; when several are (one client port on two
/// VIPs or ports of the same backend, such as a service and its preview port), the one
/// [`flow_of_backend`] ranks first (`pkt` says whether it is a SYN-ACK; an ICMP error's is
/// not). `s.other` is left as the found flow's key. `None`, with `s.miss` saying why:
/// `NO_MATCH`, not a backend's address and port; `NOT_LIVE`, a backend, but no such flow. Not
/// inlined (several callers; the 512-byte stack); it returns one pointer-sized value.
#[inline(never)]
pub fn reply_flow(pkt: &Packet, s: &mut Scratch) -> Option<&'static mut Flow> {
    s.rank_syn_ack = u8::from(pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0);
    search_from(s, true);
    let flow = flow_of_backend(s)?;
    if flow.flags & FLOW_DIRECT != 0 {
        s.miss = Reason::NOT_LIVE.0;
        return None;
    }
    Some(flow)
}

/// Sets up [`flow_of_backend`]'s search from `s.key`: the backend is its source (a backend's
/// packet) or its destination (a client's straight to a backend), the client the other end.
#[inline(always)]
fn search_from(s: &mut Scratch, backend_is_source: bool) {
    let k = &s.key;
    let (backend, backend_port, client, client_port) =
        if backend_is_source { (&k.src, k.sport, &k.dst, k.dport) } else { (&k.dst, k.dport, &k.src, k.sport) };
    mem::copy(&mut s.backend.addr, backend);
    s.backend.port = backend_port;
    s.backend.proto = k.proto;
    s.backend.family = k.family;
    mem::copy(&mut s.other.src, client);
    s.other.sport = client_port;
}

/// [`reply_flow`]'s search, for a backend in `s.backend` and a client in `s.other.src` and
/// `s.other.sport`. Of several flows of the backend on the client's port, the first by
/// [`rank`]: a new connection on a port whose earlier flow to another VIP port of the same
/// backend has ended (or never got its answer) is thus never answered as that one.
#[inline(always)]
fn flow_of_backend(s: &mut Scratch) -> Option<&'static mut Flow> {
    // SAFETY: values are plain integers; a concurrent update at worst gives a stale copy.
    let Some(reverse) = (unsafe { REVERSE.get(&s.backend) }) else {
        s.miss = Reason::NO_MATCH.0;
        return None;
    };
    s.other.proto = s.backend.proto;
    s.other.family = s.backend.family;
    s.other._pad = [0; 2];
    let count = reverse.count;
    if count > 1 {
        // Several (VIP, port) pairs: rank their flows (in `s`, not on the stack), then take
        // the best one's key.
        (s.best_rank, s.best_i, s.best_seen) = (0, 0, 0);
        for i in 0..REVERSE_WAYS {
            if i as u32 >= count {
                break;
            }
            let to = &reverse.to[i];
            mem::copy(&mut s.other.dst, &to.vip);
            s.other.dport = to.port;
            rank(s, i as u8);
        }
        if s.best_rank == 0 {
            s.miss = Reason::NOT_LIVE.0;
            return None;
        }
        let to = reverse.to.get(usize::from(s.best_i))?;
        mem::copy(&mut s.other.dst, &to.vip);
        s.other.dport = to.port;
    } else {
        let to = &reverse.to[0];
        mem::copy(&mut s.other.dst, &to.vip);
        s.other.dport = to.port;
    }
    if let Some(flow) = table::get(&s.other) {
        if is_of_backend(flow, s) {
            return Some(flow);
        }
    }
    s.miss = Reason::NOT_LIVE.0;
    None
}

/// Whether a tracked flow was given the backend in `s.backend` (and is NAT: a DSR backend's
/// packets are no replies to translate).
#[inline(always)]
fn is_of_backend(flow: &Flow, s: &Scratch) -> bool {
    flow.flags & FLOW_DSR == 0 && flow.backend.port == s.backend.port && same_addr(&flow.backend.addr, &s.backend.addr)
}

/// [`flow_of_backend`]'s ranking of the flow on `s.other` (entry `i` of the backend's list):
/// for a SYN-ACK, a flow whose SYN waits for it (`FLOW_PENDING`) first, the later SYN of two;
/// then an open flow whose SYN was answered, then one whose SYN was not, then a closing one;
/// between equals, the one seen last.
#[inline(always)]
fn rank(s: &mut Scratch, i: u8) {
    let Some(flow) = table::get(&s.other) else { return };
    if !is_of_backend(flow, s) {
        return;
    }
    let pending = flow.flags & FLOW_PENDING != 0;
    let rank = if s.rank_syn_ack != 0 && pending {
        4
    } else if flow.flags & FLOW_CLOSING != 0 {
        1
    } else if pending {
        // Its SYN has had no answer yet: not the flow of a packet that is no SYN-ACK.
        2
    } else {
        3
    };
    // Between two SYNs waiting, the later (`syn_time`, when timed); else the one seen last.
    let seen = if rank == 4 { u64::from(flow.syn_time) } else { flow.last_seen_ns };
    if rank > s.best_rank || (rank == s.best_rank && seen > s.best_seen) {
        (s.best_rank, s.best_i, s.best_seen) = (rank, i, seen);
    }
}

/// A client's UDP datagram straight to a backend (`s.key`, client → backend), which passes
/// untouched. If the client has a VIP flow from the same port to that backend, the two
/// conversations share the backend's answers, and the client's last datagram says whose they
/// are: the flow is marked `FLOW_DIRECT` (its answers pass untouched) until the client's next
/// datagram to the VIP, which keeps its backend as before. Not inlined: rare, and it keeps
/// the main frame small.
#[inline(never)]
pub fn direct(s: &mut Scratch) -> u64 {
    search_from(s, false);
    s.rank_syn_ack = 0;
    match flow_of_backend(s) {
        Some(flow) => {
            flow.flags |= FLOW_DIRECT;
            1
        }
        None => 0,
    }
}

/// A packet from a backend's address and port (`s.key`): rewritten to come from the VIP when
/// it belongs to a live flow of that backend, else passed untouched. A TCP SYN-ACK for a flow
/// that already closed starts a new connection on the same tuple (a client's direct one): the
/// closed flow is forgotten at once, so none of that connection's packets is touched.
#[inline(never)]
pub fn reply(pkt: &Packet, s: &mut Scratch) -> Verdict {
    let Some(flow) = reply_flow(pkt, s) else {
        let idle = crate::shadow::idle_reply(pkt, s);
        return if idle.handled() { idle } else { Verdict::pass(Reason(s.miss)) };
    };
    if !touch_as(flow, pkt.proto, pkt.tcp_flags, true, clock::now(&mut s.clock)) {
        if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0 && flow.flags & FLOW_CLOSING != 0 {
            table::remove(&s.other);
        }
        return Verdict::pass(Reason::NOT_LIVE);
    }
    if pkt.tcp_flags & TCP_SYN != 0 && flow.flags & FLOW_PENDING != 0 {
        handshake(flow);
    }
    count(flow.service, u32::from(flow.colour), pkt.ip_len, true, NEW_NONE);
    if pkt.proto == PROTO_UDP {
        crate::shadow::live_reply(flow.service, &s.other);
    }
    nat::reply(pkt, &s.other.dst, s.other.dport, &mut s.fib)
}

/// `count`'s `new`: a packet of a known flow, the first of a new flow, the first of a rescued
/// one, the SYN of a new flow.
pub const NEW_NONE: u8 = 0;
pub const NEW_FLOW: u8 = 1;
pub const NEW_RESCUED: u8 = 3;
pub const NEW_SYN: u8 = 5;

/// `signal`'s events, any of them at once.
const SIG_HANDSHAKE: u32 = 1;
const SIG_REFUSED: u32 = 2;
const SIG_BACKEND_RESET: u32 = 4;
const SIG_UNREACHABLE: u32 = 8;
const SIG_SYN_RETRANSMIT: u32 = 16;
const SIG_CLIENT_RESET: u32 = 32;

/// Counts signal `events` on a service colour; `bucket`: the SYN latency bucket of a
/// handshake (`SYN_BUCKETS`: an untimed SYN's, no bucket). Not inlined: only the rare
/// packets that carry a signal call it.
#[inline(never)]
fn signal(service: u32, colour: u32, events: u32, bucket: u32) {
    let Some(c) = COUNTERS.get_ptr_mut(colour_slot(service, colour)) else { return };
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
    let c = unsafe { &mut *c };
    if events & SIG_HANDSHAKE != 0 {
        c.handshakes += 1;
        if let Some(b) = c.syn_latency.get_mut(bucket as usize) {
            *b += 1;
        }
    }
    c.refused += u64::from(events & SIG_REFUSED != 0);
    c.backend_resets += u64::from(events & SIG_BACKEND_RESET != 0);
    c.icmp_unreachables += u64::from(events & SIG_UNREACHABLE != 0);
    c.syn_retransmits += u64::from(events & SIG_SYN_RETRANSMIT != 0);
    c.client_resets += u64::from(events & SIG_CLIENT_RESET != 0);
}

/// The backend's SYN-ACK to a pending flow's SYN: a handshake, with its latency if the SYN
/// was timed.
#[inline(never)]
fn handshake(flow: &mut Flow) {
    flow.flags &= !FLOW_PENDING;
    let bucket = if flow.syn_time == 0 {
        SYN_BUCKETS as u32
    } else {
        // SAFETY: plain helper call.
        syn_bucket(flow.syn_time, syn_clock(unsafe { bpf_ktime_get_ns() })) as u32
    };
    signal(flow.service, u32::from(flow.colour), SIG_HANDSHAKE, bucket)
}

/// An RST on a flow that was not closing: the backend's (`reply`; a refusal when it answers
/// the SYN) or the client's.
#[inline(always)]
fn reset(flow: &mut Flow, reply: bool) {
    let events = if !reply {
        SIG_CLIENT_RESET
    } else if flow.flags & FLOW_PENDING != 0 {
        SIG_BACKEND_RESET | SIG_REFUSED
    } else {
        SIG_BACKEND_RESET
    };
    flow.flags &= !FLOW_PENDING;
    signal(flow.service, u32::from(flow.colour), events, 0);
}

/// An ICMP destination unreachable from a backend about its live flow (a refusal when the
/// flow's SYN had no answer yet).
#[inline(never)]
pub fn unreachable(flow: &mut Flow) {
    let events = if flow.flags & FLOW_PENDING != 0 { SIG_UNREACHABLE | SIG_REFUSED } else { SIG_UNREACHABLE };
    flow.flags &= !FLOW_PENDING;
    signal(flow.service, u32::from(flow.colour), events, 0);
}

/// DSR: a SYN on the 5-tuple `key` whose flow is open is a retransmission (the client got no
/// SYN-ACK in time), counted on that flow's colour. The one lookup DSR SYNs add.
#[inline(never)]
fn retransmitted(key: &FlowKey) {
    if let Some(old) = table::get(key) {
        if old.flags & (FLOW_DSR | FLOW_CLOSING) == FLOW_DSR {
            signal(old.service, u32::from(old.colour), SIG_SYN_RETRANSMIT, 0);
        }
    }
}

/// Adds a packet to its service colour's counters; `new` says whether it started a flow
/// (`NEW_FLOW`), whether that flow was rescued (`NEW_RESCUED`) or began with a SYN (`NEW_SYN`).
#[inline(always)]
pub fn count(service: u32, colour: u32, ip_len: u16, reply: bool, new: u8) {
    if let Some(c) = COUNTERS.get_ptr_mut(colour_slot(service, colour)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        let c = unsafe { &mut *c };
        let bytes = u64::from(ip_len);
        if reply {
            c.reply_packets += 1;
            c.reply_bytes += bytes;
        } else {
            c.packets += 1;
            c.bytes += bytes;
        }
        c.flows += u64::from(new & 1);
        c.rescued += u64::from((new >> 1) & 1);
        c.syns += u64::from(new >> 2);
    }
}
