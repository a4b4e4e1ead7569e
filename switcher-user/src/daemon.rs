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
    accounts,
    config::{Config, ServiceConfig, group_id},
    dataplane::Dataplane,
    engine::{Change, Handle, Switchboard},
    fleet::Fleet,
    health, limits,
    protocol::{self as control, Request, Response},
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

/// Binds the control socket: creates its directory (0755) or checks that only root or this
/// user can write the one there, refuses if another daemon answers on the path, replaces a
/// stale socket (never anything else), and makes the socket 0660 and of group `gid` without
/// following a symlink.
fn bind(path: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("create socket directory {}", dir.display()))?;
    }
    check_socket_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("another switcher daemon is already listening on {}; stop it first", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
        }
        Ok(m) => anyhow::bail!(
            "{} exists and is not a socket ({}); it is left alone: move it away, or set `socket` to another path",
            path.display(),
            if m.file_type().is_symlink() {
                "a symlink"
            } else if m.is_dir() {
                "a directory"
            } else {
                "a file"
            }
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("look at {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind control socket {}", path.display()))?;
    secure_socket(path, gid)?;
    Ok(listener)
}

/// Refuses a socket directory that a user other than root and this one could write: they could
/// move the socket aside and bind their own, which root's CLI would then talk to.
fn check_socket_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(dir).with_context(|| format!("look at socket directory {}", dir.display()))?;
    anyhow::ensure!(m.is_dir(), "the socket's directory {} is not a directory", dir.display());
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let others = m.mode() & 0o002 != 0 || (m.mode() & 0o020 != 0 && m.gid() != 0);
    if (m.uid() != 0 && m.uid() != me) || others {
        anyhow::bail!(
            "the control socket's directory {} (owner uid {}, mode {:o}) can be written by other users, who could replace the socket; use a directory only root can write, such as the default {}",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777,
            crate::config::DEFAULT_SOCKET.rsplit_once('/').map_or("/run/switcher", |(d, _)| d)
        );
    }
    Ok(())
}

/// Sets the mode (0660) and group of the socket just bound, on the inode itself: opened with
/// `O_PATH | O_NOFOLLOW`, checked to be a socket of ours, then changed through that descriptor.
fn secure_socket(path: &Path, gid: Option<u32>) -> anyhow::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("open the socket {} just bound", path.display()))?;
    let m = file.metadata().with_context(|| format!("stat {}", path.display()))?;
    {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        anyhow::ensure!(
            m.file_type().is_socket() && m.uid() == me,
            "{} was replaced right after it was bound; refusing to change its mode",
            path.display()
        );
    }
    let fd = file.as_raw_fd();
    // chmod through /proc/self/fd reaches the inode of the O_PATH descriptor, not a path.
    std::fs::set_permissions(format!("/proc/self/fd/{fd}"), std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if let Some(gid) = gid {
        // SAFETY: a valid descriptor and an empty C string with AT_EMPTY_PATH: the inode of fd.
        let rc = unsafe { libc::fchownat(fd, c"".as_ptr(), u32::MAX, gid, libc::AT_EMPTY_PATH) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("chgrp {gid} {}", path.display()));
        }
    }
    Ok(())
}

/// Removes the socket file when the daemon stops, however it stops (only if a socket is still
/// what is there).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt as _;
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.0);
        }
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

    /// `uid=N(name) pid=P`; the name is looked up off the async workers, and left out when
    /// the lookup takes too long.
    async fn describe(&self) -> String {
        let uid = self.uid;
        let name = accounts::off_worker(accounts::LOOKUP_TIMEOUT, move || accounts::user_name(uid))
            .await
            .flatten()
            .map_or_else(String::new, |n| format!("({n})"));
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

/// Writes the audit trail of a change: who, what, from → to, when. The file is kept open, so
/// that writing a line never needs a new descriptor, and reopened when it was rotated; a line
/// that cannot be written is retried once on a fresh open, then logged as lost, with its text,
/// at error level.
pub(crate) struct Audit {
    file: Option<PathBuf>,
    open: Mutex<Option<std::fs::File>>,
}

impl Audit {
    /// Opens `file` (if any) at once; a failure is logged, and each line tries again.
    pub(crate) fn new(file: Option<PathBuf>) -> Audit {
        let open = file.as_deref().and_then(|p| match open_audit(p) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(
                    "audit log {}: {e}; audit lines go to the journal only until it can be opened",
                    p.display()
                );
                None
            }
        });
        Audit { file, open: Mutex::new(open) }
    }

    pub(crate) fn record(&self, who: &str, change: &Change) {
        tracing::info!(target: "audit", who, service = %change.service, what = %change.what, from = %change.from, to = %change.to, "change");
        if let Some(path) = &self.file {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let line = format!("{now} {who} {} {} {} -> {}\n", change.what, change.service, change.from, change.to);
            if let Err(e) = self.append(path, &line) {
                tracing::error!(
                    target: "audit",
                    line = line.trim_end(),
                    "audit line LOST from {}: {e}; this journal entry is its only record",
                    path.display()
                );
            }
        }
    }

    /// Appends one line to the held file, reopening it when it was rotated or on a write
    /// error (once).
    fn append(&self, path: &Path, line: &str) -> std::io::Result<()> {
        let mut held = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.as_ref().is_none_or(|f| rotated(path, f)) {
            match open_audit(path) {
                Ok(f) => *held = Some(f),
                // Rotated, and the new file cannot be opened: the held one still takes it.
                Err(_) if held.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        let first = match held.as_mut() {
            Some(f) => f.write_all(line.as_bytes()),
            None => Err(std::io::Error::other("not open")),
        };
        if first.is_ok() {
            return Ok(());
        }
        let mut fresh = open_audit(path)?;
        fresh.write_all(line.as_bytes())?;
        *held = Some(fresh);
        Ok(())
    }
}

fn open_audit(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// Whether `path` no longer names the held file (moved or removed by log rotation).
fn rotated(path: &Path, held: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(path), held.metadata()) {
        (Ok(now), Ok(ours)) => now.dev() != ours.dev() || now.ino() != ours.ino(),
        _ => true,
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
    // The open flows are counted by a thread of their own, in batches, without the board's
    // lock: status, metrics, cut-overs and the fleet read its last pass.
    let walker = dataplane.flow_walker().context("start counting the open flows")?;
    std::thread::Builder::new()
        .name("flow-counter".into())
        .spawn(move || walker.run())
        .context("start the thread that counts the open flows")?;
    // Emergency changes made `--local` in a fleet while no daemon ran (see `emergency`).
    let emergency_overrides = crate::pins::Pins::new(&config.pin_path).take_overrides();
    for (s, i) in config.services.iter().zip(&installed) {
        tracing::info!(service = %s.name, vip = %s.vip, port = s.port, protocol = s.protocol.as_str(), active = %i.active, "serving");
    }
    let engine: Engine =
        Handle::start(Switchboard::new(dataplane, config.services.iter().cloned().zip(installed).collect()))
            .context("start the engine's thread")?;
    // One round of health checks before the socket opens, so that the first cut-over is
    // judged on facts (bounded by the checks' timeouts).
    let _ = tokio::time::timeout(Duration::from_secs(5), health_round(&engine, &Audit::new(None), &mut HashMap::new()))
        .await;
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
    if let Some(addr) = config.metrics {
        tasks.spawn(crate::metrics::serve(addr, engine.clone(), fleet.clone()));
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
                let services = engine
                    .call(move |b| {
                        b.tick();
                        every_five.then(|| {
                            repin(b.maps_mut(), &pins);
                            b.services()
                        })
                    })
                    .await;
                if let Ok(Some(services)) = services {
                    keep_dsr_neighbours(&services);
                }
                if watchdog {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                ticks += 1;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        // Refused at once, so idle connections cannot take the descriptors
                        // the health checks and the audit log need.
                        let _ = stream.try_write(BUSY);
                        continue;
                    };
                    let (engine, audit, config_path, config, fleet) = (engine.clone(), Arc::clone(&audit), config_path.clone(), config.clone(), fleet.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let ctx = Ctx { engine: &engine, audit: &audit, group, config_path: &config_path, config: &config, fleet: fleet.as_deref() };
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

/// How long a reload waits for the configuration file to be read.
const READ_CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// One reload at a time, so that an older file read last cannot be applied over a newer one.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The answer to a control connection beyond [`limits::CONTROL_CONNECTIONS`].
const BUSY: &[u8] =
    b"{\"ok\":false,\"error\":\"the daemon is serving too many control connections; try again\",\"services\":[]}\n";

/// Re-reads the config off the async workers and applies it; an unreadable or invalid file,
/// one that changes what needs a restart, or a `deadline` that passed changes nothing.
async fn reload(
    engine: &Engine,
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
    apply_config(engine, path, new, running, fleet).await
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
            crate::engine::chain(&e)
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

/// Longest path a unix socket address holds (`sun_path`, 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Refuses a control socket path the daemon could not bind, before anything is attached:
/// longer than a unix socket address holds, or taken by something that is not a socket (a
/// directory, a symbolic link — dangling or not —, a file).
///
/// # Errors
/// What is wrong and what to do.
pub fn check_socket_path(path: &Path) -> Result<(), String> {
    use std::os::unix::{ffi::OsStrExt as _, fs::FileTypeExt as _};
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "socket {}: {len} bytes, but a unix socket path holds at most {MAX_SOCKET_PATH}; choose a shorter `socket`",
            path.display()
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let t = meta.file_type();
        let what = if t.is_socket() {
            return Ok(());
        } else if t.is_dir() {
            "a directory".to_owned()
        } else if t.is_symlink() {
            match std::fs::read_link(path) {
                Ok(to) if path.exists() => format!("a symbolic link (to {})", to.display()),
                Ok(to) => format!("a dangling symbolic link (to {})", to.display()),
                Err(_) => "a symbolic link".to_owned(),
            }
        } else {
            "a file that is not a socket".to_owned()
        };
        return Err(format!(
            "socket {} is {what}: the daemon would not bind there; remove it, or choose another `socket`",
            path.display()
        ));
    }
    Ok(())
}

/// The keys of `new` that differ from `running` and take effect only with a restart.
fn restart_keys(new: &Config, running: &Config) -> Vec<&'static str> {
    [
        ("interfaces", new.interfaces != running.interfaces),
        ("socket", new.socket != running.socket),
        ("socket_group", new.socket_group != running.socket_group),
        ("metrics", new.metrics != running.metrics),
        ("audit_log", new.audit_log != running.audit_log),
        ("pin_path", new.pin_path != running.pin_path),
        ("xdp_mode", new.xdp_mode != running.xdp_mode),
        ("forwarding", new.forwarding != running.forwarding),
        ("udp_idle_timeout_secs", new.udp_idle_timeout != running.udp_idle_timeout),
        ("max_flows", new.max_flows != running.max_flows),
        ("[fleet]", new.fleet != running.fleet),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
}

/// Applies a new config read by [`reload`]: what needs a restart, or would undo runtime pool
/// changes, is refused and changes nothing.
async fn apply_config(engine: &Engine, path: &Path, new: Config, running: &Config, fleet: Option<&Fleet>) -> Response {
    let needs_restart = restart_keys(&new, running);
    if !needs_restart.is_empty() {
        return Response::error(format!(
            "reload rejected, nothing changed: {} can only change with a restart (the data path keeps running across it)",
            needs_restart.join(", ")
        ));
    }
    let (tcp_idle, services) = (new.tcp_idle_timeout, new.services.clone());
    let reloaded = engine
        .call(move |b| {
            b.maps_mut().set_tcp_idle_timeout(tcp_idle);
            b.reload(services)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match reloaded {
        Ok(done) => {
            let list = |v: &[String]| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
            let mut msg = format!(
                "reloaded {}: {} services (added: {}; removed: {})",
                path.display(),
                new.services.len(),
                list(&done.added),
                list(&done.removed)
            );
            if !done.kept.is_empty() {
                msg.push_str(&format!(
                    "; kept the pools changed at runtime of {} (the file did not change them)",
                    done.kept.join(", ")
                ));
            }
            tracing::info!("{msg}");
            if let Some(f) = fleet {
                f.resync();
            }
            Response { ok: true, message: Some(msg), ..Response::default() }
        }
        Err(e) => Response::error(e),
    }
}

/// What a control connection needs of the daemon.
struct Ctx<'a> {
    engine: &'a Engine,
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
                let changes = !matches!(req, Request::Status { .. } | Request::Fleet | Request::FleetWait { .. });
                let who = match &peer {
                    Some(p) => p.describe().await,
                    None => "unknown peer".to_owned(),
                };
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
    let names = async || {
        ctx.engine.call(|b| b.services().into_iter().map(|s| s.name).collect::<Vec<_>>()).await.unwrap_or_default()
    };
    let fleet_change = match &req {
        Request::Cutover { .. } | Request::Rollback { .. } | Request::Weight { .. } => true,
        Request::BackendAdd { .. } | Request::BackendRemove { .. } => {
            ctx.fleet.is_some_and(|f| f.config.share_backends)
        }
        _ => false,
    };
    match (req, ctx.fleet) {
        (Request::Reload, _) => {
            let r = reload(ctx.engine, ctx.config_path, ctx.config, ctx.fleet, deadline).await;
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
        (Request::Fleet, Some(f)) => f.view_all(&names().await).await,
        (Request::FleetWait { after, wait_ms }, Some(f)) => {
            let wait = Duration::from_millis(wait_ms).min(control::FLEET_WAIT_MAX);
            f.view_after(&names().await, after, wait).await
        }
        (Request::Fleet | Request::FleetWait { .. }, None) => Response::error(
            "this daemon is not part of a fleet: add a [fleet] section (etcd endpoints, node name) to its config",
        ),
        (_, _) if late() => control::too_late(),
        (req, Some(f)) if fleet_change => {
            let (resp, change) = f.propose(ctx.engine, req, who).await;
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
            // Checked again when the engine gets to it: the request may have queued.
            let handled = ctx
                .engine
                .call(move |b| {
                    if deadline.is_some_and(control::Deadline::passed) {
                        return (control::too_late(), None);
                    }
                    b.handle(req)
                })
                .await;
            let mut resp = match handled {
                Ok((resp, change)) => {
                    if let Some(c) = change {
                        ctx.audit.record(who, &c);
                    }
                    resp
                }
                Err(e) => Response::error(e.to_string()),
            };
            if status && let Some(f) = fleet {
                resp.fleet = Some(f.local_view(&names().await));
            }
            resp
        }
    }
}

/// Probes every checked service's backends at its interval and records the results.
async fn check_health(engine: Engine, audit: Arc<Audit>, fleet: Option<Arc<Fleet>>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        for c in health_round(&engine, &audit, &mut due).await {
            if let Some(f) = &fleet {
                f.note_override(&c.service, format!("{} {} → {} by this node's health checks", c.what, c.from, c.to));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Probes the services that are due, concurrently, and records the results; returns the
/// switches the results caused (automatic rollback, failover). A probe that could not run here
/// (see [`health::Failure::Local`]) is left out: its backend keeps its state.
async fn health_round(engine: &Engine, audit: &Audit, due: &mut HashMap<String, Instant>) -> Vec<Change> {
    let mut switches = Vec::new();
    let checks = engine.call(|b| b.checks()).await.unwrap_or_default();
    let now = Instant::now();
    let mut round = JoinSet::new();
    for (name, check, backends) in checks {
        if due.get(&name).is_some_and(|t| *t > now) {
            continue;
        }
        due.insert(name.clone(), now + check.interval);
        round.spawn(async move {
            let probes = backends.into_iter().map(|b| {
                let check = check.clone();
                (b, async move { health::probe(&check, b).await })
            });
            (name, join_keyed(probes).await)
        });
    }
    while let Some(joined) = round.join_next().await {
        let Ok((name, results)) = joined else {
            tracing::error!("a round of health checks failed: {joined:?}");
            continue;
        };
        let mut counted = Vec::with_capacity(results.len());
        let mut local = Vec::new();
        for (b, r) in results {
            match r {
                Ok(Ok(())) => counted.push((b, Ok(()))),
                Ok(Err(health::Failure::Backend(e))) => counted.push((b, Err(e))),
                Ok(Err(health::Failure::Local(e))) => local.push(e),
                Err(panicked) => local.push(format!("the probe of {b} failed: {panicked}")),
            }
        }
        if let Some(first) = local.first() {
            tracing::warn!(
                service = %name,
                probes = local.len(),
                "health probes could not run on this node ({first}); their backends keep their state: this is not a backend failure"
            );
        }
        let changes = engine.call(move |b| b.record_health(&name, counted)).await.unwrap_or_default();
        for c in changes {
            audit.record("switcher (health checks)", &c);
            if c.what == "auto-rollback" || c.what == "failover" {
                switches.push(c);
            }
        }
    }
    switches
}

/// A task's output, or how it failed.
type Joined<T> = Result<T, String>;

/// Runs futures concurrently; returns each one's output paired with its key, in the order
/// given. A future that panicked gives `Err` with the panic, against its own key: a failed
/// task never shifts the results of the others.
async fn join_keyed<K, F>(futures: impl IntoIterator<Item = (K, F)>) -> Vec<(K, Joined<F::Output>)>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = JoinSet::new();
    let mut slots: Vec<(K, Option<Joined<F::Output>>)> = Vec::new();
    let mut index = HashMap::new();
    for (i, (k, f)) in futures.into_iter().enumerate() {
        let handle = set.spawn(f);
        index.insert(handle.id(), i);
        slots.push((k, None));
    }
    while let Some(joined) = set.join_next_with_id().await {
        let (id, out) = match joined {
            Ok((id, out)) => (id, Ok(out)),
            Err(e) => (e.id(), Err(if e.is_panic() { "it panicked".to_owned() } else { e.to_string() })),
        };
        if let Some(slot) = index.get(&id).and_then(|&i| slots.get_mut(i)) {
            slot.1 = Some(out);
        }
    }
    slots.into_iter().map(|(k, r)| (k, r.unwrap_or_else(|| Err("it did not finish".to_owned())))).collect()
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
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("switcher-daemon-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    #[tokio::test]
    async fn the_socket_is_bound_only_where_no_one_else_can_write() {
        let dir = temp_dir("bind");
        let sock = dir.join("switcher.sock");
        // A directory others may write is refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let e = format!("{:#}", bind(&sock, None).expect_err("a world-writable directory"));
        assert!(e.contains("can be written by other users"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // A regular file (or a symlink) at the socket path is never deleted.
        std::fs::write(&sock, "precious").expect("write");
        let e = format!("{:#}", bind(&sock, None).expect_err("a regular file"));
        assert!(e.contains("is not a socket") && e.contains("left alone"), "{e}");
        assert_eq!(std::fs::read_to_string(&sock).expect("still there"), "precious");
        std::fs::remove_file(&sock).expect("rm");
        let target = dir.join("target");
        std::fs::write(&target, "target").expect("write");
        std::os::unix::fs::symlink(&target, &sock).expect("symlink");
        let e = format!("{:#}", bind(&sock, None).expect_err("a symlink"));
        assert!(e.contains("a symlink"), "{e}");
        assert_eq!(std::fs::metadata(&target).expect("target").mode() & 0o777, 0o644, "the target was not chmod-ed");
        std::fs::remove_file(&sock).expect("rm");
        // A good directory: the socket is 0660, with the group asked for.
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let listener = bind(&sock, Some(gid)).expect("bind");
        let m = std::fs::symlink_metadata(&sock).expect("socket");
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid));
        // A live daemon's socket is not taken over; a stale one is replaced.
        let e = format!("{:#}", bind(&sock, None).expect_err("in use"));
        assert!(e.contains("already listening"), "{e}");
        drop(listener);
        let _again = bind(&sock, None).expect("a stale socket is replaced");
        // A missing directory is created 0755.
        let sub = dir.join("sub");
        let _l = bind(&sub.join("s.sock"), None).expect("bind in a new directory");
        assert_eq!(std::fs::metadata(&sub).expect("created").mode() & 0o777, 0o755);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_panicking_probe_does_not_shift_the_others_results() {
        let futures = ["a", "b", "c", "d"].into_iter().enumerate().map(|(i, k)| {
            (k, async move {
                tokio::task::yield_now().await;
                assert!(k != "b", "probe of b panics");
                i
            })
        });
        let out = join_keyed(futures).await;
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], ("a", Ok(0)));
        assert!(matches!(&out[1], ("b", Err(e)) if e.contains("panicked")), "{:?}", out[1]);
        assert_eq!(out[2], ("c", Ok(2)));
        assert_eq!(out[3], ("d", Ok(3)));
    }

    fn change(what: &str) -> Change {
        Change { service: "web".into(), what: what.into(), from: "blue".into(), to: "green".into() }
    }

    #[test]
    fn the_audit_log_is_held_open_and_follows_rotation() {
        let dir = temp_dir("audit");
        let path = dir.join("audit.log");
        let audit = Audit::new(Some(path.clone()));
        assert!(path.exists(), "opened at start");
        audit.record("uid=0(root)", &change("cut-over"));
        // logrotate: move the file away; the next line goes to a new file.
        let old = dir.join("audit.log.1");
        std::fs::rename(&path, &old).expect("rotate");
        audit.record("uid=0(root)", &change("rollback"));
        let first = std::fs::read_to_string(&old).expect("rotated file");
        let second = std::fs::read_to_string(&path).expect("new file");
        assert!(first.contains("uid=0(root) cut-over web blue -> green") && !first.contains("rollback"), "{first}");
        assert!(second.contains("rollback web blue -> green"), "{second}");
        // Removed: the next line makes a new file.
        std::fs::remove_file(&path).expect("rm");
        audit.record("uid=0(root)", &change("weight"));
        let third = std::fs::read_to_string(&path).expect("recreated file");
        assert!(third.contains("weight web blue -> green"), "{third}");
        // And a path that cannot be opened at all is an error the caller logs as lost.
        let nowhere = Audit::new(Some(dir.join("missing-dir").join("audit.log")));
        assert!(nowhere.append(&dir.join("missing-dir").join("audit.log"), "x\n").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn socket_paths_the_daemon_cannot_bind_are_refused() {
        let dir = std::env::temp_dir().join(format!("switcher-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("adir")).expect("mkdir");
        std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("dangling")).expect("symlink");
        assert!(check_socket_path(&dir.join("fresh.sock")).is_ok());
        let e = check_socket_path(&dir.join("adir")).expect_err("a directory");
        assert!(e.contains("is a directory"), "{e}");
        let e = check_socket_path(&dir.join("dangling")).expect_err("a dangling symlink");
        assert!(e.contains("dangling symbolic link"), "{e}");
        let long = dir.join("x".repeat(120));
        let e = check_socket_path(&long).expect_err("too long");
        assert!(e.contains("at most 107"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_reload_refuses_every_key_it_cannot_apply_by_name() {
        let text = "interfaces = [\"lb0\"]\nsocket = \"/tmp/s.sock\"\n";
        let running = Config::parse(Path::new("a.toml"), text).expect("valid");
        assert!(restart_keys(&running, &running).is_empty());
        for (line, key) in [
            ("socket_group = \"root\"", "socket_group"),
            ("metrics = \"127.0.0.1:9999\"", "metrics"),
            ("audit_log = \"/tmp/audit.log\"", "audit_log"),
            ("max_flows = 1024", "max_flows"),
        ] {
            let new = Config::parse(Path::new("b.toml"), &format!("{line}\n{text}")).expect("valid");
            assert_eq!(restart_keys(&new, &running), [key], "{line}");
        }
    }
}
