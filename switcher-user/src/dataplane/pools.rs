//! Pools, tables and the maps that follow them: `BACKENDS` slots, the Maglev tables in the
//! `RING` slab and their `RING_LIVE` entries, and `PORTS`, `VIPS` and `REVERSE`, written in
//! the order the data path needs (what a key needs goes in before the key).

use std::{collections::HashMap as StdHashMap, net::SocketAddr};

use switcher_common::{
    BackendKey, MAP_BACKENDS, MAP_PORTS, MAP_REVERSE, MAP_RING, MAP_RING_LIVE, MAP_SERVICES, MAP_STATE, MAP_VIPS,
    MAX_POOL, MAX_SERVICES, PORT_BACKEND, PORT_SERVICE, REVERSE_WAYS, RING_CHUNK, RING_EMPTY, RING_NONE, RING_SIZES,
    Reverse, RingChunk, SERVICE_DSR, SERVICE_PREVIEW, Service, ServiceKey, VipPort, colour_slot, pool_slot, ring_class,
    user::Colour,
};

use super::{
    Dataplane, DataplaneError, Installed, Pool, Result, addr_ip, backend_key, backend_value, map_err, service_key,
};
use crate::{
    config::{BackendConfig, Mode, ServiceConfig},
    maglev, slab,
};

impl Dataplane {
    /// Installs `services`: with `adopt`, services already in the maps keep their id, switch
    /// state and backend slots, removed ones are deleted; new ones start as configured.
    /// Returns the services as installed, in order.
    ///
    /// In three passes, so that thousands of services cost no more than thousands of map
    /// writes: every pool's `BACKENDS` slots; then `VIPS`, `PORTS` and `REVERSE` once; then
    /// every table and the `SERVICES` keys, which need all of those.
    pub(super) fn install_all(&mut self, services: &[ServiceConfig], adopt: bool) -> Result<Vec<Installed>> {
        let existing: StdHashMap<ServiceKey, Service> =
            if adopt { self.services.iter().filter_map(std::result::Result::ok).collect() } else { StdHashMap::new() };
        if adopt && self.reverse_written.is_empty() {
            // Backends that left their pool keep their entries while flows may use them.
            self.reverse_written = self.reverse.iter().filter_map(std::result::Result::ok).collect();
        }
        self.stamp_clock()?;
        let room = self.options.max_services.unwrap_or(MAX_SERVICES);
        let ids: Vec<Option<u32>> =
            services.iter().map(|s| existing.get(&service_key(s, s.port)).map(|svc| svc.id)).collect();
        let mut used: std::collections::HashSet<u32> = ids.iter().flatten().copied().collect();
        let mut next_free = 0..room;
        let mut changed: Vec<ServiceKey> = Vec::new();
        let mut placed = Vec::with_capacity(services.len());
        for (s, id) in services.iter().zip(ids) {
            let id = match id {
                Some(id) => {
                    self.seed_pools(id, s)?;
                    id
                }
                None => {
                    let id = next_free.find(|i| !used.contains(i)).ok_or(DataplaneError::TooManyServices(room))?;
                    used.insert(id);
                    self.set_state(id, s.active, 0, None)?;
                    id
                }
            };
            let key = service_key(s, s.port);
            self.service_vips.insert(id, switcher_common::vip_slot(&key.vip, key.family));
            self.service_ports.insert(id, std::iter::once(s.port).chain(s.preview_port).collect());
            if s.mode == Mode::Nat {
                let fronts = std::iter::once(s.port)
                    .chain(s.preview_port)
                    .map(|p| VipPort { vip: key.vip, port: p.to_be_bytes(), _pad: [0; 2] })
                    .collect();
                self.service_fronts.insert(id, (fronts, key.proto));
            } else {
                self.service_fronts.remove(&id);
            }
            placed.push(id);
        }
        // Refused before any pool is written: a backend answering for too many VIP:ports.
        fronts_fit(&self.fronts_of(services.iter().zip(&placed).flat_map(|(s, &id)| {
            Colour::ALL.into_iter().flat_map(move |c| s.pool(c).iter().map(move |b| (id, b.addr)))
        })))?;
        for (s, &id) in services.iter().zip(&placed) {
            for colour in Colour::ALL {
                self.stage_pool(id, colour, s.pool(colour))?;
            }
        }
        // The VIP, port and reply bits go in before the tables and keys that need them.
        self.write_vips()?;
        self.write_ports()?;
        self.write_reverse()?;
        let mut installed = Vec::with_capacity(services.len());
        for (s, &id) in services.iter().zip(&placed) {
            for colour in Colour::ALL {
                self.publish_table(id, colour)?;
            }
            let key = service_key(s, s.port);
            let mut flags = if s.mode == Mode::Dsr { SERVICE_DSR } else { 0 };
            if existing.get(&key).is_some_and(|old| old.flags & SERVICE_DSR != flags) {
                // NAT ↔ DSR: the open flows recorded the old mode (`FLOW_DSR`); they go.
                changed.push(key);
                changed.extend(s.preview_port.map(|p| service_key(s, p)));
            }
            self.services.insert(&key, &Service { id, flags }, 0).map_err(map_err(MAP_SERVICES))?;
            if let Some(preview) = s.preview_port {
                flags |= SERVICE_PREVIEW;
                self.services
                    .insert(&service_key(s, preview), &Service { id, flags }, 0)
                    .map_err(map_err(MAP_SERVICES))?;
            }
            if adopt
                && let Ok(old) = self.shadow(id)
                && old.share_bp != s.shadow.share_bp
            {
                // A share set at runtime (`switcher shadow`) does not outlive a restart: say so.
                tracing::warn!(
                    service = %s.name,
                    "shadow share {} → {} from the config at start (a share set with `switcher shadow` lasts until a restart; set it again, or put it in the config)",
                    crate::protocol::percent(old.share_bp),
                    crate::protocol::percent(s.shadow.share_bp)
                );
            }
            self.set_shadow(id, s.shadow.share_bp, s.shadow.ceiling)?;
            let state = self.state.get(&id, 0).map_err(map_err(MAP_STATE))?;
            installed.push(Installed {
                id,
                active: Colour::from_u32(switcher_common::state_active(state)),
                canary_bp: switcher_common::state_canary_bp(state),
                previous: switcher_common::state_previous(state).map(Colour::from_u32),
            });
        }
        // Keys of services that are gone (or moved to another port) are removed.
        let wanted: std::collections::HashSet<ServiceKey> = services
            .iter()
            .flat_map(|s| std::iter::once(service_key(s, s.port)).chain(s.preview_port.map(|p| service_key(s, p))))
            .collect();
        for key in existing.keys().filter(|k| !wanted.contains(k)) {
            let _ = self.services.remove(key);
            changed.push(*key);
        }
        // The data path forwards a known flow before it looks its service up: the flows of a
        // service that is gone (or changed mode) must go with it.
        if !changed.is_empty() {
            let n = self.purge_flows(&changed);
            if n > 0 {
                tracing::info!(flows = n, "removed the open flows of services that were removed or changed mode");
            }
        }
        let ids: std::collections::HashSet<u32> = placed.iter().copied().collect();
        self.service_ports.retain(|id, _| ids.contains(id));
        self.service_vips.retain(|id, _| ids.contains(id));
        self.service_fronts.retain(|id, _| ids.contains(id));
        let gone: Vec<(u32, Colour)> = self.pools.keys().filter(|(id, _)| !ids.contains(id)).copied().collect();
        for key in gone {
            if let Some((at, len)) = self.pools.remove(&key).and_then(|p| p.live) {
                let _ = self.ring_live.set(colour_slot(key.0, key.1.as_u32()), &RING_NONE, 0);
                self.slab.release(at, len);
            }
        }
        self.write_vips()?;
        self.write_ports()?;
        self.write_reverse()?;
        Ok(installed)
    }

    /// Re-reads an adopted service's pools from the maps, so its backends keep their slots.
    pub(super) fn seed_pools(&mut self, id: u32, s: &ServiceConfig) -> Result<()> {
        if self.pools.contains_key(&(id, Colour::Blue)) {
            return Ok(());
        }
        for colour in Colour::ALL {
            let mut pool = Pool { slots: vec![None; MAX_POOL as usize], ..Pool::default() };
            for i in 0..MAX_POOL {
                let b = self.backends.get(&pool_slot(id, colour.as_u32(), i), 0).map_err(map_err(MAP_BACKENDS))?;
                if !b.is_set() {
                    continue;
                }
                let addr = SocketAddr::new(addr_ip(b.addr, b.family), u16::from_be_bytes(b.port));
                pool.slots[i as usize] = s.pool(colour).iter().find(|c| c.addr == addr).copied();
            }
            while pool.slots.last().is_some_and(Option::is_none) {
                pool.slots.pop();
            }
            self.pools.insert((id, colour), pool);
        }
        Ok(())
    }

    /// Applies a changed service list (reload): the same as an adopting start.
    ///
    /// # Errors
    /// As [`Dataplane::load`]'s map writes.
    pub fn apply(&mut self, services: &[ServiceConfig]) -> Result<Vec<Installed>> {
        self.install_all(services, true)
    }

    /// Sets a colour's pool: new backends get free slots, kept ones keep theirs, the Maglev
    /// table is rebuilt into free elements of `RING` and then made live with one write.
    ///
    /// # Errors
    /// More than `MAX_POOL` backends, a full slab, or a map write failed.
    pub fn set_pool(&mut self, id: u32, colour: Colour, backends: &[BackendConfig]) -> Result<()> {
        // Only weights changed (health checks take a backend out with weight 0): the ports and
        // `REVERSE`, which depend on addresses alone, stay as they are; only the table changes.
        let same_members = self.pools.get(&(id, colour)).is_some_and(|pool| {
            let mut members = pool.slots.iter().flatten().map(|b| b.addr);
            members.clone().count() == backends.len() && members.all(|a| backends.iter().any(|b| b.addr == a))
        });
        if same_members {
            self.stage_pool(id, colour, backends)?;
            return self.publish_table(id, colour);
        }
        // Refused before anything is written: a backend answering for too many VIP:ports.
        fronts_fit(&self.pool_fronts(Some((id, colour, backends))))?;
        self.stage_pool(id, colour, backends)?;
        // Replies of the new backends are recognised (their port bit and `REVERSE` entry)
        // before any flow can reach them.
        self.write_reverse()?;
        self.write_ports()?;
        self.publish_table(id, colour)
    }

    /// Puts a colour's backends in their `BACKENDS` slots (new ones in free slots, kept ones
    /// in theirs) and builds its next table; nothing routes to it before
    /// [`Dataplane::publish_table`].
    pub(super) fn stage_pool(&mut self, id: u32, colour: Colour, backends: &[BackendConfig]) -> Result<()> {
        let mut pool = self.pools.remove(&(id, colour)).unwrap_or_default();
        // Slots up to the highest one in use (thousands of services hold small pools).
        pool.slots.truncate(MAX_POOL as usize);
        // Drop the ones that left; keep the others' slots.
        for slot in &mut pool.slots {
            if slot.is_some_and(|b| !backends.iter().any(|n| n.addr == b.addr)) {
                *slot = None;
            }
        }
        let mut result = Ok(());
        for b in backends {
            let i = match pool.slots.iter().position(|s| s.is_some_and(|k| k.addr == b.addr)) {
                Some(i) => i,
                None => match pool.slots.iter().position(Option::is_none) {
                    Some(i) => i,
                    None if pool.slots.len() < MAX_POOL as usize => {
                        pool.slots.push(None);
                        pool.slots.len() - 1
                    }
                    None => {
                        result = Err(DataplaneError::PoolFull);
                        break;
                    }
                },
            };
            pool.slots[i] = Some(*b);
            if let Err(e) = self.backends.set(pool_slot(id, colour.as_u32(), i as u32), &backend_value(b.addr), 0) {
                result = Err(map_err(MAP_BACKENDS)(e));
                break;
            }
        }
        let members: Vec<maglev::Member> = pool
            .slots
            .iter()
            .zip(0u16..)
            .filter_map(|(s, i)| s.map(|b| maglev::Member { name: b.addr.to_string(), weight: b.weight, index: i }))
            .collect();
        let table = if members.is_empty() {
            Vec::new()
        } else {
            maglev::build(&members, RING_SIZES[ring_class(members.len() as u32) as usize])
        };
        // A reload or a health check that gives the same table writes nothing.
        pool.dirty = pool.dirty || table != pool.table;
        pool.table = table;
        self.pools.insert((id, colour), pool);
        result
    }

    /// Writes a colour's staged table into free elements of `RING`, points `RING_LIVE` at it
    /// (one write: the next packet uses it) and lets the old table's elements rest.
    pub(super) fn publish_table(&mut self, id: u32, colour: Colour) -> Result<()> {
        let Some(pool) = self.pools.get(&(id, colour)) else { return Ok(()) };
        if !pool.dirty {
            return Ok(());
        }
        let len = u32::try_from(pool.table.len().div_ceil(RING_CHUNK as usize)).unwrap_or(u32::MAX);
        let (live, value) = if len == 0 {
            (None, RING_NONE)
        } else {
            let at = self.slab.alloc(len)?;
            let mut written = Ok(());
            for (c, chunk) in (0u32..).zip(pool.table.chunks(RING_CHUNK as usize)) {
                let mut value = RingChunk { slots: [RING_EMPTY; RING_CHUNK as usize] };
                value.slots[..chunk.len()].copy_from_slice(chunk);
                written = self.ring.set(at + c, &value, 0).map_err(map_err(MAP_RING));
                if written.is_err() {
                    break;
                }
            }
            if let Err(e) = written {
                self.slab.release(at, len);
                return Err(e);
            }
            let class = RING_SIZES.iter().position(|&m| m as usize == pool.table.len()).unwrap_or(0);
            (Some((at, len)), switcher_common::ring_live(class as u32, at))
        };
        if let Err(e) = self.ring_live.set(colour_slot(id, colour.as_u32()), &value, 0) {
            if let Some((at, len)) = live {
                self.slab.release(at, len);
            }
            return Err(map_err(MAP_RING_LIVE)(e));
        }
        let old = self.pools.get_mut(&(id, colour)).and_then(|pool| {
            pool.dirty = false;
            std::mem::replace(&mut pool.live, live)
        });
        if let Some((at, len)) = old {
            self.slab.release(at, len);
        }
        Ok(())
    }

    /// Elements of `RING` in use and in all, and the bytes of one.
    #[must_use]
    pub fn ring_usage(&self) -> (u32, u32, u64) {
        (self.slab.used(), self.slab.capacity(), slab::ELEMENT_BYTES)
    }

    /// Brings `PORTS` in line with the services' and backends' ports: bits are set before a
    /// key that needs them is written, and cleared when no service or backend uses the port
    /// (a bit left set only costs a hash lookup that misses).
    pub(super) fn write_ports(&mut self) -> Result<()> {
        let mut want: StdHashMap<u16, u8> = StdHashMap::new();
        for ports in self.service_ports.values() {
            for p in ports {
                *want.entry(*p).or_default() |= PORT_SERVICE;
            }
        }
        for pool in self.pools.values() {
            for b in pool.slots.iter().flatten() {
                *want.entry(b.addr.port()).or_default() |= PORT_BACKEND;
            }
        }
        // Backends that left their pool but still have flows (and `REVERSE` entries) still
        // send replies from their port.
        for key in self.reverse_written.keys() {
            *want.entry(u16::from_be_bytes(key.port)).or_default() |= PORT_BACKEND;
        }
        let stale: Vec<u16> = self.ports_written.keys().filter(|p| !want.contains_key(p)).copied().collect();
        for (port, bits) in want.iter().map(|(p, b)| (*p, *b)).chain(stale.into_iter().map(|p| (p, 0))) {
            if self.ports_written.get(&port).copied().unwrap_or(0) != bits {
                self.ports.set(u32::from(port), &bits, 0).map_err(map_err(MAP_PORTS))?;
            }
            if bits == 0 {
                self.ports_written.remove(&port);
            } else {
                self.ports_written.insert(port, bits);
            }
        }
        Ok(())
    }

    /// Brings `VIPS` in line with the services' VIPs: new slots are set first, slots no VIP
    /// uses any more are cleared after (a slot left set only costs a hash lookup that misses).
    pub(super) fn write_vips(&mut self) -> Result<()> {
        let want: std::collections::HashSet<u32> = self.service_vips.values().copied().collect();
        for slot in want.iter().filter(|s| !self.vips_written.contains(s)) {
            self.vips.set(*slot, &1, 0).map_err(map_err(MAP_VIPS))?;
        }
        for slot in self.vips_written.iter().filter(|s| !want.contains(s)) {
            self.vips.set(*slot, &0, 0).map_err(map_err(MAP_VIPS))?;
        }
        self.vips_written = want;
        Ok(())
    }

    /// Brings `REVERSE` in line with the NAT services' pools: every backend lists the (VIP,
    /// port) pairs it serves, its service's own port first. Entries are added or changed before
    /// the tables that send flows to them flip; a backend that left its pool keeps its entry
    /// (its open flows still need their replies) until a count of the flows begun after the change finds no flow
    /// of it; pairs no service serves any more are dropped at once.
    pub(super) fn write_reverse(&mut self) -> Result<()> {
        let mut fronts_of = self.pool_fronts(None);
        fronts_fit(&fronts_of)?;
        // Pairs still served by some NAT service, with their protocol.
        let served: std::collections::HashSet<([u8; 16], [u8; 2], u8)> = self
            .service_fronts
            .values()
            .flat_map(|(fronts, proto)| fronts.iter().map(move |f| (f.vip, f.port, *proto)))
            .collect();
        for (key, old) in &self.reverse_written {
            let list = fronts_of.entry(*key).or_default();
            for f in old.to.iter().take(old.count as usize) {
                if served.contains(&(f.vip, f.port, key.proto)) && !list.contains(f) && list.len() < REVERSE_WAYS {
                    list.push(*f);
                }
            }
        }
        let want: StdHashMap<BackendKey, Reverse> = fronts_of
            .into_iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(key, list)| {
                let mut r = Reverse { count: list.len() as u32, ..Reverse::default() };
                r.to[..list.len()].copy_from_slice(&list);
                (key, r)
            })
            .collect();
        for (key, r) in &want {
            if self.reverse_written.get(key) != Some(r) {
                self.reverse.insert(key, r, 0).map_err(map_err(MAP_REVERSE))?;
            }
        }
        for key in self.reverse_written.keys().filter(|k| !want.contains_key(k)) {
            let _ = self.reverse.remove(key);
        }
        self.reverse_written = want;
        self.reverse_changed = std::time::Instant::now();
        Ok(())
    }

    /// The (VIP, port) pairs each backend of the NAT services' pools answers for, its own
    /// service's port first; `next`, a colour's pool about to be written, counts as in place.
    pub(super) fn pool_fronts(
        &self,
        next: Option<(u32, Colour, &[BackendConfig])>,
    ) -> StdHashMap<BackendKey, Vec<VipPort>> {
        let replaced = next.map(|(id, colour, _)| (id, colour));
        let pooled = self
            .pools
            .iter()
            .filter(|(key, _)| Some(**key) != replaced)
            .flat_map(|(&(id, _), pool)| pool.slots.iter().flatten().map(move |b| (id, b.addr)));
        let upcoming = next.into_iter().flat_map(|(id, _, backends)| backends.iter().map(move |b| (id, b.addr)));
        self.fronts_of(pooled.chain(upcoming))
    }

    /// The (VIP, port) pairs each backend of `members` (service id, backend) answers for.
    pub(super) fn fronts_of(
        &self,
        members: impl Iterator<Item = (u32, SocketAddr)>,
    ) -> StdHashMap<BackendKey, Vec<VipPort>> {
        let mut fronts_of: StdHashMap<BackendKey, Vec<VipPort>> = StdHashMap::new();
        for (id, addr) in members {
            let Some((fronts, proto)) = self.service_fronts.get(&id) else { continue };
            let list = fronts_of.entry(backend_key(addr, *proto)).or_default();
            for f in fronts {
                if !list.contains(f) {
                    list.push(*f);
                }
            }
        }
        fronts_of
    }

    /// Drops the `REVERSE` entries of backends that are in no pool and that no flow uses
    /// (`in_use`: the backends of the flows a pass found). None can gain a flow again: only
    /// pools hand backends out.
    pub(super) fn gc_reverse(&mut self, in_use: &std::collections::HashSet<BackendKey>) {
        let pooled = self.pool_fronts(None);
        let gone: Vec<BackendKey> =
            self.reverse_written.keys().filter(|k| !pooled.contains_key(k) && !in_use.contains(k)).copied().collect();
        if gone.is_empty() {
            return;
        }
        for key in gone {
            if self.reverse.remove(&key).is_ok() {
                self.reverse_written.remove(&key);
            }
        }
        if let Err(e) = self.write_ports() {
            tracing::warn!("clear the ports of backends no flow uses any more: {e}");
        }
    }
}

/// Elements of `RING` for `services`: room for their tables and to grow
/// ([`slab::capacity_for`]).
#[must_use]
pub fn ring_elements(services: &[ServiceConfig]) -> u32 {
    let need: u64 =
        services.iter().flat_map(|s| Colour::ALL.map(|c| u64::from(slab::table_elements(s.pool(c).len())))).sum();
    slab::capacity_for(need)
}

/// Refuses a backend that would answer for more (VIP, port) pairs than `REVERSE` holds.
pub(super) fn fronts_fit(fronts_of: &StdHashMap<BackendKey, Vec<VipPort>>) -> Result<()> {
    match fronts_of.iter().find(|(_, l)| l.len() > REVERSE_WAYS) {
        Some((key, list)) => {
            let backend = SocketAddr::new(addr_ip(key.addr, key.family), u16::from_be_bytes(key.port));
            Err(DataplaneError::TooManyFronts { backend: backend.to_string(), count: list.len() })
        }
        None => Ok(()),
    }
}
