//! The data plane's side of the flow table: the walker's descriptors, the end of a drain
//! (move or reset, batch by batch, off the engine), and the flows of a removed service.

use super::*;

/// The end of a drain, as [`Dataplane::drain_end`] prepared it: runs on the mapped `FLOWS`,
/// batch by batch.
#[derive(Debug)]
pub struct DrainEnd {
    flows: std::sync::Arc<crate::flowtable::FlowTable>,
    id: u32,
    from: Colour,
    action: config::DrainAction,
    /// The service's switch state when the drain ended: where a new flow goes.
    state: u32,
    preview: Option<[u8; 2]>,
    /// Blue's and green's live table and backends by slot.
    pools: [(Vec<u16>, Vec<Option<Backend>>); 2],
}

impl DrainEnd {
    /// Moves or resets the drain's flows; returns how many.
    #[must_use]
    pub fn run(&self) -> u64 {
        let mut handled = 0;
        self.flows.walk(|keys, values| {
            for (key, flow) in keys.iter().zip(values) {
                if flow.service != self.id
                    || u32::from(flow.colour) != self.from.as_u32()
                    || flow.flags & FLOW_CLOSING != 0
                {
                    continue;
                }
                // The data path may have given the 5-tuple a new flow since the batch was
                // read: only the flow we saw is touched.
                if self.flows.lookup(key).as_ref() != Some(flow) {
                    continue;
                }
                let new = match self.action {
                    config::DrainAction::Reset => Flow { flags: flow.flags | FLOW_RESET, ..*flow },
                    config::DrainAction::Move => {
                        let colour = Colour::from_u32(new_flow_colour(
                            self.state,
                            self.preview == Some(key.dport),
                            flow_hash(key, SEED_CANARY),
                        ));
                        let Some((idx, backend)) = self.pick(colour, key) else { continue };
                        Flow { backend, colour: colour.as_u32() as u8, backend_idx: idx, ..*flow }
                    }
                };
                if self.flows.update(key, &new).is_ok() {
                    handled += 1;
                }
            }
        });
        handled
    }

    /// The backend the live table gives a flow, as the data path would pick it.
    fn pick(&self, colour: Colour, key: &FlowKey) -> Option<(u16, Backend)> {
        let (table, slots) = &self.pools[usize::from(colour == Colour::Green)];
        let size = u32::try_from(table.len()).ok().filter(|n| *n > 0)?;
        let idx = *table.get((flow_hash(key, SEED_RING) % size) as usize)?;
        Some((idx, (*slots.get(usize::from(idx))?)?))
    }
}

impl Dataplane {
    /// A walker that counts the flows of the mapped `FLOWS`, and the readers' end, which this
    /// data plane keeps (see [`crate::flowcount`]): the daemon runs the walker on a thread of
    /// its own, and the switchboard reads its passes through [`Dataplane::flow_counts`].
    /// Without a call to this, no flows are counted.
    pub fn flow_walker(&mut self) -> crate::flowcount::FlowWalker {
        let (counter, walker) = crate::flowcount::counter(
            std::sync::Arc::clone(&self.table),
            self.options.udp_idle_timeout,
            self.options.tcp_idle_timeout,
            self.started_ns,
        );
        self.counter = Some(counter);
        walker
    }

    /// The mapped `FLOWS` and the flows it is made for, for the walks of `switcher flows`
    /// (see [`crate::flowlist`]), which run apart from the engine.
    #[must_use]
    pub fn flow_lister(&self) -> (std::sync::Arc<crate::flowtable::FlowTable>, u64) {
        (std::sync::Arc::clone(&self.table), self.table.capacity())
    }

    /// Counts the flows now, on this thread (tests and diagnostics; the daemon reads the
    /// walker's passes instead). Expired flows are not counted.
    #[must_use]
    pub fn count_flows(&self) -> crate::flowcount::FlowSnapshot {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let (udp, tcp) = (ns(self.options.udp_idle_timeout), ns(self.options.tcp_idle_timeout));
        crate::flowcount::count(&self.table, udp, tcp, self.started_ns, 0)
    }

    /// The last complete count of the flows (see [`Dataplane::flow_walker`]).
    #[must_use]
    pub fn flow_counts(&self) -> Option<std::sync::Arc<crate::flowcount::FlowSnapshot>> {
        self.counter.as_ref().and_then(crate::flowcount::FlowCounter::last)
    }

    /// Asks the walker for a new count as soon as it may.
    pub fn count_flows_soon(&self) {
        if let Some(c) = &self.counter {
            c.ask();
        }
    }

    /// Drops the `REVERSE` entries of backends that are in no pool and that no flow of a pass
    /// begun after the pools last changed uses (a pass begun earlier may have missed the
    /// flows a backend gained before it left its pool).
    pub fn collect_reverse(&mut self, pass: &crate::flowcount::FlowSnapshot) {
        if pass.started > self.reverse_changed {
            self.gc_reverse(&pass.in_use);
        }
    }

    /// Calls `each` with the flows, [`crate::flowcount::BATCH`] at a time (never all of
    /// them at once).
    pub(super) fn walk_flows(&self, each: impl FnMut(&[FlowKey], &[Flow])) {
        self.table.walk(each);
    }

    /// Ends the drain of `from`: its open flows of service `id` are re-pointed to where a new
    /// flow would go now (`move`), or marked so the data path answers their next TCP packet
    /// with an RST and forgets them (`reset`). Returns how many flows were handled.
    ///
    /// # Errors
    /// The service's switch state could not be read.
    pub fn end_drain(
        &mut self,
        service: &ServiceConfig,
        id: u32,
        from: Colour,
        action: config::DrainAction,
    ) -> Result<u64> {
        Ok(self.drain_end(service, id, from, action)?.run())
    }

    /// The work of [`Dataplane::end_drain`], to be done anywhere (it walks every flow: the
    /// daemon runs it on a thread of its own, without the board's lock): the switch state
    /// and the pools as they are now, and the mapped `FLOWS`.
    ///
    /// # Errors
    /// The state could not be read.
    pub fn drain_end(
        &self,
        service: &ServiceConfig,
        id: u32,
        from: Colour,
        action: config::DrainAction,
    ) -> Result<DrainEnd> {
        let state = self.state.get(&id, 0).map_err(map_err(MAP_STATE))?;
        let flows = std::sync::Arc::clone(&self.table);
        let pool = |c: Colour| {
            self.pools.get(&(id, c)).map_or_else(
                || (Vec::new(), Vec::new()),
                |p| (p.table.clone(), p.slots.iter().map(|b| b.as_ref().map(|b| backend_value(b.addr))).collect()),
            )
        };
        Ok(DrainEnd {
            flows,
            id,
            from,
            action,
            state,
            preview: service.preview_port.map(u16::to_be_bytes),
            pools: [pool(Colour::Blue), pool(Colour::Green)],
        })
    }

    /// Removes the flows addressed to any of `keys`; returns how many. A flow the data path
    /// re-created since the walk is left alone.
    pub(super) fn purge_flows(&mut self, keys: &[ServiceKey]) -> u64 {
        let to = |k: &FlowKey| {
            keys.iter().any(|s| s.vip == k.dst && s.port == k.dport && s.proto == k.proto && s.family == k.family)
        };
        let mut n = 0;
        self.table.walk(|batch, values| {
            for (key, flow) in batch.iter().zip(values).filter(|(k, _)| to(k)) {
                n += u64::from(self.table.remove_if(key, flow));
            }
        });
        n
    }

    /// The tracked flows, for tests and diagnostics: (key, flow) pairs.
    #[must_use]
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        let mut all = Vec::new();
        self.walk_flows(|k, v| all.extend(k.iter().copied().zip(v.iter().copied())));
        all
    }
}
