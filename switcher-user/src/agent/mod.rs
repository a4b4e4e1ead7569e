//! The agent (`switcher daemon`): adopts or installs the pinned data path, hands the engine
//! to its one owner, serves the control socket, checks backends, follows drains, serves
//! metrics, reloads on SIGHUP, and stops on SIGTERM or SIGINT — leaving the data path running
//! (pinned) unless told to detach. The top of the crate's layers: nothing imports it.
//!
//! - this module: start-up, the main loop (signals, the once-a-second tick, accepting), stop;
//! - [`socket`]: the control socket, its peers and their requests;
//! - `audit`: the audit trail of changes;
//! - `reload`: SIGHUP and `switcher reload`;
//! - `checks`: the health-check rounds;
//! - `flows`: `switcher flows` (walks of the flow table off the engine) and the flow table's
//!   pressure in the log;
//! - [`metrics`]: the Prometheus endpoint.

mod audit;
mod checks;
mod flows;
mod hooks;
pub mod metrics;
mod reload;
pub mod socket;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::task::JoinSet;

pub use self::socket::check_socket_path;
use self::{
    audit::Audit,
    checks::{check_health, health_round},
    reload::reload,
    socket::{BUSY, Ctx, SocketFile, bind, serve},
};
use crate::{
    accounts,
    config::{Config, ServiceConfig, group_id},
    dataplane::Dataplane,
    engine::{Handle, Switchboard, chain},
    fleet::Fleet,
    limits,
};

/// How the daemon was asked to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The file to re-read on SIGHUP and `switcher reload`.
    pub config_path: PathBuf,
    /// Detach the XDP program and remove the pins on exit (default: leave them running).
    pub detach_on_exit: bool,
}

/// The engine's one owner, reached over its channel (see [`crate::engine::owner`]).
type Engine = Handle<Dataplane>;

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// Start-up failures (pins, attach, maps, socket), with what was being done.
pub async fn run(config: Config, opts: Options, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    // What can be checked is checked before anything on the node changes: a start that fails
    // leaves no pins and no forwarding turned on.
    check_interfaces(&config.interfaces)?;
    let probes = config.services.iter().map(|s| s.blue.len() + s.green.len()).sum();
    match limits::ensure_fds(limits::fds_needed(probes)) {
        Ok(n) => tracing::debug!("open files limit: {n}"),
        Err(e) => tracing::warn!("{e}: health checks could run out of file descriptors"),
    }
    check_socket_path(&config.socket).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut dataplane, installed) = match Dataplane::load(&config) {
        Ok(loaded) => loaded,
        Err(e) => {
            if opts.detach_on_exit {
                detach_failed_start(&config.pin_path);
            }
            return Err(e).context("start the data plane");
        }
    };
    ensure_forwarding("/proc/sys/net/ipv4/ip_forward", "IPv4");
    if config.services.iter().any(|s| s.vip.is_ipv6()) {
        ensure_forwarding("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6");
    }
    // The open flows are counted by a thread of their own, in batches, apart from the
    // engine: status, metrics, cut-overs and the fleet read its last pass.
    let walker = dataplane.flow_walker();
    std::thread::Builder::new()
        .name("flow-counter".into())
        .spawn(move || walker.run())
        .context("start the thread that counts the open flows")?;
    // `switcher flows` walks the table on a descriptor of its own, on blocking tasks.
    let (flow_table, flow_capacity) = dataplane.flow_lister();
    let lister = Arc::new(flows::Lister::new(flow_table, flow_capacity, config.udp_idle_timeout));
    // Emergency changes made `--local` in a fleet while no daemon ran (see `emergency`).
    let emergency_overrides = crate::pins::Pins::new(&config.pin_path).take_overrides();
    for (s, i) in config.services.iter().zip(&installed) {
        tracing::info!(service = %s.name, vip = %s.vip, port = s.port, protocol = s.protocol.as_str(), active = %i.active, "serving");
    }
    let mut board = Switchboard::new(dataplane, config.services.iter().cloned().zip(installed).collect());
    // Rollouts a previous daemon left under way resume where they were.
    board.adopt_rollouts(crate::pins::Pins::new(&config.pin_path));
    let engine: Engine = Handle::start(board).context("start the engine's thread")?;
    // One round of health checks before the socket opens, so that the first cut-over is
    // judged on facts (bounded by the checks' timeouts).
    let _ = tokio::time::timeout(Duration::from_secs(5), health_round(&engine, &Audit::new(None))).await;
    let group = match config.socket_group.clone() {
        None => None,
        Some(name) => Some(
            accounts::off_worker(accounts::LOOKUP_TIMEOUT, {
                let name = name.clone();
                move || group_id(&name)
            })
            .await
            .flatten()
            .with_context(|| format!("no group {name:?} (or the lookup took over {:?})", accounts::LOOKUP_TIMEOUT))?,
        ),
    };
    let listener = match bind(&config.socket, group) {
        Ok(l) => l,
        Err(e) => {
            if opts.detach_on_exit {
                detach(&engine).await;
            }
            return Err(e);
        }
    };
    let _socket = SocketFile(config.socket.clone());
    let audit = Arc::new(Audit::new(config.audit_log.clone()));
    let connections = Arc::new(tokio::sync::Semaphore::new(limits::CONTROL_CONNECTIONS));
    let fleet = config.fleet.clone().map(|f| Arc::new(Fleet::new(f)));
    for name in &emergency_overrides {
        match &fleet {
            Some(f) => f.note_emergency_override(name),
            None => tracing::info!(service = %name, "adopted the emergency path's change"),
        }
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(check_health(engine.clone(), Arc::clone(&audit), fleet.clone()));
    tasks.spawn(flows::watch_pressure(engine.clone(), flow_capacity));
    if let Some(addr) = config.metrics {
        let capacity = u64::from(config.max_flows.unwrap_or(switcher_common::MAX_FLOWS));
        tasks.spawn(metrics::serve(addr, engine.clone(), fleet.clone(), capacity));
    }
    if let Some(f) = &fleet {
        tracing::info!(node = %f.config.node, endpoints = ?f.config.endpoints, prefix = %f.config.prefix, "fleet mode: following the desired state in etcd");
        for s in config.services.iter().filter(|s| s.mode == crate::config::Mode::Nat) {
            tracing::warn!(
                service = %s.name,
                "NAT mode in a fleet: a reply must come back through the node that translated its request; if ECMP may send it through another node, use mode = \"dsr\""
            );
        }
        f.set_hook_runner(Arc::new(hooks::run));
        let audit = Arc::clone(&audit);
        tasks.spawn(crate::fleet::run(Arc::clone(f), engine.clone(), move |who, c| audit.record(who, c)));
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut watchdog_usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    tracing::info!(socket = %config.socket.display(), services = config.services.len(), "switcher daemon ready");
    let mut hangup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("install SIGHUP handler")?;
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    // The rollouts' fast guard: every 100 ms, only while a rollout gives a new colour new
    // flows (each tick says whether one does; so does each round of the guard).
    let mut guard = tokio::time::interval(crate::engine::signals::GUARD_EVERY);
    guard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut guarding = false;
    let config_path = opts.config_path.clone();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hangup.recv() => {
                // Off the loop: reading the file must not stall status, cut-overs or SIGTERM.
                let (engine, config_path, config, fleet) = (engine.clone(), config_path.clone(), config.clone(), fleet.clone());
                tokio::spawn(async move {
                    let r = reload(&engine, &config_path, &config, fleet.as_deref(), None).await;
                    match (r.ok, r.message, r.error) {
                        (true, Some(m), _) => tracing::info!("SIGHUP: {m}"),
                        (_, _, Some(e)) => tracing::error!("SIGHUP: {e}"),
                        _ => {}
                    }
                });
            }
            _ = ticker.tick() => {
                let (every_five, pins) = (ticks.is_multiple_of(5), config.pin_path.clone());
                let ticked = engine
                    .call(move |b| {
                        b.tick();
                        let rollouts = b.tick_rollouts();
                        let services = every_five.then(|| {
                            repin(b.maps_mut(), &pins);
                            b.services()
                        });
                        (services, rollouts, b.guarding())
                    })
                    .await;
                if let Ok((services, rollouts, under_way)) = ticked {
                    if under_way && !guarding {
                        guard.reset();
                    }
                    guarding = under_way;
                    hooks::follow(&engine, &audit, rollouts);
                    if let Some(services) = services {
                        keep_dsr_neighbours(&services);
                    }
                }
                if watchdog {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                ticks += 1;
            }
            _ = guard.tick(), if guarding => {
                match engine.call(|b| (b.guard_rollouts(), b.guarding())).await {
                    Ok((rollouts, under_way)) => {
                        guarding = under_way;
                        hooks::follow(&engine, &audit, rollouts);
                    }
                    Err(_) => guarding = false,
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        // Refused at once, so idle connections cannot take the descriptors
                        // the health checks and the audit log need.
                        let _ = stream.try_write(BUSY);
                        continue;
                    };
                    let (engine, audit, config_path, config, fleet, lister) = (engine.clone(), Arc::clone(&audit), config_path.clone(), config.clone(), fleet.clone(), Arc::clone(&lister));
                    tokio::spawn(async move {
                        let _permit = permit;
                        let ctx = Ctx { engine: &engine, audit: &audit, group, config_path: &config_path, config: &config, fleet: fleet.as_deref(), flows: &lister };
                        if let Err(e) = serve(stream, &ctx).await {
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
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let (detach_on_exit, pins, interfaces) = (opts.detach_on_exit, config.pin_path.clone(), config.interfaces.clone());
    engine.call(move |b| stop(b.maps_mut(), detach_on_exit, &pins, &interfaces)).await?
}

/// The daemon's last word to the data plane: detach (`--detach-on-exit`), or make sure the
/// pins are there so that the data path outlives the daemon.
fn stop(dp: &mut Dataplane, detach_on_exit: bool, pins: &Path, interfaces: &[String]) -> anyhow::Result<()> {
    if detach_on_exit {
        dp.detach().context("detach and remove the pins")?;
        tracing::info!("detached the XDP program and removed the pins (--detach-on-exit)");
        return Ok(());
    }
    repin(dp, pins);
    if dp.pinned() {
        tracing::info!(
            pins = %pins.display(),
            "stopping; the data path keeps running (pinned). `switcher rollback`/`cutover` still work on it; `switcher uninstall` removes it"
        );
    } else {
        tracing::error!(
            pins = %pins.display(),
            ?interfaces,
            "stopping with the pins gone and not restored: XDP is detached from the interfaces as this daemon exits, and the VIPs stop answering. Start the daemon again to re-attach"
        );
    }
    Ok(())
}

/// Pins again whatever was removed from under the daemon, loudly.
fn repin(dp: &mut Dataplane, pins: &Path) {
    match dp.repin() {
        Ok(done) if done.is_empty() => {}
        Ok(done) => tracing::warn!(
            pins = %pins.display(),
            "the pins were removed while the daemon ran (without them the data path stops when the daemon exits): pinned again {}",
            done.join(", ")
        ),
        Err(e) => tracing::error!(
            pins = %pins.display(),
            "the pins were removed while the daemon ran and cannot be restored ({}): the data path stops when this daemon exits",
            chain(&e)
        ),
    }
}

/// `--detach-on-exit` after a start that failed once the program was attached.
async fn detach(engine: &Engine) {
    match engine.call(|b| b.maps_mut().detach()).await {
        Ok(Ok(())) => {
            tracing::info!("start-up failed: detached the XDP program and removed the pins (--detach-on-exit)")
        }
        Ok(Err(e)) => tracing::error!("start-up failed, and detaching failed too: {e}; run `switcher uninstall`"),
        Err(e) => tracing::error!("start-up failed, and detaching failed too: {e}; run `switcher uninstall`"),
    }
}

/// `--detach-on-exit` after [`Dataplane::load`] failed part-way (an interface attached, the
/// next one missing): removes what is pinned, unless another daemon holds it.
fn detach_failed_start(root: &Path) {
    let pins = crate::pins::Pins::new(root);
    if !pins.exists() && pins.linked_interfaces().is_empty() {
        return;
    }
    let Ok(_lock) = pins.lock() else { return };
    match pins.remove() {
        Ok(()) => tracing::info!("start-up failed: detached the XDP program and removed the pins (--detach-on-exit)"),
        Err(e) => tracing::error!("start-up failed, and removing the pins failed too: {e}; run `switcher uninstall`"),
    }
}

/// Refuses a config naming an interface this network namespace does not have, before the
/// data plane pins or attaches anything.
fn check_interfaces(names: &[String]) -> anyhow::Result<()> {
    for name in names {
        let c = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("interface name {name:?} holds a NUL byte"))?;
        // SAFETY: a valid C string; the call only reads it.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            anyhow::bail!(
                "no network interface {name:?} in this network namespace (`ip link` lists them): fix `interfaces` in the config; nothing was changed"
            );
        }
    }
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

/// A fresh directory for a test, 0755.
#[cfg(test)]
fn temp_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("switcher-daemon-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}
