//! ICMP and ICMPv6 errors about tracked flows.
//!
//! - From a client (or a router on its path) to the VIP, quoting a reply the client got
//!   (`VIP:port → client:cport`), e.g. "fragmentation needed" / "packet too big": the flow is
//!   found in `FLOWS`, the outer destination becomes the flow's backend and the quoted packet
//!   is rewritten to what the backend really sent (`backend:bport → client:cport`), so the
//!   backend's stack learns the path MTU.
//! - From a backend to a client, quoting the client's packet as the backend got it
//!   (`client:cport → backend:bport`), e.g. "port unreachable": its flow is found as a reply's
//!   is (`flow::reply_flow`), the outer source becomes the VIP and the quoted packet is
//!   rewritten to what the client sent.
//!
//! Either way only an error about a live flow is translated; others pass untouched. A
//! destination unreachable from a backend is also counted on the flow's colour (a signal for
//! rollouts, see `flow`).
//!
//! The ICMP checksum, the quoted IPv4 header's checksum and the outer headers are updated
//! incrementally, and so is a quoted UDP checksum. A quoted TCP checksum is usually cut off
//! (it is at byte 16) and receivers do not check it: it is left as it is.

use network_types::udp::UdpHdr;
use switcher_common::{PROTO_UDP, Reason, csum::CsumDelta};

use crate::{
    nat::{self, Scratch, Side, Verdict},
    parse::Packet,
};

/// Translates an ICMP error about a live tracked flow, or says it is none: [`find`] the flow,
/// then [`rewrite`]. Two calls from the entry point, not one inside the other: the flow
/// lookups and the rewrite each need a deep stack, and the 512 bytes are for the chain.
#[inline(always)]
pub fn translate(pkt: &Packet, scratch: &mut Scratch) -> Verdict {
    match find(pkt, scratch) {
        FOUND_FORWARD => rewrite(pkt, scratch, Side::Dst, Side::Src, Reason::ICMP_FWD),
        FOUND_REPLY => rewrite(pkt, scratch, Side::Src, Side::Dst, Reason::ICMP_REPLY),
        _ => Verdict::pass(Reason(scratch.miss)),
    }
}

/// [`find`]: an error about a reply, from a client to the VIP (to be sent to the backend).
const FOUND_FORWARD: u32 = 1;
/// [`find`]: an error about a client's packet, from a backend (to be sent from the VIP).
const FOUND_REPLY: u32 = 2;

/// The live flow an ICMP error is about: `FOUND_FORWARD` or `FOUND_REPLY`, with
/// `scratch.flow.backend` holding the address and port the two rewrites put in (the
/// backend's, or the VIP's); 0 if none, with the reason in `scratch.miss`.
#[inline(never)]
fn find(pkt: &Packet, scratch: &mut Scratch) -> u32 {
    let (inner, inner_proto, inner_ports) = (pkt.inner, pkt.inner_proto, pkt.ports);
    // SAFETY: the quoted ports were bounds-checked by the parser.
    let (qsport, qdport) = unsafe { ((*inner_ports).src, (*inner_ports).dst) };
    // The quoted packet travelled the other way: its reverse is the tracked direction.
    let key = &mut scratch.key;
    let ports = u32::from_ne_bytes([qdport[0], qdport[1], qsport[0], qsport[1]]);
    crate::parse::write_key(key, inner, inner.dst_ptr(), inner.src_ptr(), ports, inner_proto);
    if let Some(flow) = crate::table::get(key) {
        // Client → VIP about a reply: to the backend, quoting what the backend sent.
        if !crate::flow::live(flow, inner_proto, &mut scratch.clock) {
            scratch.miss = Reason::NOT_LIVE.0;
            return 0;
        }
        crate::mem::copy(&mut scratch.flow.backend, &flow.backend);
        return FOUND_FORWARD;
    }
    // Backend → client about the client's packet: from the VIP, quoting what the client
    // sent — if it is about a live flow of that backend.
    let Some(flow) = crate::flow::reply_flow(pkt, scratch) else { return 0 };
    if !crate::flow::live(flow, inner_proto, &mut scratch.clock) {
        scratch.miss = Reason::NOT_LIVE.0;
        return 0;
    }
    if pkt.icmp == crate::parse::ICMP_UNREACHABLE {
        // A signal for rollouts: the backend (or its host) refuses the flow.
        crate::flow::unreachable(flow);
    }
    crate::mem::copy(&mut scratch.flow.backend.addr, &scratch.other.dst);
    scratch.flow.backend.port = scratch.other.dport;
    FOUND_REPLY
}

/// Rewrites the error [`find`] found: the outer address on `outer_side`, the quote's on
/// `quote_side`, both to `scratch.flow.backend`; then sends it on.
#[inline(never)]
fn rewrite(pkt: &Packet, scratch: &mut Scratch, outer_side: Side, quote_side: Side, reason: Reason) -> Verdict {
    let (addr, port) = (&scratch.flow.backend.addr, scratch.flow.backend.port);
    let outer = nat::set_addr(pkt.ip, outer_side, addr);
    let icmp = rewrite_quote(pkt, quote_side, addr, port, outer);
    fix(pkt.check, icmp);
    nat::out(pkt, outer, reason, reason, &mut scratch.fib)
}

/// Rewrites one side of the quoted packet; returns the delta of the ICMP checksum (which for
/// ICMPv6 also covers the outer pseudo-header, changed by `outer`).
#[inline(always)]
fn rewrite_quote(pkt: &Packet, side: Side, addr: &[u8; 16], port: [u8; 2], outer: CsumDelta) -> CsumDelta {
    let (inner, ports, v6) = (pkt.inner, pkt.ports, pkt.ip.is_v6());
    let addr_delta = nat::set_addr(inner, side, addr);
    let port_delta = nat::set_port(ports, side, port);
    let mut icmp = addr_delta;
    icmp.add(port_delta);
    // A quoted UDP header is always whole (8 bytes); its checksum is kept right too. A quoted
    // TCP checksum (byte 16) is usually cut off, and receivers do not check it: left alone.
    if pkt.inner_proto == PROTO_UDP {
        if let Ok(udp) = crate::parse::recheck::<UdpHdr, _>(pkt, ports) {
            let mut l4 = addr_delta;
            l4.add(port_delta);
            // SAFETY: bounds-checked just above.
            unsafe {
                let old = (*udp).check;
                let new = l4.apply_udp(old);
                (*udp).check = new;
                icmp.replace2(old, new);
            }
        }
    }
    if !inner.is_v6() {
        let h = inner.v4();
        // The quoted IPv4 header checksum changes too, and it is part of the ICMP payload.
        // SAFETY: bounds-checked by the parser.
        unsafe {
            let old = (*h).check;
            let new = addr_delta.apply(old);
            (*h).check = new;
            icmp.replace2(old, new);
        }
    }
    if v6 {
        icmp.add(outer);
    }
    icmp
}

#[inline(always)]
fn fix(check: *mut [u8; 2], delta: CsumDelta) {
    // SAFETY: bounds-checked by the parser.
    unsafe {
        let old = *check;
        *check = delta.apply(old);
    }
}
