//! The fleet's documents in etcd, as JSON (see `crate::fleet` for the key layout): what the
//! fleet wants of a service, and what a node publishes about itself. Also carried by the
//! control socket's `fleet` answers.

use serde::{Deserialize, Serialize};

use super::Colour;

/// What the fleet wants of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// "blue" or "green".
    #[serde(with = "super::wire::colour")]
    pub active: Colour,
    /// Share of new flows for the other colour, in 0.01 %.
    #[serde(default)]
    pub canary_bp: u32,
    /// The colour a rollback goes back to.
    #[serde(default, with = "super::wire::colour_opt")]
    pub previous: Option<Colour>,
    /// Drain timeout of the switch that wrote this (none: the service's own).
    #[serde(default)]
    pub drain_timeout_secs: Option<u64>,
    /// The change that wrote this was a rollback: nodes apply it as one, which never arms the
    /// watch window (an automatic rollback would otherwise go forward again to the colour
    /// just rolled back).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
    /// Shared pools (`share_backends`); absent: each node uses its own config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue: Option<Vec<SharedBackend>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub green: Option<Vec<SharedBackend>>,
    /// Shadow traffic to the idle colour (`switcher shadow`); absent: each node uses its own
    /// config's (nodes that do not know the field ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<FleetShadow>,
    /// What the last change was ("cutover blue → green"), who made it and when.
    #[serde(default)]
    pub change: String,
    #[serde(default)]
    pub changed_by: String,
    #[serde(default)]
    pub at_unix: u64,
}

/// The fleet's shadow setting of a service: share (basis points, 0: off) and ceiling (copies
/// per second, per node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetShadow {
    pub share_bp: u32,
    pub ceiling: u32,
}

/// A backend in a shared pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBackend {
    pub address: String,
    pub weight: u32,
}

/// What a node publishes about itself, when it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub node: String,
    /// When it was published.
    pub at_unix: u64,
    pub services: Vec<NodeService>,
}

/// One service on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeService {
    pub name: String,
    #[serde(with = "super::wire::colour")]
    pub active: Colour,
    #[serde(default)]
    pub canary_bp: u32,
    /// The revision of the desired state it applied last (0: none yet).
    pub applied_revision: i64,
    /// Why it does not follow the desired state, if it does not.
    #[serde(default)]
    pub local_override: Option<String>,
    /// Open flows on the active colour at the last count (published again when it moves by a
    /// quarter, or reaches or leaves zero).
    #[serde(default)]
    pub live_flows: u64,
    /// The colour draining and its open flows (published again when they change).
    #[serde(default, with = "super::wire::draining")]
    pub draining: Option<(Colour, u64)>,
    #[serde(default)]
    pub healthy_blue: bool,
    #[serde(default)]
    pub healthy_green: bool,
}

/// A rollout of the fleet (`{prefix}/rollouts/{service}`): its plan and progress, one
/// document every node reads and the driving node advances with compare-and-swap on its mod
/// revision, so that a step is never skipped nor repeated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRollout {
    #[serde(with = "super::wire::colour")]
    pub from: Colour,
    #[serde(with = "super::wire::colour")]
    pub to: Colour,
    /// The compiled plan, one token an op (`h0`, `s1000`, `p60`, `w60`: see the engine's
    /// rollout ops).
    pub ops: Vec<String>,
    /// The op under way (0-based; `ops.len()` once over).
    pub at: usize,
    /// When the op under way began (UNIX seconds).
    pub op_started_unix: u64,
    /// `running`, `complete`, `aborted` or `interrupted`.
    pub state: String,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub force: bool,
    /// Share of new flows on `to` now, in 0.01 %.
    #[serde(default)]
    pub share_bp: u32,
    /// The desired state's mod revision before the rollout's last write to it: a desired state
    /// newer than that which says something else was written by someone else.
    #[serde(default)]
    pub desired_revision: i64,
    /// The last judgement, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judgement: Option<String>,
    /// Why it ended, when it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node that wrote the last step (the driver then).
    #[serde(default)]
    pub driver: String,
    /// Who started it, and when (UNIX seconds).
    #[serde(default)]
    pub started_by: String,
    #[serde(default)]
    pub started_unix: u64,
    /// One line per op done, in order (`"2 pause 2s by lb0: pass: …"`): the proof that no
    /// step was skipped or repeated.
    #[serde(default)]
    pub history: Vec<String>,
    /// After completion: `from` stays the fleet's backup, the instant rollback target, until
    /// then (UNIX seconds; `keep_previous_secs` of the node that completed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_until_unix: Option<u64>,
    /// How the backup's time ended, once (`released by lb0 (hook backup_released
    /// succeeded)`, `ended by lb1: the fleet switched to blue`): a driver that takes over reads
    /// it and does not release it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_end: Option<String>,
    /// Whose counters judged the last pause (`3 nodes (lb0, lb1, lb2)`, and those left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_from: Option<String>,
}

impl Desired {
    /// A desired state of `active`, with nothing else set (no canary, no previous colour, no
    /// shared pools, no record of a change).
    #[must_use]
    pub fn of(active: Colour) -> Desired {
        Desired {
            active,
            canary_bp: 0,
            previous: None,
            drain_timeout_secs: None,
            rollback: false,
            blue: None,
            green: None,
            shadow: None,
            change: String::new(),
            changed_by: String::new(),
            at_unix: 0,
        }
    }
}

impl NodeService {
    /// A service `name` on `active`, with nothing else set (nothing applied yet, no flows,
    /// unhealthy).
    #[must_use]
    pub fn of(name: &str, active: Colour) -> NodeService {
        NodeService {
            name: name.to_owned(),
            active,
            canary_bp: 0,
            applied_revision: 0,
            local_override: None,
            live_flows: 0,
            draining: None,
            healthy_blue: false,
            healthy_green: false,
        }
    }
}

/// A node's counters of one service's two colours (`{prefix}/counters/{service}/{node}`,
/// under the node's lease), published about once a second while a rollout of the service
/// runs, for the driver to judge its pauses from the whole fleet's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    pub node: String,
    /// When they were read (UNIX milliseconds, the node's clock).
    pub at_unix_ms: u64,
    pub blue: super::Counters,
    pub green: super::Counters,
}
