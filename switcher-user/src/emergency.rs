//! The emergency path: cut-over and rollback written straight into the pinned maps when the
//! daemon is down. The data path keeps running without its daemon; this is how an operator
//! still moves traffic at 3 a.m. The daemon adopts the new state when it starts again.

use aya::maps::{Array, HashMap, Map, MapData};
use switcher_common::{
    MAP_SERVICES, MAP_STATE, Service, ServiceKey, state_active, state_canary_bp, state_previous, switch_state,
    user::Colour, with_previous,
};

use crate::{config::Config, dataplane::service_key, pins::Pins};

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// To this colour, or the idle one.
    Cutover(Option<Colour>),
    Rollback,
}

/// Errors of the emergency path, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmergencyError {
    #[error(
        "no pinned switcher data path under {pins}: the daemon has not run with this config, or it was uninstalled"
    )]
    NotPinned { pins: String },
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
}

fn open(pins: &Pins, name: &'static str) -> Result<MapData, EmergencyError> {
    MapData::from_pin(pins.map(name)).map_err(|source| EmergencyError::Map { name, source })
}

/// Switches `service` in the pinned maps; returns what was done, for the operator.
///
/// # Errors
/// [`EmergencyError`], saying what to do.
pub fn switch(config: &Config, service: &str, action: Action) -> Result<String, EmergencyError> {
    let pins = Pins::new(&config.pin_path);
    if !pins.exists() {
        return Err(EmergencyError::NotPinned { pins: pins.version_dir().display().to_string() });
    }
    let s = config.service(service).ok_or_else(|| EmergencyError::UnknownService(service.to_owned()))?;
    let services: HashMap<MapData, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(open(&pins, MAP_SERVICES)?))
            .map_err(|source| EmergencyError::Map { name: MAP_SERVICES, source })?;
    let id = services.get(&service_key(s, s.port), 0).map_err(|_| EmergencyError::NotInstalled(service.to_owned()))?.id;
    let mut state: Array<MapData, u32> = Array::try_from(Map::Array(open(&pins, MAP_STATE)?))
        .map_err(|source| EmergencyError::Map { name: MAP_STATE, source })?;
    let current = state.get(&id, 0).map_err(|source| EmergencyError::Map { name: MAP_STATE, source })?;
    let active = Colour::from_u32(state_active(current));
    let target = match action {
        Action::Cutover(Some(c)) => c,
        Action::Cutover(None) => active.other(),
        Action::Rollback => state_previous(current)
            .map(Colour::from_u32)
            .ok_or_else(|| EmergencyError::NothingToRollBack(service.to_owned()))?,
    };
    if !s.serves(target) {
        return Err(EmergencyError::NoBackend { service: service.to_owned(), colour: target });
    }
    if target == active && state_canary_bp(current) == 0 {
        return Ok(format!("{service}: already on {target}, nothing changed"));
    }
    let new = with_previous(switch_state(target.as_u32(), 0), Some(active.as_u32()));
    state.set(id, &new, 0).map_err(|source| EmergencyError::Map { name: MAP_STATE, source })?;
    Ok(format!("{service}: {active} → {target}"))
}
