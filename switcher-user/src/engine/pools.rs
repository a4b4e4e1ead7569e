//! Pools: what the tables get of a colour's pool given its backends' health, the checks of
//! a backend added or removed at runtime (the same for a node and for the fleet's shared
//! pools), and what a reload would undo of the runtime changes.

use std::{collections::HashMap, net::SocketAddr};

use switcher_common::{MAX_POOL, user::Colour};

use crate::{
    config::{BackendConfig, CheckKind, ServiceConfig},
    health::BackendHealth,
    protocol::Health,
};

/// A colour's pool as the maps get it (see [`ServiceState::effective_pool`]).
pub(super) fn effective_pool(
    config: &ServiceConfig,
    health: &HashMap<SocketAddr, BackendHealth>,
    colour: Colour,
) -> Vec<BackendConfig> {
    let down =
        |addr| config.health.check != CheckKind::None && health.get(&addr).is_some_and(|h| h.state == Health::Down);
    let pool = config.pool(colour);
    if pool.iter().filter(|b| b.weight > 0).all(|b| down(b.addr)) {
        return pool.to_vec();
    }
    pool.iter().map(|b| if down(b.addr) { BackendConfig { weight: 0, ..*b } } else { *b }).collect()
}

/// Adds (`weight: Some`) or removes (`None`) a backend of `service`'s `colour` in `pool`, with
/// the checks of `switcher backend`: address family, weight, pool size, and not the last
/// backend of a colour that takes traffic (`live`). Returns the address and a message.
///
/// # Errors
/// What is wrong, for the operator.
pub fn edit_pool(
    service: &ServiceConfig,
    colour: Colour,
    pool: &mut Vec<BackendConfig>,
    address: &str,
    weight: Option<u32>,
    live: bool,
) -> Result<(SocketAddr, String), String> {
    let name = &service.name;
    let addr: SocketAddr =
        address.parse().map_err(|_| format!("{address:?} is not ADDRESS:PORT (IPv6 as [2001:db8::1]:80)"))?;
    match weight {
        Some(w) => {
            service.check_backend(addr)?;
            if w > 1000 {
                return Err(format!("weight {w} is above 1000"));
            }
            match pool.iter_mut().find(|b| b.addr == addr) {
                Some(b) => b.weight = w,
                None => pool.push(BackendConfig { addr, weight: w }),
            }
            if pool.len() > MAX_POOL as usize {
                return Err(format!("{name} {colour} already has {MAX_POOL} backends"));
            }
            Ok((addr, format!("{name} {colour}: {addr} in the pool with weight {w} ({} backends)", pool.len())))
        }
        None => {
            let before = pool.len();
            pool.retain(|b| b.addr != addr);
            if pool.len() == before {
                return Err(format!("{addr} is not a {colour} backend of {name}"));
            }
            if live && !pool.iter().any(|b| b.weight > 0) {
                return Err(format!(
                    "{addr} is the last {colour} backend of {name}, which takes traffic; cut over first"
                ));
            }
            Ok((
                addr,
                format!(
                    "{name} {colour}: {addr} removed ({} backends); its open flows stay until they end",
                    pool.len()
                ),
            ))
        }
    }
}

/// What applying `file` to a pool changed at runtime from `before` (the file's pool at the
/// last load) to `runtime` would undo.
pub(super) fn runtime_changes(
    before: &[BackendConfig],
    runtime: &[BackendConfig],
    file: &[BackendConfig],
) -> Vec<String> {
    let find = |pool: &[BackendConfig], b: &BackendConfig| pool.iter().find(|x| x.addr == b.addr).copied();
    let mut lost = Vec::new();
    for b in runtime {
        match (find(before, b), find(file, b)) {
            (None, None) => lost.push(format!("{} added at runtime would be removed", b.addr)),
            (Some(old), Some(f)) if old.weight != b.weight && f.weight != b.weight => {
                lost.push(format!("{} weight {} set at runtime would become {}", b.addr, b.weight, f.weight));
            }
            _ => {}
        }
    }
    for b in before {
        if find(runtime, b).is_none() && find(file, b).is_some() {
            lost.push(format!("{} removed at runtime would come back", b.addr));
        }
    }
    lost
}
