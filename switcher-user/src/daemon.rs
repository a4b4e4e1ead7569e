//! The agent: owns the data plane and serves the control socket until SIGTERM or SIGINT.
//!
//! Requests are handled one at a time under a lock ([`Switchboard`]), so concurrent cut-overs
//! are serialised and the last accepted one wins. Map writes are single syscalls of a few
//! microseconds, done inline.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use switcher_common::user::Colour;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    config::{Config, ServiceConfig},
    control::{self, ColourStatus, Request, Response, ServiceStatus},
    dataplane::{Counters, Dataplane, DataplaneError},
};

/// What the switchboard needs of the data plane; a fake implements it in unit tests.
pub trait Maps {
    /// Writes a service's active colour.
    ///
    /// # Errors
    /// The map write failed.
    fn set_active(&mut self, id: u32, colour: Colour) -> Result<(), DataplaneError>;
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
}

impl Maps for Dataplane {
    fn set_active(&mut self, id: u32, colour: Colour) -> Result<(), DataplaneError> {
        Dataplane::set_active(self, id, colour)
    }
    fn counters(&self, id: u32, colour: Colour) -> Result<Counters, DataplaneError> {
        Dataplane::counters(self, id, colour)
    }
    fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        Dataplane::reasons(self)
    }
}

struct ServiceState {
    id: u32,
    config: ServiceConfig,
    active: Colour,
    previous: Option<Colour>,
    switches: u64,
    switched_at: Option<Instant>,
}

/// The services' switch state, in front of the maps.
pub struct Switchboard<M> {
    maps: M,
    services: Vec<ServiceState>,
}

impl<M: Maps> Switchboard<M> {
    /// `services[i]` has data-path id `i`, as [`Dataplane::load`] installed them.
    pub fn new(maps: M, services: &[ServiceConfig]) -> Self {
        let services = services
            .iter()
            .zip(0u32..)
            .map(|(s, id)| ServiceState {
                id,
                config: s.clone(),
                active: s.active,
                previous: None,
                switches: 0,
                switched_at: None,
            })
            .collect();
        Switchboard { maps, services }
    }

    /// Answers one request.
    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status { service } => self.status(service.as_deref()),
            Request::Cutover { service, colour } => self.cutover(&service, colour.as_deref()),
            Request::Rollback { service } => self.rollback(&service),
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

    fn cutover(&mut self, name: &str, colour: Option<&str>) -> Result<Response, String> {
        let i = self.find(name)?;
        let target = match colour {
            None => self.services[i].active.other(),
            Some(c) => c.parse::<Colour>().map_err(|e| format!("{c:?}: {e}"))?,
        };
        self.switch(i, target, "cut over")
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
        self.switch(i, previous, "rolled back")
    }

    fn switch(&mut self, i: usize, target: Colour, verb: &str) -> Result<Response, String> {
        let s = &self.services[i];
        let name = s.config.name.clone();
        if s.active == target {
            return Ok(Response {
                ok: true,
                message: Some(format!("{name}: already on {target}, nothing changed")),
                services: vec![self.service_status(i)?],
                ..Response::default()
            });
        }
        let Some(backend) = s.config.backend(target) else {
            return Err(format!(
                "{name} has no {target} backend configured; add `{target} = \"ADDRESS:PORT\"` to its [[service]] in the config"
            ));
        };
        let from = s.active;
        let started = Instant::now();
        self.maps
            .set_active(s.id, target)
            .map_err(|e| format!("{name}: map write failed, still on {from}: {}", chain(&e)))?;
        let took = started.elapsed();
        let s = &mut self.services[i];
        s.previous = Some(from);
        s.active = target;
        s.switches += 1;
        s.switched_at = Some(Instant::now());
        tracing::info!(service = %name, %from, to = %target, %backend, took_us = took.as_micros(), "{verb}");
        Ok(Response {
            ok: true,
            message: Some(format!("{name}: {verb} {from} → {target} ({backend}) in {} µs", took.as_micros())),
            services: vec![self.service_status(i)?],
            ..Response::default()
        })
    }

    fn status(&self, name: Option<&str>) -> Result<Response, String> {
        let services = match name {
            Some(name) => vec![self.service_status(self.find(name)?)?],
            None => (0..self.services.len()).map(|i| self.service_status(i)).collect::<Result<_, _>>()?,
        };
        let reasons = self.maps.reasons().map_err(|e| chain(&e))?.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        Ok(Response { ok: true, services, reasons, ..Response::default() })
    }

    fn service_status(&self, i: usize) -> Result<ServiceStatus, String> {
        let s = &self.services[i];
        let colours = Colour::ALL
            .iter()
            .map(|&c| {
                Ok(ColourStatus {
                    colour: c.to_string(),
                    backend: s.config.backend(c).map(|b| b.to_string()),
                    counters: self.maps.counters(s.id, c).map_err(|e| chain(&e))?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ServiceStatus {
            name: s.config.name.clone(),
            vip: s.config.vip.to_string(),
            port: s.config.port,
            protocol: s.config.protocol.as_str().to_owned(),
            active: s.active.to_string(),
            previous: s.previous.map(|c| c.to_string()),
            switches: s.switches,
            since_switch_secs: s.switched_at.map(|t| t.elapsed().as_secs()),
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
    ensure_forwarding();
    let dataplane = Dataplane::load(&config).context("start the data plane")?;
    for s in &config.services {
        tracing::info!(service = %s.name, vip = %s.vip, port = s.port, protocol = s.protocol.as_str(), active = %s.active, "serving");
    }
    let listener = bind(&config.socket)?;
    let _socket = SocketFile(config.socket.clone());
    let board = Arc::new(Mutex::new(Switchboard::new(dataplane, &config.services)));
    tracing::info!(socket = %config.socket.display(), services = config.services.len(), "switcher daemon ready");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
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

/// The data path forwards between interfaces, so the node must route: turn IPv4 forwarding on
/// in this network namespace if it is off, and say so.
fn ensure_forwarding() {
    const KNOB: &str = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(KNOB) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(KNOB, "1") {
            Ok(()) => tracing::info!("enabled IPv4 forwarding ({KNOB} = 1): the load balancer routes to its backends"),
            Err(e) => tracing::warn!(
                "IPv4 forwarding is off and {KNOB} cannot be written ({e}); service traffic will not be forwarded"
            ),
        },
        Err(e) => tracing::warn!("cannot read {KNOB}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::Protocol;

    #[derive(Default)]
    struct FakeMaps {
        active: std::collections::HashMap<u32, Colour>,
        writes: usize,
    }

    impl Maps for FakeMaps {
        fn set_active(&mut self, id: u32, colour: Colour) -> Result<(), DataplaneError> {
            self.active.insert(id, colour);
            self.writes += 1;
            Ok(())
        }
        fn counters(&self, _: u32, _: Colour) -> Result<Counters, DataplaneError> {
            Ok(Counters::default())
        }
        fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
            Ok(vec![("no_match", 3)])
        }
    }

    fn board() -> Switchboard<FakeMaps> {
        let web = ServiceConfig {
            name: "web".into(),
            vip: Ipv4Addr::new(203, 0, 113, 10),
            port: 80,
            protocol: Protocol::Tcp,
            active: Colour::Blue,
            blue: Some("198.51.100.2:8080".parse().expect("addr")),
            green: Some("198.51.100.18:8080".parse().expect("addr")),
        };
        let solo = ServiceConfig { name: "solo".into(), port: 81, green: None, ..web.clone() };
        Switchboard::new(FakeMaps::default(), &[web, solo])
    }

    fn cutover(b: &mut Switchboard<FakeMaps>, s: &str, c: Option<&str>) -> Response {
        b.handle(Request::Cutover { service: s.into(), colour: c.map(Into::into) })
    }

    #[test]
    fn cutover_defaults_to_the_idle_colour_and_writes_the_map_once() {
        let mut b = board();
        let r = cutover(&mut b, "web", None);
        assert!(r.ok, "{r:?}");
        assert_eq!(b.maps.active.get(&0), Some(&Colour::Green));
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
        assert_eq!(b.maps.active.get(&0), Some(&Colour::Blue));
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
        assert_eq!(b.maps.writes, 0, "a refused cut-over writes nothing");
    }

    #[test]
    fn status_lists_services_and_reasons() {
        let b = board();
        let r = b.status(None).expect("status");
        assert_eq!(r.services.len(), 2);
        assert_eq!(r.services[0].colours.len(), 2);
        assert_eq!(r.services[1].colours[1].backend, None);
        assert_eq!(r.reasons, [("no_match".to_owned(), 3)]);
        assert!(b.status(Some("nope")).is_err());
    }
}
