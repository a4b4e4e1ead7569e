//! Rewriting and forwarding: destination NAT towards the backend, source NAT of replies back to
//! the VIP, incremental checksums, and the choice between redirect and the kernel's stack.
//!
//! Forwarding in `FORWARD_KERNEL` mode: the rewritten packet is passed to the kernel's stack.
//! In `FORWARD_REDIRECT` mode: `bpf_fib_lookup` on the rewritten packet. When the kernel knows the next hop and
//! its neighbour, the MACs are set from the result, TTL is decremented and the frame leaves by
//! `XDP_TX` (same interface) or `bpf_redirect`. Otherwise (no neighbour entry yet, MTU exceeded,
//! TTL expiring, no route) the already-rewritten packet is passed to the kernel, which routes it,
//! resolves the neighbour or answers with ICMP; the next packets take the fast path.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use switcher_common::{Backend, FORWARD_REDIRECT, PROTO_TCP, Reason, Reply, csum::CsumDelta};

use crate::parse::Packet;

const AF_INET: u8 = 2;

/// Rewrites the destination to `backend` and forwards the packet.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, backend: &Backend) -> (u32, Reason) {
    // SAFETY: `parse` bounds-checked the IPv4 header and the ports.
    let (old_addr, old_port) = unsafe { ((*pkt.ip).dst_addr, (*pkt.ports).dst) };
    let mut ip_delta = CsumDelta::new();
    ip_delta.replace4(old_addr, backend.addr);
    let mut l4_delta = ip_delta;
    l4_delta.replace2(old_port, backend.port);
    // SAFETY: as above.
    unsafe {
        (*pkt.ip).dst_addr = backend.addr;
        (*pkt.ports).dst = backend.port;
    }
    fix_l4_check(pkt, l4_delta);
    out(ctx, pkt, ip_delta, Reason::FWD_REDIRECT, Reason::FWD_KERNEL)
}

/// Rewrites a backend's reply to come from the VIP and forwards it to the client.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, reply: &Reply) -> (u32, Reason) {
    // SAFETY: `parse` bounds-checked the IPv4 header and the ports.
    let (old_addr, old_port) = unsafe { ((*pkt.ip).src_addr, (*pkt.ports).src) };
    let mut ip_delta = CsumDelta::new();
    ip_delta.replace4(old_addr, reply.vip);
    let mut l4_delta = ip_delta;
    l4_delta.replace2(old_port, reply.port);
    // SAFETY: as above.
    unsafe {
        (*pkt.ip).src_addr = reply.vip;
        (*pkt.ports).src = reply.port;
    }
    fix_l4_check(pkt, l4_delta);
    out(ctx, pkt, ip_delta, Reason::REPLY_REDIRECT, Reason::REPLY_KERNEL)
}

#[inline(always)]
fn fix_l4_check(pkt: &Packet, delta: CsumDelta) {
    // SAFETY: `parse` bounds-checked the L4 header that holds `check`.
    unsafe {
        let check = *pkt.check;
        *pkt.check = if pkt.proto == PROTO_TCP { delta.apply(check) } else { delta.apply_udp(check) };
    }
}

/// Sends the rewritten packet on: straight out of the right interface when the FIB has a
/// complete answer, else through the kernel's stack. `ip_delta` holds the IPv4 header changes
/// made so far; the TTL decrement is added to it on the fast path.
#[inline(always)]
fn out(ctx: &XdpContext, pkt: &Packet, mut ip_delta: CsumDelta, fast: Reason, slow: Reason) -> (u32, Reason) {
    // SAFETY: `parse` bounds-checked the Ethernet and IPv4 headers.
    let ip = unsafe { &mut *pkt.ip };
    if crate::prog::FORWARD_MODE.load() != FORWARD_REDIRECT {
        let check = ip.check;
        ip.check = ip_delta.apply(check);
        return (xdp_action::XDP_PASS, slow);
    }
    // SAFETY: the params are plain integers; zero is a valid start.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: `ctx.ctx` is the program's own context and `fib` lives on the stack.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || ip.ttl <= 1 {
        let check = ip.check;
        ip.check = ip_delta.apply(check);
        let reason = if ip.ttl <= 1 { Reason::TTL } else { slow };
        return (xdp_action::XDP_PASS, reason);
    }
    ip_delta.replace2([ip.ttl, ip.proto], [ip.ttl - 1, ip.proto]);
    ip.ttl -= 1;
    let check = ip.check;
    ip.check = ip_delta.apply(check);
    // SAFETY: `parse` bounds-checked the Ethernet header; the union was filled by the helper.
    unsafe {
        let macs = fib.__bindgen_anon_6.__bindgen_anon_2;
        (*pkt.eth).dst_addr = macs.dmac;
        (*pkt.eth).src_addr = macs.smac;
    }
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, fast);
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
    (action, fast)
}
