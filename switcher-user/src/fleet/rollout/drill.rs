//! A DR drill in a fleet: `switcher drill SERVICE` on any node is a fleet rollout of the
//! drill's ops (a share to the standby, a pause judged from the counters, the switch back:
//! [`drill_ops`](crate::engine::rollout::drill_ops)). Every node applies the share and the
//! switch back from the desired state, as for a rollout; the driver writes the report
//! ([`drill_report`]) into the record when the pause ends, and the switch back into the
//! desired state in the same transaction as the record's end, its `changed_by` carrying the
//! report so that every node's audit log has it. A standby that fails the judgement ends the
//! drill at once (new flows back, as an abort; no `on_abort` hook, as on one node).

use std::time::Duration;

use super::{Driver, FleetRollout, RUNNING, Store, advanced, driven, ended, read_desired, read_record, step};
use crate::{
    engine::{
        Change, Handle, Maps,
        rollout::{Judgement, Op, drill_report, judge},
    },
    fleet::{Fleet, now_unix},
    protocol::percent,
    steps,
};

/// A drill's plan ends with the switch back.
pub(super) fn is_drill(r: &FleetRollout) -> bool {
    r.ops.last().is_some_and(|t| Op::from_token(t) == Some(Op::Back))
}

impl Fleet {
    /// `switcher drill SERVICE` in a fleet: writes the drill's record (only if no rollout or
    /// drill is under way and no backup is kept, and only if the desired state is still the
    /// one the drill was checked against).
    pub(super) async fn start_drill<M: Maps + Send + 'static, S: Store>(
        &self,
        engine: &Handle<M>,
        store: &mut S,
        name: &str,
        secs: u64,
        share: u32,
        who: &str,
    ) -> Result<(String, Change), String> {
        let key = self.rollout_key(name);
        let current = read_record(store, &key).await?;
        if let Some((r, _)) = current.as_ref().filter(|(r, _)| driven(r)) {
            return Err(if r.state == RUNNING {
                let what = if is_drill(r) { "drill" } else { "rollout" };
                format!(
                    "refusing the drill: the fleet has a {what} of {name} under way ({} → {}, step {}/{}); see `switcher {what} status {name}`",
                    r.from,
                    r.to,
                    r.at + 1,
                    r.ops.len()
                )
            } else {
                format!(
                    "refusing the drill: {} of {name} is the fleet's backup after the last rollout for {}s more (`switcher rollback {name}` goes back to it); drill when `switcher status {name}` shows no backup",
                    r.from,
                    r.kept_until_unix.unwrap_or_default().saturating_sub(now_unix())
                )
            });
        }
        let rrev = current.map_or(0, |(_, rev)| rev);
        let dkey = self.service_key(name);
        let Some((desired, drev)) = read_desired(store, &dkey).await? else {
            return Err(format!(
                "{name} has no desired state in the fleet yet ({dkey}); wait until `switcher fleet status` shows it"
            ));
        };
        let (n, state, len) = (name.to_owned(), (desired.active, desired.canary_bp), Duration::from_secs(secs));
        let ops =
            engine.call(move |b| b.plan_fleet_drill(&n, state, len, share)).await.map_err(|e| e.to_string())??;
        let (from, to) = (desired.active, desired.active.other());
        let r = super::new_record((from, to), &ops, false, drev, format!("{} ({who})", self.config.node));
        let value = serde_json::to_string(&r).map_err(|e| e.to_string())?;
        let written = store.swap(&[(key.clone(), rrev), (dkey, drev)], vec![(key, value)]).await?;
        let Some(at) = written else {
            return Err(format!(
                "conflict: the fleet's {name} or its rollout changed while the drill was being started; nothing was written. Check `switcher status {name}` and run the command again"
            ));
        };
        let words = format!("{} of new flows to {to} for {}", percent(share), steps::duration_words(len));
        tracing::info!(service = %name, live = %from, standby = %to, revision = at, "fleet drill started: {words}");
        self.lock().rollouts.records.insert(name.to_owned(), (r, at));
        Ok((
            format!(
                "{name}: fleet drill started: {words} on every node, then back to {from}; one node drives it; follow it with `switcher drill status {name}` on any node, end it early with `switcher drill abort {name}`"
            ),
            Change { service: name.to_owned(), what: "fleet drill-start".into(), from: from.to_string(), to: words },
        ))
    }
}

impl Driver {
    /// A drill's pause, on the driver: judged like a rollout's pause, the report written into
    /// the record when the time is over (a drill ends at its time whatever the judgement, but a
    /// failing standby ends it at once).
    #[expect(clippy::too_many_arguments, reason = "a session's parts")]
    pub(super) async fn drill_pause<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
        record: &impl Fn(&str, &Change),
        name: &str,
        (r, rev): (&FleetRollout, i64),
        len: Duration,
    ) -> Result<Option<(FleetRollout, i64)>, String> {
        let Some(judged) = self.judged(fleet, engine, client, name, r).await? else { return Ok(None) };
        let j = judge(
            judged.thresholds,
            (r.from, judged.windows[0]),
            (r.to, judged.windows[1]),
            judged.to_healthy,
            judged.replies_seen,
        );
        let report = drill_report((r.from, judged.windows[0]), (r.to, judged.windows[1]), &j, judged.replies_seen);
        let over = self.driving.get(name).is_some_and(|d| d.since.elapsed() >= len);
        if let Judgement::Fail(_) = j {
            let why = format!("the standby failed during the drill: {report}");
            return self.abort(fleet, engine, client, record, name, r, rev, why).await;
        }
        if !over {
            return Ok(None);
        }
        let me = fleet.config.node.clone();
        let mut next = advanced(r, &me, Some(report), now_unix());
        next.judged_from = Some(judged.from);
        Ok(step(client, (&fleet.rollout_key(name), rev), &next, None).await?.map(|at| (next, at)))
    }

    /// The end of a drill: new flows back on the live colour in the desired state, in the same
    /// transaction as the record's end with the report.
    #[expect(clippy::too_many_arguments, reason = "a session's parts")]
    pub(super) async fn back<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
        record: &impl Fn(&str, &Change),
        name: &str,
        r: &FleetRollout,
        rev: i64,
    ) -> Result<Option<(FleetRollout, i64)>, String> {
        let me = fleet.config.node.clone();
        let (key, dkey) = (fleet.rollout_key(name), fleet.service_key(name));
        let Some((cur, drev)) = read_desired(client, &dkey).await? else {
            let why = format!("{dkey} is gone from etcd");
            return self.abort(fleet, engine, client, record, name, r, rev, why).await;
        };
        let report = r.judgement.clone().unwrap_or_else(|| "no traffic was measured".into());
        let now = now_unix();
        let mut next = ended(&advanced(r, &me, Some(report.clone()), now), super::COMPLETE, None, &me, now);
        next.share_bp = 0;
        next.desired_revision = drev;
        let by = format!("{me} (drill of {name} over: {report})");
        let written =
            super::end_and_send_back(fleet, engine, client, name, r, (&key, rev), &next, (&cur, drev), by).await?;
        if written.is_some() {
            tracing::info!(service = %name, from = %r.from, standby = %r.to, "fleet drill over: {report}");
            record(
                "rollout",
                &Change {
                    service: name.into(),
                    what: "drill-report".into(),
                    from: format!("{} {}", r.to, percent(r.share_bp)),
                    to: format!("back on {} (fleet): {report}", r.from),
                },
            );
        }
        Ok(written.map(|at| (next, at)))
    }
}

#[cfg(test)]
mod tests {
    use switcher_common::BP_ALL;

    use super::{super::tests::*, *};
    use crate::protocol::{Colour, Desired};

    #[tokio::test]
    async fn a_fleet_drill_shares_to_the_standby_judges_and_switches_back_with_its_report() {
        let engine = Handle::start(crate::engine::tests::board()).expect("engine");
        let f = fleet();
        let mut store = FakeStore::default();
        let start =
            async |store: &mut FakeStore, name: &str| f.start_drill(&engine, store, name, 1, BP_ALL, "uid=0").await;
        let e = start(&mut store, "web").await.expect_err("no desired state yet");
        assert!(e.contains("no desired state"), "{e}");
        store.put("/sw/services/solo", serde_json::to_string(&Desired::of(Colour::Blue)).expect("json"));
        let e = start(&mut store, "solo").await.expect_err("solo has no green backend");
        assert!(e.contains("refusing the drill: the standby green of solo is unhealthy on this node"), "{e}");
        store.put(DESIRED, serde_json::to_string(&Desired::of(Colour::Blue)).expect("json"));
        // Something under way: a rollout running, or a backup kept.
        store.put(KEY, serde_json::to_string(&rollout(&["10%", "100%"])).expect("json"));
        let e = start(&mut store, "web").await.expect_err("a rollout under way");
        assert!(e.contains("refusing the drill: the fleet has a rollout of web under way"), "{e}");
        let mut kept = ended(&rollout(&["100%"]), super::super::COMPLETE, None, "lb0", now_unix());
        kept.kept_until_unix = Some(now_unix() + 100);
        store.put(KEY, serde_json::to_string(&kept).expect("json"));
        let e = start(&mut store, "web").await.expect_err("a backup kept");
        assert!(e.contains("is the fleet's backup after the last rollout"), "{e}");
        kept.backup_end = Some("released".into());
        store.put(KEY, serde_json::to_string(&kept).expect("json"));

        let (msg, change) = start(&mut store, "web").await.expect("started");
        assert!(msg.contains("fleet drill started: 100% of new flows to green for 1s on every node"), "{msg}");
        assert_eq!(change.what, "fleet drill-start");
        let r = store.record(KEY);
        assert_eq!(
            (r.ops.as_slice(), r.from, r.to),
            (["s10000", "p1", "b"].map(String::from).as_slice(), Colour::Blue, Colour::Green)
        );
        assert!(is_drill(&r) && super::super::status_of(&r, None, now_unix()).drill);
        let e = start(&mut store, "web").await.expect_err("one at a time");
        assert!(e.contains("the fleet has a drill of web under way"), "{e}");

        // The driver: the share (a cut-over to green in the desired state), the pause, the
        // report, and the switch back (a rollback to blue) in the record's last write.
        let mut d = Driver::new(7);
        let changes = std::sync::Mutex::new(Vec::new());
        let log = |_: &str, c: &Change| changes.lock().expect("log").push(c.clone());
        let rev = store.kvs[KEY].1;
        d.drive(&f, &engine, &mut store, &log, "web", r, rev).await.expect("drive");
        let at_pause = store.record(KEY);
        assert_eq!((at_pause.at, at_pause.share_bp), (1, BP_ALL));
        let desired: Desired = serde_json::from_str(&store.kvs[DESIRED].0).expect("desired");
        assert_eq!(desired.active, Colour::Green, "every node sends new flows to the standby");
        f.lock().desired.insert("web".into(), (desired, store.kvs[DESIRED].1));
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        let rev = store.kvs[KEY].1;
        d.drive(&f, &engine, &mut store, &log, "web", at_pause, rev).await.expect("drive");
        let done = store.record(KEY);
        assert_eq!(done.state, super::super::COMPLETE, "{done:?}");
        let report = done.judgement.clone().expect("a report");
        assert!(report.starts_with("green took 0 new flows"), "{report}");
        let steps: Vec<&str> = done.history.iter().filter_map(|h| h.split(' ').next()).collect();
        assert_eq!(steps, ["1", "2", "3", "complete"], "{:?}", done.history);
        let back: Desired = serde_json::from_str(&store.kvs[DESIRED].0).expect("desired");
        assert_eq!((back.active, back.canary_bp), (Colour::Blue, 0), "back on blue");
        assert!(back.changed_by.contains("drill of web over: green took 0 new flows"), "{}", back.changed_by);
        assert_eq!(store.kvs[KEY].1, store.kvs[DESIRED].1, "the switch back and the record's end: one transaction");
        assert!(done.kept_until_unix.is_none(), "a drill keeps no backup");
        let logged = changes.lock().expect("log").clone();
        assert!(
            logged.iter().any(|c| c.what == "drill-report" && c.to.contains("green took 0 new flows")),
            "{logged:?}"
        );
        let s = super::super::status_of(&done, None, now_unix());
        assert_eq!((s.state.as_str(), s.drill, s.judgement.as_deref()), ("complete", true, Some(report.as_str())));
    }
}
