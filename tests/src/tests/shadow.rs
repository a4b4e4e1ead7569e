//! T2: shadow traffic with real DNS servers (dnsmasq) on both colours, in namespaces.
//!
//! The two colours answer the same names with different addresses, so the client can tell
//! which colour answered; each logs the queries it received (`--log-queries`), so the test
//! can tell which queries reached it. With the shadow share at 100 % every query reaches both
//! colours while the client gets exactly one answer, from the VIP and from the live colour;
//! after a cut-over the roles swap; at 10 % the copied flows are exactly those the shadow hash
//! picks (and about 10 %); a TCP service refuses shadow traffic with the reason.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use switcher_common::{FAMILY_V4, FlowKey, PROTO_UDP, SEED_SHADOW, flow_hash, shadow_chosen};
use switcher_user::protocol::Colour;

use crate::{
    net::{BACKEND_UDP, BLUE, CLIENT, GREEN, Netns, Topology, VIP, VIP_UDP, wait_for},
    proc::{Daemon, demo_config},
};

/// What each colour's DNS server answers for `*.shadow.test`.
const BLUE_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const GREEN_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);

/// A dnsmasq in a namespace, killed (by its pid) on drop.
struct Dnsmasq {
    child: Child,
    log: PathBuf,
}

impl Dnsmasq {
    fn start(ns: &Netns, listen: Ipv4Addr, answer: Ipv4Addr, dir: &Path, name: &str) -> Dnsmasq {
        let log = dir.join(format!("dnsmasq-{name}.log"));
        let _ = std::fs::remove_file(&log);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null"])
            .args(["--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root", "--pid-file="])
            .arg(format!("--listen-address={listen}"))
            .arg(format!("--port={BACKEND_UDP}"))
            .arg(format!("--address=/shadow.test/{answer}"))
            .arg("--log-queries")
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let d = Dnsmasq { child, log };
        let up = wait_for(Duration::from_secs(10), || d.text().contains("started").then_some(()));
        assert!(up.is_some(), "dnsmasq {name} did not start: {}", d.text());
        d
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The names of the A queries it received.
    fn names(&self) -> BTreeSet<String> {
        self.text()
            .lines()
            .filter_map(|l| l.split_once("query[A] ").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // SAFETY: a signal to the child we started, by its pid.
        unsafe { libc::kill(i32::try_from(self.child.id()).unwrap_or(0), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A DNS query for `name` (type A, class IN) with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The id and the first A record of an answer.
fn answer(resp: &[u8]) -> Option<(u16, Ipv4Addr)> {
    let id = u16::from_be_bytes([*resp.first()?, *resp.get(1)?]);
    let n = resp.len();
    (n >= 16 && resp[n - 6..n - 4] == [0, 4])
        .then(|| (id, Ipv4Addr::new(resp[n - 4], resp[n - 3], resp[n - 2], resp[n - 1])))
}

/// One query per name, each from its own socket (source port `ports[i]`, or any): the first
/// answer of each with its source, and how many more datagrams each socket got within 0.5 s.
fn ask_all(client: &Netns, names: &[String], ports: Option<&[u16]>) -> Vec<(SocketAddr, Ipv4Addr, usize)> {
    ask_timed(client, names, ports).into_iter().map(|(from, addr, n, _)| (from, addr, n)).collect()
}

/// [`ask_all`], with each query's round-trip time.
fn ask_timed(client: &Netns, names: &[String], ports: Option<&[u16]>) -> Vec<(SocketAddr, Ipv4Addr, usize, Duration)> {
    let names = names.to_vec();
    let ports = ports.map(<[u16]>::to_vec);
    client.run(move || {
        let mut sockets = Vec::new();
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let port = ports.as_ref().map_or(0, |p| p[i]);
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind the client socket");
            sock.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            let id = u16::try_from(i % 65_000).expect("id");
            let sent = std::time::Instant::now();
            sock.send_to(&query(id, name), (VIP, VIP_UDP)).expect("send the query");
            let mut buf = [0u8; 512];
            let (n, from) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("no answer to {name}: {e}"));
            let (got_id, addr) = answer(&buf[..n]).unwrap_or_else(|| panic!("not an A answer to {name}"));
            assert_eq!(got_id, id, "the answer to {name} is its own");
            out.push((from, addr, sent.elapsed()));
            sockets.push(sock);
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut extra = Vec::new();
        for sock in &sockets {
            sock.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 512];
            let mut n = 0;
            while sock.recv_from(&mut buf).is_ok() {
                n += 1;
            }
            extra.push(n);
        }
        out.into_iter().zip(extra).map(|((from, addr, rtt), n)| (from, addr, n, rtt)).collect()
    })
}

/// Source ports `base, base + 1, …`, one per name: each phase of the test uses ports of its
/// own, so no query lands on a UDP flow an earlier phase left open (a flow keeps its colour
/// until it idles out).
fn ports(base: u16, names: &[String]) -> Vec<u16> {
    (0..names.len()).map(|i| base + u16::try_from(i).expect("few names")).collect()
}

/// Waits (at most 10 s) until `server` logged every name of `names`.
fn logged_all(server: &Dnsmasq, names: &[String]) -> bool {
    wait_for(Duration::from_secs(10), || names.iter().all(|n| server.names().contains(n)).then_some(())).is_some()
}

fn shadow_of(d: &Daemon, colour: Colour) -> switcher_user::protocol::ShadowColour {
    let status = d.status();
    let dns = status.services.iter().find(|s| s.name == "dns").expect("dns in status");
    let sh = dns.shadow.as_ref().expect("shadow in status");
    *sh.colours.iter().find(|c| c.colour == colour).expect("colour")
}

#[test]
fn shadow_traffic_reaches_both_colours_and_only_the_live_one_answers() {
    if !crate::have_root("shadow_traffic_reaches_both_colours_and_only_the_live_one_answers") {
        return;
    }
    for tool in ["dnsmasq", "dig"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map_or(true, |o| !o.status.success())
        {
            crate::skip("shadow_traffic", &format!("{tool} is not installed (./x installs it as root)"));
            return;
        }
    }
    let t = Topology::new();
    let mut d = Daemon::start(&t.lb, |sock| demo_config(&t.lb_ifaces, "auto", sock));
    let blue = Dnsmasq::start(&t.blue, BLUE, BLUE_ANSWER, &d.dir, "blue");
    let green = Dnsmasq::start(&t.green, GREEN, GREEN_ANSWER, &d.dir, "green");
    // The copies leave by the FIB's answer, which needs the backends' neighbour entries (the
    // daemon's health probes keep them in production; dns has none here).
    t.lb.run(|| {
        for b in [BLUE, GREEN] {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            sock.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            sock.send_to(&query(1, "warm.shadow.test"), (b, BACKEND_UDP)).expect("send");
            let mut buf = [0u8; 512];
            sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("{b} answers the LB directly: {e}"));
        }
    });

    // dig, the usual client, through the VIP: blue answers.
    let out = Command::new("ip")
        .args(["netns", "exec", &t.client.name, "dig", &format!("@{VIP}"), "q0.shadow.test", "+short", "+tries=1"])
        .output()
        .expect("run dig");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), BLUE_ANSWER.to_string(), "dig through the VIP");

    // A TCP service refuses, with the reason.
    let refused = d.cli(&["shadow", "web", "10%"]);
    assert!(!refused.status.success(), "shadow on a TCP service must be refused");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("sequence numbers") && why.contains("UDP"), "the reason is given: {why}");

    // 100 %: every query reaches both colours; the client gets one answer, blue's, from the VIP.
    d.cli_ok(&["shadow", "dns", "100%"]);
    let names: Vec<String> = (1..=20).map(|i| format!("a{i}.shadow.test")).collect();
    for (i, (from, addr, extra)) in ask_all(&t.client, &names, Some(&ports(20_000, &names))).into_iter().enumerate() {
        assert_eq!(from, SocketAddr::new(IpAddr::V4(VIP), VIP_UDP), "query {i} answered from the VIP");
        assert_eq!(addr, BLUE_ANSWER, "query {i} answered by the live colour (blue)");
        assert_eq!(extra, 0, "query {i}: exactly one answer");
    }
    assert!(logged_all(&blue, &names), "blue (live) got every query: {:?}", blue.names());
    assert!(logged_all(&green, &names), "green (idle) got a copy of every query: {:?}", green.names());
    let g = shadow_of(&d, Colour::Green);
    assert!(g.sent >= 20 && g.replies_dropped >= 20 && g.latency_count >= 20, "green's shadow counters: {g:?}");
    let b = shadow_of(&d, Colour::Blue);
    assert!(b.shadowed >= 20 && b.latency_count >= 20, "blue's shadow counters: {b:?}");
    assert!(d.reason("shadow_reply") >= 20, "green's answers were dropped at the LB");
    let text = d.cli_ok(&["status", "dns"]);
    assert!(text.contains("shadow: 100% of new flows copied to green"), "status shows it:\n{text}");

    // With the daemon down (killed, as a crash), the pinned maps and links go on copying.
    d.kill();
    let names: Vec<String> = (1..=10).map(|i| format!("k{i}.shadow.test")).collect();
    for (i, (from, addr, extra)) in ask_all(&t.client, &names, Some(&ports(21_000, &names))).into_iter().enumerate() {
        assert_eq!((from.ip(), addr, extra), (IpAddr::V4(VIP), BLUE_ANSWER, 0), "daemon down, query {i}");
    }
    assert!(logged_all(&blue, &names), "daemon down: blue got every query");
    assert!(logged_all(&green, &names), "daemon down: green got a copy of every query");
    // A new daemon adopts the pins (the TC program replaced under its pinned links) and
    // applies its config, where dns has no shadow share: set it again.
    d.restart();
    let out = d.cli_ok(&["shadow", "dns"]);
    assert!(out.contains("shadow: off"), "the config's setting: {out}");
    d.cli_ok(&["shadow", "dns", "100%"]);

    // After a cut-over the roles swap: green answers, blue gets the copies.
    d.cli_ok(&["cutover", "dns", "green"]);
    let names: Vec<String> = (1..=20).map(|i| format!("b{i}.shadow.test")).collect();
    for (i, (from, addr, extra)) in ask_all(&t.client, &names, Some(&ports(22_000, &names))).into_iter().enumerate() {
        assert_eq!(from, SocketAddr::new(IpAddr::V4(VIP), VIP_UDP), "after the cut-over, query {i} from the VIP");
        assert_eq!(addr, GREEN_ANSWER, "after the cut-over, query {i} answered by green");
        assert_eq!(extra, 0, "after the cut-over, query {i}: exactly one answer");
    }
    assert!(logged_all(&green, &names), "green (live now) got every query");
    assert!(logged_all(&blue, &names), "blue (idle now) got a copy of every query");

    // 10 %: exactly the flows the shadow hash picks are copied, about 10 % of them.
    d.cli_ok(&["shadow", "dns", "10%"]);
    let c_ports: Vec<u16> = (0..400).map(|i| 30_000 + i).collect();
    let names: Vec<String> = (0..400).map(|i| format!("c{i}.shadow.test")).collect();
    for (from, addr, extra) in ask_all(&t.client, &names, Some(&c_ports)) {
        assert_eq!((from.ip(), addr, extra), (IpAddr::V4(VIP), GREEN_ANSWER, 0), "at 10 %: one answer, green's");
    }
    let picked: BTreeSet<String> = c_ports
        .iter()
        .zip(&names)
        .filter(|(port, _)| {
            let key = FlowKey {
                src: widen(CLIENT),
                dst: widen(VIP),
                sport: port.to_be_bytes(),
                dport: VIP_UDP.to_be_bytes(),
                proto: PROTO_UDP,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            shadow_chosen(flow_hash(&key, SEED_SHADOW), 1_000)
        })
        .map(|(_, n)| n.clone())
        .collect();
    assert!(logged_all(&green, &names), "green (live) got every query");
    // Copies of the picked flows arrive; give them the same bounded wait.
    let _ = wait_for(Duration::from_secs(5), || {
        let copied = blue.names().into_iter().filter(|n| n.starts_with('c')).count();
        (copied >= picked.len()).then_some(())
    });
    let copied: BTreeSet<String> = blue.names().into_iter().filter(|n| n.starts_with('c')).collect();
    assert_eq!(copied, picked, "the copied flows are exactly those the shadow hash picks");
    let share = copied.len() as f64 / names.len() as f64;
    assert!((0.07..=0.13).contains(&share), "about 10 % copied: {:.1} %", share * 100.0);
    eprintln!("shadow at 10 %: {} of {} flows copied ({:.1} %)", copied.len(), names.len(), share * 100.0);

    d.cli_ok(&["shadow", "dns", "off"]);
    let names: Vec<String> = (0..10).map(|i| format!("d{i}.shadow.test")).collect();
    let _ = ask_all(&t.client, &names, Some(&ports(23_000, &names)));
    assert!(logged_all(&green, &names), "green (live) got every query");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!blue.names().iter().any(|n| n.starts_with('d')), "off: nothing copied");

    // The client's round-trip time with shadow off and at 100 %, printed for BENCHMARKS.md
    // (no timing is asserted).
    let mut medians = Vec::new();
    for (share, prefix, base) in
        [("off", 'e', 24_000), ("100%", 'f', 24_500), ("off", 'g', 25_000), ("100%", 'h', 25_500)]
    {
        d.cli_ok(&["shadow", "dns", share]);
        let names: Vec<String> = (0..200).map(|i| format!("{prefix}{i}.shadow.test")).collect();
        let mut rtts: Vec<Duration> = ask_timed(&t.client, &names, Some(&ports(base, &names)))
            .into_iter()
            .map(|(from, addr, extra, rtt)| {
                assert_eq!((from.ip(), addr, extra), (IpAddr::V4(VIP), GREEN_ANSWER, 0), "shadow {share}");
                rtt
            })
            .collect();
        rtts.sort();
        medians.push(format!("shadow {share}: median {:?}, p90 {:?}", rtts[100], rtts[180]));
    }
    eprintln!("client round trips through the VIP (200 queries each, dnsmasq on green): {}", medians.join("; "));
}

fn widen(a: Ipv4Addr) -> [u8; 16] {
    let o = a.octets();
    [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}
