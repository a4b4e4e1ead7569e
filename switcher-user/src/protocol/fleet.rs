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
