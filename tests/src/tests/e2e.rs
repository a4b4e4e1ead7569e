//! T2: the `switcher` daemon and CLI in namespaces client / lb / blue / green, with real TCP and
//! UDP traffic through the VIP.

use std::net::{SocketAddr, SocketAddrV4};

use crate::{
    net::{
        BACKEND_TCP, BLUE, Conn, GREEN, Server, Sniffer, Topology, VIP, VIP_TCP, VIP_UDP, colour_of, tcp_request,
        udp_request,
    },
    proc::{Daemon, demo_config},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, VIP_TCP);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, VIP_UDP);

/// Asks web (TCP) and dns (UDP) through the VIP and checks the colour and that the answer came
/// from the VIP.
#[track_caller]
fn expect_colour(t: &Topology, colour: &str) {
    let (answer, peer) = tcp_request(&t.client, WEB).unwrap_or_else(|e| panic!("TCP request to {WEB}: {e}"));
    assert_eq!((colour_of(&answer), peer), (colour, SocketAddr::V4(WEB)), "TCP answer");
    let (answer, from) = udp_request(&t.client, DNS).unwrap_or_else(|e| panic!("UDP request to {DNS}: {e}"));
    assert_eq!((colour_of(&answer), from), (colour, SocketAddr::V4(DNS)), "UDP answer");
}

#[test]
fn cutover_and_rollback_with_real_traffic() {
    if !crate::have_root("cutover_and_rollback_with_real_traffic") {
        return;
    }
    let t = Topology::new();
    let _blue = Server::start(&t.blue, "blue");
    let _green = Server::start(&t.green, "green");
    let d = Daemon::start(&t.lb, |socket| demo_config(&t.lb_ifaces, "redirect", socket));
    let sniffer = Sniffer::start(&t.client);

    expect_colour(&t, "blue");
    // A long-lived connection opened on blue.
    let mut long = Conn::open(&t.client, WEB).expect("open long-lived connection");
    assert_eq!(colour_of(&long.ask().expect("ask on long-lived connection")), "blue");

    let out = d.cli_ok(&["cutover", "web"]);
    assert!(out.contains("blue → green"), "{out}");
    let out = d.cli_ok(&["cutover", "dns", "green"]);
    assert!(out.contains("blue → green"), "{out}");
    expect_colour(&t, "green");
    assert_eq!(
        colour_of(&long.ask().expect("long-lived connection after cut-over")),
        "blue",
        "established flows stay where they are"
    );

    let status = d.cli_ok(&["status", "web", "--json"]);
    assert!(status.contains(r#""active": "green""#) && status.contains(r#""previous": "blue""#), "{status}");

    let out = d.cli_ok(&["rollback", "web"]);
    assert!(out.contains("green → blue"), "{out}");
    d.cli_ok(&["rollback", "dns"]);
    expect_colour(&t, "blue");
    assert_eq!(colour_of(&long.ask().expect("long-lived connection after rollback")), "blue");
    drop(long);

    let seen = sniffer.stop();
    assert!(!seen.contains(&BLUE) && !seen.contains(&GREEN), "the client saw a backend address: {seen:?}");
    assert!(seen.contains(&VIP), "the sniffer saw no traffic at all: {seen:?}");

    // Traffic that is not for a service is not touched: the client reaches blue directly and
    // is answered by blue's own address.
    let direct = SocketAddrV4::new(BLUE, BACKEND_TCP);
    let (answer, peer) = tcp_request(&t.client, direct).expect("direct request to blue");
    assert_eq!((answer.as_str(), peer), ("blue 198.51.100.2", SocketAddr::V4(direct)));

    let status = d.status();
    let flows: Vec<u64> = status.services.iter().flat_map(|s| s.colours.iter().map(|c| c.counters.flows)).collect();
    assert_eq!(flows.len(), 4, "two services × two colours");
    assert!(flows.iter().all(|&f| f >= 1), "every colour of both services got flows: {flows:?}");
    assert!(d.reason("fwd_redirect") > 0 && d.reason("reply_redirect") > 0, "the XDP fast path was taken");
}

/// On veth as a user sets it up by hand (default offloads), `forwarding = "auto"` picks the
/// kernel path, and cut-over and rollback work the same.
#[test]
fn auto_forwarding_works_on_plain_veth() {
    if !crate::have_root("auto_forwarding_works_on_plain_veth") {
        return;
    }
    let t = Topology::plain();
    let _blue = Server::start(&t.blue, "blue");
    let _green = Server::start(&t.green, "green");
    let d = Daemon::start(&t.lb, |socket| demo_config(&t.lb_ifaces, "auto", socket));
    assert!(d.log().contains("forwarding: kernel stack (auto"), "{}", d.log());
    expect_colour(&t, "blue");
    let mut long = Conn::open(&t.client, WEB).expect("open long-lived connection");
    assert_eq!(colour_of(&long.ask().expect("ask")), "blue");
    d.cli_ok(&["cutover", "web"]);
    d.cli_ok(&["cutover", "dns"]);
    expect_colour(&t, "green");
    assert_eq!(colour_of(&long.ask().expect("long-lived connection after cut-over")), "blue");
    d.cli_ok(&["rollback", "web"]);
    d.cli_ok(&["rollback", "dns"]);
    expect_colour(&t, "blue");
    assert_eq!(d.reason("fwd_redirect") + d.reason("reply_redirect"), 0, "kernel mode never redirects");
    assert!(d.reason("fwd_kernel") > 0 && d.reason("reply_kernel") > 0);
}

#[test]
fn cli_errors_are_clear() {
    if !crate::have_root("cli_errors_are_clear") {
        return;
    }
    let t = Topology::new();
    let mut d = Daemon::start(&t.lb, |socket| demo_config(&t.lb_ifaces, "redirect", socket));
    let err = |args: &[&str]| {
        let out = d.cli(args);
        assert!(!out.status.success(), "switcher {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["cutover", "api"]).contains("unknown service \"api\"; configured: web, dns"));
    assert!(err(&["cutover", "web", "red"]).contains("invalid value 'red'"));
    assert!(err(&["rollback", "web"]).contains("nothing to roll back"));
    assert!(err(&["status", "nope"]).contains("unknown service"));
    // A garbage request on the socket gets an error answer and the daemon keeps serving.
    let answer = {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
        s.write_all(b"{\"op\":\"explode\"}\n").expect("write");
        let mut a = String::new();
        s.read_to_string(&mut a).expect("read");
        a
    };
    assert!(answer.contains(r#""ok":false"#) && answer.contains("malformed request"), "{answer}");
    d.cli_ok(&["status"]);

    let status = d.stop();
    assert!(status.success(), "daemon exit status on SIGTERM: {status}\n{}", d.log());
    assert!(!d.socket.exists(), "the socket is removed on exit");
    let down = d.cli(&["status"]);
    assert!(String::from_utf8_lossy(&down.stderr).contains("daemon is not running"));
    // The data path outlives the daemon: the VIP is still served, and the CLI's emergency
    // path still switches it.
    let (_blue, _green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let (answer, _) = udp_request(&t.client, DNS).expect("the VIP is still served with the daemon down");
    assert_eq!(colour_of(&answer), "blue");
    let out = d.cli(&["cutover", "dns", "green"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("emergency path"), "{out:?}");
    let (answer, _) = udp_request(&t.client, DNS).expect("after the emergency cut-over");
    assert_eq!(colour_of(&answer), "green");
    // `uninstall` takes the data path away: the VIP is no longer translated.
    let out = d.cli(&["uninstall"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached from"), "{out:?}");
    let gone = udp_request(&t.client, DNS);
    assert!(gone.is_err(), "the VIP was still served after uninstall: {gone:?}");
}

#[test]
fn bad_config_is_refused_with_file_line_and_field() {
    if !crate::have_root("bad_config_is_refused_with_file_line_and_field") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("switcher-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "interfaces = [\"lo\"]\n\n[[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\nactive = \"purple\"\nblue = \"198.51.100.2:80\"\n").expect("write");
    let out = std::process::Command::new(crate::proc::switcher_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("daemon")
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml: line 8") && err.contains("unknown variant `purple`"), "{err}");
}
