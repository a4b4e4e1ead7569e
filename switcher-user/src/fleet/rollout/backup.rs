//! The kept backup of a fleet's rollout: after a rollout completes, its old colour stays the
//! instant rollback target on every node for `keep_previous_secs` (of the node that completed
//! it), written into the record as `kept_until_unix`. Every node shows it in `status` from
//! the record; the driver (whoever holds the driver's key then) ends it once, in the record's
//! `backup_end`: at its time by running the `backup_released` hook, or at once when the fleet
//! switched back to the old colour (a rollback within the window), with no hook. A driver
//! that dies while the hook runs is replaced, and the successor runs the hook again (hooks
//! are idempotent, as for a rollout's); once `backup_end` is written no one runs it again.

use super::{COMPLETE, Drive, Driver, Store, step};
use crate::{
    engine::{Change, Handle, Maps},
    fleet::{Fleet, now_unix},
    protocol::{Backup, FleetRollout, ServiceStatus},
    steps::HookPoint,
};

/// A completed rollout whose old colour is still the backup: its time or a switch has not
/// ended it yet.
pub(super) fn keeps_backup(r: &FleetRollout) -> bool {
    r.state == COMPLETE && r.kept_until_unix.is_some() && r.backup_end.is_none()
}

/// The backup of `r`, as `status` shows it, when the fleet's active colour is `active`.
pub(super) fn backup_of(r: &FleetRollout, active: Option<crate::protocol::Colour>, now: u64) -> Option<Backup> {
    let until = r.kept_until_unix.filter(|_| keeps_backup(r))?;
    if active.is_some_and(|a| a != r.to) {
        return None;
    }
    Some(Backup { colour: r.from, secs_left: until.saturating_sub(now) })
}

/// The fleet's active colour of `name` as this node last read it, if that is newer than the
/// rollout's last write to it (an older one, the watch not caught up yet, says nothing).
fn fleet_active(fleet: &Fleet, name: &str, r: &FleetRollout) -> Option<crate::protocol::Colour> {
    let st = fleet.lock();
    st.desired.get(name).filter(|(_, rev)| *rev > r.desired_revision).map(|(d, _)| d.active)
}

/// The record with its backup ended (`note`: how, and by whom).
pub(super) fn backup_ended(r: &FleetRollout, note: &str) -> FleetRollout {
    let mut next = r.clone();
    next.history.push(format!("backup {} {note}", r.from));
    next.backup_end = Some(note.to_owned());
    next
}

impl Driver {
    /// The kept backup of a completed rollout this node drives: ended when the fleet switched
    /// back to it, released (with its hook) when its time is over; the record written when it
    /// ended.
    #[expect(clippy::too_many_arguments, reason = "a session's parts")]
    pub(super) async fn keep<M: Maps + Send + 'static, S: Store>(
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
        let key = fleet.rollout_key(name);
        let Some(until) = r.kept_until_unix else { return Ok(None) };
        let d = self.driving.entry(name.to_owned()).or_insert_with(|| Drive::new(r));
        let hook = d.hook.take();
        let note = match hook {
            Some(h) if !h.is_finished() => {
                d.hook = Some(h);
                return Ok(None);
            }
            Some(h) => match h.await.unwrap_or_else(|e| Err(format!("the hook's task failed: {e}"))) {
                Ok(()) => format!("released by {me} (hook {} succeeded)", HookPoint::BackupReleased),
                Err(e) => format!("released by {me} (hook {} failed: {e})", HookPoint::BackupReleased),
            },
            None => {
                if let Some(a) = fleet_active(fleet, name, r).filter(|a| *a != r.to) {
                    // A rollback (or any switch back) within the window: no longer a backup.
                    let next = backup_ended(r, &format!("ended by {me}: the fleet switched to {a}"));
                    tracing::info!(service = %name, colour = %r.from, "the fleet's backup ended: {a} is live again");
                    return Ok(step(client, (&key, rev), &next, None).await?.map(|at| (next, at)));
                }
                if now_unix() < until {
                    return Ok(None);
                }
                let (n, from_to, steps) = (name.to_owned(), (r.from, r.to), r.ops.len());
                let token = {
                    self.hooks += 1;
                    self.hooks
                };
                let run = engine
                    .call(move |b| {
                        b.fleet_hook(&n, HookPoint::BackupReleased, from_to, steps + 1, steps, 0, None, token)
                    })
                    .await
                    .ok()
                    .flatten();
                match (run, fleet.hook_runner()) {
                    (None, _) => format!("released by {me} (no {} hook)", HookPoint::BackupReleased),
                    (Some(_), None) => format!("released by {me} (no hook runner in this daemon)"),
                    (Some(h), Some(runner)) => {
                        tracing::info!(service = %name, hook = %HookPoint::BackupReleased, colour = %r.from, "running hook (this node drives the fleet's rollout)");
                        if let Some(d) = self.driving.get_mut(name) {
                            d.hook = Some(tokio::task::spawn_blocking(move || runner(&h)));
                        }
                        return Ok(None);
                    }
                }
            }
        };
        let next = backup_ended(r, &note);
        let written = step(client, (&key, rev), &next, None).await?;
        if written.is_some() {
            tracing::info!(service = %name, colour = %r.from, "fleet backup {note}: keep_previous_secs is over");
            record(
                "rollout",
                &Change { service: name.into(), what: "backup-released".into(), from: r.from.to_string(), to: note },
            );
        }
        Ok(written.map(|at| (next, at)))
    }
}

impl Fleet {
    /// Shows the fleet's rollouts in a status of this node's services: each service's rollout
    /// (the fleet's, not this node's) and the backup it keeps, as every node shows them.
    pub fn show_rollouts(&self, services: &mut [ServiceStatus]) {
        let now = now_unix();
        let st = self.lock();
        for s in services {
            let Some((r, _)) = st.rollouts.records.get(&s.name) else { continue };
            let driver = st.rollouts.drivers.get(&s.name).map(|(n, _)| n.clone());
            let mut status = super::status_of(r, driver, now);
            // Judged on the fleet's desired state, once this node has read one newer than the
            // rollout's base (its own last write, or a later switch): the node's maps may not
            // have applied the rollout's last step yet, which is no switch.
            let desired = st.desired.get(&s.name).filter(|(_, rev)| *rev > r.desired_revision).map(|(d, _)| d);
            if let Some(d) = desired {
                status.switched_since(d.active, crate::protocol::share_of(d.active, d.canary_bp, r.to));
            }
            s.rollout = Some(status);
            let active = desired.map(|d| d.active);
            s.backup = backup_of(r, active, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::{
        super::{ended, tests::*},
        *,
    };
    use crate::protocol::{Colour, Desired};

    /// Drives the backup of the record in `store` until the driver writes its end (or 5 s).
    async fn keep_until_ended<M: Maps + Send + 'static>(
        d: &mut Driver,
        f: &Fleet,
        engine: &Handle<M>,
        store: &mut FakeStore,
    ) -> Option<FleetRollout> {
        for _ in 0..100 {
            let (r, rev) = super::super::read_record(store, KEY).await.expect("read").expect("record");
            if let Some((next, _)) = d.keep(f, engine, store, &|_, _| {}, "web", &r, rev).await.expect("keep") {
                return Some(next);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    #[tokio::test]
    async fn every_node_shows_the_kept_backup_and_the_driver_releases_it_once_or_ends_it_at_a_rollback() {
        let mut board = crate::engine::tests::board();
        crate::engine::tests::web_rollout(&mut board).hooks.set(HookPoint::BackupReleased, Some("recycle blue".into()));
        let engine = Handle::start(board).expect("engine");
        let f = fleet();
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        f.set_hook_runner(Arc::new(move |h| {
            assert_eq!((h.point, h.command.as_str()), (HookPoint::BackupReleased, "recycle blue"));
            assert!(h.env.contains(&("SWITCHER_FROM".to_owned(), "blue".to_owned())), "{:?}", h.env);
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Green), 5));
        let now = now_unix();
        let mut done = ended(&rollout(&["10%", "100%"]), COMPLETE, None, "lb0", now);
        done.at = 2;
        done.kept_until_unix = Some(now + 600);

        // Every node: the old colour is the backup, with the time left.
        let b = backup_of(&done, Some(Colour::Green), now + 10).expect("a backup");
        assert_eq!((b.colour, b.secs_left), (Colour::Blue, 590));
        assert_eq!(backup_of(&done, Some(Colour::Blue), now), None, "not once the fleet is back on blue");
        assert!(keeps_backup(&done) && super::super::driven(&done), "a driver has work on it");

        // Within the window the driver writes nothing; nor when this node has not read the
        // rollout's last write of the desired state yet (it still says blue).
        let mut store = FakeStore::default();
        let rev = store.put(KEY, serde_json::to_string(&done).expect("json"));
        let mut d = Driver::new(7);
        let kept = d.keep(&f, &engine, &mut store, &|_, _| {}, "web", &done, rev).await.expect("keep");
        assert!(kept.is_none() && store.record(KEY).backup_end.is_none());
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Blue), done.desired_revision));
        let kept = d.keep(&f, &engine, &mut store, &|_, _| {}, "web", &done, rev).await.expect("keep");
        assert!(kept.is_none() && store.record(KEY).backup_end.is_none(), "not ended by a stale read");
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Green), 5));

        // At its end: the hook once, and the record says so; nobody has work on it any more.
        let over = FleetRollout { kept_until_unix: Some(now - 1), ..done.clone() };
        store.put(KEY, serde_json::to_string(&over).expect("json"));
        let released = keep_until_ended(&mut d, &f, &engine, &mut store).await.expect("released");
        assert_eq!(released.backup_end.as_deref(), Some("released by lb1 (hook backup_released succeeded)"));
        assert_eq!(store.record(KEY), released, "written");
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(!super::super::driven(&store.record(KEY)), "a driver taking over has nothing to run again");
        assert!(
            released
                .history
                .last()
                .is_some_and(|h| h == "backup blue released by lb1 (hook backup_released succeeded)")
        );
        assert_eq!(backup_of(&released, Some(Colour::Green), now), None);

        // A rollback within the window (the fleet back on blue) ends it at once, with no hook.
        store.put(KEY, serde_json::to_string(&done).expect("json"));
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Blue), 9));
        let mut successor = Driver::new(9);
        let ended_early = keep_until_ended(&mut successor, &f, &engine, &mut store).await.expect("ended");
        assert_eq!(ended_early.backup_end.as_deref(), Some("ended by lb1: the fleet switched to blue"));
        assert_eq!(ran.load(Ordering::SeqCst), 1, "no hook after a rollback");
    }

    #[tokio::test]
    async fn a_nodes_status_shows_the_fleets_rollout_and_backup_not_its_own() {
        let engine = Handle::start(crate::engine::tests::board()).expect("engine");
        let f = fleet();
        let now = now_unix();
        let mut done = ended(&rollout(&["100%"]), COMPLETE, None, "lb0", now);
        done.kept_until_unix = Some(now + 300);
        f.lock().rollouts.records.insert("web".into(), (done.clone(), 4));
        let status = async || {
            let mut st = engine.call(|b| b.status(None)).await.expect("engine").expect("status");
            f.show_rollouts(&mut st.services);
            st.services.into_iter().find(|s| s.name == "web").expect("web")
        };
        // Before this node has read the rollout's last write of the desired state, and after.
        let web = status().await;
        assert_eq!(web.rollout.map(|r| r.state), Some("complete".into()));
        assert!(web.backup.is_some_and(|b| b.colour == Colour::Blue && (299..=300).contains(&b.secs_left)));
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Green), 3));
        assert!(status().await.backup.is_some());
        // Rolled back: no backup shown; released: none either.
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Blue), 6));
        assert_eq!(status().await.backup, None);
        f.lock().desired.insert("web".into(), (Desired::of(Colour::Green), 3));
        f.lock().rollouts.records.insert("web".into(), (backup_ended(&done, "released by lb0 (no hook)"), 5));
        assert_eq!(status().await.backup, None);
    }

    #[tokio::test]
    async fn the_driver_that_completes_a_fleet_rollout_records_keep_previous_secs() {
        let mut board = crate::engine::tests::board();
        crate::engine::tests::web_rollout(&mut board).keep_previous = Some(Duration::from_secs(600));
        let engine = Handle::start(board).expect("engine");
        let f = fleet();
        let mut store = FakeStore::default();
        store.put(DESIRED, serde_json::to_string(&Desired::of(Colour::Green)).expect("json"));
        let mut r = rollout(&["100%"]);
        r.at = 1;
        r.share_bp = switcher_common::BP_ALL;
        let rev = store.put(KEY, serde_json::to_string(&r).expect("json"));
        let mut d = Driver::new(7);
        let before = now_unix();
        d.drive(&f, &engine, &mut store, &|_, _| {}, "web", r, rev).await.expect("drive");
        let done = store.record(KEY);
        assert_eq!(done.state, COMPLETE);
        let until = done.kept_until_unix.expect("kept");
        assert!((before + 600..=now_unix() + 600).contains(&until), "{until}");
        assert!(keeps_backup(&done));
    }
}
