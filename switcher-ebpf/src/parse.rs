//! Every bounds check of the program lives here.
//!
//! Policy for what is not translated — the program passes and counts, it never drops (DSR's
//! missing neighbour is the one exception, see `nat`):
//! - ethertypes other than IPv4/IPv6 (ARP, LLDP, …): `XDP_PASS`, `NOT_IP`;
//! - up to two VLAN tags (802.1Q / 802.1ad) are parsed; the rewritten packet then always goes
//!   through the kernel's stack, which owns the VLAN devices; a third tag: `XDP_PASS`, `VLAN`;
//! - IPv4 fragments (MF set or a non-zero offset) and IPv6 fragment headers: `XDP_PASS`,
//!   `FRAGMENT`, because only the first fragment carries ports, and rewriting it alone would
//!   split the datagram across backends;
//! - IPv4 options are fine: the L4 header is found through IHL;
//! - IPv6 hop-by-hop, routing and destination-options headers are skipped, up to
//!   `MAX_V6_EXT` of them; a longer chain: `XDP_PASS`, `IPV6_EXT`;
//! - anything cut short or inconsistent (IHL < 5, total length beyond the frame or shorter than
//!   the headers, a TCP data offset < 5 or past the datagram, a UDP length < 8 or past the
//!   datagram): `XDP_PASS`, `MALFORMED`;
//! - checksums are not verified: a packet with a bad checksum is translated like any other and
//!   its checksum stays exactly as wrong (the receiver drops it); a UDP checksum of 0 stays 0;
//! - ICMP/ICMPv6 errors (unreachable, fragmentation needed / packet too big, time exceeded)
//!   are parsed down to the quoted packet's ports (see `icmp`); other protocols and ICMP
//!   messages: `XDP_PASS`, `OTHER_L4`.

use core::mem::size_of;

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use switcher_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Reason};

use crate::mem;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// IPv6 extension headers skipped before giving up.
const MAX_V6_EXT: usize = 4;

/// Source and destination ports: the first four bytes of TCP and UDP headers alike.
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// An IPv4 or IPv6 header in the frame. (A plain pointer and a flag rather than an enum of
/// pointers: LLVM lowers such enums into spills the verifier rejects.)
#[derive(Clone, Copy)]
pub struct Ip {
    hdr: *mut u8,
    v6: u8,
}

impl Ip {
    #[inline(always)]
    fn v4_at(h: *mut Ipv4Hdr) -> Ip {
        Ip { hdr: h.cast(), v6: 0 }
    }

    #[inline(always)]
    fn v6_at(h: *mut Ipv6Hdr) -> Ip {
        Ip { hdr: h.cast(), v6: 1 }
    }

    #[inline(always)]
    pub fn is_v6(self) -> bool {
        self.v6 != 0
    }

    /// The IPv4 header; only meaningful when `!is_v6()`.
    #[inline(always)]
    pub fn v4(self) -> *mut Ipv4Hdr {
        self.hdr.cast()
    }

    /// The IPv6 header; only meaningful when `is_v6()`.
    #[inline(always)]
    pub fn v6(self) -> *mut Ipv6Hdr {
        self.hdr.cast()
    }

    /// Where the header starts in the frame.
    #[inline(always)]
    pub fn as_ptr(self) -> *mut u8 {
        self.hdr
    }

    #[inline(always)]
    pub fn family(self) -> u8 {
        if self.is_v6() { FAMILY_V6 } else { FAMILY_V4 }
    }

    /// Where the source address is in the header (4 or 16 bytes, by family).
    #[inline(always)]
    pub fn src_ptr(self) -> *mut u8 {
        // SAFETY: the header was bounds-checked by its parser, for its own family.
        unsafe {
            if self.is_v6() { (&raw mut (*self.v6()).src_addr).cast() } else { (&raw mut (*self.v4()).src_addr).cast() }
        }
    }

    /// Where the destination address is in the header.
    #[inline(always)]
    pub fn dst_ptr(self) -> *mut u8 {
        // SAFETY: as above.
        unsafe {
            if self.is_v6() { (&raw mut (*self.v6()).dst_addr).cast() } else { (&raw mut (*self.v4()).dst_addr).cast() }
        }
    }

    /// `vip_slot` of the destination address, read from the header: a packet to no VIP
    /// leaves before its flow key is built.
    #[inline(always)]
    pub fn dst_vip_slot(self) -> u32 {
        // SAFETY: as above.
        let (a, b) = unsafe {
            if self.is_v6() {
                let d = &(*self.v6()).dst_addr;
                (d[14], d[15])
            } else {
                let d = &(*self.v4()).dst_addr;
                (d[2], d[3])
            }
        };
        (u32::from(a) << 8) | u32::from(b)
    }
}

/// An IPv4 address in the 16-byte field.
#[inline(always)]
pub fn widen(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// A parsed packet, as pointers into the frame.
///
/// For TCP and UDP, `ports` and `check` are the packet's own. For an ICMP/ICMPv6 error
/// (`icmp != 0`) quoting a packet, `check` is the ICMP checksum, `inner` the quoted IP header,
/// `inner_proto` its protocol and `ports` its ports.
pub struct Packet {
    /// The program's context, for helpers (`bpf_fib_lookup`). Functions that are not inlined
    /// get what they need of the context from here, never through `&XdpContext`: LLVM would
    /// pass them pointers into the context, which the verifier refuses to dereference.
    pub ctx: *mut xdp_md,
    /// `data_end`, for bounds checks made after parsing (`recheck`).
    pub end: usize,
    /// The interface the packet came in on.
    pub ifindex: u32,
    pub eth: *mut EthHdr,
    pub ip: Ip,
    pub proto: u8,
    pub ports: *mut Ports,
    pub check: *mut [u8; 2],
    /// TCP flags (0 otherwise).
    pub tcp_flags: u8,
    /// 0: not an ICMP error; `ICMP_UNREACHABLE`: a destination unreachable; `ICMP_OTHER_ERROR`:
    /// another error (packet too big, time exceeded).
    pub icmp: u8,
    pub inner: Ip,
    pub inner_proto: u8,
    /// L3 length (IPv4 total length, IPv6 payload length + 40), for counters and the FIB.
    pub ip_len: u16,
    /// Non-zero when at least one VLAN tag was parsed.
    pub vlan: u8,
}

impl Packet {
    /// Writes the 5-tuple of a TCP/UDP packet into `key` (see [`write_key`]).
    #[inline(always)]
    pub fn write_flow_key(&self, key: &mut FlowKey) {
        // SAFETY: the ports were bounds-checked by the parser.
        let ports = unsafe { mem::load32(self.ports.cast()) };
        write_key(key, self.ip, self.ip.src_ptr(), self.ip.dst_ptr(), ports, self.proto);
    }
}

/// Writes a flow key into `key` (in the scratch space, 8-aligned) as its five 64-bit words,
/// built in registers: `src` and `dst` are addresses of `ip` (`src_ptr`, `dst_ptr`: a
/// header's own, or the quoted one's swapped), `ports` the source and destination ports' four
/// bytes as `u32::from_ne_bytes` gives them. The flow table hashes and compares the key by
/// those words, and a word read back from one store is forwarded at once, where one spread
/// over narrower stores waits for them to retire.
#[inline(always)]
pub fn write_key(key: &mut FlowKey, ip: Ip, src: *const u8, dst: *const u8, ports: u32, proto: u8) {
    let (s, d, k) = (src, dst, core::ptr::from_mut(key).cast::<u64>());
    // SAFETY: the addresses are `ip`'s, bounds-checked by its parser; `key` is 40 bytes of a
    // map value, 8-aligned (asserted with `Scratch`).
    unsafe {
        if ip.is_v6() {
            k.write(join(mem::load32(s), mem::load32(s.add(4))));
            k.add(1).write(join(mem::load32(s.add(8)), mem::load32(s.add(12))));
            k.add(2).write(join(mem::load32(d), mem::load32(d.add(4))));
            k.add(3).write(join(mem::load32(d.add(8)), mem::load32(d.add(12))));
        } else {
            k.write(join(mem::load32(s), 0));
            k.add(1).write(0);
            k.add(2).write(join(mem::load32(d), 0));
            k.add(3).write(0);
        }
        k.add(4).write(join(ports, u32::from_ne_bytes([proto, ip.family(), 0, 0])));
    }
}

/// The 64-bit word whose first four bytes (in memory) are `lo`'s and last four `hi`'s.
#[inline(always)]
fn join(lo: u32, hi: u32) -> u64 {
    if cfg!(target_endian = "little") {
        u64::from(lo) | (u64::from(hi) << 32)
    } else {
        (u64::from(lo) << 32) | u64::from(hi)
    }
}

/// A pointer to a `T` at `offset` into the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Reason::MALFORMED);
    }
    Ok((start + offset) as *mut T)
}

/// Re-checks that a whole `T` starts at `p` inside the frame (for code that gets a pointer
/// from another function, where the verifier may know less about its range).
#[inline(always)]
pub fn recheck<T, U>(pkt: &Packet, p: *mut U) -> Result<*mut T, Reason> {
    if p as usize + size_of::<T>() > pkt.end {
        return Err(Reason::MALFORMED);
    }
    Ok(p.cast())
}

/// Puts `value` in the XDP metadata area in front of the frame (`bpf_xdp_adjust_meta`), for
/// the TC program. Every pointer into the frame is invalid afterwards. `false`: the driver
/// gives no metadata room.
#[inline(always)]
pub fn put_meta<T: Copy>(ctx: *mut xdp_md, value: &T) -> bool {
    const { assert!(size_of::<T>() <= 32 && size_of::<T>() % 4 == 0) };
    // SAFETY: the context is the program's own.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx, -(size_of::<T>() as i32)) } != 0 {
        return false;
    }
    // SAFETY: as above.
    let (meta, data) = unsafe { ((*ctx).data_meta as usize, (*ctx).data as usize) };
    if meta + size_of::<T>() > data {
        return false;
    }
    // SAFETY: bounds-checked just above.
    unsafe { crate::mem::copy(&mut *(meta as *mut T), value) };
    true
}

/// Copies the TC packet's metadata into `out`, if it holds a whole `T`.
#[inline(always)]
pub fn take_meta<T: Copy>(skb: *mut aya_ebpf::bindings::__sk_buff, out: &mut T) -> bool {
    // SAFETY: the context is the program's own.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + size_of::<T>() > data {
        return false;
    }
    // SAFETY: bounds-checked just above.
    crate::mem::copy(out, unsafe { &*(meta as *const T) });
    true
}

/// Ethernet and up to two VLAN tags: the header, the L3 ethertype and offset, and whether a
/// tag was seen.
#[inline(always)]
fn parse_eth(ctx: &XdpContext) -> Result<(*mut EthHdr, u16, usize, bool), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked just above.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;
    let mut vlan = false;
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // A tag is 2 bytes of TCI and 2 of the next ethertype.
        let tag: *const [u8; 4] = ptr_at(ctx, offset)?;
        // SAFETY: bounds-checked just above.
        ether_type = u16::from_be_bytes(unsafe { [(*tag)[2], (*tag)[3]] });
        offset += 4;
        vlan = true;
    }
    match ether_type {
        ETH_P_IP | ETH_P_IPV6 => Ok((eth, ether_type, offset, vlan)),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::VLAN),
        _ => Err(Reason::NOT_IP),
    }
}

/// IPv4: the header, the protocol, the offset of the L4 header and the total length.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<(Ip, u8, usize, u16), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let (vihl, frags, tot_len, proto) =
        unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).frags), (*ip).tot_len, (*ip).proto) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Reason::MALFORMED);
    }
    let tot = u16::from_be_bytes(tot_len);
    if usize::from(tot) < ihl || offset + usize::from(tot) > ctx.data_end() - ctx.data() {
        return Err(Reason::MALFORMED);
    }
    // More-fragments flag or a fragment offset.
    if frags & 0x3fff != 0 {
        return Err(Reason::FRAGMENT);
    }
    Ok((Ip::v4_at(ip), proto, offset + ihl, tot))
}

/// IPv6 and its skippable extension headers: the header, the upper protocol, the offset of
/// the L4 header and the L3 length.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<(Ip, u8, usize, u16), Reason> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let (vcf, payload, mut next) = unsafe { ((*ip).vcf, u16::from_be_bytes((*ip).payload_len), (*ip).next_hdr) };
    if vcf[0] >> 4 != 6 || offset + Ipv6Hdr::LEN + usize::from(payload) > ctx.data_end() - ctx.data() {
        return Err(Reason::MALFORMED);
    }
    let mut l4 = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_V6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: next header, length in 8-byte units.
            0 | 43 | 60 => {
                let ext: *const [u8; 2] = ptr_at(ctx, l4)?;
                // SAFETY: bounds-checked just above.
                let (n, len) = unsafe { ((*ext)[0], (*ext)[1]) };
                next = n;
                l4 += (usize::from(len) + 1) * 8;
            }
            44 => return Err(Reason::FRAGMENT),
            _ => return Ok((Ip::v6_at(ip), next, l4, payload.saturating_add(Ipv6Hdr::LEN as u16))),
        }
    }
    match next {
        0 | 43 | 60 | 44 => Err(Reason::IPV6_EXT),
        _ => Ok((Ip::v6_at(ip), next, l4, payload.saturating_add(Ipv6Hdr::LEN as u16))),
    }
}

/// TCP or UDP at `offset`: the ports, the checksum field and the TCP flags.
#[inline(always)]
fn parse_ports(
    ctx: &XdpContext,
    proto: u8,
    offset: usize,
    l3_end: usize,
) -> Result<(*mut Ports, *mut [u8; 2], u8), Reason> {
    match proto {
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, offset)?;
            // SAFETY: the whole fixed TCP header was bounds-checked just above; byte 12 holds
            // the data offset and byte 13 the flags.
            let (doff, flags) = unsafe {
                let raw = tcp.cast::<u8>();
                (*raw.add(12) >> 4, *raw.add(13))
            };
            // The header with its options must fit in the datagram.
            if doff < 5 || offset + usize::from(doff) * 4 > l3_end {
                return Err(Reason::MALFORMED);
            }
            // SAFETY: as above.
            let check = unsafe { core::ptr::addr_of_mut!((*tcp).check) };
            Ok((tcp.cast(), check, flags))
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked just above.
            let len = usize::from(u16::from_be_bytes(unsafe { (*udp).len }));
            // The UDP length covers its header and must fit in the datagram.
            if len < UdpHdr::LEN || offset + len > l3_end {
                return Err(Reason::MALFORMED);
            }
            // SAFETY: as above.
            let check = unsafe { core::ptr::addr_of_mut!((*udp).check) };
            Ok((udp.cast(), check, 0))
        }
        _ => Err(Reason::OTHER_L4),
    }
}

/// An ICMP/ICMPv6 error at `offset`: its checksum and the quoted packet (IP header, protocol
/// and the first 4 bytes of its TCP/UDP header).
#[inline(always)]
fn parse_icmp_error(
    ctx: &XdpContext,
    v6: bool,
    offset: usize,
) -> Result<(*mut [u8; 2], Ip, u8, *mut Ports, u8), Reason> {
    // Type, code, checksum, 4 bytes of rest: 8 bytes, then the quoted packet.
    let icmp: *mut [u8; 8] = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let kind = unsafe { (*icmp)[0] };
    let is_error = if v6 {
        // Destination unreachable, packet too big, time exceeded.
        matches!(kind, 1..=3)
    } else {
        // Destination unreachable (incl. fragmentation needed), time exceeded.
        matches!(kind, 3 | 11)
    };
    if !is_error {
        return Err(Reason::OTHER_L4);
    }
    let unreachable = if v6 { kind == 1 } else { kind == 3 };
    let icmp_kind = if unreachable { ICMP_UNREACHABLE } else { ICMP_OTHER_ERROR };
    // SAFETY: as above; bytes 2..4 are the checksum.
    let check = unsafe { icmp.cast::<u8>().add(2).cast::<[u8; 2]>() };
    let inner_off = offset + 8;
    let (inner, inner_proto, ports_off) = if v6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, inner_off)?;
        // SAFETY: bounds-checked just above.
        (Ip::v6_at(ip), unsafe { (*ip).next_hdr }, inner_off + Ipv6Hdr::LEN)
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, inner_off)?;
        // SAFETY: bounds-checked just above.
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < Ipv4Hdr::LEN {
            return Err(Reason::MALFORMED);
        }
        (Ip::v4_at(ip), proto, inner_off + ihl)
    };
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
        return Err(Reason::OTHER_L4);
    }
    let inner_ports: *mut Ports = ptr_at(ctx, ports_off)?;
    Ok((check, inner, inner_proto, inner_ports, icmp_kind))
}

/// `Packet::icmp` of an ICMP/ICMPv6 destination unreachable.
pub const ICMP_UNREACHABLE: u8 = 2;
/// `Packet::icmp` of another ICMP error.
pub const ICMP_OTHER_ERROR: u8 = 1;

/// Parses a frame down to the L4 ports, or says why it will not be translated.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let (eth, ether_type, l3_off, vlan) = parse_eth(ctx)?;
    let (ip, proto, l4_off, ip_len) =
        if ether_type == ETH_P_IP { parse_ipv4(ctx, l3_off)? } else { parse_ipv6(ctx, l3_off)? };
    let vlan = u8::from(vlan);
    let icmp_v6 = match proto {
        PROTO_ICMP if !ip.is_v6() => Some(false),
        PROTO_ICMPV6 if ip.is_v6() => Some(true),
        _ => None,
    };
    let (ports, check, tcp_flags, icmp, inner, inner_proto) = match icmp_v6 {
        Some(v6) => {
            let (check, inner, inner_proto, ports, kind) = parse_icmp_error(ctx, v6, l4_off)?;
            (ports, check, 0, kind, inner, inner_proto)
        }
        None => {
            let (ports, check, tcp_flags) = parse_ports(ctx, proto, l4_off, l3_off + usize::from(ip_len))?;
            (ports, check, tcp_flags, 0, ip, 0)
        }
    };
    Ok(Packet {
        ctx: ctx.ctx,
        end: ctx.data_end(),
        ifindex: ctx.ingress_ifindex() as u32,
        eth,
        ip,
        proto,
        ports,
        check,
        tcp_flags,
        icmp,
        inner,
        inner_proto,
        ip_len,
        vlan,
    })
}
