//! A rollout in a fleet: one rollout for all nodes.
//!
//! ```text
//! {prefix}/rollouts/{service}         the plan and its progress (JSON `FleetRollout`): ops,
//!                                     the op under way and when it began, paused, state,
//!                                     judgement, reason, the history of the ops done
//! {prefix}/rollouts/{service}/driver  the node that drives it, under that node's lease
//! ```
//!
//! `switcher rollout SERVICE COLOUR` on any node writes the record (only if none is under
//! way, and only if the desired state is still the one the plan was checked against). Every
//! node watches the records; while one is running (or keeps a backup), a node that sees no driver key creates it
//! with its lease in a transaction that requires it absent, so exactly one node drives. The
//! driver moves the record past each op with a compare-and-swap on the record's mod revision
//! (a step is never skipped nor repeated: a driver that lost the record to someone else
//! writes nothing); a share is written to the service's desired state in the same
//! transaction, so every node applies it as it applies `switcher weight`. Hooks run on the
//! driver. Pauses are judged by [`judge`] from every node's counters, which the nodes publish
//! while a rollout runs and the driver sums (`counters`). After completion the old colour is
//! the fleet's kept backup until the driver releases it (`backup`); a drill is a fleet rollout
//! of the drill's ops (`drill`). A driver that dies loses its key with its lease; another node
//! takes it and resumes at the recorded op (a pause or watch window begins afresh, a hook
//! under way runs again, as after a restart on one node).
//!
//! pause, resume, promote and abort are writes to the record (checked against the revision
//! read) that the driver obeys; abort also sends new flows back in the desired state in the
//! same transaction, so it works with no driver alive, and the node that aborts runs the
//! on-abort hook.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use switcher_common::BP_ALL;

use self::{backup::keeps_backup, drill::is_drill};
use super::{Fleet, etcd_error, now_unix, plan::plan};
use crate::{
    engine::{
        Change, Handle, HookRun, Maps,
        rollout::{Judgement, Op, judge},
    },
    protocol::{Colour, Desired, FleetRollout, Request, Response, RolloutAction, RolloutStatus, Scope, percent},
    steps::HookPoint,
};

mod backup;
mod counters;
mod drill;

/// Runs a hook to its end or its timeout (the agent's runner): `Err` says why it failed.
pub type HookRunner = Arc<dyn Fn(&HookRun) -> Result<(), String> + Send + Sync>;

pub(super) const RUNNING: &str = "running";
const COMPLETE: &str = "complete";
const ABORTED: &str = "aborted";
const INTERRUPTED: &str = "interrupted";

/// The records and drivers as last read, by service: `(record, its mod revision)` and
/// `(node, its lease)`.
#[derive(Default)]
pub(super) struct Known {
    pub records: HashMap<String, (FleetRollout, i64)>,
    pub drivers: HashMap<String, (String, i64)>,
}

impl Known {
    /// Takes a key of `{prefix}/rollouts/` as read or watched (`kv` absent: deleted).
    pub fn take(&mut self, prefix: &str, key: &str, kv: Option<&KeyValue>) {
        let Some(rest) = key.strip_prefix(prefix) else { return };
        match (rest.split_once('/'), kv) {
            (Some((name, "driver")), Some(kv)) => {
                let node = String::from_utf8_lossy(kv.value()).into_owned();
                self.drivers.insert(name.to_owned(), (node, kv.lease()));
            }
            (Some((name, "driver")), None) => {
                self.drivers.remove(name);
            }
            (Some(_), _) => {}
            (None, Some(kv)) => match serde_json::from_slice::<FleetRollout>(kv.value()) {
                Ok(r) => {
                    let newer = self.records.get(rest).is_none_or(|(_, rev)| *rev < kv.mod_revision());
                    if newer {
                        self.records.insert(rest.to_owned(), (r, kv.mod_revision()));
                    }
                }
                Err(e) => tracing::warn!(key, "a fleet rollout record that is not switcher's: {e}; ignored"),
            },
            (None, None) => {
                self.records.remove(rest);
            }
        }
    }
}

/// What the rollouts need of etcd: reads, writes that happen only if every key read is still
/// at the mod revision read (0: absent), and the driver's election. A fake in the tests.
pub(super) trait Store {
    /// A key's value and mod revision, if it exists.
    async fn read(&mut self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String>;
    /// Puts every `(key, value)` of `writes` if each `(key, mod revision)` of `expect` still
    /// holds: the revision written at, or `None` when something changed (nothing written).
    async fn swap(&mut self, expect: &[(String, i64)], writes: Vec<(String, String)>) -> Result<Option<i64>, String>;
    /// Creates `key` = `value` under `lease` if it is absent; says whether it did.
    async fn claim(&mut self, key: &str, value: &str, lease: i64) -> Result<bool, String>;
    /// Every `(key, value)` under `prefix`.
    async fn read_prefix(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String>;
    /// Puts `key` = `value` under `lease`, whatever was there.
    async fn put(&mut self, key: &str, value: String, lease: i64) -> Result<(), String>;
    async fn delete(&mut self, key: &str) -> Result<(), String>;
}

impl Store for Client {
    async fn read(&mut self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
        let got = self.get(key, None).await.map_err(|e| etcd_error(&e))?;
        Ok(got.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn swap(&mut self, expect: &[(String, i64)], writes: Vec<(String, String)>) -> Result<Option<i64>, String> {
        let when: Vec<Compare> =
            expect.iter().map(|(k, rev)| Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev)).collect();
        let then: Vec<TxnOp> = writes.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
        let resp = self.txn(Txn::new().when(when).and_then(then)).await.map_err(|e| etcd_error(&e))?;
        Ok(resp.succeeded().then(|| resp.header().map_or(0, etcd_client::ResponseHeader::revision)))
    }

    async fn claim(&mut self, key: &str, value: &str, lease: i64) -> Result<bool, String> {
        let txn = Txn::new().when([Compare::create_revision(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        Ok(self.txn(txn).await.map_err(|e| etcd_error(&e))?.succeeded())
    }

    async fn read_prefix(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        let got = self.get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(|e| etcd_error(&e))?;
        Ok(got.kvs().iter().filter_map(|kv| Some((kv.key_str().ok()?.to_owned(), kv.value().to_vec()))).collect())
    }

    async fn put(&mut self, key: &str, value: String, lease: i64) -> Result<(), String> {
        let opts = PutOptions::new().with_lease(lease);
        Client::put(self, key, value, Some(opts)).await.map_err(|e| etcd_error(&e))?;
        Ok(())
    }

    async fn delete(&mut self, key: &str) -> Result<(), String> {
        Client::delete(self, key, None::<DeleteOptions>).await.map_err(|e| etcd_error(&e))?;
        Ok(())
    }
}

/// A record a driver has work on: a rollout (or drill) running, or the backup it keeps.
fn driven(r: &FleetRollout) -> bool {
    r.state == RUNNING || keeps_backup(r)
}

/// The ops of a record; an op this switcher cannot read is an error.
pub(super) fn ops_of(r: &FleetRollout) -> Result<Vec<Op>, String> {
    r.ops.iter().map(|t| Op::from_token(t).ok_or_else(|| format!("an op this switcher cannot read: {t:?}"))).collect()
}

/// The record past its op, written by `node` (`note`: the judgement, or why it moved on).
pub(super) fn advanced(r: &FleetRollout, node: &str, note: Option<String>, now: u64) -> FleetRollout {
    let word = r.ops.get(r.at).and_then(|t| Op::from_token(t)).map_or_else(|| "?".to_owned(), |o| o.to_string());
    let mut next = r.clone();
    next.history.push(format!(
        "{} {word} by {node}{}",
        r.at + 1,
        note.as_ref().map_or_else(String::new, |n| format!(": {n}"))
    ));
    next.at = r.at + 1;
    next.op_started_unix = now;
    next.driver = node.to_owned();
    if note.is_some() {
        next.judgement = note;
    }
    next
}

/// The record ended in `state` (`complete`, `aborted`, `interrupted`), by `node`.
pub(super) fn ended(r: &FleetRollout, state: &str, why: Option<String>, node: &str, now: u64) -> FleetRollout {
    let mut next = r.clone();
    next.history.push(format!("{state} by {node}{}", why.as_ref().map_or_else(String::new, |w| format!(": {w}"))));
    next.state = state.to_owned();
    next.reason = why;
    next.op_started_unix = now;
    next.driver = node.to_owned();
    next
}

/// What the service's desired state must say while the rollout is at `r`: `(active, canary)`.
fn expected(r: &FleetRollout) -> (Colour, u32) {
    if r.share_bp == BP_ALL { (r.to, 0) } else { (r.from, r.share_bp) }
}

/// Writes `next` over the record at `rev` (and `desired` over the desired state at its
/// revision, in the same transaction): the new revision, or `None` when either changed
/// since it was read (nothing written).
pub(super) async fn step<S: Store>(
    store: &mut S,
    (key, rev): (&str, i64),
    next: &FleetRollout,
    desired: Option<(&str, i64, &Desired)>,
) -> Result<Option<i64>, String> {
    let mut expect = vec![(key.to_owned(), rev)];
    let mut writes = vec![(key.to_owned(), serde_json::to_string(next).map_err(|e| e.to_string())?)];
    if let Some((dkey, drev, d)) = desired {
        expect.push((dkey.to_owned(), drev));
        writes.push((dkey.to_owned(), serde_json::to_string(d).map_err(|e| e.to_string())?));
    }
    store.swap(&expect, writes).await
}

async fn read_record<S: Store>(store: &mut S, key: &str) -> Result<Option<(FleetRollout, i64)>, String> {
    match store.read(key).await? {
        None => Ok(None),
        Some((v, rev)) => serde_json::from_slice(&v)
            .map(|r| Some((r, rev)))
            .map_err(|e| format!("the rollout record at {key} is not switcher's: {e}")),
    }
}

async fn read_desired<S: Store>(store: &mut S, key: &str) -> Result<Option<(Desired, i64)>, String> {
    match store.read(key).await? {
        None => Ok(None),
        Some((v, rev)) => serde_json::from_slice(&v)
            .map(|d| Some((d, rev)))
            .map_err(|e| format!("the desired state at {key} is not switcher's: {e}")),
    }
}

/// What a driver does with an op under way, kept only while it drives it.
struct Drive {
    /// The op (index, and when it began by the record) this is about.
    at: (usize, u64),
    /// When this driver took the op up: a pause's or watch's window begins here.
    since: Instant,
    /// A pause's counters at the start of its window, by node: `[from, to]`.
    baseline: Option<BTreeMap<String, [crate::protocol::Counters; 2]>>,
    /// The hook running.
    hook: Option<tokio::task::JoinHandle<Result<(), String>>>,
    /// An inconclusive judgement was written to the record.
    holding: bool,
}

impl Drive {
    fn new(r: &FleetRollout) -> Drive {
        Drive { at: (r.at, r.op_started_unix), since: Instant::now(), baseline: None, hook: None, holding: false }
    }
}

/// The rollouts a node drives, for one session with etcd (a new session, a new lease: the
/// windows begin afresh).
pub(super) struct Driver {
    pub lease: i64,
    driving: HashMap<String, Drive>,
    hooks: u64,
    /// The last error of each rollout driven here, logged once until it changes.
    errors: HashMap<String, String>,
    /// The services whose counters this node publishes (see `counters`).
    published: HashSet<String>,
}

impl Driver {
    pub fn new(lease: i64) -> Driver {
        Driver { lease, driving: HashMap::new(), hooks: 0, errors: HashMap::new(), published: HashSet::new() }
    }

    /// Every second: for each running rollout, take the driver's key if nobody holds it, and
    /// drive those this node holds as far as they go now.
    pub async fn tick<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
        record: &impl Fn(&str, &Change),
    ) -> Result<(), String> {
        let (records, drivers) = {
            let st = fleet.lock();
            (st.rollouts.records.clone(), st.rollouts.drivers.clone())
        };
        self.driving.retain(|name, _| records.get(name).is_some_and(|(r, _)| driven(r)));
        let me = fleet.config.node.clone();
        for (name, (r, rev)) in records.into_iter().filter(|(_, (r, _))| driven(r)) {
            match drivers.get(&name) {
                Some((node, lease)) if *node == me && *lease == self.lease => {}
                Some(_) => {
                    if let Some(d) = self.driving.remove(&name)
                        && let Some(h) = d.hook
                    {
                        h.abort();
                    }
                    continue;
                }
                None => {
                    // Only a node that has the service can drive its rollout.
                    let n = name.clone();
                    if !engine.call(move |b| b.snapshot(&n).is_some()).await.unwrap_or(false)
                        || !client.claim(&fleet.rollout_driver_key(&name), &me, self.lease).await?
                    {
                        continue;
                    }
                    tracing::info!(service = %name, step = r.at + 1, "this node drives the fleet's rollout now");
                    fleet.lock().rollouts.drivers.insert(name.clone(), (me.clone(), self.lease));
                    record(
                        "rollout",
                        &Change {
                            service: name.clone(),
                            what: "fleet rollout-driver".into(),
                            from: r.driver.clone(),
                            to: format!("{me}, at step {}", r.at + 1),
                        },
                    );
                }
            }
            // A failure of this rollout (etcd or the engine) is retried at the next tick; the
            // session notices a lost etcd by its watches and lease.
            match self.drive(fleet, engine, client, record, &name, r, rev).await {
                Ok(()) => {
                    self.errors.remove(&name);
                }
                Err(e) => {
                    if self.errors.get(&name) != Some(&e) {
                        tracing::warn!(service = %name, "driving the fleet's rollout: {e}; retrying");
                    }
                    self.errors.insert(name, e);
                }
            }
        }
        Ok(())
    }

    /// Drives one rollout as far as it goes now (at most one pass per op).
    #[expect(clippy::too_many_arguments, reason = "a session's parts")]
    async fn drive<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
        record: &impl Fn(&str, &Change),
        name: &str,
        mut r: FleetRollout,
        mut rev: i64,
    ) -> Result<(), String> {
        for _ in 0..=r.ops.len() + 1 {
            match self.one(fleet, engine, client, record, name, &r, rev).await? {
                Some((next, at)) => {
                    fleet.lock().rollouts.records.insert(name.to_owned(), (next.clone(), at));
                    if !driven(&next) {
                        return Ok(());
                    }
                    (r, rev) = (next, at);
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// One op of a rollout this node drives: the record written when it moved on or ended.
    #[expect(clippy::too_many_arguments, reason = "a session's parts")]
    #[expect(clippy::too_many_lines, reason = "one arm per op, as on one node")]
    async fn one<M: Maps + Send + 'static, S: Store>(
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
        let now = now_unix();
        let d = self.driving.entry(name.to_owned()).or_insert_with(|| Drive::new(r));
        if d.at != (r.at, r.op_started_unix) {
            // Moved by someone else (a promote, another driver): this op begins afresh here.
            if let Some(h) = d.hook.take() {
                h.abort();
            }
            *d = Drive::new(r);
        }
        if keeps_backup(r) {
            return self.keep(fleet, engine, client, record, name, r, rev).await;
        }
        if r.state != RUNNING {
            return Ok(None);
        }
        let ops = match ops_of(r) {
            Ok(ops) => ops,
            Err(e) => {
                let next = ended(r, ABORTED, Some(e), &me, now);
                return Ok(step(client, (&key, rev), &next, None).await?.map(|at| (next, at)));
            }
        };
        // Changed outside the rollout (a cut-over, a weight): it ends, as on one node.
        let desired = fleet.lock().desired.get(name).cloned();
        if let Some((now_d, drev)) = desired
            && drev > r.desired_revision
            && (now_d.active, now_d.canary_bp) != expected(r)
        {
            let why = format!(
                "{name} was changed outside the rollout: the fleet's desired state is {} now, {} to {} ({})",
                now_d.active,
                percent(now_d.canary_bp),
                now_d.active.other(),
                now_d.change
            );
            tracing::warn!(service = %name, "fleet rollout interrupted: {why}");
            let next = ended(r, INTERRUPTED, Some(why.clone()), &me, now);
            let written = step(client, (&key, rev), &next, None).await?;
            if written.is_some() {
                record(
                    "rollout",
                    &Change {
                        service: name.into(),
                        what: "rollout-interrupted".into(),
                        from: r.to.to_string(),
                        to: why,
                    },
                );
            }
            return Ok(written.map(|at| (next, at)));
        }
        let Some(op) = ops.get(r.at).copied() else {
            let n = name.to_owned();
            let keep = engine.call(move |b| b.keep_previous(&n)).await.ok().flatten();
            let mut next = ended(r, COMPLETE, None, &me, now);
            // The old colour stays the fleet's backup this long (every node shows it).
            next.kept_until_unix = keep.map(|k| now + k.as_secs());
            let written = step(client, (&key, rev), &next, None).await?;
            if written.is_some() {
                tracing::info!(service = %name, from = %r.from, to = %r.to, "fleet rollout complete");
                record(
                    "rollout",
                    &Change {
                        service: name.into(),
                        what: "rollout-complete".into(),
                        from: r.from.to_string(),
                        to: r.to.to_string(),
                    },
                );
            }
            return Ok(written.map(|at| (next, at)));
        };
        match op {
            Op::Hook(point) => {
                if r.paused {
                    return Ok(None);
                }
                if let Some(h) = d.hook.as_ref() {
                    if !h.is_finished() {
                        return Ok(None);
                    }
                    let result = match d.hook.take() {
                        Some(h) => h.await.unwrap_or_else(|e| Err(format!("the hook's task failed: {e}"))),
                        None => return Ok(None),
                    };
                    return match result {
                        Ok(()) => {
                            tracing::info!(service = %name, hook = %point, "hook succeeded");
                            Self::advance(client, &key, r, rev, Some(format!("hook {point} succeeded")), &me).await
                        }
                        Err(e) => {
                            tracing::warn!(service = %name, hook = %point, "hook failed: {e}");
                            self.abort(fleet, engine, client, record, name, r, rev, format!("hook {point} failed: {e}"))
                                .await
                        }
                    };
                }
                self.hooks += 1;
                let (n, from_to, step_no, steps, share, token) =
                    (name.to_owned(), (r.from, r.to), r.at + 1, r.ops.len(), r.share_bp, self.hooks);
                let run = engine
                    .call(move |b| b.fleet_hook(&n, point, from_to, step_no, steps, share, None, token))
                    .await
                    .ok()
                    .flatten();
                match (run, fleet.hook_runner()) {
                    (None, _) => Self::advance(client, &key, r, rev, None, &me).await,
                    (Some(_), None) => {
                        self.abort(fleet, engine, client, record, name, r, rev, "no hook runner in this daemon".into())
                            .await
                    }
                    (Some(h), Some(runner)) => {
                        tracing::info!(service = %name, hook = %point, "running hook (this node drives the fleet's rollout)");
                        if let Some(d) = self.driving.get_mut(name) {
                            d.hook = Some(tokio::task::spawn_blocking(move || runner(&h)));
                        }
                        Ok(None)
                    }
                }
            }
            Op::Share(bp) => {
                if r.paused {
                    return Ok(None);
                }
                let dkey = fleet.service_key(name);
                let Some((cur, drev)) = read_desired(client, &dkey).await? else {
                    return self
                        .abort(fleet, engine, client, record, name, r, rev, format!("{dkey} is gone from etcd"))
                        .await;
                };
                let req = Request::Weight {
                    service: name.to_owned(),
                    colour: r.to,
                    basis_points: bp,
                    force: r.force,
                    scope: Scope::default(),
                };
                let share = fleet.config.share_backends;
                let planned = {
                    let (req, cur) = (req.clone(), cur.clone());
                    engine.call(move |b| plan(b, &req, &cur, share)).await.map_err(|e| e.to_string())?
                };
                let mut next = advanced(r, &me, None, now);
                next.share_bp = bp;
                next.desired_revision = drev;
                let written = match planned {
                    Err(e) => {
                        let why = format!("the {} step was refused: {e}", percent(bp));
                        return self.abort(fleet, engine, client, record, name, r, rev, why).await;
                    }
                    Ok(None) => step(client, (&key, rev), &next, None).await?,
                    Ok(Some(mut d)) => {
                        d.changed_by = format!("{me} (rollout of {name}, step {})", r.at + 1);
                        step(client, (&key, rev), &next, Some((&dkey, drev, &d))).await?
                    }
                };
                if written.is_some() {
                    tracing::info!(service = %name, to = %r.to, share = %percent(bp), step = r.at + 1, "fleet rollout step");
                    record(
                        "rollout",
                        &Change {
                            service: name.into(),
                            what: "rollout-weight".into(),
                            from: format!("{} {}", r.to, percent(r.share_bp)),
                            to: format!("{} {} (fleet, step {})", r.to, percent(bp), r.at + 1),
                        },
                    );
                }
                Ok(written.map(|at| (next, at)))
            }
            Op::Pause(len) if is_drill(r) => self.drill_pause(fleet, engine, client, record, name, (r, rev), len).await,
            Op::Pause(len) => {
                let Some(judged) = self.judged(fleet, engine, client, name, r).await? else { return Ok(None) };
                let j = judge(
                    judged.thresholds,
                    (r.from, judged.windows[0]),
                    (r.to, judged.windows[1]),
                    judged.to_healthy,
                    judged.replies_seen,
                );
                let Some(d) = self.driving.get_mut(name) else { return Ok(None) };
                let over = d.since.elapsed() >= len;
                let text = j.to_string();
                match j {
                    Judgement::Fail(why) => {
                        let why = format!("{why} (judged from {})", judged.from);
                        self.abort(fleet, engine, client, record, name, r, rev, why).await
                    }
                    Judgement::Pass(_) if over && !r.paused => {
                        tracing::info!(service = %name, step = r.at + 1, from = %judged.from, "judged: {text}");
                        record(
                            "rollout",
                            &Change {
                                service: name.into(),
                                what: "rollout-judged".into(),
                                from: op.to_string(),
                                to: format!("{text} (judged from {})", judged.from),
                            },
                        );
                        let mut next = advanced(r, &me, Some(text), now_unix());
                        next.judged_from = Some(judged.from);
                        Ok(step(client, (&key, rev), &next, None).await?.map(|at| (next, at)))
                    }
                    Judgement::Inconclusive(_) if over && !d.holding => {
                        tracing::info!(service = %name, step = r.at + 1, from = %judged.from, "holding: {text}");
                        d.holding = true;
                        let mut next = r.clone();
                        next.judgement = Some(text);
                        next.judged_from = Some(judged.from);
                        Ok(step(client, (&key, rev), &next, None).await?.map(|at| (next, at)))
                    }
                    _ => Ok(None),
                }
            }
            Op::Watch(len) => {
                let (n, from, to) = (name.to_owned(), r.from, r.to);
                let sample =
                    engine.call(move |b| b.rollout_sample(&n, from, to)).await.map_err(|e| e.to_string())??;
                if !sample.to_healthy {
                    let n = name.to_owned();
                    let why = engine.call(move |b| b.why_unhealthy_here(&n, to)).await.unwrap_or_default();
                    let why = format!("{to} failed during the watch on {me}: {why}");
                    return self.abort(fleet, engine, client, record, name, r, rev, why).await;
                }
                if r.paused || d.since.elapsed() < len {
                    return Ok(None);
                }
                let note = format!("{to} stayed healthy through the watch");
                Self::advance(client, &key, r, rev, Some(note), &me).await
            }
            Op::Back => {
                if r.paused {
                    return Ok(None);
                }
                self.back(fleet, engine, client, record, name, r, rev).await
            }
        }
    }

    async fn advance<S: Store>(
        client: &mut S,
        key: &str,
        r: &FleetRollout,
        rev: i64,
        note: Option<String>,
        me: &str,
    ) -> Result<Option<(FleetRollout, i64)>, String> {
        let next = advanced(r, me, note, now_unix());
        Ok(step(client, (key, rev), &next, None).await?.map(|at| (next, at)))
    }

    /// The driver's own abort: as an operator's, then the on-abort hook here.
    #[expect(clippy::too_many_arguments, reason = "a session's parts")]
    async fn abort<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
        record: &impl Fn(&str, &Change),
        name: &str,
        r: &FleetRollout,
        rev: i64,
        why: String,
    ) -> Result<Option<(FleetRollout, i64)>, String> {
        let written = abort_rollout(fleet, engine, client, name, (r, rev), &why).await?;
        if let Some((next, _)) = &written {
            let (what, kind) = if is_drill(r) { ("drill-abort", "drill") } else { ("rollout-abort", "rollout") };
            tracing::warn!(service = %name, from = %r.from, to = %r.to, step = r.at + 1, "fleet {kind} aborted: {why}");
            record(
                "rollout",
                &Change {
                    service: name.into(),
                    what: what.into(),
                    from: format!("{} {}", r.to, percent(r.share_bp)),
                    to: format!("{}: {why}", r.from),
                },
            );
            // A drill runs no rollout hooks, as on one node.
            if !is_drill(r) {
                on_abort_hook(fleet, engine, name, next, &why).await;
            }
        }
        Ok(written)
    }
}

/// The record of a rollout (or drill) about to start: `ops` from `from` to `to`, at its first
/// op, checked against the desired state at `drev`, driven by no one yet.
pub(super) fn new_record(
    (from, to): (Colour, Colour),
    ops: &[Op],
    force: bool,
    drev: i64,
    started_by: String,
) -> FleetRollout {
    let now = now_unix();
    FleetRollout {
        from,
        to,
        ops: ops.iter().map(|o| o.token()).collect(),
        at: 0,
        op_started_unix: now,
        state: RUNNING.into(),
        paused: false,
        force,
        share_bp: 0,
        desired_revision: drev,
        judgement: None,
        reason: None,
        driver: String::new(),
        started_by,
        started_unix: now,
        history: Vec::new(),
        kept_until_unix: None,
        backup_end: None,
        judged_from: None,
    }
}

/// Ends the rollout at `rev` as aborted, and sends new flows back to its old colour in the
/// desired state, in one transaction: the records written, or `None` when the record or the
/// desired state changed meanwhile.
async fn abort_rollout<M: Maps + Send + 'static, S: Store>(
    fleet: &Fleet,
    engine: &Handle<M>,
    store: &mut S,
    name: &str,
    (r, rev): (&FleetRollout, i64),
    why: &str,
) -> Result<Option<(FleetRollout, i64)>, String> {
    let key = fleet.rollout_key(name);
    let dkey = fleet.service_key(name);
    let mut next = ended(r, ABORTED, Some(why.to_owned()), &fleet.config.node, now_unix());
    next.share_bp = 0;
    let Some((cur, drev)) = read_desired(store, &dkey).await? else {
        return Ok(step(store, (&key, rev), &next, None).await?.map(|at| (next, at)));
    };
    next.desired_revision = drev;
    let by = format!("{} (rollout of {name} aborted)", fleet.config.node);
    let written = end_and_send_back(fleet, engine, store, name, r, (&key, rev), &next, (&cur, drev), by).await?;
    Ok(written.map(|at| (next, at)))
}

/// Writes `next` (the record's end) at `rev` and, in the same transaction, new flows back on
/// the rollout's old colour in the desired state `cur` (read at `drev`): a rollback when the
/// new colour is active, a weight of 100 % to the old one under a canary, nothing when they
/// are already there. `changed_by` goes into the desired state. The record's new revision,
/// or `None` when the record or the desired state changed meanwhile.
#[expect(clippy::too_many_arguments, reason = "a transaction's parts")]
pub(super) async fn end_and_send_back<M: Maps + Send + 'static, S: Store>(
    fleet: &Fleet,
    engine: &Handle<M>,
    store: &mut S,
    name: &str,
    r: &FleetRollout,
    (key, rev): (&str, i64),
    next: &FleetRollout,
    (cur, drev): (&Desired, i64),
    changed_by: String,
) -> Result<Option<i64>, String> {
    let (service, scope) = (name.to_owned(), Scope::default());
    let back = if cur.active == r.to {
        Some(Request::Rollback { service, force: true, scope })
    } else if cur.active == r.from && cur.canary_bp > 0 {
        Some(Request::Weight { service, colour: r.from, basis_points: BP_ALL, force: true, scope })
    } else {
        None
    };
    let share = fleet.config.share_backends;
    let planned = match back {
        None => None,
        Some(req) => {
            let c = cur.clone();
            engine.call(move |b| plan(b, &req, &c, share)).await.map_err(|e| e.to_string())??
        }
    };
    let dkey = fleet.service_key(name);
    match planned {
        None => step(store, (key, rev), next, None).await,
        Some(mut d) => {
            d.changed_by = changed_by;
            step(store, (key, rev), next, Some((&dkey, drev, &d))).await
        }
    }
}

/// Runs the on-abort hook of `name` on this node, if one is configured (its result logged).
async fn on_abort_hook<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    name: &str,
    r: &FleetRollout,
    why: &str,
) {
    let Some(runner) = fleet.hook_runner() else { return };
    let (n, from_to, step_no, steps, why_s) = (name.to_owned(), (r.from, r.to), r.at + 1, r.ops.len(), why.to_owned());
    let run = engine
        .call(move |b| b.fleet_hook(&n, HookPoint::OnAbort, from_to, step_no, steps, 0, Some(&why_s), 0))
        .await
        .ok()
        .flatten();
    if let Some(h) = run {
        let service = name.to_owned();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || runner(&h)).await.unwrap_or_else(|e| Err(e.to_string()));
            match result {
                Ok(()) => tracing::info!(%service, hook = %HookPoint::OnAbort, "hook succeeded"),
                Err(e) => tracing::warn!(%service, hook = %HookPoint::OnAbort, "hook failed: {e}"),
            }
        });
    }
}

impl Fleet {
    pub(super) fn rollouts_prefix(&self) -> String {
        format!("{}/rollouts/", self.config.prefix)
    }

    pub(super) fn rollout_key(&self, name: &str) -> String {
        format!("{}/rollouts/{name}", self.config.prefix)
    }

    pub(super) fn rollout_driver_key(&self, name: &str) -> String {
        format!("{}/rollouts/{name}/driver", self.config.prefix)
    }

    /// Runs rollout hooks from now on (the agent's runner).
    pub fn set_hook_runner(&self, runner: HookRunner) {
        let _ = self.hooks.set(runner);
    }

    fn hook_runner(&self) -> Option<HookRunner> {
        self.hooks.get().cloned()
    }

    /// Reads every record and driver under the prefix (at a session's start): the revision
    /// read at, to watch from.
    pub(super) async fn load_rollouts(&self, client: &mut Client) -> Result<i64, String> {
        let prefix = self.rollouts_prefix();
        let got =
            client.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await.map_err(|e| etcd_error(&e))?;
        let mut known = Known::default();
        for kv in got.kvs() {
            if let Ok(key) = kv.key_str() {
                known.take(&prefix, key, Some(kv));
            }
        }
        self.lock().rollouts = known;
        Ok(got.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// Takes the events of the watch on the records.
    pub(super) fn watched_rollouts(&self, events: &[etcd_client::Event]) {
        let prefix = self.rollouts_prefix();
        let mut st = self.lock();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let put = ev.event_type() == etcd_client::EventType::Put;
            st.rollouts.take(&prefix, key, put.then_some(kv));
        }
    }

    /// `switcher rollout SERVICE COLOUR` and `switcher rollout pause|resume|promote|abort
    /// SERVICE` in a fleet: writes to the rollout's record (checked against the revision
    /// read), which the driving node obeys.
    pub async fn rollout<M: Maps + Send + 'static>(
        &self,
        engine: &Handle<M>,
        req: Request,
        who: &str,
    ) -> (Response, Option<Change>) {
        let client = self.lock().client.clone();
        let Some(mut client) = client else {
            let e = self.lock().error.clone().unwrap_or_else(|| "not connected".into());
            return (
                Response::error(format!(
                    "etcd is unreachable ({e}): a fleet's rollout lives in etcd and cannot start or change now; nothing changed. Every node keeps forwarding with what it applied"
                )),
                None,
            );
        };
        let answer = match req {
            Request::Rollout { service, colour, steps, force } => {
                self.start_rollout(engine, &mut client, &service, colour, steps, force, who).await
            }
            Request::RolloutControl { service, action } => {
                self.control_rollout(engine, &mut client, &service, action, who).await
            }
            Request::Drill { service, secs, share_bp } => {
                self.start_drill(engine, &mut client, &service, secs, share_bp, who).await
            }
            _ => Err("not a rollout request".into()),
        };
        match answer {
            Ok((message, change)) => {
                (Response { ok: true, message: Some(message), ..Response::default() }, Some(change))
            }
            Err(e) => (Response::error(e), None),
        }
    }

    #[expect(clippy::too_many_arguments, reason = "the request's fields")]
    async fn start_rollout<M: Maps + Send + 'static, S: Store>(
        &self,
        engine: &Handle<M>,
        store: &mut S,
        name: &str,
        to: Colour,
        steps: Option<Vec<String>>,
        force: bool,
        who: &str,
    ) -> Result<(String, Change), String> {
        let key = self.rollout_key(name);
        let current = read_record(store, &key).await?;
        if let Some((r, _)) = current.as_ref().filter(|(r, _)| r.state == RUNNING) {
            return Err(format!(
                "the fleet has a rollout of {name} under way ({} → {}, step {}/{}); see `switcher rollout status {name}`, or `switcher rollout abort {name}` first",
                r.from,
                r.to,
                r.at + 1,
                r.ops.len()
            ));
        }
        let rrev = current.map_or(0, |(_, rev)| rev);
        let dkey = self.service_key(name);
        let Some((desired, drev)) = read_desired(store, &dkey).await? else {
            return Err(format!(
                "{name} has no desired state in the fleet yet ({dkey}); wait until `switcher fleet status` shows it"
            ));
        };
        let (n, state) = (name.to_owned(), (desired.active, desired.canary_bp));
        let ops = engine
            .call(move |b| b.plan_fleet_rollout(&n, to, state, steps.as_deref(), force))
            .await
            .map_err(|e| e.to_string())??;
        let words: Vec<String> = ops.iter().map(ToString::to_string).collect();
        let r = new_record((desired.active, to), &ops, force, drev, format!("{} ({who})", self.config.node));
        let value = serde_json::to_string(&r).map_err(|e| e.to_string())?;
        let written = store.swap(&[(key, rrev), (dkey, drev)], vec![(self.rollout_key(name), value)]).await?;
        let Some(at) = written else {
            return Err(format!(
                "conflict: the fleet's {name} or its rollout changed while the rollout was being started; nothing was written. Check `switcher rollout status {name}` and run the command again"
            ));
        };
        tracing::info!(service = %name, from = %r.from, %to, plan = %words.join(", "), revision = at, "fleet rollout started");
        let from = r.from;
        self.lock().rollouts.records.insert(name.to_owned(), (r, at));
        Ok((
            format!(
                "{name}: fleet rollout {from} → {to} started: {}; one node drives it and every node applies its shares; `switcher rollout status {name}` follows it on any node",
                words.join(", ")
            ),
            Change {
                service: name.to_owned(),
                what: "fleet rollout-start".into(),
                from: from.to_string(),
                to: format!("{to} ({})", words.join(", ")),
            },
        ))
    }

    async fn control_rollout<M: Maps + Send + 'static, S: Store>(
        &self,
        engine: &Handle<M>,
        store: &mut S,
        name: &str,
        action: RolloutAction,
        who: &str,
    ) -> Result<(String, Change), String> {
        let key = self.rollout_key(name);
        let running = read_record(store, &key).await?.filter(|(r, _)| r.state == RUNNING);
        let Some((r, rev)) = running else {
            return Err(format!(
                "the fleet has no rollout of {name} under way; start one with `switcher rollout {name} COLOUR`"
            ));
        };
        if action == RolloutAction::AbortDrill && !is_drill(&r) {
            return Err(format!(
                "{name}: the fleet has a rollout under way, not a drill; nothing was changed (`switcher rollout abort {name}` stops the rollout)"
            ));
        }
        let action = action.checked();
        let op = ops_of(&r)?.get(r.at).copied();
        let op_word = op.map_or_else(|| "-".to_owned(), |o| o.to_string());
        let conflict = || {
            format!(
                "conflict: the fleet's rollout of {name} moved on while this was being written; nothing was written. Check `switcher rollout status {name}` and run the command again"
            )
        };
        let me = self.config.node.clone();
        let message = match action {
            RolloutAction::Pause | RolloutAction::Resume => {
                let pause = action == RolloutAction::Pause;
                let next = FleetRollout { paused: pause, ..r.clone() };
                step(store, (&key, rev), &next, None).await?.ok_or_else(conflict)?;
                if pause {
                    format!(
                        "{name}: fleet rollout paused (a failing judgement still aborts it); `switcher rollout resume {name}` goes on"
                    )
                } else {
                    format!("{name}: fleet rollout resumed")
                }
            }
            RolloutAction::Promote => {
                let Some(Op::Pause(_) | Op::Watch(_)) = op else {
                    return Err(format!(
                        "{name}: nothing to promote at step {} ({op_word}); promote ends a pause, a hold or the watch",
                        r.at + 1
                    ));
                };
                let mut next = advanced(&r, &me, Some(format!("promoted by the operator ({who})")), now_unix());
                next.paused = false;
                next.driver.clone_from(&r.driver);
                step(store, (&key, rev), &next, None).await?.ok_or_else(conflict)?;
                format!("{name}: promoted past {op_word}")
            }
            RolloutAction::Abort | RolloutAction::AbortDrill => {
                let why = format!("aborted by the operator on {me} ({who})");
                let (next, _) =
                    abort_rollout(self, engine, store, name, (&r, rev), &why).await?.ok_or_else(conflict)?;
                if is_drill(&r) {
                    format!("{name}: fleet drill aborted; new flows go back to {} on every node", r.from)
                } else {
                    on_abort_hook(self, engine, name, &next, &why).await;
                    format!("{name}: fleet rollout aborted; new flows go back to {} on every node", r.from)
                }
            }
        };
        let what = match action {
            RolloutAction::Pause => "fleet rollout-pause",
            RolloutAction::Resume => "fleet rollout-resume",
            RolloutAction::Promote => "fleet rollout-promote",
            RolloutAction::Abort | RolloutAction::AbortDrill => "fleet rollout-abort",
        };
        Ok((
            message,
            Change {
                service: name.to_owned(),
                what: what.into(),
                from: format!("step {op_word}"),
                to: "operator".into(),
            },
        ))
    }
}

/// A record as `status` shows it.
pub(super) fn status_of(r: &FleetRollout, driver: Option<String>, now: u64) -> RolloutStatus {
    let ops: Vec<Option<Op>> = r.ops.iter().map(|t| Op::from_token(t)).collect();
    let op = ops.get(r.at).copied().flatten();
    let holding = r.judgement.as_deref().is_some_and(|j| j.starts_with("inconclusive"));
    let state = match (r.state.as_str(), op) {
        (RUNNING, _) if r.paused => "paused",
        (RUNNING, Some(Op::Pause(_))) if holding => "holding",
        (RUNNING, Some(Op::Hook(_))) => "hook",
        (RUNNING, Some(Op::Watch(_))) => "watching",
        (s, _) => s,
    };
    let running = r.state == RUNNING;
    RolloutStatus {
        from: r.from,
        to: r.to,
        state: state.to_owned(),
        step: r.at + 1,
        steps: r.ops.iter().zip(&ops).map(|(t, o)| o.map_or_else(|| t.clone(), |o| o.to_string())).collect(),
        step_secs: now.saturating_sub(r.op_started_unix),
        share_bp: r.share_bp,
        judgement: r.judgement.clone(),
        reason: r.reason.clone(),
        drill: is_drill(r),
        driver: if running { driver } else { Some(r.driver.clone()).filter(|d| !d.is_empty()) },
        judged_from: Some(r.judged_from.clone().unwrap_or_else(|| {
            "the counters every node publishes while it runs, summed on the driver (no pause judged yet)".into()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::rollout::compile,
        steps::{self, RolloutConfig},
    };

    /// etcd in memory: keys with their mod revisions, one revision per write, leases.
    #[derive(Default)]
    pub(super) struct FakeStore {
        pub(super) kvs: HashMap<String, (String, i64, i64)>,
        pub(super) revision: i64,
    }

    impl FakeStore {
        pub(super) fn put(&mut self, key: &str, value: String) -> i64 {
            self.revision += 1;
            self.kvs.insert(key.to_owned(), (value, self.revision, 0));
            self.revision
        }

        /// A lease that expires: its keys go.
        fn expire(&mut self, lease: i64) {
            self.kvs.retain(|_, (_, _, l)| *l != lease);
            self.revision += 1;
        }

        pub(super) fn record(&self, key: &str) -> FleetRollout {
            serde_json::from_str(&self.kvs[key].0).expect("a record")
        }
    }

    impl Store for FakeStore {
        async fn read(&mut self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
            Ok(self.kvs.get(key).map(|(v, rev, _)| (v.clone().into_bytes(), *rev)))
        }

        async fn swap(
            &mut self,
            expect: &[(String, i64)],
            writes: Vec<(String, String)>,
        ) -> Result<Option<i64>, String> {
            if !expect.iter().all(|(k, rev)| self.kvs.get(k).map_or(0, |(_, r, _)| *r) == *rev) {
                return Ok(None);
            }
            self.revision += 1;
            for (k, v) in writes {
                self.kvs.insert(k, (v, self.revision, 0));
            }
            Ok(Some(self.revision))
        }

        async fn claim(&mut self, key: &str, value: &str, lease: i64) -> Result<bool, String> {
            if self.kvs.contains_key(key) {
                return Ok(false);
            }
            self.revision += 1;
            self.kvs.insert(key.to_owned(), (value.to_owned(), self.revision, lease));
            Ok(true)
        }

        async fn read_prefix(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
            let mut all: Vec<(String, Vec<u8>)> = self
                .kvs
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, (v, _, _))| (k.clone(), v.clone().into_bytes()))
                .collect();
            all.sort();
            Ok(all)
        }

        async fn put(&mut self, key: &str, value: String, lease: i64) -> Result<(), String> {
            self.revision += 1;
            self.kvs.insert(key.to_owned(), (value, self.revision, lease));
            Ok(())
        }

        async fn delete(&mut self, key: &str) -> Result<(), String> {
            self.revision += 1;
            self.kvs.remove(key);
            Ok(())
        }
    }

    pub(super) const KEY: &str = "/sw/rollouts/web";
    pub(super) const DESIRED: &str = "/sw/services/web";

    pub(super) fn rollout(plan: &[&str]) -> FleetRollout {
        let steps = steps::parse_plan(plan).expect("a plan");
        let ops = compile(&steps, &RolloutConfig { watch: None, ..RolloutConfig::default() });
        FleetRollout {
            from: Colour::Blue,
            to: Colour::Green,
            ops: ops.iter().map(|o| o.token()).collect(),
            at: 0,
            op_started_unix: 1_000,
            state: RUNNING.into(),
            paused: false,
            force: false,
            share_bp: 0,
            desired_revision: 1,
            judgement: None,
            reason: None,
            driver: String::new(),
            started_by: "lb0 (uid=0)".into(),
            started_unix: 1_000,
            history: Vec::new(),
            kept_until_unix: None,
            backup_end: None,
            judged_from: None,
        }
    }

    #[test]
    fn a_fleet_rollout_record_round_trips_and_reads_as_a_status() {
        let r = rollout(&["10%", "pause 2s", "100%"]);
        assert_eq!(r.ops, ["s1000", "p2", "s10000"]);
        let text = serde_json::to_string(&r).expect("json");
        assert_eq!(serde_json::from_str::<FleetRollout>(&text).expect("back"), r);
        assert_eq!(ops_of(&r).expect("ops").len(), 3);
        let bad = FleetRollout { ops: vec!["s1000".into(), "x9".into()], ..r.clone() };
        assert!(ops_of(&bad).expect_err("unknown op").contains("\"x9\""));
        // An older record without the optional fields still reads.
        let old = r#"{"from":"blue","to":"green","ops":["s1000"],"at":0,"op_started_unix":1,"state":"running"}"#;
        assert!(serde_json::from_str::<FleetRollout>(old).is_ok());

        let at_pause = FleetRollout { at: 1, share_bp: 1_000, ..r.clone() };
        let s = status_of(&at_pause, Some("lb1".into()), 1_005);
        assert_eq!((s.state.as_str(), s.step, s.step_secs, s.share_bp), ("running", 2, 5, 1_000));
        assert_eq!(s.steps, ["10%", "pause 2s", "100%"]);
        assert_eq!(s.driver.as_deref(), Some("lb1"));
        assert!(s.judged_from.as_deref().is_some_and(|j| j.contains("no pause judged yet")), "{s:?}");
        assert!(!s.drill);
        let holding = FleetRollout { judgement: Some("inconclusive: 3 new flows".into()), ..at_pause.clone() };
        assert_eq!(status_of(&holding, None, 1_005).state, "holding");
        let paused = FleetRollout { paused: true, ..at_pause.clone() };
        assert_eq!(status_of(&paused, None, 1_005).state, "paused");
        // An ended rollout shows the node that ended it, driver key or not.
        let done = ended(&at_pause, ABORTED, Some("aborted by the operator".into()), "lb0", 1_010);
        let s = status_of(&done, None, 1_010);
        assert_eq!((s.state.as_str(), s.driver.as_deref()), ("aborted", Some("lb0")));
        assert_eq!(s.reason.as_deref(), Some("aborted by the operator"));
    }

    #[tokio::test]
    async fn a_step_is_written_once_whoever_tries_it() {
        let mut store = FakeStore::default();
        let r = rollout(&["10%", "pause 2s", "100%"]);
        let rev = store.put(KEY, serde_json::to_string(&r).expect("json"));
        let drev = store.put(DESIRED, serde_json::to_string(&Desired::of(Colour::Blue)).expect("json"));
        // Two nodes that both read the record at `rev` (a dying driver and its successor):
        // only the first write lands, with the share, in one transaction.
        let mut share = Desired::of(Colour::Blue);
        share.canary_bp = 1_000;
        let a = FleetRollout { share_bp: 1_000, ..advanced(&r, "lb0", None, 1_001) };
        let b = FleetRollout { share_bp: 1_000, ..advanced(&r, "lb1", None, 1_001) };
        let first = step(&mut store, (KEY, rev), &a, Some((DESIRED, drev, &share))).await.expect("store");
        let second = step(&mut store, (KEY, rev), &b, Some((DESIRED, drev, &share))).await.expect("store");
        assert!(first.is_some() && second.is_none(), "{first:?} {second:?}");
        let now = store.record(KEY);
        assert_eq!((now.at, now.history.len(), now.driver.as_str()), (1, 1, "lb0"));
        assert_eq!(now.history[0], "1 10% by lb0");
        let d: Desired = serde_json::from_str(&store.kvs[DESIRED].0).expect("desired");
        assert_eq!(d.canary_bp, 1_000);
        // A write against a stale desired state moves nothing: neither the record nor the share.
        let at = first.expect("written");
        let later = advanced(&now, "lb0", Some("pass".into()), 1_003);
        let stale = step(&mut store, (KEY, at), &later, Some((DESIRED, drev, &share))).await.expect("store");
        assert_eq!(stale, None);
        assert_eq!(store.record(KEY).at, 1, "nothing written");
    }

    #[tokio::test]
    async fn a_new_driver_resumes_at_the_recorded_op_without_skipping_or_repeating() {
        let mut store = FakeStore::default();
        let r = rollout(&["10%", "pause 2s", "50%", "pause 2s", "100%"]);
        store.put(KEY, serde_json::to_string(&r).expect("json"));
        let driver_key = format!("{KEY}/driver");
        assert!(store.claim(&driver_key, "lb0", 7).await.expect("claim"));
        assert!(!store.claim(&driver_key, "lb1", 9).await.expect("claim"), "one driver at a time");
        // lb0 drives two ops, then dies with a step computed but not written.
        for _ in 0..2 {
            let (cur, rev) = read_record(&mut store, KEY).await.expect("read").expect("record");
            let next = advanced(&cur, "lb0", None, 1_002);
            assert!(step(&mut store, (KEY, rev), &next, None).await.expect("store").is_some());
        }
        let (before_death, stale_rev) = read_record(&mut store, KEY).await.expect("read").expect("record");
        store.expire(7);
        assert!(store.claim(&driver_key, "lb1", 9).await.expect("claim"), "the lease went: lb1 takes over");
        // lb1 resumes at the recorded op; lb0's late write of the same op is refused.
        let (cur, rev) = read_record(&mut store, KEY).await.expect("read").expect("record");
        assert_eq!(cur.at, 2);
        let next = advanced(&cur, "lb1", None, 1_004);
        assert!(step(&mut store, (KEY, rev), &next, None).await.expect("store").is_some());
        let late = advanced(&before_death, "lb0", None, 1_004);
        assert_eq!(step(&mut store, (KEY, stale_rev), &late, None).await.expect("store"), None);
        while let Some((cur, rev)) = read_record(&mut store, KEY).await.expect("read") {
            if cur.at >= cur.ops.len() {
                let next = ended(&cur, COMPLETE, None, "lb1", 1_010);
                assert!(step(&mut store, (KEY, rev), &next, None).await.expect("store").is_some());
                break;
            }
            let next = advanced(&cur, "lb1", None, 1_005);
            assert!(step(&mut store, (KEY, rev), &next, None).await.expect("store").is_some());
        }
        let done = store.record(KEY);
        assert_eq!(done.state, COMPLETE);
        let steps: Vec<&str> = done.history.iter().filter_map(|h| h.split(' ').next()).collect();
        assert_eq!(steps, ["1", "2", "3", "4", "5", "complete"], "{:?}", done.history);
        assert!(done.history[1].ends_with("by lb0") && done.history[2].ends_with("by lb1"), "{:?}", done.history);
    }

    pub(super) fn fleet() -> Fleet {
        Fleet::new(crate::config::FleetConfig {
            endpoints: vec![],
            prefix: "/sw".into(),
            node: "lb1".into(),
            share_backends: false,
            lease_ttl: std::time::Duration::from_secs(10),
            compaction_interval: None,
        })
    }

    #[tokio::test]
    async fn operators_start_steer_and_abort_a_fleet_rollout_through_its_record() {
        let engine = Handle::start(crate::engine::tests::board()).expect("engine");
        let f = fleet();
        let mut store = FakeStore::default();
        let plan = || Some(vec!["10%".to_owned(), "pause 60s".to_owned(), "100%".to_owned()]);
        let start = async |f: &Fleet, store: &mut FakeStore| {
            f.start_rollout(&engine, store, "web", Colour::Green, plan(), false, "uid=0").await
        };
        let e = start(&f, &mut store).await.expect_err("no desired state yet");
        assert!(e.contains("no desired state"), "{e}");
        let mut canary = Desired::of(Colour::Blue);
        canary.canary_bp = 500;
        store.put(DESIRED, serde_json::to_string(&canary).expect("json"));
        let e = start(&f, &mut store).await.expect_err("a canary under way");
        assert!(e.contains("end that canary"), "{e}");
        store.put(DESIRED, serde_json::to_string(&Desired::of(Colour::Blue)).expect("json"));
        let (msg, change) = start(&f, &mut store).await.expect("started");
        assert!(msg.contains("fleet rollout blue → green started: 10%, pause 60s, 100%"), "{msg}");
        assert_eq!(change.what, "fleet rollout-start");
        let r = store.record(KEY);
        assert_eq!(r.ops, ["s1000", "p60", "s10000"]);
        assert_eq!((r.at, r.state.as_str(), r.from), (0, RUNNING, Colour::Blue));
        assert!(start(&f, &mut store).await.expect_err("one at a time").contains("under way"));
        let control =
            async |store: &mut FakeStore, action| f.control_rollout(&engine, store, "web", action, "uid=0").await;
        let e = control(&mut store, RolloutAction::Promote).await.expect_err("a share is not promoted");
        assert!(e.contains("nothing to promote at step 1 (10%)"), "{e}");
        // The driver wrote the first share: the record at the pause, the desired state at 10 %.
        let mut at_pause = advanced(&r, "lb0", None, 1_001);
        at_pause.share_bp = 1_000;
        store.put(KEY, serde_json::to_string(&at_pause).expect("json"));
        let mut ten = Desired::of(Colour::Blue);
        ten.canary_bp = 1_000;
        store.put(DESIRED, serde_json::to_string(&ten).expect("json"));
        control(&mut store, RolloutAction::Pause).await.expect("paused");
        assert!(store.record(KEY).paused);
        control(&mut store, RolloutAction::Resume).await.expect("resumed");
        assert!(!store.record(KEY).paused);
        control(&mut store, RolloutAction::Promote).await.expect("promoted");
        let r = store.record(KEY);
        assert_eq!(r.at, 2, "past the pause");
        assert!(r.history[1].starts_with("2 pause 60s by lb1: promoted by the operator"), "{:?}", r.history);
        // Abort: the record ends and new flows go back to blue, in one transaction.
        let (msg, _) = control(&mut store, RolloutAction::Abort).await.expect("aborted");
        assert!(msg.contains("back to blue on every node"), "{msg}");
        let r = store.record(KEY);
        assert_eq!((r.state.as_str(), r.share_bp), (ABORTED, 0));
        assert!(r.reason.as_deref().is_some_and(|w| w.contains("aborted by the operator on lb1")), "{r:?}");
        let d: Desired = serde_json::from_str(&store.kvs[DESIRED].0).expect("desired");
        assert_eq!((d.active, d.canary_bp), (Colour::Blue, 0));
        assert_eq!(store.kvs[KEY].1, store.kvs[DESIRED].1, "written in the same transaction");
        let e = control(&mut store, RolloutAction::Pause).await.expect_err("over");
        assert!(e.contains("no rollout of web under way"), "{e}");
        // A new rollout may start over the ended one.
        assert!(start(&f, &mut store).await.is_ok());
    }

    #[test]
    fn the_desired_state_a_rollout_expects_follows_its_share() {
        let r = rollout(&["10%", "100%"]);
        assert_eq!(expected(&r), (Colour::Blue, 0));
        assert_eq!(expected(&FleetRollout { share_bp: 1_000, ..r.clone() }), (Colour::Blue, 1_000));
        assert_eq!(expected(&FleetRollout { share_bp: BP_ALL, ..r }), (Colour::Green, 0));
    }
}
