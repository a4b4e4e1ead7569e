//! T2 for the production data path: draining, pools, canary, preview, IPv6 and DSR, with the
//! real daemon and real TCP/UDP traffic in namespaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use crate::{
    net::{
        BACKEND_TCP, BACKEND_UDP, BLUE6, BLUES, CLIENT6, Conn, GREEN6, GREENS, Server, Sniffer, Topology, VIP, VIP6,
        colour_of, tcp_request, udp_request, wait_for,
    },
    proc::{Daemon, config_with},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);

fn pool(addrs: &[std::net::Ipv4Addr], port: u16) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}:{port}\"")).collect();
    format!("[{}]", list.join(", "))
}

/// A service block for `config_with`.
fn service(name: &str, vip: &str, port: u16, extra: &str) -> String {
    format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\nactive = \"blue\"\n{extra}\n"
    )
}

/// The pool web3 (VIP:8000, three backends per colour, preview on 8001) used by several tests.
fn web3() -> String {
    service(
        "web3",
        &VIP.to_string(),
        8000,
        &format!("preview_port = 8001\nblue = {}\ngreen = {}", pool(&BLUES, BACKEND_TCP), pool(&GREENS, BACKEND_TCP)),
    )
}

#[test]
fn a_long_lived_connection_drains_on_the_old_colour() {
    if !crate::have_root("a_long_lived_connection_drains_on_the_old_colour") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, ""));
    let mut long = Conn::open(&t.client, WEB).expect("connect");
    assert_eq!(colour_of(&long.ask().expect("ask")), "blue");
    // A cut-over reports the open flows of the last count: wait for one that saw this flow.
    assert_eq!(d.status_counted().services[0].colours[0].live_flows, 1);

    let out = d.cli_ok(&["cutover", "web", "green"]);
    assert!(out.contains("1 open flows on blue drain"), "{out}");
    let (answer, _) = tcp_request(&t.client, WEB).expect("new connection");
    assert_eq!(colour_of(&answer), "green", "new flows go to green");
    assert_eq!(colour_of(&long.ask().expect("ask while draining")), "blue", "the open one stays on blue");

    let status = d.status();
    let drain = status.services[0].drain.clone().expect("a drain in progress");
    assert_eq!((drain.colour.as_str(), drain.live_flows), ("blue", 1));

    // `cutover --wait` style: the drain completes when the connection closes.
    let mut waiter = std::process::Command::new(crate::proc::switcher_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["cutover", "web", "green", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cutover --wait");
    std::thread::sleep(Duration::from_millis(700));
    assert!(matches!(waiter.try_wait(), Ok(None)), "--wait returned while a flow was still open");
    drop(long);
    let done = wait_for(Duration::from_secs(15), || waiter.try_wait().ok().flatten());
    let status = done.unwrap_or_else(|| {
        let _ = waiter.kill();
        panic!("the drain did not complete after the connection closed:\n{}", d.log())
    });
    assert!(status.success());
    let out = waiter.wait_with_output().expect("output");
    assert!(String::from_utf8_lossy(&out.stderr).contains("drained in"), "{out:?}");
    assert!(d.status().services[0].drain.is_none());

    // A drain that ends by its timeout says so, not "drained".
    let mut held = Conn::open(&t.client, WEB).expect("connect");
    assert_eq!(colour_of(&held.ask().expect("ask")), "green");
    assert_eq!(d.status_counted().services[0].colours[1].live_flows, 1);
    let out = d.cli(&["cutover", "web", "blue", "--drain-timeout", "1", "--wait"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("the drain timed out after 1s with 1 open flows on green"), "{err}");
    drop(held);
}

#[test]
fn removing_a_backend_keeps_the_other_flows_where_they_are() {
    if !crate::have_root("removing_a_backend_keeps_the_other_flows_where_they_are") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &web3()));
    let vip = SocketAddrV4::new(VIP, 8000);
    let mut conns: Vec<(Conn, String)> = (0..30)
        .map(|_| {
            let mut c = Conn::open(&t.client, vip).expect("connect");
            let who = c.ask().expect("ask");
            (c, who)
        })
        .collect();
    let used: BTreeSet<&str> = conns.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(used.len(), 3, "30 flows spread over the 3 blue backends: {used:?}");
    let removed = format!("{}:{BACKEND_TCP}", BLUES[2]);
    let out = d.cli_ok(&["backend", "remove", "web3", "blue", &removed]);
    assert!(out.contains("removed (2 backends)"), "{out}");
    for (c, who) in &mut conns {
        assert_eq!(&c.ask().expect("ask after removal"), who, "an open flow stays on its backend");
    }
    // New flows never reach the removed backend.
    for _ in 0..30 {
        let (answer, _) = tcp_request(&t.client, vip).expect("new flow");
        assert_ne!(answer, format!("blue {}", BLUES[2]), "a new flow went to the removed backend");
    }
    let status = d.status_counted();
    let blue = &status.services[2].colours[0];
    assert_eq!(blue.backends.len(), 2);
    assert!(blue.live_flows >= 30, "the open flows are counted: {}", blue.live_flows);
}

#[test]
fn a_ten_percent_canary_gets_ten_percent_of_new_connections() {
    if !crate::have_root("a_ten_percent_canary_gets_ten_percent_of_new_connections") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &web3()));
    let out = d.cli_ok(&["weight", "web3", "green=10%"]);
    assert_eq!(out.trim(), "web3: new flows blue 90%, green 10%");
    let vip = SocketAddrV4::new(VIP, 8000);
    let mut tally: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..2000 {
        let (answer, peer) = tcp_request(&t.client, vip).expect("request");
        assert_eq!(peer, SocketAddr::V4(vip));
        *tally.entry(colour_of(&answer).to_owned()).or_default() += 1;
    }
    let green = tally.get("green").copied().unwrap_or(0);
    eprintln!("canary 10%: {tally:?}");
    assert!((140..=260).contains(&green), "10% ± 3% of 2000 went to green: {tally:?}");
    assert_eq!(tally.values().sum::<u32>(), 2000);
    d.cli_ok(&["weight", "web3", "green=0%"]);
    for _ in 0..50 {
        let (answer, _) = tcp_request(&t.client, vip).expect("request");
        assert_eq!(colour_of(&answer), "blue", "0% is blue only");
    }
}

#[test]
fn the_preview_port_reaches_the_idle_colour() {
    if !crate::have_root("the_preview_port_reaches_the_idle_colour") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &web3()));
    let (main, preview) = (SocketAddrV4::new(VIP, 8000), SocketAddrV4::new(VIP, 8001));
    let ask = |to| {
        let (a, peer) = tcp_request(&t.client, to).expect("request");
        assert_eq!(peer, SocketAddr::V4(to), "answered from the VIP");
        colour_of(&a).to_owned()
    };
    assert_eq!((ask(main), ask(preview)), ("blue".into(), "green".into()));
    // Client ports that reached blue through the main port, used again for the preview port
    // once it points at blue: the backend's answers to those are the preview port's, and the
    // client never sees blue's own address.
    let sniffer = Sniffer::start(&t.client);
    // Below the ephemeral range, so that no connection the kernel gave a port holds one.
    let ports = 21_100..21_124u16;
    let mut first = Vec::new();
    for p in ports.clone() {
        let mut c = Conn::open_from(&t.client, p, main).expect("connect from a fixed port");
        first.push(c.ask().expect("answer"));
    }
    assert!(first.iter().all(|a| colour_of(a) == "blue"), "{first:?}");
    d.cli_ok(&["cutover", "web3"]);
    assert_eq!((ask(main), ask(preview)), ("green".into(), "blue".into()));
    let mut same = 0;
    for (p, before) in ports.zip(&first) {
        let mut c = Conn::open_from(&t.client, p, preview).expect("the same port, the preview port");
        assert_eq!(c.peer().expect("peer"), SocketAddr::V4(preview));
        let answer = c.ask().expect("answer");
        assert_eq!(colour_of(&answer), "blue");
        same += usize::from(&answer == before);
    }
    // Each backend answers with its address: some ports met the same backend both times.
    assert!(same > 0, "no port reached the same blue backend twice: the case is not exercised");
    let seen = sniffer.stop();
    assert!(BLUES.iter().all(|b| !seen.contains(b)), "the client saw a blue backend's own address: {seen:?}");
    assert!(d.cli_ok(&["status", "web3"]).contains("preview: port 8001 → blue"));
}

#[test]
fn ipv6_end_to_end() {
    if !crate::have_root("ipv6_end_to_end") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let v6 = format!(
        "{}\n[[service]]\nname = \"dns6\"\nvip = \"{VIP6}\"\nport = 53\nprotocol = \"udp\"\nactive = \"blue\"\nblue = \"[{BLUE6}]:{BACKEND_UDP}\"\ngreen = \"[{GREEN6}]:{BACKEND_UDP}\"\n",
        service(
            "web6",
            &VIP6.to_string(),
            80,
            &format!("blue = \"[{BLUE6}]:{BACKEND_TCP}\"\ngreen = \"[{GREEN6}]:{BACKEND_TCP}\"")
        )
    );
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &v6));
    let sniffer = Sniffer::start(&t.client);
    let web6 = SocketAddrV6::new(VIP6, 80, 0, 0);
    let dns6 = SocketAddrV6::new(VIP6, 53, 0, 0);
    let check = |colour: &str| {
        let (a, peer) = tcp_request(&t.client, web6)
            .unwrap_or_else(|e| panic!("IPv6 TCP: {e}\n{:?}\n{}", d.status().reasons, d.log()));
        assert_eq!((colour_of(&a), peer), (colour, SocketAddr::V6(web6)));
        let (a, from) = udp_request(&t.client, dns6).expect("IPv6 UDP");
        assert_eq!((colour_of(&a), from), (colour, SocketAddr::V6(dns6)));
    };
    check("blue");
    d.cli_ok(&["cutover", "web6"]);
    d.cli_ok(&["cutover", "dns6"]);
    check("green");
    d.cli_ok(&["rollback", "web6"]);
    d.cli_ok(&["rollback", "dns6"]);
    check("blue");
    let _ = sniffer.stop();
    assert!(d.reason("fwd_redirect") > 0, "the IPv6 fast path was taken");
    let _ = CLIENT6;
}

#[test]
fn dsr_end_to_end() {
    if !crate::have_root("dsr_end_to_end") {
        return;
    }
    let t = Topology::new();
    // DSR backends hold the VIP on a loopback and answer from it, straight to the client.
    for ns in [&t.blue, &t.green] {
        ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    }
    // They also listen on their own address, where the daemon's health checks reach them.
    let _b = Server::on(&t.blue, "blue", &[IpAddr::V4(VIP), IpAddr::V4(BLUES[0])]);
    let _g = Server::on(&t.green, "green", &[IpAddr::V4(VIP), IpAddr::V4(GREENS[0])]);
    let dsr = service(
        "dsr",
        &VIP.to_string(),
        BACKEND_TCP,
        &format!("mode = \"dsr\"\nblue = \"{}:{BACKEND_TCP}\"\ngreen = \"{}:{BACKEND_TCP}\"", BLUES[0], GREENS[0]),
    );
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &dsr));
    let to = SocketAddrV4::new(VIP, BACKEND_TCP);
    // The daemon resolves the DSR neighbours; the first SYN may race it and be retried by TCP.
    let first = wait_for(Duration::from_secs(10), || tcp_request(&t.client, to).ok());
    let (answer, peer) = first.unwrap_or_else(|| panic!("DSR request: {:?}\n{}", d.status().reasons, d.log()));
    assert_eq!((answer.as_str(), peer), (format!("blue {VIP}").as_str(), SocketAddr::V4(to)));
    d.cli_ok(&["cutover", "dsr"]);
    let (answer, _) = tcp_request(&t.client, to).expect("DSR request after cut-over");
    assert_eq!(colour_of(&answer), "green");
    assert!(d.reason("dsr") > 0, "frames went out by DSR");
    assert_eq!(d.reason("reply_redirect") + d.reason("reply_kernel"), 0, "DSR replies bypass translation");
}
