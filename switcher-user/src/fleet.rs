//! Fleet mode: several load-balancer nodes follow one desired state kept in etcd.
//!
//! ```text
//! {prefix}/services/{name}  desired state of a service (JSON `Desired`), written by
//!                           `switcher cutover|rollback|weight` on any node, in a transaction
//!                           that checks the revision it read
//! {prefix}/nodes/{node}     what a node has applied (JSON `NodeState`), under the node's
//!                           lease: a node that stops renewing it disappears
//! {prefix}/compacted        the revision etcd's history was last compacted to, by a node
//! ```
//!
//! Each agent watches `services/`, applies every change to its own maps (the same inputs give
//! every node the same Maglev tables, so a flow that ECMP moves to another node still reaches
//! its backend) and publishes what it applied. When etcd is unreachable, a node keeps
//! forwarding with its last applied state, says so in status and metrics, and catches up when
//! etcd returns. A change made on one node only (`--local`, or any change while etcd is
//! unreachable, or a health-check failover) holds until the service's desired state changes.
//!
//! The writes stay few, so that etcd serves a fleet of a thousand nodes: a node publishes its
//! state when it changes, not on a timer (its lease, renewed without a write, says that it is
//! alive); open-flow counts, which change all the time under traffic, only when they moved by
//! a quarter or reached or left zero, and at most once a second. And etcd's history stays
//! bounded: every `compaction_interval_secs` the nodes race for one compare-and-swap of
//! `compacted`, and the one that wins compacts etcd to the revision of one interval before
//! (what Kubernetes' API server does), so etcd never fills its quota with old revisions.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};
use switcher_common::{BP_ALL, user::Colour};

use crate::{
    config::{BackendConfig, FleetConfig},
    engine::{
        Change, Handle, Maps, RemoteDrains, Switchboard, edit_pool,
        rules::{self, Ask, Decision, Refused, SwitchState},
    },
    protocol::{Desired, FleetService, FleetView, NodeService, NodeState, Request, Response, SharedBackend, percent},
};

/// How often a node compares what it would publish (flows, health, drains) with what it
/// published: a local look, no etcd call unless something changed.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often a node reads the other nodes' drains while one of its own runs and they hold
/// flows (while some have not applied its revision yet, at every check: they are about to).
const DRAINS_EVERY: Duration = Duration::from_secs(1);
/// The shortest time between two publications of a node for a change of its flow counts only.
const COUNTS_GAP: Duration = Duration::from_secs(1);
/// How often the published open-flow counts are refreshed by a walk of the flow table.
const FLOWS_EVERY: Duration = Duration::from_secs(10);
/// The base revision of an override made before this daemon read etcd: the first revision it
/// reads becomes the base.
const PENDING: i64 = i64::MAX;
/// How long a change waits for this node to apply it before answering.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// The switch state a desired state asks for, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub active: Colour,
    pub canary_bp: u32,
    pub previous: Option<Colour>,
    pub drain: Option<Duration>,
    /// Blue's and green's shared pools, when shared.
    pub pools: Option<[Vec<BackendConfig>; 2]>,
    /// Written by a rollback.
    pub rollback: bool,
}

/// The state a desired state asks for; a document no switcher wrote is an error, not a panic
/// (its colours were checked when it was parsed).
///
/// # Errors
/// What is wrong with it.
pub fn target(d: &Desired) -> Result<Target, String> {
    if d.canary_bp > BP_ALL {
        return Err(format!("canary_bp {} is above {BP_ALL}", d.canary_bp));
    }
    let pool = |p: &Option<Vec<SharedBackend>>| -> Result<Option<Vec<BackendConfig>>, String> {
        p.as_ref()
            .map(|list| {
                list.iter()
                    .map(|b| {
                        let addr = b.address.parse().map_err(|_| format!("{:?} is not ADDRESS:PORT", b.address))?;
                        if b.weight > 1000 {
                            return Err(format!("{}: weight {} is above 1000", b.address, b.weight));
                        }
                        Ok(BackendConfig { addr, weight: b.weight })
                    })
                    .collect()
            })
            .transpose()
    };
    let pools = match (pool(&d.blue)?, pool(&d.green)?) {
        (Some(b), Some(g)) => Some([b, g]),
        (None, None) => None,
        _ => return Err("a shared state has both pools or neither".into()),
    };
    Ok(Target {
        active: d.active,
        canary_bp: d.canary_bp,
        previous: d.previous,
        drain: d.drain_timeout_secs.map(Duration::from_secs),
        pools,
        rollback: d.rollback,
    })
}

fn shared(pool: &[BackendConfig]) -> Vec<SharedBackend> {
    pool.iter().map(|b| SharedBackend { address: b.addr.to_string(), weight: b.weight }).collect()
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The desired state that describes what `board` does now for `name` (to seed etcd).
fn seed<M: Maps>(board: &Switchboard<M>, name: &str, node: &str, share: bool) -> Option<Desired> {
    let (active, canary_bp, previous, config) = board.snapshot(name)?;
    Some(Desired {
        active,
        canary_bp,
        previous,
        drain_timeout_secs: None,
        rollback: false,
        blue: share.then(|| shared(&config.blue)),
        green: share.then(|| shared(&config.green)),
        change: "seeded from the first node's state".into(),
        changed_by: node.to_owned(),
        at_unix: now_unix(),
    })
}

/// The next desired state for `req` from `cur` (its `change` says what changed), checked
/// against this node's view of the backends' health; `None` when nothing would change.
///
/// # Errors
/// Why the change is refused.
pub fn plan<M: Maps>(
    board: &Switchboard<M>,
    req: &Request,
    cur: &Desired,
    share: bool,
) -> Result<Option<Desired>, String> {
    let t = target(cur)?;
    let mut next = Desired { drain_timeout_secs: None, rollback: false, ..cur.clone() };
    let now = SwitchState { active: t.active, canary_bp: t.canary_bp, previous: t.previous };
    let (service, ask, force, drain) = match req {
        Request::Cutover { service, colour, drain_timeout_secs, force, .. } => {
            (service, Ask::Cutover(*colour), *force, *drain_timeout_secs)
        }
        Request::Rollback { service, force, .. } => (service, Ask::Rollback, *force, None),
        Request::Weight { service, colour, basis_points, force, .. } => {
            (service, Ask::Weight(*colour, *basis_points), *force, None)
        }
        _ => return plan_pools(board, req, t, next, share),
    };
    let decision = rules::decide(now, ask).map_err(|e| match e {
        Refused::NothingToRollBack { active } => format!(
            "nothing to roll back: the fleet's {service} has been {active} since its desired state was written; use `switcher cutover {service} COLOUR`"
        ),
        Refused::MoreThanAll(_) => e.to_string(),
    })?;
    let what = match decision {
        Decision::Unchanged => return Ok(None),
        Decision::Switch { to, rollback } => {
            board.check_switch(service, to, rollback, force)?;
            let after = now.then(to, 0);
            (next.active, next.canary_bp, next.previous) = (after.active, after.canary_bp, after.previous);
            next.rollback = rollback;
            if rollback {
                format!("rollback {} → {to}", t.active)
            } else {
                next.drain_timeout_secs = drain;
                format!("cutover {} → {to}", t.active)
            }
        }
        Decision::Canary(canary) if canary == t.canary_bp => return Ok(None),
        Decision::Canary(canary) => {
            board.check_canary(service, t.active, canary, force)?;
            next.canary_bp = canary;
            format!("weight {} {} → {}", t.active.other(), percent(t.canary_bp), percent(canary))
        }
    };
    next.change = what;
    next.at_unix = now_unix();
    Ok(Some(next))
}

/// [`plan`] for a backend added or removed from a shared pool (`share_backends`).
fn plan_pools<M: Maps>(
    board: &Switchboard<M>,
    req: &Request,
    t: Target,
    mut next: Desired,
    share: bool,
) -> Result<Option<Desired>, String> {
    let what = match req {
        Request::BackendAdd { service, colour, address, .. } | Request::BackendRemove { service, colour, address }
            if share =>
        {
            let weight = match req {
                Request::BackendAdd { weight, .. } => Some(weight.unwrap_or(1)),
                _ => None,
            };
            let c = *colour;
            let (_, _, _, config) = board.snapshot(service).ok_or_else(|| format!("unknown service {service:?}"))?;
            let [mut blue, mut green] = t.pools.unwrap_or([config.blue.clone(), config.green.clone()]);
            let pool = if c == Colour::Blue { &mut blue } else { &mut green };
            let live = c == t.active || (t.canary_bp > 0 && c == t.active.other());
            let (addr, _) = edit_pool(&config, c, pool, address, weight, live)?;
            next.blue = Some(shared(&blue));
            next.green = Some(shared(&green));
            match weight {
                Some(w) => format!("backend add {c} {addr} weight {w}"),
                None => format!("backend remove {c} {addr}"),
            }
        }
        _ => return Err("not a change of the fleet's desired state".into()),
    };
    next.change = what;
    next.at_unix = now_unix();
    Ok(Some(next))
}

/// This node's part in the fleet: its view of etcd, of the desired state, and what it applied.
pub struct Fleet {
    pub config: FleetConfig,
    state: Mutex<State>,
    /// Wakes waiters when something was applied, and the publisher when there is news.
    applied: tokio::sync::Notify,
    publish: tokio::sync::Notify,
}

struct State {
    client: Option<Client>,
    since: Instant,
    error: Option<String>,
    /// name → (desired state, its mod revision), as last read.
    desired: HashMap<String, (Desired, i64)>,
    /// name → revision applied last.
    applied: HashMap<String, i64>,
    /// name → (the desired revision it overrides, why).
    overrides: HashMap<String, (i64, String)>,
    /// Desired states that could not be applied here, and why.
    problems: HashMap<String, String>,
    /// Local services missing in etcd are to be seeded (at start and after a reload).
    reseed: bool,
}

impl State {
    /// Why this node does not follow the desired state of `name` now: its local override,
    /// or a desired state it could not apply.
    fn not_following(&self, name: &str) -> Option<String> {
        self.overrides.get(name).map(|(_, why)| why.clone()).or_else(|| self.problems.get(name).cloned())
    }
}

/// A failed write: refused (a message for the operator), or etcd did not answer.
enum WriteError {
    Refused(String),
    Etcd(String),
}

impl From<etcd_client::Error> for WriteError {
    fn from(e: etcd_client::Error) -> Self {
        WriteError::Etcd(etcd_error(&e))
    }
}

impl Fleet {
    #[must_use]
    pub fn new(config: FleetConfig) -> Fleet {
        Fleet {
            config,
            state: Mutex::new(State {
                client: None,
                since: Instant::now(),
                error: Some("not connected yet".into()),
                desired: HashMap::new(),
                applied: HashMap::new(),
                overrides: HashMap::new(),
                problems: HashMap::new(),
                reseed: true,
            }),
            applied: tokio::sync::Notify::new(),
            publish: tokio::sync::Notify::new(),
        }
    }

    fn services_prefix(&self) -> String {
        format!("{}/services/", self.config.prefix)
    }

    fn service_key(&self, name: &str) -> String {
        format!("{}/services/{name}", self.config.prefix)
    }

    fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.config.prefix)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether etcd answered last time.
    #[must_use]
    pub fn connected(&self) -> bool {
        self.lock().client.is_some()
    }

    /// After a reload: seed services that are new here, and apply the desired state again.
    pub fn resync(&self) {
        let mut st = self.lock();
        st.reseed = true;
        st.applied.clear();
        drop(st);
        self.publish.notify_one();
    }

    /// A change made on this node by the emergency path (`--local`) while its daemon was down:
    /// like [`Fleet::note_override`], it holds until the service's desired state changes, but
    /// its base is the first desired state this daemon reads (it did not know etcd's when the
    /// change was made).
    pub fn note_emergency_override(&self, name: &str) {
        let why = "changed on this node by the emergency path (--local) while its daemon was down".to_owned();
        tracing::warn!(service = %name, "this node differs from the fleet's desired state: {why}; it holds until that desired state changes");
        self.lock().overrides.insert(name.to_owned(), (PENDING, why));
        self.publish.notify_one();
    }

    /// A change this node made on its own (`--local`, etcd down, health failover): it holds
    /// until the service's desired state changes.
    pub fn note_override(&self, name: &str, why: String) {
        let mut st = self.lock();
        let base = st.desired.get(name).map_or(0, |(_, r)| *r);
        tracing::warn!(service = %name, "this node now differs from the fleet's desired state: {why}");
        st.overrides.insert(name.to_owned(), (base, why));
        drop(st);
        self.publish.notify_one();
    }

    /// This node's view, without the other nodes.
    #[must_use]
    pub fn local_view(&self, services: &[String]) -> FleetView {
        let st = self.lock();
        FleetView {
            node: self.config.node.clone(),
            endpoints: self.config.endpoints.clone(),
            connected: st.client.is_some(),
            since_secs: st.since.elapsed().as_secs(),
            error: st.error.clone(),
            services: services
                .iter()
                .map(|name| FleetService {
                    name: name.clone(),
                    desired: st.desired.get(name).map(|(d, _)| d.clone()),
                    revision: st.desired.get(name).map_or(0, |(_, r)| *r),
                    applied_revision: st.applied.get(name).copied().unwrap_or(0),
                    local_override: st.not_following(name),
                })
                .collect(),
            nodes: Vec::new(),
            revision: 0,
        }
    }

    fn set_connected(&self, client: Option<Client>, error: Option<String>) {
        let mut st = self.lock();
        if st.client.is_some() != client.is_some() {
            st.since = Instant::now();
            match &error {
                Some(e) => {
                    tracing::warn!("etcd unreachable ({e}): forwarding goes on with the last applied state; retrying")
                }
                None => tracing::info!(endpoints = ?self.config.endpoints, "connected to etcd"),
            }
        }
        st.client = client;
        st.error = error;
    }

    /// Records a desired state read from etcd; says whether this node is to apply it: not when
    /// it already has it, or holds an override that is newer.
    fn takes(&self, name: &str, desired: &Desired, rev: i64) -> bool {
        let mut st = self.lock();
        st.desired.insert(name.to_owned(), (desired.clone(), rev));
        if let Some((base, why)) = st.overrides.get_mut(name) {
            if *base == PENDING {
                // An emergency change overrides the desired state etcd has now.
                *base = rev;
            }
            if rev <= *base {
                return false;
            }
            tracing::info!(service = %name, revision = rev, "the fleet's desired state changed: the local override ({why}) ends");
            st.overrides.remove(name);
        }
        !st.applied.get(name).is_some_and(|a| *a >= rev)
    }

    /// Applies one desired state read from etcd, unless this node already has it or holds an
    /// override that is newer.
    async fn apply<M: Maps + Send + 'static>(
        &self,
        engine: &Handle<M>,
        name: &str,
        desired: Desired,
        rev: i64,
    ) -> Option<Change> {
        if !self.takes(name, &desired, rev) {
            return None;
        }
        let result = match target(&desired) {
            Err(e) => Err(e),
            Ok(t) => {
                let name = name.to_owned();
                engine
                    .call(move |b| {
                        if b.snapshot(&name).is_none() {
                            return Err(format!(
                                "{name} is in the fleet's desired state but not configured on this node"
                            ));
                        }
                        b.apply_desired(&name, t.active, t.canary_bp, t.drain, t.pools, t.rollback)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            }
        };
        let mut st = self.lock();
        let change = match result {
            Ok(change) => {
                st.applied.insert(name.to_owned(), rev);
                st.problems.remove(name);
                change
            }
            Err(e) => {
                if st.problems.get(name) != Some(&e) {
                    tracing::warn!(service = %name, revision = rev, "cannot apply the fleet's desired state: {e}");
                }
                st.problems.insert(name.to_owned(), e);
                None
            }
        };
        drop(st);
        self.applied.notify_waiters();
        self.publish.notify_one();
        change
    }

    /// Handles a change request of an operator in fleet mode: written to etcd (checking the
    /// revision it read), then applied here by the watch like on every other node. With
    /// `--local`, or when etcd cannot be reached, it is applied on this node only.
    pub async fn propose<M: Maps + Send + 'static>(
        &self,
        engine: &Handle<M>,
        req: Request,
        who: &str,
    ) -> (Response, Option<Change>) {
        let backends = matches!(req, Request::BackendAdd { .. } | Request::BackendRemove { .. });
        if req.scope().is_some_and(|s| s.local) {
            return self.local(engine, req, "changed on this node only (--local)".into(), None).await;
        }
        let client = self.lock().client.clone();
        let error = match client {
            Some(mut client) => match self.write(&mut client, engine, &req, who).await {
                Ok(r) => return r,
                Err(WriteError::Refused(msg)) => return (Response::error(msg), None),
                Err(WriteError::Etcd(e)) => e,
            },
            None => self.lock().error.clone().unwrap_or_else(|| "not connected".into()),
        };
        if backends {
            return (
                Response::error(format!(
                    "etcd is unreachable ({error}): the fleet's shared pools cannot change now; nothing changed"
                )),
                None,
            );
        }
        self.local(engine, req, format!("changed on this node only while etcd was unreachable ({error})"), Some(error))
            .await
    }

    /// Applies a change on this node only and records the override.
    async fn local<M: Maps + Send + 'static>(
        &self,
        engine: &Handle<M>,
        req: Request,
        why: String,
        error: Option<String>,
    ) -> (Response, Option<Change>) {
        let name = req.service().unwrap_or_default().to_owned();
        let (mut resp, change) = match engine.call(move |b| b.handle(req)).await {
            Ok(answer) => answer,
            Err(e) => return (Response::error(e.to_string()), None),
        };
        if resp.ok && change.is_some() {
            self.note_override(&name, why.clone());
            let desired = self.lock().desired.get(&name).map(|(d, r)| (d.active, *r));
            let note = match (error, desired) {
                (Some(e), Some((active, rev))) => format!(
                    "\nnote: etcd is unreachable ({e}): applied on node {} only. The fleet's desired state still says {active} (revision {rev}); this node keeps its own until that changes.",
                    self.config.node
                ),
                (Some(e), None) => {
                    format!("\nnote: etcd is unreachable ({e}): applied on node {} only.", self.config.node)
                }
                (None, _) => format!(
                    "\nnote: applied on node {} only; it holds until the fleet's desired state of {name} changes.",
                    self.config.node
                ),
            };
            if let Some(m) = &mut resp.message {
                m.push_str(&note);
            }
        }
        (resp, change)
    }

    async fn write<M: Maps + Send + 'static>(
        &self,
        client: &mut Client,
        engine: &Handle<M>,
        req: &Request,
        who: &str,
    ) -> Result<(Response, Option<Change>), WriteError> {
        let Some(name) = req.service().map(str::to_owned) else {
            return Err(WriteError::Refused("not a change".into()));
        };
        let if_revision = req.scope().and_then(|s| s.if_revision);
        let key = self.service_key(&name);
        let got = client.get(key.clone(), None).await?;
        let (cur, rev) = match got.kvs().first() {
            Some(kv) => (parse_desired(kv).map_err(WriteError::Refused)?, kv.mod_revision()),
            None => {
                let (service, node, share) = (name.clone(), self.config.node.clone(), self.config.share_backends);
                let seeded = engine
                    .call(move |b| seed(b, &service, &node, share))
                    .await
                    .map_err(|e| WriteError::Refused(e.to_string()))?;
                let d = seeded.ok_or_else(|| {
                    WriteError::Refused(format!("unknown service {name:?}: it is not configured on this node"))
                })?;
                (d, 0)
            }
        };
        if let Some(expected) = if_revision
            && expected != rev
        {
            return Err(WriteError::Refused(format!(
                "conflict: the fleet's desired state of {name} is at revision {rev} ({}), not {expected} as you read it; nothing was written. Check `switcher fleet status` and run the command again.",
                describe(&cur)
            )));
        }
        let planned = {
            let (req, cur, share) = (req.clone(), cur.clone(), self.config.share_backends);
            engine
                .call(move |b| plan(b, &req, &cur, share))
                .await
                .map_err(|e| WriteError::Refused(e.to_string()))?
                .map_err(WriteError::Refused)?
        };
        let Some(mut next) = planned else {
            return Ok((
                Response {
                    ok: true,
                    message: Some(format!(
                        "{name}: the fleet's desired state is already {} (revision {rev}); nothing written",
                        cur.active
                    )),
                    revision: Some(rev),
                    ..Response::default()
                },
                None,
            ));
        };
        next.changed_by = format!("{} ({who})", self.config.node);
        let what = next.change.clone();
        let value = serde_json::to_string(&next).map_err(|e| WriteError::Refused(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = client.txn(txn).await?;
        if !resp.succeeded() {
            let now = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (parse_desired(kv), kv.mod_revision())),
                _ => None,
            });
            let detail = match now {
                Some((Ok(d), r)) => format!("now revision {r}: {}", describe(&d)),
                _ => "it was deleted".into(),
            };
            return Err(WriteError::Refused(format!(
                "conflict: the fleet's desired state of {name} changed while this change was being made ({detail}); nothing was written. Check `switcher fleet status` and run the command again."
            )));
        }
        let written = resp.header().map_or(rev, etcd_client::ResponseHeader::revision);
        tracing::info!(service = %name, revision = written, "wrote the fleet's desired state: {what}");
        // This node applies it through its watch, like every other node: wait for that.
        let started = Instant::now();
        let applied = tokio::time::timeout(APPLY_WAIT, async {
            loop {
                let notified = self.applied.notified();
                if self.lock().applied.get(&name).is_some_and(|a| *a >= written) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok();
        let here = if applied {
            format!("applied here in {} ms", started.elapsed().as_millis())
        } else {
            "not applied here yet".to_owned()
        };
        let status = {
            let name = name.clone();
            engine.call(move |b| b.status(Some(&name)).ok()).await.ok().flatten()
        };
        let change = Change {
            service: name.clone(),
            what: format!("fleet {}", what.split(' ').next().unwrap_or("change")),
            from: format!("revision {rev}"),
            to: format!("revision {written}: {what}"),
        };
        Ok((
            Response {
                ok: true,
                message: Some(format!(
                    "{name}: {what} written to the fleet at revision {written}; {here}. `switcher fleet status` shows every node."
                )),
                services: status.map(|s| s.services).unwrap_or_default(),
                revision: Some(written),
                ..Response::default()
            },
            Some(change),
        ))
    }

    /// Every node's published state and the desired state, read from etcd now.
    pub async fn view_all(&self, services: &[String]) -> Response {
        let mut view = self.local_view(services);
        let client = self.lock().client.clone();
        let Some(mut client) = client else {
            return Response {
                ok: false,
                error: Some(format!(
                    "etcd is unreachable ({}): the other nodes cannot be seen from here. This node forwards with the desired state it applied last.",
                    view.error.clone().unwrap_or_default()
                )),
                fleet: Some(view),
                ..Response::default()
            };
        };
        let nodes = client.get(self.nodes_prefix(), Some(GetOptions::new().with_prefix())).await;
        let desired = client.get(self.services_prefix(), Some(GetOptions::new().with_prefix())).await;
        match (nodes, desired) {
            (Ok(nodes), Ok(desired)) => {
                view.revision = nodes.header().map_or(0, etcd_client::ResponseHeader::revision);
                view.nodes = nodes.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
                view.nodes.sort_by(|a: &NodeState, b| a.node.cmp(&b.node));
                let prefix = self.services_prefix();
                for kv in desired.kvs() {
                    let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else { continue };
                    let Ok(d) = parse_desired(kv) else { continue };
                    match view.services.iter_mut().find(|s| s.name == name) {
                        Some(s) => {
                            s.desired = Some(d);
                            s.revision = kv.mod_revision();
                        }
                        None => view.services.push(FleetService {
                            name: name.to_owned(),
                            desired: Some(d),
                            revision: kv.mod_revision(),
                            applied_revision: 0,
                            local_override: Some("not configured on this node".into()),
                        }),
                    }
                }
                Response { ok: true, fleet: Some(view), ..Response::default() }
            }
            (Err(e), _) | (_, Err(e)) => Response {
                ok: false,
                error: Some(format!("reading the fleet from etcd: {e}")),
                fleet: Some(view),
                ..Response::default()
            },
        }
    }

    /// The fleet as [`Fleet::view_all`] sees it, once something under the fleet's prefix
    /// changed after revision `after`, or after `wait` with nothing new: a follower (`--wait`)
    /// reads the whole fleet once per change instead of polling it.
    pub async fn view_after(&self, services: &[String], after: i64, wait: Duration) -> Response {
        let client = self.lock().client.clone();
        if let Some(mut client) = client.filter(|_| after > 0) {
            let opts = WatchOptions::new().with_prefix().with_start_revision(after + 1);
            match client.watch(format!("{}/", self.config.prefix), Some(opts)).await {
                Ok(mut stream) => {
                    // News: events, or a cancellation (`after` was compacted), or an error;
                    // not the confirmation that the watch was created. Dropping the stream
                    // ends the watch.
                    let _ = tokio::time::timeout(wait, async {
                        while let Ok(Some(msg)) = stream.message().await {
                            if !msg.events().is_empty() || msg.canceled() {
                                break;
                            }
                        }
                    })
                    .await;
                }
                Err(e) => tracing::debug!("watch for a follower: {}", etcd_error(&e)),
            }
        }
        self.view_all(services).await
    }

    /// What this node publishes.
    async fn node_state<M: Maps + Send + 'static>(&self, engine: &Handle<M>) -> NodeState {
        let observed = engine.call(|b| b.observed()).await.unwrap_or_default();
        let st = self.lock();
        NodeState {
            node: self.config.node.clone(),
            at_unix: now_unix(),
            services: observed
                .into_iter()
                .map(|o| NodeService {
                    applied_revision: st.applied.get(&o.name).copied().unwrap_or(0),
                    local_override: st.not_following(&o.name),
                    active: o.active,
                    canary_bp: o.canary_bp,
                    live_flows: o.live_flows,
                    draining: o.draining,
                    healthy_blue: o.healthy[0],
                    healthy_green: o.healthy[1],
                    name: o.name,
                })
                .collect(),
        }
    }
}

/// An etcd client error in a few words: the transport's own messages run to several lines
/// of nested causes, which status and logs do not need.
#[must_use]
pub fn etcd_error(e: &etcd_client::Error) -> String {
    let full = e.to_string();
    let lower = full.to_lowercase();
    let short = if lower.contains("connection refused") {
        "connection refused"
    } else if lower.contains("broken pipe")
        || lower.contains("connection reset")
        || lower.contains("h2 protocol error")
        || lower.contains("error reading a body")
    {
        "connection lost"
    } else if lower.contains("timed out") || lower.contains("deadline") || lower.contains("timeout") {
        "timed out"
    } else if lower.contains("dns error") || lower.contains("failed to lookup") {
        "cannot resolve the endpoint's host name"
    } else {
        return full.chars().take(160).collect();
    };
    short.to_owned()
}

fn parse_desired(kv: &KeyValue) -> Result<Desired, String> {
    serde_json::from_slice(kv.value())
        .map_err(|e| format!("the desired state at {} is not switcher's: {e}", kv.key_str().unwrap_or("?")))
}

/// "green (cutover blue → green by lb1 (uid=0) 12s ago)".
fn describe(d: &Desired) -> String {
    let ago = now_unix().saturating_sub(d.at_unix);
    let canary = if d.canary_bp > 0 { format!(", canary {}", percent(d.canary_bp)) } else { String::new() };
    format!("{}{canary}: {} by {}, {ago}s ago", d.active, d.change, d.changed_by)
}

/// Runs the node's side of the fleet until aborted: connect, seed, read, watch, publish;
/// reconnect with back-off when etcd goes away.
pub async fn run<M: Maps + Send + 'static>(
    fleet: Arc<Fleet>,
    engine: Handle<M>,
    record: impl Fn(&str, &Change) + Send + Sync + 'static,
) {
    // In a fleet, a drain ends only when no node holds flows of the draining colour: the
    // switchboard waits for a view of the other nodes taken after each drain began.
    let _ = engine.call(|b| b.set_remote_drains(HashMap::new())).await;
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let e = session(&fleet, &engine, &record).await;
        fleet.set_connected(None, Some(e));
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
}

/// One connection to etcd, until it fails; returns why.
async fn session<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    record: &impl Fn(&str, &Change),
) -> String {
    match session_inner(fleet, engine, record).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    record: &impl Fn(&str, &Change),
) -> Result<std::convert::Infallible, String> {
    let e = |e: etcd_client::Error| etcd_error(&e);
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    let mut client = Client::connect(&fleet.config.endpoints, Some(opts)).await.map_err(e)?;
    let all = read_desired(fleet, engine, &mut client).await?;
    let revision = all.header().map_or(0, etcd_client::ResponseHeader::revision);
    let ttl = i64::try_from(fleet.config.lease_ttl.as_secs()).unwrap_or(10);
    let lease = client.lease_grant(ttl, None).await.map_err(e)?.id();
    let (mut keeper, mut keepalive) = client.lease_keep_alive(lease).await.map_err(e)?;
    let mut watch = client
        .watch(fleet.services_prefix(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
        .await
        .map_err(e)?;
    // This node's own key: published only on change, so if it goes (deleted by hand, a lease
    // revoked), it is written again at once rather than at the next change.
    let own_key = format!("{}{}", fleet.nodes_prefix(), fleet.config.node);
    let mut own = client
        .watch(
            own_key,
            Some(WatchOptions::new().with_start_revision(revision + 1).with_filters([WatchFilterType::NoPut])),
        )
        .await
        .map_err(e)?;
    fleet.set_connected(Some(client.clone()), None);
    apply_kvs(fleet, engine, record, all.kvs()).await;
    let mut publisher = Publisher { lease, last: None };
    publisher.publish(fleet, engine, &mut client, false).await?;
    let mut renew = tokio::time::interval(fleet.config.lease_ttl / 3);
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut flows_counted = Instant::now();
    // When the other nodes' drains may be read next.
    let mut drains_next = Instant::now();
    // Never fires without compaction (a day is as good as never: `interval` needs a period).
    let every = fleet.config.compaction_interval.unwrap_or(Duration::from_secs(86_400));
    let mut compact = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut compactor = Compactor::default();
    loop {
        tokio::select! {
            msg = watch.message() => {
                let msg = msg.map_err(e)?.ok_or("the watch on etcd ended")?;
                if msg.canceled() {
                    return Err(format!("the watch on etcd was cancelled: {}", msg.cancel_reason()));
                }
                let puts: Vec<KeyValue> = msg
                    .events()
                    .iter()
                    .filter(|ev| ev.event_type() == etcd_client::EventType::Put)
                    .filter_map(|ev| ev.kv().cloned())
                    .collect();
                for ev in msg.events().iter().filter(|ev| ev.event_type() == etcd_client::EventType::Delete) {
                    if let Some(kv) = ev.kv() {
                        tracing::warn!(key = kv.key_str().unwrap_or("?"), "a desired state was deleted from etcd; this node keeps what it has");
                    }
                }
                apply_kvs(fleet, engine, record, &puts).await;
                publisher.publish(fleet, engine, &mut client, false).await?;
            }
            msg = own.message() => {
                let msg = msg.map_err(e)?.ok_or("the watch on etcd ended")?;
                if msg.canceled() {
                    return Err(format!("the watch on etcd was cancelled: {}", msg.cancel_reason()));
                }
                if !msg.events().is_empty() {
                    tracing::warn!("this node's published state was deleted from etcd; publishing it again");
                    publisher.last = None;
                    publisher.publish(fleet, engine, &mut client, false).await?;
                }
            }
            _ = renew.tick() => keeper.keep_alive().await.map_err(e)?,
            answer = keepalive.message() => {
                let answer = answer.map_err(e)?.ok_or("the lease keep-alive stream ended")?;
                if answer.ttl() <= 0 {
                    return Err("this node's lease expired".into());
                }
            }
            _ = check.tick() => {
                if flows_counted.elapsed() >= FLOWS_EVERY {
                    let _ = engine.call(|b| drop(b.refresh_flows())).await;
                    flows_counted = Instant::now();
                }
                let draining = engine.call(|b| b.draining()).await.unwrap_or(false);
                if draining && Instant::now() >= drains_next {
                    let drains = remote_drains(fleet, &mut client).await?;
                    // A node listed with no flows has not applied this node's revision yet.
                    let behind = drains.values().flatten().any(|(_, flows)| *flows == 0);
                    drains_next = Instant::now() + if behind { CHECK_EVERY } else { DRAINS_EVERY };
                    let _ = engine.call(move |b| b.set_remote_drains(drains)).await;
                }
                if std::mem::take(&mut fleet.lock().reseed) {
                    let all = read_desired(fleet, engine, &mut client).await?;
                    apply_kvs(fleet, engine, record, all.kvs()).await;
                }
                publisher.publish(fleet, engine, &mut client, true).await?;
            }
            () = fleet.publish.notified() => publisher.publish(fleet, engine, &mut client, false).await?,
            _ = compact.tick(), if fleet.config.compaction_interval.is_some() => {
                compactor.round(fleet, &mut client).await;
            }
        }
    }
}

/// Seeds what etcd lacks, then reads every service's desired state.
/// The other nodes that still hold open flows of a draining colour, by service: a node's
/// drain ends only when no node holds any (connections that ECMP moves between nodes keep
/// their colour through the data path's drain flag meanwhile).
async fn remote_drains(fleet: &Fleet, client: &mut Client) -> Result<RemoteDrains, String> {
    let nodes =
        client.get(fleet.nodes_prefix(), Some(GetOptions::new().with_prefix())).await.map_err(|e| etcd_error(&e))?;
    let applied = fleet.lock().applied.clone();
    Ok(drains_elsewhere(
        nodes.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()),
        &fleet.config.node,
        &applied,
    ))
}

/// From the nodes' published states: who, other than `me`, holds open flows of a draining
/// colour, by service, as `(node, open flows)`. A node that has not applied the revision this
/// node applied last (`applied`) may still hold flows it has not reported: it is listed with 0.
fn drains_elsewhere(nodes: impl Iterator<Item = NodeState>, me: &str, applied: &HashMap<String, i64>) -> RemoteDrains {
    let mut out = RemoteDrains::new();
    for node in nodes.filter(|n| n.node != me) {
        for s in node.services {
            let behind = applied.get(&s.name).is_some_and(|&rev| s.applied_revision < rev);
            match s.draining.filter(|(_, n)| *n > 0) {
                Some((_, flows)) => out.entry(s.name).or_default().push((node.node.clone(), flows)),
                None if behind => out.entry(s.name).or_default().push((node.node.clone(), 0)),
                None => {}
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

async fn read_desired<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    client: &mut Client,
) -> Result<etcd_client::GetResponse, String> {
    seed_missing(fleet, engine, client).await?;
    client.get(fleet.services_prefix(), Some(GetOptions::new().with_prefix())).await.map_err(|e| etcd_error(&e))
}

/// Writes the desired state of local services etcd does not have yet (only if still absent).
async fn seed_missing<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    client: &mut Client,
) -> Result<(), String> {
    let (node, share) = (fleet.config.node.clone(), fleet.config.share_backends);
    // Each local service's desired state as this node has it, in one visit to the engine.
    let seeds: Vec<(String, Option<Desired>)> = engine
        .call(move |b| b.services().into_iter().map(|s| (s.name.clone(), seed(b, &s.name, &node, share))).collect())
        .await
        .unwrap_or_default();
    for (name, seeded) in seeds {
        let Some(d) = seeded else { continue };
        let key = fleet.service_key(&name);
        let value = serde_json::to_string(&d).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let r = client.txn(txn).await.map_err(|e| etcd_error(&e))?;
        if r.succeeded() {
            tracing::info!(service = %name, active = %d.active, "seeded the fleet's desired state from this node");
        }
    }
    fleet.lock().reseed = false;
    Ok(())
}

async fn apply_kvs<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    record: &impl Fn(&str, &Change),
    kvs: &[KeyValue],
) {
    let prefix = fleet.services_prefix();
    for kv in kvs {
        let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else { continue };
        match parse_desired(kv) {
            Ok(d) => {
                let by = format!("fleet revision {} ({})", kv.mod_revision(), d.changed_by);
                if let Some(c) = fleet.apply(engine, name, d, kv.mod_revision()).await {
                    record(&by, &c);
                }
            }
            Err(e) => {
                tracing::warn!(service = %name, "{e}; ignored");
                fleet.lock().problems.insert(name.to_owned(), e);
            }
        }
    }
}

/// Publishes this node's state under its lease when it changed (see [`news`]).
struct Publisher {
    lease: i64,
    /// What it published last in this session, and when.
    last: Option<(NodeState, Instant)>,
}

impl Publisher {
    /// Publishes what changed; flow counts only when `counts` (the periodic check) and not
    /// within [`COUNTS_GAP`] of the last publication.
    async fn publish<M: Maps + Send + 'static>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut Client,
        counts: bool,
    ) -> Result<(), String> {
        let state = fleet.node_state(engine).await;
        let due = match (&self.last, news(self.last.as_ref().map(|(s, _)| s), &state)) {
            (_, News::None) => false,
            (_, News::State) | (None, _) => true,
            (Some((_, at)), News::Counts) => counts && at.elapsed() >= COUNTS_GAP,
        };
        if !due {
            return Ok(());
        }
        let value = serde_json::to_string(&state).map_err(|e| e.to_string())?;
        let key = format!("{}{}", fleet.nodes_prefix(), fleet.config.node);
        client.put(key, value, Some(PutOptions::new().with_lease(self.lease))).await.map_err(|e| etcd_error(&e))?;
        self.last = Some((state, Instant::now()));
        Ok(())
    }
}

/// What is new in a node's state since it was last published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum News {
    None,
    /// Only open-flow counts: a drain's, or the active colour's by a quarter or to or from
    /// zero. Published at most once per [`COUNTS_GAP`].
    Counts,
    /// Anything else (what it applied, overrides, health, a drain beginning or ending):
    /// published at once.
    State,
}

fn news(last: Option<&NodeState>, next: &NodeState) -> News {
    let Some(last) = last else { return News::State };
    // Everything but the time and the counts.
    let shape = |n: &NodeState| NodeState {
        at_unix: 0,
        services: n
            .services
            .iter()
            .map(|s| NodeService { live_flows: 0, draining: s.draining.map(|(c, _)| (c, 0)), ..s.clone() })
            .collect(),
        ..n.clone()
    };
    if shape(last) != shape(next) {
        return News::State;
    }
    // From `a` published to `b` now: by more than a quarter of `a`, or to or from zero.
    let moved = |a: u64, b: u64| {
        (a == 0) != (b == 0) || b.saturating_mul(4) > a.saturating_mul(5) || b.saturating_mul(4) < a.saturating_mul(3)
    };
    let counts = last.services.iter().zip(&next.services).any(|(a, b)| {
        a.draining.as_ref().map(|d| d.1) != b.draining.as_ref().map(|d| d.1) || moved(a.live_flows, b.live_flows)
    });
    if counts { News::Counts } else { News::None }
}

/// Compacts etcd's history, one node per interval: the nodes race for a compare-and-swap of
/// `{prefix}/compacted` on the version each saw last; the winner compacts to the revision it
/// saw one interval ago, so that one interval of history stays for watches that lag.
#[derive(Default)]
struct Compactor {
    /// The version of the `compacted` key this node saw last (0: none yet).
    version: i64,
    /// etcd's revision at this node's last round (0: none yet).
    revision: i64,
}

impl Compactor {
    async fn round(&mut self, fleet: &Fleet, client: &mut Client) {
        match self.try_round(fleet, client).await {
            Ok(Some(rev)) => tracing::info!(revision = rev, "compacted etcd's history"),
            Ok(None) => {}
            Err(e) => tracing::warn!("compacting etcd's history: {e}; trying again in an interval"),
        }
    }

    async fn try_round(&mut self, fleet: &Fleet, client: &mut Client) -> Result<Option<i64>, String> {
        let key = format!("{}/compacted", fleet.config.prefix);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, self.version)])
            .and_then([TxnOp::put(key.clone(), self.revision.to_string(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await.map_err(|e| etcd_error(&e))?;
        let now = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let target = std::mem::replace(&mut self.revision, now);
        if !resp.succeeded() {
            // Another node won this round: follow its count.
            self.version = resp
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().map(KeyValue::version),
                    _ => None,
                })
                .unwrap_or(0);
            return Ok(None);
        }
        self.version += 1;
        if target <= 0 {
            return Ok(None);
        }
        match client.compact(target, None).await {
            Ok(_) => Ok(Some(target)),
            // Compacted further already (by etcd itself, or an operator): nothing to do.
            Err(e) if e.to_string().contains("compacted") => Ok(None),
            Err(e) => Err(etcd_error(&e)),
        }
    }
}

/// How a node relates to the desired state of a service, for `switcher fleet status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agreement {
    /// Applied the latest revision and does what it says.
    InStep,
    /// Has not applied the latest revision yet.
    Lags,
    /// Applied it, or holds an override, but does something else.
    Disagrees,
    /// The node does not have the service.
    Missing,
}

/// Compares a node's published state of a service with the desired state.
#[must_use]
pub fn agreement(node: &NodeState, name: &str, desired: &Desired, revision: i64) -> Agreement {
    let Some(s) = node.services.iter().find(|s| s.name == name) else { return Agreement::Missing };
    if s.active != desired.active || s.canary_bp != desired.canary_bp || s.local_override.is_some() {
        if s.applied_revision < revision && s.local_override.is_none() {
            return Agreement::Lags;
        }
        return Agreement::Disagrees;
    }
    if s.applied_revision < revision { Agreement::Lags } else { Agreement::InStep }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Scope;

    fn desired(active: &str) -> Desired {
        Desired::of(active.parse().expect("a colour"))
    }

    #[test]
    fn desired_states_are_checked_not_trusted() {
        let t = target(&desired("green")).expect("valid");
        assert_eq!((t.active, t.canary_bp, t.previous, t.pools), (Colour::Green, 0, None, None));
        let red = serde_json::from_str::<Desired>(r#"{"active":"red"}"#).expect_err("not a colour");
        assert!(red.to_string().contains("\"red\": unknown colour"), "{red}");
        assert!(target(&Desired { canary_bp: 10_001, ..desired("blue") }).is_err());
        let half = Desired {
            blue: Some(vec![SharedBackend { address: "198.51.100.2:80".into(), weight: 1 }]),
            ..desired("blue")
        };
        assert!(target(&half).expect_err("one pool only").contains("both pools"));
        let bad = Desired {
            blue: Some(vec![SharedBackend { address: "nowhere".into(), weight: 1 }]),
            green: Some(vec![]),
            ..desired("blue")
        };
        assert!(target(&bad).is_err());
        let ok = Desired {
            blue: Some(vec![SharedBackend { address: "198.51.100.2:80".into(), weight: 3 }]),
            green: Some(vec![]),
            previous: Some(Colour::Green),
            drain_timeout_secs: Some(5),
            ..desired("blue")
        };
        let t = target(&ok).expect("valid");
        assert_eq!(t.pools.map(|[b, g]| (b.len(), b[0].weight, g.len())), Some((1, 3, 0)));
        assert_eq!((t.previous, t.drain), (Some(Colour::Green), Some(Duration::from_secs(5))));
        // Unknown JSON is an error, never a panic.
        for text in ["", "{", "[]", "{\"active\":1}", "null"] {
            assert!(serde_json::from_str::<Desired>(text).is_err(), "{text}");
        }
    }

    fn req_cutover(colour: Option<Colour>) -> Request {
        Request::Cutover {
            service: "web".into(),
            colour,
            drain_timeout_secs: Some(30),
            force: false,
            scope: Scope::default(),
        }
    }

    #[test]
    fn changes_are_planned_from_the_desired_state_not_the_local_one() {
        let b = crate::engine::tests::board();
        let blue = desired("blue");
        // A cut-over to the idle colour records where it came from and its drain timeout.
        let next = plan(&b, &req_cutover(None), &blue, false).expect("ok").expect("a change");
        assert_eq!(
            (next.active, next.previous, next.drain_timeout_secs),
            (Colour::Green, Some(Colour::Blue), Some(30))
        );
        assert_eq!(next.change, "cutover blue → green");
        // Nothing to do is not a write.
        assert_eq!(plan(&b, &req_cutover(Some(Colour::Blue)), &blue, false), Ok(None));
        // A rollback needs a previous colour in the *desired* state.
        let rollback = Request::Rollback { service: "web".into(), force: false, scope: Scope::default() };
        let e = plan(&b, &rollback, &blue, false).expect_err("nothing to roll back");
        assert!(e.contains("nothing to roll back"), "{e}");
        let back = plan(&b, &rollback, &next, false).expect("ok").expect("a change");
        assert_eq!((back.active, back.previous, back.drain_timeout_secs), (Colour::Blue, Some(Colour::Green), None));
        // Weights: a share for the idle colour is a canary; 100 % of it is a cut-over.
        let weight = |c: Colour, bp| Request::Weight {
            service: "web".into(),
            colour: c,
            basis_points: bp,
            force: false,
            scope: Scope::default(),
        };
        let canary = plan(&b, &weight(Colour::Green, 500), &blue, false).expect("ok").expect("a change");
        assert_eq!((canary.active, canary.canary_bp), (Colour::Blue, 500));
        assert_eq!(canary.change, "weight green 0% → 5%");
        let all = plan(&b, &weight(Colour::Green, 10_000), &blue, false).expect("ok").expect("a change");
        assert_eq!((all.active, all.canary_bp), (Colour::Green, 0));
        assert!(plan(&b, &weight(Colour::Green, 10_001), &blue, false).is_err());
        // A colour without backends is refused; so is an unknown service.
        let solo = Request::Cutover {
            service: "solo".into(),
            colour: None,
            drain_timeout_secs: None,
            force: true,
            scope: Scope::default(),
        };
        assert!(plan(&b, &solo, &blue, false).expect_err("no green").contains("no green backend"));
        let ghost = Request::Rollback { service: "ghost".into(), force: false, scope: Scope::default() };
        assert!(plan(&b, &ghost, &next, false).expect_err("unknown").contains("unknown service"));
    }

    #[test]
    fn shared_pools_are_edited_with_the_local_checks() {
        let b = crate::engine::tests::board();
        let blue = desired("blue");
        let add = Request::BackendAdd {
            service: "web".into(),
            colour: Colour::Green,
            address: "198.51.100.19:8080".into(),
            weight: Some(2),
        };
        // Without shared pools a backend change is not the fleet's business.
        assert!(plan(&b, &add, &blue, false).is_err());
        let next = plan(&b, &add, &blue, true).expect("ok").expect("a change");
        let green = next.green.clone().expect("green pool");
        assert_eq!(green.len(), 2, "seeded from the local pool, then added to: {green:?}");
        assert_eq!(green[1], SharedBackend { address: "198.51.100.19:8080".into(), weight: 2 });
        assert_eq!(next.blue.as_ref().map(Vec::len), Some(1));
        assert_eq!(next.change, "backend add green 198.51.100.19:8080 weight 2");
        // The last backend of the live colour cannot go.
        let remove =
            Request::BackendRemove { service: "web".into(), colour: Colour::Blue, address: "198.51.100.2:8080".into() };
        assert!(plan(&b, &remove, &next, true).expect_err("last live backend").contains("last blue backend"));
        // A wrong family is refused like locally.
        let v6 = Request::BackendAdd {
            service: "web".into(),
            colour: Colour::Green,
            address: "[2001:db8::1]:8080".into(),
            weight: None,
        };
        assert!(plan(&b, &v6, &next, true).is_err());
    }

    #[test]
    fn a_desired_state_is_applied_with_its_pools_and_canary() {
        let mut b = crate::engine::tests::board();
        let pools = [
            vec![BackendConfig { addr: "198.51.100.2:8080".parse().expect("addr"), weight: 1 }],
            vec![
                BackendConfig { addr: "198.51.100.18:8080".parse().expect("addr"), weight: 1 },
                BackendConfig { addr: "198.51.100.19:8080".parse().expect("addr"), weight: 3 },
            ],
        ];
        let change = b.apply_desired("web", Colour::Green, 250, None, Some(pools), false).expect("applied");
        assert!(change.is_some());
        let (active, canary, previous, config) = b.snapshot("web").expect("web");
        assert_eq!((active, canary, previous), (Colour::Green, 250, Some(Colour::Blue)));
        assert_eq!(config.green.len(), 2);
        // The same again changes nothing.
        assert_eq!(b.apply_desired("web", Colour::Green, 250, None, None, false), Ok(None));
        assert!(b.apply_desired("ghost", Colour::Green, 0, None, None, false).is_err());
    }

    fn fleet() -> Fleet {
        Fleet::new(FleetConfig {
            endpoints: vec![],
            prefix: "/switcher".into(),
            node: "lb1".into(),
            share_backends: false,
            lease_ttl: Duration::from_secs(10),
            compaction_interval: None,
        })
    }

    #[tokio::test]
    async fn an_emergency_local_change_holds_until_the_desired_state_changes() {
        let mut b = crate::engine::tests::board();
        // The emergency path (`--local`) moved web to green while the daemon was down; the
        // restarted daemon adopted green from the pinned maps.
        assert!(b.handle(req_cutover(Some(Colour::Green))).0.ok);
        let engine = Handle::start(b).expect("engine");
        let f = fleet();
        f.note_emergency_override("web");
        let active = async || engine.call(|b| b.snapshot("web").expect("web").0).await.expect("engine");
        // etcd still says blue (revision 5): the first read does not undo the emergency change.
        assert_eq!(f.apply(&engine, "web", desired("blue"), 5).await, None);
        assert_eq!(active().await, Colour::Green);
        assert!(
            f.local_view(&["web".into()]).services[0]
                .local_override
                .as_deref()
                .is_some_and(|w| w.contains("emergency path"))
        );
        assert_eq!(f.apply(&engine, "web", desired("blue"), 5).await, None, "read again after a reconnect");
        assert_eq!(active().await, Colour::Green);
        // The desired state changes: the node follows it again.
        assert!(f.apply(&engine, "web", desired("blue"), 6).await.is_some());
        assert_eq!(active().await, Colour::Blue);
        assert_eq!(f.local_view(&["web".into()]).services[0].local_override, None);
    }

    #[test]
    fn a_rollback_from_the_fleet_is_a_rollback_and_never_arms_the_watch() {
        use crate::engine::tests::{checked, probe};
        let mut b = crate::engine::tests::board();
        checked(&mut b, Some(Duration::from_secs(60)), false);
        probe(&mut b, "198.51.100.2:8080", true);
        probe(&mut b, "198.51.100.18:8080", true);
        let blue = desired("blue");
        let green = plan(&b, &req_cutover(Some(Colour::Green)), &blue, false).expect("ok").expect("a change");
        assert!(!green.rollback);
        let t = target(&green).expect("valid");
        b.apply_desired("web", t.active, t.canary_bp, t.drain, t.pools, t.rollback).expect("applied");
        let watch = |b: &mut Switchboard<_>| b.status(Some("web")).expect("status").services[0].watch_secs_left;
        assert!(watch(&mut b).is_some(), "a cut-over from the fleet arms the watch window");
        let rollback = Request::Rollback { service: "web".into(), force: false, scope: Scope::default() };
        let back = plan(&b, &rollback, &green, false).expect("ok").expect("a change");
        assert!(back.rollback, "the desired state says it was a rollback");
        let t = target(&back).expect("valid");
        let change = b.apply_desired("web", t.active, t.canary_bp, t.drain, t.pools, t.rollback).expect("applied");
        assert_eq!(change.map(|c| c.what), Some("rolled-back".into()));
        assert_eq!(watch(&mut b), None, "a rollback never arms the watch window");
        // Blue, rolled back to, fails: nothing rolls "back" forward to green.
        for _ in 0..3 {
            assert!(probe(&mut b, "198.51.100.2:8080", false).is_empty());
        }
        assert_eq!(b.snapshot("web").expect("web").0, Colour::Blue);
        // The next change is not a rollback any more.
        let again = plan(&b, &req_cutover(Some(Colour::Green)), &back, false).expect("ok").expect("a change");
        assert!(!again.rollback);
    }

    #[test]
    fn nodes_are_in_step_lagging_or_disagreeing() {
        let node = |active: &str, applied: i64, over: Option<&str>| NodeState {
            node: "lb1".into(),
            at_unix: 0,
            services: vec![NodeService {
                applied_revision: applied,
                local_override: over.map(Into::into),
                ..NodeService::of("web", active.parse().expect("a colour"))
            }],
        };
        let want = desired("green");
        assert_eq!(agreement(&node("green", 7, None), "web", &want, 7), Agreement::InStep);
        assert_eq!(agreement(&node("blue", 5, None), "web", &want, 7), Agreement::Lags);
        assert_eq!(agreement(&node("blue", 7, Some("rolled back locally")), "web", &want, 7), Agreement::Disagrees);
        assert_eq!(agreement(&node("blue", 5, Some("etcd down")), "web", &want, 7), Agreement::Disagrees);
        assert_eq!(agreement(&node("green", 7, None), "dns", &want, 7), Agreement::Missing);
    }

    #[test]
    fn a_drain_waits_for_the_other_nodes_that_hold_flows() {
        let node = |name: &str, draining: Option<(&str, u64)>| NodeState {
            node: name.into(),
            at_unix: 1,
            services: vec![NodeService {
                draining: draining.map(|(c, n)| (c.parse().expect("a colour"), n)),
                ..NodeService::of("web", Colour::Green)
            }],
        };
        let nodes = vec![
            node("lb0", Some(("blue", 5))),
            node("lb1", Some(("blue", 8))),
            node("lb2", Some(("blue", 0))),
            node("lb3", None),
        ];
        let none = HashMap::new();
        let d = drains_elsewhere(nodes.clone().into_iter(), "lb0", &none);
        assert_eq!(d.get("web"), Some(&vec![("lb1".to_owned(), 8)]), "not itself, not nodes with none left");
        assert!(drains_elsewhere(nodes.clone().into_iter().skip(2), "lb0", &none).is_empty());
        // Nodes that have not applied this node's revision yet may hold flows they have not
        // reported: they are waited for.
        let applied = HashMap::from([("web".to_owned(), 7)]);
        let d = drains_elsewhere(nodes.into_iter().skip(2), "lb0", &applied);
        assert_eq!(d.get("web"), Some(&vec![("lb2".to_owned(), 0), ("lb3".to_owned(), 0)]));
    }

    #[test]
    fn a_node_publishes_what_changed_not_the_time() {
        let state = |live: u64, draining: Option<u64>, applied: i64, at: u64| NodeState {
            node: "lb1".into(),
            at_unix: at,
            services: vec![NodeService {
                applied_revision: applied,
                live_flows: live,
                draining: draining.map(|n| (Colour::Blue, n)),
                healthy_blue: true,
                healthy_green: true,
                ..NodeService::of("web", Colour::Green)
            }],
        };
        let last = state(100, None, 7, 1);
        assert_eq!(news(None, &last), News::State, "the first publication of a session");
        assert_eq!(news(Some(&last), &state(100, None, 7, 99)), News::None, "time alone is no news");
        assert_eq!(news(Some(&last), &state(120, None, 7, 2)), News::None, "within a quarter");
        assert_eq!(news(Some(&last), &state(80, None, 7, 2)), News::None, "within a quarter");
        assert_eq!(news(Some(&last), &state(126, None, 7, 2)), News::Counts);
        assert_eq!(news(Some(&last), &state(74, None, 7, 2)), News::Counts);
        assert_eq!(news(Some(&state(0, None, 7, 1)), &state(1, None, 7, 2)), News::Counts, "leaving zero");
        assert_eq!(news(Some(&last), &state(0, None, 7, 2)), News::Counts, "reaching zero");
        // What it applied, and a drain beginning or ending, are published at once.
        assert_eq!(news(Some(&last), &state(100, None, 8, 2)), News::State);
        assert_eq!(news(Some(&last), &state(100, Some(5), 7, 2)), News::State);
        assert_eq!(news(Some(&state(100, Some(5), 7, 1)), &state(100, None, 7, 2)), News::State);
        // Every change of a drain's count is news: other nodes' drains wait on it.
        assert_eq!(news(Some(&state(100, Some(5), 7, 1)), &state(100, Some(4), 7, 2)), News::Counts);
        let mut down = last.clone();
        down.services[0].healthy_blue = false;
        assert_eq!(news(Some(&last), &down), News::State);
    }

    #[test]
    fn the_documents_round_trip() {
        let d = Desired {
            canary_bp: 500,
            previous: Some(Colour::Blue),
            change: "weight".into(),
            ..Desired::of(Colour::Green)
        };
        let text = serde_json::to_string(&d).expect("json");
        assert!(!text.contains("\"blue\":"), "unshared pools are left out: {text}");
        assert_eq!(serde_json::from_str::<Desired>(&text).expect("parse"), d);
        let n = NodeState {
            node: "lb2".into(),
            at_unix: 1,
            services: vec![NodeService { draining: Some((Colour::Blue, 3)), ..NodeService::of("web", Colour::Green) }],
        };
        let text = serde_json::to_string(&n).expect("json");
        assert_eq!(serde_json::from_str::<NodeState>(&text).expect("parse"), n);
    }
}
