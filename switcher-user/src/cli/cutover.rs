//! `switcher cutover`: make a colour live.

use std::{
    io::IsTerminal as _,
    path::Path,
    time::{Duration, Instant},
};

use switcher_user::{
    emergency::Action,
    protocol::{Request, Response},
};

/// Send new flows of a service to a colour (default: the idle one).
///
/// One BPF map write: the next new connection goes to the new colour. Connections already
/// open stay on the old colour while they drain: until they end, or until the drain timeout
/// (`--drain-timeout`, else the service's `drain_timeout_secs`), when they are moved or reset
/// as the service's `on_drain_timeout` says. `--wait` follows the drain with a progress bar.
/// Roll back with `switcher rollback SERVICE`.
///
/// In a fleet (a `[fleet]` section in the daemon's config) it changes the desired state in
/// etcd, which every node applies; `--wait` then shows each node applying it and draining.
///
/// When no daemon runs, it writes the pinned maps directly (the emergency path), never
/// behind a running daemon (a wrong --socket is refused, naming the daemon), and only to a
/// colour whose pool is pinned. In a fleet that needs --local: the restarted daemon keeps
/// the change until the fleet's desired state of the service changes.
///
/// Example: switcher cutover web green --drain-timeout 30 --wait
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name, as in the config's [[service]] table.
    service: String,
    /// Colour to make active: blue or green. Default: the one that is idle now.
    #[arg(value_parser = ["blue", "green"])]
    colour: Option<String>,
    /// Seconds the old colour's open flows may take to finish.
    #[arg(long, value_name = "SECS")]
    drain_timeout: Option<u64>,
    /// Wait, showing progress, until the old colour has no open flows or the drain times out.
    #[arg(long)]
    wait: bool,
    /// Cut over even when the colour fails its health checks.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    scope: super::fleet::ScopeArgs,
}

pub fn run(socket: &Path, config: &Path, args: Args) -> anyhow::Result<()> {
    let colour = args.colour.as_deref().map(super::colour).transpose()?;
    let req = Request::Cutover {
        service: args.service.clone(),
        colour,
        drain_timeout_secs: args.drain_timeout,
        force: args.force,
        scope: args.scope.scope(),
    };
    let Some(resp) = super::ask_or_emergency(socket, config, &req, &args.service, Action::Cutover(colour))? else {
        return Ok(());
    };
    if let Some(m) = resp.message {
        println!("{m}");
    }
    if args.wait {
        match resp.revision {
            Some(rev) => super::fleet::wait(socket, &args.service, rev)?,
            None => wait_for_drain(socket, &args.service)?,
        }
    }
    Ok(())
}

/// Polls the daemon until the service has no drain in progress, with a progress bar on stderr
/// (on a terminal; in a log, a line each time the count changes).
pub fn wait_for_drain(socket: &Path, service: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    // Hidden when stderr is not a terminal: the log gets plain lines instead.
    let bar = super::progress_bar("draining {prefix}: [{bar:30}] {msg}");
    let mut last_live = None;
    // The last drain seen: whether it ended by its timeout, with flows left.
    let mut last: Option<switcher_user::protocol::Drain> = None;
    loop {
        let resp: Response = super::ask(socket, &Request::Status { service: Some(service.to_owned()) })?;
        let Some(drain) = resp.services.first().and_then(|s| s.drain.clone()) else {
            bar.finish_and_clear();
            let took = started.elapsed().as_secs_f64();
            match last {
                Some(d) if d.live_flows > 0 && d.timeout_secs.is_some_and(|t| d.elapsed_secs + 1 >= t) => eprintln!(
                    "{service}: the drain timed out after {}s with {} open flows on {} (as last seen): they were handled by `{}`",
                    d.timeout_secs.unwrap_or(0),
                    d.live_flows,
                    d.colour,
                    d.on_timeout
                ),
                _ => eprintln!("{service}: drained in {took:.1}s"),
            }
            return Ok(());
        };
        let total = drain.initial_flows.max(drain.live_flows).max(1);
        let timeout = drain.timeout_secs.map_or_else(String::new, |t| format!("/{t}s, then {}", drain.on_timeout));
        bar.set_length(total);
        bar.set_position(total - drain.live_flows.min(total));
        bar.set_prefix(drain.colour.to_string());
        let left =
            format!("{} of {} flows left  {}s{timeout}", drain.live_flows, drain.initial_flows, drain.elapsed_secs);
        if !tty && last_live != Some(drain.live_flows) {
            eprintln!("draining {}: {left}", drain.colour);
        }
        bar.set_message(left);
        last_live = Some(drain.live_flows);
        last = Some(drain);
        std::thread::sleep(Duration::from_millis(500));
    }
}
