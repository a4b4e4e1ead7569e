//! Rewriting and forwarding: destination NAT towards the backend, source NAT of replies back to
//! the VIP, DSR's MAC rewrite, incremental checksums, and how the packet leaves.
//!
//! In `FORWARD_KERNEL` mode, and for VLAN-tagged frames, a rewritten packet is passed to the
//! kernel's stack to route. In `FORWARD_REDIRECT` mode the program asks `bpf_fib_lookup` about
//! the rewritten packet: with a complete answer, the MACs are set from it, TTL / hop limit is
//! decremented and the frame leaves by `XDP_TX` (same interface) or `bpf_redirect`; otherwise
//! (no neighbour entry yet, MTU exceeded, TTL expiring, no route) the rewritten packet goes to
//! the kernel, which routes it, resolves the neighbour or answers with ICMP.
//!
//! DSR rewrites nothing above L2: the FIB is asked for the backend's address to learn its
//! MAC and interface. Without a complete answer the frame is dropped (`DSR_NO_NEIGH`): passed
//! up, the kernel would route the VIP somewhere else. The daemon keeps DSR neighbours
//! resolved.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
};
use switcher_common::{Backend, BackendKey, FORWARD_REDIRECT, Flow, FlowKey, PROTO_TCP, Reason, csum::CsumDelta};

use network_types::tcp::TcpHdr;

use crate::{
    mem::{load16, store16},
    parse::{Ip, Packet, Ports},
};

/// An XDP action and the reason it is counted under, packed into one `u64`: functions that
/// are not inlined return it in `r0` (BPF has one return register; a wider value would be
/// split across registers the verifier rightly calls uninitialised).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u64);

impl Verdict {
    #[inline(always)]
    pub fn new(action: u32, reason: Reason) -> Verdict {
        Verdict((u64::from(action) << 32) | u64::from(reason.0))
    }

    /// Not decided here: the caller goes on with the full path. Never leaves the program.
    pub const UNHANDLED: Verdict = Verdict(u64::MAX);
    /// Not decided here, and the flow table has no entry for the packet: the full path need
    /// not look. Never leaves the program.
    pub const NO_FLOW: Verdict = Verdict(u64::MAX - 1);

    /// Not decided here: the flow in the scratch space is shadowed, and `shadow::forward` sends
    /// the packet (called from the entry point, whose call chain has room for its frame).
    /// Never leaves the program.
    pub const SHADOW: Verdict = Verdict(u64::MAX - 2);

    /// `SHADOW`: `shadow::forward` sends the packet.
    #[inline(always)]
    pub fn is_shadow(self) -> bool {
        self.0 == u64::MAX - 2
    }

    /// `NO_FLOW`: the flow table has no entry for the packet.
    #[inline(always)]
    pub fn is_no_flow(self) -> bool {
        self.0 == u64::MAX - 1
    }

    /// A verdict for the packet, not one of the three "go on" markers.
    #[inline(always)]
    pub fn handled(self) -> bool {
        self.0 < u64::MAX - 2
    }

    /// Passed to the kernel untouched (or as rewritten so far), counted under `reason`.
    #[inline(always)]
    pub fn pass(reason: Reason) -> Verdict {
        Verdict::new(xdp_action::XDP_PASS, reason)
    }

    #[inline(always)]
    pub fn action(self) -> u32 {
        (self.0 >> 32) as u32
    }

    #[inline(always)]
    pub fn reason(self) -> Reason {
        Reason(self.0 as u32)
    }
}

/// The data path's per-CPU working space (the `SCRATCH` map's value).
#[repr(C)]
pub struct Scratch {
    /// The packet's 5-tuple (or, for ICMP, the tracked flow's).
    pub key: FlowKey,
    /// The other direction's key (a backend packet's flow, client → VIP).
    pub other: FlowKey,
    pub flow: Flow,
    /// A backend packet's source, as `REVERSE`'s key.
    pub backend: BackendKey,
    /// Why `flow::reply_flow` found nothing (a `Reason`).
    pub miss: u32,
    pub fib: FibParams,
    /// The daemon's clock (`NOW`) when this CPU last counted a SYN, and the SYNs it counted
    /// since (`switcher_common::syn_timed`). Kept from packet to packet.
    pub syn_tick: u64,
    pub syn_seen: u32,
    /// `flow::flow_of_backend`'s ranking of several candidate flows (kept here, not on the
    /// stack: the search runs under the ICMP path's deep frame): the packet is a SYN-ACK, the
    /// best candidate's rank, index in `REVERSE`'s list and last-seen stamp.
    pub rank_syn_ack: u8,
    pub best_rank: u8,
    pub best_i: u8,
    pub best_seen: u64,
    /// This CPU's coarse clock, read once per tick (`clock::now`). Kept from packet to packet.
    pub clock: crate::clock::Clock,
}
// The flow table reads `key` and `other` as 8-byte words (see `table`).
const _: () = assert!(
    core::mem::offset_of!(Scratch, key) % 8 == 0
        && core::mem::offset_of!(Scratch, other) % 8 == 0
        && align_of::<Scratch>() >= 8
);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Which address of a header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Replaces the first `words` 16-bit words at `field` with those at `new`, word by word (a
/// word is read, summed and written before the next is read, so few values are live at
/// once), and records the changes in `d`.
#[inline(always)]
unsafe fn replace_words(field: *mut u8, new: *const u8, words: usize, d: &mut CsumDelta) {
    let mut i = 0;
    while i < words {
        // SAFETY: the caller's: both hold `words` words.
        unsafe {
            let n = load16(new, i);
            d.replace16(load16(field, i), n);
            store16(field, i, n);
        }
        i += 1;
    }
}

/// Rewrites one address of an IP header, and returns the change as a checksum delta (it
/// applies to the IPv4 header checksum and to every pseudo-header checksum). The IPv4 header
/// checksum itself is not touched here. `new` is in a map value (see `mem::load16`).
#[inline(always)]
pub fn set_addr(ip: Ip, side: Side, new: &[u8; 16]) -> CsumDelta {
    let mut d = CsumDelta::new();
    // SAFETY: the header was bounds-checked by its parser, for its own family; `new` holds 16
    // bytes.
    unsafe {
        if ip.is_v6() {
            let h = ip.v6();
            let field = if side == Side::Src { &raw mut (*h).src_addr } else { &raw mut (*h).dst_addr };
            replace_words(field.cast(), new.as_ptr(), 8, &mut d);
        } else {
            let h = ip.v4();
            let field = if side == Side::Src { &raw mut (*h).src_addr } else { &raw mut (*h).dst_addr };
            replace_words(field.cast(), new.as_ptr(), 2, &mut d);
        }
    }
    d
}

/// Rewrites one port; returns the delta.
#[inline(always)]
pub fn set_port(ports: *mut Ports, side: Side, new: [u8; 2]) -> CsumDelta {
    let mut d = CsumDelta::new();
    // SAFETY: `ports` was bounds-checked by its parser.
    unsafe {
        let field = if side == Side::Src { &raw mut (*ports).src } else { &raw mut (*ports).dst };
        let new = u16::from_ne_bytes(new);
        d.replace16(load16(field.cast(), 0), new);
        store16(field.cast(), 0, new);
    }
    d
}

/// Applies `delta` to an IPv4 header's checksum (IPv6 has none).
#[inline(always)]
pub fn fix_ip_check(ip: Ip, delta: CsumDelta) {
    if !ip.is_v6() {
        let h = ip.v4();
        // SAFETY: bounds-checked by the parser.
        unsafe {
            let check = (&raw mut (*h).check).cast::<u8>();
            store16(check, 0, delta.apply16(load16(check, 0)));
        }
    }
}

/// Applies `delta` to a TCP or UDP checksum field.
#[inline(always)]
pub fn fix_l4_check(proto: u8, check: *mut [u8; 2], delta: CsumDelta) {
    let check = check.cast::<u8>();
    // SAFETY: `check` was bounds-checked by the parser.
    unsafe {
        let old = load16(check, 0);
        store16(check, 0, if proto == PROTO_TCP { delta.apply16(old) } else { delta.apply16_udp(old) });
    }
}

/// Rewrites one side (address and port) of a TCP/UDP packet, fixes the L4 checksum, and
/// returns the change for the IPv4 header checksum.
#[inline(always)]
fn rewrite(pkt: &Packet, side: Side, addr: &[u8; 16], port: [u8; 2]) -> CsumDelta {
    let ip_delta = set_addr(pkt.ip, side, addr);
    let mut l4_delta = ip_delta;
    l4_delta.add(set_port(pkt.ports, side, port));
    fix_l4_check(pkt.proto, pkt.check, l4_delta);
    ip_delta
}

/// Rewrites the destination to `backend` and forwards the packet.
#[inline(always)]
pub fn forward(pkt: &Packet, backend: &Backend, fib: &mut FibParams) -> Verdict {
    let ip_delta = rewrite(pkt, Side::Dst, &backend.addr, backend.port);
    out(pkt, ip_delta, Reason::FWD_REDIRECT, Reason::FWD_KERNEL, fib)
}

/// Rewrites a backend's reply to come from the VIP and port and forwards it to the client.
#[inline(never)]
pub fn reply(pkt: &Packet, vip: &[u8; 16], port: [u8; 2], fib: &mut FibParams) -> Verdict {
    let ip_delta = rewrite(pkt, Side::Src, vip, port);
    out(pkt, ip_delta, Reason::REPLY_REDIRECT, Reason::REPLY_KERNEL, fib)
}

/// Fills the FIB parameters for the address at `dst` (in the header, or 16 bytes of a map
/// value) from the packet's header. Every input the helper reads with flags 0 is written (the
/// ports, unused, as 0); the rest of the struct holds the last lookup's answer, which the
/// helper overwrites, and the inputs of flags this program never passes (`tbid`, `mark`).
#[inline(always)]
fn fib_params(pkt: &Packet, dst: *const u8, fib: &mut FibParams) {
    fib.l4_protocol = pkt.proto;
    fib.sport = 0;
    fib.dport = 0;
    fib.__bindgen_anon_1.tot_len = pkt.ip_len;
    fib.ifindex = pkt.ifindex;
    let src = pkt.ip.src_ptr();
    // SAFETY: `src` is the header's own address, bounds-checked by the parser; `dst` has as
    // many bytes (see above).
    unsafe {
        if pkt.ip.is_v6() {
            fib.family = AF_INET6;
            fib.__bindgen_anon_2.flowinfo = 0;
            fib.__bindgen_anon_3.ipv6_src = words_at(src);
            fib.__bindgen_anon_4.ipv6_dst = words_at(dst);
        } else {
            fib.family = AF_INET;
            fib.__bindgen_anon_2.tos = (*pkt.ip.v4()).tos;
            fib.__bindgen_anon_3.ipv4_src = crate::mem::load32(src);
            fib.__bindgen_anon_4.ipv4_dst = crate::mem::load32(dst);
        }
    }
}

/// An address as the FIB query's four 32-bit words (for one in a stack buffer, the shadow
/// program's).
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The 16-byte address at `a` (a header's, or a map value's) as the FIB query's four 32-bit
/// words.
///
/// # Safety
/// As for `mem::load16`, 16 bytes.
#[inline(always)]
unsafe fn words_at(a: *const u8) -> [u32; 4] {
    // SAFETY: the caller's.
    unsafe {
        use crate::mem::load32;
        [load32(a), load32(a.add(4)), load32(a.add(8)), load32(a.add(12))]
    }
}

/// Asks the FIB; `Some` only for a complete answer (route and neighbour).
#[inline(always)]
fn lookup(pkt: &Packet, fib: &mut FibParams) -> bool {
    // SAFETY: `pkt.ctx` is the program's own context and `fib` is this CPU's scratch space.
    let rc = unsafe { bpf_fib_lookup(pkt.ctx.cast(), fib, size_of::<FibParams>() as i32, 0) };
    rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
}

/// Sets the MACs from the FIB's answer and sends the frame out of its interface.
#[inline(always)]
fn transmit(pkt: &Packet, fib: &FibParams) -> u32 {
    // SAFETY: the Ethernet header was bounds-checked by the parser; the union was filled by
    // the helper.
    unsafe {
        let macs = &fib.__bindgen_anon_6.__bindgen_anon_2;
        crate::mem::copy16((&raw mut (*pkt.eth).dst_addr).cast(), macs.dmac.as_ptr(), 3);
        crate::mem::copy16((&raw mut (*pkt.eth).src_addr).cast(), macs.smac.as_ptr(), 3);
    }
    if fib.ifindex == pkt.ifindex {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
}

/// Sends the rewritten packet on: straight out of the right interface when allowed and the
/// FIB has a complete answer, else through the kernel's stack. `ip_delta` holds the IPv4
/// header changes made so far; the TTL decrement is added to it on the fast path.
#[inline(always)]
pub fn out(pkt: &Packet, mut ip_delta: CsumDelta, fast: Reason, slow: Reason, fib: &mut FibParams) -> Verdict {
    if pkt.vlan != 0 || crate::prog::FORWARD_MODE.load() != FORWARD_REDIRECT {
        fix_ip_check(pkt.ip, ip_delta);
        return Verdict::pass(slow);
    }
    fib_params(pkt, pkt.ip.dst_ptr(), fib);
    let found = lookup(pkt, fib);
    // SAFETY: headers bounds-checked by the parser.
    let ttl = unsafe { if pkt.ip.is_v6() { &mut (*pkt.ip.v6()).hop_limit } else { &mut (*pkt.ip.v4()).ttl } };
    if !found || *ttl <= 1 {
        fix_ip_check(pkt.ip, ip_delta);
        return Verdict::pass(if *ttl <= 1 { Reason::TTL } else { slow });
    }
    if !pkt.ip.is_v6() {
        ip_delta.replace16(u16::from_ne_bytes([*ttl, pkt.proto]), u16::from_ne_bytes([*ttl - 1, pkt.proto]));
    }
    *ttl -= 1;
    fix_ip_check(pkt.ip, ip_delta);
    Verdict::new(transmit(pkt, fib), fast)
}

/// Turns a client's TCP packet into an RST back to the client, from the VIP, out of the
/// interface it came in on. The sequence number is the client's acknowledgement number, which
/// is exactly what the client expects next (RFC 5961 accepts it at once). The payload, if
/// any, stays: RST segments may carry data, and the checksum is then updated incrementally.
#[inline(always)]
pub fn reset(pkt: &Packet, tcp: *mut TcpHdr) -> Verdict {
    let (ports, check) = (tcp.cast::<Ports>(), pkt.check);
    // SAFETY: the Ethernet, IP and TCP headers were bounds-checked by the parser; `ports` is
    // the start of the TCP header, and the parser checked its full fixed length.
    unsafe {
        let eth = &mut *pkt.eth;
        core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
        // Swapping addresses or ports does not change a ones'-complement sum.
        if pkt.ip.is_v6() {
            let h = pkt.ip.v6();
            core::mem::swap(&mut (*h).src_addr, &mut (*h).dst_addr);
            (*h).hop_limit = 64;
        } else {
            let h = pkt.ip.v4();
            core::mem::swap(&mut (*h).src_addr, &mut (*h).dst_addr);
            let mut d = CsumDelta::new();
            d.replace2([(*h).ttl, (*h).proto], [64, (*h).proto]);
            (*h).ttl = 64;
            let c = (*h).check;
            (*h).check = d.apply(c);
        }
        let p = &mut *ports;
        core::mem::swap(&mut p.src, &mut p.dst);
        let tcp = tcp.cast::<u8>();
        let seq = tcp.add(4).cast::<[u8; 4]>();
        let ack = tcp.add(8).cast::<[u8; 4]>();
        let flags = tcp.add(12).cast::<[u8; 2]>();
        let mut d = CsumDelta::new();
        let new_seq = *ack;
        d.replace4(*seq, new_seq);
        d.replace4(*ack, [0; 4]);
        // Keep the data offset (high nibble of byte 12); flags become RST only.
        let new_flags = [(*flags)[0] & 0xf0, 0x04];
        d.replace2(*flags, new_flags);
        *seq = new_seq;
        *ack = [0; 4];
        *flags = new_flags;
        let c = *check;
        *check = d.apply(c);
    }
    Verdict::new(xdp_action::XDP_TX, Reason::RESET)
}

/// DSR: the frame is sent unchanged above L2 to the backend's MAC.
#[inline(always)]
pub fn dsr(pkt: &Packet, backend: &Backend, fib: &mut FibParams) -> Verdict {
    if pkt.vlan != 0 {
        return Verdict::pass(Reason::VLAN);
    }
    fib_params(pkt, backend.addr.as_ptr(), fib);
    if !lookup(pkt, fib) {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DSR_NO_NEIGH);
    }
    Verdict::new(transmit(pkt, fib), Reason::DSR)
}
