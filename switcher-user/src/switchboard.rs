//! The services' switch state in front of the maps: cut-overs, rollbacks, canaries, pools,
//! drains, health, automatic rollback and failover. One request at a time (the daemon holds
//! it under a lock), so concurrent operators are serialised and the last accepted change wins.
//!
//! Everything that writes goes through the [`Maps`] trait, which a fake implements in the unit
//! tests below.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use switcher_common::{BP_ALL, MAX_POOL, user::Colour};

use crate::{
    config::{self, BackendConfig, CheckKind, DrainAction, ServiceConfig},
    dataplane::{Counters, Dataplane, DataplaneError, Installed},
    flowcount::FlowSnapshot,
    health::BackendHealth,
    protocol::{self, BackendStatus, Canary, ColourStatus, Drain, Health, Request, Response, ServiceStatus},
};

/// Other nodes of a fleet still holding open flows of a draining colour, by service:
/// `(node, open flows)` (0: the node has not applied the switch yet).
pub type RemoteDrains = HashMap<String, Vec<(String, u64)>>;

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
        // A walk of every flow: on a thread of its own, so the board's lock is not held
        // across it.
        let spawned = std::thread::Builder::new().name("drain-end".into()).spawn(move || match job.run() {
            Ok(n) => tracing::info!(service = %name, %colour, flows = n, ?action, "drain timeout: flows handled"),
            Err(e) => tracing::warn!(service = %name, %colour, "drain timeout: {e}"),
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
}

/// A drain in progress: the old colour's open flows finishing after a switch.
#[derive(Clone, Debug)]
struct DrainState {
    from: Colour,
    started: Instant,
    timeout: Option<Duration>,
    initial: u64,
}

struct ServiceState {
    id: u32,
    config: ServiceConfig,
    active: Colour,
    canary_bp: u32,
    previous: Option<Colour>,
    switches: u64,
    switched_at: Option<Instant>,
    drain: Option<DrainState>,
    /// What the data path's drain flag was last set to (`Maps::set_draining`).
    draining_flag: bool,
    health: HashMap<SocketAddr, BackendHealth>,
    /// Until then, a failing new colour is rolled back automatically.
    watch_until: Option<Instant>,
    /// Blue's and green's pools as the config file had them at the last (re)load: where
    /// `config`'s differ, they were changed at runtime (`switcher backend`, the fleet).
    file_pools: [Vec<BackendConfig>; 2],
}

impl ServiceState {
    fn new(config: ServiceConfig, installed: Installed) -> ServiceState {
        ServiceState {
            id: installed.id,
            file_pools: [config.blue.clone(), config.green.clone()],
            config,
            active: installed.active,
            canary_bp: installed.canary_bp,
            previous: installed.previous,
            switches: 0,
            switched_at: None,
            drain: None,
            // Unknown until written: a flag left set by a daemon that stopped mid-drain is
            // cleared at the first tick (a restarted daemon does not resume drains).
            draining_flag: true,
            health: HashMap::new(),
            watch_until: None,
        }
    }

    fn checked(&self) -> bool {
        self.config.health.check != CheckKind::None
    }

    fn state_of(&self, addr: SocketAddr) -> Health {
        if !self.checked() {
            return Health::Unknown;
        }
        self.health.get(&addr).map_or(Health::Unknown, |h| h.state)
    }

    /// The pool as the maps get it: down backends keep their slot with weight 0, so they
    /// leave the consistent-hash table and come back to the same slot. When every backend is
    /// down the pool is kept whole ("panic mode", as Envoy does): sending traffic to backends
    /// the checks call dead is no worse than sending it nowhere, and it survives a broken
    /// check.
    fn effective_pool(&self, colour: Colour) -> Vec<BackendConfig> {
        effective_pool(&self.config, &self.health, colour)
    }

    /// Whether a colour's pool was changed at runtime: it differs from the config file's.
    fn edited(&self, colour: Colour) -> bool {
        self.config.pool(colour) != self.file_pools[colour.as_u32() as usize].as_slice()
    }

    /// Whether a colour can take traffic: a checked service needs a backend that passed its
    /// checks; an unchecked one any backend with weight.
    fn healthy(&self, colour: Colour) -> bool {
        let pool = self.config.pool(colour);
        if !self.checked() {
            return pool.iter().any(|b| b.weight > 0);
        }
        pool.iter().any(|b| b.weight > 0 && self.state_of(b.addr) == Health::Up)
    }

    /// Every backend of a checked colour is known to be down.
    fn dead(&self, colour: Colour) -> bool {
        let pool = self.config.pool(colour);
        self.checked() && !pool.is_empty() && pool.iter().all(|b| self.state_of(b.addr) == Health::Down)
    }

    /// Why a colour is not healthy, backend by backend.
    fn why_unhealthy(&self, colour: Colour) -> String {
        let pool = self.config.pool(colour);
        if pool.is_empty() {
            return format!("{colour} has no backends");
        }
        pool.iter()
            .map(|b| match self.health.get(&b.addr) {
                Some(h) => format!("{}: {}", b.addr, h.describe()),
                None => format!("{}: not checked yet", b.addr),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A colour's pool as the maps get it (see [`ServiceState::effective_pool`]).
fn effective_pool(
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

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Pools changed at runtime that the reload kept ("web green"): the config file did not
    /// change them.
    pub kept: Vec<String>,
}

/// The services' switch state, in front of the maps.
pub struct Switchboard<M> {
    maps: M,
    services: Vec<ServiceState>,
    /// The last complete count of the open flows taken from the maps (see
    /// [`Switchboard::refresh_flows`]).
    last_flows: Option<Arc<FlowSnapshot>>,
    /// In a fleet: when the other nodes were last looked at, and which of them still drain,
    /// by service (see [`Switchboard::set_remote_drains`]). `None`: not in a fleet.
    remote_drains: Option<(Instant, RemoteDrains)>,
}

/// One service as this node sees it, for the fleet (see [`Switchboard::observed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub name: String,
    pub active: Colour,
    pub canary_bp: u32,
    pub live_flows: u64,
    /// The colour draining and its open flows.
    pub draining: Option<(Colour, u64)>,
    /// Blue's, then green's.
    pub healthy: [bool; 2],
}

/// `12.5%` for 1250 basis points.
#[must_use]
pub fn percent(bp: u32) -> String {
    let s = format!("{}.{:02}", bp / 100, bp % 100);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

/// A change the switchboard made, for the audit log: `what` happened to `service`, `from` → `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: String,
    pub what: String,
    pub from: String,
    pub to: String,
}

impl<M: Maps> Switchboard<M> {
    /// The services as [`Dataplane::load`] installed them, in config order.
    pub fn new(maps: M, services: Vec<(ServiceConfig, Installed)>) -> Self {
        let services = services.into_iter().map(|(c, i)| ServiceState::new(c, i)).collect();
        Switchboard { maps, services, last_flows: None, remote_drains: None }
    }

    /// The data plane, for the daemon's own use (reload).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Answers one request; a change it made is returned for the audit log.
    pub fn handle(&mut self, req: Request) -> (Response, Option<Change>) {
        let result = match req {
            Request::Status { service } => self.status(service.as_deref()).map(|r| (r, None)),
            Request::Cutover { service, colour, drain_timeout_secs, force, .. } => {
                self.cutover(&service, colour, drain_timeout_secs.map(Duration::from_secs), force)
            }
            Request::Rollback { service, force, .. } => self.rollback(&service, force),
            Request::Weight { service, colour, basis_points, force, .. } => {
                self.weight(&service, colour, basis_points, force)
            }
            Request::BackendAdd { service, colour, address, weight } => {
                self.backend(&service, colour, &address, Some(weight.unwrap_or(1)))
            }
            Request::BackendRemove { service, colour, address } => self.backend(&service, colour, &address, None),
            Request::Reload | Request::Fleet | Request::FleetWait { .. } => Err("handled by the daemon".into()),
        };
        match result {
            Ok((r, change)) => (r, change),
            Err(e) => (Response::error(e), None),
        }
    }

    fn find(&self, name: &str) -> Result<usize, String> {
        self.services.iter().position(|s| s.config.name == name).ok_or_else(|| {
            let known: Vec<_> = self.services.iter().map(|s| s.config.name.as_str()).collect();
            if known.is_empty() {
                format!("unknown service {name:?}: no services are configured")
            } else {
                format!("unknown service {name:?}; configured: {}", known.join(", "))
            }
        })
    }

    fn cutover(&mut self, name: &str, target: Option<Colour>, drain: Option<Duration>, force: bool) -> Outcome {
        let i = self.find(name)?;
        let target = target.unwrap_or(self.services[i].active.other());
        self.switch(i, target, 0, drain, "cut over", force)
    }

    fn rollback(&mut self, name: &str, force: bool) -> Outcome {
        let i = self.find(name)?;
        let s = &self.services[i];
        let Some(previous) = s.previous.filter(|p| *p != s.active) else {
            return Err(format!(
                "nothing to roll back: {name} has been {} since it was installed; use `switcher cutover {name} COLOUR` to switch",
                s.active
            ));
        };
        self.switch(i, previous, 0, None, "rolled back", force)
    }

    fn weight(&mut self, name: &str, c: Colour, bp: u32, force: bool) -> Outcome {
        let i = self.find(name)?;
        if bp > BP_ALL {
            return Err(format!("{} is more than 100%", percent(bp)));
        }
        let s = &self.services[i];
        let active = s.active;
        // The share of the colour that is not active is the canary.
        let canary = if c == active { BP_ALL - bp } else { bp };
        if canary == BP_ALL {
            // All new flows to the other colour: that is a cut-over.
            return self.switch(i, active.other(), 0, None, "cut over", force);
        }
        self.check_canary(name, active, canary, force)?;
        let s = &self.services[i];
        let before = s.canary_bp;
        self.maps
            .set_state(s.id, active, canary, s.previous)
            .map_err(|e| format!("{name}: map write failed: {}", chain(&e)))?;
        self.services[i].canary_bp = canary;
        let msg = format!(
            "{name}: new flows {} {}, {} {}",
            active,
            percent(BP_ALL - canary),
            active.other(),
            percent(canary)
        );
        let change = Change {
            service: name.to_owned(),
            what: "weight".into(),
            from: format!("{} {}", active.other(), percent(before)),
            to: format!("{} {}", active.other(), percent(canary)),
        };
        self.answer(i, msg, Some(change))
    }

    fn switch(
        &mut self,
        i: usize,
        target: Colour,
        canary: u32,
        drain_timeout: Option<Duration>,
        verb: &str,
        force: bool,
    ) -> Outcome {
        let s = &self.services[i];
        let name = s.config.name.clone();
        if s.active == target && s.canary_bp == canary {
            return self.answer(i, format!("{name}: already on {target}, nothing changed"), None);
        }
        self.may_switch(i, target, verb == "rolled back", force)?;
        let s = &self.services[i];
        let from = s.active;
        let previous = if from == target { s.previous } else { Some(from) };
        let started = Instant::now();
        self.maps
            .set_state(s.id, target, canary, previous)
            .map_err(|e| format!("{name}: map write failed, still on {from}: {}", chain(&e)))?;
        let took = started.elapsed();
        // The old colour's open flows, to report drain progress against: the last count, as
        // a cut-over never waits for a walk of the flow table. A new count starts now; the
        // drain ends only on a count begun after it.
        let id = s.id;
        let (initial, counted) = if from == target {
            (0, None)
        } else {
            self.maps.count_flows_soon();
            self.refresh_flows().map_or((0, None), |c| (c.of(id, from).live, Some(c.age())))
        };
        let s = &self.services[i];
        let timeout = drain_timeout.or(s.config.drain_timeout);
        let watch = s.config.watch;
        let s = &mut self.services[i];
        if from != target {
            s.previous = previous;
            s.switches += 1;
            s.switched_at = Some(Instant::now());
            s.drain = Some(DrainState { from, started: Instant::now(), timeout, initial });
            s.draining_flag = false;
            s.watch_until = if verb == "cut over" { watch.map(|w| Instant::now() + w) } else { None };
        }
        s.active = target;
        s.canary_bp = canary;
        let backends: Vec<String> = s.config.pool(target).iter().map(|b| b.addr.to_string()).collect();
        tracing::info!(service = %name, %from, to = %target, took_us = took.as_micros(), draining = initial, "{verb}");
        let drain = if initial > 0 {
            let counted = counted.map_or_else(String::new, |a| format!("as counted {} ms ago", a.as_millis()));
            match timeout {
                Some(t) => format!("; {initial} open flows on {from} drain ({counted}; timeout {}s)", t.as_secs()),
                None => format!("; {initial} open flows on {from} drain ({counted})"),
            }
        } else {
            String::new()
        };
        let watching = match watch {
            Some(w) if from != target && verb == "cut over" => format!("; watching {target} for {}s", w.as_secs()),
            _ => String::new(),
        };
        self.sync_draining();
        let change = Change {
            service: name.clone(),
            what: verb.replace(' ', "-"),
            from: from.to_string(),
            to: target.to_string(),
        };
        self.answer(
            i,
            format!(
                "{name}: {verb} {from} → {target} ({}) in {} µs{drain}{watching}",
                backends.join(", "),
                took.as_micros()
            ),
            Some(change),
        )
    }

    /// Whether service `i` may switch to `target`: the colour has backends, and healthy ones
    /// unless `force`.
    fn may_switch(&self, i: usize, target: Colour, rollback: bool, force: bool) -> Result<(), String> {
        let s = &self.services[i];
        let name = &s.config.name;
        if !s.config.serves(target) {
            return Err(format!(
                "{name} has no {target} backend configured; add `{target} = \"ADDRESS:PORT\"` to its [[service]] in the config, or `switcher backend add {name} {target} ADDRESS:PORT`"
            ));
        }
        if !force && !s.healthy(target) {
            return Err(format!(
                "refusing to {} {name} to {target}: no healthy {target} backend ({}); add --force to switch anyway",
                if rollback { "roll back" } else { "cut over" },
                s.why_unhealthy(target)
            ));
        }
        Ok(())
    }

    /// The checks a switch of `name` to `target` must pass here, without switching: for a
    /// change that is written to the fleet's shared state first.
    ///
    /// # Errors
    /// Why the switch would be refused.
    pub fn check_switch(&self, name: &str, target: Colour, rollback: bool, force: bool) -> Result<(), String> {
        self.may_switch(self.find(name)?, target, rollback, force)
    }

    /// The checks a canary share of `canary` basis points for the colour that is not
    /// `active` must pass here.
    ///
    /// # Errors
    /// Why the share would be refused.
    pub fn check_canary(&self, name: &str, active: Colour, canary: u32, force: bool) -> Result<(), String> {
        let s = &self.services[self.find(name)?];
        let other = active.other();
        if canary > 0 && !s.config.serves(other) {
            return Err(format!("{name} has no {other} backend to send a canary share to"));
        }
        if canary > 0 && !force && !s.healthy(other) {
            return Err(format!(
                "refusing to send a canary share of {name} to {other}: no healthy {other} backend ({}); add --force to do it anyway",
                s.why_unhealthy(other)
            ));
        }
        Ok(())
    }

    /// A service's switch state and pools as this node has them: `(active, canary share,
    /// previous, config)`.
    #[must_use]
    pub fn snapshot(&self, name: &str) -> Option<(Colour, u32, Option<Colour>, ServiceConfig)> {
        let s = &self.services[self.find(name).ok()?];
        Some((s.active, s.canary_bp, s.previous, s.config.clone()))
    }

    /// Makes a service's state what the fleet wants: its pools (when shared), then its
    /// active colour and canary share, with `drain` as the old colour's drain timeout.
    /// Health checks here do not veto it: the node that wrote it checked, and a node that
    /// disagreed would split the fleet. A `rollback` is applied as one: it never arms the
    /// watch window. Returns the change made, if any.
    ///
    /// # Errors
    /// An unknown service, or a map write that failed.
    pub fn apply_desired(
        &mut self,
        name: &str,
        active: Colour,
        canary: u32,
        drain: Option<Duration>,
        pools: Option<[Vec<BackendConfig>; 2]>,
        rollback: bool,
    ) -> Result<Option<Change>, String> {
        let i = self.find(name)?;
        let mut changed = None;
        if let Some(pools) = pools {
            for (c, pool) in Colour::ALL.into_iter().zip(pools) {
                if self.services[i].config.pool(c) == pool.as_slice() {
                    continue;
                }
                for b in &pool {
                    self.services[i].config.check_backend(b.addr)?;
                }
                *self.services[i].config.pool_mut(c) = pool;
                let s = &self.services[i];
                self.maps.set_pool(s.id, c, &s.effective_pool(c)).map_err(|e| format!("{name}: {}", chain(&e)))?;
                tracing::info!(service = %name, colour = %c, "pool from the fleet's desired state");
                changed = Some(Change {
                    service: name.to_owned(),
                    what: "pool".into(),
                    from: c.to_string(),
                    to: format!("{} backends", s.config.pool(c).len()),
                });
            }
        }
        let s = &self.services[i];
        if s.active == active && s.canary_bp == canary {
            return Ok(changed);
        }
        let verb = match (s.active == active, rollback) {
            (true, _) => "weight",
            (false, true) => "rolled back",
            (false, false) => "cut over",
        };
        let (_, change) = self.switch(i, active, canary, drain, verb, true)?;
        Ok(change.or(changed))
    }

    /// What this node publishes to the fleet about each service: `(name, active, canary,
    /// open flows on the active colour, drain (colour, open flows), healthy per colour)`,
    /// from the last walk of the flow table.
    #[must_use]
    pub fn observed(&self) -> Vec<Observed> {
        self.services
            .iter()
            .map(|s| {
                let live = |c: Colour| self.last_flows.as_ref().map_or(0, |f| f.of(s.id, c).live);
                // Until a count begun after the switch says otherwise, the old colour holds at
                // least the flows counted before it, and at least one: other nodes must not
                // take an old count's zero for the end of this node's drain.
                let draining = s.drain.as_ref().map(|d| match self.drain_live(s.id, d) {
                    Some(n) => (d.from, n),
                    None => (d.from, d.initial.max(live(d.from)).max(1)),
                });
                Observed {
                    name: s.config.name.clone(),
                    active: s.active,
                    canary_bp: s.canary_bp,
                    live_flows: live(s.active),
                    draining,
                    healthy: [s.healthy(Colour::Blue), s.healthy(Colour::Green)],
                }
            })
            .collect()
    }

    fn backend(&mut self, name: &str, c: Colour, address: &str, weight: Option<u32>) -> Outcome {
        let i = self.find(name)?;
        let s = &self.services[i];
        let mut pool = s.config.pool(c).to_vec();
        let live = c == s.active || (s.canary_bp > 0 && c == s.active.other());
        let (addr, msg) = edit_pool(&s.config, c, &mut pool, address, weight, live)?;
        *self.services[i].config.pool_mut(c) = pool;
        let s = &self.services[i];
        self.maps.set_pool(s.id, c, &s.effective_pool(c)).map_err(|e| format!("{name}: {}", chain(&e)))?;
        tracing::info!(service = %name, colour = %c, %addr, ?weight, "pool changed");
        let what = if weight.is_some() { "backend-add" } else { "backend-remove" };
        let change = Change { service: name.to_owned(), what: what.into(), from: c.to_string(), to: addr.to_string() };
        self.answer(i, msg, Some(change))
    }

    /// A successful answer about service `i`, with its status, and the change for the audit.
    fn answer(&self, i: usize, message: String, change: Option<Change>) -> Outcome {
        Ok((
            Response {
                ok: true,
                message: Some(message),
                services: vec![self.service_status(i, None)?],
                ..Response::default()
            },
            change,
        ))
    }

    /// The services as configured now (pools may have changed at runtime).
    pub fn services(&self) -> Vec<ServiceConfig> {
        self.services.iter().map(|s| s.config.clone()).collect()
    }

    /// What the health checker probes: per checked service, its check and every backend.
    pub fn checks(&self) -> Vec<(String, crate::config::HealthConfig, Vec<SocketAddr>)> {
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
                tracing::warn!(service = %name, backend = %addr, state = h.state.as_str(), "{}", h.describe());
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
        match self.switch(i, target, 0, None, if verb == "auto-rollback" { "rolled back" } else { "failed over" }, true)
        {
            Ok((_, change)) => change.map(|c| Change { what: verb.into(), ..c }).into_iter().collect(),
            Err(e) => {
                tracing::warn!(service = %name, "{verb} failed: {e}");
                Vec::new()
            }
        }
    }

    /// Applies a reloaded config's services. Services that stay keep their switch state,
    /// drain and health, and their backends that health checks took out stay out of the
    /// tables; new ones start as installed; removed ones go. A pool changed at runtime
    /// (`switcher backend`, the fleet's shared pools) is kept when the file did not change
    /// it; when the file changed it too, the reload is refused, nothing changes, and the
    /// error lists what would be lost.
    ///
    /// # Errors
    /// The runtime changes a reload would undo, or a map write that failed.
    pub fn reload(&mut self, new: Vec<ServiceConfig>) -> Result<Reloaded, String> {
        let mut conflicts = Vec::new();
        let mut kept = Vec::new();
        let mut configs = Vec::with_capacity(new.len());
        for mut config in new {
            let file_pools = [config.blue.clone(), config.green.clone()];
            if let Some(old) = self.services.iter().find(|s| s.config.name == config.name) {
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
            configs.push((config, file_pools));
        }
        if !conflicts.is_empty() {
            return Err(format!(
                "reload rejected, nothing changed: the file changes pools that were also changed at runtime, and applying it would undo: {}. Put the runtime changes in the file (or undo them with `switcher backend`), then reload",
                conflicts.join("; ")
            ));
        }
        let for_maps: Vec<ServiceConfig> = configs
            .iter()
            .map(|(config, _)| {
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
        let mut done = Reloaded { kept, ..Reloaded::default() };
        for ((config, file_pools), installed) in configs.into_iter().zip(installed) {
            let state = match old.remove(&config.name) {
                Some(mut s) if s.id == installed.id => {
                    s.config = config;
                    s.file_pools = file_pools;
                    s
                }
                _ => {
                    done.added.push(config.name.clone());
                    ServiceState { file_pools, ..ServiceState::new(config, installed) }
                }
            };
            self.services.push(state);
        }
        done.removed = old.into_keys().collect();
        done.removed.sort();
        Ok(done)
    }

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
    fn sync_draining(&mut self) {
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
    fn drain_live(&self, id: u32, drain: &DrainState) -> Option<u64> {
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

    /// The status of all services, or one.
    ///
    /// # Errors
    /// An unknown service, or a map read failure.
    pub fn status(&mut self, name: Option<&str>) -> Result<Response, String> {
        let counts = self.refresh_flows();
        let counted = counts.as_deref();
        let services = match name {
            Some(name) => vec![self.service_status(self.find(name)?, counted)?],
            None => (0..self.services.len()).map(|i| self.service_status(i, counted)).collect::<Result<_, _>>()?,
        };
        let reasons = self.maps.reasons().map_err(|e| chain(&e))?.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok(Response {
            ok: true,
            services,
            reasons,
            flows_counted_ms_ago: counted.map(|c| ms(c.age())),
            flows_count_took_ms: counted.map(|c| ms(c.finished - c.started)),
            ..Response::default()
        })
    }

    fn service_status(&self, i: usize, counts: Option<&FlowSnapshot>) -> Result<ServiceStatus, String> {
        let s = &self.services[i];
        let flows = |c: Colour| counts.map(|m| m.of(s.id, c)).unwrap_or_default();
        let colours = Colour::ALL
            .iter()
            .map(|&c| {
                Ok(ColourStatus {
                    colour: c,
                    healthy: s.healthy(c),
                    backends: s
                        .config
                        .pool(c)
                        .iter()
                        .map(|b| BackendStatus {
                            address: b.addr.to_string(),
                            weight: b.weight,
                            health: s.state_of(b.addr),
                            detail: s.health.get(&b.addr).filter(|_| s.checked()).map(BackendHealth::describe),
                        })
                        .collect(),
                    live_flows: flows(c).live,
                    closing_flows: flows(c).closing,
                    edited: s.edited(c),
                    counters: wire_counters(self.maps.counters(s.id, c).map_err(|e| chain(&e))?),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ServiceStatus {
            name: s.config.name.clone(),
            vip: s.config.vip.to_string(),
            port: s.config.port,
            preview_port: s.config.preview_port,
            protocol: match s.config.protocol {
                config::Protocol::Tcp => protocol::Protocol::Tcp,
                config::Protocol::Udp => protocol::Protocol::Udp,
            },
            mode: match s.config.mode {
                config::Mode::Nat => protocol::Mode::Nat,
                config::Mode::Dsr => protocol::Mode::Dsr,
            },
            active: s.active,
            canary: (s.canary_bp > 0).then(|| Canary { colour: s.active.other(), basis_points: s.canary_bp }),
            previous: s.previous,
            switches: s.switches,
            since_switch_secs: s.switched_at.map(|t| t.elapsed().as_secs()),
            watch_secs_left: s.watch_until.and_then(|t| t.checked_duration_since(Instant::now())).map(|d| d.as_secs()),
            drain: s.drain.as_ref().map(|d| Drain {
                colour: d.from,
                live_flows: flows(d.from).live,
                // Flows that were mid-handshake at the switch may join the count afterwards.
                initial_flows: d.initial.max(flows(d.from).live),
                elapsed_secs: d.started.elapsed().as_secs(),
                timeout_secs: d.timeout.map(|t| t.as_secs()),
                on_timeout: match s.config.on_drain_timeout {
                    DrainAction::Move => protocol::OnTimeout::Move,
                    DrainAction::Reset => protocol::OnTimeout::Reset,
                },
                elsewhere: self
                    .remote_drains
                    .as_ref()
                    .and_then(|(_, d)| d.get(&s.config.name).cloned())
                    .unwrap_or_default(),
                idle_flows: flows(d.from).idle,
            }),
            colours,
        })
    }
}

type Outcome = Result<(Response, Option<Change>), String>;

/// A colour's counters as the maps sum them, in the protocol's form.
fn wire_counters(c: Counters) -> protocol::Counters {
    let Counters { packets, bytes, reply_packets, reply_bytes, flows, rescued } = c;
    protocol::Counters { packets, bytes, reply_packets, reply_bytes, flows, rescued }
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
fn runtime_changes(before: &[BackendConfig], runtime: &[BackendConfig], file: &[BackendConfig]) -> Vec<String> {
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

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        config::{HealthConfig, Mode, Protocol},
        dataplane::FlowCounts,
    };

    /// Maps in memory, for the switchboard's and the fleet's unit tests.
    #[derive(Default)]
    pub(crate) struct FakeMaps {
        state: HashMap<u32, (Colour, u32)>,
        pools: HashMap<(u32, Colour), Vec<BackendConfig>>,
        flows: HashMap<(u32, Colour), FlowCounts>,
        ended: Vec<(u32, Colour, DrainAction)>,
        writes: usize,
        /// The drain flag of each service, as the data path would hold it.
        draining: HashMap<u32, bool>,
        /// Service ids by name, as installed.
        ids: HashMap<String, u32>,
        /// Counts handed out so far.
        passes: std::cell::Cell<u64>,
        /// A count to hand out instead of a fresh one (the walker has not finished a pass).
        frozen: Option<Arc<FlowSnapshot>>,
    }

    impl Maps for FakeMaps {
        fn set_state(
            &mut self,
            id: u32,
            active: Colour,
            canary_bp: u32,
            _: Option<Colour>,
        ) -> Result<(), DataplaneError> {
            self.state.insert(id, (active, canary_bp));
            self.writes += 1;
            Ok(())
        }
        fn set_pool(&mut self, id: u32, colour: Colour, b: &[BackendConfig]) -> Result<(), DataplaneError> {
            self.pools.insert((id, colour), b.to_vec());
            Ok(())
        }
        fn counters(&self, _: u32, _: Colour) -> Result<Counters, DataplaneError> {
            Ok(Counters::default())
        }
        fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
            Ok(vec![("no_match", 3)])
        }
        fn flow_counts(&self) -> Option<Arc<FlowSnapshot>> {
            if let Some(f) = &self.frozen {
                return Some(Arc::clone(f));
            }
            // A count begun now: each call is a new pass.
            let pass = self.passes.get() + 1;
            self.passes.set(pass);
            Some(Arc::new(FlowSnapshot::now(self.flows.clone(), pass)))
        }
        fn set_draining(&mut self, id: u32, draining: bool) -> Result<(), DataplaneError> {
            self.draining.insert(id, draining);
            Ok(())
        }
        fn install(&mut self, services: &[ServiceConfig]) -> Result<Vec<Installed>, DataplaneError> {
            self.ids.retain(|name, _| services.iter().any(|s| &s.name == name));
            let mut out = Vec::new();
            for s in services {
                let id = match self.ids.get(&s.name) {
                    Some(id) => *id,
                    None => {
                        let id = (0..).find(|i| !self.ids.values().any(|v| v == i)).unwrap_or_default();
                        self.ids.insert(s.name.clone(), id);
                        id
                    }
                };
                for c in Colour::ALL {
                    self.pools.insert((id, c), s.pool(c).to_vec());
                }
                let (active, canary_bp) = self.state.get(&id).copied().unwrap_or((s.active, 0));
                out.push(Installed { id, active, canary_bp, previous: None });
            }
            Ok(out)
        }
        fn end_drain(
            &mut self,
            _: &ServiceConfig,
            id: u32,
            from: Colour,
            a: DrainAction,
        ) -> Result<Option<u64>, DataplaneError> {
            self.ended.push((id, from, a));
            Ok(Some(1))
        }
    }

    fn backend(a: &str) -> BackendConfig {
        BackendConfig { addr: a.parse().expect("addr"), weight: 1 }
    }

    /// `web` (blue 198.51.100.2, green 198.51.100.18; NAT, TCP 80, unchecked) and `solo`
    /// (blue only), both active on blue.
    pub(crate) fn board() -> Switchboard<FakeMaps> {
        let web = ServiceConfig {
            name: "web".into(),
            vip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            port: 80,
            preview_port: None,
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            active: Colour::Blue,
            blue: vec![backend("198.51.100.2:8080")],
            green: vec![backend("198.51.100.18:8080")],
            drain_timeout: None,
            on_drain_timeout: DrainAction::Move,
            // Unchecked by default here; the health tests turn checks on.
            health: HealthConfig { check: CheckKind::None, ..HealthConfig::default_for(Protocol::Tcp) },
            watch: None,
            failover: false,
        };
        let solo = ServiceConfig { name: "solo".into(), port: 81, green: vec![], ..web.clone() };
        let installed = |id| Installed { id, active: Colour::Blue, canary_bp: 0, previous: None };
        let maps = FakeMaps { ids: HashMap::from([("web".into(), 0), ("solo".into(), 1)]), ..FakeMaps::default() };
        Switchboard::new(maps, vec![(web, installed(0)), (solo, installed(1))])
    }

    fn handle(b: &mut Switchboard<FakeMaps>, req: Request) -> Response {
        b.handle(req).0
    }

    fn cutover(b: &mut Switchboard<FakeMaps>, s: &str, c: Option<&str>) -> Response {
        handle(
            b,
            Request::Cutover {
                service: s.into(),
                colour: c.map(|c| c.parse().expect("a colour")),
                drain_timeout_secs: None,
                force: false,
                scope: Default::default(),
            },
        )
    }

    #[test]
    fn cutover_defaults_to_the_idle_colour_and_writes_the_map_once() {
        let mut b = board();
        let r = cutover(&mut b, "web", None);
        assert!(r.ok, "{r:?}");
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Green, 0)));
        assert_eq!(b.maps.writes, 1);
        assert_eq!(r.services[0].active, Colour::Green);
        assert_eq!(r.services[0].previous, Some(Colour::Blue));
        assert!(r.message.as_deref().is_some_and(|m| m.contains("blue → green")), "{r:?}");
    }

    #[test]
    fn rollback_returns_to_the_previous_colour() {
        let mut b = board();
        let r = handle(&mut b, Request::Rollback { service: "web".into(), force: false, scope: Default::default() });
        assert!(!r.ok);
        assert!(r.error.as_deref().is_some_and(|e| e.contains("nothing to roll back")), "{r:?}");
        assert!(cutover(&mut b, "web", Some("green")).ok);
        let r = handle(&mut b, Request::Rollback { service: "web".into(), force: false, scope: Default::default() });
        assert!(r.ok, "{r:?}");
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
        assert_eq!(r.services[0].switches, 2);
    }

    #[test]
    fn cutover_to_the_active_colour_changes_nothing() {
        let mut b = board();
        let r = cutover(&mut b, "web", Some("blue"));
        assert!(r.ok);
        assert_eq!(b.maps.writes, 0);
        assert!(r.message.as_deref().is_some_and(|m| m.contains("already on blue")));
    }

    #[test]
    fn errors_say_what_to_do() {
        let mut b = board();
        let r = cutover(&mut b, "api", None);
        assert_eq!(r.error.as_deref(), Some("unknown service \"api\"; configured: web, solo"));
        // A colour is checked where the request is read.
        let e = crate::protocol::parse_request(br#"{"op":"cutover","service":"web","colour":"red"}"#).expect_err("red");
        assert!(e.contains("\"red\": unknown colour"), "{e}");
        let r = cutover(&mut b, "solo", None);
        assert!(r.error.as_deref().is_some_and(|e| e.contains("no green backend configured")), "{r:?}");
        let r = handle(
            &mut b,
            Request::Weight {
                service: "solo".into(),
                colour: Colour::Green,
                basis_points: 100,
                force: false,
                scope: Default::default(),
            },
        );
        assert!(r.error.as_deref().is_some_and(|e| e.contains("no green backend")), "{r:?}");
        assert_eq!(b.maps.writes, 0, "a refused request writes nothing");
    }

    #[test]
    fn weights_set_a_canary_and_100_percent_is_a_cutover() {
        let mut b = board();
        let w = |b: &mut Switchboard<FakeMaps>, c: Colour, bp| {
            handle(
                b,
                Request::Weight {
                    service: "web".into(),
                    colour: c,
                    basis_points: bp,
                    force: false,
                    scope: Default::default(),
                },
            )
        };
        let r = w(&mut b, Colour::Green, 500);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.message.as_deref(), Some("web: new flows blue 95%, green 5%"));
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 500)));
        assert_eq!(r.services[0].canary, Some(Canary { colour: Colour::Green, basis_points: 500 }));
        assert!(w(&mut b, Colour::Blue, 9_999).ok);
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 1)));
        assert!(w(&mut b, Colour::Green, 0).ok);
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
        let r = w(&mut b, Colour::Green, 10_000);
        assert_eq!(r.services[0].active, Colour::Green, "{r:?}");
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Green, 0)));
        assert!(!w(&mut b, Colour::Green, 10_001).ok);
        assert_eq!(percent(1), "0.01%");
        assert_eq!(percent(1250), "12.5%");
        assert_eq!(percent(10_000), "100%");
    }

    #[test]
    fn the_data_path_drain_flag_follows_the_drain_and_waits_on_other_nodes() {
        let mut b = board();
        b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 2, closing: 0, idle: 0 });
        assert!(cutover(&mut b, "web", Some("green")).ok);
        assert_eq!(b.maps.draining.get(&0), Some(&true), "set by the cut-over itself");
        b.tick();
        assert_eq!(b.maps.draining.get(&0), Some(&true), "still draining");
        // The local flows are gone (or idle), but another node still holds some: wait for it.
        b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 0, closing: 0, idle: 2 });
        b.set_remote_drains(HashMap::from([("web".to_owned(), vec![("lb1".to_owned(), 8)])]));
        b.tick();
        assert!(b.waits_on_fleet());
        let st = b.status(Some("web")).expect("status");
        let drain = st.services[0].drain.clone().expect("draining while lb1 holds flows");
        assert_eq!((drain.live_flows, drain.idle_flows, drain.elsewhere.clone()), (0, 2, vec![("lb1".to_owned(), 8)]));
        assert_eq!(b.maps.draining.get(&0), Some(&true));
        b.set_remote_drains(HashMap::new());
        b.tick();
        assert!(b.services[0].drain.is_none(), "no node holds any: the drain is over");
        assert_eq!(b.maps.draining.get(&0), Some(&false), "and the data path is told");
    }

    #[test]
    fn only_a_count_begun_after_the_switch_ends_a_drain() {
        let mut b = board();
        // The last pass, from before the cut-over, saw no flow of blue: it proves nothing.
        b.maps.frozen = Some(Arc::new(FlowSnapshot::now(HashMap::new(), 1_000)));
        let r = cutover(&mut b, "web", Some("green"));
        assert!(r.ok, "{r:?}");
        b.tick();
        b.tick();
        assert!(b.services[0].drain.is_some(), "no pass has begun since the drain did");
        assert!(!b.waits_on_fleet(), "nor does it say this node is empty");
        let observed = b.observed();
        assert_eq!(observed[0].draining, Some((Colour::Blue, 1)), "the fleet is not told 0 on an old count");
        let st = b.status(Some("web")).expect("status");
        assert!(st.flows_counted_ms_ago.is_some(), "status says how old its counts are");
        // A pass begun after the switch finds blue empty: the drain is over.
        b.maps.frozen = None;
        b.tick();
        assert!(b.services[0].drain.is_none(), "a new pass ends it");
    }

    #[test]
    fn drains_complete_when_empty_and_end_at_the_timeout() {
        let mut b = board();
        b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 3, closing: 0, idle: 0 });
        let r = handle(
            &mut b,
            Request::Cutover {
                service: "web".into(),
                colour: None,
                drain_timeout_secs: Some(0),
                force: false,
                scope: Default::default(),
            },
        );
        assert!(
            r.message
                .as_deref()
                .is_some_and(|m| m.contains("3 open flows on blue drain (as counted") && m.contains("; timeout 0s)")),
            "{r:?}"
        );
        let st = b.status(Some("web")).expect("status");
        let drain = st.services[0].drain.clone().expect("draining");
        assert_eq!((drain.colour, drain.live_flows, drain.initial_flows), (Colour::Blue, 3, 3));
        b.tick();
        assert_eq!(b.maps.ended, [(0, Colour::Blue, DrainAction::Move)], "timeout 0: ended at the first tick");
        assert!(b.status(Some("web")).expect("status").services[0].drain.is_none());

        // Without a timeout the drain waits for the flows to end.
        b.maps.flows.insert((0, Colour::Green), FlowCounts { live: 2, closing: 0, idle: 0 });
        assert!(cutover(&mut b, "web", Some("blue")).ok);
        b.tick();
        assert!(b.services[0].drain.is_some());
        b.maps.flows.insert((0, Colour::Green), FlowCounts { live: 0, closing: 2, idle: 0 });
        b.tick();
        assert!(b.services[0].drain.is_none(), "closing flows do not hold a drain");
        assert_eq!(b.maps.ended.len(), 1);
    }

    #[test]
    fn pools_change_at_runtime() {
        let mut b = board();
        let add = |b: &mut Switchboard<FakeMaps>, a: &str, w| {
            handle(b, Request::BackendAdd { service: "web".into(), colour: Colour::Blue, address: a.into(), weight: w })
        };
        assert!(add(&mut b, "198.51.100.3:8080", Some(2)).ok);
        assert_eq!(b.maps.pools[&(0, Colour::Blue)].len(), 2);
        assert!(add(&mut b, "198.51.100.3:8080", Some(5)).ok, "re-adding changes the weight");
        assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 5);
        assert!(add(&mut b, "[2001:db8::1]:80", None).error.is_some_and(|e| e.contains("address family")));
        assert!(add(&mut b, "nonsense", None).error.is_some_and(|e| e.contains("is not ADDRESS:PORT")));
        let rm = |b: &mut Switchboard<FakeMaps>, a: &str| {
            handle(b, Request::BackendRemove { service: "web".into(), colour: Colour::Blue, address: a.into() })
        };
        assert!(rm(&mut b, "198.51.100.2:8080").ok);
        let r = rm(&mut b, "198.51.100.3:8080");
        assert!(r.error.as_deref().is_some_and(|e| e.contains("last blue backend")), "{r:?}");
        assert!(rm(&mut b, "198.51.100.9:8080").error.is_some_and(|e| e.contains("is not a blue backend")));
    }

    pub(crate) fn checked(b: &mut Switchboard<FakeMaps>, watch: Option<Duration>, failover: bool) {
        let s = &mut b.services[0];
        s.config.health.check = CheckKind::Tcp;
        s.config.watch = watch;
        s.config.failover = failover;
    }

    pub(crate) fn probe(b: &mut Switchboard<FakeMaps>, addr: &str, ok: bool) -> Vec<Change> {
        let r = if ok { Ok(()) } else { Err("connect: connection refused".to_owned()) };
        b.record_health("web", vec![(addr.parse().expect("addr"), r)])
    }

    #[test]
    fn cutover_is_refused_to_an_unhealthy_colour_unless_forced() {
        let mut b = board();
        checked(&mut b, None, false);
        probe(&mut b, "198.51.100.2:8080", true);
        probe(&mut b, "198.51.100.18:8080", false);
        let r = cutover(&mut b, "web", Some("green"));
        let e = r.error.expect("refused");
        assert!(e.contains("refusing to cut over web to green: no healthy green backend (198.51.100.18:8080: down for 0s: connect: connection refused)"), "{e}");
        assert_eq!(b.maps.writes, 0);
        let r = handle(
            &mut b,
            Request::Cutover {
                service: "web".into(),
                colour: None,
                drain_timeout_secs: None,
                force: true,
                scope: Default::default(),
            },
        );
        assert!(r.ok, "{r:?}");
        // Its only backend is down: the table keeps it (panic mode) rather than go empty.
        assert_eq!(b.maps.pools[&(0, Colour::Green)][0].weight, 1);
        // With a healthy sibling, a down backend leaves the table: weight 0 in the pool.
        let add = Request::BackendAdd {
            service: "web".into(),
            colour: Colour::Green,
            address: "198.51.100.19:8080".into(),
            weight: None,
        };
        assert!(handle(&mut b, add).ok);
        probe(&mut b, "198.51.100.19:8080", true);
        assert_eq!(b.maps.pools[&(0, Colour::Green)][0].weight, 0);
        assert_eq!(b.maps.pools[&(0, Colour::Green)][1].weight, 1);
        let s = b.status(Some("web")).expect("status");
        assert_eq!(s.services[0].colours[1].backends[0].health, Health::Down);
        assert!(s.services[0].colours[1].healthy, "one healthy backend makes the colour healthy");
    }

    #[test]
    fn a_failing_new_colour_is_rolled_back_within_the_watch_window() {
        let mut b = board();
        checked(&mut b, Some(Duration::from_secs(60)), false);
        probe(&mut b, "198.51.100.2:8080", true);
        probe(&mut b, "198.51.100.18:8080", true);
        let r = cutover(&mut b, "web", Some("green"));
        assert!(r.message.as_deref().is_some_and(|m| m.contains("watching green for 60s")), "{r:?}");
        assert_eq!(r.services[0].watch_secs_left.map(|s| s > 50), Some(true));
        // Three failures in a row (fall = 3) take green down, and with it the cut-over.
        assert!(probe(&mut b, "198.51.100.18:8080", false).is_empty());
        assert!(probe(&mut b, "198.51.100.18:8080", false).is_empty());
        let changes = probe(&mut b, "198.51.100.18:8080", false);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].what.as_str(), changes[0].from.as_str(), changes[0].to.as_str()),
            ("auto-rollback", "green", "blue")
        );
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
    }

    #[test]
    fn a_dead_live_colour_fails_over_only_when_enabled() {
        let mut b = board();
        checked(&mut b, None, false);
        probe(&mut b, "198.51.100.18:8080", true);
        assert!(probe(&mut b, "198.51.100.2:8080", false).is_empty(), "failover is off");
        assert_eq!(b.services[0].active, Colour::Blue);
        let mut b = board();
        checked(&mut b, None, true);
        probe(&mut b, "198.51.100.18:8080", true);
        let changes = probe(&mut b, "198.51.100.2:8080", false);
        assert_eq!(changes.first().map(|c| c.what.as_str()), Some("failover"));
        assert_eq!(b.services[0].active, Colour::Green);
        // Green dies too: nowhere to go, nothing changes.
        b.services[0].config.health.fall = 1;
        assert!(probe(&mut b, "198.51.100.18:8080", false).is_empty());
    }

    #[test]
    fn a_reload_keeps_health_down_backends_out_and_runtime_pool_changes() {
        let mut b = board();
        // web's blue pool has two backends; the second fails its checks and leaves the table.
        b.services[0].config.blue.push(backend("198.51.100.3:8080"));
        b.services[0].file_pools[0].push(backend("198.51.100.3:8080"));
        checked(&mut b, None, false);
        b.services[0].config.health.fall = 1;
        probe(&mut b, "198.51.100.2:8080", true);
        probe(&mut b, "198.51.100.3:8080", false);
        assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 0, "down: out of the table");
        // An operator adds a green backend at runtime.
        let add = Request::BackendAdd {
            service: "web".into(),
            colour: Colour::Green,
            address: "198.51.100.19:8080".into(),
            weight: None,
        };
        assert!(handle(&mut b, add).ok);
        let file = b.services();
        let mut file: Vec<ServiceConfig> = file
            .into_iter()
            .map(|mut s| {
                s.green.retain(|g| g.addr.to_string() != "198.51.100.19:8080");
                s
            })
            .collect();
        let status = b.status(Some("web")).expect("status");
        assert!(
            status.services[0].colours[1].edited && !status.services[0].colours[0].edited,
            "status says green was changed at runtime"
        );

        // The same file again: the down backend stays out, the runtime backend stays in.
        let done = b.reload(file.clone()).expect("reloaded");
        assert_eq!(done.kept, ["web green"]);
        assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 0, "a reload brought a down backend back");
        assert_eq!(b.maps.pools[&(0, Colour::Green)].len(), 2, "a reload dropped a backend added at runtime");
        assert_eq!(b.services()[0].green.len(), 2);

        // A file that changes green too would undo the runtime change: refused, nothing written.
        let before = b.maps.pools.clone();
        file[0].green.push(backend("198.51.100.20:8080"));
        let e = b.reload(file.clone()).expect_err("refused");
        assert!(e.contains("web green: 198.51.100.19:8080 added at runtime would be removed"), "{e}");
        assert_eq!(b.maps.pools, before);
        // With the runtime change written into the file, it applies.
        file[0].green.push(backend("198.51.100.19:8080"));
        let done = b.reload(file).expect("reloaded");
        assert!(done.kept.is_empty());
        assert_eq!(b.maps.pools[&(0, Colour::Green)].len(), 3);
        assert!(!b.status(Some("web")).expect("status").services[0].colours[1].edited);
    }

    #[test]
    fn changes_are_reported_for_the_audit_log() {
        let mut b = board();
        let (_, change) = b.handle(Request::Cutover {
            service: "web".into(),
            colour: None,
            drain_timeout_secs: None,
            force: false,
            scope: Default::default(),
        });
        assert_eq!(
            change,
            Some(Change { service: "web".into(), what: "cut-over".into(), from: "blue".into(), to: "green".into() })
        );
        let (_, none) = b.handle(Request::Status { service: None });
        assert_eq!(none, None);
    }

    #[test]
    fn status_lists_services_and_reasons() {
        let mut b = board();
        let r = b.status(None).expect("status");
        assert_eq!(r.services.len(), 2);
        assert_eq!(r.services[0].colours.len(), 2);
        assert!(r.services[1].colours[1].backends.is_empty());
        assert_eq!(r.reasons, [("no_match".to_owned(), 3)]);
        assert!(b.status(Some("nope")).is_err());
    }
}
