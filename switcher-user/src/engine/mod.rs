//! The engine: the services' switch state in front of the maps — cut-overs, rollbacks,
//! canaries, pools, drains, health, automatic rollback and failover. It has one owner, the
//! agent's engine task ([`owner`]): requests reach it one at a time over a channel, so
//! concurrent operators are serialised and the last accepted change wins, and no lock is held
//! across a map syscall.
//!
//! - [`rules`]: the switch rules, once, for this node and for the fleet's planner;
//! - [`maps`]: what it needs of the data plane (the [`Maps`] trait; a fake in the tests);
//! - `pools`, `health`, `drain`, `reload`, `status`: the rest of the [`Switchboard`], by
//!   concern.
//!
//! Above it: the fleet and the agent. Below it: the data plane, the config and the protocol.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

mod drain;
mod health;
pub mod maps;
pub mod owner;
mod pools;
mod reload;
pub mod rollout;
pub mod rules;
mod shadow;
pub mod signals;
mod status;

use switcher_common::{BP_ALL, user::Colour};

pub use self::{
    maps::Maps,
    owner::{Handle, Stopped},
    pools::edit_pool,
    rollout::{HookRun, RolloutEvents},
};
use self::{
    pools::effective_pool,
    rules::{Ask, Decision, Refused, SwitchState},
};
use crate::{
    config::{BackendConfig, CheckKind, ServiceConfig},
    dataplane::Installed,
    flowcount::FlowSnapshot,
    health::BackendHealth,
    protocol::{Health, Request, Response, SwitchKinds, percent},
};

/// Other nodes of a fleet still holding open flows of a draining colour, by service:
/// `(node, open flows)` (0: the node has not applied the switch yet).
pub type RemoteDrains = HashMap<String, Vec<(String, u64)>>;

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
    switch_kinds: SwitchKinds,
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
    /// The shadow setting as the config file had it at the last (re)load: where `config`'s
    /// differs, it was changed at runtime (`switcher shadow`, the fleet).
    file_shadow: crate::shadow::ShadowSetting,
}

impl ServiceState {
    fn new(config: ServiceConfig, installed: Installed) -> ServiceState {
        ServiceState {
            id: installed.id,
            file_pools: [config.blue.clone(), config.green.clone()],
            file_shadow: config.shadow,
            config,
            active: installed.active,
            canary_bp: installed.canary_bp,
            previous: installed.previous,
            switches: 0,
            switch_kinds: SwitchKinds::default(),
            switched_at: None,
            drain: None,
            // Unknown until written: a flag left set by a daemon that stopped mid-drain is
            // cleared at the first tick (a restarted daemon does not resume drains).
            draining_flag: true,
            health: HashMap::new(),
            watch_until: None,
        }
    }

    fn switch_state(&self) -> SwitchState {
        SwitchState { active: self.active, canary_bp: self.canary_bp, previous: self.previous }
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

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Pools changed at runtime that the reload kept ("web green"): the config file did not
    /// change them.
    pub kept: Vec<String>,
    /// Shadow settings changed at runtime that the reload kept ("dns 50%"): the config file
    /// did not change the service's `shadow` or `shadow_ceiling`.
    pub kept_shadow: Vec<String>,
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
    /// Rollouts under way or ended, and backups kept (see [`rollout`]).
    rollouts: rollout::Rollouts,
    /// The fast guard's samples of the rollouts under way (see [`signals`]).
    guard: signals::Guard,
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

/// The verb of a rollback the daemon made by itself (the watch window saw the new colour fail).
pub(crate) const AUTO_ROLLBACK: &str = "rolled back automatically";

/// A change the switchboard made, for the audit log: `what` happened to `service`, `from` → `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: String,
    pub what: String,
    pub from: String,
    pub to: String,
}

impl<M: Maps> Switchboard<M> {
    /// The services as [`crate::dataplane::Dataplane::load`] installed them, in config order.
    pub fn new(maps: M, services: Vec<(ServiceConfig, Installed)>) -> Self {
        let services = services.into_iter().map(|(c, i)| ServiceState::new(c, i)).collect();
        Switchboard {
            maps,
            services,
            last_flows: None,
            remote_drains: None,
            rollouts: rollout::Rollouts::default(),
            guard: signals::Guard::default(),
        }
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
                self.ask(&service, Ask::Cutover(colour), drain_timeout_secs.map(Duration::from_secs), force)
            }
            Request::Rollback { service, force, .. } => self.ask(&service, Ask::Rollback, None, force),
            Request::Weight { service, colour, basis_points, force, .. } => {
                self.ask(&service, Ask::Weight(colour, basis_points), None, force)
            }
            Request::BackendAdd { service, colour, address, weight } => {
                self.backend(&service, colour, &address, Some(weight.unwrap_or(1)))
            }
            Request::BackendRemove { service, colour, address } => self.backend(&service, colour, &address, None),
            Request::Rollout { service, colour, steps, force } => {
                self.start_rollout(&service, colour, steps.as_deref(), force)
            }
            Request::RolloutControl { service, action } => self.control_rollout(&service, action),
            Request::Drill { service, secs, share_bp } => {
                self.start_drill(&service, Duration::from_secs(secs), share_bp)
            }
            Request::Shadow { service, share_bp, ceiling, .. } => self.set_shadow(&service, share_bp, ceiling),
            Request::Reload | Request::Fleet | Request::FleetWait { .. } | Request::Flows(_) => {
                Err("handled by the daemon".into())
            }
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

    /// A cut-over, rollback or weight, as the rules decide it (see [`rules`]).
    fn ask(&mut self, name: &str, ask: Ask, drain: Option<Duration>, force: bool) -> Outcome {
        let i = self.find(name)?;
        let now = self.services[i].switch_state();
        let decision = rules::decide(now, ask).map_err(|e| match e {
            Refused::NothingToRollBack { active } => format!(
                "nothing to roll back: {name} has been {active} since it was installed; use `switcher cutover {name} COLOUR` to switch"
            ),
            Refused::MoreThanAll(_) => e.to_string(),
        })?;
        match decision {
            Decision::Unchanged => self.switch(i, now.active, 0, None, "cut over", force),
            Decision::Switch { to, rollback: true } => self.switch(i, to, 0, None, "rolled back", force),
            // A cut-over asked as one has its own drain timeout; 100 % of a weight has not.
            Decision::Switch { to, rollback: false } => {
                let drain = if matches!(ask, Ask::Cutover(_)) { drain } else { None };
                self.switch(i, to, 0, drain, "cut over", force)
            }
            Decision::Canary(canary) => self.canary(i, canary, force),
        }
    }

    /// Sends `canary` basis points of new flows to the colour that is not active.
    fn canary(&mut self, i: usize, canary: u32, force: bool) -> Outcome {
        let s = &self.services[i];
        let (name, active) = (s.config.name.clone(), s.active);
        let name = name.as_str();
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
        self.may_switch(i, target, verb.starts_with("rolled back"), force)?;
        let s = &self.services[i];
        let from = s.active;
        let previous = s.switch_state().then(target, canary).previous;
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
            let kinds = &mut s.switch_kinds;
            *match verb {
                "rolled back" => &mut kinds.rollback,
                AUTO_ROLLBACK => &mut kinds.auto_rollback,
                "failed over" => &mut kinds.failover,
                _ => &mut kinds.cutover,
            } += 1;
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
        // The same colour: a canary was ended (a cut-over to the active colour, or a rollback
        // of a service never switched).
        let what = if from == target {
            format!("{verb}: the canary of {} ended, every new flow on {target}", target.other())
        } else {
            format!("{verb} {from} → {target}")
        };
        self.answer(
            i,
            format!("{name}: {what} ({}) in {} µs{drain}{watching}", backends.join(", "), took.as_micros()),
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
}

type Outcome = Result<(Response, Option<Change>), String>;

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
pub(crate) mod tests;
