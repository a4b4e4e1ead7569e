//! `switcher reload` and SIGHUP: the configuration file read again off the async workers
//! and applied through the engine; what needs a restart, or would undo runtime changes,
//! changes nothing.

use std::{path::Path, time::Duration};

use super::Engine;
use crate::{
    config::Config,
    fleet::Fleet,
    protocol::{self, Response},
};

/// How long a reload waits for the configuration file to be read.
const READ_CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// One reload at a time, so that an older file read last cannot be applied over a newer one.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Re-reads the config off the async workers and applies it; an unreadable or invalid file,
/// one that changes what needs a restart, or a `deadline` that passed changes nothing.
pub(super) async fn reload(
    engine: &Engine,
    path: &Path,
    running: &Config,
    fleet: Option<&Fleet>,
    deadline: Option<protocol::Deadline>,
) -> Response {
    let _one = RELOADING.lock().await;
    let new = match read_config(path).await {
        Ok(c) => c,
        Err(e) => return Response::error(format!("reload rejected, nothing changed: {e}")),
    };
    if deadline.is_some_and(protocol::Deadline::passed) {
        return protocol::too_late();
    }
    apply_config(engine, path, new, running, fleet).await
}

/// Reads and validates the config on a blocking thread, for at most [`READ_CONFIG_TIMEOUT`]
/// (a stuck read is left behind; the agent goes on).
async fn read_config(path: &Path) -> Result<Config, String> {
    let p = path.to_owned();
    match tokio::time::timeout(READ_CONFIG_TIMEOUT, tokio::task::spawn_blocking(move || Config::load_trusted(&p))).await
    {
        Ok(Ok(loaded)) => loaded.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("reading {} failed: {e}", path.display())),
        Err(_) => Err(format!(
            "reading {} took longer than {} s (a hung file system?)",
            path.display(),
            READ_CONFIG_TIMEOUT.as_secs()
        )),
    }
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
        ("max_services", new.max_services != running.max_services),
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
            let list = |v: &[String]| crate::config::short_list(v);
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
            if !done.kept_shadow.is_empty() {
                msg.push_str(&format!(
                    "; kept the shadow settings changed at runtime of {} (the file did not change them)",
                    done.kept_shadow.join(", ")
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

#[cfg(test)]
mod tests {
    use super::*;

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
            ("max_services = 100", "max_services"),
        ] {
            let new = Config::parse(Path::new("b.toml"), &format!("{line}\n{text}")).expect("valid");
            assert_eq!(restart_keys(&new, &running), [key], "{line}");
        }
    }
}
