//! Reliability under faults, with real traffic: cut-overs under load, concurrent operators,
//! SIGTERM under load, a second daemon, a missing interface, a full flow table, a backend
//! that goes away.

use std::{net::SocketAddrV4, time::Duration};

use crate::{
    flips,
    net::{BLUES, Conn, Server, Topology, VIP, colour_of, tcp_request, wait_for},
    proc::{Daemon, config_with, demo_config},
};

#[test]
fn two_hundred_cutovers_under_load_lose_nothing() {
    if !crate::have_root("two_hundred_cutovers_under_load_lose_nothing") {
        return;
    }
    let report = flips::run(200, Duration::from_millis(25), false);
    eprintln!("{}", report.table());
    assert!(report.requests > 1_000, "the load ran: {report:?}");
    assert!(report.clean(), "something was lost:\n{}", report.table());
}

#[test]
fn twenty_operators_flipping_at_once_are_serialised() {
    if !crate::have_root("twenty_operators_flipping_at_once_are_serialised") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| {
        let audit = s.parent().map(|p| p.join("audit.log")).unwrap_or_default();
        format!("audit_log = \"{}\"\n{}", audit.display(), demo_config(&t.lb_ifaces, "redirect", s))
    });
    let d = std::sync::Arc::new(d);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let d = std::sync::Arc::clone(&d);
            std::thread::spawn(move || {
                let colour = if i % 2 == 0 { "green" } else { "blue" };
                let out = d.cli(&["cutover", "web", colour]);
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("client")).collect();
    for (ok, out, err) in &results {
        assert!(ok, "a request failed: {out} {err}");
        assert!(out.contains("web: "), "every request got an answer: {out}");
    }
    let audit = std::fs::read_to_string(d.dir.join("audit.log")).expect("audit log");
    let changes: Vec<&str> = audit.lines().collect();
    let switched = results.iter().filter(|(_, out, _)| out.contains(" → ")).count();
    assert_eq!(changes.len(), switched, "the audit log has every change:\n{audit}");
    // The final state is the last accepted change.
    let last = changes.last().and_then(|l| l.rsplit(' ').next()).unwrap_or("blue");
    assert_eq!(d.status().services[0].active.as_str(), last);
}

#[test]
fn sigterm_under_load_loses_nothing() {
    if !crate::have_root("sigterm_under_load_loses_nothing") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let mut d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let web = SocketAddrV4::new(VIP, 80);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ns = crate::net::Netns::attach(&t.client.name);
    let s = std::sync::Arc::clone(&stop);
    let load = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        for _ in 0..20_000 {
            if s.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            match tcp_request(&ns, web) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = d.stop();
    assert!(status.success(), "SIGTERM exit: {status}");
    std::thread::sleep(Duration::from_millis(700));
    d.restart();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load");
    assert!(ok > 50, "the load ran: {ok}");
    assert!(failed.is_empty(), "requests failed across SIGTERM and restart: {failed:?}");
    assert!(d.log().contains("the data path keeps running"), "{}", d.log());
}

#[test]
fn clear_errors_for_a_second_daemon_and_a_missing_interface() {
    if !crate::have_root("clear_errors_for_a_second_daemon_and_a_missing_interface") {
        return;
    }
    let t = Topology::new();
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let run = |config: &std::path::Path| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &t.lb.name])
            .arg(crate::proc::switcher_bin())
            .arg("--config")
            .arg(config)
            .arg("daemon")
            .output()
            .expect("run a second daemon")
    };
    // Same pins, another socket: refused, and the first daemon is untouched.
    let second = d.dir.join("second.toml");
    let text = std::fs::read_to_string(&d.config).expect("config");
    std::fs::write(&second, text.replace("switcher.sock", "second.sock")).expect("write");
    let out = run(&second);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("another switcher daemon") && err.contains("pins"), "{err}");
    d.cli_ok(&["status"]);
    // Same socket: refused.
    let out = run(&d.config);
    assert!(String::from_utf8_lossy(&out.stderr).contains("another switcher daemon"), "{out:?}");
    // A missing interface.
    let missing = d.dir.join("missing.toml");
    std::fs::write(
        &missing,
        text.replace("switcher.sock", "missing.sock")
            .replace(&format!("\"{}\"", t.lb_ifaces[0]), "\"nosuch0\"")
            .replace("/bpf\"", "/bpf-missing\""),
    )
    .expect("write");
    let out = run(&missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no network interface \"nosuch0\""), "{err}");
    // Refused before anything was made: no pins.
    let pins = d.dir.join("bpf-missing");
    let left = std::fs::read_dir(&pins).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "a start refused for its config left pins in {}", pins.display());
}

#[test]
fn a_full_flow_table_still_serves_new_and_old_flows() {
    if !crate::have_root("a_full_flow_table_still_serves_new_and_old_flows") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let pool: Vec<String> = BLUES.iter().map(|a| format!("\"{a}:8080\"")).collect();
    let extra = format!(
        "\n[[service]]\nname = \"web3\"\nvip = \"{VIP}\"\nport = 8000\nprotocol = \"tcp\"\nactive = \"blue\"\nblue = [{}]\n",
        pool.join(", ")
    );
    // A table made for 64 flows (128 slots), far fewer than the connections below.
    let d = Daemon::start(&t.lb, |s| format!("max_flows = 64\n{}", config_with(&t.lb_ifaces, "redirect", s, &extra)));
    let vip = SocketAddrV4::new(VIP, 8000);
    let mut conns: Vec<(Conn, String)> = (0..150)
        .map(|_| {
            let mut c = Conn::open(&t.client, vip).expect("connect");
            let who = c.ask().expect("ask");
            (c, who)
        })
        .collect();
    // Most of these flows were evicted; each still reaches its backend through the hash.
    for (i, (c, who)) in conns.iter_mut().enumerate() {
        assert_eq!(
            &c.ask().unwrap_or_else(|e| panic!("connection {i} after eviction: {e}")),
            who,
            "connection {i} moved"
        );
    }
    let (answer, _) = tcp_request(&t.client, vip).expect("a new flow with a full table");
    assert_eq!(colour_of(&answer), "blue");
    let status = d.status_counted();
    let blue = &status.services[2].colours[0];
    assert!(blue.live_flows <= 128, "{} open flows in a table of 128 slots", blue.live_flows);
    // 150 connections in 128 slots: some found their set full and took an open flow's slot.
    assert!(blue.counters.evicted > 0, "evictions are counted: {:?}", blue.counters);
}

#[test]
fn a_backend_that_goes_away_mid_flow_leaves_the_table() {
    if !crate::have_root("a_backend_that_goes_away_mid_flow_leaves_the_table") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let pool: Vec<String> = BLUES.iter().map(|a| format!("\"{a}:8080\"")).collect();
    let extra = format!(
        "\n[[service]]\nname = \"web3\"\nvip = \"{VIP}\"\nport = 8000\nprotocol = \"tcp\"\nactive = \"blue\"\nblue = [{}]\nhealth = {{ interval_ms = 200, timeout_ms = 200, rise = 1, fall = 2 }}\n",
        pool.join(", ")
    );
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &extra));
    let vip = SocketAddrV4::new(VIP, 8000);
    let gone = BLUES[2];
    // The third backend's address disappears from its interface, mid-flow.
    t.blue.ip(&["addr", "del", &format!("{gone}/28"), "dev", "eth0"]);
    let down = wait_for(Duration::from_secs(10), || {
        let s = d.status();
        s.services[2].colours[0]
            .backends
            .iter()
            .any(|b| b.address.starts_with(&gone.to_string()) && b.health.as_str() == "down")
            .then_some(())
    });
    assert!(down.is_some(), "the lost backend was not marked down:\n{}", d.log());
    for _ in 0..40 {
        let (answer, _) = tcp_request(&t.client, vip).expect("new flows avoid the lost backend");
        assert_ne!(answer, format!("blue {gone}"));
    }
}
