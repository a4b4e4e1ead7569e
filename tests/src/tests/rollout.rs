//! T2 for rollouts on one node: a healthy green goes through its steps to 100 % with its
//! hooks in order; a green that refuses connections is aborted at its first judged step and
//! new connections land on blue; a restarted daemon resumes at the same step; a failing
//! pre-hook stops the rollout before any traffic moves, and hooks see their environment; a
//! green whose server dies mid-rollout is aborted by the fast guard (the data path's signals,
//! sampled every 100 ms), not by a health check or a pause's judgement.
//! DR drills: a drill to a healthy green sends new connections there for its time, then back
//! to blue, without a failed request; a drill to a green whose server is down is refused.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use switcher_user::protocol::{Colour, RolloutStatus, ServiceStatus};

use crate::{
    net::{Conn, Netns, Server, Topology, VIP, colour_of, tcp_request, wait_for},
    proc::{Daemon, demo_config},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);

/// The demo config with `web_extra` in the `web` service and `[service.rollout]` after it.
fn config(t: &Topology, socket: &Path, web_extra: &str, rollout: &str) -> String {
    let base = demo_config(&t.lb_ifaces, "redirect", socket);
    let dns = "\n[[service]]\nname = \"dns\"";
    assert!(base.contains(dns), "the demo config changed: {base}");
    base.replacen(dns, &format!("{web_extra}\n[service.rollout]\n{rollout}\n{dns}"), 1)
}

/// Where the daemon of `t` keeps its files (made by [`Daemon::start`], removed on drop).
fn daemon_dir(t: &Topology) -> PathBuf {
    std::env::temp_dir().join(format!("switcher-test-{}", t.lb.name))
}

fn web(d: &Daemon) -> ServiceStatus {
    d.status().services.into_iter().find(|s| s.name == "web").expect("web in status")
}

/// Waits (bounded) until web's rollout is in `state`, and returns it.
fn wait_state(d: &Daemon, state: &str, secs: u64) -> RolloutStatus {
    wait_for(Duration::from_secs(secs), || web(d).rollout.filter(|r| r.state == state))
        .unwrap_or_else(|| panic!("web's rollout did not reach {state} in {secs}s: {:?}\n{}", web(d).rollout, d.log()))
}

/// Requests to web through the VIP in a loop until stopped (at most 20,000): each answer's
/// colour, or "failed", with when it ended.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Instant, String)>>>,
}

impl Load {
    fn start(client: &Netns) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = Netns::attach(&client.name);
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) && seen.len() < 20_000 {
                let answer = match tcp_request(&ns, WEB) {
                    Ok((answer, _)) => colour_of(&answer).to_owned(),
                    Err(_) => "failed".to_owned(),
                };
                seen.push((Instant::now(), answer));
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        Load { stop, thread: Some(thread) }
    }

    fn stop(self) -> Vec<String> {
        self.stop_timed().into_iter().map(|(_, c)| c).collect()
    }

    fn stop_timed(mut self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("load thread")).unwrap_or_default()
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

/// `n` requests from the client, each answer's colour.
fn answers(client: &Netns, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| tcp_request(client, WEB).map_or_else(|e| format!("failed: {e}"), |(a, _)| colour_of(&a).to_owned()))
        .collect()
}

#[test]
fn a_rollout_to_a_healthy_green_goes_through_its_steps_with_its_hooks() {
    if !crate::have_root("a_rollout_to_a_healthy_green_goes_through_its_steps_with_its_hooks") {
        return;
    }
    let t = Topology::new();
    let (_blue, _green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let log = daemon_dir(&t).join("hooks.log");
    let hook = format!("echo \"$SWITCHER_HOOK $SWITCHER_STEP $SWITCHER_FROM $SWITCHER_TO\" >> {}", log.display());
    let rollout = format!(
        "steps = [\"20%\", \"pause 1s\", \"50%\", \"pause 1s\", \"100%\"]\nmin_flows = 3\nkeep_previous_secs = 600\nhooks = {{ before_first_step = {hook:?}, before_final = {hook:?}, after_final = {hook:?} }}"
    );
    let d = Daemon::start(&t.lb, |s| config(&t, s, "", &rollout));
    let load = Load::start(&t.client);
    let out = d.cli_ok(&["rollout", "web", "green"]);
    assert!(out.contains("rollout blue → green started"), "{out}");
    // Steps seen on the way (the pauses at least while they wait for their window).
    let mut steps = std::collections::BTreeSet::new();
    let done = wait_for(Duration::from_secs(60), || {
        let r = web(&d).rollout?;
        steps.insert(r.step);
        (r.state == "complete" || r.state == "aborted").then_some(r)
    });
    let seen = load.stop();
    let r = done.unwrap_or_else(|| panic!("the rollout did not end in 60 s: {:?}\n{}", web(&d).rollout, d.log()));
    assert_eq!(r.state, "complete", "{r:?}\n{}", d.log());
    assert_eq!(
        r.steps,
        [
            "hook before_first_step",
            "20%",
            "pause 1s",
            "50%",
            "pause 1s",
            "hook before_final",
            "100%",
            "hook after_final"
        ]
    );
    assert!(steps.len() >= 2, "the rollout went by steps: {steps:?}");
    let s = web(&d);
    assert_eq!((s.active, s.previous, s.canary.is_none()), (Colour::Green, Some(Colour::Blue), true));
    let backup = s.backup.expect("blue is kept as the backup");
    assert_eq!(backup.colour, Colour::Blue);
    assert!(backup.secs_left > 500, "{backup:?}");
    let hooks = std::fs::read_to_string(&log).expect("the hooks wrote their log");
    let lines: Vec<&str> = hooks.lines().collect();
    assert_eq!(lines, ["before_first_step 1 blue green", "before_final 6 blue green", "after_final 8 blue green"]);
    assert!(!seen.iter().any(|c| c == "failed"), "a request failed during the rollout: {seen:?}");
    assert!(seen.iter().any(|c| c == "blue") && seen.iter().any(|c| c == "green"), "both colours served");
    assert!(answers(&t.client, 10).iter().all(|c| c == "green"), "new connections on green at the end");
    let text = d.cli_ok(&["status", "web"]);
    assert!(text.contains("rollout blue → green: complete") && text.contains("backup: blue"), "{text}");
    let metrics_like = d.cli_ok(&["rollout", "status", "web", "--json"]);
    assert!(metrics_like.contains("\"state\": \"complete\""), "{metrics_like}");
}

#[test]
fn a_rollout_to_a_refusing_green_aborts_at_its_first_judged_step() {
    if !crate::have_root("a_rollout_to_a_refusing_green_aborts_at_its_first_judged_step") {
        return;
    }
    let t = Topology::new();
    // Green's server is not running: its address answers every connection with a reset. No
    // health checks, so only the rollout's judgement can see it.
    let _blue = Server::start(&t.blue, "blue");
    let rollout = "steps = [\"50%\", \"pause 30s\", \"100%\"]\nmin_flows = 5";
    let d = Daemon::start(&t.lb, |s| config(&t, s, "health = { check = \"none\" }", rollout));
    let load = Load::start(&t.client);
    d.cli_ok(&["rollout", "web", "green"]);
    let r = wait_state(&d, "aborted", 30);
    let seen = load.stop();
    assert_eq!(r.step, 2, "aborted at the first judged step (the pause after 50%): {r:?}");
    let why = r.reason.clone().unwrap_or_default();
    eprintln!("aborted at step {} after {} requests: {why}", r.step, seen.len());
    // The fast guard sees the refusals first, between ticks; the pause's judgement (by the
    // signals, or by replies per flow) would otherwise.
    assert!(
        ["fast guard", "new TCP flows failed", "replies per new flow", "no reply"].iter().any(|w| why.contains(w)),
        "{r:?}"
    );
    let s = web(&d);
    assert_eq!((s.active, s.canary.is_none()), (Colour::Blue, true), "new flows back on blue");
    assert!(seen.iter().any(|c| c == "failed"), "green refused some connections before the abort");
    let after = answers(&t.client, 20);
    assert!(after.iter().all(|c| c == "blue"), "new connections land on blue: {after:?}");
    assert!(d.log().contains("rollout aborted"), "{}", d.log());
}

#[test]
fn a_restarted_daemon_resumes_the_rollout_at_the_same_step() {
    if !crate::have_root("a_restarted_daemon_resumes_the_rollout_at_the_same_step") {
        return;
    }
    let t = Topology::new();
    let (_blue, _green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let mut d = Daemon::start(&t.lb, |s| config(&t, s, "", "steps = [\"10%\", \"pause 1h\", \"100%\"]"));
    d.cli_ok(&["rollout", "web", "green"]);
    let before = wait_for(Duration::from_secs(20), || web(&d).rollout.filter(|r| r.step == 2))
        .unwrap_or_else(|| panic!("never reached the pause: {:?}\n{}", web(&d).rollout, d.log()));
    d.stop();
    d.restart();
    let after = web(&d).rollout.unwrap_or_else(|| panic!("the rollout was not resumed:\n{}", d.log()));
    assert_eq!((after.step, after.share_bp, &after.steps), (before.step, 1_000, &before.steps), "{after:?}");
    assert_eq!(after.state, "running");
    assert_eq!(web(&d).canary.map(|c| (c.colour, c.basis_points)), Some((Colour::Green, 1_000)));
    assert!(d.log().contains("resuming a rollout"), "{}", d.log());
    // And it goes on from there.
    d.cli_ok(&["rollout", "promote", "web"]);
    wait_state(&d, "complete", 20);
    assert_eq!(web(&d).active, Colour::Green);
}

#[test]
fn a_failing_pre_hook_stops_the_rollout_before_any_traffic_moves() {
    if !crate::have_root("a_failing_pre_hook_stops_the_rollout_before_any_traffic_moves") {
        return;
    }
    let t = Topology::new();
    let (_blue, _green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let dir = daemon_dir(&t);
    let (env, abort) = (dir.join("hook.env"), dir.join("abort.txt"));
    let rollout = format!(
        "steps = [\"10%\", \"pause 1s\", \"100%\"]\nhooks = {{ before_first_step = \"env | grep ^SWITCHER_ > {}; exit 3\", on_abort = \"echo \\\"$SWITCHER_REASON\\\" > {}\" }}",
        env.display(),
        abort.display()
    );
    let d = Daemon::start(&t.lb, |s| config(&t, s, "", &rollout));
    let load = Load::start(&t.client);
    d.cli_ok(&["rollout", "web", "green"]);
    let r = wait_state(&d, "aborted", 20);
    let seen = load.stop();
    assert!(r.reason.as_deref().is_some_and(|w| w.contains("hook before_first_step failed: exit status 3")), "{r:?}");
    assert_eq!(r.share_bp, 0);
    let s = web(&d);
    assert!(s.canary.is_none() && s.active == Colour::Blue);
    let green = s.colours.iter().find(|c| c.colour == Colour::Green).expect("green");
    assert_eq!(green.counters.flows, 0, "no flow ever went to green");
    assert!(seen.iter().all(|c| c == "blue"), "every request on blue: {seen:?}");
    let env = std::fs::read_to_string(&env).expect("the hook ran");
    for line in [
        "SWITCHER_SERVICE=web",
        "SWITCHER_FROM=blue",
        "SWITCHER_TO=green",
        "SWITCHER_STEP=1",
        "SWITCHER_HOOK=before_first_step",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from the hook's environment:\n{env}");
    }
    let why = wait_for(Duration::from_secs(10), || std::fs::read_to_string(&abort).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| panic!("the on-abort hook did not run:\n{}", d.log()));
    assert!(why.contains("exit status 3"), "{why}");
}

#[test]
fn a_drill_sends_new_connections_to_green_for_its_time_then_back_to_blue() {
    if !crate::have_root("a_drill_sends_new_connections_to_green_for_its_time_then_back_to_blue") {
        return;
    }
    let t = Topology::new();
    let (_blue, green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| config(&t, s, "", "min_flows = 3"));
    wait_for(Duration::from_secs(20), || web(&d).colours.iter().all(|c| c.healthy).then_some(()))
        .unwrap_or_else(|| panic!("web's colours never all healthy:\n{}", d.log()));
    let load = Load::start(&t.client);
    let out = d.cli_ok(&["drill", "web", "--for", "2s"]);
    assert!(out.contains("drill started") && out.contains("switcher drill status web"), "{out}");
    let r = wait_state(&d, "complete", 30);
    let seen = load.stop();
    assert!(r.drill, "{r:?}");
    let report = r.judgement.clone().unwrap_or_default();
    eprintln!("drill report after {} requests: {report}", seen.len());
    assert!(report.starts_with("green took "), "{r:?}");
    assert!(!seen.iter().any(|c| c == "failed"), "a request failed during the drill: {seen:?}");
    assert!(seen.iter().any(|c| c == "green"), "new connections went to green during the drill: {seen:?}");
    let s = web(&d);
    assert_eq!((s.active, s.canary.is_none()), (Colour::Blue, true), "back on blue");
    let after = answers(&t.client, 10);
    assert!(after.iter().all(|c| c == "blue"), "new connections on blue after the drill: {after:?}");
    let text = d.cli_ok(&["drill", "status", "web"]);
    assert!(text.contains("drill blue → green: complete") && text.contains("report: green took"), "{text}");
    // Green's server stopped: once its checks see it, a drill is refused in one line.
    drop(green);
    wait_for(Duration::from_secs(20), || {
        web(&d).colours.iter().find(|c| c.colour == Colour::Green).is_some_and(|c| !c.healthy).then_some(())
    })
    .unwrap_or_else(|| panic!("green never unhealthy:\n{}", d.log()));
    let out = d.cli(&["drill", "web", "--for", "2s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the drill was not refused: {err}");
    assert!(err.contains("refusing the drill: the standby green of web is unhealthy"), "{err}");
    assert_eq!(web(&d).rollout.map(|r| r.state), Some("complete".to_owned()), "no new drill started");
    assert!(answers(&t.client, 5).iter().all(|c| c == "blue"));
}

#[test]
fn a_green_that_dies_mid_rollout_is_aborted_by_the_fast_guard() {
    if !crate::have_root("a_green_that_dies_mid_rollout_is_aborted_by_the_fast_guard") {
        return;
    }
    let t = Topology::new();
    let (_blue, green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    // No health checks, and a pause that needs more flows than the test makes: only the fast
    // guard can end this rollout.
    let rollout = "steps = [\"50%\", \"pause 10m\", \"100%\"]\nmin_flows = 1000000";
    let d = Daemon::start(&t.lb, |s| config(&t, s, "health = { check = \"none\" }", rollout));
    let load = Load::start(&t.client);
    d.cli_ok(&["rollout", "web", "green"]);
    wait_for(Duration::from_secs(20), || web(&d).rollout.filter(|r| r.step == 2 && r.share_bp == 5_000))
        .unwrap_or_else(|| panic!("never reached the pause: {:?}\n{}", web(&d).rollout, d.log()));
    // Green serves for a while; then its server dies (its port answers SYNs with an RST).
    std::thread::sleep(Duration::from_millis(1_500));
    let running = web(&d).rollout.expect("a rollout");
    assert_eq!(running.state, "running", "{running:?}");
    // Stopping the server's threads takes a moment: failures count from its start.
    let killed = Instant::now();
    drop(green);
    let r = wait_state(&d, "aborted", 20);
    let seen_abort = Instant::now();
    // A little more traffic after the abort, all of it on blue.
    std::thread::sleep(Duration::from_millis(300));
    let seen = load.stop_timed();
    let why = r.reason.clone().unwrap_or_default();
    assert!(why.contains("fast guard") && why.contains("green"), "aborted by the fast guard: {r:?}\n{}", d.log());
    assert_eq!(r.step, 2, "aborted in the pause: {r:?}");
    let s = web(&d);
    assert_eq!((s.active, s.canary.is_none()), (Colour::Blue, true), "new flows back on blue");
    let before: Vec<&str> = seen.iter().filter(|(at, _)| *at < killed).map(|(_, c)| c.as_str()).collect();
    assert!(before.contains(&"green") && !before.contains(&"failed"), "green served before it died: {before:?}");
    let failed: Vec<Instant> = seen.iter().filter(|(_, c)| c == "failed").map(|(at, _)| *at).collect();
    let (first, last) = (failed.first().copied(), failed.last().copied());
    assert!(first.is_some(), "requests to the dead green failed until the abort");
    // Measured, not asserted (timing depends on the machine): from the first failed request to
    // the abort as `status` saw it, and to the last failed request.
    if let (Some(first), Some(last)) = (first, last) {
        eprintln!(
            "fast guard: {} failed requests; first failure → abort seen in status {} ms, first → last failure {} ms, kill → abort seen {} ms; reason: {why}",
            failed.len(),
            seen_abort.saturating_duration_since(first).as_millis(),
            last.saturating_duration_since(first).as_millis(),
            seen_abort.saturating_duration_since(killed).as_millis(),
        );
    }
    let after = answers(&t.client, 20);
    assert!(after.iter().all(|c| c == "blue"), "new connections land on blue: {after:?}");
    let text = d.cli_ok(&["status", "web"]);
    assert!(text.contains("aborted") && text.contains("fast guard"), "{text}");
    assert!(text.contains("refused"), "green's refusals in status: {text}");
    assert!(d.log().contains("rollout aborted"), "{}", d.log());
}

/// The old colour's replies include those of connections opened before the pause (keep-alive
/// clients, connection pools), which the new colour cannot have: compared by replies per new
/// flow, a healthy green, the same server as blue, was aborted as soon as a few long-lived
/// connections on blue were busier than the short ones ("green 4.0 replies per new flow (23
/// flows), blue 281.2 (60 flows): below 50% of blue's"). TCP in NAT mode is judged by its
/// handshakes: the rollout completes, and the long-lived connections stay on blue.
#[test]
fn long_lived_connections_on_blue_do_not_fail_a_healthy_green() {
    if !crate::have_root("long_lived_connections_on_blue_do_not_fail_a_healthy_green") {
        return;
    }
    let t = Topology::new();
    let (_blue, _green) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let rollout = "steps = [\"20%\", \"pause 3s\", \"100%\"]\nmin_flows = 10\nwatch_secs = 1";
    let d = Daemon::start(&t.lb, |s| config(&t, s, "health = { check = \"none\" }", rollout));
    // Four long-lived connections, opened on blue before the rollout, asking in a loop
    // (bounded in count and time) as a keep-alive client or a pool does.
    let mut conns: Vec<Conn> = (0..4).map(|_| Conn::open(&t.client, WEB).expect("a long-lived connection")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (started, mut asked) = (Instant::now(), 0_u32);
            while !stop.load(Ordering::Relaxed) && asked < 400_000 && started.elapsed() < Duration::from_secs(30) {
                for c in &mut conns {
                    let answer = c.ask().expect("an answer on a long-lived connection");
                    assert_eq!(colour_of(&answer), "blue", "a long-lived connection moved");
                    asked += 1;
                }
            }
            asked
        })
    };
    let load = Load::start(&t.client);
    d.cli_ok(&["rollout", "web", "green"]);
    let ended =
        wait_for(Duration::from_secs(25), || web(&d).rollout.filter(|r| r.state != "running" && r.state != "watching"));
    stop.store(true, Ordering::Relaxed);
    let asked = busy.join().expect("the long-lived connections' thread");
    let seen = load.stop();
    let r = ended.unwrap_or_else(|| panic!("the rollout did not end in 25 s: {:?}\n{}", web(&d).rollout, d.log()));
    assert!(!seen.iter().any(|c| c == "failed"), "a short request failed: {seen:?}");
    assert_eq!(r.state, "complete", "{asked} requests on 4 long-lived connections on blue; the rollout: {r:?}");
}
