//! The data path's own signals, judged: what a rollout learns from its two colours' TCP
//! handshakes, resets, ICMP unreachables and SYN latency (NAT), or SYN retransmissions and
//! client resets (DSR), with no monitoring outside the node.
//!
//! Two uses, both comparing the new colour with the old one over the same window:
//!
//! - [`judge`], called by a pause's judgement ([`super::rollout::judge`]): a failure ratio
//!   (resets, unreachables and unanswered SYNs per new TCP flow) and the 90th-percentile
//!   SYN → SYN-ACK latency from the coarse histogram;
//! - the fast guard ([`Guard`], [`Switchboard::guard_rollouts`]): while a rollout, drill or
//!   watch gives the new colour new flows, the agent samples that service's two colours every
//!   ~100 ms and aborts the rollout when, over the last 100 to 300 ms, nearly all of the new
//!   colour's new flows were refused or reset, or its SYNs have gone unanswered for longer than
//!   [`UNANSWERED_AFTER`] while the old colour answers. Only NAT TCP services: in DSR mode
//!   the backends' answers are not seen (a client's retransmission comes a second later at the
//!   soonest), and UDP has no handshake; both are left to the health checks and the pauses'
//!   judgement.
//!
//! SYNs in flight are allowed for: the window judgement compares ratios, which the SYNs of
//! the last round trip weigh on alike for both colours; the fast guard counts only SYNs sent
//! at least [`UNANSWERED_AFTER`] before its last sample as unanswered.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use switcher_common::user::Colour;

use super::{Maps, Switchboard, rollout::Judgement};
use crate::{config::Mode, dataplane::Counters};

/// Upper bounds of the SYN latency buckets but the last (`switcher_common::SYN_LATENCY_BOUNDS_NS`).
pub const LATENCY_BOUNDS: [Duration; 4] =
    [Duration::from_micros(100), Duration::from_millis(1), Duration::from_millis(10), Duration::from_millis(100)];

/// A new colour fails a window when its failure ratio is at least this (per mille)…
pub const MIN_FAILURE_PERMILLE: u64 = 50;
/// …and, when the old colour has enough flows to compare with, more than twice the old
/// colour's plus this (per mille); without a baseline, at least [`ALONE_FAILURE_PERMILLE`].
pub const FAILURE_MARGIN_PERMILLE: u64 = 20;
pub const ALONE_FAILURE_PERMILLE: u64 = 500;
/// The new colour's 90th-percentile SYN latency fails when it is this many buckets (each
/// ×10) above the old colour's, with enough handshakes on both.
pub const LATENCY_BUCKETS_WORSE: usize = 2;

/// The fast guard's sampling period, window and "nearly all" (per mille).
pub const GUARD_EVERY: Duration = Duration::from_millis(100);
pub const GUARD_WINDOW: Duration = Duration::from_millis(300);
pub const GUARD_FAILED_PERMILLE: u64 = 900;
/// New flows of the new colour the fast guard needs in its window before it acts.
pub const GUARD_MIN_FLOWS: u64 = 5;
/// A SYN without an answer this long is unanswered, for the fast guard.
pub const UNANSWERED_AFTER: Duration = Duration::from_millis(200);
/// The old colour "answers" unless at least this share (per mille) of its SYNs went
/// unanswered (or refused) too: then the trouble is the clients' or the network's.
pub const OLD_FAILING_PERMILLE: u64 = 500;

/// One colour's signals over a window: the counters' differences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    pub syns: u64,
    pub handshakes: u64,
    pub refused: u64,
    pub backend_resets: u64,
    pub unreachables: u64,
    pub retransmits: u64,
    pub client_resets: u64,
    pub latency: [u64; 5],
}

impl Signals {
    /// The signals between two readings of a colour's counters.
    #[must_use]
    pub fn between(then: &Counters, now: &Counters) -> Signals {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let mut latency = [0; 5];
        for (i, l) in latency.iter_mut().enumerate() {
            *l = d(then.syn_latency[i], now.syn_latency[i]);
        }
        Signals {
            syns: d(then.syns, now.syns),
            handshakes: d(then.handshakes, now.handshakes),
            refused: d(then.refused, now.refused),
            backend_resets: d(then.backend_resets, now.backend_resets),
            unreachables: d(then.icmp_unreachables, now.icmp_unreachables),
            retransmits: d(then.syn_retransmits, now.syn_retransmits),
            client_resets: d(then.client_resets, now.client_resets),
            latency,
        }
    }

    /// SYNs with no answer (no SYN-ACK, RST or unreachable) yet.
    #[must_use]
    pub fn unanswered(&self) -> u64 {
        self.syns.saturating_sub(self.handshakes + self.refused)
    }

    /// NAT: new TCP flows that failed: refused, unanswered, or reset (or unreachable) after
    /// their handshake. Each flow counts once.
    #[must_use]
    pub fn failed_nat(&self) -> u64 {
        let after_handshake = (self.backend_resets + self.unreachables).saturating_sub(self.refused);
        self.refused + self.unanswered() + after_handshake.min(self.handshakes)
    }

    /// DSR: what the clients say: SYNs sent again, connections they reset.
    #[must_use]
    pub fn failed_dsr(&self) -> u64 {
        self.retransmits + self.client_resets
    }

    /// The bucket holding the `permille` ‰ quantile of the SYN latency, if any handshake.
    #[must_use]
    pub fn latency_bucket(&self, permille: u64) -> Option<usize> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen * 1_000 >= total * permille {
                return Some(i);
            }
        }
        Some(self.latency.len() - 1)
    }
}

/// A latency bucket in words: "< 1 ms", "≥ 100 ms".
#[must_use]
pub fn bucket_words(b: usize) -> String {
    match LATENCY_BOUNDS.get(b) {
        Some(d) => format!("< {}", words(*d)),
        None => format!("≥ {}", words(LATENCY_BOUNDS[LATENCY_BOUNDS.len() - 1])),
    }
}

fn words(d: Duration) -> String {
    if d < Duration::from_millis(1) { format!("{} ms", d.as_secs_f64() * 1e3) } else { format!("{} ms", d.as_millis()) }
}

fn permille(part: u64, whole: u64) -> u64 {
    part.saturating_mul(1_000).checked_div(whole).unwrap_or(0)
}

fn pct(pm: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a per mille shown as a percentage")]
    let p = pm as f64 / 10.0;
    format!("{p:.1}%")
}

/// Judges a window by the signals: `Some(Fail)` when the new colour `to` does clearly worse
/// than the old colour `from`; `None` when the signals have nothing against it (too few new
/// TCP flows, a UDP service, or as well as the old colour), for the rest of the judgement.
/// `nat`: replies are seen (NAT mode), else DSR's client-side signals are used.
#[must_use]
pub fn judge(
    min_flows: u64,
    (from, old): (Colour, &Signals),
    (to, new): (Colour, &Signals),
    nat: bool,
) -> Option<Judgement> {
    let min_flows = min_flows.max(1);
    if new.syns < min_flows {
        return None;
    }
    let failed = |s: &Signals| if nat { s.failed_nat() } else { s.failed_dsr() };
    let (new_pm, old_pm) = (permille(failed(new), new.syns), permille(failed(old), old.syns));
    let what = if nat {
        format!(
            "{} of {} new TCP flows failed ({} refused, {} unanswered, {} reset by backends, {} ICMP unreachables)",
            failed(new),
            new.syns,
            new.refused,
            new.unanswered(),
            new.backend_resets,
            new.unreachables
        )
    } else {
        format!(
            "{} of {} new TCP flows failed (DSR: {} SYN retransmissions, {} client resets)",
            failed(new),
            new.syns,
            new.retransmits,
            new.client_resets
        )
    };
    let baseline = old.syns >= min_flows;
    if new_pm >= MIN_FAILURE_PERMILLE {
        if baseline && new_pm > 2 * old_pm + FAILURE_MARGIN_PERMILLE {
            return Some(Judgement::Fail(format!(
                "{to}: {what}, {} against {}'s {} over the same window",
                pct(new_pm),
                from,
                pct(old_pm)
            )));
        }
        if !baseline && new_pm >= ALONE_FAILURE_PERMILLE {
            return Some(Judgement::Fail(format!(
                "{to}: {what}, {} ({from} took too few new flows to compare with)",
                pct(new_pm)
            )));
        }
    }
    // The histogram holds the timed SYNs only (all at low rates, a sample at high ones:
    // `switcher_common::syn_timed`), so its own totals decide whether there is enough of it.
    if nat
        && new.latency.iter().sum::<u64>() >= min_flows
        && old.latency.iter().sum::<u64>() >= min_flows
        && let (Some(n), Some(o)) = (new.latency_bucket(900), old.latency_bucket(900))
        && n >= o + LATENCY_BUCKETS_WORSE
    {
        return Some(Judgement::Fail(format!(
            "{to}: 90% of SYNs answered in {}, {from}'s in {} ({} and {} handshakes)",
            bucket_words(n),
            bucket_words(o),
            new.handshakes,
            old.handshakes
        )));
    }
    None
}

/// One sample of the fast guard: the two colours' counters, `[from, to]`.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub counters: [Counters; 2],
}

/// The fast guard's verdict on a service's samples (oldest first): why the new colour (`to`,
/// `counters[1]`) must lose its new flows now, or `None`.
#[must_use]
pub fn fast_verdict(samples: &VecDeque<Sample>, (from, to): (Colour, Colour)) -> Option<String> {
    let last = samples.back()?;
    // The newest sample at least `age` old, else the oldest.
    let at_least = |age: Duration| {
        samples.iter().rev().find(|s| last.at.saturating_duration_since(s.at) >= age).or_else(|| samples.front())
    };
    // Refused or reset: answered flows over the last 100, 200, … ms, up to the window (the
    // shortest span first: a colour that served until a moment ago still acts at once).
    for first in samples.iter().rev().skip(1) {
        let span = last.at.saturating_duration_since(first.at);
        let new = Signals::between(&first.counters[1], &last.counters[1]);
        let old = Signals::between(&first.counters[0], &last.counters[0]);
        let bad = |s: &Signals| {
            let after = (s.backend_resets + s.unreachables).saturating_sub(s.refused).min(s.handshakes);
            (s.refused + after, s.handshakes + s.refused)
        };
        let (failed, answered) = bad(&new);
        let (old_failed, old_answered) = bad(&old);
        let old_fails = old_answered >= GUARD_MIN_FLOWS && permille(old_failed, old_answered) >= OLD_FAILING_PERMILLE;
        if failed >= GUARD_MIN_FLOWS && permille(failed, answered) >= GUARD_FAILED_PERMILLE && !old_fails {
            return Some(format!(
                "fast guard: {failed} of {answered} new TCP flows on {to} refused or reset in {} ms ({} resets, {} ICMP unreachables); {from} {}",
                span.as_millis(),
                new.backend_resets,
                new.unreachables,
                old_colour_did("new flows", old_answered - old_failed, old_answered)
            ));
        }
        if span >= GUARD_WINDOW {
            break;
        }
    }
    // Unanswered: SYNs sent in a window ending `UNANSWERED_AFTER` ago, without an answer now.
    let end = at_least(UNANSWERED_AFTER)?;
    if last.at.saturating_duration_since(end.at) < UNANSWERED_AFTER {
        return None;
    }
    let start = samples
        .iter()
        .rev()
        .find(|s| end.at.saturating_duration_since(s.at) >= GUARD_WINDOW)
        .or_else(|| samples.front())?;
    let outstanding = |i: usize| {
        let sent = end.counters[i].syns.saturating_sub(start.counters[i].syns);
        let answered = (last.counters[i].handshakes + last.counters[i].refused)
            .saturating_sub(start.counters[i].handshakes + start.counters[i].refused);
        (sent.saturating_sub(answered), sent)
    };
    let (new_out, new_sent) = outstanding(1);
    let (old_out, old_sent) = outstanding(0);
    let old_fails = old_sent >= GUARD_MIN_FLOWS && permille(old_out, old_sent) >= OLD_FAILING_PERMILLE;
    // A colour that went silent: its SYNs wait, and it has answered none since they were sent.
    // (The share of unanswered SYNs alone is slow to move when the window still holds the
    // SYNs it answered before it died, and clients with a fixed number of connections send
    // nothing new until their retransmission, a second later.)
    let answered_since = |i: usize| {
        (last.counters[i].handshakes + last.counters[i].refused)
            .saturating_sub(end.counters[i].handshakes + end.counters[i].refused)
    };
    if new_out < GUARD_MIN_FLOWS || old_fails {
        return None;
    }
    let waited = last.at.saturating_duration_since(end.at).as_millis();
    let old = old_colour_did("new SYNs", old_sent - old_out, old_sent);
    if answered_since(1) == 0 {
        return Some(format!(
            "fast guard: {new_out} SYNs to {to} unanswered for {waited} ms, and {to} answered none since; {from} {old}"
        ));
    }
    if permille(new_out, new_sent) >= GUARD_FAILED_PERMILLE {
        return Some(format!(
            "fast guard: {new_out} of {new_sent} SYNs to {to} unanswered after {waited} ms; {from} {old}"
        ));
    }
    None
}

/// What the old colour did meanwhile, for a fast guard's reason: "answered 9 of 10", or "took
/// no new SYNs" (`what`) when it had none to answer.
fn old_colour_did(what: &str, answered: u64, of: u64) -> String {
    if of == 0 { format!("took no {what}") } else { format!("answered {answered} of {of}") }
}

/// The fast guard's samples, by service; only services whose rollout is under way have any.
#[derive(Debug, Default)]
pub struct Guard {
    samples: HashMap<String, VecDeque<Sample>>,
}

/// Samples kept per service: a second's worth.
const KEEP: Duration = Duration::from_secs(1);

impl<M: Maps> Switchboard<M> {
    /// The fast guard's round (every [`GUARD_EVERY`] while [`Switchboard::guarding`]): samples
    /// the two colours of each NAT TCP service whose rollout gives the new colour new flows,
    /// and aborts those [`fast_verdict`] condemns, as a failing judgement does.
    pub fn guard_rollouts(&mut self) -> super::RolloutEvents {
        self.guard_rollouts_at(Instant::now())
    }

    pub(super) fn guard_rollouts_at(&mut self, now: Instant) -> super::RolloutEvents {
        let mut ev = super::RolloutEvents::default();
        let under_way = self.guarded();
        self.guard.samples.retain(|name, _| under_way.iter().any(|(n, ..)| n == name));
        for (name, id, from, to) in under_way {
            let (Ok(old), Ok(new)) = (self.maps.counters(id, from), self.maps.counters(id, to)) else { continue };
            let samples = self.guard.samples.entry(name.clone()).or_default();
            // A sample from another pair of colours (a new rollout) is no baseline.
            samples.push_back(Sample { at: now, counters: [old, new] });
            while samples.front().is_some_and(|s| now.saturating_duration_since(s.at) > KEEP) {
                samples.pop_front();
            }
            if let Some(why) = fast_verdict(samples, (from, to)) {
                self.guard.samples.remove(&name);
                self.abort_rollout(&name, why, &mut ev);
            }
        }
        ev
    }

    /// Whether the fast guard has work: a NAT TCP service's rollout (or drill, or watch)
    /// gives its new colour new flows.
    #[must_use]
    pub fn guarding(&self) -> bool {
        !self.guarded().is_empty()
    }

    /// The services the fast guard watches: `(name, id, from, to)`.
    fn guarded(&self) -> Vec<(String, u32, Colour, Colour)> {
        self.rollouts_under_way()
            .into_iter()
            .filter_map(|(name, from, to)| {
                let s = self.services.iter().find(|s| s.config.name == name)?;
                let tcp = s.config.protocol == crate::config::Protocol::Tcp;
                (tcp && s.config.mode == Mode::Nat).then_some((name, s.id, from, to))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use switcher_common::user::Colour::{Blue, Green};

    use super::*;

    fn sig(syns: u64, handshakes: u64, refused: u64, resets: u64) -> Signals {
        Signals {
            syns,
            handshakes,
            refused,
            backend_resets: resets,
            latency: [handshakes, 0, 0, 0, 0],
            ..Signals::default()
        }
    }

    #[test]
    fn failures_count_each_flow_once() {
        // 10 SYNs: 6 handshakes (1 later reset), 2 refused by RST, 2 unanswered.
        let s = Signals { unreachables: 0, ..sig(10, 6, 2, 3) };
        assert_eq!(s.unanswered(), 2);
        assert_eq!(s.failed_nat(), 2 + 2 + 1);
        // More SYN-ACKs than SYNs (retransmissions, counters read mid-way): nothing negative.
        assert_eq!(sig(3, 5, 0, 0).failed_nat(), 0);
    }

    #[test]
    fn the_window_judgement_compares_with_the_old_colour() {
        let j = |old: Signals, new: Signals| judge(20, (Blue, &old), (Green, &new), true);
        // Too few new flows: nothing to say.
        assert_eq!(j(sig(100, 100, 0, 0), sig(19, 0, 19, 19)), None);
        // Green refuses everything.
        let fail = j(sig(100, 100, 0, 0), sig(30, 0, 30, 30));
        assert!(
            matches!(&fail, Some(Judgement::Fail(w)) if w.contains("30 of 30") && w.contains("30 refused")),
            "{fail:?}"
        );
        // Green never answers.
        assert!(
            matches!(j(sig(100, 100, 0, 0), sig(30, 0, 0, 0)), Some(Judgement::Fail(w)) if w.contains("30 unanswered"))
        );
        // Both colours lose a few alike: no fail.
        assert_eq!(j(sig(100, 90, 10, 10), sig(30, 27, 3, 3)), None);
        // Green 10 %, blue 1 %: fail (more than twice plus 2 %).
        assert!(j(sig(100, 99, 1, 1), sig(100, 90, 10, 10)).is_some());
        // Green 4 %: under the floor, whatever blue does.
        assert_eq!(j(sig(100, 100, 0, 0), sig(100, 96, 4, 4)), None);
        // No baseline (blue took no flows, e.g. a watch at 100 %): only a majority fails.
        assert_eq!(j(Signals::default(), sig(100, 80, 20, 20)), None);
        assert!(j(Signals::default(), sig(100, 40, 60, 60)).is_some());
    }

    #[test]
    fn latency_quantiles_come_from_the_histogram() {
        let mut green = sig(100, 100, 0, 0);
        green.latency = [0, 5, 5, 90, 0];
        assert_eq!(green.latency_bucket(900), Some(3));
        assert_eq!(green.latency_bucket(50), Some(1));
        assert_eq!(bucket_words(3), "< 100 ms");
        assert_eq!(bucket_words(4), "≥ 100 ms");
        assert_eq!(bucket_words(0), "< 0.1 ms");
        let blue = sig(100, 100, 0, 0);
        let fail = judge(20, (Blue, &blue), (Green, &green), true);
        assert!(
            matches!(&fail, Some(Judgement::Fail(w)) if w.contains("< 100 ms") && w.contains("< 0.1 ms")),
            "{fail:?}"
        );
        green.latency = [0, 100, 0, 0, 0];
        assert_eq!(judge(20, (Blue, &blue), (Green, &green), true), None, "one bucket worse is within reason");
        // At high rates the histogram is a sample: too few timed SYNs decide nothing, however
        // many handshakes there were.
        green.latency = [0, 0, 0, 19, 0];
        assert_eq!(judge(20, (Blue, &blue), (Green, &green), true), None, "19 timed SYNs of 100 handshakes");
        green.latency = [0, 0, 0, 20, 0];
        assert!(judge(20, (Blue, &blue), (Green, &green), true).is_some(), "20 timed SYNs suffice");
    }

    #[test]
    fn dsr_is_judged_by_the_clients_retransmissions_and_resets() {
        let flows = |syns, retransmits| Signals { syns, retransmits, ..Signals::default() };
        assert_eq!(judge(20, (Blue, &flows(100, 1)), (Green, &flows(40, 1)), false), None);
        let fail = judge(20, (Blue, &flows(100, 1)), (Green, &flows(40, 30)), false);
        assert!(matches!(&fail, Some(Judgement::Fail(w)) if w.contains("30 SYN retransmissions")), "{fail:?}");
    }

    fn counters(syns: u64, handshakes: u64, refused: u64) -> Counters {
        Counters { syns, handshakes, refused, backend_resets: refused, ..Counters::default() }
    }

    fn run(steps: &[(u64, Counters, Counters)]) -> Option<String> {
        let t0 = Instant::now();
        let samples: VecDeque<Sample> = steps
            .iter()
            .map(|(ms, old, new)| Sample { at: t0 + Duration::from_millis(*ms), counters: [*old, *new] })
            .collect();
        fast_verdict(&samples, (Blue, Green))
    }

    #[test]
    fn the_fast_guard_acts_on_refusals_within_its_window() {
        let blue = |n| counters(n, n, 0);
        // Green refuses 6 of 6 in 200 ms while blue answers.
        let v = run(&[
            (0, blue(0), counters(0, 0, 0)),
            (100, blue(20), counters(3, 0, 3)),
            (200, blue(40), counters(6, 0, 6)),
        ]);
        assert!(v.as_deref().is_some_and(|w| w.contains("6 of 6") && w.contains("refused")), "{v:?}");
        // Green served until a moment ago: the last 100 ms alone decide.
        let v = run(&[
            (0, blue(0), counters(20, 20, 0)),
            (100, blue(10), counters(40, 40, 0)),
            (200, blue(20), counters(46, 40, 6)),
        ]);
        assert!(v.as_deref().is_some_and(|w| w.contains("6 of 6") && w.contains("in 100 ms")), "{v:?}");
        // Too few to act on.
        assert_eq!(run(&[(0, blue(0), counters(0, 0, 0)), (100, blue(20), counters(4, 0, 4))]), None);
        // A few refusals among many handshakes: no.
        assert_eq!(run(&[(0, blue(0), counters(0, 0, 0)), (300, blue(40), counters(60, 54, 6))]), None);
        // Blue refuses as much (the clients' doing): no.
        assert_eq!(
            run(&[(0, counters(0, 0, 0), counters(0, 0, 0)), (300, counters(20, 0, 20), counters(8, 0, 8))]),
            None
        );
        // Refusals older than the window do not count again.
        let old = counters(6, 0, 6);
        assert_eq!(run(&[(0, blue(0), old), (400, blue(40), old), (700, blue(80), counters(8, 2, 6))]), None);
    }

    #[test]
    fn the_guard_aborts_a_rollout_between_ticks_and_only_while_one_is_under_way() {
        use crate::protocol::Request;
        let mut b = crate::engine::tests::board();
        assert!(!b.guarding(), "nothing under way");
        let steps = Some(vec!["50%".to_owned(), "pause 60s".to_owned(), "100%".to_owned()]);
        let (r, _) = b.handle(Request::Rollout { service: "web".into(), colour: Green, steps, force: false });
        assert!(r.ok, "{r:?}");
        assert!(!b.guarding(), "no share for green before the first tick");
        let t0 = Instant::now();
        b.tick_rollouts_at(t0);
        assert!(b.guarding());
        let set = |b: &mut Switchboard<crate::engine::tests::FakeMaps>, c, v| {
            b.maps.counters.insert((0, c), v);
        };
        set(&mut b, Blue, counters(0, 0, 0));
        set(&mut b, Green, counters(0, 0, 0));
        assert!(b.guard_rollouts_at(t0).changes.is_empty());
        set(&mut b, Blue, counters(10, 10, 0));
        set(&mut b, Green, counters(10, 0, 10));
        let ev = b.guard_rollouts_at(t0 + Duration::from_millis(100));
        let abort = ev.changes.iter().find(|c| c.what == "rollout-abort").expect("aborted, audited");
        assert!(abort.to.contains("fast guard: 10 of 10"), "{abort:?}");
        let s = &b.services[0];
        assert_eq!((s.active, s.canary_bp), (Blue, 0), "new flows back on blue");
        let status = b.rollout_status("web").0.expect("status");
        assert_eq!(status.state, "aborted");
        assert!(status.reason.is_some_and(|r| r.contains("fast guard")));
        assert!(!b.guarding(), "nothing left to guard");
    }

    #[test]
    fn the_fast_guard_acts_on_syns_unanswered_past_the_bound() {
        let blue = |n| counters(n, n, 0);
        let green = |syns| counters(syns, 0, 0);
        // Not yet past the bound: SYNs of the last 200 ms may be in flight.
        assert_eq!(run(&[(0, blue(0), green(0)), (100, blue(10), green(8))]), None);
        // 8 SYNs by 100 ms, none answered by 300 ms, blue answering all along.
        let v = run(&[
            (0, blue(0), green(0)),
            (100, blue(10), green(8)),
            (200, blue(20), green(12)),
            (300, blue(30), green(16)),
        ]);
        assert!(v.as_deref().is_some_and(|w| w.contains("8 SYNs to green unanswered")), "{v:?}");
        // A green that served, then went silent: the window still holds the SYNs it answered
        // (30 of 38), but the 8 sent since wait and it has answered none since they were sent.
        let served = counters(30, 30, 0);
        let v = run(&[
            (0, blue(0), counters(0, 0, 0)),
            (100, blue(10), served),
            (200, blue(20), counters(38, 30, 0)),
            (400, blue(40), counters(38, 30, 0)),
        ]);
        assert!(v.as_deref().is_some_and(|w| w.contains("answered none since")), "{v:?}");
        // Answered late but answered: no.
        let answered = counters(16, 8, 0);
        assert_eq!(run(&[(0, blue(0), green(0)), (100, blue(10), green(8)), (300, blue(30), answered)]), None);
        // Blue does not answer either: not green's fault.
        assert_eq!(run(&[(0, green(0), green(0)), (100, green(10), green(8)), (300, green(30), green(16))]), None);
    }
}
