//! `switcher fleet status`, and what the change verbs share in fleet mode: `--local`,
//! `--if-revision` and waiting for every node to converge.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use switcher_user::{
    fleet::{Agreement, agreement},
    protocol::{FleetView, Request, Response, Scope, percent},
};

/// How long `--wait` waits for every node to apply a fleet-wide change.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of the change verbs in fleet mode (a daemon with a `[fleet]` section).
#[derive(Debug, Default, clap::Args)]
pub struct ScopeArgs {
    /// Fleet mode: change this node only, not the fleet's desired state in etcd. It holds
    /// until the desired state of the service changes. (Without a fleet, every change is local.)
    #[arg(long)]
    local: bool,
    /// Fleet mode: write only if the desired state is still at this revision (as
    /// `switcher fleet status` showed it), so that a change made by someone else in between
    /// is not silently overwritten.
    #[arg(long, value_name = "REV", conflicts_with = "local")]
    if_revision: Option<i64>,
}

impl ScopeArgs {
    pub fn scope(&self) -> Scope {
        Scope { local: self.local, if_revision: self.if_revision }
    }
}

/// The fleet of load-balancer nodes that share one desired state in etcd.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Every node side by side: the desired state of each service (with its revision), what
    /// each node applied, its open and draining flows and its health view. A node that has
    /// not applied the latest revision is flagged LAGS; one that does something else (a local
    /// change, a health-check failover) DISAGREES.
    ///
    /// Example: switcher fleet status
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Status { json } => {
            let resp = switcher_user::protocol::request(socket, &Request::Fleet)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&resp)?);
            } else if let Some(view) = &resp.fleet {
                print!("{}", render(view));
            }
            if !resp.ok {
                anyhow::bail!("{}", resp.error.unwrap_or_else(|| "the daemon refused without saying why".into()));
            }
            Ok(())
        }
    }
}

fn flag(a: Agreement) -> &'static str {
    match a {
        Agreement::InStep => "",
        Agreement::Lags => "  LAGS",
        Agreement::Disagrees => "  DISAGREES",
        Agreement::Missing => "  NOT CONFIGURED",
    }
}

/// The fleet as a table: per service, the desired state, then one line per node.
pub fn render(view: &FleetView) -> String {
    let mut out = String::new();
    let etcd = if view.connected {
        format!("connected for {}s", view.since_secs)
    } else {
        format!("UNREACHABLE for {}s ({})", view.since_secs, view.error.as_deref().unwrap_or("?"))
    };
    let _ = writeln!(
        out,
        "fleet seen from {}: etcd {} {etcd}; {} nodes alive",
        view.node,
        view.endpoints.join(","),
        view.nodes.len()
    );
    for s in &view.services {
        let Some(d) = &s.desired else {
            let _ = writeln!(out, "\n{}: no desired state in etcd yet", s.name);
            continue;
        };
        let canary = if d.canary_bp > 0 { format!(", canary {}", percent(d.canary_bp)) } else { String::new() };
        let _ = writeln!(
            out,
            "\n{}: desired {}{canary}  revision {}  ({}; by {})",
            s.name,
            d.active.as_str().to_uppercase(),
            s.revision,
            d.change,
            d.changed_by
        );
        for n in &view.nodes {
            let a = agreement(n, &s.name, d, s.revision);
            let Some(ns) = n.services.iter().find(|x| x.name == s.name) else {
                let _ = writeln!(out, "  {:<12} -{}", n.node, flag(a));
                continue;
            };
            let canary = if ns.canary_bp > 0 { format!(" +{}", percent(ns.canary_bp)) } else { String::new() };
            let drain = ns.draining.as_ref().map_or_else(String::new, |(c, f)| format!("  draining {c}: {f} flows"));
            let health = format!(
                "blue {} green {}",
                if ns.healthy_blue { "ok" } else { "DOWN" },
                if ns.healthy_green { "ok" } else { "DOWN" }
            );
            let why = ns.local_override.as_deref().map_or_else(String::new, |w| format!("  ({w})"));
            let _ = writeln!(
                out,
                "  {:<12} {:<5}{canary}  applied {:>5}  open flows {:>6}{drain}  {health}{}{why}",
                n.node,
                ns.active.as_str(),
                ns.applied_revision,
                ns.live_flows,
                flag(a)
            );
        }
    }
    out
}

/// After a fleet-wide change written at `revision`: shows each node applying it, then each
/// node's drain ending. It follows the daemon's watch on etcd: each answer comes when a node
/// published something new (or after a second without news, to redraw the progress line).
pub fn wait(socket: &Path, service: &str, revision: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut converged: BTreeMap<String, f64> = BTreeMap::new();
    let mut drained: BTreeMap<String, f64> = BTreeMap::new();
    // On a terminal a progress bar (nodes drained) is redrawn in place below the events; in a
    // log, only the events.
    let bar = super::progress_bar("{prefix}: [{bar:30}] {msg}");
    bar.set_prefix(service.to_owned());
    let mut seen = 0;
    loop {
        let req = if seen > 0 { Request::FleetWait { after: seen, wait_ms: 1000 } } else { Request::Fleet };
        let resp: Response = switcher_user::protocol::request(socket, &req)?;
        let Some(view) = resp.fleet.filter(|_| resp.ok) else {
            anyhow::bail!(
                "cannot follow the fleet: {}",
                resp.error.unwrap_or_else(|| "the daemon sent no fleet view".into())
            );
        };
        let Some(desired) = view.services.iter().find(|s| s.name == service).and_then(|s| s.desired.clone()) else {
            anyhow::bail!("{service} has no desired state in etcd");
        };
        seen = view.revision;
        let now = started.elapsed().as_secs_f64();
        let mut lagging = Vec::new();
        for n in &view.nodes {
            let Some(ns) = n.services.iter().find(|x| x.name == service) else { continue };
            let applied = ns.applied_revision >= revision && ns.active == desired.active;
            if applied && !converged.contains_key(&n.node) {
                converged.insert(n.node.clone(), now);
                bar.suspend(|| {
                    eprintln!("  {:<12} applied revision {} after {:.0} ms", n.node, ns.applied_revision, now * 1e3);
                });
            }
            if !applied {
                lagging.push(n.node.clone());
            } else if ns.draining.is_none() && !drained.contains_key(&n.node) {
                drained.insert(n.node.clone(), now);
                bar.suspend(|| eprintln!("  {:<12} drained after {now:.2}s", n.node));
            }
        }
        let total = view.nodes.len();
        if lagging.is_empty() && drained.len() >= total {
            bar.finish_and_clear();
            eprintln!("{service}: {total} nodes applied revision {revision} and drained in {now:.1}s");
            return Ok(());
        }
        if !lagging.is_empty() && started.elapsed() > CONVERGE_TIMEOUT {
            bar.finish_and_clear();
            anyhow::bail!(
                "{} of {total} nodes have not applied revision {revision} after {}s: {} (see `switcher fleet status`)",
                lagging.len(),
                CONVERGE_TIMEOUT.as_secs(),
                lagging.join(", ")
            );
        }
        // Which node still holds what: a drain ends on every node when none holds any.
        let holders: Vec<(String, u64)> = view
            .nodes
            .iter()
            .filter_map(|n| n.services.iter().find(|x| x.name == service).map(|s| (n, s)))
            .filter_map(|(n, s)| s.draining.as_ref().filter(|(_, f)| *f > 0).map(|(_, f)| (n.node.clone(), *f)))
            .collect();
        let draining: u64 = holders.iter().map(|(_, f)| f).sum();
        let held: Vec<String> = holders.iter().map(|(n, f)| format!("{n} {f}")).collect();
        bar.set_length(u64::try_from(total).unwrap_or(u64::MAX));
        bar.set_position(u64::try_from(drained.len()).unwrap_or(u64::MAX));
        bar.set_message(format!(
            "{}/{total} nodes applied, {}/{total} drained, {draining} flows draining{}  {now:.0}s",
            converged.len(),
            drained.len(),
            if held.is_empty() { String::new() } else { format!(" ({})", held.join(", ")) }
        ));
        if seen == 0 {
            // A daemon that did not say which revision it read (an older one): poll.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use switcher_user::protocol::{Colour, Desired, FleetService, NodeService, NodeState};

    use super::*;

    #[test]
    fn fleet_status_flags_lagging_and_disagreeing_nodes() {
        let node = |name: &str, active: &str, applied, over: Option<&str>| NodeState {
            node: name.into(),
            at_unix: 0,
            services: vec![NodeService {
                applied_revision: applied,
                local_override: over.map(Into::into),
                healthy_blue: true,
                healthy_green: true,
                ..NodeService::of("web", active.parse().expect("a colour"))
            }],
        };
        let view = FleetView {
            node: "lb1".into(),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            connected: true,
            since_secs: 5,
            error: None,
            services: vec![FleetService {
                name: "web".into(),
                desired: Some(Desired {
                    change: "cutover blue → green".into(),
                    changed_by: "lb1 (uid=0)".into(),
                    ..Desired::of(Colour::Green)
                }),
                revision: 9,
                applied_revision: 9,
                local_override: None,
            }],
            nodes: vec![
                node("lb1", "green", 9, None),
                node("lb2", "blue", 8, None),
                node("lb3", "blue", 9, Some("rolled back locally")),
            ],
            revision: 12,
        };
        let text = render(&view);
        assert!(text.contains("web: desired GREEN  revision 9  (cutover blue → green; by lb1 (uid=0))"), "{text}");
        let line = |n: &str| text.lines().find(|l| l.trim_start().starts_with(n)).unwrap_or_default().to_owned();
        assert!(!line("lb1").contains("LAGS") && !line("lb1").contains("DISAGREES"), "{text}");
        assert!(line("lb2").contains("LAGS"), "{text}");
        assert!(line("lb3").contains("DISAGREES") && line("lb3").contains("rolled back locally"), "{text}");
        assert!(text.contains("3 nodes alive"), "{text}");
    }
}
