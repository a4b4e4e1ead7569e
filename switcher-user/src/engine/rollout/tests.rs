//! The rollout's judgement and step machine, on maps in memory with a clock the tests move.

use std::time::{Duration, Instant};

use switcher_common::user::Colour::{Blue, Green};

use super::*;
use crate::{
    engine::{
        DrainState,
        tests::{FakeMaps, board},
    },
    protocol::Request,
};

const T: Thresholds = Thresholds { min_flows: 20, min_reply_ratio_pct: 50 };

fn w(flows: u64, replies: u64) -> Window {
    Window { flows, replies, ..Window::default() }
}

#[test]
fn judgements_compare_the_new_colour_with_the_old() {
    let j = |old, new, healthy, nat| judge(T, (Blue, old), (Green, new), healthy, nat);
    assert!(matches!(j(w(100, 400), w(30, 120), true, true), Judgement::Pass(_)));
    // Refused connections: one reset per flow where blue answers with four packets.
    let fail = j(w(100, 400), w(30, 30), true, true);
    assert!(matches!(&fail, Judgement::Fail(why) if why.contains("below 50% of blue's")), "{fail}");
    // Never answered.
    assert!(matches!(j(w(100, 400), w(30, 0), true, true), Judgement::Fail(why) if why.contains("no reply")));
    // Too few flows on green: hold; too few on blue to compare with: hold.
    assert!(
        matches!(j(w(100, 400), w(19, 0), true, true), Judgement::Inconclusive(why) if why.contains("19 new flows on green"))
    );
    assert!(matches!(j(w(5, 20), w(30, 120), true, true), Judgement::Inconclusive(why) if why.contains("on blue")));
    // Health decides before traffic; in DSR mode it is all there is.
    assert!(
        matches!(j(w(100, 400), w(30, 120), false, true), Judgement::Fail(why) if why.contains("no healthy green"))
    );
    assert!(matches!(j(w(100, 0), w(30, 0), true, false), Judgement::Pass(_)));
    // At the threshold exactly: a pass (2 per flow is 50 % of 4).
    assert!(matches!(j(w(100, 400), w(30, 60), true, true), Judgement::Pass(_)));
    assert!(matches!(j(w(100, 400), w(30, 59), true, true), Judgement::Fail(_)));
}

#[test]
fn plans_compile_with_their_hooks_and_ops_round_trip() {
    let mut cfg = RolloutConfig { watch: Some(Duration::from_secs(30)), ..RolloutConfig::default() };
    cfg.hooks.set(HookPoint::BeforeFirstStep, Some("true".into()));
    cfg.hooks.set(HookPoint::AfterFinal, Some("true".into()));
    let plan = steps::parse_plan(&["10%", "pause 5s", "100%"]).expect("plan");
    let ops = compile(&plan, &cfg);
    let words: Vec<String> = ops.iter().map(ToString::to_string).collect();
    assert_eq!(words, ["hook before_first_step", "10%", "pause 5s", "100%", "hook after_final", "watch 30s"]);
    for op in ops {
        assert_eq!(Op::from_token(&op.token()), Some(op));
    }
    assert_eq!(Op::from_token("s:0"), None);
    assert_eq!(Op::from_token("h:whenever"), None);
}

type Board = Switchboard<FakeMaps>;

fn start(b: &mut Board, steps: &[&str]) {
    let steps = Some(steps.iter().map(|s| (*s).to_owned()).collect());
    let (r, _) = b.handle(Request::Rollout { service: "web".into(), colour: Green, steps, force: false });
    assert!(r.ok, "{r:?}");
}

fn set(b: &mut Board, c: Colour, flows: u64, replies: u64) {
    b.maps.counters.insert((0, c), Counters { flows, reply_packets: replies, ..Counters::default() });
}

fn status(b: &Board) -> RolloutStatus {
    b.rollout_status("web").0.expect("a rollout")
}

fn web(b: &Board) -> (Colour, u32) {
    let s = &b.services[0];
    (s.active, s.canary_bp)
}

#[test]
fn a_rollout_goes_through_its_steps_holds_when_inconclusive_and_completes() {
    let mut b = board();
    let t0 = Instant::now();
    start(&mut b, &["10%", "pause 10s", "50%", "pause 10s", "100%"]);
    assert_eq!(web(&b), (Blue, 0), "nothing moves before the first tick");
    let ev = b.tick_rollouts_at(t0);
    assert_eq!(web(&b), (Blue, 1_000));
    assert_eq!(ev.changes.first().map(|c| c.what.as_str()), Some("rollout-weight"));
    assert_eq!((status(&b).step, status(&b).state.as_str()), (2, "running"));
    // The pause's window: green gets too few flows, so the step holds past its end.
    set(&mut b, Blue, 100, 400);
    set(&mut b, Green, 5, 20);
    b.tick_rollouts_at(t0 + Duration::from_secs(11));
    assert_eq!((status(&b).step, status(&b).state.as_str()), (2, "holding"));
    assert!(status(&b).judgement.is_some_and(|j| j.starts_with("inconclusive")));
    // Paused, a pass does not advance; resumed, it does.
    set(&mut b, Blue, 200, 800);
    set(&mut b, Green, 40, 160);
    assert!(b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Pause }).0.ok);
    b.tick_rollouts_at(t0 + Duration::from_secs(12));
    assert_eq!((status(&b).step, status(&b).state.as_str()), (2, "paused"));
    assert!(b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Resume }).0.ok);
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(13));
    assert!(ev.changes.iter().any(|c| c.what == "rollout-judged" && c.to.starts_with("pass")), "{:?}", ev.changes);
    assert_eq!(web(&b), (Blue, 5_000));
    assert_eq!(status(&b).step, 4);
    // Promote skips the second pause's judgement.
    let r = b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Promote }).0;
    assert!(r.ok, "{r:?}");
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(14));
    assert_eq!(web(&b), (Green, 0), "100 % is a cut-over");
    assert_eq!(b.services[0].previous, Some(Blue));
    assert!(ev.changes.iter().any(|c| c.what == "rollout-complete"));
    assert_eq!(status(&b).state, "complete");
    // Promote has nothing left to do; a new rollout may start.
    assert!(!b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Promote }).0.ok);
}

#[test]
fn a_failing_judgement_aborts_at_once_and_new_flows_go_back() {
    let mut b = board();
    let t0 = Instant::now();
    start(&mut b, &["10%", "pause 60s", "100%"]);
    b.tick_rollouts_at(t0);
    set(&mut b, Blue, 100, 400);
    set(&mut b, Green, 30, 30);
    // Well before the pause's end.
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(2));
    assert_eq!(web(&b), (Blue, 0), "new flows back on blue");
    let s = status(&b);
    assert_eq!(s.state, "aborted");
    assert!(s.reason.as_deref().is_some_and(|r| r.contains("below 50% of blue's")), "{s:?}");
    let abort = ev.changes.iter().find(|c| c.what == "rollout-abort").expect("audited");
    assert!(abort.to.contains("below 50%"), "{abort:?}");
    // Nothing more happens to an aborted rollout.
    assert!(b.tick_rollouts_at(t0 + Duration::from_secs(100)).changes.is_empty());
    assert_eq!(web(&b), (Blue, 0));
}

#[test]
fn an_operator_abort_a_change_from_outside_and_a_busy_service() {
    let mut b = board();
    let t0 = Instant::now();
    start(&mut b, &["10%", "pause 60s", "100%"]);
    b.tick_rollouts_at(t0);
    let again = b.handle(Request::Rollout { service: "web".into(), colour: Green, steps: None, force: false }).0;
    assert!(again.error.is_some_and(|e| e.contains("rollout under way")));
    let r = b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Abort }).0;
    assert!(r.ok, "{r:?}");
    assert_eq!(web(&b), (Blue, 0));
    assert_eq!(status(&b).reason.as_deref(), Some("aborted by the operator"));
    // A cut-over by hand in the middle of a rollout ends it without another write.
    start(&mut b, &["10%", "pause 60s", "100%"]);
    b.tick_rollouts_at(t0);
    let (r, _) = b.handle(Request::Cutover {
        service: "web".into(),
        colour: Some(Blue),
        drain_timeout_secs: None,
        force: false,
        scope: crate::protocol::Scope::default(),
    });
    assert!(r.ok, "{r:?}");
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(1));
    assert_eq!(status(&b).state, "interrupted");
    assert!(ev.changes.iter().any(|c| c.what == "rollout-interrupted"));
    assert_eq!(web(&b), (Blue, 0));
    // Errors say what to do.
    let e = b.handle(Request::Rollout { service: "web".into(), colour: Blue, steps: None, force: false }).0;
    assert!(e.error.is_some_and(|e| e.contains("on blue already")));
    let bad = Some(vec!["10%".to_owned()]);
    let e = b.handle(Request::Rollout { service: "web".into(), colour: Green, steps: bad, force: false }).0;
    assert!(e.error.is_some_and(|e| e.contains("--steps: the last share is 10%")));
}

#[test]
fn hooks_gate_the_rollout_with_their_environment() {
    let mut b = board();
    b.services[0].config.rollout.hooks.set(HookPoint::BeforeFirstStep, Some("app readonly".into()));
    b.services[0].config.rollout.hooks.set(HookPoint::OnAbort, Some("app readwrite".into()));
    let t0 = Instant::now();
    start(&mut b, &["10%", "pause 60s", "100%"]);
    let ev = b.tick_rollouts_at(t0);
    let [hook] = ev.hooks.as_slice() else { panic!("one hook: {:?}", ev.hooks) };
    assert_eq!((hook.point, hook.command.as_str()), (HookPoint::BeforeFirstStep, "app readonly"));
    let env = |k: &str| hook.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(env("SWITCHER_SERVICE").as_deref(), Some("web"));
    assert_eq!((env("SWITCHER_FROM").as_deref(), env("SWITCHER_TO").as_deref()), (Some("blue"), Some("green")));
    assert_eq!(env("SWITCHER_STEP").as_deref(), Some("1"));
    assert_eq!(status(&b).state, "hook");
    // The tick waits for the hook; nothing moves.
    assert!(b.tick_rollouts_at(t0 + Duration::from_secs(5)).hooks.is_empty());
    assert_eq!(web(&b), (Blue, 0));
    // A stale token changes nothing; the hook's failure stops the rollout, nothing moved.
    assert!(b.hook_done("web", hook.token + 7, Err("x".into())).changes.is_empty());
    let ev = b.hook_done("web", hook.token, Err("exit status 3".into()));
    assert_eq!(web(&b), (Blue, 0));
    assert_eq!(b.maps.writes, 0, "no share was ever written");
    assert!(status(&b).reason.is_some_and(|r| r.contains("hook before_first_step failed: exit status 3")));
    let [abort] = ev.hooks.as_slice() else { panic!("the on-abort hook: {:?}", ev.hooks) };
    assert_eq!(abort.point, HookPoint::OnAbort);
    assert!(abort.env.iter().any(|(k, v)| k == "SWITCHER_REASON" && v.contains("exit status 3")));
    // A hook that succeeds lets the first share go at once.
    start(&mut b, &["10%", "pause 60s", "100%"]);
    let ev = b.tick_rollouts_at(t0);
    let token = ev.hooks[0].token;
    b.hook_done("web", token, Ok(()));
    assert_eq!(web(&b), (Blue, 1_000));
}

#[test]
fn progress_is_saved_and_a_new_daemon_resumes_at_the_same_step() {
    let dir = std::env::temp_dir().join(format!("switcher-rollout-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut b = board();
    b.adopt_rollouts(Pins::new(&dir));
    let t0 = Instant::now();
    start(&mut b, &["10%", "pause 60s", "100%"]);
    b.tick_rollouts_at(t0);
    assert!(b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Pause }).0.ok);
    let before = status(&b);
    // A new daemon: the maps kept the share (here: written again into a fresh fake).
    let mut again = board();
    assert!(
        again
            .handle(Request::Weight {
                service: "web".into(),
                colour: Green,
                basis_points: 1_000,
                force: false,
                scope: crate::protocol::Scope::default(),
            })
            .0
            .ok
    );
    again.adopt_rollouts(Pins::new(&dir));
    let after = status(&again);
    assert_eq!((after.step, after.steps, after.share_bp), (before.step, before.steps, 1_000));
    assert_eq!(after.state, "paused", "paused stays paused");
    // It goes on from there.
    assert!(again.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Promote }).0.ok);
    again.tick_rollouts_at(t0);
    assert_eq!(web(&again), (Green, 0));
    assert!(Pins::new(&dir).rollouts().is_empty(), "a rollout over leaves no record");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_old_colour_is_kept_as_the_backup_then_released() {
    let dir = std::env::temp_dir().join(format!("switcher-backup-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut b = board();
    b.adopt_rollouts(Pins::new(&dir));
    b.services[0].config.rollout.keep_previous = Some(Duration::from_secs(600));
    b.services[0].config.rollout.hooks.set(HookPoint::BackupReleased, Some("recycle".into()));
    let t0 = Instant::now();
    start(&mut b, &["100%"]);
    b.tick_rollouts_at(t0);
    let backup = b.rollout_status("web").1.expect("a backup");
    assert_eq!(backup.colour, Blue);
    assert!((590..=600).contains(&backup.secs_left), "{backup:?}");
    // Saved: a new daemon shows it too.
    let mut again = board();
    again.adopt_rollouts(Pins::new(&dir));
    assert_eq!(again.rollout_status("web").1.map(|k| k.colour), Some(Blue));
    // A rollback within the backup's time (on a board of its own): the completed rollout's
    // status says what holds now, not the share it ended with.
    let mut c = board();
    c.services[0].config.rollout.keep_previous = Some(Duration::from_secs(600));
    start(&mut c, &["100%"]);
    c.tick_rollouts_at(t0);
    assert_eq!((status(&c).state.as_str(), status(&c).share_bp), ("complete", 10_000));
    let (r, _) = c.handle(Request::Rollback { service: "web".into(), force: false, scope: Default::default() });
    assert!(r.ok, "{r:?}");
    let s = status(&c);
    assert_eq!((s.state.as_str(), s.share_bp), ("rolled back", 0), "{s:?}");
    assert!(s.reason.as_deref().is_some_and(|w| w.contains("blue active")), "{s:?}");
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(601));
    assert!(b.rollout_status("web").1.is_none());
    assert!(ev.changes.iter().any(|c| c.what == "backup-released"));
    assert_eq!(ev.hooks.first().map(|h| h.point), Some(HookPoint::BackupReleased));
    assert!(Pins::new(&dir).rollouts().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

fn drill(b: &mut Board, secs: u64, share_bp: u32) -> crate::protocol::Response {
    b.handle(Request::Drill { service: "web".into(), secs, share_bp }).0
}

#[test]
fn a_drill_is_refused_when_the_standby_is_unhealthy_or_something_is_under_way() {
    let mut b = board();
    b.services[0].config.green[0].weight = 0;
    let r = drill(&mut b, 2, 10_000);
    let e = r.error.unwrap_or_default();
    assert!(e.starts_with("refusing the drill: the standby green of web is unhealthy"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    b.services[0].config.green[0].weight = 1;
    start(&mut b, &["10%", "pause 10s", "100%"]);
    let e = drill(&mut b, 2, 10_000).error.unwrap_or_default();
    assert!(e.contains("has a rollout under way"), "{e}");
    // `switcher drill abort` does not stop a rollout.
    let r = b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::AbortDrill }).0;
    let e = r.error.unwrap_or_default();
    assert!(e.contains("a rollout is under way, not a drill") && e.contains("switcher rollout abort web"), "{e}");
    assert_eq!(status(&b).state, "running", "the rollout goes on");
    assert!(b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Abort }).0.ok);
    assert!(drill(&mut b, 2, 10_000).ok, "nothing under way any more");
    // A drill is stopped by `switcher drill abort`.
    assert!(b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::AbortDrill }).0.ok);
    assert!(drill(&mut b, 2, 10_000).ok, "the drill was stopped");
    let e = drill(&mut b, 2, 10_000).error.unwrap_or_default();
    assert!(e.contains("has a drill under way") && e.contains("switcher drill status web"), "{e}");
    let e = b
        .handle(Request::Rollout { service: "web".into(), colour: Green, steps: None, force: false })
        .0
        .error
        .unwrap_or_default();
    assert!(e.contains("under way"), "a rollout waits for the drill: {e}");
    let mut b = board();
    assert!(drill(&mut b, 0, 10_000).error.is_some_and(|e| e.contains("1s to")), "a zero-length drill");
    b.services[0].drain = Some(DrainState { from: Blue, started: Instant::now(), timeout: None, initial: 3 });
    let e = drill(&mut b, 2, 10_000).error.unwrap_or_default();
    assert!(e.contains("draining"), "{e}");
}

#[test]
fn a_drill_switches_to_the_standby_for_its_time_then_back_with_a_report() {
    let mut b = board();
    let t0 = Instant::now();
    let r = drill(&mut b, 2, 10_000);
    assert!(r.message.as_deref().is_some_and(|m| m.contains("switcher drill status web")), "{r:?}");
    assert_eq!(web(&b), (Blue, 0), "nothing moves before the first tick");
    b.tick_rollouts_at(t0);
    assert_eq!(web(&b), (Green, 0), "100 % of new flows on the standby");
    let s = status(&b);
    assert!(s.drill && s.state == "running", "{s:?}");
    // Within the drill's time: still on green, with a running report.
    set(&mut b, Blue, 100, 400);
    set(&mut b, Green, 30, 120);
    b.tick_rollouts_at(t0 + Duration::from_secs(1));
    assert_eq!(web(&b), (Green, 0));
    assert!(status(&b).judgement.is_some_and(|j| j.starts_with("green took 30 new flows (4.0 replies per new flow)")));
    // Over: back on blue, as a rollback, with the report in the audit's changes.
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(2));
    assert_eq!(web(&b), (Blue, 0), "back on the live colour");
    let report = ev.changes.iter().find(|c| c.what == "drill-report").expect("a report");
    assert!(report.to.starts_with("back on blue: green took 30 new flows"), "{report:?}");
    let s = status(&b);
    assert_eq!(s.state, "complete");
    assert_eq!(s.steps, ["100%", "pause 2s", "switch back"]);
    assert!(b.rollouts.kept.is_empty(), "a drill keeps no backup");
}

#[test]
fn a_drill_at_a_share_compares_the_colours_and_a_failing_standby_ends_it_early() {
    let mut b = board();
    let t0 = Instant::now();
    assert!(drill(&mut b, 30, 2_500).ok);
    b.tick_rollouts_at(t0);
    assert_eq!(web(&b), (Blue, 2_500), "a canary share of the standby");
    set(&mut b, Blue, 100, 400);
    set(&mut b, Green, 30, 30);
    let ev = b.tick_rollouts_at(t0 + Duration::from_secs(1));
    assert_eq!(web(&b), (Blue, 0), "back at once");
    assert!(ev.changes.iter().any(|c| c.what == "drill-abort"), "{:?}", ev.changes);
    assert!(ev.hooks.is_empty(), "a drill runs no rollout hooks");
    let s = status(&b);
    assert_eq!(s.state, "aborted");
    assert!(s.reason.is_some_and(|r| r.contains("below 50% of blue's")));
    // An operator's abort ends a drill too.
    let mut b = board();
    assert!(drill(&mut b, 30, 2_500).ok);
    b.tick_rollouts_at(t0);
    let r = b.handle(Request::RolloutControl { service: "web".into(), action: RolloutAction::Abort }).0;
    assert!(r.ok, "{r:?}");
    assert_eq!(web(&b), (Blue, 0));
    assert_eq!(Op::from_token(&Op::Back.token()), Some(Op::Back));
}
