//! Fleet mode: several load-balancer nodes follow one desired state kept in etcd.
//!
//! ```text
//! {prefix}/services/{name}  desired state of a service (JSON `Desired`), written by
//!                           `switcher cutover|rollback|weight` on any node, in a transaction
//!                           that checks the revision it read
//! {prefix}/nodes/{node}     a node's header (JSON `NodeState` without services), and
//! {prefix}/nodes/{node}/{s} what it applied for service `s` (JSON `NodeService`), all under
//!                           the node's lease: a node that stops renewing it disappears
//! {prefix}/compacted        the revision etcd's history was last compacted to, by a node
//! {prefix}/rollouts/{s}     a rollout of the fleet (JSON `FleetRollout`), and
//! {prefix}/rollouts/{s}/driver  the node that drives it, under its lease (see `rollout`)
//! {prefix}/counters/{s}/{node}  a node's counters of `s` while a rollout of it runs, under
//!                           its lease, for the driver's judgement
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
//!
//! - this module: the node's [`Fleet`] state, an operator's change (`propose`), the views;
//! - `plan`: the next desired state for a change, by the engine's switch rules;
//! - `session`: the connection to etcd (watch, apply, lease, seeding, other nodes' drains);
//! - `publish`: what the node publishes, and when; `compact`: etcd's history kept bounded;
//! - `rollout`: a rollout of the whole fleet, its record in etcd and the node that drives it.
//!
//! Layering: above the engine (which it drives through the engine's [`Handle`]), below the
//! agent; its documents are the protocol's ([`crate::protocol::fleet`]).

mod compact;
mod plan;
mod publish;
mod rollout;
mod session;

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, WatchOptions};

use self::plan::seed;
pub use self::{
    plan::{Target, plan, target},
    rollout::HookRunner,
    session::run,
};
use crate::{
    config::FleetConfig,
    engine::{Change, Handle, Maps},
    protocol::{Desired, FleetService, FleetView, NodeService, NodeState, Request, Response, percent},
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

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// This node's part in the fleet: its view of etcd, of the desired state, and what it applied.
pub struct Fleet {
    pub config: FleetConfig,
    state: Mutex<State>,
    /// Wakes waiters when something was applied, and the publisher when there is news.
    applied: tokio::sync::Notify,
    publish: tokio::sync::Notify,
    /// Runs the hooks of the rollouts this node drives (set by the agent).
    hooks: OnceLock<HookRunner>,
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
    /// The fleet's rollouts and their drivers, as last read.
    rollouts: rollout::Known,
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
                rollouts: rollout::Known::default(),
            }),
            applied: tokio::sync::Notify::new(),
            publish: tokio::sync::Notify::new(),
            hooks: OnceLock::new(),
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
                        let changed = b.apply_desired(&name, t.active, t.canary_bp, t.drain, t.pools, t.rollback)?;
                        if let Some((share_bp, ceiling)) = t.shadow {
                            b.apply_shadow(&name, share_bp, ceiling)?;
                        }
                        Ok(changed)
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
                view.nodes = publish::gather_nodes(&self.nodes_prefix(), publish::pairs(nodes.kvs()));
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
mod tests;
