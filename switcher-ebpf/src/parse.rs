//! Every bounds check of the program lives here.
//!
//! Policy for what this version does not translate — it never drops, it passes and counts:
//! - non-IPv4 ethertypes (ARP, IPv6, LLDP, …): `XDP_PASS`, `NOT_IPV4`;
//! - VLAN-tagged frames (802.1Q / 802.1ad): `XDP_PASS`, `VLAN`;
//! - IPv4 fragments (MF set or a non-zero offset): `XDP_PASS`, `FRAGMENT`, because only the first
//!   fragment carries ports, and rewriting it alone would split the datagram across backends;
//! - IPv4 options are fine: the L4 header is found through IHL;
//! - anything cut short or inconsistent (IHL < 5, total length beyond the frame or shorter than
//!   the headers, TCP data offset < 5): `XDP_PASS`, `MALFORMED`;
//! - protocols other than TCP and UDP: `XDP_PASS`, `OTHER_L4`.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use switcher_common::{FlowKey, PROTO_TCP, PROTO_UDP, Reason};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// Source and destination ports: the first four bytes of TCP and UDP headers alike.
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// A parsed TCP or UDP over IPv4 packet, as pointers into the frame.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// The L4 checksum field.
    pub check: *mut [u8; 2],
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 total length, for the byte counters.
    pub ip_len: u16,
}

impl Packet {
    #[inline(always)]
    pub fn dst(&self) -> [u8; 4] {
        // SAFETY: `ip` was bounds-checked by `parse`.
        unsafe { (*self.ip).dst_addr }
    }

    #[inline(always)]
    pub fn dport(&self) -> [u8; 2] {
        // SAFETY: `ports` was bounds-checked by `parse`.
        unsafe { (*self.ports).dst }
    }

    /// The packet's 5-tuple as it is on the wire.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        // SAFETY: both pointers were bounds-checked by `parse`.
        unsafe {
            FlowKey {
                src: (*self.ip).src_addr,
                dst: (*self.ip).dst_addr,
                sport: (*self.ports).src,
                dport: (*self.ports).dst,
                proto: self.proto,
                _pad: [0; 3],
            }
        }
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

/// Ethernet: returns the header and the offset of the IPv4 header.
#[inline(always)]
fn parse_eth(ctx: &XdpContext) -> Result<(*mut EthHdr, usize), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked just above.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => Ok((eth, EthHdr::LEN)),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::VLAN),
        _ => Err(Reason::NOT_IPV4),
    }
}

/// IPv4: returns the header, the protocol and the offset of the L4 header.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<(*mut Ipv4Hdr, u8, usize), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let (vihl, frags, tot_len, proto) =
        unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).frags), (*ip).tot_len, (*ip).proto) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Reason::MALFORMED);
    }
    let tot_len = usize::from(u16::from_be_bytes(tot_len));
    if tot_len < ihl || offset + tot_len > ctx.data_end() - ctx.data() {
        return Err(Reason::MALFORMED);
    }
    // More-fragments flag or a fragment offset.
    if frags & 0x3fff != 0 {
        return Err(Reason::FRAGMENT);
    }
    Ok((ip, proto, offset + ihl))
}

/// TCP or UDP: returns the ports, the checksum field and the TCP flags.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, proto: u8, offset: usize) -> Result<(*mut Ports, *mut [u8; 2], u8), Reason> {
    match proto {
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, offset)?;
            // SAFETY: the whole fixed TCP header was bounds-checked just above; byte 12 holds
            // the data offset and byte 13 the flags.
            let (doff, flags) = unsafe {
                let raw = tcp.cast::<u8>();
                (*raw.add(12) >> 4, *raw.add(13))
            };
            if doff < 5 {
                return Err(Reason::MALFORMED);
            }
            // SAFETY: as above.
            let check = unsafe { core::ptr::addr_of_mut!((*tcp).check) };
            Ok((tcp.cast(), check, flags))
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked just above.
            let check = unsafe { core::ptr::addr_of_mut!((*udp).check) };
            Ok((udp.cast(), check, 0))
        }
        _ => Err(Reason::OTHER_L4),
    }
}

/// Parses a frame down to the L4 ports, or says why it will not be translated.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let (eth, ip_off) = parse_eth(ctx)?;
    let (ip, proto, l4_off) = parse_ipv4(ctx, ip_off)?;
    let (ports, check, tcp_flags) = parse_l4(ctx, proto, l4_off)?;
    // SAFETY: `ip` was bounds-checked by `parse_ipv4`.
    let ip_len = u16::from_be_bytes(unsafe { (*ip).tot_len });
    Ok(Packet { eth, ip, ports, check, proto, tcp_flags, ip_len })
}
