//! Drains: the once-a-second tick that ends them (on a count of the flows begun after the
//! switch, and in a fleet only when no other node holds any), the data path's drain flag, and
//! the flow walker's last count.

use std::{sync::Arc, time::Instant};

use super::{DrainState, Maps, RemoteDrains, Switchboard, chain};
use crate::flowcount::FlowSnapshot;

impl<M: Maps> Switchboard<M> {
    /// Periodic work: finish drains that are empty (by a count of the flows begun after the
    /// drain) or timed out. Reads the flow walker's last count; never walks.
    pub fn tick(&mut self) {
        if let Err(e) = self.maps.stamp_clock() {
            tracing::warn!("stamp the data path's clock: {}", chain(&e));
        }
        self.refresh_flows();
        if self.services.iter().all(|s| s.drain.is_none()) {
            self.sync_draining();
            return;
        }
        for i in 0..self.services.len() {
            let s = &self.services[i];
            let Some(drain) = s.drain.clone() else { continue };
            // Only a count begun after the switch can prove the old colour empty.
            let live = self.drain_live(s.id, &drain);
            let name = s.config.name.clone();
            // In a fleet, only a view of the other nodes taken since the drain began counts.
            let (seen, elsewhere) = match &self.remote_drains {
                None => (true, false),
                Some((at, drains)) => (*at >= drain.started, drains.get(&name).is_some_and(|v| !v.is_empty())),
            };
            if live == Some(0) && seen && !elsewhere {
                tracing::info!(service = %name, colour = %drain.from, secs = drain.started.elapsed().as_secs(), "drain complete");
                self.services[i].drain = None;
            } else if drain.timeout.is_some_and(|t| drain.started.elapsed() >= t) {
                let action = s.config.on_drain_timeout;
                let config = s.config.clone();
                match self.maps.end_drain(&config, s.id, drain.from, action) {
                    Ok(Some(n)) => {
                        tracing::warn!(service = %name, colour = %drain.from, flows = n, ?action, "drain timed out")
                    }
                    Ok(None) => {
                        tracing::warn!(service = %name, colour = %drain.from, ?action, "drain timed out; handling its flows")
                    }
                    Err(e) => tracing::warn!(service = %name, "end drain: {}", chain(&e)),
                }
                self.services[i].drain = None;
            }
        }
        self.sync_draining();
    }

    /// Brings each service's drain flag in the data path in line with its drain: set while
    /// it drains (so connections that began on the previous colour and reach this node
    /// without a flow go back there), cleared when the drain ends.
    pub(super) fn sync_draining(&mut self) {
        for s in &mut self.services {
            let want = s.drain.is_some() && s.previous.is_some();
            if want != s.draining_flag {
                match self.maps.set_draining(s.id, want) {
                    Ok(()) => s.draining_flag = want,
                    Err(e) => tracing::warn!(service = %s.config.name, "set the drain flag: {}", chain(&e)),
                }
            }
        }
    }

    /// Other nodes of the fleet that still hold open flows of a draining colour, by service:
    /// `(node, open flows)`, as just read by the fleet. Once called, this node is in a fleet:
    /// a drain ends only when no node holds any, by a view taken after the drain began.
    pub fn set_remote_drains(&mut self, drains: RemoteDrains) {
        self.remote_drains = Some((Instant::now(), drains));
    }

    /// Whether some service is draining.
    #[must_use]
    pub fn draining(&self) -> bool {
        self.services.iter().any(|s| s.drain.is_some())
    }

    /// Whether some drain has no open flows left on this node (so it waits on other nodes,
    /// or is about to end).
    #[must_use]
    pub fn waits_on_fleet(&self) -> bool {
        self.services.iter().any(|s| s.drain.as_ref().is_some_and(|d| self.drain_live(s.id, d) == Some(0)))
    }

    /// The open flows left of a drain by the last count, if that count began after the drain
    /// did (an older one cannot tell).
    pub(super) fn drain_live(&self, id: u32, drain: &DrainState) -> Option<u64> {
        self.last_flows.as_ref().filter(|c| c.started >= drain.started).map(|c| c.of(id, drain.from).live)
    }

    /// Takes the flow walker's last complete count (cheap: no walk), keeps it for
    /// [`Switchboard::observed`] and `status`, and lets the maps drop what a new count shows
    /// unused.
    pub fn refresh_flows(&mut self) -> Option<Arc<FlowSnapshot>> {
        let last = self.maps.flow_counts()?;
        if self.last_flows.as_ref().is_none_or(|old| old.pass != last.pass) {
            self.maps.collect(&last);
            self.last_flows = Some(Arc::clone(&last));
        }
        Some(last)
    }
}
