//! T1: the real XDP program run with `BPF_PROG_TEST_RUN` on crafted packets.
//!
//! Inputs and expected outputs are built independently with etherparse, which computes every
//! checksum from scratch, so a byte-exact match proves the program's incremental updates.
//! The program runs on a thread inside a private namespace whose routes make the FIB answer
//! three ways: BLUE and CLIENT have a route and a permanent neighbour (fast path: redirect,
//! TTL decremented, MACs set), GREEN has no route and CLIENT2 no neighbour (kernel path:
//! rewritten packet passed up, TTL untouched).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use switcher_common::user::Colour;
use switcher_user::{
    config::{BackendConfig, DrainAction, HealthConfig, Mode, Protocol, ServiceConfig},
    dataplane::{Dataplane, Options},
};

use crate::net::{BLUE, CLIENT, GREEN, Netns, VIP, unique_prefix};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// The router between the client and the LB, which sends "fragmentation needed".
const LB_GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 14);
/// UDP idle timeout of the program under test.
const IDLE: Duration = Duration::from_secs(1);
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
/// The MAC of the namespace's `t0` and of the neighbours behind it.
const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// A client on a connected subnet without a neighbour entry.
const CLIENT2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
/// web's preview port.
const PREVIEW: u16 = 8088;
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
const BLUE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const GREEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// Service ids, in `services()` order.
const WEB: u32 = 0;
const DNS: u32 = 1;
const WEB6: u32 = 3;

fn backend(ip: Ipv4Addr, port: u16) -> Vec<BackendConfig> {
    vec![BackendConfig { addr: SocketAddr::new(IpAddr::V4(ip), port), weight: 1 }]
}

fn services() -> Vec<ServiceConfig> {
    let web = ServiceConfig {
        name: "web".into(),
        vip: IpAddr::V4(VIP),
        port: 80,
        preview_port: Some(PREVIEW),
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        active: Colour::Blue,
        blue: backend(BLUE, 8080),
        green: backend(GREEN, 8081),
        drain_timeout: None,
        on_drain_timeout: DrainAction::Move,
        health: HealthConfig::default_for(Protocol::Tcp),
        watch: None,
        failover: false,
        rollout: switcher_user::config::RolloutConfig::default(),
        shadow: switcher_user::shadow::ShadowSetting::default(),
    };
    let dns = ServiceConfig {
        name: "dns".into(),
        port: 53,
        protocol: Protocol::Udp,
        blue: backend(BLUE, 5353),
        green: backend(GREEN, 5354),
        ..web.clone()
    };
    let blue_only =
        ServiceConfig { name: "blue-only".into(), port: 81, preview_port: None, green: vec![], ..web.clone() };
    let web6 = ServiceConfig {
        name: "web6".into(),
        vip: IpAddr::V6(VIP6),
        preview_port: None,
        blue: vec![BackendConfig { addr: SocketAddr::new(IpAddr::V6(BLUE6), 8080), weight: 1 }],
        green: vec![BackendConfig { addr: SocketAddr::new(IpAddr::V6(GREEN6), 8080), weight: 1 }],
        ..web.clone()
    };
    let dsr = ServiceConfig {
        name: "dsr".into(),
        port: 443,
        preview_port: None,
        mode: Mode::Dsr,
        blue: backend(BLUE, 443),
        green: backend(GREEN, 443),
        ..web.clone()
    };
    vec![web, dns, blue_only, web6, dsr]
}

#[derive(Clone, Copy)]
enum Tcp {
    Syn,
    Ack,
    SynAck,
    Fin,
}

/// The L2 addresses a frame carries.
#[derive(Clone, Copy)]
struct L2 {
    src: [u8; 6],
    dst: [u8; 6],
}

const IN: L2 = L2 { src: CLIENT_MAC, dst: LB_MAC };
const OUT: L2 = L2 { src: OUT_MAC, dst: NEIGH_MAC };

/// The TCP flags of `kind` (and acknowledgement number 77 where ACK is set).
fn with_flags(
    b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    kind: Tcp,
) -> etherparse::PacketBuilderStep<etherparse::TcpHeader> {
    match kind {
        Tcp::Syn => b.syn(),
        Tcp::Ack => b.ack(77),
        Tcp::SynAck => b.syn().ack(77),
        Tcp::Fin => b.fin().ack(77),
    }
}

fn tcp(l2: L2, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ttl: u8, kind: Tcp) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv4(src.0.octets(), dst.0.octets(), ttl)
        .tcp(src.1, dst.1, 1000, 64_000);
    let b = with_flags(b, kind);
    let payload: &[u8] = match kind {
        Tcp::Ack => b"GET / HTTP/1.0\r\n\r\n",
        _ => b"",
    };
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build tcp");
    v
}

fn udp(l2: L2, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ttl: u8) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv4(src.0.octets(), dst.0.octets(), ttl)
        .udp(src.1, dst.1)
        .write(&mut v, b"query")
        .expect("build udp");
    v
}

/// The same frame with the UDP checksum set to 0 ("none").
fn no_udp_csum(mut v: Vec<u8>) -> Vec<u8> {
    v[14 + 20 + 6] = 0;
    v[14 + 20 + 7] = 0;
    v
}

/// One step of the table.
enum Step {
    /// A packet, its description, the expected action and reason, and the expected output
    /// (`None`: the frame must leave byte-identical).
    Packet { what: &'static str, input: Vec<u8>, action: u32, reason: &'static str, output: Option<Vec<u8>> },
    /// A cut-over of service `id`.
    Active(u32, Colour),
}

fn pkt(what: &'static str, input: Vec<u8>, action: u32, reason: &'static str, output: Option<Vec<u8>>) -> Step {
    Step::Packet { what, input, action, reason, output }
}

#[track_caller]
fn check(dp: &mut Dataplane, step: Step) {
    let (what, input, action, reason, output) = match step {
        Step::Active(id, colour) => {
            dp.set_state(id, colour, 0, None).expect("set state");
            return;
        }
        Step::Packet { what, input, action, reason, output } => (what, input, action, reason, output),
    };
    let before = dp.reasons().expect("reasons");
    let mut out = vec![0u8; input.len() + 256];
    let result = dp
        .program()
        .expect("program")
        .test_run(TestRunOptions { data_in: Some(&input), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    assert_eq!(result.return_value, action, "{what}: XDP action");
    let after = dp.reasons().expect("reasons");
    let delta: Vec<(&str, u64)> =
        before.iter().zip(&after).filter(|(b, a)| a.1 != b.1).map(|(b, a)| (a.0, a.1 - b.1)).collect();
    assert_eq!(delta, [(reason, 1)], "{what}: exactly one reason counted");
    let expected = output.unwrap_or(input);
    assert_eq!(hex(&out), hex(&expected), "{what}: output bytes");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A namespace with `t0` (MAC `OUT_MAC`) holding routes to BLUE and CLIENT (permanent
/// neighbours), and forwarding on.
fn fib_namespace() -> Netns {
    let ns = Netns::new(format!("{}-t1", unique_prefix()));
    ns.ip(&["link", "add", "t0", "type", "veth", "peer", "name", "t1"]);
    ns.ip(&["link", "set", "t0", "address", "02:00:00:00:00:01"]);
    ns.ip(&["link", "set", "t0", "up"]);
    ns.ip(&["link", "set", "t1", "up"]);
    ns.ip(&["addr", "add", "198.51.100.1/28", "dev", "t0"]);
    ns.ip(&["addr", "add", "192.0.2.1/28", "dev", "t0"]);
    ns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "t0", "nodad"]);
    ns.ip(&["addr", "add", "2001:db8:c::1/64", "dev", "t0", "nodad"]);
    for n in [BLUE.to_string(), CLIENT.to_string(), BLUE6.to_string(), CLIENT6.to_string()] {
        ns.ip(&["neigh", "replace", &n, "lladdr", "02:00:00:00:00:02", "dev", "t0", "nud", "permanent"]);
    }
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    ns
}

#[test]
fn data_path_table() {
    if !crate::have_root("data_path_table") {
        return;
    }
    let ns = fib_namespace();
    ns.run(move || {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load the XDP program");
        let c = (CLIENT, 40000);
        let c2 = (CLIENT2, 40001);
        let steps = vec![
            pkt(
                "TCP SYN to web goes to blue, redirected with TTL-1 and new MACs",
                tcp(IN, c, (VIP, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, c, (BLUE, 8080), 63, Tcp::Syn)),
            ),
            pkt(
                "blue's SYN-ACK is answered from the VIP",
                tcp(IN, (BLUE, 8080), c, 64, Tcp::Ack),
                XDP_REDIRECT,
                "reply_redirect",
                Some(tcp(OUT, (VIP, 80), c, 63, Tcp::Ack)),
            ),
            Step::Active(0, Colour::Green),
            pkt(
                "after the cut-over, the established flow stays on blue",
                tcp(IN, c, (VIP, 80), 64, Tcp::Ack),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, c, (BLUE, 8080), 63, Tcp::Ack)),
            ),
            pkt(
                "a new flow goes to green (no route: passed to the kernel, TTL untouched)",
                tcp(IN, c2, (VIP, 80), 64, Tcp::Syn),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp(IN, c2, (GREEN, 8081), 64, Tcp::Syn)),
            ),
            pkt(
                "green's reply to a client without a neighbour entry is passed up, from the VIP",
                tcp(IN, (GREEN, 8081), c2, 64, Tcp::Ack),
                XDP_PASS,
                "reply_kernel",
                Some(tcp(IN, (VIP, 80), c2, 64, Tcp::Ack)),
            ),
            pkt(
                "a SYN reusing the blue flow's 5-tuple starts a new flow on green",
                tcp(IN, c, (VIP, 80), 64, Tcp::Syn),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp(IN, c, (GREEN, 8081), 64, Tcp::Syn)),
            ),
            pkt(
                "blue's late packet on that tuple, now green's flow, passes untouched",
                tcp(IN, (BLUE, 8080), c, 64, Tcp::Ack),
                XDP_PASS,
                "not_live",
                None,
            ),
            Step::Active(0, Colour::Blue),
            pkt(
                "rolled back: a new flow goes to blue again",
                tcp(IN, (CLIENT, 40002), (VIP, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, (CLIENT, 40002), (BLUE, 8080), 63, Tcp::Syn)),
            ),
            pkt(
                "the client closes that flow (FIN)",
                tcp(IN, (CLIENT, 40002), (VIP, 80), 64, Tcp::Fin),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, (CLIENT, 40002), (BLUE, 8080), 63, Tcp::Fin)),
            ),
            pkt(
                "blue's FIN of the closing handshake still comes from the VIP",
                tcp(IN, (BLUE, 8080), (CLIENT, 40002), 64, Tcp::Fin),
                XDP_REDIRECT,
                "reply_redirect",
                Some(tcp(OUT, (VIP, 80), (CLIENT, 40002), 63, Tcp::Fin)),
            ),
            pkt(
                "a SYN-ACK on the closed flow's tuple is a direct connection: untouched",
                tcp(IN, (BLUE, 8080), (CLIENT, 40002), 64, Tcp::SynAck),
                XDP_PASS,
                "not_live",
                None,
            ),
            pkt(
                "and the closed flow is forgotten: the connection's next packet is untouched too",
                tcp(IN, (BLUE, 8080), (CLIENT, 40002), 64, Tcp::Ack),
                XDP_PASS,
                "not_live",
                None,
            ),
            pkt(
                "UDP to dns goes to blue",
                udp(IN, c, (VIP, 53), 64),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(udp(OUT, c, (BLUE, 5353), 63)),
            ),
            pkt(
                "blue's UDP answer comes from the VIP",
                udp(IN, (BLUE, 5353), c, 64),
                XDP_REDIRECT,
                "reply_redirect",
                Some(udp(OUT, (VIP, 53), c, 63)),
            ),
            pkt(
                "the client then asks blue directly from the same port: passed untouched",
                udp(IN, c, (BLUE, 5353), 64),
                XDP_PASS,
                "no_match",
                None,
            ),
            pkt(
                "and blue's answer is the direct conversation's: untouched",
                udp(IN, (BLUE, 5353), c, 64),
                XDP_PASS,
                "not_live",
                None,
            ),
            pkt(
                "the client asks the VIP again from that port: same flow, same backend",
                udp(IN, c, (VIP, 53), 64),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(udp(OUT, c, (BLUE, 5353), 63)),
            ),
            pkt(
                "and blue's answer comes from the VIP again",
                udp(IN, (BLUE, 5353), c, 64),
                XDP_REDIRECT,
                "reply_redirect",
                Some(udp(OUT, (VIP, 53), c, 63)),
            ),
            Step::Active(1, Colour::Green),
            pkt(
                "UDP without checksum keeps 0 on the way to green",
                no_udp_csum(udp(IN, c2, (VIP, 53), 64)),
                XDP_PASS,
                "fwd_kernel",
                Some(no_udp_csum(udp(IN, c2, (GREEN, 5354), 64))),
            ),
            pkt(
                "TTL 1 is rewritten but left to the kernel to expire",
                tcp(IN, (CLIENT, 40003), (VIP, 81), 1, Tcp::Syn),
                XDP_PASS,
                "ttl",
                Some(tcp(IN, (CLIENT, 40003), (BLUE, 8080), 1, Tcp::Syn)),
            ),
            pkt(
                "another port on the VIP passes untouched",
                tcp(IN, c, (VIP, 8080), 64, Tcp::Syn),
                XDP_PASS,
                "no_match",
                None,
            ),
            pkt(
                "UDP to the TCP service's port passes untouched",
                udp(IN, c, (VIP, 80), 64),
                XDP_PASS,
                "no_match",
                None,
            ),
            pkt(
                "traffic straight to a backend passes untouched",
                tcp(IN, c, (BLUE, 8080), 64, Tcp::Syn),
                XDP_PASS,
                "no_match",
                None,
            ),
            pkt(
                "a backend packet of no tracked flow passes untouched",
                tcp(IN, (BLUE, 8080), (CLIENT, 49999), 64, Tcp::Ack),
                XDP_PASS,
                "not_live",
                None,
            ),
            pkt("ARP passes untouched", arp(), XDP_PASS, "not_ip", None),
            pkt(
                "a VLAN-tagged frame is translated and left to the kernel's VLAN devices",
                vlan(tcp(IN, (CLIENT, 40100), (VIP, 80), 64, Tcp::Syn)),
                XDP_PASS,
                "fwd_kernel",
                Some(vlan(tcp(IN, (CLIENT, 40100), (BLUE, 8080), 64, Tcp::Syn))),
            ),
            pkt(
                "a double-tagged (QinQ) frame is translated too",
                vlan(vlan(tcp(IN, (CLIENT, 40101), (VIP, 80), 64, Tcp::Syn))),
                XDP_PASS,
                "fwd_kernel",
                Some(vlan(vlan(tcp(IN, (CLIENT, 40101), (BLUE, 8080), 64, Tcp::Syn)))),
            ),
            pkt(
                "three tags pass untouched",
                vlan(vlan(vlan(tcp(IN, c, (VIP, 80), 64, Tcp::Syn)))),
                XDP_PASS,
                "vlan",
                None,
            ),
            pkt(
                "a first fragment passes untouched",
                fragment(tcp(IN, c, (VIP, 80), 64, Tcp::Syn), 0x2000),
                XDP_PASS,
                "fragment",
                None,
            ),
            pkt(
                "a later fragment passes untouched",
                fragment(udp(IN, c, (VIP, 53), 64), 0x0010),
                XDP_PASS,
                "fragment",
                None,
            ),
            pkt(
                "a frame cut inside the TCP header passes untouched",
                tcp(IN, c, (VIP, 80), 64, Tcp::Syn)[..14 + 20 + 10].to_vec(),
                XDP_PASS,
                "malformed",
                None,
            ),
            pkt(
                "a frame cut inside the IPv4 header passes untouched",
                tcp(IN, c, (VIP, 80), 64, Tcp::Syn)[..14 + 12].to_vec(),
                XDP_PASS,
                "malformed",
                None,
            ),
            pkt(
                "IHL below 5 passes untouched",
                set_byte(tcp(IN, c, (VIP, 80), 64, Tcp::Syn), 14, 0x44),
                XDP_PASS,
                "malformed",
                None,
            ),
            pkt("ICMP to the VIP passes untouched", icmp(), XDP_PASS, "other_l4", None),
        ];
        for step in steps {
            check(&mut dp, step);
        }
        let web = |colour| dp.counters(0, colour).expect("counters");
        let (blue, green) = (web(Colour::Blue), web(Colour::Green));
        assert_eq!((blue.flows, blue.packets, blue.reply_packets), (4, 6, 2), "web blue counters (two VLAN flows)");
        assert_eq!((green.flows, green.packets, green.reply_packets), (2, 2, 1), "web green counters");
    });
}

/// A UDP flow stays on its colour across a cut-over while it is active, and is a new flow on
/// the active colour once idle for longer than the timeout.
#[test]
fn idle_udp_flows_expire() {
    if !crate::have_root("idle_udp_flows_expire") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load the XDP program");
        let c = (CLIENT2, 40000);
        let vip = udp(IN, c, (VIP, 53), 64);
        let blue = udp(OUT, c, (BLUE, 5353), 63);
        check(&mut dp, pkt("UDP flow starts on blue", vip.clone(), XDP_REDIRECT, "fwd_redirect", Some(blue.clone())));
        check(&mut dp, Step::Active(1, Colour::Green));
        check(
            &mut dp,
            pkt("within the idle timeout it stays on blue", vip.clone(), XDP_REDIRECT, "fwd_redirect", Some(blue)),
        );
        std::thread::sleep(IDLE + Duration::from_millis(500));
        check(
            &mut dp,
            pkt(
                "a datagram from blue after the flow expired is not translated",
                udp(IN, (BLUE, 5353), c, 64),
                XDP_PASS,
                "not_live",
                None,
            ),
        );
        check(
            &mut dp,
            pkt(
                "idle past the timeout, it is a new flow on green",
                vip,
                XDP_PASS,
                "fwd_kernel",
                Some(udp(IN, c, (GREEN, 5354), 64)),
            ),
        );
        assert_eq!(dp.counters(1, Colour::Green).expect("counters").flows, 1);
    });
}

/// The VIP filter in front of the service lookup follows the services: traffic to another
/// address on a service port passes, a service moved to a new VIP is served there and no
/// longer at the old one (its open flows included), and an address sharing a VIP's filter
/// slot still only matches by the service table.
#[test]
fn the_vip_filter_follows_the_services() {
    if !crate::have_root("the_vip_filter_follows_the_services") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: false, max_flows: None, ..Options::default() },
        )
        .expect("load");
        let c = (CLIENT, 41000);
        let syn = |to: Ipv4Addr| tcp(IN, c, (to, 80), 64, Tcp::Syn);
        let to_blue = tcp(IN, c, (BLUE, 8080), 64, Tcp::Syn);
        check(&mut dp, pkt("SYN to the VIP", syn(VIP), XDP_PASS, "fwd_kernel", Some(to_blue.clone())));
        check(
            &mut dp,
            pkt(
                "the flow's next packet, from the flow entry",
                tcp(IN, c, (VIP, 80), 64, Tcp::Ack),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp(IN, c, (BLUE, 8080), 64, Tcp::Ack)),
            ),
        );
        let other = Ipv4Addr::new(198, 51, 100, 99);
        check(&mut dp, pkt("another address on port 80", syn(other), XDP_PASS, "no_match", None));
        // Same last two bytes as the VIP (203.0.113.10): the filter lets it through to the
        // service table, which does not know it.
        let twin = Ipv4Addr::new(192, 0, 113, 10);
        check(&mut dp, pkt("an address in the VIP's filter slot", syn(twin), XDP_PASS, "no_match", None));
        // Move every service of VIP to NEW_VIP.
        let new_vip = Ipv4Addr::new(203, 0, 113, 77);
        let moved: Vec<ServiceConfig> = services()
            .into_iter()
            .map(|mut s| {
                if s.vip == IpAddr::V4(VIP) {
                    s.vip = IpAddr::V4(new_vip);
                }
                s
            })
            .collect();
        dp.apply(&moved).expect("apply the moved services");
        check(&mut dp, pkt("the old VIP is no service any more", syn(VIP), XDP_PASS, "no_match", None));
        // The flow opened before the move went with its service: the data path, which looks
        // a known flow up before the service, must not forward its packets any more.
        let ack = tcp(IN, c, (VIP, 80), 64, Tcp::Ack);
        check(&mut dp, pkt("a packet of the removed service's flow", ack, XDP_PASS, "no_match", None));
        check(&mut dp, pkt("SYN to the new VIP", syn(new_vip), XDP_PASS, "fwd_kernel", Some(to_blue)));
    });
}

/// With `redirect: false` the rewritten packet always goes to the kernel's stack, even where
/// the FIB has a complete answer: MACs and TTL are left to the kernel.
#[test]
fn kernel_forwarding_never_redirects() {
    if !crate::have_root("kernel_forwarding_never_redirects") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: false, max_flows: None, ..Options::default() },
        )
        .expect("load");
        let c = (CLIENT, 40000);
        check(
            &mut dp,
            pkt(
                "SYN to blue, passed up",
                tcp(IN, c, (VIP, 80), 64, Tcp::Syn),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp(IN, c, (BLUE, 8080), 64, Tcp::Syn)),
            ),
        );
        check(
            &mut dp,
            pkt(
                "blue's reply, passed up from the VIP",
                tcp(IN, (BLUE, 8080), c, 64, Tcp::Ack),
                XDP_PASS,
                "reply_kernel",
                Some(tcp(IN, (VIP, 80), c, 64, Tcp::Ack)),
            ),
        );
    });
}

fn tcp6(l2: L2, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), hops: u8, kind: Tcp) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv6(src.0.octets(), dst.0.octets(), hops)
        .tcp(src.1, dst.1, 1000, 64_000);
    let b = with_flags(b, kind);
    let mut v = Vec::new();
    b.write(&mut v, b"hello").expect("build tcp6");
    v
}

/// The first 28 bytes of an IPv4 TCP packet, as an ICMP error quotes it.
fn quote4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: etherparse::IpNumber) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ipv4(src.0.octets(), dst.0.octets(), 60);
    if proto == etherparse::IpNumber::UDP {
        b.udp(src.1, dst.1).write(&mut v, b"0123456789").expect("quote");
    } else {
        b.tcp(src.1, dst.1, 5, 1000).ack(9).write(&mut v, b"0123456789").expect("quote");
    }
    v.truncate(28);
    v
}

fn icmp4(
    l2: L2,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    kind: etherparse::icmpv4::DestUnreachableHeader,
    quote: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv4(src.octets(), dst.octets(), ttl)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(kind))
        .write(&mut v, quote)
        .expect("build icmp");
    v
}

fn udp6(l2: L2, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), hops: u8) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv6(src.0.octets(), dst.0.octets(), hops)
        .udp(src.1, dst.1)
        .write(&mut v, b"query6")
        .expect("build udp6");
    v
}

/// The first 48 bytes of an IPv6 TCP packet, as an ICMPv6 error quotes it.
fn quote6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv6(src.0.octets(), dst.0.octets(), 60)
        .tcp(src.1, dst.1, 5, 1000)
        .ack(9)
        .write(&mut v, b"0123456789")
        .expect("quote6");
    v.truncate(48);
    v
}

fn icmp6_too_big(l2: L2, src: Ipv6Addr, dst: Ipv6Addr, hops: u8, quote: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv6(src.octets(), dst.octets(), hops)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut v, quote)
        .expect("build icmp6");
    v
}

/// IPv6 UDP and an ICMPv6 "packet too big" about a tracked IPv6 flow.
#[test]
fn ipv6_udp_and_icmpv6() {
    if !crate::have_root("ipv6_udp_and_icmpv6") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut svcs = services();
        svcs.push(ServiceConfig {
            name: "dns6".into(),
            vip: IpAddr::V6(VIP6),
            port: 53,
            preview_port: None,
            protocol: Protocol::Udp,
            blue: vec![BackendConfig { addr: SocketAddr::new(IpAddr::V6(BLUE6), 5353), weight: 1 }],
            green: vec![],
            ..svcs[0].clone()
        });
        let mut dp = Dataplane::open(
            &svcs,
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load");
        let c6 = (CLIENT6, 40010);
        let router = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0xfe);
        let steps = vec![
            pkt(
                "IPv6 UDP to dns6 goes to blue6",
                udp6(IN, c6, (VIP6, 53), 64),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(udp6(OUT, c6, (BLUE6, 5353), 63)),
            ),
            pkt(
                "blue6's UDP answer comes from the VIP",
                udp6(IN, (BLUE6, 5353), c6, 64),
                XDP_REDIRECT,
                "reply_redirect",
                Some(udp6(OUT, (VIP6, 53), c6, 63)),
            ),
            pkt(
                "IPv6 TCP flow for the ICMPv6 case",
                tcp6(IN, c6, (VIP6, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp6(OUT, c6, (BLUE6, 8080), 63, Tcp::Syn)),
            ),
            pkt(
                "packet-too-big about a VIP reply goes to blue6, quoting what blue6 sent",
                icmp6_too_big(IN, router, VIP6, 64, &quote6((VIP6, 80), c6)),
                XDP_REDIRECT,
                "icmp_fwd",
                Some(icmp6_too_big(OUT, router, BLUE6, 63, &quote6((BLUE6, 8080), c6))),
            ),
        ];
        for step in steps {
            check(&mut dp, step);
        }
    });
}

/// IPv6, the preview port, DSR and reset, each with its flows set up first.
#[test]
fn ipv6_preview_dsr_and_icmp() {
    if !crate::have_root("ipv6_preview_dsr_and_icmp") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load");
        let c6 = (CLIENT6, 40000);
        let c = (CLIENT, 41000);
        let frag = etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 };
        let port = etherparse::icmpv4::DestUnreachableHeader::Port;
        let steps = vec![
            pkt(
                "IPv6 SYN to web6 goes to blue6, hop limit decremented",
                tcp6(IN, c6, (VIP6, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp6(OUT, c6, (BLUE6, 8080), 63, Tcp::Syn)),
            ),
            pkt(
                "blue6's reply comes from the IPv6 VIP",
                tcp6(IN, (BLUE6, 8080), c6, 64, Tcp::Ack),
                XDP_REDIRECT,
                "reply_redirect",
                Some(tcp6(OUT, (VIP6, 80), c6, 63, Tcp::Ack)),
            ),
            Step::Active(WEB6, Colour::Green),
            pkt(
                "an IPv6 flow stays on blue6 after the cut-over",
                tcp6(IN, c6, (VIP6, 80), 64, Tcp::Ack),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp6(OUT, c6, (BLUE6, 8080), 63, Tcp::Ack)),
            ),
            pkt(
                "a new IPv6 flow goes to green6 (no route: kernel path)",
                tcp6(IN, (CLIENT6, 40001), (VIP6, 80), 64, Tcp::Syn),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp6(IN, (CLIENT6, 40001), (GREEN6, 8080), 64, Tcp::Syn)),
            ),
            pkt(
                "the preview port goes to the idle colour (green)",
                tcp(IN, c, (VIP, PREVIEW), 64, Tcp::Syn),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp(IN, c, (GREEN, 8081), 64, Tcp::Syn)),
            ),
            pkt(
                "green's preview reply comes from VIP:preview",
                tcp(IN, (GREEN, 8081), c, 64, Tcp::Ack),
                XDP_REDIRECT,
                "reply_redirect",
                Some(tcp(OUT, (VIP, PREVIEW), c, 63, Tcp::Ack)),
            ),
            Step::Active(WEB, Colour::Green),
            pkt(
                "after a cut-over to green, the preview port goes to blue",
                tcp(IN, (CLIENT, 41001), (VIP, PREVIEW), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, (CLIENT, 41001), (BLUE, 8080), 63, Tcp::Syn)),
            ),
            Step::Active(WEB, Colour::Blue),
            pkt(
                "DSR: only the MACs change, TTL stays",
                tcp(IN, (CLIENT, 41002), (VIP, 443), 64, Tcp::Syn),
                XDP_REDIRECT,
                "dsr",
                Some(tcp(OUT, (CLIENT, 41002), (VIP, 443), 64, Tcp::Syn)),
            ),
            Step::Active(4, Colour::Green),
            pkt(
                "DSR to a backend without a neighbour is dropped, not routed elsewhere",
                tcp(IN, (CLIENT, 41003), (VIP, 443), 64, Tcp::Syn),
                XDP_DROP,
                "dsr_no_neigh",
                None,
            ),
            // ICMP: a web flow on blue, then a "fragmentation needed" about its reply.
            pkt(
                "web flow for the ICMP cases",
                tcp(IN, c, (VIP, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, c, (BLUE, 8080), 63, Tcp::Syn)),
            ),
            pkt(
                "frag-needed about a VIP reply goes to the flow's backend, quoting what it sent",
                icmp4(IN, LB_GW, VIP, 64, frag.clone(), &quote4((VIP, 80), c, etherparse::IpNumber::TCP)),
                XDP_REDIRECT,
                "icmp_fwd",
                Some(icmp4(OUT, LB_GW, BLUE, 63, frag.clone(), &quote4((BLUE, 8080), c, etherparse::IpNumber::TCP))),
            ),
            pkt(
                "dns flow for the ICMP reply case",
                udp(IN, c, (VIP, 53), 64),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(udp(OUT, c, (BLUE, 5353), 63)),
            ),
            pkt(
                "a backend's port-unreachable reaches the client from the VIP, quoting what the client sent",
                icmp4(IN, BLUE, CLIENT, 64, port.clone(), &quote4(c, (BLUE, 5353), etherparse::IpNumber::UDP)),
                XDP_REDIRECT,
                "icmp_reply",
                Some(icmp4(OUT, VIP, CLIENT, 63, port.clone(), &quote4(c, (VIP, 53), etherparse::IpNumber::UDP))),
            ),
            pkt(
                "an ICMP error about no tracked flow passes untouched",
                icmp4(IN, LB_GW, VIP, 64, frag, &quote4((VIP, 80), (CLIENT, 1), etherparse::IpNumber::TCP)),
                XDP_PASS,
                "no_match",
                None,
            ),
        ];
        for step in steps {
            check(&mut dp, step);
        }
        let _ = DNS;
    });
}

/// FIN marks a flow closing; a drain that ends with `reset` turns the client's next packet
/// into an RST from the VIP; `move` re-points flows to the new colour.
#[test]
fn closing_reset_and_move() {
    if !crate::have_root("closing_reset_and_move") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let svcs = services();
        let mut dp = Dataplane::open(
            &svcs,
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load");
        let (a, b, u) = ((CLIENT, 42000), (CLIENT, 42001), (CLIENT, 42002));
        check(
            &mut dp,
            pkt(
                "flow a on blue",
                tcp(IN, a, (VIP, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, a, (BLUE, 8080), 63, Tcp::Syn)),
            ),
        );
        check(
            &mut dp,
            pkt(
                "flow b on blue",
                tcp(IN, b, (VIP, 80), 64, Tcp::Syn),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(tcp(OUT, b, (BLUE, 8080), 63, Tcp::Syn)),
            ),
        );
        check(
            &mut dp,
            pkt(
                "udp flow on blue",
                udp(IN, u, (VIP, 53), 64),
                XDP_REDIRECT,
                "fwd_redirect",
                Some(udp(OUT, u, (BLUE, 5353), 63)),
            ),
        );
        // A FIN marks b closing: it still routes, but no longer counts as open.
        let mut fin = tcp(IN, b, (VIP, 80), 64, Tcp::Ack);
        let mut fin_out = tcp(OUT, b, (BLUE, 8080), 63, Tcp::Ack);
        for f in [&mut fin, &mut fin_out] {
            set_tcp_flags(f, 0x11);
        }
        check(&mut dp, pkt("FIN of b still goes to blue", fin, XDP_REDIRECT, "fwd_redirect", Some(fin_out)));
        let counts = dp.count_flows();
        assert_eq!(
            counts.counts.get(&(WEB, Colour::Blue)).map(|c| (c.live, c.closing)),
            Some((1, 1)),
            "a open, b closing"
        );

        dp.set_state(WEB, Colour::Green, 0, None).expect("cut over");
        let n = dp.end_drain(&svcs[0], WEB, Colour::Blue, DrainAction::Reset).expect("reset");
        assert_eq!(n, 1, "only the open flow is reset");
        // a's next packet comes back to the client as an RST from the VIP.
        let mut rst = Vec::new();
        PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC)
            .ipv4(VIP.octets(), CLIENT.octets(), 64)
            .tcp(80, a.1, 77, 64_000)
            .rst()
            .write(&mut rst, b"GET / HTTP/1.0\r\n\r\n")
            .expect("rst");
        check(
            &mut dp,
            pkt("reset flow: RST to the client", tcp(IN, a, (VIP, 80), 64, Tcp::Ack), XDP_TX, "reset", Some(rst)),
        );
        check(
            &mut dp,
            pkt(
                "after the RST, the 5-tuple is a new flow on green",
                tcp(IN, a, (VIP, 80), 64, Tcp::Syn),
                XDP_PASS,
                "fwd_kernel",
                Some(tcp(IN, a, (GREEN, 8081), 64, Tcp::Syn)),
            ),
        );

        dp.set_state(DNS, Colour::Green, 0, None).expect("cut over dns");
        assert_eq!(dp.end_drain(&svcs[1], DNS, Colour::Blue, DrainAction::Move).expect("move"), 1);
        check(
            &mut dp,
            pkt(
                "a moved UDP flow continues on green",
                udp(IN, u, (VIP, 53), 64),
                XDP_PASS,
                "fwd_kernel",
                Some(udp(IN, u, (GREEN, 5354), 64)),
            ),
        );
        check(
            &mut dp,
            pkt(
                "green's answer to the moved flow comes from the VIP",
                udp(IN, (GREEN, 5354), u, 64),
                XDP_REDIRECT,
                "reply_redirect",
                Some(udp(OUT, (VIP, 53), u, 63)),
            ),
        );
    });
}

/// A canary share sends exactly the flows whose canary hash falls under it to the other
/// colour, as `switcher_common::new_flow_colour` predicts, and about that share of them.
#[test]
fn canary_split_follows_the_hash() {
    if !crate::have_root("canary_split_follows_the_hash") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: false, max_flows: None, ..Options::default() },
        )
        .expect("load");
        dp.set_state(WEB, Colour::Blue, 1_000, None).expect("10% canary");
        let state = switcher_common::switch_state(0, 1_000);
        let mut green = 0;
        for port in 20_000..22_000u16 {
            let key = switcher_common::FlowKey {
                src: widen(CLIENT),
                dst: widen(VIP),
                sport: port.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: 6,
                family: 4,
                _pad: [0; 2],
            };
            let expect_green = switcher_common::new_flow_colour(
                state,
                false,
                switcher_common::flow_hash(&key, switcher_common::SEED_CANARY),
            ) == 1;
            let to = if expect_green { (GREEN, 8081) } else { (BLUE, 8080) };
            check(
                &mut dp,
                pkt(
                    "canary flow",
                    tcp(IN, (CLIENT, port), (VIP, 80), 64, Tcp::Syn),
                    XDP_PASS,
                    "fwd_kernel",
                    Some(tcp(IN, (CLIENT, port), to, 64, Tcp::Syn)),
                ),
            );
            green += u32::from(expect_green);
        }
        assert!((140..=260).contains(&green), "10% of 2000 flows ± 3%: {green}");
        assert_eq!(u64::from(green), dp.counters(WEB, Colour::Green).expect("counters").flows);
    });
}

fn widen(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

fn set_tcp_flags(frame: &mut [u8], flags: u8) {
    let off = 14 + 20 + 13;
    let old = [frame[off - 1], frame[off]];
    frame[off] = flags;
    let mut d = switcher_common::csum::CsumDelta::new();
    d.replace2(old, [frame[off - 1], frame[off]]);
    let c = 14 + 20 + 16;
    let new = d.apply([frame[c], frame[c + 1]]);
    frame[c..c + 2].copy_from_slice(&new);
}

/// IPv4 options move the L4 header: a service packet with 4 bytes of options is still
/// translated, and the options are kept.
#[test]
fn ip_options_are_handled() {
    if !crate::have_root("ip_options_are_handled") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load the XDP program");
        let with_options = |l2: L2, ttl: u8, dst: (Ipv4Addr, u16)| {
            let mut ip =
                etherparse::Ipv4Header::new(0, ttl, etherparse::IpNumber::UDP, CLIENT.octets(), dst.0.octets())
                    .expect("ip");
            ip.options = [1u8, 1, 1, 0][..].try_into().expect("options");
            let mut v = Vec::new();
            PacketBuilder::ethernet2(l2.src, l2.dst)
                .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
                .udp(40000, dst.1)
                .write(&mut v, b"q")
                .expect("build");
            v
        };
        let input = with_options(IN, 7, (VIP, 53));
        assert_eq!(input[14], 0x46, "the input has IHL 6");
        check(
            &mut dp,
            pkt(
                "UDP with IP options to blue",
                input,
                XDP_REDIRECT,
                "fwd_redirect",
                Some(with_options(OUT, 6, (BLUE, 5353))),
            ),
        );
    });
}

fn arp() -> Vec<u8> {
    let mut v = Vec::from([0xff; 6]);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&CLIENT.octets());
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&VIP.octets());
    v
}

fn vlan(frame: Vec<u8>) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    v.extend_from_slice(&frame[12..]);
    v
}

/// Sets the fragment field (flags + offset) and fixes the header checksum.
fn fragment(mut v: Vec<u8>, frags: u16) -> Vec<u8> {
    v[14 + 6..14 + 8].copy_from_slice(&frags.to_be_bytes());
    v[14 + 10] = 0;
    v[14 + 11] = 0;
    let c = switcher_common::csum::checksum(0, &v[14..14 + 20]);
    v[14 + 10..14 + 12].copy_from_slice(&c);
    v
}

fn set_byte(mut v: Vec<u8>, i: usize, b: u8) -> Vec<u8> {
    v[i] = b;
    v
}

fn icmp() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(IN.src, IN.dst)
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut v, b"ping")
        .expect("build icmp");
    v
}

/// `REVERSE` follows the pools: every NAT backend lists the VIP:ports it answers for (DSR
/// backends none); a backend taken out of its pool keeps its entry while a flow uses it (its
/// replies are still translated) and loses it once none does; a pool change that would give
/// a backend more pairs than fit is refused before anything is written.
#[test]
fn reverse_entries_follow_the_pools() {
    if !crate::have_root("reverse_entries_follow_the_pools") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut svcs = services();
        let web = svcs[0].clone();
        let extra = |name: &str, port: u16, blue: Vec<BackendConfig>| ServiceConfig {
            name: name.into(),
            port,
            preview_port: None,
            blue,
            green: vec![],
            ..web.clone()
        };
        svcs.push(extra("x1", 82, backend(BLUE, 8080)));
        svcs.push(extra("x2", 83, backend(BLUE, 9000)));
        let mut dp = Dataplane::open(&svcs, Options { udp_idle_timeout: IDLE, redirect: false, ..Options::default() })
            .expect("load");
        let entry = |dp: &Dataplane, addr: Ipv4Addr, port: u16| {
            let mut to: Vec<u16> = dp
                .reverse_entries()
                .into_iter()
                .find(|(b, _)| *b == SocketAddr::new(IpAddr::V4(addr), port))
                .map(|(_, to)| to.iter().map(SocketAddr::port).collect())
                .unwrap_or_default();
            to.sort_unstable();
            to
        };
        assert_eq!(entry(&dp, BLUE, 8080), [80, 81, 82, PREVIEW], "web, its preview port, blue-only and x1");
        assert_eq!(entry(&dp, GREEN, 8081), [80, PREVIEW]);
        assert_eq!(entry(&dp, BLUE, 5353), [53, PREVIEW], "dns and its preview port");
        assert!(entry(&dp, BLUE, 443).is_empty(), "a DSR backend's replies are not the LB's to translate");

        // A fifth pair for BLUE:8080 is refused, and nothing changes.
        let e = dp.set_pool(6, Colour::Blue, &backend(BLUE, 8080)).expect_err("a fifth VIP:port");
        assert!(e.to_string().contains("at most 4"), "{e}");
        assert_eq!(entry(&dp, BLUE, 8080), [80, 81, 82, PREVIEW]);
        assert_eq!(entry(&dp, BLUE, 9000), [83], "x2 keeps its pool");

        // A UDP flow on BLUE:5353, then BLUE:5353 leaves dns's pool: the flow keeps it.
        let c = (CLIENT, 40500);
        check(
            &mut dp,
            pkt(
                "UDP to dns goes to blue",
                udp(IN, c, (VIP, 53), 64),
                XDP_PASS,
                "fwd_kernel",
                Some(udp(IN, c, (BLUE, 5353), 64)),
            ),
        );
        dp.set_pool(1, Colour::Blue, &backend(BLUE, 5399)).expect("new blue pool");
        assert_eq!(entry(&dp, BLUE, 5353), [53, PREVIEW], "kept while its flow lives");
        assert_eq!(entry(&dp, BLUE, 5399), [53, PREVIEW]);
        check(
            &mut dp,
            pkt(
                "the removed backend's answer to its open flow still comes from the VIP",
                udp(IN, (BLUE, 5353), c, 64),
                XDP_PASS,
                "reply_kernel",
                Some(udp(IN, (VIP, 53), c, 64)),
            ),
        );
        std::thread::sleep(IDLE + Duration::from_millis(500));
        let pass = dp.count_flows();
        dp.collect_reverse(&pass);
        assert!(entry(&dp, BLUE, 5353).is_empty(), "no flow uses it any more: gone");
        check(&mut dp, pkt("its packets now pass untouched", udp(IN, (BLUE, 5353), c, 64), XDP_PASS, "no_match", None));
    });
}

/// One client port on two VIP ports of the same backend, one after the other (`blue-only` on
/// port 81 and `web` on 80 share blue's 198.51.100.2:8080): the backend's SYN-ACK to the
/// second connection is translated as that connection's — from VIP:80, not VIP:81, nor
/// untranslated from the backend — whether the first has ended or never got its answer.
#[test]
fn a_backend_of_several_vip_ports_answers_each_connection_as_its_own() {
    if !crate::have_root("a_backend_of_several_vip_ports_answers_each_connection_as_its_own") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp =
            Dataplane::open(&services(), Options { udp_idle_timeout: IDLE, redirect: false, ..Options::default() })
                .expect("load");
        let be = (BLUE, 8080);
        // The source of the frame the program let through (kernel forwarding: rewritten, passed).
        let source = |frame: &[u8]| {
            let p = etherparse::SlicedPacket::from_ethernet(frame).expect("a frame");
            let ip = match p.net {
                Some(etherparse::NetSlice::Ipv4(v4)) => v4.header().source_addr(),
                other => panic!("not IPv4: {other:?}"),
            };
            let port = match p.transport {
                Some(etherparse::TransportSlice::Tcp(t)) => t.source_port(),
                other => panic!("not TCP: {other:?}"),
            };
            (ip, port)
        };
        let syn_ack = |dp: &mut Dataplane, c: (Ipv4Addr, u16)| {
            let (action, _, _, out) = run_xdp(dp, &tcp(IN, be, c, 64, Tcp::SynAck));
            (action, source(&out))
        };
        // Both orders, so that whichever of the two the backend's list names first, the
        // earlier connection is the one ranked lower.
        for (n, (first, second)) in [(81u16, 80u16), (80, 81)].into_iter().enumerate() {
            let port = |k: u16| 42_000 + 10 * n as u16 + k;
            // 1. The first connection answered, then reset by the client (closing); then the
            //    same client port to the other VIP port.
            let c = (CLIENT, port(1));
            run(&mut dp, &tcp(IN, c, (VIP, first), 64, Tcp::Syn));
            assert_eq!(syn_ack(&mut dp, c), (XDP_PASS, (VIP, first)), "the first connection's answer");
            run(&mut dp, &tcp_with(IN, c, (VIP, first), 0x14));
            run(&mut dp, &tcp(IN, c, (VIP, second), 64, Tcp::Syn));
            assert_eq!(syn_ack(&mut dp, c), (XDP_PASS, (VIP, second)), "after a closed flow to VIP:{first}");
            // 2. A first SYN that never got its answer, then the same port to the other VIP
            //    port: the later SYN's; and the answered connection's later packets are its own.
            let c = (CLIENT, port(2));
            run(&mut dp, &tcp(IN, c, (VIP, first), 64, Tcp::Syn));
            std::thread::sleep(Duration::from_millis(2));
            run(&mut dp, &tcp(IN, c, (VIP, second), 64, Tcp::Syn));
            assert_eq!(syn_ack(&mut dp, c), (XDP_PASS, (VIP, second)), "after an unanswered SYN to VIP:{first}");
            let (_, _, _, out) = run_xdp(&mut dp, &tcp(IN, be, c, 64, Tcp::Ack));
            assert_eq!(source(&out), (VIP, second));
        }
    });
}

/// Runs the XDP program on `input`: the action, the reason counted and the output frame, with
/// the metadata the program put in front of it split off (empty when none).
/// An XDP run: action, reasons counted, metadata, frame.
type XdpRun = (u32, Vec<(&'static str, u64)>, Vec<u8>, Vec<u8>);

fn run_xdp(dp: &mut Dataplane, input: &[u8]) -> XdpRun {
    let before = dp.reasons().expect("reasons");
    let mut out = vec![0u8; input.len() + 256];
    let result = dp
        .program()
        .expect("program")
        .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    let after = dp.reasons().expect("reasons");
    let delta = before.iter().zip(&after).filter(|(b, a)| a.1 != b.1).map(|(b, a)| (a.0, a.1 - b.1)).collect();
    let meta_len = out.len().saturating_sub(input.len());
    let frame = out.split_off(meta_len);
    (result.return_value, delta, out, frame)
}

/// Shadow traffic on the XDP side: a shadowed UDP flow's datagram is rewritten to its live
/// backend exactly as usual and passed up with metadata naming the idle colour's backend; the
/// idle colour's answer is dropped and counted, the live one's goes to the client from the
/// VIP; an unshadowed service and TCP are untouched by it; the ceiling holds copies back
/// without touching the live datagram; the TC program lets a frame without our metadata
/// through untouched.
#[test]
fn shadow_marks_and_drops() {
    if !crate::have_root("shadow_marks_and_drops") {
        return;
    }
    let ns = fib_namespace();
    ns.run(|| {
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load the XDP and TC programs");
        let c = (CLIENT, 41000);
        // Off by default: the usual fast path.
        let (action, delta, meta, out) = run_xdp(&mut dp, &udp(IN, (CLIENT, 41001), (VIP, 53), 64));
        assert_eq!((action, delta, meta.len()), (XDP_REDIRECT, vec![("fwd_redirect", 1)], 0), "shadow off");
        assert_eq!(hex(&out), hex(&udp(OUT, (CLIENT, 41001), (BLUE, 5353), 63)));

        dp.set_shadow(DNS, 10_000, 1_000).expect("shadow 100 %");
        let (action, delta, meta, out) = run_xdp(&mut dp, &udp(IN, c, (VIP, 53), 64));
        assert_eq!((action, delta), (XDP_PASS, vec![("shadow_fwd", 1)]), "a shadowed datagram goes up to TC");
        assert_eq!(
            hex(&out),
            hex(&udp(IN, c, (BLUE, 5353), 64)),
            "rewritten to the live backend, the rest left to the TC program"
        );
        let mut want = Vec::new();
        want.extend_from_slice(&switcher_common::SHADOW_META_MAGIC.to_ne_bytes());
        want.extend_from_slice(&(DNS as u16).to_ne_bytes());
        want.extend_from_slice(&[1, 0]); // to green, IPv4
        want.extend_from_slice(&14u16.to_ne_bytes());
        want.extend_from_slice(&34u16.to_ne_bytes());
        want.extend_from_slice(&widen(GREEN));
        want.extend_from_slice(&5354u16.to_be_bytes());
        want.extend_from_slice(&[switcher_common::FAMILY_V4, 0]);
        assert_eq!(hex(&meta), hex(&want), "the metadata names green's backend and the headers");

        let (action, delta, _, _) = run_xdp(&mut dp, &udp(IN, (GREEN, 5354), c, 64));
        assert_eq!((action, delta), (XDP_DROP, vec![("shadow_reply", 1)]), "green's answer to the copy is dropped");
        let (action, delta, _, out) = run_xdp(&mut dp, &udp(IN, (BLUE, 5353), c, 64));
        assert_eq!((action, delta), (XDP_REDIRECT, vec![("reply_redirect", 1)]), "blue's answer goes to the client");
        assert_eq!(hex(&out), hex(&udp(OUT, (VIP, 53), c, 63)));
        let (action, delta, _, _) = run_xdp(&mut dp, &udp(IN, (GREEN, 5354), (CLIENT, 41999), 64));
        assert_eq!((action, delta), (XDP_PASS, vec![("not_live", 1)]), "green's datagram to another port: untouched");

        let blue = dp.shadow_counters(DNS, Colour::Blue).expect("counters");
        let green = dp.shadow_counters(DNS, Colour::Green).expect("counters");
        assert_eq!((blue.shadowed, blue.latency_count, blue.sent), (1, 1, 0), "blue served one shadowed datagram");
        assert_eq!((green.replies, green.latency_count, green.failed, green.ceiling), (1, 1, 0, 0), "green");

        // The ceiling: one copy a second; the second datagram takes the usual path.
        dp.set_shadow(DNS, 10_000, 1).expect("ceiling 1/s");
        let c2 = (CLIENT, 41002);
        let (_, delta, _, _) = run_xdp(&mut dp, &udp(IN, c2, (VIP, 53), 64));
        let (action, delta2, meta, out) = run_xdp(&mut dp, &udp(IN, c2, (VIP, 53), 64));
        assert!(delta == vec![("shadow_fwd", 1)] || delta == vec![("fwd_redirect", 1)], "{delta:?}");
        assert_eq!((action, delta2, meta.len()), (XDP_REDIRECT, vec![("fwd_redirect", 1)], 0), "over the ceiling");
        assert_eq!(hex(&out), hex(&udp(OUT, c2, (BLUE, 5353), 63)), "the live datagram as without shadow");
        assert!(dp.shadow_counters(DNS, Colour::Green).expect("counters").ceiling >= 1, "counted as held back");

        // TCP is never shadowed, whatever the map says.
        dp.set_shadow(WEB, 10_000, 1_000).expect("shadow on web's map slot");
        let (action, delta, meta, _) = run_xdp(&mut dp, &tcp(IN, (CLIENT, 41003), (VIP, 80), 64, Tcp::Syn));
        assert_eq!((action, delta, meta.len()), (XDP_REDIRECT, vec![("fwd_redirect", 1)], 0), "TCP");

        // The TC program: no metadata, nothing done.
        let frame = udp(IN, (CLIENT, 41004), (BLUE, 5353), 64);
        let mut out = vec![0u8; frame.len() + 64];
        let result = dp
            .shadow_program()
            .expect("the TC program")
            .test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..TestRunOptions::default() })
            .expect("BPF_PROG_TEST_RUN on the TC program");
        out.truncate(result.data_size_out as usize);
        assert_eq!(result.return_value, 0, "TC_ACT_OK");
        assert_eq!(hex(&out), hex(&frame), "untouched");
    });
}

/// Runs one frame through the program; returns its XDP action (the output is not checked:
/// the table tests above do that).
fn run(dp: &mut Dataplane, frame: &[u8]) -> u32 {
    let mut out = vec![0u8; frame.len() + 256];
    let result = dp
        .program()
        .expect("program")
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    result.return_value
}

/// A TCP frame with these flags (an RST is `0x14`, RST+ACK).
fn tcp_with(l2: L2, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut f = tcp(l2, src, dst, 64, Tcp::Ack);
    set_tcp_flags(&mut f, flags);
    f
}

/// The rollouts' signals move on the packets that carry them, on the flow's colour, once per
/// flow: a backend's SYN-ACK to a pending SYN (a handshake, timed), an RST from a backend (a
/// refusal when it answers the SYN), an ICMP unreachable from a backend about a live flow, a
/// client's RST, and in DSR mode a SYN on an open flow (a retransmission).
/// A CPU times every NAT SYN up to `SYN_TIMED_PER_TICK` per tick of the daemon's clock, then
/// one in `SYN_SAMPLE_EVERY`; every handshake is counted, timed or not, and a new tick times
/// them all again.
#[test]
fn syn_latency_is_timed_for_a_cpus_first_syns_of_a_tick_then_sampled() {
    if !crate::have_root("syn_latency_is_timed_for_a_cpus_first_syns_of_a_tick_then_sampled") {
        return;
    }
    use switcher_common::{SYN_SAMPLE_EVERY, SYN_TIMED_PER_TICK};
    let ns = fib_namespace();
    ns.run(|| {
        // Every run on one CPU: the budget is per CPU.
        crate::net::pin_thread();
        let mut dp =
            Dataplane::open(&services(), Options { udp_idle_timeout: IDLE, ..Options::default() }).expect("load");
        let blue = |dp: &Dataplane| dp.counters(WEB, Colour::Blue).expect("counters");
        let mut port = 20_000u16;
        let mut handshakes = |dp: &mut Dataplane, n: u32| {
            for _ in 0..n {
                port += 1;
                run(dp, &tcp(IN, (CLIENT, port), (VIP, 80), 64, Tcp::Syn));
                assert_eq!(run(dp, &tcp(IN, (BLUE, 8080), (CLIENT, port), 64, Tcp::SynAck)), XDP_REDIRECT);
            }
        };
        let extra = 10 * SYN_SAMPLE_EVERY;
        handshakes(&mut dp, SYN_TIMED_PER_TICK + extra);
        let k = blue(&dp);
        assert_eq!(k.handshakes, u64::from(SYN_TIMED_PER_TICK + extra), "every handshake counts: {k:?}");
        assert_eq!(k.syn_latency.iter().sum::<u64>(), u64::from(SYN_TIMED_PER_TICK + 10), "timed: {k:?}");
        // The daemon's clock moves: a new tick, every SYN timed again.
        dp.stamp_clock().expect("NOW");
        handshakes(&mut dp, 5);
        let k = blue(&dp);
        assert_eq!(k.syn_latency.iter().sum::<u64>(), u64::from(SYN_TIMED_PER_TICK + 15), "{k:?}");
    });
}

#[test]
fn signals_count_handshakes_resets_unreachables_and_retransmits() {
    if !crate::have_root("signals_count_handshakes_resets_unreachables_and_retransmits") {
        return;
    }
    const DSR: u32 = 4;
    let ns = fib_namespace();
    ns.run(|| {
        let svcs = services();
        assert_eq!(svcs[DSR as usize].mode, Mode::Dsr);
        let mut dp = Dataplane::open(
            &svcs,
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: None, ..Options::default() },
        )
        .expect("load");
        let blue = |dp: &Dataplane, id| dp.counters(id, Colour::Blue).expect("counters");
        let be = (BLUE, 8080);
        let (c1, c2, c3, c4) = ((CLIENT, 43001), (CLIENT, 43002), (CLIENT, 43003), (CLIENT, 43004));

        // c1: SYN, SYN-ACK (a handshake, in the lowest latency bucket or so), a repeated
        // SYN-ACK (not a second one), an ACK.
        run(&mut dp, &tcp(IN, c1, (VIP, 80), 64, Tcp::Syn));
        assert_eq!((blue(&dp, WEB).syns, blue(&dp, WEB).handshakes), (1, 0), "a SYN, pending");
        assert_eq!(run(&mut dp, &tcp(IN, be, c1, 64, Tcp::SynAck)), XDP_REDIRECT, "the SYN-ACK is a reply");
        let k = blue(&dp, WEB);
        assert_eq!((k.handshakes, k.refused, k.syn_latency.iter().sum::<u64>()), (1, 0, 1), "{k:?}");
        run(&mut dp, &tcp(IN, be, c1, 64, Tcp::SynAck));
        run(&mut dp, &tcp(IN, c1, (VIP, 80), 64, Tcp::Ack));
        assert_eq!(blue(&dp, WEB).handshakes, 1, "one handshake per SYN");

        // c2: refused with RST+ACK.
        run(&mut dp, &tcp(IN, c2, (VIP, 80), 64, Tcp::Syn));
        assert_eq!(run(&mut dp, &tcp_with(IN, be, c2, 0x14)), XDP_REDIRECT, "the RST goes to the client");
        let k = blue(&dp, WEB);
        assert_eq!((k.syns, k.handshakes, k.refused, k.backend_resets), (2, 1, 1, 1), "{k:?}");

        // c3: a handshake, then reset by the backend mid-connection (not a refusal), twice
        // (the second RST finds the flow closing: not counted).
        run(&mut dp, &tcp(IN, c3, (VIP, 80), 64, Tcp::Syn));
        run(&mut dp, &tcp(IN, be, c3, 64, Tcp::SynAck));
        run(&mut dp, &tcp_with(IN, be, c3, 0x14));
        run(&mut dp, &tcp_with(IN, be, c3, 0x14));
        let k = blue(&dp, WEB);
        assert_eq!((k.syns, k.handshakes, k.refused, k.backend_resets), (3, 2, 1, 2), "{k:?}");

        // c4: the backend's host answers the SYN with an ICMP port unreachable.
        run(&mut dp, &tcp(IN, c4, (VIP, 80), 64, Tcp::Syn));
        let quote = quote4(c4, be, etherparse::IpNumber::TCP);
        let unreachable = icmp4(IN, BLUE, CLIENT, 64, etherparse::icmpv4::DestUnreachableHeader::Port, &quote);
        assert_ne!(run(&mut dp, &unreachable), XDP_DROP);
        let k = blue(&dp, WEB);
        assert_eq!((k.icmp_unreachables, k.refused, k.backend_resets), (1, 2, 2), "{k:?}");
        // A SYN-ACK after the refusal is not a handshake of the same SYN.
        run(&mut dp, &tcp(IN, be, c4, 64, Tcp::SynAck));
        assert_eq!(blue(&dp, WEB).handshakes, 2);

        // c1's client resets its open connection: once.
        run(&mut dp, &tcp_with(IN, c1, (VIP, 80), 0x14));
        run(&mut dp, &tcp_with(IN, c1, (VIP, 80), 0x14));
        let k = blue(&dp, WEB);
        assert_eq!((k.client_resets, k.backend_resets), (1, 2), "{k:?}");
        assert_eq!(dp.counters(WEB, Colour::Green).expect("green"), Default::default(), "nothing on green");

        // DSR: a SYN, the same SYN again (a retransmission: the client got no SYN-ACK), an
        // ACK, a client RST; then a new SYN on the closed 5-tuple (a new connection).
        let d = (CLIENT, 43005);
        run(&mut dp, &tcp(IN, d, (VIP, 443), 64, Tcp::Syn));
        assert_eq!(blue(&dp, DSR).syn_retransmits, 0);
        run(&mut dp, &tcp(IN, d, (VIP, 443), 64, Tcp::Syn));
        let k = blue(&dp, DSR);
        assert_eq!((k.syns, k.syn_retransmits, k.handshakes), (2, 1, 0), "{k:?}");
        run(&mut dp, &tcp(IN, d, (VIP, 443), 64, Tcp::Ack));
        run(&mut dp, &tcp_with(IN, d, (VIP, 443), 0x14));
        assert_eq!(blue(&dp, DSR).client_resets, 1);
        run(&mut dp, &tcp(IN, d, (VIP, 443), 64, Tcp::Syn));
        assert_eq!(blue(&dp, DSR).syn_retransmits, 1, "a SYN on a closed flow is a new connection");
        // NAT SYNs look nothing up: a repeated SYN is a new flow, not a retransmission.
        run(&mut dp, &tcp(IN, c1, (VIP, 80), 64, Tcp::Syn));
        run(&mut dp, &tcp(IN, c1, (VIP, 80), 64, Tcp::Syn));
        assert_eq!(blue(&dp, WEB).syn_retransmits, 0);
    });
}

/// The flow table's sets: a new flow whose set is full takes the slot of a flow that ended
/// before any open flow's, and only then the set's least recently seen open flow, counting
/// that eviction on its colour. Six UDP flows of `dns` whose 5-tuples share one set of four
/// (a table made for 16 flows: 8 sets).
#[test]
fn a_full_set_gives_an_ended_flows_slot_first_then_the_least_recently_seen() {
    if !crate::have_root("a_full_set_gives_an_ended_flows_slot_first_then_the_least_recently_seen") {
        return;
    }
    use switcher_common::{FAMILY_V4, FLOW_WAYS, FlowKey, PROTO_UDP, flow_sets, user::flow_set};
    let ns = fib_namespace();
    ns.run(|| {
        let sets = flow_sets(16);
        let mut dp = Dataplane::open(
            &services(),
            Options { udp_idle_timeout: IDLE, redirect: true, max_flows: Some(16), ..Options::default() },
        )
        .expect("load the XDP program");
        let key = |port: u16| FlowKey {
            src: widen(CLIENT2),
            dst: widen(VIP),
            sport: port.to_be_bytes(),
            dport: 53u16.to_be_bytes(),
            proto: PROTO_UDP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let set = flow_set(&key(30_000), sets);
        let ports: Vec<u16> = (30_000..40_000).filter(|&p| flow_set(&key(p), sets) == set).take(6).collect();
        assert_eq!(ports.len(), 6, "six client ports of one set");
        let send = |dp: &mut Dataplane, port: u16| {
            assert_eq!(run(dp, &udp(IN, (CLIENT2, port), (VIP, 53), 64)), XDP_REDIRECT, "port {port}");
        };
        let held = |dp: &Dataplane| {
            let mut p: Vec<u16> = dp
                .flows()
                .iter()
                .filter(|(k, _)| flow_set(k, sets) == set)
                .map(|(k, _)| u16::from_be_bytes(k.sport))
                .collect();
            p.sort_unstable();
            p
        };
        let evicted = |dp: &Dataplane| dp.counters(1, Colour::Blue).expect("counters").evicted;
        for &p in &ports[..4] {
            send(&mut dp, p);
        }
        assert_eq!(held(&dp), ports[..4].to_vec(), "four flows fill the set");
        // All four idle out; three come back, a moment apart, so their ages differ.
        std::thread::sleep(IDLE + Duration::from_millis(300));
        for &p in &ports[1..4] {
            send(&mut dp, p);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(held(&dp).len(), FLOW_WAYS as usize, "the flows that came back kept their slots");
        send(&mut dp, ports[4]);
        assert_eq!(held(&dp), ports[1..5].to_vec(), "the fifth flow took the ended flow's slot");
        assert_eq!(evicted(&dp), 0, "an ended flow's slot is no eviction");
        send(&mut dp, ports[5]);
        assert_eq!(held(&dp), ports[2..6].to_vec(), "the sixth took the least recently seen flow's slot");
        assert_eq!(evicted(&dp), 1, "and that eviction is counted on its colour");
    });
}
