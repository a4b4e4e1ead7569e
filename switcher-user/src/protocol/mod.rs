//! The agent's wire types, at the bottom of the crate: it depends on nothing else in it (a
//! unit test in `lib.rs` checks), so the CLI, the agent, the fleet and the metrics all speak
//! the same typed values. Colours, modes, health and drain actions are enums whose serde form
//! is the lowercase word the protocol always carried, so the JSON is unchanged.
//!
//! - this module: the control socket's requests and answers;
//! - [`fleet`]: the fleet's documents in etcd (desired state, a node's published state);
//! - `client`: framing (deadline), parsing, and the blocking client the CLI uses.
//!
//! The control socket's protocol: one JSON object per line each way, one request per
//! connection. Requests are at most [`MAX_REQUEST`] bytes; anything else is answered with an
//! error and the connection is closed.
//!
//! ```text
//! → {"op":"cutover","service":"web","colour":"green","deadline_ms":183204551}
//! ← {"ok":true,"message":"web: blue → green","services":[…]}
//! ```
//!
//! `deadline_ms` (optional) is the `CLOCK_MONOTONIC` time, in milliseconds, at which the client
//! stops waiting: a request the daemon gets to only after it is refused, never applied, so a
//! client that reported a timeout can trust that nothing changed.

mod client;
pub mod fleet;
pub mod flows;
mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use switcher_common::user::Colour;

pub use self::{
    client::{
        ANSWER_GRACE, ClientError, Deadline, MAX_REQUEST, TIMEOUT, parse_request, parse_request_line, request,
        request_line, too_late,
    },
    fleet::{Desired, FleetRollout, FleetShadow, NodeCounters, NodeService, NodeState, SharedBackend},
    flows::{FlowEntry, FlowGroup, FlowListing, FlowQuery, FlowSource, FlowState, FlowStop},
};

/// What a client asks of the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// All services, or one.
    Status {
        #[serde(default)]
        service: Option<String>,
    },
    /// Make `colour` (default: the idle one) the active colour of `service`; the old colour's
    /// flows drain, for at most `drain_timeout_secs` (default: the service's config).
    Cutover {
        service: String,
        #[serde(default, with = "wire::colour_opt")]
        colour: Option<Colour>,
        #[serde(default)]
        drain_timeout_secs: Option<u64>,
        /// Switch even to a colour whose health checks fail.
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
    /// Go back to the colour that was active before the last switch.
    Rollback {
        service: String,
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
    /// Send `basis_points` (0–10000) of new flows to `colour`, the rest to the other one.
    Weight {
        service: String,
        #[serde(with = "wire::colour")]
        colour: Colour,
        basis_points: u32,
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
    /// Re-read the configuration file and apply it (like SIGHUP); an invalid file changes
    /// nothing.
    Reload,
    /// Add a backend to a colour's pool (or change its weight).
    #[serde(rename = "backend-add")]
    BackendAdd {
        service: String,
        #[serde(with = "wire::colour")]
        colour: Colour,
        address: String,
        #[serde(default)]
        weight: Option<u32>,
    },
    /// Remove a backend from a colour's pool; its open flows stay until they end.
    #[serde(rename = "backend-remove")]
    BackendRemove {
        service: String,
        #[serde(with = "wire::colour")]
        colour: Colour,
        address: String,
    },
    /// The fleet: the desired state in etcd and every node's published state.
    Fleet,
    /// The fleet as for [`Request::Fleet`], answered once something under the fleet's prefix
    /// changed after etcd revision `after` (the `revision` of the view the client has), or
    /// after `wait_ms` (at most [`FLEET_WAIT_MAX`]) with nothing new: followers use it instead
    /// of polling.
    #[serde(rename = "fleet-wait")]
    FleetWait { after: i64, wait_ms: u64 },
    /// The open flows, filtered, or their counts per service, colour and backend: walked
    /// off the engine, in batches, up to a limit and a deadline (see [`flows`]).
    Flows(FlowQuery),
    /// Start a rollout of `service` to `colour`: the service's plan (or `steps`), each pause
    /// judged before the next share; `status` shows its progress.
    Rollout {
        service: String,
        #[serde(with = "wire::colour")]
        colour: Colour,
        /// The plan's steps (`"1%"`, `"pause 60s"`, …, `"100%"`) instead of the config's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        steps: Option<Vec<String>>,
        /// Start even when the new colour fails its health checks.
        #[serde(default)]
        force: bool,
    },
    /// Pause, resume, promote or abort a service's rollout.
    #[serde(rename = "rollout-control")]
    RolloutControl { service: String, action: RolloutAction },
    /// A DR drill: `share_bp` of new flows to the standby colour for `secs`, then back, with a
    /// report; `status` shows it as a rollout whose `drill` is true, and `RolloutControl`'s
    /// abort ends it.
    Drill { service: String, secs: u64, share_bp: u32 },
    /// Shadow traffic: copy `share_bp` (0: off) of a UDP service's new flows to the idle
    /// colour, at most `ceiling` copies per second (default: the service's config).
    Shadow {
        service: String,
        share_bp: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ceiling: Option<u32>,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
}

/// What an operator asks of a rollout under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    /// Stop going forward (a failing judgement still aborts).
    Pause,
    /// Go forward again.
    Resume,
    /// End the current pause, hold or watch now, without waiting for its judgement.
    Promote,
    /// Stop: new flows go back to the old colour, as a rollback.
    Abort,
    /// `switcher drill abort`: as `Abort`, refused when what is under way is a rollout.
    #[serde(rename = "abort-drill")]
    AbortDrill,
}

impl RolloutAction {
    /// The action to carry out once checked: `AbortDrill` is an `Abort`.
    #[must_use]
    pub fn checked(self) -> RolloutAction {
        if self == RolloutAction::AbortDrill { RolloutAction::Abort } else { self }
    }
}

/// The longest a [`Request::FleetWait`] waits: well within the client's answer timeout.
pub const FLEET_WAIT_MAX: Duration = Duration::from_secs(2);

impl Request {
    /// The service a request is about, if it is about one.
    #[must_use]
    pub fn service(&self) -> Option<&str> {
        match self {
            Request::Cutover { service, .. }
            | Request::Rollback { service, .. }
            | Request::Weight { service, .. }
            | Request::BackendAdd { service, .. }
            | Request::BackendRemove { service, .. }
            | Request::Rollout { service, .. }
            | Request::RolloutControl { service, .. }
            | Request::Drill { service, .. }
            | Request::Shadow { service, .. } => Some(service),
            Request::Status { service } => service.as_deref(),
            Request::Flows(q) => q.service.as_deref(),
            Request::Reload | Request::Fleet | Request::FleetWait { .. } => None,
        }
    }

    /// Where a switch applies in a fleet (`None`: not a switch).
    #[must_use]
    pub fn scope(&self) -> Option<&Scope> {
        match self {
            Request::Cutover { scope, .. }
            | Request::Rollback { scope, .. }
            | Request::Weight { scope, .. }
            | Request::Shadow { scope, .. } => Some(scope),
            _ => None,
        }
    }
}

/// Where a change applies when the daemon is part of a fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// This node only, not the fleet's desired state. It holds until the fleet's desired
    /// state of the service changes.
    #[serde(default)]
    pub local: bool,
    /// Write the fleet's desired state only if it is still at this revision (as
    /// `switcher fleet status` showed it): nobody changed it in between.
    #[serde(default)]
    pub if_revision: Option<i64>,
}

impl Scope {
    #[must_use]
    pub fn is_fleet_wide(&self) -> bool {
        *self == Scope::default()
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Data-path verdicts, `(reason, packets)`, on `status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<(String, u64)>,
    /// On `status`: how long ago the open flows shown were counted (they are counted in
    /// passes over the flow table, off the request path), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_counted_ms_ago: Option<u64>,
    /// On `status`: how long that count took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_count_took_ms: Option<u64>,
    /// On `status`: the flow table as the last complete pass over it found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_table: Option<FlowTable>,
    /// The etcd revision a fleet-wide change was written at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// Fleet mode: this node's view (on `status`), and every node's (on `fleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetView>,
    /// On `status`: what needs an operator's attention (the flow table near full).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// On `flows`: the flows, or their summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowListing>,
}

/// The entries of the flow table (sets of `FLOW_WAYS` slots: a new flow whose set is full
/// takes the slot of an ended flow, else of the set's least recently seen one), by state,
/// from the last complete pass over it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTable {
    /// Open flows, every service and colour.
    pub live: u64,
    /// TCP flows that saw FIN or RST.
    pub closing: u64,
    /// Open TCP flows idle past `tcp_idle_timeout_secs`.
    pub idle: u64,
    /// Entries of flows that are over, left for new flows to reuse.
    pub expired: u64,
    /// Entries the table holds at most (`max_flows`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// How full it is: open flows (live, closing and idle) of `capacity`, in basis points
    /// (when the capacity is known). From [`flows::FLOW_TABLE_WARN_BP`] on, `status` carries a
    /// warning (new flows then evict live ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_bp: Option<u32>,
}

impl FlowTable {
    /// Entries of flows that are not over.
    #[must_use]
    pub fn open(&self) -> u64 {
        self.live + self.closing + self.idle
    }

    /// This table with its capacity and fill set.
    #[must_use]
    pub fn with_capacity(self, capacity: u64) -> FlowTable {
        FlowTable { capacity: Some(capacity), fill_bp: Some(flows::fill_bp(self.open(), capacity)), ..self }
    }

    /// The warning for this table, if it is near full (its capacity known).
    #[must_use]
    pub fn warning(&self) -> Option<String> {
        flows::flow_table_warning(self.open(), self.capacity?)
    }
}

/// The fleet as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// This node's name.
    pub node: String,
    pub endpoints: Vec<String>,
    /// Whether etcd answers now.
    pub connected: bool,
    /// Seconds since it last connected or lost the connection.
    pub since_secs: u64,
    /// Why it is not connected.
    #[serde(default)]
    pub error: Option<String>,
    /// The desired state of each service, as last read, and how this node follows it.
    pub services: Vec<FleetService>,
    /// Every node's published state (on `fleet` only), by name.
    #[serde(default)]
    pub nodes: Vec<NodeState>,
    /// The etcd revision the nodes were read at (on `fleet` only; 0: not read).
    #[serde(default)]
    pub revision: i64,
}

/// One service's desired state and this node's relation to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetService {
    pub name: String,
    /// As last read from etcd (`None`: not read yet).
    #[serde(default)]
    pub desired: Option<Desired>,
    /// Its etcd mod revision.
    pub revision: i64,
    /// The revision this node applied last.
    pub applied_revision: i64,
    /// Why this node does not follow the desired state now, if it does not.
    #[serde(default)]
    pub local_override: Option<String>,
}

/// `12.5%` for 1250 basis points (the unit of every share in the protocol).
#[must_use]
pub fn percent(bp: u32) -> String {
    let s = format!("{}.{:02}", bp / 100, bp % 100);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

impl Response {
    #[must_use]
    pub fn error(msg: impl Into<String>) -> Response {
        Response { ok: false, error: Some(msg.into()), ..Response::default() }
    }
}

/// One service's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub port: u16,
    #[serde(default)]
    pub preview_port: Option<u16>,
    pub protocol: Protocol,
    pub mode: Mode,
    #[serde(with = "wire::colour")]
    pub active: Colour,
    /// The share of new flows sent to the idle colour, if any.
    #[serde(default)]
    pub canary: Option<Canary>,
    #[serde(default, with = "wire::colour_opt")]
    pub previous: Option<Colour>,
    /// Cut-overs and rollbacks since the daemon started.
    #[serde(default)]
    pub switches: u64,
    /// `switches` by kind.
    #[serde(default)]
    pub switch_kinds: SwitchKinds,
    /// Seconds since the last switch, if there was one.
    #[serde(default)]
    pub since_switch_secs: Option<u64>,
    /// Seconds left of the post-cut-over watch window (automatic rollback), if one runs.
    #[serde(default)]
    pub watch_secs_left: Option<u64>,
    /// The old colour's flows finishing after a switch.
    #[serde(default)]
    pub drain: Option<Drain>,
    pub colours: Vec<ColourStatus>,
    /// The rollout under way, or the last one (until the next starts or the daemon restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// After a rollout completed: the old colour, kept as the instant rollback target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Backup>,
    /// Shadow traffic to the idle colour: its share and what it did (when on, or when it
    /// copied anything since the maps were made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
}

/// A service's shadow traffic, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// Share of new flows copied, in basis points (0: off).
    pub share_bp: u32,
    /// Ceiling on copies per second.
    pub ceiling: u32,
    /// Where copies of new flows go now: the idle colour.
    #[serde(with = "wire::colour")]
    pub target: Colour,
    /// Both colours' shadow counters (since the maps were made).
    pub colours: Vec<ShadowColour>,
}

/// One colour's shadow counters: the live side (`shadowed`, its reply latency) when it
/// serves shadowed flows, the copy side (`sent` … `replies_dropped`, its reply latency) when
/// it is their idle colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowColour {
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    /// Datagrams of shadowed flows this colour served.
    pub shadowed: u64,
    /// Copies sent to this colour.
    pub sent: u64,
    /// Copies not made: over the ceiling.
    pub over_ceiling: u64,
    /// Copies that could not be made or sent (no backend, no route or neighbour).
    pub failed: u64,
    /// This colour's replies to copies, dropped before the client.
    pub replies_dropped: u64,
    /// Reply latency of this colour on shadowed flows: sum in ns and count.
    pub latency_ns: u64,
    pub latency_count: u64,
}

impl ShadowColour {
    /// Mean reply latency in microseconds, if any reply was timed.
    #[must_use]
    pub fn mean_latency_us(&self) -> Option<f64> {
        (self.latency_count > 0).then(|| self.latency_ns as f64 / self.latency_count as f64 / 1_000.0)
    }
}

/// A rollout of a service, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    #[serde(with = "wire::colour")]
    pub from: Colour,
    #[serde(with = "wire::colour")]
    pub to: Colour,
    /// `running`, `paused`, `holding` (inconclusive: too few flows to judge), `hook` (waiting
    /// for a hook), `watching`, `complete`, `aborted` or `interrupted` (another change
    /// to the service ended it); a completed rollout switched since: `rolled back` or
    /// `superseded` ([`RolloutStatus::switched_since`]).
    pub state: String,
    /// The step now (1-based; `steps.len() + 1` once over).
    pub step: usize,
    /// Every step, as words (`"10%"`, `"pause 60s"`, `"hook before_final"`, `"watch 60s"`).
    pub steps: Vec<String>,
    /// Seconds since the step began; once the rollout ended, since it ended.
    pub step_secs: u64,
    /// Share of new flows sent to `to` now, in 0.01 %.
    pub share_bp: u32,
    /// The last judgement, and why (`pass: …`, `inconclusive: …`, `fail: …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judgement: Option<String>,
    /// Why it ended, when it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A DR drill (`switcher drill`), not a release: its `judgement` is the drill's report.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drill: bool,
    /// In a fleet: the node driving the rollout now (none: no node drives it at the moment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// In a fleet: whose counters judge the pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_from: Option<String>,
}

impl RolloutStatus {
    /// A completed rollout (not a drill) is history: if the service was switched since (a
    /// rollback to the kept backup, a cut-over), it shows `rolled back` (every new flow back on
    /// `from`) or `superseded`, with `share_bp` the share `to` has now and the reason saying
    /// what holds. `active`, `share_of_to`: the service now.
    pub fn switched_since(&mut self, active: Colour, share_of_to: u32) {
        if self.state != "complete" || self.drill || share_of_to == self.share_bp {
            return;
        }
        let back = active == self.from && share_of_to == 0;
        self.state = if back { "rolled back" } else { "superseded" }.into();
        self.reason = Some(format!("{active} active, {} of new flows on {}", percent(share_of_to), self.to));
        self.share_bp = share_of_to;
    }
}

/// The share of new flows `colour` takes, in 0.01 %, when `active` is active and `canary_bp`
/// of the new flows go to the other colour.
#[must_use]
pub fn share_of(active: Colour, canary_bp: u32, colour: Colour) -> u32 {
    if colour == active { switcher_common::BP_ALL.saturating_sub(canary_bp) } else { canary_bp }
}

impl ServiceStatus {
    /// The share of new flows `colour` takes now, in 0.01 % ([`share_of`]).
    #[must_use]
    pub fn share_of(&self, colour: Colour) -> u32 {
        share_of(self.active, self.canary.as_ref().map_or(0, |c| c.basis_points), colour)
    }
}

/// The colour kept ready after a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    /// Seconds it stays the backup.
    pub secs_left: u64,
}

/// Switches of a service since the daemon started, by what made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchKinds {
    /// Cut-overs asked for (`cutover`, `weight` to 100 %, the fleet's desired state).
    pub cutover: u64,
    /// Rollbacks asked for (`rollback`, or the fleet's).
    pub rollback: u64,
    /// Rollbacks the daemon made by itself: the new colour failed within `watch_secs`.
    pub auto_rollback: u64,
    /// Failovers the daemon made by itself: every backend of the live colour was down.
    pub failover: u64,
}

impl SwitchKinds {
    /// The kinds with their metric label values.
    #[must_use]
    pub fn labelled(&self) -> [(&'static str, u64); 4] {
        [
            ("cutover", self.cutover),
            ("rollback", self.rollback),
            ("auto_rollback", self.auto_rollback),
            ("failover", self.failover),
        ]
    }
}

/// A canary split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    /// Share of new flows, in 0.01 % steps.
    pub basis_points: u32,
}

/// A drain in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    /// Open flows left on the draining colour.
    pub live_flows: u64,
    /// Open flows it had when the drain began.
    pub initial_flows: u64,
    pub elapsed_secs: u64,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// What happens at the timeout: "move" or "reset".
    pub on_timeout: OnTimeout,
    /// In a fleet: other nodes that still hold open flows of the draining colour, as
    /// `(node, open flows)`. The drain ends when no node holds any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<(String, u64)>,
    /// Open TCP flows of the draining colour idle past `tcp_idle_timeout_secs`: not counted
    /// in `live_flows` (they keep their backend if they come back).
    #[serde(default)]
    pub idle_flows: u64,
}

/// One colour of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColourStatus {
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    /// Whether it can take traffic (a backend passed its checks, or checks are off).
    #[serde(default)]
    pub healthy: bool,
    pub backends: Vec<BackendStatus>,
    /// Open flows now on this colour.
    pub live_flows: u64,
    /// TCP flows closing (FIN/RST seen).
    pub closing_flows: u64,
    pub counters: Counters,
    /// The pool was changed at runtime (`switcher backend`, the fleet's shared pools) and
    /// differs from the config file; a reload keeps it unless the file changes it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
}

/// One backend of a colour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// "up", "down" or "unknown" (not checked yet, or checks off).
    #[serde(default)]
    pub health: Health,
    /// Since when, and the last failure.
    #[serde(default)]
    pub detail: Option<String>,
}

/// Counters of one colour of one service, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub flows: u64,
    /// TCP flows found mid-connection while the service drained and sent to this colour, the
    /// previous one.
    #[serde(default)]
    pub rescued: u64,
    /// The data path's signals (see `switcher_common::ColourCounters`): TCP flows begun by a
    /// SYN; NAT: SYN-ACKs (completed handshakes), SYNs refused (RST or ICMP unreachable),
    /// backend resets, ICMP unreachables, SYN → SYN-ACK latency by bucket (< 0.1, 1, 10,
    /// 100 ms, ≥ 100 ms); DSR: SYN retransmissions; both: client resets.
    #[serde(default)]
    pub syns: u64,
    #[serde(default)]
    pub handshakes: u64,
    #[serde(default)]
    pub refused: u64,
    #[serde(default)]
    pub backend_resets: u64,
    #[serde(default)]
    pub icmp_unreachables: u64,
    #[serde(default)]
    pub syn_retransmits: u64,
    #[serde(default)]
    pub client_resets: u64,
    /// Open flows whose slot in the flow table a new flow took (their set was full).
    #[serde(default)]
    pub evicted: u64,
    #[serde(default)]
    pub syn_latency: [u64; 5],
}

/// How a service's packets reach its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Destination NAT both ways: replies come back through the load balancer.
    Nat,
    /// Direct server return: the backend answers the client itself.
    Dsr,
}

/// A service's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// What is known of a backend's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet, or checks are off: it stays in the tables.
    #[default]
    Unknown,
    Up,
    Down,
}

/// What happens to a drain's remaining flows at its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// They go to the new colour.
    Move,
    /// They are reset.
    Reset,
}

/// The protocol's words for its enums (`Display` is the wire form).
macro_rules! words {
    ($($t:ty { $($v:ident => $w:literal),* })*) => {$(
        impl $t {
            /// The word the protocol (and the config) uses.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $w),* }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    )*};
}

words! {
    Mode { Nat => "nat", Dsr => "dsr" }
    Protocol { Tcp => "tcp", Udp => "udp" }
    Health { Unknown => "unknown", Up => "up", Down => "down" }
    OnTimeout { Move => "move", Reset => "reset" }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The typed fields keep the JSON the protocol carried as strings: old clients, old
    /// nodes of a fleet and scripts reading `--json` see the same words.
    #[test]
    fn typed_values_keep_the_json_of_the_strings() {
        let status = ServiceStatus {
            name: "web".into(),
            vip: "203.0.113.10".into(),
            port: 80,
            preview_port: None,
            protocol: Protocol::Udp,
            mode: Mode::Dsr,
            active: Colour::Green,
            canary: Some(Canary { colour: Colour::Blue, basis_points: 500 }),
            previous: Some(Colour::Blue),
            switches: 1,
            switch_kinds: SwitchKinds::default(),
            since_switch_secs: None,
            watch_secs_left: None,
            drain: Some(Drain {
                colour: Colour::Blue,
                live_flows: 1,
                initial_flows: 2,
                elapsed_secs: 3,
                timeout_secs: None,
                on_timeout: OnTimeout::Reset,
                elsewhere: vec![],
                idle_flows: 0,
            }),
            rollout: None,
            backup: None,
            shadow: None,
            colours: vec![ColourStatus {
                colour: Colour::Green,
                healthy: true,
                backends: vec![BackendStatus {
                    address: "198.51.100.18:80".into(),
                    weight: 1,
                    health: Health::Down,
                    detail: None,
                }],
                live_flows: 0,
                closing_flows: 0,
                counters: Counters::default(),
                edited: false,
            }],
        };
        let json = serde_json::to_string(&status).expect("json");
        for field in [
            r#""protocol":"udp""#,
            r#""mode":"dsr""#,
            r#""active":"green""#,
            r#""canary":{"colour":"blue","basis_points":500}"#,
            r#""previous":"blue""#,
            r#""on_timeout":"reset""#,
            r#""colour":"green","healthy":true"#,
            r#""health":"down""#,
        ] {
            assert!(json.contains(field), "{field} missing from {json}");
        }
        assert_eq!(serde_json::from_str::<ServiceStatus>(&json).expect("parse"), status);
        let none = serde_json::to_string(&ServiceStatus { previous: None, ..status }).expect("json");
        assert!(none.contains(r#""previous":null"#), "{none}");
        // The fleet's documents, as nodes of an older version wrote and read them.
        let node = NodeService { draining: Some((Colour::Blue, 3)), ..NodeService::of("web", Colour::Green) };
        let json = serde_json::to_string(&node).expect("json");
        assert!(json.contains(r#""active":"green""#) && json.contains(r#""draining":["blue",3]"#), "{json}");
        let old = r#"{"active":"blue","canary_bp":0,"previous":"green","drain_timeout_secs":null,"change":"x","changed_by":"lb1","at_unix":1}"#;
        let d: Desired = serde_json::from_str(old).expect("an older node's desired state");
        assert_eq!((d.active, d.previous), (Colour::Blue, Some(Colour::Green)));
        // A word that is not a colour names itself.
        let e =
            parse_request(br#"{"op":"weight","service":"web","colour":"teal","basis_points":1}"#).expect_err("teal");
        assert!(e.contains(r#""teal": unknown colour (expected "blue" or "green")"#), "{e}");
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Status { service: None },
            Request::Status { service: Some("web".into()) },
            Request::Cutover {
                service: "web".into(),
                colour: Some(Colour::Green),
                drain_timeout_secs: Some(5),
                force: true,
                scope: Scope::default(),
            },
            Request::Cutover {
                service: "web".into(),
                colour: None,
                drain_timeout_secs: None,
                force: false,
                scope: Scope::default(),
            },
            Request::Rollback { service: "web".into(), force: false, scope: Scope::default() },
            Request::Weight {
                service: "web".into(),
                colour: Colour::Green,
                basis_points: 500,
                force: false,
                scope: Scope::default(),
            },
            Request::Reload,
            Request::BackendAdd {
                service: "web".into(),
                colour: Colour::Blue,
                address: "[2001:db8::1]:80".into(),
                weight: Some(2),
            },
            Request::BackendRemove { service: "web".into(), colour: Colour::Blue, address: "192.0.2.1:80".into() },
        ] {
            let line = serde_json::to_vec(&req).expect("serialize");
            assert_eq!(parse_request(&line), Ok(req));
        }
    }

    #[test]
    fn the_wire_format_is_stable() {
        assert_eq!(
            parse_request(br#"{"op":"cutover","service":"web","colour":"green"}"#),
            Ok(Request::Cutover {
                service: "web".into(),
                colour: Some(Colour::Green),
                drain_timeout_secs: None,
                force: false,
                scope: Scope::default()
            })
        );
        assert_eq!(parse_request(br#"{"op":"status"}"#), Ok(Request::Status { service: None }));
        let ok = serde_json::to_string(&Response { ok: true, ..Response::default() }).expect("json");
        assert_eq!(ok, r#"{"ok":true,"services":[]}"#);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"op\":\"explode\"}",
            b"{\"op\":\"rollback\"}",
            b"\xff\xfe",
            b"{\"op\":\"status\",\"x\":1}",
        ] {
            let e = parse_request(bad).expect_err("must be rejected");
            assert!(e.starts_with("malformed request"), "{e}");
        }
        let big = vec![b' '; MAX_REQUEST + 1];
        assert!(parse_request(&big).expect_err("too big").contains("larger than"));
    }

    #[test]
    fn a_request_carries_its_deadline() {
        let req = Request::Rollback { service: "web".into(), force: false, scope: Scope::default() };
        let d = Deadline::after(TIMEOUT);
        let line = request_line(&req, Some(d)).expect("serialize");
        assert!(String::from_utf8_lossy(&line).contains("\"deadline_ms\":"), "{}", String::from_utf8_lossy(&line));
        assert_eq!(parse_request_line(&line), Ok((req.clone(), Some(d))));
        assert!(!d.passed(), "a deadline {TIMEOUT:?} away has not passed");
        assert!(Deadline::after(Duration::ZERO).passed());
        // Without one (a request written by hand), as before.
        assert_eq!(parse_request_line(br#"{"op":"rollback","service":"web"}"#), Ok((req, None)));
        let e = parse_request_line(br#"{"op":"status","deadline_ms":"soon"}"#).expect_err("not a number");
        assert!(e.contains("deadline_ms must be"), "{e}");
        // Other unknown fields are still refused.
        assert!(parse_request_line(br#"{"op":"status","deadline":1}"#).is_err());
    }

    #[test]
    fn a_missing_socket_says_the_daemon_is_not_running() {
        let e = request(Path::new("/nonexistent/switcher.sock"), &Request::Status { service: None })
            .expect_err("no daemon");
        assert!(matches!(e, ClientError::NotRunning { .. }));
        assert!(e.to_string().contains("daemon is not running"), "{e}");
        // A wrong --socket that names something else is said to be that, not a stopped daemon.
        let e = request(Path::new("/"), &Request::Status { service: None }).expect_err("a directory");
        assert!(e.to_string().contains("/ is a directory, not the daemon's control socket"), "{e}");
    }
}
