//! The switcher demo: a live blue → green → blue cut-over under continuous traffic.
//!
//! Builds client / lb / blue / green namespaces, starts `switcher daemon` on the lb, keeps a
//! client sending requests (a new TCP connection per request, and UDP datagrams) through the
//! VIP, cuts over to green and rolls back to blue while traffic flows, and prints per-colour
//! answer counts and failures each second. A long-lived TCP connection opened at the start
//! shows that established flows stay where they began. Everything is removed at the end, and
//! on Ctrl-C.

use std::{
    net::SocketAddrV4,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use switcher_tests::{
    net::{BLUE, Conn, GREEN, Server, Topology, VIP, VIP_TCP, VIP_UDP, tcp_request, udp_request_from},
    proc::{Daemon, demo_config},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, VIP_TCP);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, VIP_UDP);
/// Seconds into the run of the cut-over and of the rollback, and the run's length.
const CUTOVER_AT: f64 = 3.0;
const ROLLBACK_AT: f64 = 7.0;
const RUN_FOR: f64 = 10.0;
/// An upper bound on requests, whatever the machine's speed.
const MAX_REQUESTS: u64 = 200_000;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

#[derive(Default, Clone, Copy)]
struct Tally {
    blue: u64,
    green: u64,
    failed: u64,
    /// Answers that came from an address other than the VIP.
    leaked: u64,
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo builds network namespaces and attaches XDP: run it as root (`sudo ./x demo`)");
        return ExitCode::FAILURE;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let ok = run();
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn run() -> bool {
    println!("switcher demo: blue-green cut-over in the kernel's XDP hook\n");
    println!("  building namespaces client / lb / blue / green …");
    let t = Topology::new();
    let _blue = Server::start(&t.blue, "blue");
    let _green = Server::start(&t.green, "green");
    println!(
        "  blue  serves on {BLUE}, green on {GREEN}; clients use the VIP {VIP} (web: TCP {VIP_TCP}, dns: UDP {VIP_UDP})"
    );
    let daemon = Daemon::start(&t.lb, |socket| demo_config(&t.lb_ifaces, "redirect", socket));
    println!("  switcher daemon attached to {} in namespace {}\n", t.lb_ifaces.join(", "), t.lb.name);
    print!("{}", daemon.cli_ok(&["status"]));
    println!();

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
        let ns_name = t.client.name.clone();
        std::thread::spawn(move || client_loop(&ns_name, &tally, &stop))
    };
    let mut long = Conn::open(&t.client, WEB).ok();

    let start = Instant::now();
    let (mut cut, mut rolled) = (false, false);
    let mut last = Tally::default();
    println!("  {:>6}  {:>7} {:>7} {:>7}  long-lived connection", "time", "blue", "green", "failed");
    while start.elapsed().as_secs_f64() < RUN_FOR && !INTERRUPTED.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1000));
        let now = start.elapsed().as_secs_f64();
        let total = tally.lock().map(|t| *t).unwrap_or_default();
        let long_says =
            long.as_mut().map_or_else(|| "closed".to_owned(), |c| c.ask().unwrap_or_else(|e| format!("error: {e}")));
        println!(
            "  {now:>5.1}s  {:>7} {:>7} {:>7}  {long_says}",
            total.blue - last.blue,
            total.green - last.green,
            total.failed - last.failed
        );
        last = total;
        if !cut && now >= CUTOVER_AT {
            cut = true;
            for svc in ["web", "dns"] {
                println!("  >>> switcher cutover {svc} green: {}", daemon.cli_ok(&["cutover", svc, "green"]).trim());
            }
        }
        if !rolled && now >= ROLLBACK_AT {
            rolled = true;
            for svc in ["web", "dns"] {
                println!("  >>> switcher rollback {svc}: {}", daemon.cli_ok(&["rollback", svc]).trim());
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    drop(long);
    let total = tally.lock().map(|t| *t).unwrap_or_default();
    println!("\n{}", daemon.cli_ok(&["status"]));
    println!(
        "  requests answered by blue: {}, by green: {}, failed: {}, answered from a backend address: {}",
        total.blue, total.green, total.failed, total.leaked
    );
    let ok = total.failed == 0 && total.leaked == 0 && total.green > 0 && total.blue > 0 && cut && rolled;
    if INTERRUPTED.load(Ordering::Relaxed) {
        println!("  interrupted: cleaning up");
        return false;
    }
    println!("  {}", if ok { "demo OK: every request answered, through the VIP only" } else { "demo FAILED" });
    println!("  cleaning up namespaces and the daemon …");
    ok
}

/// Alternates a TCP request on a fresh connection and a UDP request, until stopped.
fn client_loop(ns_name: &str, tally: &Mutex<Tally>, stop: &AtomicBool) {
    let ns = switcher_tests::net::Netns::attach(ns_name);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) && n < MAX_REQUESTS {
        // UDP from a source port not used before in this run, so that every datagram is a new
        // flow (a reused 5-tuple would rightly stay on its colour until its idle timeout).
        let udp_port = 20_000 + u16::try_from((n / 2) % 40_000).unwrap_or(0);
        let (result, vip) = if n.is_multiple_of(2) {
            (tcp_request(&ns, WEB), WEB)
        } else {
            (udp_request_from(&ns, udp_port, DNS), DNS)
        };
        n += 1;
        let Ok(mut t) = tally.lock() else { return };
        match result {
            Ok((answer, from)) => {
                if from != std::net::SocketAddr::V4(vip) {
                    t.leaked += 1;
                }
                match switcher_tests::net::colour_of(&answer) {
                    "blue" => t.blue += 1,
                    "green" => t.green += 1,
                    _ => t.failed += 1,
                }
            }
            Err(_) => t.failed += 1,
        }
        drop(t);
        std::thread::sleep(Duration::from_millis(2));
    }
}
