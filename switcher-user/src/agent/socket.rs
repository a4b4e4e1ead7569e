//! The control socket: bound where only root (or the daemon's user) can replace it, one
//! request per connection from a peer whose credentials say what it may do, answered through
//! the engine's owner (or the fleet, for a fleet-wide change).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::{Engine, audit::Audit, flows::Lister, reload::reload};
use crate::{
    accounts,
    config::Config,
    engine::Change,
    fleet::Fleet,
    protocol::{self, Request, Response},
};

/// Binds the control socket: creates its directory (0755) or checks that only root or this
/// user can write the one there, refuses if another daemon answers on the path, replaces a
/// stale socket (never anything else), and makes the socket 0660 and of group `gid` without
/// following a symlink.
pub(super) fn bind(path: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
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
pub(super) struct SocketFile(pub PathBuf);

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

/// The answer to a control connection beyond [`limits::CONTROL_CONNECTIONS`].
pub(super) const BUSY: &[u8] =
    b"{\"ok\":false,\"error\":\"the daemon is serving too many control connections; try again\",\"services\":[]}\n";

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

/// What a control connection needs of the daemon.
pub(super) struct Ctx<'a> {
    pub engine: &'a Engine,
    pub audit: &'a Arc<Audit>,
    pub group: Option<u32>,
    pub config_path: &'a Path,
    pub config: &'a Config,
    pub fleet: Option<&'a Fleet>,
    /// `switcher flows`, and the flow table's size for `status`.
    pub flows: &'a Lister,
}

/// Answers one connection: one request line, one answer line.
pub(super) async fn serve(stream: UnixStream, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let peer = stream.peer_cred().map(|c| Peer { uid: c.uid(), gid: c.gid(), pid: c.pid() }).ok();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(protocol::MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::time::timeout(protocol::TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => Response::error("timed out waiting for a request"),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() > protocol::MAX_REQUEST => {
            Response::error(format!("request larger than {} bytes", protocol::MAX_REQUEST))
        }
        Ok(Ok(_)) => match protocol::parse_request_line(line.trim_ascii()) {
            Err(msg) => Response::error(msg),
            Ok((_, Some(deadline))) if deadline.passed() => protocol::too_late(),
            Ok((req, deadline)) => {
                let changes = !matches!(
                    req,
                    Request::Status { .. } | Request::Fleet | Request::FleetWait { .. } | Request::Flows(_)
                );
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
    tokio::time::timeout(protocol::TIMEOUT, write.write_all(&out)).await??;
    Ok(())
}

/// Answers one request of a peer allowed to make it, unless its `deadline` passes first.
async fn answer(ctx: &Ctx<'_>, req: Request, who: &str, deadline: Option<protocol::Deadline>) -> Response {
    let late = || deadline.is_some_and(protocol::Deadline::passed);
    let names = async || {
        ctx.engine.call(|b| b.services().into_iter().map(|s| s.name).collect::<Vec<_>>()).await.unwrap_or_default()
    };
    let fleet_change = match &req {
        Request::Cutover { .. } | Request::Rollback { .. } | Request::Weight { .. } | Request::Shadow { .. } => true,
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
            let wait = Duration::from_millis(wait_ms).min(protocol::FLEET_WAIT_MAX);
            f.view_after(&names().await, after, wait).await
        }
        (Request::Fleet | Request::FleetWait { .. }, None) => Response::error(
            "this daemon is not part of a fleet: add a [fleet] section (etcd endpoints, node name) to its config",
        ),
        (_, _) if late() => protocol::too_late(),
        (Request::Flows(query), _) => super::flows::answer(ctx.engine, ctx.flows, query, deadline).await,
        (req @ (Request::Rollout { .. } | Request::RolloutControl { .. } | Request::Drill { .. }), Some(f)) => {
            let (resp, change) = f.rollout(ctx.engine, req, who).await;
            if let Some(c) = change {
                ctx.audit.record(who, &c);
            }
            resp
        }
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
            let (audit, who) = (Arc::clone(ctx.audit), who.to_owned());
            let handled = ctx
                .engine
                .call(move |b| {
                    if deadline.is_some_and(protocol::Deadline::passed) {
                        return protocol::too_late();
                    }
                    let (resp, change) = b.handle(req);
                    // Recorded on the engine's thread, as it is applied: concurrent operators'
                    // changes reach the audit log in the order they took effect.
                    if let Some(c) = change {
                        audit.record(&who, &c);
                    }
                    resp
                })
                .await;
            let mut resp = match handled {
                Ok(resp) => resp,
                Err(e) => Response::error(e.to_string()),
            };
            if status && let Some(t) = resp.flow_table {
                let t = t.with_capacity(ctx.flows.capacity);
                resp.warnings.extend(t.warning());
                resp.flow_table = Some(t);
            }
            if status && let Some(f) = fleet {
                resp.fleet = Some(f.local_view(&names().await));
                // A fleet's rollout (and the backup it keeps) is the fleet's: every node shows it.
                f.show_rollouts(&mut resp.services);
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::agent::temp_dir;

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
}
