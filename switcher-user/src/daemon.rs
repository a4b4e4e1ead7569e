//! The agent: owns the data plane and serves the control socket until SIGTERM or SIGINT.
//!
//! Requests are handled one at a time under a lock ([`Switchboard`]), so concurrent cut-overs
//! are serialised and the last accepted one wins. Map writes are single syscalls of a few
//! microseconds, done inline.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use switcher_common::{BP_ALL, MAX_POOL, user::Colour};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    config::{BackendConfig, Config, DrainAction, ServiceConfig},
    control::{self, BackendStatus, Canary, ColourStatus, Drain, Request, Response, ServiceStatus},
    dataplane::{Counters, Dataplane, DataplaneError, FlowCounts},
};

/// What the switchboard needs of the data plane; a fake implements it in unit tests.
pub trait Maps {
    /// Writes a service's switch state (one map write).
    ///
    /// # Errors
    /// The map write failed.
    fn set_state(&mut self, id: u32, active: Colour, canary_bp: u32) -> Result<(), DataplaneError>;
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
    /// Tracked flows per (service, colour); with `gc`, expired ones are forgotten.
    ///
    /// # Errors
    /// The map read failed.
    fn scan_flows(&mut self, gc: bool) -> Result<HashMap<(u32, Colour), FlowCounts>, DataplaneError>;
    /// Moves or resets the open flows of a draining colour; returns how many.
    ///
    /// # Errors
    /// The map read failed.
    fn end_drain(
        &mut self,
        s: &ServiceConfig,
        id: u32,
        from: Colour,
        action: DrainAction,
    ) -> Result<u64, DataplaneError>;
}

impl Maps for Dataplane {
    fn set_state(&mut self, id: u32, active: Colour, canary_bp: u32) -> Result<(), DataplaneError> {
        Dataplane::set_state(self, id, active, canary_bp)
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
    fn scan_flows(&mut self, gc: bool) -> Result<HashMap<(u32, Colour), FlowCounts>, DataplaneError> {
        Dataplane::scan_flows(self, gc)
    }
    fn end_drain(
        &mut self,
        s: &ServiceConfig,
        id: u32,
        from: Colour,
        action: DrainAction,
    ) -> Result<u64, DataplaneError> {
        Dataplane::end_drain(self, s, id, from, action)
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
}

/// The services' switch state, in front of the maps.
pub struct Switchboard<M> {
    maps: M,
    services: Vec<ServiceState>,
}

/// A colour named in a request.
fn colour(c: &str) -> Result<Colour, String> {
    c.parse::<Colour>().map_err(|e| format!("{c:?}: {e}"))
}

/// `12.5%` for 1250 basis points.
#[must_use]
pub fn percent(bp: u32) -> String {
    let s = format!("{}.{:02}", bp / 100, bp % 100);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

impl<M: Maps> Switchboard<M> {
    /// `services[i]` has data-path id `i`, as [`Dataplane::open`] installed them.
    pub fn new(maps: M, services: &[ServiceConfig]) -> Self {
        let services = services
            .iter()
            .zip(0u32..)
            .map(|(s, id)| ServiceState {
                id,
                config: s.clone(),
                active: s.active,
                canary_bp: 0,
                previous: None,
                switches: 0,
                switched_at: None,
                drain: None,
            })
            .collect();
        Switchboard { maps, services }
    }

    /// Answers one request.
    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status { service } => self.status(service.as_deref()),
            Request::Cutover { service, colour, drain_timeout_secs } => {
                self.cutover(&service, colour.as_deref(), drain_timeout_secs.map(Duration::from_secs))
            }
            Request::Rollback { service } => self.rollback(&service),
            Request::Weight { service, colour, basis_points } => self.weight(&service, &colour, basis_points),
            Request::BackendAdd { service, colour, address, weight } => {
                self.backend(&service, &colour, &address, Some(weight.unwrap_or(1)))
            }
            Request::BackendRemove { service, colour, address } => self.backend(&service, &colour, &address, None),
        };
        result.unwrap_or_else(Response::error)
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

    fn cutover(
        &mut self,
        name: &str,
        target: Option<&str>,
        drain_timeout: Option<Duration>,
    ) -> Result<Response, String> {
        let i = self.find(name)?;
        let target = match target {
            None => self.services[i].active.other(),
            Some(c) => colour(c)?,
        };
        self.switch(i, target, 0, drain_timeout, "cut over")
    }

    fn rollback(&mut self, name: &str) -> Result<Response, String> {
        let i = self.find(name)?;
        let s = &self.services[i];
        let Some(previous) = s.previous else {
            return Err(format!(
                "nothing to roll back: {name} has been {} since the daemon started; use `switcher cutover {name} COLOUR` to switch",
                s.active
            ));
        };
        self.switch(i, previous, 0, None, "rolled back")
    }

    fn weight(&mut self, name: &str, c: &str, bp: u32) -> Result<Response, String> {
        let i = self.find(name)?;
        let c = colour(c)?;
        if bp > BP_ALL {
            return Err(format!("{} is more than 100%", percent(bp)));
        }
        let s = &self.services[i];
        // The share of the colour that is not active is the canary.
        let (active, canary) = if c == s.active { (s.active, BP_ALL - bp) } else { (s.active, bp) };
        if canary == BP_ALL {
            // All new flows to the other colour: that is a cut-over.
            return self.switch(i, active.other(), 0, None, "cut over");
        }
        if canary > 0 && !s.config.serves(active.other()) {
            return Err(format!("{name} has no {} backend to send a canary share to", active.other()));
        }
        self.maps.set_state(s.id, active, canary).map_err(|e| format!("{name}: map write failed: {}", chain(&e)))?;
        self.services[i].canary_bp = canary;
        let msg = format!(
            "{name}: new flows {} {}, {} {}",
            active,
            percent(BP_ALL - canary),
            active.other(),
            percent(canary)
        );
        tracing::info!(service = %name, %active, canary_bp = canary, "weight changed");
        Ok(Response {
            ok: true,
            message: Some(msg),
            services: vec![self.service_status(i, None)?],
            ..Response::default()
        })
    }

    fn switch(
        &mut self,
        i: usize,
        target: Colour,
        canary: u32,
        drain_timeout: Option<Duration>,
        verb: &str,
    ) -> Result<Response, String> {
        let s = &self.services[i];
        let name = s.config.name.clone();
        if s.active == target && s.canary_bp == canary {
            return Ok(Response {
                ok: true,
                message: Some(format!("{name}: already on {target}, nothing changed")),
                services: vec![self.service_status(i, None)?],
                ..Response::default()
            });
        }
        if !s.config.serves(target) {
            return Err(format!(
                "{name} has no {target} backend configured; add `{target} = \"ADDRESS:PORT\"` to its [[service]] in the config, or `switcher backend add {name} {target} ADDRESS:PORT`"
            ));
        }
        let from = s.active;
        // The old colour's open flows, before the switch, to report drain progress against.
        let initial = if from == target {
            0
        } else {
            self.maps.scan_flows(false).ok().and_then(|c| c.get(&(s.id, from)).map(|c| c.live)).unwrap_or(0)
        };
        let started = Instant::now();
        self.maps
            .set_state(s.id, target, canary)
            .map_err(|e| format!("{name}: map write failed, still on {from}: {}", chain(&e)))?;
        let took = started.elapsed();
        let timeout = drain_timeout.or(s.config.drain_timeout);
        let s = &mut self.services[i];
        if from != target {
            s.previous = Some(from);
            s.switches += 1;
            s.switched_at = Some(Instant::now());
            s.drain = Some(DrainState { from, started: Instant::now(), timeout, initial });
        }
        s.active = target;
        s.canary_bp = canary;
        let backends: Vec<String> = s.config.pool(target).iter().map(|b| b.addr.to_string()).collect();
        tracing::info!(service = %name, %from, to = %target, took_us = took.as_micros(), draining = initial, "{verb}");
        let drain = if initial > 0 {
            match timeout {
                Some(t) => format!("; {initial} open flows on {from} drain (timeout {}s)", t.as_secs()),
                None => format!("; {initial} open flows on {from} drain"),
            }
        } else {
            String::new()
        };
        Ok(Response {
            ok: true,
            message: Some(format!(
                "{name}: {verb} {from} → {target} ({}) in {} µs{drain}",
                backends.join(", "),
                took.as_micros()
            )),
            services: vec![self.service_status(i, None)?],
            ..Response::default()
        })
    }

    fn backend(&mut self, name: &str, c: &str, address: &str, weight: Option<u32>) -> Result<Response, String> {
        let i = self.find(name)?;
        let c = colour(c)?;
        let addr: SocketAddr =
            address.parse().map_err(|_| format!("{address:?} is not ADDRESS:PORT (IPv6 as [2001:db8::1]:80)"))?;
        let s = &self.services[i];
        let mut pool = s.config.pool(c).to_vec();
        let msg = match weight {
            Some(w) => {
                s.config.check_backend(addr)?;
                if w > 1000 {
                    return Err(format!("weight {w} is above 1000"));
                }
                match pool.iter_mut().find(|b| b.addr == addr) {
                    Some(b) => b.weight = w,
                    None => pool.push(BackendConfig { addr, weight: w }),
                }
                if pool.len() > MAX_POOL as usize {
                    return Err(format!("{name} {c} already has {MAX_POOL} backends"));
                }
                format!("{name} {c}: {addr} in the pool with weight {w} ({} backends)", pool.len())
            }
            None => {
                let before = pool.len();
                pool.retain(|b| b.addr != addr);
                if pool.len() == before {
                    return Err(format!("{addr} is not a {c} backend of {name}"));
                }
                let live = c == s.active || (s.canary_bp > 0 && c == s.active.other());
                if live && !pool.iter().any(|b| b.weight > 0) {
                    return Err(format!(
                        "{addr} is the last {c} backend of {name}, which takes traffic; cut over first"
                    ));
                }
                format!("{name} {c}: {addr} removed ({} backends); its open flows stay until they end", pool.len())
            }
        };
        self.maps.set_pool(s.id, c, &pool).map_err(|e| format!("{name}: {}", chain(&e)))?;
        *self.services[i].config.pool_mut(c) = pool;
        tracing::info!(service = %name, colour = %c, %addr, ?weight, "pool changed");
        Ok(Response {
            ok: true,
            message: Some(msg),
            services: vec![self.service_status(i, None)?],
            ..Response::default()
        })
    }

    /// The services as configured now (pools may have changed at runtime).
    pub fn services(&self) -> Vec<ServiceConfig> {
        self.services.iter().map(|s| s.config.clone()).collect()
    }

    /// Periodic work: forget expired flows, and finish drains that are empty or timed out.
    pub fn tick(&mut self) {
        let counts = match self.maps.scan_flows(true) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("scan flows: {}", chain(&e));
                return;
            }
        };
        for i in 0..self.services.len() {
            let s = &self.services[i];
            let Some(drain) = s.drain.clone() else { continue };
            let live = counts.get(&(s.id, drain.from)).map_or(0, |c| c.live);
            let name = s.config.name.clone();
            if live == 0 {
                tracing::info!(service = %name, colour = %drain.from, secs = drain.started.elapsed().as_secs(), "drain complete");
                self.services[i].drain = None;
            } else if drain.timeout.is_some_and(|t| drain.started.elapsed() >= t) {
                let action = s.config.on_drain_timeout;
                let config = s.config.clone();
                match self.maps.end_drain(&config, s.id, drain.from, action) {
                    Ok(n) => {
                        tracing::warn!(service = %name, colour = %drain.from, flows = n, ?action, "drain timed out")
                    }
                    Err(e) => tracing::warn!(service = %name, "end drain: {}", chain(&e)),
                }
                self.services[i].drain = None;
            }
        }
    }

    fn status(&mut self, name: Option<&str>) -> Result<Response, String> {
        let counts = self.maps.scan_flows(false).map_err(|e| chain(&e))?;
        let services = match name {
            Some(name) => vec![self.service_status(self.find(name)?, Some(&counts))?],
            None => {
                (0..self.services.len()).map(|i| self.service_status(i, Some(&counts))).collect::<Result<_, _>>()?
            }
        };
        let reasons = self.maps.reasons().map_err(|e| chain(&e))?.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        Ok(Response { ok: true, services, reasons, ..Response::default() })
    }

    fn service_status(
        &self,
        i: usize,
        counts: Option<&HashMap<(u32, Colour), FlowCounts>>,
    ) -> Result<ServiceStatus, String> {
        let s = &self.services[i];
        let flows = |c: Colour| counts.and_then(|m| m.get(&(s.id, c)).copied()).unwrap_or_default();
        let colours = Colour::ALL
            .iter()
            .map(|&c| {
                Ok(ColourStatus {
                    colour: c.to_string(),
                    backends: s
                        .config
                        .pool(c)
                        .iter()
                        .map(|b| BackendStatus { address: b.addr.to_string(), weight: b.weight })
                        .collect(),
                    live_flows: flows(c).live,
                    closing_flows: flows(c).closing,
                    counters: self.maps.counters(s.id, c).map_err(|e| chain(&e))?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ServiceStatus {
            name: s.config.name.clone(),
            vip: s.config.vip.to_string(),
            port: s.config.port,
            preview_port: s.config.preview_port,
            protocol: s.config.protocol.as_str().to_owned(),
            mode: s.config.mode.as_str().to_owned(),
            active: s.active.to_string(),
            canary: (s.canary_bp > 0)
                .then(|| Canary { colour: s.active.other().to_string(), basis_points: s.canary_bp }),
            previous: s.previous.map(|c| c.to_string()),
            switches: s.switches,
            since_switch_secs: s.switched_at.map(|t| t.elapsed().as_secs()),
            drain: s.drain.as_ref().map(|d| Drain {
                colour: d.from.to_string(),
                live_flows: flows(d.from).live,
                // Flows that were mid-handshake at the switch may join the count afterwards.
                initial_flows: d.initial.max(flows(d.from).live),
                elapsed_secs: d.started.elapsed().as_secs(),
                timeout_secs: d.timeout.map(|t| t.as_secs()),
                on_timeout: match s.config.on_drain_timeout {
                    DrainAction::Move => "move".into(),
                    DrainAction::Reset => "reset".into(),
                },
            }),
            colours,
        })
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Binds the control socket: creates its directory, refuses if another daemon answers on it,
/// replaces a stale file, and makes it 0660.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another switcher daemon is already listening on {}; stop it first", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(listener)
}

/// Removes the socket file when the daemon stops, however it stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the agent until `shutdown` resolves: loads and attaches the program, fills the maps,
/// serves the control socket. On return the program is detached and the socket removed.
///
/// # Errors
/// Start-up failures (attach, maps, socket), with what was being done.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    ensure_forwarding("/proc/sys/net/ipv4/ip_forward", "IPv4");
    if config.services.iter().any(|s| s.vip.is_ipv6()) {
        ensure_forwarding("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6");
    }
    let dataplane = Dataplane::load(&config).context("start the data plane")?;
    for s in &config.services {
        tracing::info!(service = %s.name, vip = %s.vip, port = s.port, protocol = s.protocol.as_str(), active = %s.active, "serving");
    }
    let listener = bind(&config.socket)?;
    let _socket = SocketFile(config.socket.clone());
    let board = Arc::new(Mutex::new(Switchboard::new(dataplane, &config.services)));
    tracing::info!(socket = %config.socket.display(), services = config.services.len(), "switcher daemon ready");
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {
                if let Ok(mut b) = board.lock() {
                    b.tick();
                    if ticks.is_multiple_of(5) {
                        keep_dsr_neighbours(&b.services());
                    }
                }
                ticks += 1;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let board = Arc::clone(&board);
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, &board).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept on control socket: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::info!("shutting down: detaching the XDP program");
    Ok(())
}

/// Answers one connection: one request line, one answer line.
async fn serve(stream: UnixStream, board: &Mutex<Switchboard<Dataplane>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(control::MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::time::timeout(control::TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => Response::error("timed out waiting for a request"),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() > control::MAX_REQUEST => {
            Response::error(format!("request larger than {} bytes", control::MAX_REQUEST))
        }
        Ok(Ok(_)) => match control::parse_request(line.trim_ascii()) {
            Ok(req) => board.lock().map_or_else(
                |_| Response::error("daemon state is poisoned; restart the daemon"),
                |mut b| b.handle(req),
            ),
            Err(msg) => Response::error(msg),
        },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    tokio::time::timeout(control::TIMEOUT, write.write_all(&out)).await??;
    Ok(())
}

/// The data path forwards between interfaces, so the node must route: turn forwarding on in
/// this network namespace if it is off, and say so.
fn ensure_forwarding(knob: &str, family: &str) {
    match std::fs::read_to_string(knob) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(knob, "1") {
            Ok(()) => {
                tracing::info!("enabled {family} forwarding ({knob} = 1): the load balancer routes to its backends")
            }
            Err(e) => tracing::warn!(
                "{family} forwarding is off and {knob} cannot be written ({e}); service traffic will not be forwarded"
            ),
        },
        Err(e) => tracing::warn!("cannot read {knob}: {e}"),
    }
}

/// DSR frames go straight to a backend's MAC, which the FIB only knows while the neighbour
/// entry is valid. A datagram to the discard port (9) of each DSR backend every few seconds
/// makes the kernel resolve and refresh those entries.
fn keep_dsr_neighbours(services: &[ServiceConfig]) {
    for s in services.iter().filter(|s| s.mode == crate::config::Mode::Dsr) {
        for b in s.blue.iter().chain(&s.green) {
            let any: SocketAddr = if b.addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            if let Ok(sock) = std::net::UdpSocket::bind(any) {
                let _ = sock.send_to(&[], SocketAddr::new(b.addr.ip(), 9));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::config::{Mode, Protocol};

    #[derive(Default)]
    struct FakeMaps {
        state: HashMap<u32, (Colour, u32)>,
        pools: HashMap<(u32, Colour), Vec<BackendConfig>>,
        flows: HashMap<(u32, Colour), FlowCounts>,
        ended: Vec<(u32, Colour, DrainAction)>,
        writes: usize,
    }

    impl Maps for FakeMaps {
        fn set_state(&mut self, id: u32, active: Colour, canary_bp: u32) -> Result<(), DataplaneError> {
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
        fn scan_flows(&mut self, _: bool) -> Result<HashMap<(u32, Colour), FlowCounts>, DataplaneError> {
            Ok(self.flows.clone())
        }
        fn end_drain(
            &mut self,
            _: &ServiceConfig,
            id: u32,
            from: Colour,
            a: DrainAction,
        ) -> Result<u64, DataplaneError> {
            self.ended.push((id, from, a));
            Ok(1)
        }
    }

    fn backend(a: &str) -> BackendConfig {
        BackendConfig { addr: a.parse().expect("addr"), weight: 1 }
    }

    fn board() -> Switchboard<FakeMaps> {
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
        };
        let solo = ServiceConfig { name: "solo".into(), port: 81, green: vec![], ..web.clone() };
        Switchboard::new(FakeMaps::default(), &[web, solo])
    }

    fn cutover(b: &mut Switchboard<FakeMaps>, s: &str, c: Option<&str>) -> Response {
        b.handle(Request::Cutover { service: s.into(), colour: c.map(Into::into), drain_timeout_secs: None })
    }

    #[test]
    fn cutover_defaults_to_the_idle_colour_and_writes_the_map_once() {
        let mut b = board();
        let r = cutover(&mut b, "web", None);
        assert!(r.ok, "{r:?}");
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Green, 0)));
        assert_eq!(b.maps.writes, 1);
        assert_eq!(r.services[0].active, "green");
        assert_eq!(r.services[0].previous.as_deref(), Some("blue"));
        assert!(r.message.as_deref().is_some_and(|m| m.contains("blue → green")), "{r:?}");
    }

    #[test]
    fn rollback_returns_to_the_previous_colour() {
        let mut b = board();
        let r = b.handle(Request::Rollback { service: "web".into() });
        assert!(!r.ok);
        assert!(r.error.as_deref().is_some_and(|e| e.contains("nothing to roll back")), "{r:?}");
        assert!(cutover(&mut b, "web", Some("green")).ok);
        let r = b.handle(Request::Rollback { service: "web".into() });
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
        let r = cutover(&mut b, "web", Some("red"));
        assert!(r.error.as_deref().is_some_and(|e| e.contains("unknown colour")), "{r:?}");
        let r = cutover(&mut b, "solo", None);
        assert!(r.error.as_deref().is_some_and(|e| e.contains("no green backend configured")), "{r:?}");
        let r = b.handle(Request::Weight { service: "solo".into(), colour: "green".into(), basis_points: 100 });
        assert!(r.error.as_deref().is_some_and(|e| e.contains("no green backend")), "{r:?}");
        assert_eq!(b.maps.writes, 0, "a refused request writes nothing");
    }

    #[test]
    fn weights_set_a_canary_and_100_percent_is_a_cutover() {
        let mut b = board();
        let w = |b: &mut Switchboard<FakeMaps>, c: &str, bp| {
            b.handle(Request::Weight { service: "web".into(), colour: c.into(), basis_points: bp })
        };
        let r = w(&mut b, "green", 500);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.message.as_deref(), Some("web: new flows blue 95%, green 5%"));
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 500)));
        assert_eq!(r.services[0].canary, Some(Canary { colour: "green".into(), basis_points: 500 }));
        assert!(w(&mut b, "blue", 9_999).ok);
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 1)));
        assert!(w(&mut b, "green", 0).ok);
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
        let r = w(&mut b, "green", 10_000);
        assert_eq!(r.services[0].active, "green", "{r:?}");
        assert_eq!(b.maps.state.get(&0), Some(&(Colour::Green, 0)));
        assert!(!w(&mut b, "green", 10_001).ok);
        assert_eq!(percent(1), "0.01%");
        assert_eq!(percent(1250), "12.5%");
        assert_eq!(percent(10_000), "100%");
    }

    #[test]
    fn drains_complete_when_empty_and_end_at_the_timeout() {
        let mut b = board();
        b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 3, closing: 0 });
        let r = b.handle(Request::Cutover { service: "web".into(), colour: None, drain_timeout_secs: Some(0) });
        assert!(r.message.as_deref().is_some_and(|m| m.contains("3 open flows on blue drain (timeout 0s)")), "{r:?}");
        let st = b.status(Some("web")).expect("status");
        let drain = st.services[0].drain.clone().expect("draining");
        assert_eq!((drain.colour.as_str(), drain.live_flows, drain.initial_flows), ("blue", 3, 3));
        b.tick();
        assert_eq!(b.maps.ended, [(0, Colour::Blue, DrainAction::Move)], "timeout 0: ended at the first tick");
        assert!(b.status(Some("web")).expect("status").services[0].drain.is_none());

        // Without a timeout the drain waits for the flows to end.
        b.maps.flows.insert((0, Colour::Green), FlowCounts { live: 2, closing: 0 });
        assert!(cutover(&mut b, "web", Some("blue")).ok);
        b.tick();
        assert!(b.services[0].drain.is_some());
        b.maps.flows.insert((0, Colour::Green), FlowCounts { live: 0, closing: 2 });
        b.tick();
        assert!(b.services[0].drain.is_none(), "closing flows do not hold a drain");
        assert_eq!(b.maps.ended.len(), 1);
    }

    #[test]
    fn pools_change_at_runtime() {
        let mut b = board();
        let add = |b: &mut Switchboard<FakeMaps>, a: &str, w| {
            b.handle(Request::BackendAdd { service: "web".into(), colour: "blue".into(), address: a.into(), weight: w })
        };
        assert!(add(&mut b, "198.51.100.3:8080", Some(2)).ok);
        assert_eq!(b.maps.pools[&(0, Colour::Blue)].len(), 2);
        assert!(add(&mut b, "198.51.100.3:8080", Some(5)).ok, "re-adding changes the weight");
        assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 5);
        assert!(add(&mut b, "[2001:db8::1]:80", None).error.is_some_and(|e| e.contains("address family")));
        assert!(add(&mut b, "nonsense", None).error.is_some_and(|e| e.contains("is not ADDRESS:PORT")));
        let rm = |b: &mut Switchboard<FakeMaps>, a: &str| {
            b.handle(Request::BackendRemove { service: "web".into(), colour: "blue".into(), address: a.into() })
        };
        assert!(rm(&mut b, "198.51.100.2:8080").ok);
        let r = rm(&mut b, "198.51.100.3:8080");
        assert!(r.error.as_deref().is_some_and(|e| e.contains("last blue backend")), "{r:?}");
        assert!(rm(&mut b, "198.51.100.9:8080").error.is_some_and(|e| e.contains("is not a blue backend")));
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
