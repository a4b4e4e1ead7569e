//! Rollouts on this node: a plan of steps (shares of new flows for the new colour, pauses
//! judged before the next share), hooks at named points, a watch after 100 %, and the old
//! colour kept as the backup afterwards. Driven by the once-a-second tick; every share is set
//! through the switch rules ([`super::rules`]), as `switcher weight` would set it; an abort
//! sends new flows back to the old colour as a rollback does.
//!
//! A plan is compiled into ops (`hook before_first_step`, `1%`, `pause 60s`, …,
//! `hook before_final`, `100%`, `hook after_final`, `watch 60s`); the op under way is saved
//! under the pins (`rollouts/<service>`, see [`crate::pins::Pins::save_rollout`]) each time it
//! changes, so a restarted daemon resumes at the same op (a pause's window begins afresh; a
//! hook under way runs again: hooks must be idempotent).
//!
//! The judgement of a pause is [`judge`], a pure function of the two colours' counters over
//! the window and the new colour's health, and of the data path's signals ([`super::signals`],
//! which also has the fast guard that aborts between ticks).

use std::{
    collections::HashMap,
    fmt,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use switcher_common::{BP_ALL, user::Colour};

use super::{Change, Maps, Outcome, Switchboard, rules::Ask, signals};
use crate::{
    config::Mode,
    dataplane::Counters,
    pins::Pins,
    protocol::{Backup, RolloutAction, RolloutStatus, percent},
    steps::{self, HookPoint, RolloutConfig, Step},
};

/// One op of a compiled plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Run the hook of this point (if one is configured) and go on only if it succeeds.
    Hook(HookPoint),
    /// Set the new colour's share of new flows (basis points).
    Share(u32),
    /// Hold, then judge the window.
    Pause(Duration),
    /// After 100 %: abort if the new colour fails its checks within this long.
    Watch(Duration),
    /// The end of a drill: new flows back on the old colour, and the report.
    Back,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Hook(p) => write!(f, "hook {p}"),
            Op::Share(bp) => write!(f, "{}", Step::Share(*bp)),
            Op::Pause(d) => write!(f, "{}", Step::Pause(*d)),
            Op::Watch(d) => write!(f, "watch {}", steps::duration_words(*d)),
            Op::Back => write!(f, "switch back"),
        }
    }
}

impl Op {
    /// The op as saved, short (a record is a directory name: 255 bytes at most):
    /// `h1` (the hook point's index), `s1000`, `p60`, `w60`.
    pub fn token(self) -> String {
        match self {
            Op::Hook(p) => format!("h{}", HookPoint::ALL.iter().position(|q| *q == p).unwrap_or_default()),
            Op::Share(bp) => format!("s{bp}"),
            Op::Pause(d) => format!("p{}", d.as_secs()),
            Op::Watch(d) => format!("w{}", d.as_secs()),
            Op::Back => "b".to_owned(),
        }
    }

    pub fn from_token(t: &str) -> Option<Op> {
        if t == "b" {
            return Some(Op::Back);
        }
        let kind = t.get(..1)?;
        let v = t.get(1..)?;
        match kind {
            "h" => v.parse::<usize>().ok().and_then(|i| HookPoint::ALL.get(i)).copied().map(Op::Hook),
            "s" => v.parse().ok().filter(|bp| (1..=BP_ALL).contains(bp)).map(Op::Share),
            "p" => v.parse().ok().map(|s| Op::Pause(Duration::from_secs(s))),
            "w" => v.parse().ok().map(|s| Op::Watch(Duration::from_secs(s))),
            _ => None,
        }
    }
}

/// The ops of a plan: the steps, with the hooks configured around them and the watch after.
#[must_use]
pub fn compile(plan: &[Step], config: &RolloutConfig) -> Vec<Op> {
    let has = |p| config.hooks.command(p).is_some();
    let mut ops = Vec::with_capacity(plan.len() + 4);
    if has(HookPoint::BeforeFirstStep) {
        ops.push(Op::Hook(HookPoint::BeforeFirstStep));
    }
    for step in plan {
        match *step {
            Step::Share(bp) if bp == BP_ALL => {
                if has(HookPoint::BeforeFinal) {
                    ops.push(Op::Hook(HookPoint::BeforeFinal));
                }
                ops.push(Op::Share(bp));
                if has(HookPoint::AfterFinal) {
                    ops.push(Op::Hook(HookPoint::AfterFinal));
                }
            }
            Step::Share(bp) => ops.push(Op::Share(bp)),
            Step::Pause(d) => ops.push(Op::Pause(d)),
        }
    }
    if let Some(w) = config.watch {
        ops.push(Op::Watch(w));
    }
    ops
}

/// One colour's traffic over a window: new flows, and reply packets from its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub flows: u64,
    pub replies: u64,
    /// The data path's signals (handshakes, resets, …) over the window.
    pub signals: signals::Signals,
}

impl Window {
    /// The counts between two readings of a colour's counters.
    #[must_use]
    pub fn between(then: Counters, now: Counters) -> Window {
        Window {
            flows: now.flows.saturating_sub(then.flows),
            replies: now.reply_packets.saturating_sub(then.reply_packets),
            signals: signals::Signals::between(&then, &now),
        }
    }

    /// Replies per new flow, for messages.
    fn ratio(self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a ratio shown with one decimal")]
        let r = self.replies as f64 / self.flows.max(1) as f64;
        r
    }
}

/// What a judgement decides, and why (for `status` and the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The new colour does as well as the old: the next step may come.
    Pass(String),
    /// Too little traffic to tell: the step holds.
    Inconclusive(String),
    /// The new colour does worse: abort.
    Fail(String),
}

impl fmt::Display for Judgement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Judgement::Pass(w) => write!(f, "pass: {w}"),
            Judgement::Inconclusive(w) => write!(f, "inconclusive: {w}"),
            Judgement::Fail(w) => write!(f, "fail: {w}"),
        }
    }
}

/// The thresholds of a judgement (`[service.rollout]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// New flows the new colour needs in the window.
    pub min_flows: u64,
    /// The new colour's replies per new flow, as a percentage of the old colour's, below
    /// which it fails.
    pub min_reply_ratio_pct: u32,
}

/// Judges a window of a rollout: the new colour `to` against the old colour `from`, which
/// took the rest of the same traffic over the same window.
///
/// - a new colour with no healthy backend fails (whatever the traffic);
/// - fewer than `min_flows` new flows on it: inconclusive;
/// - the data path's signals condemn it ([`signals::judge`]: failed TCP flows or SYN latency,
///   against the old colour's): fail;
/// - when replies are not seen (DSR), health (and the clients' signals) is all there is: pass;
/// - TCP in NAT mode (at least `min_flows` SYNs on the new colour): the signals had nothing
///   against it: pass (the reply count below would compare the new colour's new flows with
///   the old colour's long-lived ones);
/// - no reply at all to its new flows: fail;
/// - fewer than `min_flows` on the old colour: inconclusive (nothing to compare with);
/// - replies per new flow below `min_reply_ratio_pct` % of the old colour's: fail (backends
///   that refuse or reset connections answer a flow with one packet, where a served request
///   takes several);
/// - else pass.
#[must_use]
pub fn judge(
    t: Thresholds,
    (from, old): (Colour, Window),
    (to, new): (Colour, Window),
    new_healthy: bool,
    replies_seen: bool,
) -> Judgement {
    if !new_healthy {
        return Judgement::Fail(format!("no healthy {to} backend"));
    }
    if new.flows < t.min_flows {
        return Judgement::Inconclusive(format!("{} new flows on {to}, {} needed to judge", new.flows, t.min_flows));
    }
    if let Some(fail) = signals::judge(t.min_flows, (from, &old.signals), (to, &new.signals), replies_seen) {
        return fail;
    }
    if !replies_seen {
        return Judgement::Pass(format!("{to} healthy, {} new flows (DSR: replies are not seen)", new.flows));
    }
    if new.signals.syns >= t.min_flows {
        // TCP in NAT mode: the handshakes say whether each new flow was served. Replies per
        // new flow would not: the old colour's include those of connections opened before
        // the window (keep-alive clients, pools), which the new colour cannot have.
        let (n, o) = (&new.signals, &old.signals);
        return Judgement::Pass(format!(
            "{to} completed {} of {} handshakes, {from} {} of {}",
            n.handshakes, n.syns, o.handshakes, o.syns
        ));
    }
    if new.replies == 0 {
        return Judgement::Fail(format!("no reply from {to} to {} new flows", new.flows));
    }
    if old.flows < t.min_flows {
        return Judgement::Inconclusive(format!(
            "{} new flows on {from}, {} needed to compare {to} with",
            old.flows, t.min_flows
        ));
    }
    let (nr, nf, or, of) =
        (u128::from(new.replies), u128::from(new.flows), u128::from(old.replies), u128::from(old.flows));
    // new.replies / new.flows < pct % × old.replies / old.flows, without division.
    let worse = nr * of * 100 < u128::from(t.min_reply_ratio_pct) * or * nf;
    let both = format!(
        "{to} {:.1} replies per new flow ({} flows), {from} {:.1} ({} flows)",
        new.ratio(),
        new.flows,
        old.ratio(),
        old.flows
    );
    if worse {
        Judgement::Fail(format!("{both}: below {}% of {from}'s", t.min_reply_ratio_pct))
    } else {
        Judgement::Pass(both)
    }
}

/// How a rollout ended, or that it has not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Running,
    Complete,
    Aborted,
    Interrupted,
}

/// A rollout of one service.
#[derive(Clone, Debug)]
struct Rollout {
    from: Colour,
    to: Colour,
    ops: Vec<Op>,
    /// The op under way.
    at: usize,
    paused: bool,
    force: bool,
    end: End,
    step_started: Instant,
    /// The colours' counters when the pause under way began: `[from, to]`.
    baseline: Option<[Counters; 2]>,
    /// The last pause ended inconclusive and holds.
    holding: bool,
    /// The hook awaited, by token.
    hook: Option<u64>,
    /// The new colour's share of new flows now.
    share: u32,
    judgement: Option<String>,
    reason: Option<String>,
}

impl Rollout {
    /// A rollout (or drill) from `from` to `to` about to take its first op.
    fn start(from: Colour, to: Colour, ops: Vec<Op>, force: bool) -> Rollout {
        Rollout {
            from,
            to,
            ops,
            at: 0,
            paused: false,
            force,
            end: End::Running,
            step_started: Instant::now(),
            baseline: None,
            holding: false,
            hook: None,
            share: 0,
            judgement: None,
            reason: None,
        }
    }

    /// A drill is a rollout whose plan ends with [`Op::Back`].
    fn is_drill(&self) -> bool {
        self.ops.last() == Some(&Op::Back)
    }
}

/// The ops of a drill: `share` of new flows to the standby for `secs`, then back.
#[must_use]
pub fn drill_ops(share: u32, secs: Duration) -> Vec<Op> {
    vec![Op::Share(share), Op::Pause(secs), Op::Back]
}

/// A drill's report: what the standby `to` took over the window, against the live colour
/// `from`, and the judgement of the same window.
#[must_use]
pub fn drill_report(
    (from, old): (Colour, Window),
    (to, new): (Colour, Window),
    judgement: &Judgement,
    replies_seen: bool,
) -> String {
    let replies = |w: Window| {
        if replies_seen { format!("{:.1} replies per new flow", w.ratio()) } else { "replies not seen (DSR)".into() }
    };
    format!(
        "{to} took {} new flows ({}), {from} {} ({}); {judgement}",
        new.flows,
        replies(new),
        old.flows,
        replies(old)
    )
}

/// The old colour of a completed rollout, kept as the backup.
#[derive(Clone, Debug)]
struct Kept {
    colour: Colour,
    until: Instant,
}

/// A rollout's record under the pins: `1~FROM~TO~AT~PAUSED~FORCE~KEPT_UNTIL~OPS`, e.g.
/// `1~blue~green~2~0~0~0~s100,p60,s10000` (a directory's name: short, no `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    from: Colour,
    to: Colour,
    ops: Vec<Op>,
    at: usize,
    paused: bool,
    force: bool,
    /// After the end: the backup is kept until this UNIX time.
    kept_until: Option<u64>,
}

impl Record {
    fn encode(&self) -> String {
        let ops: Vec<String> = self.ops.iter().map(|o| o.token()).collect();
        format!(
            "1~{}~{}~{}~{}~{}~{}~{}",
            self.from,
            self.to,
            self.at,
            u8::from(self.paused),
            u8::from(self.force),
            self.kept_until.unwrap_or(0),
            ops.join(",")
        )
    }

    fn decode(text: &str) -> Option<Record> {
        let f: Vec<&str> = text.split('~').collect();
        let [version, from, to, at, paused, force, kept, ops] = f.as_slice() else { return None };
        if *version != "1" {
            return None;
        }
        let kept: u64 = kept.parse().ok()?;
        let ops = if ops.is_empty() { Some(Vec::new()) } else { ops.split(',').map(Op::from_token).collect() };
        Some(Record {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
            ops: ops?,
            at: at.parse().ok()?,
            paused: *paused == "1",
            force: *force == "1",
            kept_until: (kept > 0).then_some(kept),
        })
    }
}

/// The switchboard's rollouts, by service.
#[derive(Default)]
pub(super) struct Rollouts {
    by_service: HashMap<String, Rollout>,
    kept: HashMap<String, Kept>,
    store: Option<Pins>,
    /// Hooks counted so far: the next one's token.
    hooks: u64,
    /// Hooks and changes of an operator's abort, for the next tick to hand out.
    pending: RolloutEvents,
}

/// A hook for the agent to run, off the engine's thread; its result goes back through
/// [`Switchboard::hook_done`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRun {
    pub service: String,
    pub point: HookPoint,
    /// Run with `sh -c`.
    pub command: String,
    /// `SWITCHER_SERVICE`, `SWITCHER_FROM`, `SWITCHER_TO`, `SWITCHER_STEP`, …
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Says which wait the result ends.
    pub token: u64,
}

/// What the rollouts did: changes for the audit log, hooks to run.
#[derive(Debug, Default)]
pub struct RolloutEvents {
    pub changes: Vec<Change>,
    pub hooks: Vec<HookRun>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl<M: Maps> Switchboard<M> {
    /// Keeps rollout records under `pins` from now on, and takes up those a previous daemon
    /// left: each resumes at the op it was at.
    pub fn adopt_rollouts(&mut self, pins: Pins) {
        let now = Instant::now();
        for (name, text) in pins.rollouts() {
            let Some(record) = Record::decode(&text).filter(|_| self.find(&name).is_ok()) else {
                tracing::warn!(service = %name, "a rollout record that is unreadable or of a service no longer configured: dropped");
                pins.clear_rollout(&name);
                continue;
            };
            let (from, to) = (record.from, record.to);
            if let Some(until) = record.kept_until {
                let left = Duration::from_secs(until.saturating_sub(unix_now()));
                tracing::info!(service = %name, backup = %from, secs_left = left.as_secs(), "adopted the backup of a completed rollout");
                self.rollouts.kept.insert(name, Kept { colour: from, until: now + left });
                continue;
            }
            let s = &self.services[self.find(&name).unwrap_or_default()];
            let share = match (s.active, s.canary_bp) {
                (a, 0) if a == to => BP_ALL,
                (a, c) if a == from => c,
                _ => 0,
            };
            let ops = record.ops;
            let at = record.at.min(ops.len());
            tracing::info!(service = %name, %from, %to, step = at + 1, op = ops.get(at).map(ToString::to_string), "resuming a rollout where the previous daemon left it");
            self.rollouts.by_service.insert(
                name,
                Rollout {
                    from,
                    to,
                    ops,
                    at,
                    paused: record.paused,
                    force: record.force,
                    end: End::Running,
                    step_started: now,
                    baseline: None,
                    holding: false,
                    hook: None,
                    share,
                    judgement: None,
                    reason: None,
                },
            );
        }
        self.rollouts.store = Some(pins);
    }

    /// `switcher rollout SERVICE COLOUR`: starts a rollout (its first op runs at the next
    /// tick).
    pub(super) fn start_rollout(&mut self, name: &str, to: Colour, plan: Option<&[String]>, force: bool) -> Outcome {
        let i = self.find(name)?;
        if self.rollouts.by_service.get(name).is_some_and(|r| r.end == End::Running) {
            return Err(format!(
                "{name} has a rollout under way; see `switcher rollout status {name}`, or `switcher rollout abort {name}` first"
            ));
        }
        let s = &self.services[i];
        let from = s.active;
        if from == to {
            return Err(format!("{name} is on {to} already: roll out the other colour"));
        }
        if s.canary_bp > 0 {
            return Err(format!(
                "{name} sends {} of new flows to {} already: end that canary (`switcher cutover {name} {from}`) before a rollout",
                percent(s.canary_bp),
                from.other()
            ));
        }
        let steps = match plan {
            Some(texts) => steps::parse_plan(texts).map_err(|e| format!("--steps: {e}"))?,
            None => s.config.rollout.steps.clone(),
        };
        self.may_switch(i, to, false, force)?;
        let ops = compile(&steps, &s.config.rollout);
        let record = Record { from, to, ops: ops.clone(), at: 0, paused: false, force, kept_until: None };
        if record.encode().len() > 255 {
            return Err(format!(
                "{name}: this plan is too long to be saved under the pins for a restarted daemon (255 bytes); use fewer steps"
            ));
        }
        let words: Vec<String> = ops.iter().map(ToString::to_string).collect();
        self.rollouts.kept.remove(name);
        self.rollouts.by_service.insert(name.to_owned(), Rollout::start(from, to, ops, force));
        self.save_rollout(name);
        tracing::info!(service = %name, %from, %to, plan = %words.join(", "), "rollout started");
        let change = Change {
            service: name.to_owned(),
            what: "rollout-start".into(),
            from: from.to_string(),
            to: format!("{to} ({})", words.join(", ")),
        };
        self.answer(
            i,
            format!(
                "{name}: rollout {from} → {to} started: {}; `switcher rollout status {name}` follows it",
                words.join(", ")
            ),
            Some(change),
        )
    }

    /// `switcher drill SERVICE`: `share` of new flows to the standby (idle) colour for
    /// `secs`, then back, with a report (its first op runs at the next tick). Refused when the
    /// standby is unhealthy, or a rollout, drill, canary or drain is under way.
    pub(super) fn start_drill(&mut self, name: &str, secs: Duration, share: u32) -> Outcome {
        let i = self.find(name)?;
        if let Some(r) = self.rollouts.by_service.get(name).filter(|r| r.end == End::Running) {
            let what = if r.is_drill() { "drill" } else { "rollout" };
            return Err(format!(
                "refusing the drill: {name} has a {what} under way; see `switcher {what} status {name}`"
            ));
        }
        let s = &self.services[i];
        let (from, to) = (s.active, s.active.other());
        if !s.healthy(to) {
            return Err(format!(
                "refusing the drill: the standby {to} of {name} is unhealthy ({})",
                s.why_unhealthy(to)
            ));
        }
        if s.drain.is_some() {
            return Err(format!(
                "refusing the drill: {name}'s old colour is still draining after a switch; try again when `switcher status {name}` shows no drain"
            ));
        }
        if s.canary_bp > 0 {
            return Err(format!(
                "refusing the drill: {name} sends {} of new flows to {to} already; end that canary first (`switcher cutover {name} {from}`)",
                percent(s.canary_bp)
            ));
        }
        if share == 0 || share > BP_ALL || secs.is_zero() || secs > steps::MAX_PAUSE {
            return Err(format!(
                "a drill sends 0.01% to 100% of new flows to the standby for 1s to {}",
                steps::duration_words(steps::MAX_PAUSE)
            ));
        }
        let ops = drill_ops(share, secs);
        self.rollouts.by_service.insert(name.to_owned(), Rollout::start(from, to, ops, false));
        self.save_rollout(name);
        let words = format!("{} of new flows to {to} for {}", percent(share), steps::duration_words(secs));
        tracing::info!(service = %name, live = %from, standby = %to, "drill started: {words}");
        let change =
            Change { service: name.to_owned(), what: "drill-start".into(), from: from.to_string(), to: words.clone() };
        self.answer(
            i,
            format!(
                "{name}: drill started: {words}, then back to {from}; follow it with `switcher drill status {name}` (or `switcher status`), end it early with `switcher drill abort {name}`"
            ),
            Some(change),
        )
    }

    /// `switcher rollout pause|resume|promote|abort SERVICE`.
    pub(super) fn control_rollout(&mut self, name: &str, action: RolloutAction) -> Outcome {
        let i = self.find(name)?;
        let running = self.rollouts.by_service.get(name).filter(|r| r.end == End::Running);
        let Some(r) = running else {
            return Err(format!("{name} has no rollout under way; start one with `switcher rollout {name} COLOUR`"));
        };
        if action == RolloutAction::AbortDrill && !r.is_drill() {
            return Err(format!(
                "{name}: a rollout is under way, not a drill; nothing was changed (`switcher rollout abort {name}` stops the rollout)"
            ));
        }
        let action = action.checked();
        let op = r.ops.get(r.at).copied();
        let msg = match action {
            RolloutAction::Pause | RolloutAction::Resume => {
                let pause = action == RolloutAction::Pause;
                if let Some(r) = self.rollouts.by_service.get_mut(name) {
                    r.paused = pause;
                }
                self.save_rollout(name);
                if pause {
                    format!(
                        "{name}: rollout paused (a failing judgement still aborts it); `switcher rollout resume {name}` goes on"
                    )
                } else {
                    format!("{name}: rollout resumed")
                }
            }
            RolloutAction::Promote => {
                if r.hook.is_some() {
                    return Err(format!("{name}: a hook is running; wait for it, or abort the rollout"));
                }
                let Some(Op::Pause(_) | Op::Watch(_)) = op else {
                    return Err(format!(
                        "{name}: nothing to promote at step {} ({}); promote ends a pause, a hold or the watch",
                        r.at + 1,
                        op.map_or_else(|| "over".to_owned(), |o| o.to_string())
                    ));
                };
                if let Some(r) = self.rollouts.by_service.get_mut(name) {
                    r.judgement = Some("promoted by the operator".into());
                    r.paused = false;
                }
                self.next_op(name, Instant::now());
                format!("{name}: promoted past {}", op.map_or_else(String::new, |o| o.to_string()))
            }
            RolloutAction::Abort | RolloutAction::AbortDrill => {
                let what = if r.is_drill() { "drill" } else { "rollout" };
                let mut ev = RolloutEvents::default();
                self.abort_rollout(name, "aborted by the operator".into(), &mut ev);
                // The answer carries one change and no hooks: the rest goes out at the next tick.
                self.rollouts.pending.hooks.extend(ev.hooks);
                self.rollouts
                    .pending
                    .changes
                    .extend(ev.changes.into_iter().filter(|c| c.what != "rollout-abort" && c.what != "drill-abort"));
                format!("{name}: {what} aborted; new flows are back on {}", self.services[i].active)
            }
        };
        let what = match action {
            RolloutAction::Pause => "rollout-pause",
            RolloutAction::Resume => "rollout-resume",
            RolloutAction::Promote => "rollout-promote",
            RolloutAction::Abort | RolloutAction::AbortDrill => "rollout-abort",
        };
        let change = Change {
            service: name.to_owned(),
            what: what.into(),
            from: format!("step {}", op.map_or_else(|| "-".to_owned(), |o| o.to_string())),
            to: "operator".into(),
        };
        self.answer(i, msg, Some(change))
    }

    /// The rollouts' work of the once-a-second tick: each rollout under way goes as far as it
    /// can now; backups past their time are released.
    pub fn tick_rollouts(&mut self) -> RolloutEvents {
        self.tick_rollouts_at(Instant::now())
    }

    pub(super) fn tick_rollouts_at(&mut self, now: Instant) -> RolloutEvents {
        let mut ev = std::mem::take(&mut self.rollouts.pending);
        let names: Vec<String> = self.rollouts.by_service.keys().cloned().collect();
        for name in names {
            self.run_rollout(&name, now, &mut ev);
        }
        let kept: Vec<String> = self.rollouts.kept.keys().cloned().collect();
        for name in kept {
            let Some(k) = self.rollouts.kept.get(&name).cloned() else { continue };
            let active = self.find(&name).ok().map(|i| self.services[i].active);
            // A rollback to the backup (or any switch) ends its role as the backup.
            let switched = active.is_none_or(|a| a == k.colour);
            if now < k.until && !switched {
                continue;
            }
            self.rollouts.kept.remove(&name);
            self.clear_record(&name);
            if switched {
                continue;
            }
            tracing::info!(service = %name, colour = %k.colour, "backup released: keep_previous_secs is over");
            ev.changes.push(Change {
                service: name.clone(),
                what: "backup-released".into(),
                from: k.colour.to_string(),
                to: "-".into(),
            });
            let to = k.colour.other();
            if let Some(h) = self.hook_run(&name, HookPoint::BackupReleased, k.colour, to, None) {
                ev.hooks.push(h);
            }
        }
        ev
    }

    /// A hook's result: a gating hook that succeeded lets the rollout go on at once; one that
    /// failed aborts it.
    pub fn hook_done(&mut self, name: &str, token: u64, result: Result<(), String>) -> RolloutEvents {
        let mut ev = RolloutEvents::default();
        let waiting = self.rollouts.by_service.get_mut(name).filter(|r| r.hook == Some(token) && r.end == End::Running);
        let Some(r) = waiting else { return ev };
        r.hook = None;
        let point = match r.ops.get(r.at) {
            Some(Op::Hook(p)) => *p,
            _ => return ev,
        };
        match result {
            Ok(()) => {
                r.judgement = Some(format!("hook {point} succeeded"));
                self.next_op(name, Instant::now());
                self.run_rollout(name, Instant::now(), &mut ev);
            }
            Err(e) => self.abort_rollout(name, format!("hook {point} failed: {e}"), &mut ev),
        }
        ev
    }

    /// Runs a rollout forward as far as it goes now.
    fn run_rollout(&mut self, name: &str, now: Instant, ev: &mut RolloutEvents) {
        // Each pass moves past one op or returns: bounded by the ops.
        for _ in 0..=steps::MAX_STEPS + 8 {
            let Some(r) = self.rollouts.by_service.get(name).filter(|r| r.end == End::Running).cloned() else {
                return;
            };
            let Ok(i) = self.find(name) else {
                self.rollouts.by_service.remove(name);
                self.clear_record(name);
                return;
            };
            let s = &self.services[i];
            let expected = if r.share == BP_ALL { (r.to, 0) } else { (r.from, r.share) };
            if (s.active, s.canary_bp) != expected {
                let why = format!(
                    "{name} was changed outside the rollout: {} now, {} to {}",
                    s.active,
                    percent(s.canary_bp),
                    s.active.other()
                );
                tracing::warn!(service = %name, "rollout interrupted: {why}");
                ev.changes.push(Change {
                    service: name.into(),
                    what: "rollout-interrupted".into(),
                    from: r.to.to_string(),
                    to: why.clone(),
                });
                self.end_rollout(name, End::Interrupted, Some(why));
                return;
            }
            if r.hook.is_some() {
                return;
            }
            let Some(op) = r.ops.get(r.at).copied() else {
                self.complete_rollout(name, now, ev);
                return;
            };
            match op {
                Op::Hook(point) => {
                    if r.paused {
                        return;
                    }
                    match self.hook_run(name, point, r.from, r.to, None) {
                        None => self.next_op(name, now),
                        Some(h) => {
                            tracing::info!(service = %name, hook = %point, "running hook");
                            if let Some(r) = self.rollouts.by_service.get_mut(name) {
                                r.hook = Some(h.token);
                                r.step_started = now;
                            }
                            ev.hooks.push(h);
                            return;
                        }
                    }
                }
                Op::Share(bp) => {
                    if r.paused {
                        return;
                    }
                    match self.ask(name, Ask::Weight(r.to, bp), None, r.force) {
                        Ok((_, change)) => {
                            tracing::info!(service = %name, to = %r.to, share = %percent(bp), "rollout step");
                            ev.changes.extend(change.map(|c| Change { what: format!("rollout-{}", c.what), ..c }));
                            if let Some(r) = self.rollouts.by_service.get_mut(name) {
                                r.share = bp;
                            }
                            self.next_op(name, now);
                        }
                        Err(e) => {
                            self.abort_rollout(name, format!("the {} step was refused: {e}", Step::Share(bp)), ev);
                            return;
                        }
                    }
                }
                Op::Pause(d) => {
                    let id = s.id;
                    let read = |b: &Self, c| b.maps.counters(id, c).ok();
                    let (Some(old), Some(new)) = (read(self, r.from), read(self, r.to)) else { return };
                    let Some([old0, new0]) = r.baseline else {
                        if let Some(r) = self.rollouts.by_service.get_mut(name) {
                            r.baseline = Some([old, new]);
                        }
                        return;
                    };
                    let cfg = &s.config.rollout;
                    let t = Thresholds { min_flows: cfg.min_flows, min_reply_ratio_pct: cfg.min_reply_ratio_pct };
                    let j = judge(
                        t,
                        (r.from, Window::between(old0, old)),
                        (r.to, Window::between(new0, new)),
                        s.healthy(r.to),
                        s.config.mode == Mode::Nat,
                    );
                    let over = now.saturating_duration_since(r.step_started) >= d;
                    let text = if r.is_drill() {
                        drill_report(
                            (r.from, Window::between(old0, old)),
                            (r.to, Window::between(new0, new)),
                            &j,
                            s.config.mode == Mode::Nat,
                        )
                    } else {
                        j.to_string()
                    };
                    if let Some(r) = self.rollouts.by_service.get_mut(name) {
                        r.judgement = Some(text.clone());
                    }
                    if r.is_drill() {
                        // A drill ends at its time whatever the judgement; a failing standby
                        // ends it at once.
                        if let Judgement::Fail(_) = j {
                            self.abort_rollout(name, format!("the standby failed during the drill: {text}"), ev);
                            return;
                        }
                        if over {
                            self.next_op(name, now);
                            continue;
                        }
                        return;
                    }
                    match j {
                        Judgement::Fail(why) => {
                            self.abort_rollout(name, why, ev);
                            return;
                        }
                        Judgement::Pass(_) if over && !r.paused => {
                            tracing::info!(service = %name, step = r.at + 1, "judged: {text}");
                            ev.changes.push(Change {
                                service: name.into(),
                                what: "rollout-judged".into(),
                                from: op.to_string(),
                                to: text,
                            });
                            self.next_op(name, now);
                        }
                        Judgement::Inconclusive(_) if over => {
                            if !r.holding {
                                tracing::info!(service = %name, step = r.at + 1, "holding: {text}");
                            }
                            if let Some(r) = self.rollouts.by_service.get_mut(name) {
                                r.holding = true;
                            }
                            return;
                        }
                        _ => return,
                    }
                }
                Op::Watch(d) => {
                    if !s.healthy(r.to) {
                        let why = format!("{} failed during the watch: {}", r.to, s.why_unhealthy(r.to));
                        self.abort_rollout(name, why, ev);
                        return;
                    }
                    if r.paused || now.saturating_duration_since(r.step_started) < d {
                        return;
                    }
                    self.next_op(name, now);
                }
                Op::Back => {
                    self.send_back(name, &r, ev);
                    let report = r.judgement.clone().unwrap_or_else(|| "no traffic was measured".into());
                    tracing::info!(service = %name, from = %r.from, standby = %r.to, "drill over: {report}");
                    ev.changes.push(Change {
                        service: name.into(),
                        what: "drill-report".into(),
                        from: format!("{} {}", r.to, percent(r.share)),
                        to: format!("back on {}: {report}", r.from),
                    });
                    self.end_rollout(name, End::Complete, None);
                    return;
                }
            }
        }
    }

    /// Moves a rollout to its next op, and saves it.
    fn next_op(&mut self, name: &str, now: Instant) {
        if let Some(r) = self.rollouts.by_service.get_mut(name) {
            r.at += 1;
            r.step_started = now;
            r.baseline = None;
            r.holding = false;
        }
        self.save_rollout(name);
    }

    fn complete_rollout(&mut self, name: &str, now: Instant, ev: &mut RolloutEvents) {
        let Some(r) = self.rollouts.by_service.get(name).cloned() else { return };
        let keep = self.find(name).ok().and_then(|i| self.services[i].config.rollout.keep_previous);
        tracing::info!(service = %name, from = %r.from, to = %r.to, "rollout complete");
        ev.changes.push(Change {
            service: name.into(),
            what: "rollout-complete".into(),
            from: r.from.to_string(),
            to: r.to.to_string(),
        });
        self.end_rollout(name, End::Complete, None);
        if let Some(keep) = keep {
            self.rollouts.kept.insert(name.to_owned(), Kept { colour: r.from, until: now + keep });
            let record = Record {
                from: r.from,
                to: r.to,
                ops: Vec::new(),
                at: 0,
                paused: false,
                force: false,
                kept_until: Some(unix_now() + keep.as_secs()),
            };
            self.write_record(name, &record);
        }
    }

    /// Ends a rollout that failed or was stopped: new flows back on the old colour (a canary
    /// share of 0, or a rollback after 100 %), the on-abort hook, the reason kept for `status`.
    pub(super) fn abort_rollout(&mut self, name: &str, why: String, ev: &mut RolloutEvents) {
        let Some(r) = self.rollouts.by_service.get(name).cloned() else { return };
        self.send_back(name, &r, ev);
        let (what, kind) = if r.is_drill() { ("drill-abort", "drill") } else { ("rollout-abort", "rollout") };
        tracing::warn!(service = %name, from = %r.from, to = %r.to, step = r.at + 1, "{kind} aborted: {why}");
        ev.changes.push(Change {
            service: name.into(),
            what: what.into(),
            from: format!("{} {}", r.to, percent(r.share)),
            to: format!("{}: {why}", r.from),
        });
        if let Some(h) = self.hook_run(name, HookPoint::OnAbort, r.from, r.to, Some(&why)).filter(|_| !r.is_drill()) {
            ev.hooks.push(h);
        }
        self.end_rollout(name, End::Aborted, Some(why));
    }

    /// New flows back on the old colour of `r`: a canary share of 0, or a rollback after 100 %.
    fn send_back(&mut self, name: &str, r: &Rollout, ev: &mut RolloutEvents) {
        let Ok(i) = self.find(name) else { return };
        let s = &self.services[i];
        let back = if s.active == r.to {
            Some(Ask::Rollback)
        } else if s.active == r.from && s.canary_bp > 0 {
            Some(Ask::Weight(r.from, BP_ALL))
        } else {
            None
        };
        if let Some(ask) = back {
            match self.ask(name, ask, None, true) {
                Ok((_, change)) => {
                    ev.changes.extend(change.map(|c| Change { what: format!("rollout-{}", c.what), ..c }))
                }
                Err(e) => {
                    tracing::error!(service = %name, "sending new flows back to {} failed: {e}", r.from)
                }
            }
        }
    }

    fn end_rollout(&mut self, name: &str, end: End, reason: Option<String>) {
        if let Some(r) = self.rollouts.by_service.get_mut(name) {
            r.end = end;
            // From now on `step_secs` counts the time since it ended (as a fleet record's).
            r.step_started = Instant::now();
            r.reason = reason;
            r.hook = None;
        }
        self.clear_record(name);
    }

    /// The hook of `point` for `name`, if one is configured, with its environment (the same
    /// as a fleet rollout's, [`Switchboard::fleet_hook`]).
    fn hook_run(
        &mut self,
        name: &str,
        point: HookPoint,
        from: Colour,
        to: Colour,
        why: Option<&str>,
    ) -> Option<HookRun> {
        let r = self.rollouts.by_service.get(name);
        let (step, steps, share) = (r.map_or(0, |r| r.at + 1), r.map_or(0, |r| r.ops.len()), r.map_or(0, |r| r.share));
        let run = self.fleet_hook(name, point, (from, to), step, steps, share, why, self.rollouts.hooks + 1)?;
        self.rollouts.hooks += 1;
        Some(run)
    }

    fn save_rollout(&self, name: &str) {
        let Some(r) = self.rollouts.by_service.get(name).filter(|r| r.end == End::Running) else { return };
        let record = Record {
            from: r.from,
            to: r.to,
            ops: r.ops.clone(),
            at: r.at,
            paused: r.paused,
            force: r.force,
            kept_until: None,
        };
        self.write_record(name, &record);
    }

    fn write_record(&self, name: &str, record: &Record) {
        let Some(store) = &self.rollouts.store else { return };
        if let Err(e) = store.save_rollout(name, &record.encode()) {
            tracing::error!(service = %name, dir = %store.rollouts_dir().display(), "save the rollout's progress: {e}; a restarted daemon would not resume it");
        }
    }

    fn clear_record(&self, name: &str) {
        if let Some(store) = &self.rollouts.store {
            store.clear_rollout(name);
        }
    }

    /// The rollouts (and drills) under way that give their new colour new flows, for the fast
    /// guard: `(service, from, to)`.
    pub(super) fn rollouts_under_way(&self) -> Vec<(String, Colour, Colour)> {
        let live = self.rollouts.by_service.iter().filter(|(_, r)| r.end == End::Running && r.share > 0);
        live.map(|(name, r)| (name.clone(), r.from, r.to)).collect()
    }

    /// A service's rollout and backup, as `status` shows them.
    pub(super) fn rollout_status(&self, name: &str) -> (Option<RolloutStatus>, Option<Backup>) {
        let now = Instant::now();
        let live = self.find(name).ok().map(|i| (self.services[i].active, self.services[i].canary_bp));
        let rollout = self.rollouts.by_service.get(name).map(|r| {
            let op = r.ops.get(r.at);
            let state = match r.end {
                End::Complete => "complete",
                End::Aborted => "aborted",
                End::Interrupted => "interrupted",
                End::Running if r.hook.is_some() => "hook",
                End::Running if r.paused => "paused",
                End::Running if r.holding => "holding",
                End::Running if matches!(op, Some(Op::Watch(_))) => "watching",
                End::Running => "running",
            };
            let mut status = RolloutStatus {
                from: r.from,
                to: r.to,
                state: state.into(),
                step: r.at + 1,
                steps: r.ops.iter().map(ToString::to_string).collect(),
                step_secs: now.saturating_duration_since(r.step_started).as_secs(),
                share_bp: r.share,
                judgement: r.judgement.clone(),
                reason: r.reason.clone(),
                drill: r.is_drill(),
                driver: None,
                judged_from: None,
            };
            // A completed rollout is history: say so if the service was switched since.
            if let Some((active, canary)) = live {
                status.switched_since(active, crate::protocol::share_of(active, canary, r.to));
            }
            status
        });
        let backup = self
            .rollouts
            .kept
            .get(name)
            .map(|k| Backup { colour: k.colour, secs_left: k.until.saturating_duration_since(now).as_secs() });
        (rollout, backup)
    }
}

mod fleet;

pub use self::fleet::Sample;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_longest_plan_fits_a_name() {
        let plan: Vec<String> = (1..=10).flat_map(|i| [format!("{}%", i * 10), "pause 168h".into()]).take(19).collect();
        let steps = steps::parse_plan(&plan).expect("20 steps");
        let mut config = RolloutConfig { watch: Some(steps::MAX_PAUSE), ..RolloutConfig::default() };
        for p in HookPoint::ALL {
            config.hooks.set(p, Some("true".into()));
        }
        let ops = compile(&steps, &config);
        let r =
            Record { from: Colour::Green, to: Colour::Blue, ops, at: 12, paused: true, force: true, kept_until: None };
        let text = r.encode();
        assert!(text.len() <= 255 && !text.contains('/'), "{} bytes: {text}", text.len());
        assert_eq!(Record::decode(&text), Some(r.clone()));
        let kept = Record { ops: Vec::new(), kept_until: Some(1_900_000_000), ..r };
        assert_eq!(Record::decode(&kept.encode()), Some(kept));
        assert_eq!(Record::decode("2~blue~green~0~0~0~0~s100"), None, "another version");
        assert_eq!(Record::decode("1~blue~green~0~0~0~0~x1"), None);
    }
}
