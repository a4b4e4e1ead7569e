//! A reloaded configuration, applied: services that stay keep their state, pools changed at
//! runtime are kept or the reload is refused.

use std::collections::HashMap;

use switcher_common::user::Colour;

use super::{
    Maps, Reloaded, ServiceState, Switchboard, chain,
    pools::{effective_pool, runtime_changes},
};
use crate::config::ServiceConfig;

impl<M: Maps> Switchboard<M> {
    /// Applies a reloaded config's services. Services that stay keep their switch state,
    /// drain and health, and their backends that health checks took out stay out of the
    /// tables; new ones start as installed; removed ones go. A pool changed at runtime
    /// (`switcher backend`, the fleet's shared pools) is kept when the file did not change
    /// it; when the file changed it too, the reload is refused, nothing changes, and the
    /// error lists what would be lost. A shadow setting changed at runtime (`switcher
    /// shadow`) is kept when the file did not change the service's; when it did, the file's
    /// applies.
    ///
    /// # Errors
    /// The runtime changes a reload would undo, or a map write that failed.
    pub fn reload(&mut self, new: Vec<ServiceConfig>) -> Result<Reloaded, String> {
        let mut conflicts = Vec::new();
        let mut kept = Vec::new();
        let mut kept_shadow = Vec::new();
        let mut configs = Vec::with_capacity(new.len());
        for mut config in new {
            let file_pools = [config.blue.clone(), config.green.clone()];
            let file_shadow = config.shadow;
            if let Some(old) = self.services.iter().find(|s| s.config.name == config.name) {
                if old.config.shadow != old.file_shadow && file_shadow == old.file_shadow {
                    config.shadow = old.config.shadow;
                    kept_shadow.push(format!("{} {}", config.name, crate::shadow::share_words(config.shadow.share_bp)));
                }
                for c in Colour::ALL {
                    let (before, runtime, file) =
                        (&old.file_pools[c.as_u32() as usize], old.config.pool(c), config.pool(c));
                    if !old.edited(c) || runtime == file {
                        continue;
                    }
                    if before.as_slice() == file {
                        kept.push(format!("{} {c}", config.name));
                        *config.pool_mut(c) = runtime.to_vec();
                        continue;
                    }
                    let lost = runtime_changes(before, runtime, file);
                    if !lost.is_empty() {
                        conflicts.push(format!("{} {c}: {}", config.name, lost.join(", ")));
                    }
                }
            }
            configs.push((config, file_pools, file_shadow));
        }
        if !conflicts.is_empty() {
            return Err(format!(
                "reload rejected, nothing changed: the file changes pools that were also changed at runtime, and applying it would undo: {}. Put the runtime changes in the file (or undo them with `switcher backend`), then reload",
                conflicts.join("; ")
            ));
        }
        let for_maps: Vec<ServiceConfig> = configs
            .iter()
            .map(|(config, _, _)| {
                let health = self.services.iter().find(|s| s.config.name == config.name).map(|s| &s.health);
                let mut c = config.clone();
                if let Some(health) = health {
                    c.blue = effective_pool(config, health, Colour::Blue);
                    c.green = effective_pool(config, health, Colour::Green);
                }
                c
            })
            .collect();
        let installed =
            self.maps.install(&for_maps).map_err(|e| format!("reload failed while writing the maps: {}", chain(&e)))?;
        let mut old: HashMap<String, ServiceState> =
            self.services.drain(..).map(|s| (s.config.name.clone(), s)).collect();
        let mut done = Reloaded { kept, kept_shadow, ..Reloaded::default() };
        for ((config, file_pools, file_shadow), installed) in configs.into_iter().zip(installed) {
            let state = match old.remove(&config.name) {
                Some(mut s) if s.id == installed.id => {
                    s.config = config;
                    s.file_pools = file_pools;
                    s.file_shadow = file_shadow;
                    s
                }
                _ => {
                    done.added.push(config.name.clone());
                    ServiceState { file_pools, file_shadow, ..ServiceState::new(config, installed) }
                }
            };
            self.services.push(state);
        }
        done.removed = old.into_keys().collect();
        done.removed.sort();
        Ok(done)
    }
}
