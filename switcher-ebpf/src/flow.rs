//! Which backend a service packet goes to, and the flow table that keeps it there.
//!
//! A packet of a tracked flow (in `FLOWS`, not expired) goes where the flow went first. A new
//! flow — a TCP SYN, or any packet the table does not know, e.g. after eviction — takes the
//! colour `new_flow_colour` picks (active, canary or, on a preview port, idle) and that
//! colour's backend from its live Maglev table, slot `flow_hash % RING_SIZE`: the same
//! 5-tuple always hashes to the same backend while the pool is unchanged.
//!
//! Keys and values are built in the per-CPU `Scratch`, not on the stack.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use switcher_common::{
    FLOW_CLOSING, FLOW_DSR, FLOW_KNOWN, FLOW_RESET, Flow, FlowKey, LAST_SEEN_GRANULARITY_NS, MAX_POOL, PROTO_TCP,
    RING_CHUNK, RING_EMPTY, RING_SIZE, Reason, Reply, SEED_CANARY, SEED_RING, SERVICE_DSR, SERVICE_PREVIEW, Service,
    colour_slot, ends_flow, flow_expired, flow_hash, new_flow_colour, pool_slot, ring_chunk,
};

use crate::{
    nat::{self, Scratch, Verdict},
    parse::Packet,
    prog::{BACKENDS, COUNTERS, FLOWS, REPLIES, RING, RING_LIVE, STATE, UDP_IDLE_NS},
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
/// entry alone, before any service lookup: the common case costs one hash lookup. Anything
/// else is for the full path: `Verdict::NO_FLOW` when there is no entry, `Verdict::UNHANDLED`
/// for an expired one, a reset or an entry without `FLOW_KNOWN`. The daemon removes the flows
/// of a service it removes, so an entry found here belongs to a live service.
#[inline(never)]
pub fn established(pkt: &Packet, s: &mut Scratch) -> Verdict {
    let Some(p) = FLOWS.get_ptr_mut(&s.key) else { return Verdict::NO_FLOW };
    // SAFETY: a live map value; a racing writer can at worst make the stamp stale.
    let flow = unsafe { &mut *p };
    if flow.flags & FLOW_KNOWN == 0 || flow.flags & FLOW_RESET != 0 {
        return Verdict::UNHANDLED;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(refresh) = touch(flow, pkt, now) else { return Verdict::UNHANDLED };
    s.flow = *flow;
    forward_tracked(pkt, s, refresh, s.flow.flags & FLOW_DSR != 0)
}

/// Marks a live flow's packet: closing on FIN/RST, last-seen stamp at most once per
/// `LAST_SEEN_GRANULARITY_NS`. `None`: the flow has expired (it is then a new flow);
/// `Some(true)`: the stamp moved, time to check the flow's reply entry.
#[inline(always)]
fn touch(flow: &mut Flow, pkt: &Packet, now: u64) -> Option<bool> {
    if flow_expired(pkt.proto, flow.flags, now, flow.last_seen_ns, UDP_IDLE_NS.load()) {
        return None;
    }
    if ends_flow(pkt.proto, pkt.tcp_flags) && flow.flags & FLOW_CLOSING == 0 {
        flow.flags |= FLOW_CLOSING;
        flow.last_seen_ns = now;
        Some(false)
    } else if now.saturating_sub(flow.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
        Some(true)
    } else {
        Some(false)
    }
}

/// Counts and forwards a packet of the tracked flow in `s.flow`; `refresh`: make sure its
/// reply entry is still there (the two LRU maps evict independently under pressure).
#[inline(always)]
fn forward_tracked(pkt: &Packet, s: &mut Scratch, refresh: bool, dsr: bool) -> Verdict {
    count(s.flow.service, u32::from(s.flow.colour), pkt.ip_len, false, false);
    if refresh && !dsr {
        write_reply_key(&s.key, &s.flow, &mut s.other);
        // SAFETY: only checked for presence.
        if unsafe { REPLIES.get(&s.other) }.is_none() {
            write_reply(&s.key, &s.flow, s.flow.service, &mut s.reply);
            let _ = REPLIES.insert(&s.other, &s.reply, 0);
        }
    }
    send(pkt, s, dsr)
}

/// Sends the packet to the backend of the flow in `s.flow`: by DSR or NAT.
#[inline(always)]
fn send(pkt: &Packet, s: &mut Scratch, dsr: bool) -> Verdict {
    if dsr { nat::dsr(pkt, &s.flow.backend, &mut s.fib) } else { nat::forward(pkt, &s.flow.backend, &mut s.fib) }
}

#[inline(always)]
fn pick(pkt: &Packet, s: &mut Scratch, service: Service, untracked: bool) -> Result<Verdict, Reason> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let ending = ends_flow(pkt.proto, pkt.tcp_flags);
    let tracked = if untracked { None } else { FLOWS.get_ptr_mut(&s.key) };
    let mut have = false;
    let mut refresh = false;
    if let Some(p) = tracked {
        // SAFETY: a live map value; a racing writer can at worst make the stamp stale.
        let flow = unsafe { &mut *p };
        if let Some(r) = touch(flow, pkt, now) {
            refresh = r;
            s.flow = *flow;
            have = true;
        }
    }
    if have && s.flow.flags & FLOW_RESET != 0 {
        // The drain timed out with `reset`: a TCP client is told with an RST, a UDP flow
        // simply starts again on the active colour.
        write_reply_key(&s.key, &s.flow, &mut s.other);
        let _ = FLOWS.remove(&s.key);
        let _ = REPLIES.remove(&s.other);
        if pkt.proto == PROTO_TCP {
            let tcp = crate::parse::recheck(pkt, pkt.ports)?;
            return Ok(nat::reset(pkt, tcp));
        }
        have = false;
    }
    let dsr = service.flags & SERVICE_DSR != 0;
    if have {
        return Ok(forward_tracked(pkt, s, refresh, dsr));
    }
    new_flow(&s.key, service, now, ending, &mut s.flow)?;
    // An LRU insert only fails on memory pressure; the packet is still forwarded and the next
    // packet of the flow lands on the same backend through the hash.
    let _ = FLOWS.insert(&s.key, &s.flow, 0);
    if !dsr {
        write_reply_key(&s.key, &s.flow, &mut s.other);
        write_reply(&s.key, &s.flow, service.id, &mut s.reply);
        let _ = REPLIES.insert(&s.other, &s.reply, 0);
    }
    count(service.id, u32::from(s.flow.colour), pkt.ip_len, false, true);
    Ok(send(pkt, s, dsr))
}

/// The key of a flow's reply direction (backend → client).
#[inline(always)]
fn write_reply_key(key: &FlowKey, flow: &Flow, out: &mut FlowKey) {
    out.src = flow.backend.addr;
    out.dst = key.src;
    out.sport = flow.backend.port;
    out.dport = key.sport;
    out.proto = key.proto;
    out.family = key.family;
    out._pad = [0; 2];
}

/// The reply entry of a flow: answer from the VIP and port the client used.
#[inline(always)]
fn write_reply(key: &FlowKey, flow: &Flow, service: u32, out: &mut Reply) {
    out.vip = key.dst;
    out.port = key.dport;
    out._pad = [0; 2];
    out.service = service;
    out.colour = u32::from(flow.colour);
    out._pad2 = 0;
}

/// The colour and backend of a flow the table does not have, written into `flow`.
#[inline(always)]
fn new_flow(key: &FlowKey, service: Service, now: u64, ending: bool, flow: &mut Flow) -> Result<(), Reason> {
    let state = *STATE.get(service.id).ok_or(Reason::INTERNAL)?;
    let colour = new_flow_colour(state, service.flags & SERVICE_PREVIEW != 0, flow_hash(key, SEED_CANARY));
    let half = *RING_LIVE.get(colour_slot(service.id, colour)).ok_or(Reason::INTERNAL)?;
    let slot = flow_hash(key, SEED_RING) % RING_SIZE;
    let chunk = RING.get(ring_chunk(service.id, colour, half, slot)).ok_or(Reason::INTERNAL)?;
    let idx = chunk.slots[(slot % RING_CHUNK) as usize];
    if idx == RING_EMPTY || u32::from(idx) >= MAX_POOL {
        return Err(Reason::NO_BACKEND);
    }
    let backend = BACKENDS.get(pool_slot(service.id, colour, u32::from(idx))).ok_or(Reason::INTERNAL)?;
    if !backend.is_set() {
        return Err(Reason::NO_BACKEND);
    }
    flow.backend = *backend;
    flow.service = service.id;
    flow.colour = colour as u8;
    let mode = if service.flags & SERVICE_DSR != 0 { FLOW_KNOWN | FLOW_DSR } else { FLOW_KNOWN };
    flow.flags = if ending { FLOW_CLOSING | mode } else { mode };
    flow.backend_idx = idx;
    flow._pad = [0; 4];
    flow.last_seen_ns = now;
    Ok(())
}

/// Adds a packet to its service colour's counters.
#[inline(always)]
pub fn count(service: u32, colour: u32, ip_len: u16, reply: bool, new_flow: bool) {
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
        if new_flow {
            c.flows += 1;
        }
    }
}
