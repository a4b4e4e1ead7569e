//! The engine's answer to `status`: each service's switch state, pools, health, drain and
//! counters, in the protocol's types.

use std::time::{Duration, Instant};

use switcher_common::user::Colour;

use super::{Maps, Switchboard, chain};
use crate::{
    config::{self, DrainAction},
    flowcount::FlowSnapshot,
    health::BackendHealth,
    protocol::{self, BackendStatus, Canary, ColourStatus, Drain, FlowTable, Response, ServiceStatus},
};

impl<M: Maps> Switchboard<M> {
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
            flow_table: counted.map(|c| {
                let mut t = c.counts.values().fold(FlowTable::default(), |mut t, n| {
                    t.live += n.live;
                    t.closing += n.closing;
                    t.idle += n.idle;
                    t
                });
                t.expired = c.walked.saturating_sub(t.live + t.closing + t.idle);
                t
            }),
            ..Response::default()
        })
    }

    /// Each service's id in the maps and its name (to name the flows of `switcher flows`).
    #[must_use]
    pub fn service_ids(&self) -> Vec<(u32, String)> {
        self.services.iter().map(|s| (s.id, s.config.name.clone())).collect()
    }

    pub(super) fn service_status(&self, i: usize, counts: Option<&FlowSnapshot>) -> Result<ServiceStatus, String> {
        let s = &self.services[i];
        let (rollout, backup) = self.rollout_status(&s.config.name);
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
                    counters: self.maps.counters(s.id, c).map_err(|e| chain(&e))?,
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
            switch_kinds: s.switch_kinds,
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
            rollout,
            backup,
            shadow: self.shadow_status(s)?,
        })
    }
}
