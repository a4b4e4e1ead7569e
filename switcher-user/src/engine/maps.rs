//! What the engine needs of the data plane: the [`Maps`] trait, implemented by the real
//! [`Dataplane`] here and by a fake in the unit tests.

use std::sync::Arc;

use switcher_common::{ShadowCounters, user::Colour};

use crate::{
    config::{BackendConfig, DrainAction, ServiceConfig},
    dataplane::{Counters, Dataplane, DataplaneError, Installed},
    flowcount::FlowSnapshot,
};

/// What the switchboard needs of the data plane; a fake implements it in unit tests.
pub trait Maps {
    /// Writes a service's switch state (one map write).
    ///
    /// # Errors
    /// The map write failed.
    fn set_state(
        &mut self,
        id: u32,
        active: Colour,
        canary_bp: u32,
        previous: Option<Colour>,
    ) -> Result<(), DataplaneError>;
    /// Replaces a colour's pool and makes its new table live.
    ///
    /// # Errors
    /// A map write failed or the pool is full.
    fn set_pool(&mut self, id: u32, colour: Colour, backends: &[BackendConfig]) -> Result<(), DataplaneError>;
    /// Reads a colour's counters.
    ///
    /// # Errors
    /// The map read failed.
    fn counters(&self, id: u32, colour: Colour) -> Result<Counters, DataplaneError>;
    /// Data-path verdicts as `(reason, packets)`.
    ///
    /// # Errors
    /// The map read failed.
    fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError>;
    /// The last complete count of the open flows per (service, colour), if there is one:
    /// read, never walked here.
    fn flow_counts(&self) -> Option<Arc<FlowSnapshot>>;
    /// Asks for a new count of the open flows to begin soon (after a switch).
    fn count_flows_soon(&self) {}
    /// Drops what only the flows a complete count did not find needed (`REVERSE` entries).
    fn collect(&mut self, _pass: &FlowSnapshot) {}
    /// Installs a new service list (a reload): services that stay keep their id and switch
    /// state, new ones start as configured, removed ones go. Pools are written as given.
    ///
    /// # Errors
    /// A map write failed.
    fn install(&mut self, services: &[ServiceConfig]) -> Result<Vec<Installed>, DataplaneError>;
    /// Moves or resets the open flows of a draining colour; returns how many, or `None` when
    /// that is done in the background (a walk of the whole table).
    ///
    /// # Errors
    /// The map read failed.
    fn end_drain(
        &mut self,
        s: &ServiceConfig,
        id: u32,
        from: Colour,
        action: DrainAction,
    ) -> Result<Option<u64>, DataplaneError>;
    /// Refreshes the clock the data path stamps open TCP flows with (once a second).
    ///
    /// # Errors
    /// The map write failed.
    fn stamp_clock(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Sets or clears a service's drain flag in the data path: while set, a TCP packet in
    /// mid-connection without a flow goes to the previous colour.
    ///
    /// # Errors
    /// The map write failed.
    fn set_draining(&mut self, id: u32, draining: bool) -> Result<(), DataplaneError>;
    /// Writes a service's shadow share and ceiling (`SHADOW`).
    ///
    /// # Errors
    /// The map write failed.
    fn set_shadow(&mut self, _id: u32, _share_bp: u32, _ceiling: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// A colour's shadow counters.
    ///
    /// # Errors
    /// The map lookup failed.
    fn shadow_counters(&self, _id: u32, _colour: Colour) -> Result<ShadowCounters, DataplaneError> {
        Ok(ShadowCounters::default())
    }
    /// Whether the shadow TC program is attached, so copies can be made.
    fn shadow_ready(&self) -> bool {
        true
    }
}

impl Maps for Dataplane {
    fn set_state(
        &mut self,
        id: u32,
        active: Colour,
        canary_bp: u32,
        previous: Option<Colour>,
    ) -> Result<(), DataplaneError> {
        Dataplane::set_state(self, id, active, canary_bp, previous)
    }
    fn set_pool(&mut self, id: u32, colour: Colour, backends: &[BackendConfig]) -> Result<(), DataplaneError> {
        Dataplane::set_pool(self, id, colour, backends)
    }
    fn counters(&self, id: u32, colour: Colour) -> Result<Counters, DataplaneError> {
        Dataplane::counters(self, id, colour)
    }
    fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        Dataplane::reasons(self)
    }
    fn flow_counts(&self) -> Option<Arc<FlowSnapshot>> {
        Dataplane::flow_counts(self)
    }
    fn count_flows_soon(&self) {
        Dataplane::count_flows_soon(self);
    }
    fn collect(&mut self, pass: &FlowSnapshot) {
        Dataplane::collect_reverse(self, pass);
    }
    fn install(&mut self, services: &[ServiceConfig]) -> Result<Vec<Installed>, DataplaneError> {
        Dataplane::apply(self, services)
    }
    fn end_drain(
        &mut self,
        s: &ServiceConfig,
        id: u32,
        from: Colour,
        action: DrainAction,
    ) -> Result<Option<u64>, DataplaneError> {
        let job = self.drain_end(s, id, from, action)?;
        let (name, colour) = (s.name.clone(), from);
        // A walk of every flow: on a thread of its own, so the engine's owner is not held
        // up by it.
        let spawned = std::thread::Builder::new().name("drain-end".into()).spawn(move || {
            let n = job.run();
            tracing::info!(service = %name, %colour, flows = n, ?action, "drain timeout: flows handled");
        });
        match spawned {
            Ok(_) => Ok(None),
            Err(e) => Err(DataplaneError::Walk(e)),
        }
    }
    fn stamp_clock(&mut self) -> Result<(), DataplaneError> {
        Dataplane::stamp_clock(self)
    }
    fn set_draining(&mut self, id: u32, draining: bool) -> Result<(), DataplaneError> {
        Dataplane::set_draining(self, id, draining)
    }
    fn set_shadow(&mut self, id: u32, share_bp: u32, ceiling: u32) -> Result<(), DataplaneError> {
        Dataplane::set_shadow(self, id, share_bp, ceiling)
    }
    fn shadow_counters(&self, id: u32, colour: Colour) -> Result<ShadowCounters, DataplaneError> {
        Dataplane::shadow_counters(self, id, colour)
    }
    fn shadow_ready(&self) -> bool {
        Dataplane::shadow_ready(self)
    }
}
