//! The hostile-packet corpus: named cases kept as data files in `tests/corpus/*.case`, so a new
//! case is a new file. [`generate`] builds the shipped ones (run `cargo run -p switcher-tests
//! --bin corpus` to rewrite them); the `corpus` test runs every file it finds.
//!
//! A case file:
//!
//! ```text
//! # what the case is (comment lines)
//! action: pass            # pass | drop | tx | redirect
//! reason: malformed       # the one STATS reason it must count
//! in: 0200…               # the frame, hex
//! out: same               # `same` (byte-identical), or the expected frame in hex
//! ```
//!
//! Cases run against [`services`] with `redirect: false` (every rewrite goes to the kernel's
//! path, so outputs do not depend on routes) and must never insert a flow unless they rewrite.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::PacketBuilder;
use switcher_common::user::Colour;
use switcher_user::config::{BackendConfig, DrainAction, HealthConfig, Mode, Protocol, ServiceConfig};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const BLUE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
pub const BLUE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);

/// The services the corpus (and the property test) run against: web (TCP 80) and dns (UDP
/// 53) on the IPv4 and IPv6 VIPs, blue active.
#[must_use]
pub fn services() -> Vec<ServiceConfig> {
    let one = |ip: IpAddr, port| vec![BackendConfig { addr: SocketAddr::new(ip, port), weight: 1 }];
    let base = ServiceConfig {
        name: "web".into(),
        vip: IpAddr::V4(VIP),
        port: 80,
        preview_port: None,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        active: Colour::Blue,
        blue: one(IpAddr::V4(BLUE), 8080),
        green: one(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 18)), 8080),
        drain_timeout: None,
        on_drain_timeout: DrainAction::Move,
        health: HealthConfig::default_for(Protocol::Tcp),
        watch: None,
        failover: false,
        rollout: switcher_user::config::RolloutConfig::default(),
        shadow: switcher_user::shadow::ShadowSetting::default(),
    };
    vec![
        base.clone(),
        ServiceConfig {
            name: "dns".into(),
            port: 53,
            protocol: Protocol::Udp,
            blue: one(IpAddr::V4(BLUE), 5353),
            ..base.clone()
        },
        ServiceConfig {
            name: "web6".into(),
            vip: IpAddr::V6(VIP6),
            blue: one(IpAddr::V6(BLUE6), 8080),
            green: one(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2)), 8080),
            ..base.clone()
        },
        ServiceConfig {
            name: "dns6".into(),
            vip: IpAddr::V6(VIP6),
            port: 53,
            protocol: Protocol::Udp,
            blue: one(IpAddr::V6(BLUE6), 5353),
            green: vec![],
            ..base
        },
    ]
}

/// One parsed case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub about: String,
    pub action: u32,
    pub reason: String,
    pub input: Vec<u8>,
    /// `None`: the frame must leave byte-identical.
    pub output: Option<Vec<u8>>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

fn action_name(a: u32) -> &'static str {
    match a {
        XDP_DROP => "drop",
        XDP_TX => "tx",
        XDP_REDIRECT => "redirect",
        _ => "pass",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}

impl Case {
    /// The file text of a case.
    #[must_use]
    pub fn to_file(&self) -> String {
        let out = self.output.as_ref().map_or_else(|| "same".to_owned(), |o| hex(o));
        format!(
            "# {}\naction: {}\nreason: {}\nin: {}\nout: {}\n",
            self.about,
            action_name(self.action),
            self.reason,
            hex(&self.input),
            out
        )
    }

    /// Parses a case file.
    ///
    /// # Errors
    /// What is missing or malformed.
    pub fn parse(name: &str, text: &str) -> Result<Case, String> {
        let mut about = Vec::new();
        let (mut action, mut reason, mut input, mut output) = (None, None, None, None);
        for line in text.lines() {
            if let Some(c) = line.strip_prefix('#') {
                about.push(c.trim().to_owned());
            } else if let Some((k, v)) = line.split_once(':') {
                let v = v.split('#').next().unwrap_or("").trim();
                match k.trim() {
                    "action" => {
                        action = Some(match v {
                            "pass" => XDP_PASS,
                            "drop" => XDP_DROP,
                            "tx" => XDP_TX,
                            "redirect" => XDP_REDIRECT,
                            other => return Err(format!("unknown action {other:?}")),
                        });
                    }
                    "reason" => reason = Some(v.to_owned()),
                    "in" => input = Some(unhex(v)?),
                    "out" => output = Some(if v == "same" { None } else { Some(unhex(v)?) }),
                    other => return Err(format!("unknown key {other:?}")),
                }
            }
        }
        Ok(Case {
            name: name.to_owned(),
            about: about.join(" "),
            action: action.ok_or("no action")?,
            reason: reason.ok_or("no reason")?,
            input: input.ok_or("no in")?,
            output: output.ok_or("no out")?,
        })
    }
}

fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = LB_MAC.to_vec();
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&ether_type.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn tcp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ttl: u8) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), ttl)
        .tcp(src.1, dst.1, 100, 64_000)
        .syn()
        .write(&mut v, b"")
        .expect("tcp4");
    v
}

fn udp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut v, b"query")
        .expect("udp4");
    v
}

fn with_ext6(exts: &[(u8, u8)], proto: u8, l4: &[u8]) -> Vec<u8> {
    // IPv6 header + extension headers (next, hdr_ext_len=0 → 8 bytes each) + L4 bytes.
    let mut body = Vec::new();
    for i in 0..exts.len() {
        let next = exts.get(i + 1).map_or(proto, |(k, _)| *k);
        body.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    }
    body.extend_from_slice(l4);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
    ip.push(exts.first().map_or(proto, |(k, _)| *k));
    ip.push(64);
    ip.extend_from_slice(&CLIENT6.octets());
    ip.extend_from_slice(&VIP6.octets());
    ip.extend_from_slice(&body);
    let mut f = LB_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// A TCP or UDP header with a correct checksum over IPv6 addresses (for extension cases).
fn l4_6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), udp: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ipv6(src.0.octets(), dst.0.octets(), 64);
    if udp {
        b.udp(src.1, dst.1).write(&mut v, b"q6").expect("udp6");
    } else {
        b.tcp(src.1, dst.1, 100, 64_000).syn().write(&mut v, b"").expect("tcp6");
    }
    v.split_off(40)
}

fn set(mut v: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    v[at..at + bytes.len()].copy_from_slice(bytes);
    v
}

/// Recomputes the IPv4 header checksum of an Ethernet frame.
fn fix_ip4(mut v: Vec<u8>) -> Vec<u8> {
    let ihl = usize::from(v[14] & 0x0f) * 4;
    v[24] = 0;
    v[25] = 0;
    let end = (14 + ihl).min(v.len());
    let c = switcher_common::csum::checksum(0, &v[14..end]);
    v[24..26].copy_from_slice(&c);
    v
}

fn vlan(frame: &[u8]) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    v.extend_from_slice(&frame[12..]);
    v
}

/// A ones'-complement-wrong checksum: off by one in the sum.
fn skew(check: [u8; 2]) -> [u8; 2] {
    let s = u32::from(!u16::from_be_bytes(check)) + 1;
    (!(((s & 0xffff) + (s >> 16)) as u16)).to_be_bytes()
}

/// The shipped corpus.
#[must_use]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
pub fn generate() -> Vec<Case> {
    let c = |n: u16| (CLIENT, 40_000 + n);
    let web = (VIP, 80);
    let dns = (VIP, 53);
    let pass = |name: &str, about: &str, reason: &str, input: Vec<u8>| Case {
        name: name.into(),
        about: about.into(),
        action: XDP_PASS,
        reason: reason.into(),
        input,
        output: None,
    };
    let rewrite = |name: &str, about: &str, input: Vec<u8>, output: Vec<u8>| Case {
        name: name.into(),
        about: about.into(),
        action: XDP_PASS,
        reason: "fwd_kernel".into(),
        input,
        output: Some(output),
    };
    let syn = tcp4(c(1), web, 64);
    let mut cases = vec![
        pass(
            "eth-only-ipv4",
            "an Ethernet header announcing IPv4, and nothing after it",
            "malformed",
            eth(0x0800, &[]),
        ),
        pass(
            "eth-only-ipv6",
            "an Ethernet header announcing IPv6, and nothing after it",
            "malformed",
            eth(0x86dd, &[]),
        ),
        pass("vlan-tag-cut", "a VLAN tag cut in the middle", "malformed", eth(0x8100, &[0x00, 0x0a])),
        pass(
            "vlan-then-nothing",
            "a whole VLAN tag announcing IPv4, and nothing after it",
            "malformed",
            eth(0x8100, &[0x00, 0x0a, 0x08, 0x00]),
        ),
        pass("ipv4-cut-mid-header", "an IPv4 header cut after 10 bytes", "malformed", syn[..24].to_vec()),
        pass("ipv4-19-bytes", "an IPv4 header one byte short", "malformed", syn[..33].to_vec()),
        pass("ipv4-ihl-4", "IHL 4 (16 bytes), below the minimum", "malformed", fix_ip4(set(syn.clone(), 14, &[0x44]))),
        pass(
            "ipv4-ihl-15-short",
            "IHL 15 (60 bytes) in a 40-byte datagram",
            "malformed",
            fix_ip4(set(syn.clone(), 14, &[0x4f])),
        ),
        pass("ipv4-version-6", "version 6 in an IPv4-typed frame", "malformed", fix_ip4(set(syn.clone(), 14, &[0x65]))),
        pass(
            "ipv4-totlen-below-headers",
            "total length 20: the TCP header is outside the datagram",
            "malformed",
            fix_ip4(set(syn.clone(), 16, &[0, 20])),
        ),
        pass(
            "ipv4-totlen-beyond-frame",
            "total length 1400 in a 54-byte frame",
            "malformed",
            fix_ip4(set(syn.clone(), 16, &[0x05, 0x78])),
        ),
        pass("ipv4-first-fragment", "MF set, offset 0", "fragment", fix_ip4(set(syn.clone(), 20, &[0x20, 0x00]))),
        pass("ipv4-middle-fragment", "MF set, offset 8", "fragment", fix_ip4(set(udp4(c(2), dns), 20, &[0x20, 0x01]))),
        pass("ipv4-last-fragment", "MF clear, offset 8", "fragment", fix_ip4(set(udp4(c(3), dns), 20, &[0x00, 0x01]))),
        pass("tcp-cut-mid-header", "a TCP header cut after 10 bytes", "malformed", syn[..44].to_vec()),
        pass("tcp-19-bytes", "a TCP header one byte short", "malformed", syn[..53].to_vec()),
        pass("tcp-doff-4", "TCP data offset 4, below the minimum", "malformed", set(syn.clone(), 46, &[0x40])),
        pass(
            "tcp-doff-beyond-packet",
            "TCP data offset 15 (60 bytes) in a 20-byte segment",
            "malformed",
            set(syn.clone(), 46, &[0xf0]),
        ),
        pass(
            "udp-cut",
            "a UDP header cut after 4 bytes",
            "malformed",
            fix_ip4(set(udp4(c(4), dns)[..38].to_vec(), 16, &[0, 24])),
        ),
        pass("udp-length-0", "UDP length 0", "malformed", set(udp4(c(5), dns), 38, &[0, 0])),
        pass("udp-length-4", "UDP length 4, shorter than its header", "malformed", set(udp4(c(6), dns), 38, &[0, 4])),
        pass(
            "udp-length-beyond-datagram",
            "UDP length 200 in a 13-byte datagram",
            "malformed",
            set(udp4(c(7), dns), 38, &[0, 200]),
        ),
        pass(
            "arp",
            "ARP request for the VIP",
            "not_ip",
            eth(
                0x0806,
                &[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 0x0c, 192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 203, 0, 113, 10],
            ),
        ),
        pass("lldp", "an LLDP frame", "not_ip", eth(0x88cc, &[0x02, 0x07, 0x04, 0x02, 0, 0, 0, 0, 0x0c, 0, 0])),
        pass("unknown-ethertype", "ethertype 0x88b5 (local experimental)", "not_ip", eth(0x88b5, &[1, 2, 3, 4])),
        pass("vlan-triple", "three VLAN tags: more than parsed", "vlan", vlan(&vlan(&vlan(&syn)))),
        pass("ip-broadcast-udp", "UDP to 255.255.255.255", "no_match", udp4(c(8), (Ipv4Addr::BROADCAST, 53))),
        pass("ip-multicast-udp", "UDP to 224.0.0.251", "no_match", udp4(c(9), (Ipv4Addr::new(224, 0, 0, 251), 5353))),
        pass(
            "backend-packet-without-flow",
            "a packet from a backend that belongs to no flow",
            "no_match",
            tcp4((BLUE, 8080), c(10), 64),
        ),
        pass(
            "vip-unconfigured-port",
            "TCP to the VIP on a port no service has",
            "no_match",
            tcp4(c(11), (VIP, 81), 64),
        ),
        pass("vip-wrong-protocol", "UDP to the TCP service's port", "no_match", udp4(c(12), (VIP, 80))),
    ];
    // ICMP and other protocols.
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .expect("echo");
    cases.push(pass("icmp-echo-to-vip", "an ICMP echo request to the VIP", "other_l4", echo.clone()));
    cases.push(pass(
        "icmp-cut",
        "an ICMP header cut after 4 bytes",
        "malformed",
        fix_ip4(set(echo[..38].to_vec(), 16, &[0, 24])),
    ));
    let quote = {
        let mut q = Vec::new();
        PacketBuilder::ipv4(VIP.octets(), CLIENT.octets(), 60).tcp(80, 40_013, 1, 1000).write(&mut q, b"").expect("q");
        q.truncate(28);
        q
    };
    let mut frag_needed = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4([192, 0, 2, 14], VIP.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut frag_needed, &quote)
        .expect("icmp");
    cases.push(pass(
        "icmp-error-untracked",
        "fragmentation needed about a flow that is not tracked",
        "no_match",
        frag_needed.clone(),
    ));
    let cut = frag_needed[..14 + 20 + 8 + 12].to_vec();
    cases.push(pass(
        "icmp-error-quote-cut",
        "an ICMP error whose quoted IPv4 header is cut",
        "malformed",
        fix_ip4(set(cut, 16, &[0, 40])),
    ));
    let mut sctp = tcp4(c(14), (VIP, 80), 64);
    sctp[23] = 132;
    cases.push(pass("sctp-to-vip", "SCTP (protocol 132) to the VIP", "other_l4", fix_ip4(sctp)));
    let mut gre = tcp4(c(15), (VIP, 80), 64);
    gre[23] = 47;
    cases.push(pass("gre-to-vip", "GRE (protocol 47) to the VIP", "other_l4", fix_ip4(gre)));
    // IPv6.
    let tcp6 = l4_6((CLIENT6, 40_100), (VIP6, 80), false);
    let tcp6_out = l4_6((CLIENT6, 40_100), (BLUE6, 8080), false);
    let six = |exts: &[(u8, u8)], l4: &[u8]| with_ext6(exts, 6, l4);
    let to_blue6 = |f: Vec<u8>| set(f, 14 + 24, &BLUE6.octets());
    cases.push(pass(
        "ipv6-cut-mid-header",
        "an IPv6 header cut after 20 bytes",
        "malformed",
        six(&[], &tcp6)[..34].to_vec(),
    ));
    cases.push(pass(
        "ipv6-payload-beyond-frame",
        "IPv6 payload length 1000 in a short frame",
        "malformed",
        set(six(&[], &tcp6), 18, &[0x03, 0xe8]),
    ));
    cases.push(rewrite(
        "ipv6-hop-by-hop-service",
        "IPv6 hop-by-hop options, then TCP to the service: translated",
        six(&[(0, 0)], &tcp6),
        to_blue6(six(&[(0, 0)], &tcp6_out)),
    ));
    cases.push(rewrite(
        "ipv6-routing-service",
        "an IPv6 routing header, then TCP to the service: translated",
        six(&[(43, 0)], &tcp6),
        to_blue6(six(&[(43, 0)], &tcp6_out)),
    ));
    let udp6 = l4_6((CLIENT6, 40_101), (VIP6, 53), true);
    let udp6_out = l4_6((CLIENT6, 40_101), (BLUE6, 5353), true);
    cases.push(rewrite(
        "ipv6-dstopts-udp-service",
        "IPv6 destination options, then UDP to the service: translated",
        with_ext6(&[(60, 0)], 17, &udp6),
        to_blue6(with_ext6(&[(60, 0)], 17, &udp6_out)),
    ));
    cases.push(pass("ipv6-fragment-header", "an IPv6 fragment header", "fragment", six(&[(44, 0)], &tcp6)));
    cases.push(pass(
        "ipv6-long-ext-chain",
        "five extension headers: more than parsed",
        "ipv6_ext",
        six(&[(0, 0), (60, 0), (60, 0), (60, 0), (60, 0)], &tcp6),
    ));
    // One byte of the extension header, and a payload length that says so.
    cases.push(pass(
        "ipv6-ext-cut",
        "an IPv6 extension header cut short",
        "malformed",
        set(six(&[(60, 0)], &tcp6)[..14 + 40 + 1].to_vec(), 18, &[0, 1]),
    ));
    let mut echo6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6.octets(), VIP6.octets(), 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut echo6, b"ping")
        .expect("echo6");
    cases.push(pass("icmpv6-echo-to-vip", "an ICMPv6 echo request to the VIP", "other_l4", echo6));
    // Translated cases.
    cases.push(rewrite(
        "tcp-syn-service",
        "a plain TCP SYN to the service: translated to blue",
        tcp4(c(20), web, 64),
        tcp4(c(20), (BLUE, 8080), 64),
    ));
    cases.push(rewrite(
        "ttl-1-service",
        "TTL 1: translated and left to the kernel, which answers time exceeded",
        tcp4(c(21), web, 1),
        tcp4(c(21), (BLUE, 8080), 1),
    ));
    let opts = |dst: (Ipv4Addr, u16)| {
        let mut ip =
            etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, CLIENT.octets(), dst.0.octets()).expect("ip");
        ip.options = [1u8, 1, 1, 0][..].try_into().expect("options");
        let mut v = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
            .udp(40_022, dst.1)
            .write(&mut v, b"q")
            .expect("opts");
        v
    };
    cases.push(rewrite(
        "ipv4-options-service",
        "IPv4 options, then UDP to the service: translated, options kept",
        opts(dns),
        opts((BLUE, 5353)),
    ));
    let zero = |mut v: Vec<u8>| {
        v[40] = 0;
        v[41] = 0;
        v
    };
    cases.push(rewrite(
        "udp-checksum-zero-service",
        "UDP checksum 0 (none): translated, stays 0",
        zero(udp4(c(23), dns)),
        zero(udp4(c(23), (BLUE, 5353))),
    ));
    let bad_tcp = |mut v: Vec<u8>| {
        let k = skew([v[50], v[51]]);
        v[50..52].copy_from_slice(&k);
        v
    };
    cases.push(rewrite(
        "tcp-bad-checksum-service",
        "a wrong TCP checksum: translated, exactly as wrong (the receiver drops it)",
        bad_tcp(tcp4(c(24), web, 64)),
        bad_tcp(tcp4(c(24), (BLUE, 8080), 64)),
    ));
    let bad_udp = |mut v: Vec<u8>| {
        let k = skew([v[40], v[41]]);
        v[40..42].copy_from_slice(&k);
        v
    };
    cases.push(rewrite(
        "udp-bad-checksum-service",
        "a wrong UDP checksum: translated, exactly as wrong",
        bad_udp(udp4(c(25), dns)),
        bad_udp(udp4(c(25), (BLUE, 5353))),
    ));
    cases.push(rewrite(
        "vlan-single-service",
        "one VLAN tag: translated, left to the kernel's VLAN device",
        vlan(&tcp4(c(26), web, 64)),
        vlan(&tcp4(c(26), (BLUE, 8080), 64)),
    ));
    cases.push(rewrite(
        "vlan-double-service",
        "two VLAN tags (QinQ): translated",
        vlan(&vlan(&tcp4(c(27), web, 64))),
        vlan(&vlan(&tcp4(c(27), (BLUE, 8080), 64))),
    ));
    let bcast_mac = |mut v: Vec<u8>| {
        v[..6].copy_from_slice(&[0xff; 6]);
        v
    };
    cases.push(rewrite(
        "broadcast-mac-service",
        "a service packet to the broadcast MAC: translated (MACs are the kernel's business on this path)",
        bcast_mac(tcp4(c(28), web, 64)),
        bcast_mac(tcp4(c(28), (BLUE, 8080), 64)),
    ));
    let mcast_mac = |mut v: Vec<u8>| {
        v[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
        v
    };
    cases.push(rewrite(
        "multicast-mac-service",
        "a service packet to a multicast MAC: translated",
        mcast_mac(udp4(c(29), dns)),
        mcast_mac(udp4(c(29), (BLUE, 5353))),
    ));
    cases
}
