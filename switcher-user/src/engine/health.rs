//! The engine's side of health checks: what to probe, and what a round of results changes
//! (backends leaving or rejoining the tables, automatic rollback in the watch window,
//! failover of a dead live colour).

use std::{net::SocketAddr, time::Instant};

use switcher_common::user::Colour;

use super::{Change, Maps, Switchboard, chain};
use crate::config::HealthConfig;

impl<M: Maps> Switchboard<M> {
    /// What the health checker probes: per checked service, its check and every backend.
    pub fn checks(&self) -> Vec<(String, HealthConfig, Vec<SocketAddr>)> {
        self.services
            .iter()
            .filter(|s| s.checked())
            .map(|s| {
                (
                    s.config.name.clone(),
                    s.config.health.clone(),
                    s.config.blue.iter().chain(&s.config.green).map(|b| b.addr).collect(),
                )
            })
            .collect()
    }

    /// Adds a round of probe results of one service: backends that changed state leave or
    /// rejoin the tables, and a failing live colour may be rolled back or failed over.
    /// Returns the changes made (for the audit log).
    pub fn record_health(&mut self, name: &str, results: Vec<(SocketAddr, Result<(), String>)>) -> Vec<Change> {
        let Ok(i) = self.find(name) else { return Vec::new() };
        let s = &mut self.services[i];
        let (rise, fall) = (s.config.health.rise, s.config.health.fall);
        let mut changed = Vec::new();
        for (addr, result) in results {
            let h = s.health.entry(addr).or_default();
            if h.record(result, rise, fall) {
                // Going down is worth a warning; coming (back) up is news, not a problem.
                if h.state == crate::protocol::Health::Up {
                    tracing::info!(service = %name, backend = %addr, state = h.state.as_str(), "{}", h.describe());
                } else {
                    tracing::warn!(service = %name, backend = %addr, state = h.state.as_str(), "{}", h.describe());
                }
                for c in Colour::ALL {
                    if s.config.pool(c).iter().any(|b| b.addr == addr) && !changed.contains(&c) {
                        changed.push(c);
                    }
                }
            }
        }
        for c in changed {
            let s = &self.services[i];
            if let Err(e) = self.maps.set_pool(s.id, c, &s.effective_pool(c)) {
                tracing::warn!(service = %name, colour = %c, "update the table after a health change: {}", chain(&e));
            }
        }
        self.react(i)
    }

    /// Automatic rollback within the watch window, and failover of a dead live colour.
    fn react(&mut self, i: usize) -> Vec<Change> {
        let s = &self.services[i];
        let name = s.config.name.clone();
        let active = s.active;
        if !s.dead(active) {
            return Vec::new();
        }
        let watching = s.watch_until.is_some_and(|t| Instant::now() < t);
        let (target, verb) = match s.previous {
            Some(prev) if watching && prev != active => (prev, "auto-rollback"),
            _ if s.config.failover && s.healthy(active.other()) => (active.other(), "failover"),
            _ => return Vec::new(),
        };
        let why = s.why_unhealthy(active);
        tracing::warn!(service = %name, from = %active, to = %target, "{verb}: every {active} backend failed its health checks ({why})");
        match self.switch(
            i,
            target,
            0,
            None,
            if verb == "auto-rollback" { super::AUTO_ROLLBACK } else { "failed over" },
            true,
        ) {
            Ok((_, change)) => change.map(|c| Change { what: verb.into(), ..c }).into_iter().collect(),
            Err(e) => {
                tracing::warn!(service = %name, "{verb} failed: {e}");
                Vec::new()
            }
        }
    }
}
