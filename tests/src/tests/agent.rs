//! T2 for the agent: restarts and crashes without traffic loss, the emergency path, health
//! checks and what they refuse or trigger, reload, socket security and metrics.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::{
    net::{Conn, Netns, Server, Topology, VIP, colour_of, tcp_request, udp_request, wait_for},
    proc::{Daemon, demo_config},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, 53);

/// The demo config with extra lines in the `web` service and at the top.
fn config(t: &Topology, socket: &std::path::Path, web: &str, top: &str) -> String {
    let base = demo_config(&t.lb_ifaces, "redirect", socket);
    format!("{top}\n{}", base.replacen("name = \"web\"\n", &format!("name = \"web\"\n{web}\n"), 1))
}

/// Fast checks so the tests do not wait long: every 200 ms, down after 2 failures.
const FAST_CHECKS: &str = "health = { interval_ms = 200, timeout_ms = 200, rise = 1, fall = 2 }";

fn active(d: &Daemon, service: &str) -> String {
    d.status().services.iter().find(|s| s.name == service).map(|s| s.active.to_string()).unwrap_or_default()
}

/// Requests through the VIP in a loop until stopped; counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(client: &Netns) -> Load {
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let ns = Netns::attach(&client.name);
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0u32;
            // Bounded: at most 20 000 requests, and the test stops it after a few seconds.
            while !s.load(Ordering::Relaxed) && n < 20_000 {
                let r = if n.is_multiple_of(2) { tcp_request(&ns, WEB) } else { udp_request(&ns, DNS) };
                n += 1;
                match r {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(3));
            }
            errors
        });
        Load { stop, ok, failed, thread: Some(thread) }
    }

    /// Stops the load; returns (answered, failed, the errors).
    fn finish(mut self) -> (u32, u32, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), errors)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_crash_loses_nothing_and_the_restarted_daemon_adopts_the_data_path() {
    if !crate::have_root("a_crash_loses_nothing_and_the_restarted_daemon_adopts_the_data_path") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let mut d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let mut long = Conn::open(&t.client, WEB).expect("long-lived connection");
    assert_eq!(colour_of(&long.ask().expect("ask")), "blue");
    let before = d.status();
    let blue_before = before.services[0].colours[0].counters;

    let load = Load::start(&t.client);
    std::thread::sleep(Duration::from_millis(800));
    d.kill();
    std::thread::sleep(Duration::from_millis(800));
    // With the daemon down, the emergency path still switches.
    let out = d.cli(&["cutover", "web", "green"]);
    assert!(out.status.success(), "emergency cut-over: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("emergency path"), "{out:?}");
    std::thread::sleep(Duration::from_millis(800));
    d.restart();
    std::thread::sleep(Duration::from_millis(800));
    let (ok, failed, errors) = load.finish();
    assert!(ok > 100, "the load ran: {ok} answers");
    assert_eq!(failed, 0, "requests failed across kill -9, emergency cut-over and restart: {errors:?}");

    let after = d.status_counted();
    assert_eq!(after.services[0].active.as_str(), "green", "the restarted daemon adopted the emergency cut-over");
    assert_eq!(after.services[0].previous.map(|c| c.as_str()), Some("blue"));
    let blue_after = after.services[0].colours[0].counters;
    assert!(
        blue_after.packets >= blue_before.packets && blue_after.flows >= blue_before.flows,
        "counters carried on: {blue_before:?} → {blue_after:?}"
    );
    assert!(after.services[0].colours[0].live_flows >= 1, "the long-lived flow is still tracked");
    assert_eq!(colour_of(&long.ask().expect("the long-lived connection survived")), "blue");
    assert!(d.log().contains("adopted the pinned data path"), "{}", d.log());
    // And the restarted daemon still rolls back.
    assert!(d.cli_ok(&["rollback", "web"]).contains("green → blue"));
}

#[test]
fn a_cutover_to_an_unhealthy_colour_is_refused_unless_forced() {
    if !crate::have_root("a_cutover_to_an_unhealthy_colour_is_refused_unless_forced") {
        return;
    }
    let t = Topology::new();
    let _b = Server::start(&t.blue, "blue");
    // No green server: green's checks fail.
    let d = Daemon::start(&t.lb, |s| config(&t, s, FAST_CHECKS, ""));
    let out = d.cli(&["cutover", "web", "green"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to cut over web to green: no healthy green backend")
            && err.contains("198.51.100.18:8080"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(active(&d, "web"), "blue");
    let status = d.cli_ok(&["status", "web"]);
    assert!(status.contains("UNHEALTHY") && status.contains("down for"), "{status}");
    assert!(d.cli_ok(&["cutover", "web", "green", "--force"]).contains("blue → green"));
    assert_eq!(active(&d, "web"), "green");
}

#[test]
fn a_failing_new_colour_is_rolled_back_automatically() {
    if !crate::have_root("a_failing_new_colour_is_rolled_back_automatically") {
        return;
    }
    let t = Topology::new();
    let _b = Server::start(&t.blue, "blue");
    let green = Server::start(&t.green, "green");
    let d = Daemon::start(&t.lb, |s| {
        let audit = s.parent().map(|p| p.join("audit.log")).unwrap_or_default();
        config(&t, s, &format!("watch_secs = 60\n{FAST_CHECKS}"), &format!("audit_log = \"{}\"", audit.display()))
    });
    let out = d.cli_ok(&["cutover", "web", "green"]);
    assert!(out.contains("watching green for 60s"), "{out}");
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "green");
    drop(green);
    let back = wait_for(Duration::from_secs(10), || (active(&d, "web") == "blue").then_some(()));
    assert!(back.is_some(), "green's backends stopped but web was not rolled back:\n{}", d.log());
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request after rollback").0), "blue");
    let audit = std::fs::read_to_string(d.dir.join("audit.log")).expect("audit log");
    assert!(audit.contains("cut-over web blue -> green") && audit.contains("uid=0(root)"), "{audit}");
    assert!(audit.contains("auto-rollback web green -> blue"), "{audit}");
    // The metric tells it from the operator's cut-over (the SwitcherAutomaticSwitch alert).
    let metrics = crate::flows::scrape(&t.lb);
    for line in [
        "switcher_cutovers_total{service=\"web\",kind=\"cutover\"} 1",
        "switcher_cutovers_total{service=\"web\",kind=\"auto_rollback\"} 1",
        "switcher_cutovers_total{service=\"web\",kind=\"rollback\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }
}

#[test]
fn a_dead_live_colour_fails_over() {
    if !crate::have_root("a_dead_live_colour_fails_over") {
        return;
    }
    let t = Topology::new();
    let blue = Server::start(&t.blue, "blue");
    let _g = Server::start(&t.green, "green");
    let d = Daemon::start(&t.lb, |s| config(&t, s, &format!("failover = true\n{FAST_CHECKS}"), ""));
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "blue");
    drop(blue);
    let over = wait_for(Duration::from_secs(10), || (active(&d, "web") == "green").then_some(()));
    assert!(over.is_some(), "blue died but web did not fail over:\n{}", d.log());
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request after failover").0), "green");
    let metrics = crate::flows::scrape(&t.lb);
    assert!(metrics.contains("switcher_cutovers_total{service=\"web\",kind=\"failover\"} 1"), "{metrics}");
    let text = d.cli_ok(&["status", "web"]);
    assert!(text.contains("1 switches: 1 failover)"), "status says the daemon switched by itself:\n{text}");
}

#[test]
fn reload_applies_a_good_config_and_a_broken_one_changes_nothing() {
    if !crate::have_root("reload_applies_a_good_config_and_a_broken_one_changes_nothing") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    d.cli_ok(&["cutover", "web", "green"]);
    let good = std::fs::read_to_string(&d.config).expect("config");
    let before = d.status();

    std::fs::write(&d.config, good.replace("protocol = \"tcp\"", "protocol = \"tcpp\"")).expect("write");
    let out = d.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reload rejected, nothing changed") && err.contains("line"), "{err}");
    std::fs::write(&d.config, "garbage ][").expect("write");
    // SIGHUP, as systemd's reload does, with garbage in the file.
    crate::net::sh(&["kill", "-HUP", &d.pid().to_string()]);
    let logged = wait_for(Duration::from_secs(5), || d.log().contains("SIGHUP: reload rejected").then_some(()));
    assert!(logged.is_some(), "{}", d.log());
    let after = d.status();
    assert_eq!(after.services.len(), before.services.len());
    assert_eq!(active(&d, "web"), "green", "a rejected reload changes nothing");
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "green");

    // A config other users could change is refused before it is read: with hooks in it, they
    // would run commands as root.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let chmod = |m| std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(m)).expect("chmod");
        chmod(0o666);
        let out = d.cli(&["reload"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("can be written by other users (mode 666)"), "{err}");
        chmod(0o644);
    }
    assert_eq!(active(&d, "web"), "green", "a refused reload changes nothing");

    let more = format!(
        "{good}\n[[service]]\nname = \"web2\"\nvip = \"{VIP}\"\nport = 8000\nprotocol = \"tcp\"\nactive = \"blue\"\nblue = \"198.51.100.3:8080\"\n"
    );
    std::fs::write(&d.config, more).expect("write");
    let out = d.cli_ok(&["reload"]);
    assert!(out.contains("added: web2"), "{out}");
    assert_eq!(active(&d, "web"), "green", "services that stay keep their state");
    let (answer, peer) = tcp_request(&t.client, SocketAddrV4::new(VIP, 8000)).expect("the new service");
    assert_eq!((answer.as_str(), peer), ("blue 198.51.100.3", SocketAddr::V4(SocketAddrV4::new(VIP, 8000))));
}

#[test]
fn the_socket_refuses_other_users_and_garbage() {
    if !crate::have_root("the_socket_refuses_other_users_and_garbage") {
        return;
    }
    let t = Topology::new();
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    // The test directory must be reachable for the other user to get as far as the socket,
    // and the binary must be one it may run (the build tree may be in a 0700 directory).
    let bin = crate::proc::switcher_bin_for_others(&d.dir);
    let mut nobody = std::process::Command::new(bin);
    nobody.arg("--socket").arg(&d.socket).args(["status"]).uid(65534).gid(65534);
    let out = crate::proc::output_of_fresh_binary(&mut nobody).expect("run as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied"), "{err}");
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    s.write_all(&vec![b'x'; 70_000]).expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains("larger than"), "{answer}");
    d.cli_ok(&["status"]);
}

#[test]
fn metrics_are_served_on_loopback() {
    if !crate::have_root("metrics_are_served_on_loopback") {
        return;
    }
    let t = Topology::new();
    let _b = Server::start(&t.blue, "blue");
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    tcp_request(&t.client, WEB).expect("some traffic");
    let body = t.lb.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9477").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    });
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    for needle in [
        "switcher_packets_total{service=\"web\",colour=\"blue\",direction=\"request\"}",
        "switcher_backend_up{service=\"web\",colour=\"blue\",backend=\"198.51.100.2:8080\"} 1",
        "switcher_active{service=\"web\",colour=\"blue\"} 1",
        "switcher_datapath_verdicts_total{reason=\"fwd_redirect\",kind=\"forwarded\"}",
        "# EOF",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    drop(d);
}

#[test]
fn the_emergency_path_never_goes_behind_a_daemon_nor_to_a_colour_without_a_pool() {
    if !crate::have_root("the_emergency_path_never_goes_behind_a_daemon_nor_to_a_colour_without_a_pool") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    // `api` has blue only when the daemon installs it.
    let api = format!(
        "\n[[service]]\nname = \"api\"\nvip = \"{VIP}\"\nport = 8000\nprotocol = \"tcp\"\nactive = \"blue\"\nblue = \"198.51.100.3:8080\"\n"
    );
    let mut d = Daemon::start(&t.lb, |s| format!("{}{api}", demo_config(&t.lb_ifaces, "redirect", s)));
    // A mistyped --socket while the daemon runs: refused, naming the socket tried, the
    // daemon's pid and the socket it does listen on; nothing changes.
    let wrong = d.dir.join("wrong.sock");
    let out = std::process::Command::new(crate::proc::switcher_bin())
        .arg("--socket")
        .arg(&wrong)
        .arg("--config")
        .arg(&d.config)
        .args(["cutover", "web", "green"])
        .output()
        .expect("run switcher");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the emergency path ran behind a live daemon: {err}");
    assert!(err.contains(&wrong.display().to_string()), "names the socket it tried: {err}");
    assert!(err.contains(&format!("pid {}", d.pid())), "names the daemon's pid: {err}");
    assert!(err.contains(&d.socket.display().to_string()), "names the daemon's socket: {err}");
    assert_eq!(active(&d, "web"), "blue");
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "blue", "traffic stayed on blue");

    // Green added to `api` while the daemon is down: the pinned maps have no green pool.
    d.kill();
    let text = std::fs::read_to_string(&d.config).expect("config");
    std::fs::write(
        &d.config,
        text.replace(
            "blue = \"198.51.100.3:8080\"\n",
            "blue = \"198.51.100.3:8080\"\ngreen = \"198.51.100.19:8080\"\n",
        ),
    )
    .expect("write");
    let out = d.cli(&["cutover", "api", "green"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no green pool in the pinned maps"), "{err}");
    let (answer, _) = tcp_request(&t.client, SocketAddrV4::new(VIP, 8000)).expect("api still answers");
    assert_eq!(answer, "blue 198.51.100.3");
    // With no daemon, the emergency path still works where the pool is there.
    let out = d.cli(&["cutover", "web", "green"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "green");
}

#[test]
fn an_emergency_change_in_a_fleet_needs_local_and_holds_as_an_override() {
    if !crate::have_root("an_emergency_change_in_a_fleet_needs_local_and_holds_as_an_override") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    // etcd on a port nothing listens on: the node runs on its own state.
    let fleet = "[fleet]\nendpoints = [\"http://127.0.0.1:9\"]\nnode = \"lb1\"\n";
    let mut d = Daemon::start(&t.lb, |s| format!("{}\n{fleet}", demo_config(&t.lb_ifaces, "redirect", s)));
    d.kill();
    let out = d.cli(&["cutover", "web", "green"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("part of a fleet") && err.contains("--local"), "{err}");
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "blue", "nothing changed");
    let out = d.cli(&["cutover", "web", "green", "--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("local override"), "{out:?}");
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "green");
    d.restart();
    let status = d.status();
    assert_eq!(status.services[0].active.as_str(), "green");
    let over =
        status.fleet.and_then(|f| f.services.into_iter().find(|s| s.name == "web")).and_then(|s| s.local_override);
    assert!(
        over.as_deref().is_some_and(|w| w.contains("emergency path")),
        "the restarted daemon shows the override: {over:?}"
    );
}

#[test]
fn pins_removed_under_a_running_daemon_are_restored_and_traffic_outlives_it() {
    if !crate::have_root("pins_removed_under_a_running_daemon_are_restored_and_traffic_outlives_it") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let mut d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let version = crate::proc::pin_path(&d.socket).join(format!("v{}", switcher_common::ABI_VERSION));
    assert!(version.join("links").join(&t.lb_ifaces[0]).exists());
    assert!(version.join("tc_links").join(&t.lb_ifaces[0]).exists(), "the shadow TC link is pinned");
    std::fs::remove_dir_all(&version).expect("rm -rf the pins");
    let back = wait_for(Duration::from_secs(15), || {
        (version.join("links").join(&t.lb_ifaces[0]).exists()
            && version.join("tc_links").join(&t.lb_ifaces[0]).exists()
            && version.join("maps").join("STATE").exists())
        .then_some(())
    });
    assert!(back.is_some(), "the daemon did not pin its data path again:\n{}", d.log());
    assert!(d.log().contains("pinned again"), "it said so loudly:\n{}", d.log());
    let status = d.stop();
    assert!(status.success(), "{status}");
    assert!(d.log().contains("the data path keeps running"), "{}", d.log());
    // The daemon is gone: the pinned data path still forwards.
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("the VIP answers after the daemon stopped").0), "blue");
    // And the emergency path works on the restored pins.
    assert!(d.cli(&["cutover", "web", "green"]).status.success());
    assert_eq!(colour_of(&tcp_request(&t.client, WEB).expect("request").0), "green");
}

#[test]
fn a_daemon_that_cannot_bind_its_socket_attaches_nothing() {
    if !crate::have_root("a_daemon_that_cannot_bind_its_socket_attaches_nothing") {
        return;
    }
    let t = Topology::new();
    /// Unmounts the test's bpffs mounts and removes its directory, also on failure.
    struct Cleanup(std::path::PathBuf, std::cell::RefCell<Vec<std::path::PathBuf>>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for m in self.1.borrow().iter() {
                let _ = std::process::Command::new("umount").arg(m).status();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("switcher-test-{}-nobind", t.lb.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let cleanup = Cleanup(dir.clone(), std::cell::RefCell::new(Vec::new()));
    let xdp_on = |iface: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", &t.lb.name, "link", "show", "dev", iface])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    let run = |socket: &std::path::Path, name: &str| {
        let config = dir.join(format!("{name}.toml"));
        // Pins of this run only, on a bpffs mounted here (in the root mount namespace, so
        // that what a failed start leaves attached would outlive it, as in production).
        let pins = dir.join(format!("{name}-bpf"));
        std::fs::create_dir_all(&pins).expect("pin dir");
        crate::net::sh(&["mount", "-t", "bpf", "bpf", &pins.to_string_lossy()]);
        cleanup.1.borrow_mut().push(pins.clone());
        let text = demo_config(&t.lb_ifaces, "redirect", socket).replace(
            &format!("pin_path = \"{}\"", crate::proc::pin_path(socket).display()),
            &format!("pin_path = \"{}\"", pins.display()),
        );
        std::fs::write(&config, text).expect("config");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &t.lb.name])
            .arg(crate::proc::switcher_bin())
            .arg("--config")
            .arg(&config)
            .args(["daemon", "--detach-on-exit"])
            .output()
            .expect("run the daemon");
        let attached: Vec<bool> = t.lb_ifaces.iter().map(|i| xdp_on(i)).collect();
        let _ = std::process::Command::new(crate::proc::switcher_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&pins)
            .output();
        (out, config, attached)
    };
    let adir = dir.join("adir");
    std::fs::create_dir_all(&adir).expect("mkdir");
    let dangling = dir.join("dangling.sock");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).expect("symlink");
    let long = dir.join("s".repeat(110));
    for (socket, name, why) in [
        (&adir, "adir", "is a directory"),
        (&dangling, "dangling", "dangling symbolic link"),
        (&long, "long", "at most 107"),
    ] {
        let (out, config, attached) = run(socket, name);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{name}: {err}");
        assert!(!attached.contains(&true), "{name}: a failed start left XDP attached: {attached:?}");
        let check = std::process::Command::new(crate::proc::switcher_bin())
            .args(["config", "check"])
            .arg(&config)
            .output()
            .expect("config check");
        assert!(!check.status.success(), "{name}: config check accepted it");
        assert!(String::from_utf8_lossy(&check.stderr).contains(why), "{name}: {check:?}");
    }
}

/// Sends one raw request line on the control socket; returns the answer line.
fn raw_request(d: &Daemon, line: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
fn a_fifo_config_blocks_nothing_and_a_late_request_is_not_applied() {
    if !crate::have_root("a_fifo_config_blocks_nothing_and_a_late_request_is_not_applied") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let good = std::fs::read_to_string(&d.config).expect("config");
    // The config file becomes a FIFO nobody writes to: opening it to read would block.
    std::fs::remove_file(&d.config).expect("remove config");
    crate::net::sh(&["mkfifo", &d.config.to_string_lossy()]);
    let reload = d.cli(&["reload"]);
    crate::net::sh(&["kill", "-HUP", &d.pid().to_string()]);
    let logged = wait_for(Duration::from_secs(10), || d.log().contains("SIGHUP: reload rejected").then_some(()));
    // The agent still answers and switches.
    let cutover = d.cli(&["cutover", "web", "green"]);
    // Put the file back, first releasing a reader blocked on the FIFO (if the daemon is one).
    let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&d.config);
    std::fs::remove_file(&d.config).expect("remove FIFO");
    std::fs::write(&d.config, &good).expect("restore config");
    let err = String::from_utf8_lossy(&reload.stderr);
    assert!(!reload.status.success() && err.contains("is a FIFO, not a regular file"), "{err}\n{}", d.log());
    assert!(logged.is_some(), "{}", d.log());
    assert!(String::from_utf8_lossy(&cutover.stdout).contains("blue → green"), "{cutover:?}\n{}", d.log());

    // A request whose client gave up (its deadline passed) is refused, not applied late.
    let past = switcher_user::protocol::Deadline::after(Duration::ZERO).0;
    let answer = raw_request(&d, &format!(r#"{{"op":"rollback","service":"web","deadline_ms":{past}}}"#));
    assert!(answer.contains("reached its deadline") && answer.contains("\"ok\":false"), "{answer}");
    assert_eq!(active(&d, "web"), "green", "a late rollback changed nothing");
    let future = switcher_user::protocol::Deadline::after(Duration::from_secs(60)).0;
    let answer = raw_request(&d, &format!(r#"{{"op":"rollback","service":"web","deadline_ms":{future}}}"#));
    assert!(answer.contains("\"ok\":true"), "{answer}");
    assert_eq!(active(&d, "web"), "blue", "a timely rollback is applied");
}

/// The daemon's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0)
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum()
}

/// Sets a process's soft limit on open files (the hard one is kept: raising it back would
/// need CAP_SYS_RESOURCE); returns the old limits.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: valid pointers; the process is this one or the daemon this test started.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut now) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit { rlim_cur: soft.min(now.rlim_max), rlim_max: now.rlim_max };
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &raw const new, &raw mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

#[test]
fn idle_connections_or_no_free_descriptors_never_roll_back_a_healthy_cutover() {
    if !crate::have_root("idle_connections_or_no_free_descriptors_never_roll_back_a_healthy_cutover") {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| {
        let audit = s.parent().map(|p| p.join("audit.log")).unwrap_or_default();
        config(&t, s, &format!("watch_secs = 60\n{FAST_CHECKS}"), &format!("audit_log = \"{}\"", audit.display()))
    });
    assert!(d.cli_ok(&["cutover", "web", "green"]).contains("watching green for 60s"));
    let pid = d.pid();
    let before = open_fds(pid);
    // The common default (systemd's soft limit when the unit sets none).
    let started_with = set_nofile(pid, 1024);

    // 1. Any local user may open 2,000 idle connections to the metrics port.
    set_nofile(std::process::id(), 4096);
    let flood = t.lb.run(|| {
        let addr: SocketAddr = "127.0.0.1:9477".parse().expect("addr");
        let mut open = Vec::new();
        let mut failed_in_a_row = 0;
        // Bounded: 2,000 attempts, and 5 failures in a row end it.
        for _ in 0..2000 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => {
                    open.push(s);
                    failed_in_a_row = 0;
                }
                Err(_) if failed_in_a_row >= 5 => break,
                Err(_) => failed_in_a_row += 1,
            }
        }
        open
    });
    // Several rounds of health checks (every 200 ms, down after 2 failures) under the flood.
    std::thread::sleep(Duration::from_secs(2));
    let during = open_fds(pid);
    let status = d.cli(&["status", "--json"]);
    let opened = flood.len();
    drop(flood);
    assert!(opened > 1000, "the flood opened {opened} connections");
    assert!(status.status.success(), "the control socket answers under the flood: {status:?}");
    assert_eq!(active(&d, "web"), "green", "a metrics flood rolled back a healthy cut-over:\n{}", d.log());
    assert!(
        during <= before + switcher_user::limits::METRICS_CONNECTIONS + 16,
        "the daemon held {during} descriptors under the flood ({before} before): the metrics cap did not hold"
    );

    // 2. No descriptor left at all: health probes cannot run, which says nothing of green.
    let held = open_fds(pid) as u64;
    set_nofile(pid, held);
    // A connection the daemon cannot accept (EMFILE) stays queued: accepting must not spin.
    let pending = t.lb.run(|| std::net::TcpStream::connect("127.0.0.1:9477"));
    let cpu_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ticks(pid) - cpu_before;
    set_nofile(pid, started_with.rlim_cur);
    drop(pending);
    assert_eq!(active(&d, "web"), "green", "running out of descriptors rolled back a healthy cut-over:\n{}", d.log());
    assert!(d.log().contains("health probes could not run on this node"), "{}", d.log());
    // 2 s is 200 ticks at the usual 100 Hz; a spinning accept loop uses most of them.
    assert!(cpu < 50, "the daemon used {cpu} CPU ticks in 2 s with no descriptor free (a spinning accept loop?)");
    let audit = std::fs::read_to_string(d.dir.join("audit.log")).expect("audit log");
    assert!(audit.contains("cut-over web blue -> green") && !audit.contains("auto-rollback"), "{audit}");
}
