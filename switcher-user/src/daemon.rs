//! The agent: adopts or installs the pinned data path, serves the control socket, checks
//! backends, follows drains, serves metrics, reloads on SIGHUP, and stops on SIGTERM or SIGINT
//! — leaving the data path running (pinned) unless told to detach.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinSet,
};

use crate::{
    config::{Config, ServiceConfig, group_id},
    control::{self, Request, Response},
    dataplane::Dataplane,
    fleet::Fleet,
    health,
    switchboard::{Change, Switchboard, chain},
};

/// How the daemon was asked to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The file to re-read on SIGHUP and `switcher reload`.
    pub config_path: PathBuf,
    /// Detach the XDP program and remove the pins on exit (default: leave them running).
    pub detach_on_exit: bool,
}

type Board = Arc<Mutex<Switchboard<Dataplane>>>;

/// Binds the control socket: creates its directory, refuses if another daemon answers on it,
/// replaces a stale file, and makes it 0660 (root and `socket_group`).
fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
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
    if let Some(name) = group {
        let gid = group_id(name).with_context(|| format!("no group {name:?}"))?;
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| format!("chgrp {name} {}", path.display()))?;
    }
    Ok(listener)
}

/// Removes the socket file when the daemon stops, however it stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Who is on the other end of the control socket.
#[derive(Clone, Debug)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

impl Peer {
    /// Root, the daemon's own user, and members of the socket's group may change things;
    /// anyone who can connect may read the status.
    fn may_change(&self, group: Option<u32>) -> bool {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if self.uid == 0 || self.uid == me {
            return true;
        }
        let Some(g) = group else { return false };
        self.gid == g || self.pid.is_some_and(|pid| supplementary_groups(pid).contains(&g))
    }

    fn describe(&self) -> String {
        let name = user_name(self.uid).map_or_else(String::new, |n| format!("({n})"));
        match self.pid {
            Some(pid) => format!("uid={}{name} pid={pid}", self.uid),
            None => format!("uid={}{name}", self.uid),
        }
    }
}

/// A process's supplementary groups, from `/proc/<pid>/status`.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        })
        .unwrap_or_default()
}

fn user_name(uid: u32) -> Option<String> {
    // SAFETY: getpwuid returns static storage or null; read at once.
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null, and pw_name is a C string.
    Some(unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) }.to_string_lossy().into_owned())
}

/// Writes the audit trail of a change: who, what, from → to, when.
pub(crate) struct Audit {
    file: Option<PathBuf>,
}

impl Audit {
    pub(crate) fn record(&self, who: &str, change: &Change) {
        tracing::info!(target: "audit", who, service = %change.service, what = %change.what, from = %change.from, to = %change.to, "change");
        if let Some(path) = &self.file {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let line = format!("{now} {who} {} {} {} -> {}\n", change.what, change.service, change.from, change.to);
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                tracing::warn!("audit log {}: {e}", path.display());
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// Start-up failures (pins, attach, maps, socket), with what was being done.
pub async fn run(config: Config, opts: Options, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    ensure_forwarding("/proc/sys/net/ipv4/ip_forward", "IPv4");
    if config.services.iter().any(|s| s.vip.is_ipv6()) {
        ensure_forwarding("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6");
    }
    let (dataplane, installed) = Dataplane::load(&config).context("start the data plane")?;
    for (s, i) in config.services.iter().zip(&installed) {
        tracing::info!(service = %s.name, vip = %s.vip, port = s.port, protocol = s.protocol.as_str(), active = %i.active, "serving");
    }
    let board: Board =
        Arc::new(Mutex::new(Switchboard::new(dataplane, config.services.iter().cloned().zip(installed).collect())));
    // One round of health checks before the socket opens, so that the first cut-over is
    // judged on facts (bounded by the checks' timeouts).
    let first = Arc::clone(&board);
    let _ =
        tokio::time::timeout(Duration::from_secs(5), health_round(&first, &Audit { file: None }, &mut HashMap::new()))
            .await;
    let listener = bind(&config.socket, config.socket_group.as_deref())?;
    let _socket = SocketFile(config.socket.clone());
    let audit = Arc::new(Audit { file: config.audit_log.clone() });
    let group = config.socket_group.as_deref().and_then(group_id);
    let fleet = config.fleet.clone().map(|f| Arc::new(Fleet::new(f)));
    let mut tasks = JoinSet::new();
    tasks.spawn(check_health(Arc::clone(&board), Arc::clone(&audit), fleet.clone()));
    if let Some(addr) = config.metrics {
        tasks.spawn(crate::metrics::serve(addr, Arc::clone(&board), fleet.clone()));
    }
    if let Some(f) = &fleet {
        tracing::info!(node = %f.config.node, endpoints = ?f.config.endpoints, prefix = %f.config.prefix, "fleet mode: following the desired state in etcd");
        for s in config.services.iter().filter(|s| s.mode == crate::config::Mode::Nat) {
            tracing::warn!(
                service = %s.name,
                "NAT mode in a fleet: a reply must come back through the node that translated its request; if ECMP may send it through another node, use mode = \"dsr\""
            );
        }
        let audit = Arc::clone(&audit);
        tasks.spawn(crate::fleet::run(Arc::clone(f), Arc::clone(&board), move |who, c| audit.record(who, c)));
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
    let config_path = opts.config_path.clone();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hangup.recv() => {
                // Off the loop: reading the file must not stall status, cut-overs or SIGTERM.
                let (board, config_path, config, fleet) = (Arc::clone(&board), config_path.clone(), config.clone(), fleet.clone());
                tokio::spawn(async move {
                    let r = reload(&board, &config_path, &config, fleet.as_deref(), None).await;
                    match (r.ok, r.message, r.error) {
                        (true, Some(m), _) => tracing::info!("SIGHUP: {m}"),
                        (_, _, Some(e)) => tracing::error!("SIGHUP: {e}"),
                        _ => {}
                    }
                });
            }
            _ = ticker.tick() => {
                if let Ok(mut b) = board.lock() {
                    b.tick();
                    if ticks.is_multiple_of(5) {
                        keep_dsr_neighbours(&b.services());
                    }
                }
                if watchdog {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                ticks += 1;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (board, audit, config_path, config, fleet) = (Arc::clone(&board), Arc::clone(&audit), config_path.clone(), config.clone(), fleet.clone());
                    tokio::spawn(async move {
                        let ctx = Ctx { board: &board, audit: &audit, group, config_path: &config_path, config: &config, fleet: fleet.as_deref() };
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
    let mut board = board.lock().map_err(|_| anyhow::anyhow!("daemon state poisoned"))?;
    if opts.detach_on_exit {
        board.maps_mut().detach().context("detach and remove the pins")?;
        tracing::info!("detached the XDP program and removed the pins (--detach-on-exit)");
    } else {
        tracing::info!(
            pins = %config.pin_path.display(),
            "stopping; the data path keeps running (pinned). `switcher rollback`/`cutover` still work on it; `switcher uninstall` removes it"
        );
    }
    Ok(())
}

/// How long a reload waits for the configuration file to be read.
const READ_CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// One reload at a time, so that an older file read last cannot be applied over a newer one.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Re-reads the config off the async workers and applies it; an unreadable or invalid file,
/// one that changes what needs a restart, or a `deadline` that passed changes nothing.
async fn reload(
    board: &Board,
    path: &Path,
    running: &Config,
    fleet: Option<&Fleet>,
    deadline: Option<control::Deadline>,
) -> Response {
    let _one = RELOADING.lock().await;
    let new = match read_config(path).await {
        Ok(c) => c,
        Err(e) => return Response::error(format!("reload rejected, nothing changed: {e}")),
    };
    if deadline.is_some_and(control::Deadline::passed) {
        return control::too_late();
    }
    apply_config(board, path, new, running, fleet)
}

/// Reads and validates the config on a blocking thread, for at most [`READ_CONFIG_TIMEOUT`]
/// (a stuck read is left behind; the agent goes on).
async fn read_config(path: &Path) -> Result<Config, String> {
    let p = path.to_owned();
    match tokio::time::timeout(READ_CONFIG_TIMEOUT, tokio::task::spawn_blocking(move || Config::load(&p))).await {
        Ok(Ok(loaded)) => loaded.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("reading {} failed: {e}", path.display())),
        Err(_) => Err(format!(
            "reading {} took longer than {} s (a hung file system?)",
            path.display(),
            READ_CONFIG_TIMEOUT.as_secs()
        )),
    }
}

/// Applies a new config read by [`reload`].
fn apply_config(board: &Board, path: &Path, new: Config, running: &Config, fleet: Option<&Fleet>) -> Response {
    let needs_restart: Vec<&str> = [
        ("interfaces", new.interfaces != running.interfaces),
        ("socket", new.socket != running.socket),
        ("pin_path", new.pin_path != running.pin_path),
        ("xdp_mode", new.xdp_mode != running.xdp_mode),
        ("forwarding", new.forwarding != running.forwarding),
        ("udp_idle_timeout_secs", new.udp_idle_timeout != running.udp_idle_timeout),
        ("max_flows", new.max_flows != running.max_flows),
        ("[fleet]", new.fleet != running.fleet),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect();
    if !needs_restart.is_empty() {
        return Response::error(format!(
            "reload rejected, nothing changed: {} can only change with a restart (the data path keeps running across it)",
            needs_restart.join(", ")
        ));
    }
    let Ok(mut b) = board.lock() else { return Response::error("daemon state is poisoned; restart the daemon") };
    let before: Vec<String> = b.services().iter().map(|s| s.name.clone()).collect();
    match b.maps_mut().apply(&new.services) {
        Ok(installed) => {
            b.reload(new.services.iter().cloned().zip(installed).collect());
            let after: Vec<&str> = new.services.iter().map(|s| s.name.as_str()).collect();
            let added: Vec<&str> = after.iter().copied().filter(|n| !before.iter().any(|b| b == n)).collect();
            let removed: Vec<&str> = before.iter().map(String::as_str).filter(|n| !after.contains(n)).collect();
            let msg = format!(
                "reloaded {}: {} services (added: {}; removed: {})",
                path.display(),
                after.len(),
                if added.is_empty() { "none".into() } else { added.join(", ") },
                if removed.is_empty() { "none".into() } else { removed.join(", ") }
            );
            tracing::info!("{msg}");
            if let Some(f) = fleet {
                f.resync();
            }
            Response { ok: true, message: Some(msg), ..Response::default() }
        }
        Err(e) => Response::error(format!("reload failed while writing the maps: {}", chain(&e))),
    }
}

/// What a control connection needs of the daemon.
struct Ctx<'a> {
    board: &'a Board,
    audit: &'a Audit,
    group: Option<u32>,
    config_path: &'a Path,
    config: &'a Config,
    fleet: Option<&'a Fleet>,
}

/// Answers one connection: one request line, one answer line.
async fn serve(stream: UnixStream, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let peer = stream.peer_cred().map(|c| Peer { uid: c.uid(), gid: c.gid(), pid: c.pid() }).ok();
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
        Ok(Ok(_)) => match control::parse_request_line(line.trim_ascii()) {
            Err(msg) => Response::error(msg),
            Ok((_, Some(deadline))) if deadline.passed() => control::too_late(),
            Ok((req, deadline)) => {
                let changes = !matches!(req, Request::Status { .. } | Request::Fleet);
                let who = peer.as_ref().map_or_else(|| "unknown peer".to_owned(), Peer::describe);
                if changes && !peer.as_ref().is_some_and(|p| p.may_change(ctx.group)) {
                    tracing::warn!(target: "audit", who, "refused a change: not root and not in the socket's group");
                    Response::error(format!(
                        "{who} may not change switcher: ask root, or a member of the socket's group"
                    ))
                } else {
                    answer(ctx, req, &who, deadline).await
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    tokio::time::timeout(control::TIMEOUT, write.write_all(&out)).await??;
    Ok(())
}

/// Answers one request of a peer allowed to make it, unless its `deadline` passes first.
async fn answer(ctx: &Ctx<'_>, req: Request, who: &str, deadline: Option<control::Deadline>) -> Response {
    let late = || deadline.is_some_and(control::Deadline::passed);
    let names =
        || ctx.board.lock().map(|b| b.services().into_iter().map(|s| s.name).collect::<Vec<_>>()).unwrap_or_default();
    let fleet_change = match &req {
        Request::Cutover { .. } | Request::Rollback { .. } | Request::Weight { .. } => true,
        Request::BackendAdd { .. } | Request::BackendRemove { .. } => {
            ctx.fleet.is_some_and(|f| f.config.share_backends)
        }
        _ => false,
    };
    match (req, ctx.fleet) {
        (Request::Reload, _) => {
            let r = reload(ctx.board, ctx.config_path, ctx.config, ctx.fleet, deadline).await;
            if r.ok {
                let change = Change {
                    service: "*".into(),
                    what: "reload".into(),
                    from: "-".into(),
                    to: ctx.config_path.display().to_string(),
                };
                ctx.audit.record(who, &change);
            }
            r
        }
        (Request::Fleet, Some(f)) => f.view_all(&names()).await,
        (Request::Fleet, None) => Response::error(
            "this daemon is not part of a fleet: add a [fleet] section (etcd endpoints, node name) to its config",
        ),
        (_, _) if late() => control::too_late(),
        (req, Some(f)) if fleet_change => {
            let (resp, change) = f.propose(ctx.board, req, who).await;
            if let Some(c) = change {
                ctx.audit.record(who, &c);
            }
            resp
        }
        (req, fleet) => {
            if fleet.is_none() && req.scope().is_some_and(|s| s.if_revision.is_some()) {
                return Response::error("--if-revision is for fleet mode; this daemon has no [fleet] section");
            }
            let status = matches!(req, Request::Status { .. });
            let mut resp = match ctx.board.lock() {
                // The lock may have been waited for.
                Ok(_) if late() => control::too_late(),
                Ok(mut b) => {
                    let (resp, change) = b.handle(req);
                    if let Some(c) = change {
                        ctx.audit.record(who, &c);
                    }
                    resp
                }
                Err(_) => Response::error("daemon state is poisoned; restart the daemon"),
            };
            if status && let Some(f) = fleet {
                resp.fleet = Some(f.local_view(&names()));
            }
            resp
        }
    }
}

/// Probes every checked service's backends at its interval and records the results.
async fn check_health(board: Board, audit: Arc<Audit>, fleet: Option<Arc<Fleet>>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        for c in health_round(&board, &audit, &mut due).await {
            if let Some(f) = &fleet {
                f.note_override(&c.service, format!("{} {} → {} by this node's health checks", c.what, c.from, c.to));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Probes the services that are due, concurrently, and records the results; returns the
/// switches the results caused (automatic rollback, failover).
async fn health_round(board: &Board, audit: &Audit, due: &mut HashMap<String, Instant>) -> Vec<Change> {
    let mut switches = Vec::new();
    {
        let checks = board.lock().map(|b| b.checks()).unwrap_or_default();
        let now = Instant::now();
        let mut round = JoinSet::new();
        for (name, check, backends) in checks {
            if due.get(&name).is_some_and(|t| *t > now) {
                continue;
            }
            due.insert(name.clone(), now + check.interval);
            round.spawn(async move {
                let mut results = Vec::with_capacity(backends.len());
                let probes = backends.iter().map(|b| {
                    let (check, b) = (check.clone(), *b);
                    async move { health::probe(&check, b).await }
                });
                for (b, r) in backends.iter().zip(futures_join(probes).await) {
                    results.push((*b, r));
                }
                (name, results)
            });
        }
        while let Some(Ok((name, results))) = round.join_next().await {
            let changes = board.lock().map(|mut b| b.record_health(&name, results)).unwrap_or_default();
            for c in changes {
                audit.record("switcher (health checks)", &c);
                if c.what == "auto-rollback" || c.what == "failover" {
                    switches.push(c);
                }
            }
        }
    }
    switches
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = JoinSet::new();
    for (i, f) in futures.enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<(usize, F::Output)> = Vec::new();
    while let Some(Ok(r)) = set.join_next().await {
        out.push(r);
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
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
