//! What a fleet's rollout (`crate::fleet::rollout`) needs of this node's engine: its plan,
//! checked and compiled by the same rules as a rollout on one node; the two colours' counters
//! and health now, for [`judge`](super::judge); and a hook with its environment. The
//! progress itself lives in etcd, not here.

use std::time::Duration;

use switcher_common::{BP_ALL, user::Colour};

use super::{End, HookRun, Op, Switchboard, Thresholds, compile, drill_ops};
use crate::{
    config::Mode,
    dataplane::Counters,
    engine::Maps,
    protocol::percent,
    steps::{self, HookPoint},
};

/// The two colours of a rollout as this node sees them now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The counters of the old and the new colour: `[from, to]`.
    pub counters: [Counters; 2],
    /// The new colour has a healthy backend here.
    pub to_healthy: bool,
    /// NAT mode: the replies are seen (in DSR they are not).
    pub replies_seen: bool,
    pub thresholds: Thresholds,
}

impl<M: Maps> Switchboard<M> {
    /// The ops of a fleet rollout of `name` to `to`, from the fleet's desired state
    /// (`active`, `canary_bp`), checked as `switcher rollout` checks a rollout on one node:
    /// another colour, no canary under way, a healthy `to` (unless `force`), a valid plan.
    ///
    /// # Errors
    /// Why the rollout may not start, for the operator.
    pub fn plan_fleet_rollout(
        &self,
        name: &str,
        to: Colour,
        (active, canary_bp): (Colour, u32),
        plan: Option<&[String]>,
        force: bool,
    ) -> Result<Vec<Op>, String> {
        let i = self.find(name)?;
        if self.rollouts.by_service.get(name).is_some_and(|r| r.end == End::Running) {
            return Err(format!(
                "{name} has a rollout of this node only under way; `switcher rollout abort {name}` first"
            ));
        }
        if active == to {
            return Err(format!("the fleet's {name} is on {to} already: roll out the other colour"));
        }
        if canary_bp > 0 {
            return Err(format!(
                "the fleet's {name} sends {} of new flows to {} already: end that canary (`switcher cutover {name} {active}`) before a rollout",
                percent(canary_bp),
                active.other()
            ));
        }
        let s = &self.services[i];
        let steps = match plan {
            Some(texts) => steps::parse_plan(texts).map_err(|e| format!("--steps: {e}"))?,
            None => s.config.rollout.steps.clone(),
        };
        self.may_switch(i, to, false, force)?;
        Ok(compile(&steps, &s.config.rollout))
    }

    /// The ops of a fleet drill of `name`: `share` of new flows to the standby (the other
    /// colour than the fleet's `active`) for `secs`, then back; checked as `switcher drill`
    /// checks a drill on one node, the standby's health and drains as this node sees them.
    ///
    /// # Errors
    /// Why the drill may not start, for the operator.
    pub fn plan_fleet_drill(
        &self,
        name: &str,
        (active, canary_bp): (Colour, u32),
        secs: Duration,
        share: u32,
    ) -> Result<Vec<Op>, String> {
        let i = self.find(name)?;
        if self.rollouts.by_service.get(name).is_some_and(|r| r.end == End::Running) {
            return Err(format!(
                "refusing the drill: {name} has a rollout or drill of this node only under way; `switcher rollout abort {name}` first"
            ));
        }
        let s = &self.services[i];
        let to = active.other();
        if !s.healthy(to) {
            return Err(format!(
                "refusing the drill: the standby {to} of {name} is unhealthy on this node ({})",
                s.why_unhealthy(to)
            ));
        }
        if s.drain.is_some() {
            return Err(format!(
                "refusing the drill: {name}'s old colour is still draining on this node after a switch; try again when `switcher status {name}` shows no drain"
            ));
        }
        if canary_bp > 0 {
            return Err(format!(
                "refusing the drill: the fleet's {name} sends {} of new flows to {to} already; end that canary first (`switcher cutover {name} {active}`)",
                percent(canary_bp)
            ));
        }
        if share == 0 || share > BP_ALL || secs.is_zero() || secs > steps::MAX_PAUSE {
            return Err(format!(
                "a drill sends 0.01% to 100% of new flows to the standby for 1s to {}",
                steps::duration_words(steps::MAX_PAUSE)
            ));
        }
        Ok(drill_ops(share, secs))
    }

    /// How long the old colour of a completed rollout of `name` stays the backup
    /// (`keep_previous_secs`), if at all.
    #[must_use]
    pub fn keep_previous(&self, name: &str) -> Option<Duration> {
        self.find(name).ok().and_then(|i| self.services[i].config.rollout.keep_previous)
    }

    /// The counters and health of `from` and `to` of `name` now, and its thresholds.
    ///
    /// # Errors
    /// An unknown service, or counters that cannot be read.
    pub fn rollout_sample(&self, name: &str, from: Colour, to: Colour) -> Result<Sample, String> {
        let s = &self.services[self.find(name)?];
        let read = |c| self.maps.counters(s.id, c).map_err(|e| format!("reading {name}'s {c} counters: {e}"));
        let cfg = &s.config.rollout;
        Ok(Sample {
            counters: [read(from)?, read(to)?],
            to_healthy: s.healthy(to),
            replies_seen: s.config.mode == Mode::Nat,
            thresholds: Thresholds { min_flows: cfg.min_flows, min_reply_ratio_pct: cfg.min_reply_ratio_pct },
        })
    }

    /// Why `colour` of `name` is unhealthy here, backend by backend.
    #[must_use]
    pub fn why_unhealthy_here(&self, name: &str, colour: Colour) -> String {
        self.find(name).map_or_else(|e| e, |i| self.services[i].why_unhealthy(colour))
    }

    /// The hook of `point` for a rollout of `name` (a fleet's, or this node's), if one is
    /// configured here, with its environment (`step` is 1-based).
    #[expect(clippy::too_many_arguments, reason = "the hook's environment, field by field")]
    #[must_use]
    pub fn fleet_hook(
        &self,
        name: &str,
        point: HookPoint,
        (from, to): (Colour, Colour),
        step: usize,
        steps: usize,
        share_bp: u32,
        why: Option<&str>,
        token: u64,
    ) -> Option<HookRun> {
        let s = &self.services[self.find(name).ok()?];
        let command = s.config.rollout.hooks.command(point)?.to_owned();
        let mut env = vec![
            ("SWITCHER_SERVICE".to_owned(), name.to_owned()),
            ("SWITCHER_HOOK".to_owned(), point.to_string()),
            ("SWITCHER_FROM".to_owned(), from.to_string()),
            ("SWITCHER_TO".to_owned(), to.to_string()),
            ("SWITCHER_STEP".to_owned(), step.to_string()),
            ("SWITCHER_STEPS".to_owned(), steps.to_string()),
            ("SWITCHER_SHARE".to_owned(), percent(share_bp)),
            ("SWITCHER_VIP".to_owned(), s.config.vip.to_string()),
            ("SWITCHER_PORT".to_owned(), s.config.port.to_string()),
        ];
        if let Some(p) = s.config.preview_port {
            env.push(("SWITCHER_PREVIEW_PORT".to_owned(), p.to_string()));
        }
        if let Some(why) = why {
            env.push(("SWITCHER_REASON".to_owned(), why.to_owned()));
        }
        let timeout = s.config.rollout.hooks.timeout;
        Some(HookRun { service: name.to_owned(), point, command, env, timeout, token })
    }
}
