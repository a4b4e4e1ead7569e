//! The emergency path: cut-over and rollback written straight into the pinned maps when no
//! daemon runs. The data path keeps running without its daemon; this is how an operator still
//! moves traffic at 3 a.m.
//!
//! It runs only when no daemon holds the pins (their `flock`): behind a live daemon a direct
//! write would leave the daemon's state, status, metrics and audit log saying one colour while
//! traffic goes to the other. The lock is held while it writes, so a daemon cannot start in
//! between. A daemon that starts later adopts what it wrote; in a fleet, the restarted daemon
//! follows etcd instead, unless the change was made `--local` (see [`Scope`]).

use std::path::PathBuf;

use aya::maps::{Array, HashMap, Map, MapData};
use switcher_common::{
    Backend, MAP_BACKENDS, MAP_RING, MAP_RING_LIVE, MAP_SERVICES, MAP_STATE, RING_EMPTY, RingChunk, Service,
    ServiceKey, colour_slot, pool_slot, ring_table, state_active, state_canary_bp, state_previous, switch_state,
    user::Colour, with_previous,
};

use crate::{
    config::Config,
    dataplane::service_key,
    pins::{Pins, PinsError},
};

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// To this colour, or the idle one.
    Cutover(Option<Colour>),
    Rollback,
}

/// Where an emergency change applies, for a node in a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Not in a fleet: the restarted daemon adopts the change.
    Node,
    /// In a fleet, asked with `--local`: this node only; the restarted daemon keeps it as a
    /// local override until the fleet's desired state of the service changes.
    FleetLocal,
}

/// Errors of the emergency path, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmergencyError {
    #[error(
        "no pinned switcher data path under {pins}: the daemon has not run with this config, or it was uninstalled"
    )]
    NotPinned { pins: String },
    #[error("{}", daemon_running(pins, *pid, sockets))]
    DaemonRunning { pins: PathBuf, pid: Option<u32>, sockets: Vec<PathBuf> },
    #[error("take the lock on the pins")]
    Lock(#[source] PinsError),
    #[error(
        "this node is part of a fleet: when its daemon starts it applies the fleet's desired state from etcd, which would undo a change made here. Change the fleet from a node whose daemon runs, or add --local to change this node only (the restarted daemon then keeps it as a local override until the fleet's desired state of {0} changes)"
    )]
    FleetNeedsLocal(String),
    #[error("unknown service {0:?} in the config")]
    UnknownService(String),
    #[error("service {0:?} is in the config but not in the pinned maps (added since the daemon last ran)")]
    NotInstalled(String),
    #[error("open pinned map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("nothing to roll back: {0} has no earlier colour recorded")]
    NothingToRollBack(String),
    #[error("{service} has no {colour} backend configured")]
    NoBackend { service: String, colour: Colour },
    #[error(
        "{service} has no {colour} pool in the pinned maps ({colour} was added to the config after the daemon last ran, or its pool is empty): switching would send new flows nowhere. Start the daemon so that it installs the pool, then cut over"
    )]
    NoPinnedPool { service: String, colour: Colour },
    #[error("record the local override under {path}")]
    Override {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn daemon_running(pins: &std::path::Path, pid: Option<u32>, sockets: &[PathBuf]) -> String {
    let who = pid.map_or_else(|| "a switcher daemon".to_owned(), |p| format!("a switcher daemon (pid {p})"));
    let listens = match sockets {
        [] => String::new(),
        s => format!(
            "; it listens on {}: pass that as --socket (or SWITCHER_SOCKET)",
            s.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    format!("{who} holds the pins under {}, so the emergency path would go behind its back{listens}", pins.display())
}

fn open(pins: &Pins, name: &'static str) -> Result<MapData, EmergencyError> {
    MapData::from_pin(pins.map(name)).map_err(|source| EmergencyError::Map { name, source })
}

fn array<V: aya::Pod>(pins: &Pins, name: &'static str) -> Result<Array<MapData, V>, EmergencyError> {
    Array::try_from(Map::Array(open(pins, name)?)).map_err(|source| EmergencyError::Map { name, source })
}

/// The switch state after `action` on `current`: `(new state, from, to)`, or `None` when
/// nothing changes. A rollback goes back to the colour live before the last switch; a switch
/// that keeps the active colour (ending a canary) keeps the colour recorded as previous.
///
/// # Errors
/// Nothing to roll back.
pub fn next_state(
    service: &str,
    current: u32,
    action: Action,
) -> Result<Option<(u32, Colour, Colour)>, EmergencyError> {
    let active = Colour::from_u32(state_active(current));
    let previous = state_previous(current).map(Colour::from_u32);
    let target = match action {
        Action::Cutover(Some(c)) => c,
        Action::Cutover(None) => active.other(),
        Action::Rollback => {
            previous.filter(|p| *p != active).ok_or_else(|| EmergencyError::NothingToRollBack(service.to_owned()))?
        }
    };
    if target == active && state_canary_bp(current) == 0 {
        return Ok(None);
    }
    let previous = if target == active { previous } else { Some(active) };
    Ok(Some((with_previous(switch_state(target.as_u32(), 0), previous.map(Colour::as_u32)), active, target)))
}

/// Whether the pinned maps hold a live Maglev table for `colour` of service `id` that points
/// at a backend.
fn has_pinned_pool(pins: &Pins, id: u32, colour: Colour) -> Result<bool, EmergencyError> {
    let live: Array<MapData, u32> = array(pins, MAP_RING_LIVE)?;
    let ring: Array<MapData, RingChunk> = array(pins, MAP_RING)?;
    let backends: Array<MapData, Backend> = array(pins, MAP_BACKENDS)?;
    let c = colour.as_u32();
    let err = |name| move |source| EmergencyError::Map { name, source };
    let live = live.get(&colour_slot(id, c), 0).map_err(err(MAP_RING_LIVE))?;
    let Some((first, _)) = ring_table(live) else { return Ok(false) };
    let chunk = ring.get(&first, 0).map_err(err(MAP_RING))?;
    let Some(&slot) = chunk.slots.iter().find(|s| **s != RING_EMPTY) else { return Ok(false) };
    Ok(backends.get(&pool_slot(id, c, u32::from(slot)), 0).map_err(err(MAP_BACKENDS))?.is_set())
}

/// Switches `service` in the pinned maps; returns what was done, for the operator.
///
/// # Errors
/// [`EmergencyError`], saying what to do; [`EmergencyError::DaemonRunning`] when a daemon
/// holds the pins.
pub fn switch(config: &Config, service: &str, action: Action, local: bool) -> Result<(String, Scope), EmergencyError> {
    let pins = Pins::new(&config.pin_path);
    if !pins.exists() {
        return Err(EmergencyError::NotPinned { pins: pins.version_dir().display().to_string() });
    }
    let _lock = match pins.lock() {
        Ok(lock) => lock,
        Err(PinsError::Locked { path }) => {
            let pid = pins.holder();
            let sockets = pid.map(listening_sockets).unwrap_or_default();
            return Err(EmergencyError::DaemonRunning { pins: path, pid, sockets });
        }
        Err(e) => return Err(EmergencyError::Lock(e)),
    };
    let scope = match (&config.fleet, local) {
        (None, _) => Scope::Node,
        (Some(_), true) => Scope::FleetLocal,
        (Some(_), false) => return Err(EmergencyError::FleetNeedsLocal(service.to_owned())),
    };
    let s = config.service(service).ok_or_else(|| EmergencyError::UnknownService(service.to_owned()))?;
    let services: HashMap<MapData, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(open(&pins, MAP_SERVICES)?))
            .map_err(|source| EmergencyError::Map { name: MAP_SERVICES, source })?;
    let id = services.get(&service_key(s, s.port), 0).map_err(|_| EmergencyError::NotInstalled(service.to_owned()))?.id;
    let mut state: Array<MapData, u32> = array(&pins, MAP_STATE)?;
    let current = state.get(&id, 0).map_err(|source| EmergencyError::Map { name: MAP_STATE, source })?;
    let Some((new, from, target)) = next_state(service, current, action)? else {
        return Ok((
            format!("{service}: already on {}, nothing changed", Colour::from_u32(state_active(current))),
            scope,
        ));
    };
    if !s.serves(target) {
        return Err(EmergencyError::NoBackend { service: service.to_owned(), colour: target });
    }
    if !has_pinned_pool(&pins, id, target)? {
        return Err(EmergencyError::NoPinnedPool { service: service.to_owned(), colour: target });
    }
    if scope == Scope::FleetLocal {
        pins.record_override(service)
            .map_err(|source| EmergencyError::Override { path: pins.overrides_dir(), source })?;
    }
    state.set(id, &new, 0).map_err(|source| EmergencyError::Map { name: MAP_STATE, source })?;
    let done = if from == target {
        format!("{service}: {target} only (canary ended)")
    } else {
        format!("{service}: {from} → {target}")
    };
    Ok((done, scope))
}

/// The unix sockets process `pid` listens on, from its descriptors and its network
/// namespace's `/proc/<pid>/net/unix`.
fn listening_sockets(pid: u32) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?, f.get(7)?);
            (inodes.iter().any(|i| i == inode) && path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use switcher_common::{COLOUR_BLUE, COLOUR_GREEN};

    use super::*;

    #[test]
    fn clearing_a_canary_keeps_the_colour_to_roll_back_to() {
        // Blue live after a rollback from green (previous green), with a 5 % canary to green.
        let canary = with_previous(switch_state(COLOUR_BLUE, 500), Some(COLOUR_GREEN));
        let (ended, from, to) =
            next_state("web", canary, Action::Cutover(Some(Colour::Blue))).expect("ok").expect("the canary ends");
        assert_eq!((from, to), (Colour::Blue, Colour::Blue));
        assert_eq!((state_active(ended), state_canary_bp(ended)), (COLOUR_BLUE, 0));
        assert_eq!(state_previous(ended), Some(COLOUR_GREEN), "previous is still green, not the active blue");
        let (back, _, to) = next_state("web", ended, Action::Rollback).expect("ok").expect("a rollback");
        assert_eq!((to, state_previous(back)), (Colour::Green, Some(COLOUR_BLUE)));
    }

    #[test]
    fn a_cutover_records_the_colour_it_left_and_a_no_op_changes_nothing() {
        let blue = switch_state(COLOUR_BLUE, 0);
        let (new, from, to) = next_state("web", blue, Action::Cutover(None)).expect("ok").expect("a switch");
        assert_eq!((from, to, state_previous(new)), (Colour::Blue, Colour::Green, Some(COLOUR_BLUE)));
        assert!(next_state("web", blue, Action::Cutover(Some(Colour::Blue))).expect("ok").is_none());
        assert!(matches!(next_state("web", blue, Action::Rollback), Err(EmergencyError::NothingToRollBack(_))));
        // A previous equal to the active colour is nothing to roll back to either.
        let same = with_previous(blue, Some(COLOUR_BLUE));
        assert!(matches!(next_state("web", same, Action::Rollback), Err(EmergencyError::NothingToRollBack(_))));
    }
}
