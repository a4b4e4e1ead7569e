//! Cut-overs under load: clients send HTTP and UDP requests through the VIP without pause
//! while a flipper switches the services between colours, and every request is judged:
//! failed, reset, answered from a backend address, or answered by a colour that was not live
//! (or draining) when it started. Used by the CI test (200 flips) and `cargo xtask soak`
//! (1,000 flips).

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    net::{Netns, Server, Topology, VIP, colour_of, http_request, udp_request_from},
    proc::{Daemon, demo_config},
    trace::ExceptionCounter,
};

/// What happened to one request.
#[derive(Clone, Debug)]
struct Outcome {
    start: Instant,
    end: Instant,
    result: Result<(String, SocketAddr, SocketAddr), String>,
}

/// The totals of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub flips: u32,
    pub requests: u64,
    pub failed: u64,
    pub resets: u64,
    pub from_backend: u64,
    pub wrong_colour: u64,
    pub xdp_exceptions: u64,
    pub seconds: f64,
    /// The first few failures, for the operator.
    pub examples: Vec<String>,
}

impl Report {
    /// The table printed at the end of a run.
    #[must_use]
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:>6} {:>9} {:>7} {:>7} {:>13} {:>13} {:>15} {:>8}\n{:>6} {:>9} {:>7} {:>7} {:>13} {:>13} {:>15} {:>7.1}s\n",
            "flips",
            "requests",
            "failed",
            "resets",
            "from backend",
            "wrong colour",
            "xdp exceptions",
            "time",
            self.flips,
            self.requests,
            self.failed,
            self.resets,
            self.from_backend,
            self.wrong_colour,
            self.xdp_exceptions,
            self.seconds
        );
        for e in &self.examples {
            t.push_str("  ");
            t.push_str(e);
            t.push('\n');
        }
        t
    }

    /// Whether nothing went wrong.
    #[must_use]
    pub fn clean(&self) -> bool {
        self.failed == 0
            && self.resets == 0
            && self.from_backend == 0
            && self.wrong_colour == 0
            && self.xdp_exceptions == 0
    }
}

/// A switch of the flipper: when the command started and returned, and the colour after it.
#[derive(Clone, Copy, Debug)]
struct Flip {
    start: Instant,
    end: Instant,
    to: &'static str,
}

/// Whether `colour` may have been live for new flows at some moment in `[from, to]`.
fn possibly_live(flips: &[Flip], initial: &str, colour: &str, from: Instant, to: Instant) -> bool {
    let mut live = initial;
    for f in flips {
        if f.end <= from {
            live = f.to;
            continue;
        }
        // A switch that overlaps the request: both sides were possible.
        if f.start <= to && (live == colour || f.to == colour) {
            return true;
        }
    }
    live == colour
}

/// Runs `flips` cut-overs of `web` (HTTP) and `dns` (UDP) under load, `pace` apart.
///
/// # Panics
/// When the topology, servers or daemon cannot be set up.
#[must_use]
pub fn run(flips: u32, pace: Duration, progress: bool) -> Report {
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let exceptions = ExceptionCounter::open().ok();
    let before_exc = exceptions.as_ref().map_or(0, ExceptionCounter::count);
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<(bool, Outcome)>>> = Arc::new(Mutex::new(Vec::new()));
    let web = SocketAddr::V4(SocketAddrV4::new(VIP, 80));
    let dns = SocketAddr::V4(SocketAddrV4::new(VIP, 53));
    let mut clients = Vec::new();
    // UDP requests come from source ports not used before in the run: each is a new flow (a
    // reused 5-tuple would rightly stay on its colour until its idle timeout).
    let next_port = Arc::new(std::sync::atomic::AtomicU32::new(0));
    for i in 0..4 {
        let (stop, outcomes, next_port) = (Arc::clone(&stop), Arc::clone(&outcomes), Arc::clone(&next_port));
        let ns = Netns::attach(&t.client.name);
        let http = i % 2 == 0;
        clients.push(std::thread::spawn(move || {
            // Bounded by count as well as by the flipper's stop.
            for _ in 0..2_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let start = Instant::now();
                let r = if http {
                    http_request(&ns, web)
                } else {
                    let n = next_port.fetch_add(1, Ordering::Relaxed);
                    udp_request_from(&ns, 20_000 + u16::try_from(n % 40_000).unwrap_or(0), dns)
                };
                let end = Instant::now();
                let result = r.map(|(a, peer)| (a, peer, if http { web } else { dns })).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::ConnectionReset { "reset".to_owned() } else { e.to_string() }
                });
                if let Ok(mut o) = outcomes.lock() {
                    o.push((http, Outcome { start, end, result }));
                }
                // A steady load that leaves the two cores room for the flipper.
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    let began = Instant::now();
    let mut timeline: Vec<Flip> = Vec::new();
    std::thread::sleep(pace);
    for n in 0..flips {
        let to = if n % 2 == 0 { "green" } else { "blue" };
        let start = Instant::now();
        for svc in ["web", "dns"] {
            let out = d.cli(&["cutover", svc, to]);
            assert!(out.status.success(), "flip {n}: {}", String::from_utf8_lossy(&out.stderr));
        }
        timeline.push(Flip { start, end: Instant::now(), to });
        if progress && (n + 1) % 100 == 0 {
            eprintln!("  {} flips, {:.1}s", n + 1, began.elapsed().as_secs_f64());
        }
        std::thread::sleep(pace);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let seconds = began.elapsed().as_secs_f64();
    let outcomes = outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    let mut report = Report { flips, requests: outcomes.len() as u64, seconds, ..Report::default() };
    for (http, o) in &outcomes {
        match &o.result {
            Err(e) if e == "reset" => report.resets += 1,
            Err(e) => {
                report.failed += 1;
                if report.examples.len() < 5 {
                    report.examples.push(format!(
                        "{} request failed after {} ms: {e}",
                        if *http { "HTTP" } else { "UDP" },
                        (o.end - o.start).as_millis()
                    ));
                }
            }
            Ok((answer, peer, vip)) => {
                if peer != vip {
                    report.from_backend += 1;
                }
                if !possibly_live(&timeline, "blue", colour_of(answer), o.start, o.end) {
                    report.wrong_colour += 1;
                    if report.examples.len() < 5 {
                        report.examples.push(format!("answered by {answer:?}, not live during the request"));
                    }
                }
            }
        }
    }
    report.xdp_exceptions = exceptions.as_ref().map_or(0, |e| e.count() - before_exc);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_judged_against_the_timeline() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let flips =
            [Flip { start: at(100), end: at(110), to: "green" }, Flip { start: at(200), end: at(210), to: "blue" }];
        assert!(possibly_live(&flips, "blue", "blue", at(10), at(20)));
        assert!(!possibly_live(&flips, "blue", "green", at(10), at(20)));
        assert!(possibly_live(&flips, "blue", "green", at(95), at(105)), "overlapping the switch");
        assert!(possibly_live(&flips, "blue", "blue", at(95), at(105)));
        assert!(!possibly_live(&flips, "blue", "blue", at(150), at(160)));
        assert!(possibly_live(&flips, "blue", "blue", at(250), at(260)));
    }
}
