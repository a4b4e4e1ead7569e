//! T2, issue #12 §1: a client's direct connections to a backend's own address are left alone,
//! however many VIP flows the same client just had from the same source ports. The same client
//! traffic runs through switcher (both forwarding modes) and through the reference, the
//! kernel's conntrack NAT (nftables DNAT), in one test; switcher may not fail more often.
//!
//! Port reuse is made certain rather than left to volume: the client's ephemeral range is
//! 1,000 ports, each phase's VIP connections cycle through it, and the direct connections that
//! follow reuse ports whose last VIP flow went to the very backend they connect to: the flow
//! on the reversed tuple of their SYN-ACK names that backend, and only its closed state tells
//! the two apart.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    net::{BACKEND_TCP, BACKEND_UDP, BLUE, BLUE6, GREEN, GREEN6, Netns, Server, Topology, VIP, VIP_TCP, VIP_UDP, VIP6},
    proc::{Daemon, config_with},
};

/// The client's ephemeral ports: 1,000, so every phase's VIP connections use each many times.
const PORT_RANGE: &str = "40000 40999";
/// VIP connections per phase and family; then direct connections per phase, family and backend.
const VIP_CONNS: usize = 1_000;
const DIRECT_CONNS: usize = 600;
/// A batch stops after this many failures (each may cost a 2 s timeout); it then counts as
/// failed beyond comparison.
const GIVE_UP_AFTER: usize = 25;

/// One colour's backend, as the servers answer for it.
#[derive(Clone, Copy)]
struct Colour {
    name: &'static str,
    v4: IpAddr,
    v6: IpAddr,
}

const COLOURS: [Colour; 2] = [
    Colour { name: "blue", v4: IpAddr::V4(BLUE), v6: IpAddr::V6(BLUE6) },
    Colour { name: "green", v4: IpAddr::V4(GREEN), v6: IpAddr::V6(GREEN6) },
];

/// What a kind of traffic is: TCP over IPv4 or IPv6, or UDP over IPv4.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
enum Kind {
    Tcp4,
    Tcp6,
    Udp4,
}

impl Kind {
    /// The switcher service (in the test config) that serves this kind on the VIP.
    fn service(self) -> &'static str {
        match self {
            Kind::Tcp4 => "web",
            Kind::Tcp6 => "web6",
            Kind::Udp4 => "dns",
        }
    }

    fn vip(self) -> SocketAddr {
        match self {
            Kind::Tcp4 => SocketAddr::new(IpAddr::V4(VIP), VIP_TCP),
            Kind::Tcp6 => SocketAddr::new(IpAddr::V6(VIP6), VIP_TCP),
            Kind::Udp4 => SocketAddr::new(IpAddr::V4(VIP), VIP_UDP),
        }
    }

    fn backend(self, c: Colour) -> SocketAddr {
        match self {
            Kind::Tcp4 => SocketAddr::new(c.v4, BACKEND_TCP),
            Kind::Tcp6 => SocketAddr::new(c.v6, BACKEND_TCP),
            Kind::Udp4 => SocketAddr::new(c.v4, BACKEND_UDP),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Tcp4 => "TCP/IPv4",
            Kind::Tcp6 => "TCP/IPv6",
            Kind::Udp4 => "UDP/IPv4",
        }
    }
}

/// What a request must get back: `default`, or for a port in `by_port` (a UDP flow still live
/// from the previous phase keeps its colour, with switcher as with conntrack) that answer.
struct Expect {
    default: String,
    by_port: HashMap<u16, String>,
}

impl Expect {
    fn answer(&self, port: u16) -> &str {
        self.by_port.get(&port).unwrap_or(&self.default)
    }
}

/// One batch of requests from the client: the source port and answer of those that got the
/// right answer, what went wrong with the others, and their source ports where known.
#[derive(Default)]
struct Batch {
    ok: Vec<(u16, String)>,
    failures: Vec<String>,
    failed_ports: Vec<u16>,
    gave_up: bool,
}

/// A failed request: its source port if it got one, and what went wrong.
type Failure = (Option<u16>, String);

/// `n` requests to `to`, each on a fresh socket with a kernel-chosen port. Runs on a thread
/// inside the client namespace.
fn requests(to: SocketAddr, udp: bool, n: usize, expect: &Expect) -> Batch {
    let mut b = Batch::default();
    for _ in 0..n {
        let result = if udp { udp_once(to, expect) } else { tcp_once(to, expect) };
        match result {
            Ok(ok) => b.ok.push(ok),
            Err((port, e)) => {
                b.failures.push(e);
                b.failed_ports.extend(port);
                if b.failures.len() >= GIVE_UP_AFTER {
                    b.gave_up = true;
                    break;
                }
            }
        }
    }
    b
}

/// One TCP connection: connect (2 s), one line, one answer (2 s), close from the client side.
/// A connect that finds no free port yet (`EADDRNOTAVAIL`: every port's TIME_WAIT towards this
/// destination is younger than `tcp_tw_reuse` allows) never reached the network: it waits and
/// tries again, for at most 2 s.
fn tcp_once(to: SocketAddr, expect: &Expect) -> Result<(u16, String), Failure> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err((None, format!("connect: {e}"))),
        }
    };
    let port = stream.local_addr().map_err(|e| (None, format!("local address: {e}")))?.port();
    let answer = (|| {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        (&stream).write_all(b"which colour?\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok::<_, std::io::Error>(line.trim().to_owned())
    })()
    .map_err(|e| (Some(port), format!("port {port}: {e}")))?;
    let want = expect.answer(port);
    if answer == want {
        Ok((port, answer))
    } else {
        Err((Some(port), format!("port {port}: answer {answer:?}, not {want:?}")))
    }
}

/// One UDP datagram from a fresh unconnected socket, so that an answer from the wrong source
/// is seen (and counted) at once rather than dropped.
fn udp_once(to: SocketAddr, expect: &Expect) -> Result<(u16, String), Failure> {
    let any: IpAddr = if to.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
    let sock = UdpSocket::bind((any, 0)).map_err(|e| (None, format!("bind: {e}")))?;
    let port = sock.local_addr().map_err(|e| (None, format!("local address: {e}")))?.port();
    let fail = |e: std::io::Error| (Some(port), format!("port {port}: {e}"));
    sock.set_read_timeout(Some(Duration::from_secs(2))).map_err(fail)?;
    sock.send_to(b"which colour?", to).map_err(fail)?;
    let mut buf = [0u8; 256];
    let (n, from) = sock.recv_from(&mut buf).map_err(fail)?;
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    let want = expect.answer(port);
    if from == to && answer == want {
        Ok((port, answer))
    } else {
        Err((Some(port), format!("port {port}: {answer:?} from {from}, not {want:?} from {to}")))
    }
}

/// The load balancer under test.
enum Lb<'a> {
    Switcher(&'a Daemon),
    Nft(&'a Netns),
}

impl Lb<'_> {
    /// New flows of `kinds` go to `c` from now on; open ones stay where they are.
    fn send_new_flows_to(&self, c: Colour, kinds: &[Kind]) {
        match self {
            Lb::Switcher(d) => {
                for kind in kinds {
                    d.cli_ok(&["cutover", kind.service(), c.name]);
                }
            }
            Lb::Nft(lb) => nft(lb, &dnat_rules(c)),
        }
    }
}

/// The reference's ruleset: DNAT of each VIP:port to `c`'s backend, in one transaction that
/// replaces the previous one (conntrack keeps the open connections' translation, as switcher
/// keeps open flows).
fn dnat_rules(c: Colour) -> String {
    format!(
        "table inet direct_ref\nflush table inet direct_ref\ntable inet direct_ref {{\n\
         chain prerouting {{\ntype nat hook prerouting priority dstnat; policy accept;\n\
         ip daddr {VIP} tcp dport {VIP_TCP} dnat ip to {v4}:{BACKEND_TCP}\n\
         ip6 daddr {VIP6} tcp dport {VIP_TCP} dnat ip6 to [{v6}]:{BACKEND_TCP}\n\
         ip daddr {VIP} udp dport {VIP_UDP} dnat ip to {v4}:{BACKEND_UDP}\n}}\n}}\n",
        v4 = c.v4,
        v6 = c.v6,
    )
}

/// `nft -f -` in `ns`.
fn nft(ns: &Netns, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child.stdin.take().expect("nft stdin").write_all(script.as_bytes()).expect("write nft script");
    let out = child.wait_with_output().expect("nft");
    assert!(out.status.success(), "nft -f failed: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// One row of the report: one batch and how many of its ports a VIP flow had used before.
struct Row {
    phase: &'static str,
    kind: Kind,
    /// "VIP", or the backend's colour for a direct batch.
    to: &'static str,
    asked: usize,
    failed: usize,
    gave_up: bool,
    /// Direct batches: requests from a port whose previous VIP flow of the same kind went to
    /// this very backend (the reversed tuple's flow names it), and from a port any VIP flow to
    /// this backend had used before (failed requests count when they got a port).
    reused_last: usize,
    reused_any: usize,
    first_failures: Vec<String>,
}

/// What one load balancer did with the whole client traffic.
struct Run {
    rows: Vec<Row>,
    /// (kind, colour) → VIP requests answered by that colour, and from how many source ports.
    answered: HashMap<(Kind, &'static str), (usize, BTreeSet<u16>)>,
}

/// The whole client traffic of `kinds` against one load balancer: for each colour in turn, new
/// flows go there, then VIP requests of each kind, then direct requests to each colour's
/// backend.
fn run_traffic(t: &Topology, lb: &Lb, kinds: &[Kind]) -> Run {
    t.client.exec(&["sysctl", "-qw", &format!("net.ipv4.ip_local_port_range={PORT_RANGE}")]);
    // The VIP connections outnumber the ports: TIME_WAIT ports are reused after 1 s.
    t.client.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    let mut run = Run { rows: Vec::new(), answered: HashMap::new() };
    // (kind, port) → the colour of the last VIP flow from it; (kind, port, colour) ever used.
    let mut last: HashMap<(Kind, u16), &'static str> = HashMap::new();
    let mut ever: BTreeSet<(Kind, u16, &'static str)> = BTreeSet::new();
    let batch = |kind: Kind, to: SocketAddr, n: usize, expect: Expect| {
        t.client.run(move || requests(to, kind == Kind::Udp4, n, &expect))
    };
    let row = |phase: Colour, kind: Kind, to: &'static str, b: &Batch, reused: (usize, usize)| Row {
        phase: phase.name,
        kind,
        to,
        asked: b.ok.len() + b.failures.len(),
        failed: b.failures.len(),
        gave_up: b.gave_up,
        reused_last: reused.0,
        reused_any: reused.1,
        first_failures: b.failures.iter().take(3).cloned().collect(),
    };
    for (i, phase) in COLOURS.into_iter().enumerate() {
        if i > 0 {
            lb.send_new_flows_to(phase, kinds);
        }
        for &kind in kinds {
            // A new TCP connection is a new flow; a UDP port whose flow from the previous
            // phase is still live (30 s idle, for conntrack as for switcher) keeps its colour.
            let by_port = if kind == Kind::Udp4 {
                let colour = |name: &str| COLOURS.into_iter().find(|c| c.name == name).unwrap_or(phase);
                let answer = |name: &str| format!("{name} {}", kind.backend(colour(name)).ip());
                last.iter().filter(|((k, _), _)| *k == kind).map(|((_, p), name)| (*p, answer(name))).collect()
            } else {
                HashMap::new()
            };
            let expect = Expect { default: format!("{} {}", phase.name, kind.backend(phase).ip()), by_port };
            let b = batch(kind, kind.vip(), VIP_CONNS, expect);
            for (p, answer) in &b.ok {
                let colour = COLOURS.into_iter().find(|c| answer.starts_with(c.name)).unwrap_or(phase).name;
                last.insert((kind, *p), colour);
                ever.insert((kind, *p, colour));
                let entry = run.answered.entry((kind, colour)).or_default();
                entry.0 += 1;
                entry.1.insert(*p);
            }
            run.rows.push(row(phase, kind, "VIP", &b, (0, 0)));
        }
        for &kind in kinds {
            for backend in COLOURS {
                let to = kind.backend(backend);
                let expect = Expect { default: format!("{} {}", backend.name, to.ip()), by_port: HashMap::new() };
                let b = batch(kind, to, DIRECT_CONNS, expect);
                let ports = || b.ok.iter().map(|(p, _)| *p).chain(b.failed_ports.iter().copied());
                let reused_last = ports().filter(|p| last.get(&(kind, *p)) == Some(&backend.name)).count();
                let reused_any = ports().filter(|p| ever.contains(&(kind, *p, backend.name))).count();
                run.rows.push(row(phase, kind, backend.name, &b, (reused_last, reused_any)));
            }
        }
    }
    run
}

/// switcher in `forwarding` mode on a fresh topology, with `web`, `web6` and `dns` on blue,
/// and what its status says was not as expected.
fn run_switcher(forwarding: &str, kinds: &[Kind]) -> (Run, String, Vec<String>) {
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let web6 = format!(
        "\n[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nport = {VIP_TCP}\nprotocol = \"tcp\"\nactive = \"blue\"\n\
         blue = \"[{BLUE6}]:{BACKEND_TCP}\"\ngreen = \"[{GREEN6}]:{BACKEND_TCP}\"\n"
    );
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, forwarding, s, &web6));
    let run = run_traffic(&t, &Lb::Switcher(&d), kinds);
    // The VIP half really went through switcher: each colour of each service counted a flow per
    // TCP connection, and per UDP source port, it answered; backends' packets that were no
    // live flow's replies (the direct connections') were seen and passed.
    let status = d.status();
    let mut problems = Vec::new();
    let mut counts = Vec::new();
    for &kind in kinds {
        let Some(s) = status.services.iter().find(|s| s.name == kind.service()) else {
            problems.push(format!("no service {} in the status", kind.service()));
            continue;
        };
        for c in &s.colours {
            let (conns, ports) = run.answered.get(&(kind, c.colour.as_str())).map_or((0, 0), |(n, p)| (*n, p.len()));
            let want = if kind == Kind::Udp4 { ports } else { conns };
            if want == 0 || c.counters.flows < want as u64 {
                problems.push(format!("{} {}: {} flows counted, {want} expected", s.name, c.colour, c.counters.flows));
            }
            counts.push(format!("{} {} {}", s.name, c.colour, c.counters.flows));
        }
    }
    let not_live = status.reasons.iter().find(|(n, _)| n == "not_live").map_or(0, |r| r.1);
    if not_live == 0 {
        problems.push("no backend packet was passed as not a live flow's reply".to_owned());
    }
    (run, format!("flows: {}; not_live packets: {not_live}", counts.join(", ")), problems)
}

/// The reference: the same traffic through nftables DNAT on a fresh topology.
fn run_nftables(kinds: &[Kind]) -> Run {
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    // The table lives in the lb namespace and goes with it.
    nft(&t.lb, &dnat_rules(COLOURS[0]));
    run_traffic(&t, &Lb::Nft(&t.lb), kinds)
}

fn table(runs: &[(&str, &Run)]) -> String {
    let mut out = String::from(
        "lb                 new flows  traffic   to      asked  failed  reused: last VIP flow there  any VIP flow there\n",
    );
    for (name, run) in runs {
        for r in &run.rows {
            let failed = if r.gave_up { format!("≥{}", r.failed) } else { r.failed.to_string() };
            let _ = writeln!(
                out,
                "{name:<18} {:<10} {:<9} {:<6} {:>6} {failed:>7}  {:>27}  {:>18}",
                r.phase,
                r.kind.label(),
                r.to,
                r.asked,
                r.reused_last,
                r.reused_any
            );
        }
    }
    out
}

/// The same client traffic of `kinds` through nftables DNAT and through switcher in both
/// forwarding modes; panics unless switcher failed no more often than nftables in every batch.
fn compare_with_nftables(test: &str, kinds: &[Kind]) {
    if !crate::have_root(test) {
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        eprintln!("skipping {test}: `nft` (nftables, the reference NAT) is not installed; `./x test` installs it");
        return;
    }
    // The three run side by side, each on its own topology: the same traffic, a third of the
    // wall time.
    let start = Instant::now();
    let timed = |f: &dyn Fn() -> (Run, String, Vec<String>)| {
        let t = Instant::now();
        let out = f();
        (out, t.elapsed())
    };
    let ((reference, nft_time), (kernel, kernel_time), (redirect, redirect_time)) = std::thread::scope(|s| {
        let nft = s.spawn(|| timed(&|| (run_nftables(kinds), String::new(), Vec::new())));
        let kernel = s.spawn(|| timed(&|| run_switcher("kernel", kinds)));
        let redirect = s.spawn(|| timed(&|| run_switcher("redirect", kinds)));
        let join = |h: std::thread::ScopedJoinHandle<'_, _>| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (join(nft), join(kernel), join(redirect))
    });
    let ((reference, _, _), (kernel, kernel_status, kernel_problems), (redirect, redirect_status, redirect_problems)) =
        (reference, kernel, redirect);
    let runs = [("nftables DNAT", &reference), ("switcher kernel", &kernel), ("switcher redirect", &redirect)];
    eprintln!("{}", table(&runs));
    eprintln!("switcher kernel: {kernel_status}\nswitcher redirect: {redirect_status}");
    eprintln!(
        "took {:.1} s (side by side: nftables {:.1} s, switcher kernel {:.1} s, redirect {:.1} s)",
        start.elapsed().as_secs_f64(),
        nft_time.as_secs_f64(),
        kernel_time.as_secs_f64(),
        redirect_time.as_secs_f64()
    );

    for (name, run) in runs {
        for r in &run.rows {
            let what = format!("{name}, new flows on {}, {} to {}", r.phase, r.kind.label(), r.to);
            if r.to == "VIP" {
                // switcher's VIP requests must all succeed. The reference's are only shown: a
                // VIP connection through conntrack can time out on a reused tuple (1 of 1,000
                // TCP/IPv6 once here), and that is the reference's behaviour, not a fault of the
                // test.
                if name != "nftables DNAT" {
                    assert_eq!(r.failed, 0, "{what}: VIP requests failed: {:?}", r.first_failures);
                }
            } else if r.to == r.phase && !r.gave_up {
                // Right after VIP flows to this very backend, the direct requests really came
                // from their ports: for TCP at least half of them (all, here); for UDP, whose
                // ports are picked at random and whose live flows of the first phase keep many
                // ports on blue in the second, a tenth (118–152 of 600 to green in the second
                // phase in runs here, 360–410 otherwise).
                let share = if r.kind == Kind::Udp4 { 10 } else { 2 };
                assert!(
                    r.reused_last * share >= DIRECT_CONNS,
                    "{what}: only {} of {} direct requests came from a port whose last VIP flow went to this \
                     backend; the test proves nothing",
                    r.reused_last,
                    r.asked
                );
            }
        }
    }
    for (name, run) in [("kernel", &kernel), ("redirect", &redirect)] {
        for (s, r) in run.rows.iter().zip(&reference.rows) {
            assert!(
                !s.gave_up && s.failed <= r.failed,
                "switcher {name}, new flows on {}, {} to {}: {} failures, nftables DNAT {} (first: {:?})",
                s.phase,
                s.kind.label(),
                s.to,
                s.failed,
                r.failed,
                s.first_failures,
            );
        }
    }
    assert!(kernel_problems.is_empty(), "switcher kernel: {kernel_problems:?}");
    assert!(redirect_problems.is_empty(), "switcher redirect: {redirect_problems:?}");
}

/// Issue #12 §1 with TCP, IPv4 and IPv6: many VIP connections from one client, a cut-over,
/// and after each phase ≥ 600 direct connections to each colour's backend.
#[test]
fn direct_tcp_connections_after_many_vip_flows_fail_no_more_than_with_nftables() {
    compare_with_nftables(
        "direct_tcp_connections_after_many_vip_flows_fail_no_more_than_with_nftables",
        &[Kind::Tcp4, Kind::Tcp6],
    );
}

/// The same with UDP: a direct request from a port whose VIP flow to that backend is still
/// live (30 s idle) shares the backend-side tuple with that flow.
#[test]
fn direct_udp_requests_after_many_vip_flows_fail_no_more_than_with_nftables() {
    compare_with_nftables("direct_udp_requests_after_many_vip_flows_fail_no_more_than_with_nftables", &[Kind::Udp4]);
}
