//! `switcher status`: what is live, and the traffic each colour has had.

use std::{fmt::Write as _, path::Path};

use switcher_user::protocol::{Request, Response};

/// Show the active colour, backends and per-colour counters of services.
///
/// Counters are since the daemon started: packets and bytes from clients, replies, and the
/// flows each colour was given. `--json` prints the daemon's answer as is.
///
/// Example: switcher status web --json
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this service.
    service: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let resp = super::ask(socket, &Request::Status { service: args.service })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else {
        print!("{}", render(&resp));
    }
    Ok(())
}

fn render(resp: &Response) -> String {
    let mut out = String::new();
    if let Some(f) = &resp.fleet {
        if f.connected {
            let _ = writeln!(out, "fleet: node {}, etcd {} connected", f.node, f.endpoints.join(","));
        } else {
            let _ = writeln!(
                out,
                "fleet: node {}, etcd {} UNREACHABLE for {}s ({}): forwarding with the last applied state",
                f.node,
                f.endpoints.join(","),
                f.since_secs,
                f.error.as_deref().unwrap_or("?")
            );
        }
        for s in &f.services {
            let state = match (&s.local_override, s.applied_revision >= s.revision && s.revision > 0) {
                (Some(why), _) => format!("LOCAL OVERRIDE: {why}"),
                (None, true) => "in step".to_owned(),
                (None, false) => "not applied yet".to_owned(),
            };
            let _ = writeln!(
                out,
                "  {}: desired {} at revision {}, applied {}: {state}",
                s.name,
                s.desired.as_ref().map_or("?", |d| d.active.as_str()),
                s.revision,
                s.applied_revision
            );
        }
    }
    if resp.services.is_empty() {
        out.push_str("no services configured\n");
    }
    for s in &resp.services {
        let vip = if s.vip.contains(':') { format!("[{}]", s.vip) } else { s.vip.clone() };
        let _ = write!(
            out,
            "{}  {vip}:{}/{}  {}  active: {}",
            s.name,
            s.port,
            s.protocol,
            s.mode,
            s.active.as_str().to_uppercase()
        );
        if let Some(c) = &s.canary {
            let _ = write!(out, "  canary: {} {}", c.colour, percent(c.basis_points));
        }
        if let (Some(prev), Some(ago)) = (&s.previous, s.since_switch_secs) {
            // Switches the daemon made by itself are named: an operator reading this after a
            // failover should not have to guess.
            let k = s.switch_kinds;
            let by_itself: Vec<String> = [(k.failover, "failover"), (k.auto_rollback, "automatic rollback")]
                .into_iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, what)| format!("{n} {what}{}", if n == 1 { "" } else { "s" }))
                .collect();
            let by_itself = if by_itself.is_empty() { String::new() } else { format!(": {}", by_itself.join(", ")) };
            let _ = write!(out, "  (was {prev}, switched {ago}s ago, {} switches{by_itself})", s.switches);
        }
        out.push('\n');
        if let Some(w) = s.watch_secs_left {
            let _ =
                writeln!(out, "  watching {} for {w}s more: it is rolled back if it fails its health checks", s.active);
        }
        if let Some(r) = &s.rollout {
            out.push_str(&super::rollout::describe(r));
        }
        if let Some(b) = &s.backup {
            let _ = writeln!(
                out,
                "  backup: {} for {}s more (`switcher rollback {}` goes back to it)",
                b.colour, b.secs_left, s.name
            );
        }
        if let Some(sh) = &s.shadow {
            out.push_str(&super::shadow::describe(sh));
        }
        if let Some(p) = s.preview_port {
            let idle = s.active.other();
            let _ = writeln!(out, "  preview: port {p} → {idle}");
        }
        if let Some(d) = &s.drain {
            let timeout = d
                .timeout_secs
                .map_or_else(|| "no timeout".to_owned(), |t| format!("timeout {t}s, then {}", d.on_timeout));
            let idle = if d.idle_flows > 0 { format!(", {} idle not counted", d.idle_flows) } else { String::new() };
            let _ = writeln!(
                out,
                "  draining {}: {} of {} open flows left after {}s ({timeout}{idle})",
                d.colour, d.live_flows, d.initial_flows, d.elapsed_secs
            );
            if !d.elsewhere.is_empty() {
                let nodes: Vec<String> = d
                    .elsewhere
                    .iter()
                    .map(
                        |(n, f)| if *f == 0 { format!("{n} has not applied it yet") } else { format!("{n} holds {f}") },
                    )
                    .collect();
                let _ = writeln!(out, "    still draining on other nodes: {}", nodes.join(", "));
            }
        }
        for c in &s.colours {
            let mark = if c.colour == s.active { "*" } else { " " };
            let k = &c.counters;
            let _ = writeln!(
                out,
                "  {mark} {:<5}  open flows {:>6}  closing {:>5}  flows {:>8}  packets {:>10}  bytes {:>12}  replies {:>10}{}",
                c.colour.as_str(),
                c.live_flows,
                c.closing_flows,
                k.flows,
                k.packets,
                k.bytes,
                k.reply_packets,
                if c.healthy || c.backends.is_empty() { "" } else { "  UNHEALTHY" }
            );
            if let Some(line) = signals_line(s.mode, k) {
                let _ = writeln!(out, "          {line}");
            }
            if c.backends.is_empty() {
                out.push_str("          (no backends)\n");
            }
            if c.edited {
                out.push_str("          (pool changed at runtime: differs from the config file; a reload keeps it)\n");
            }
            for b in &c.backends {
                let detail = b.detail.as_deref().unwrap_or(b.health.as_str());
                let _ = writeln!(out, "          {}  weight {}  {detail}", b.address, b.weight);
            }
        }
    }
    match (resp.flows_counted_ms_ago, resp.flows_count_took_ms) {
        (Some(ago), Some(took)) => {
            let _ = writeln!(out, "open flows as counted {ago} ms ago (a pass over the flow table took {took} ms)");
        }
        (Some(ago), None) => {
            let _ = writeln!(out, "open flows as counted {ago} ms ago");
        }
        _ if !resp.services.is_empty() => {
            out.push_str("open flows not counted yet (the first pass over the flow table is under way)\n");
        }
        _ => {}
    }
    if let Some(t) = &resp.flow_table
        && let (Some(cap), Some(bp)) = (t.capacity, t.fill_bp)
    {
        let _ = writeln!(
            out,
            "flow table: {} of {cap} entries hold open flows ({}; {} live, {} closing, {} idle)",
            t.open(),
            percent(bp),
            t.live,
            t.closing,
            t.idle
        );
    }
    for w in &resp.warnings {
        let _ = writeln!(out, "WARNING: {w}");
    }
    out
}

/// A colour's TCP signals from the data path, in one line (`None` before any).
fn signals_line(mode: switcher_user::protocol::Mode, k: &switcher_user::protocol::Counters) -> Option<String> {
    use switcher_user::engine::signals::{Signals, bucket_words};
    if k.syns == 0 && k.client_resets == 0 && k.backend_resets == 0 && k.icmp_unreachables == 0 {
        return None;
    }
    let s = Signals::between(&switcher_user::protocol::Counters::default(), k);
    if mode == switcher_user::protocol::Mode::Dsr {
        return Some(format!(
            "tcp: {} SYNs, {} SYN retransmissions, {} client resets (DSR: the backends' answers are not seen)",
            s.syns, s.retransmits, s.client_resets
        ));
    }
    let p90 = s.latency_bucket(900).map_or_else(String::new, |b| format!(" (90% answered in {})", bucket_words(b)));
    Some(format!(
        "tcp: {} SYNs, {} handshakes{p90}, {} refused, {} unanswered or in flight, {} backend resets, {} ICMP unreachables, {} client resets",
        s.syns,
        s.handshakes,
        s.refused,
        s.unanswered(),
        s.backend_resets,
        s.unreachables,
        s.client_resets
    ))
}

/// `12.5%` for 1250 basis points.
fn percent(bp: u32) -> String {
    switcher_user::protocol::percent(bp)
}

#[cfg(test)]
mod tests {
    use switcher_user::protocol::{
        BackendStatus, Colour, ColourStatus, Counters, Drain, Health, Mode, OnTimeout, Protocol, ServiceStatus,
    };

    use super::*;

    #[test]
    fn status_marks_the_active_colour() {
        let colour = |c: Colour, b: Option<&str>, flows| ColourStatus {
            colour: c,
            backends: b
                .map(|a| BackendStatus { address: a.into(), weight: 1, health: Health::Unknown, detail: None })
                .into_iter()
                .collect(),
            healthy: true,
            live_flows: 4,
            closing_flows: 0,
            counters: Counters { flows, ..Counters::default() },
            edited: false,
        };
        let resp = Response {
            ok: true,
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "203.0.113.10".into(),
                port: 80,
                preview_port: Some(8080),
                protocol: Protocol::Tcp,
                mode: Mode::Nat,
                active: Colour::Green,
                canary: None,
                previous: Some(Colour::Blue),
                switches: 1,
                switch_kinds: switcher_user::protocol::SwitchKinds { cutover: 1, ..Default::default() },
                since_switch_secs: Some(3),
                watch_secs_left: None,
                drain: Some(Drain {
                    colour: Colour::Blue,
                    live_flows: 4,
                    initial_flows: 9,
                    elapsed_secs: 2,
                    timeout_secs: Some(30),
                    on_timeout: OnTimeout::Move,
                    elsewhere: vec![("lb1".into(), 8)],
                    idle_flows: 0,
                }),
                rollout: None,
                backup: None,
                shadow: None,
                colours: vec![colour(Colour::Blue, Some("198.51.100.2:8080"), 7), colour(Colour::Green, None, 2)],
            }],
            flows_counted_ms_ago: Some(420),
            flows_count_took_ms: Some(35),
            ..Response::default()
        };
        let text = render(&resp);
        assert!(
            text.starts_with("web  203.0.113.10:80/tcp  nat  active: GREEN  (was blue, switched 3s ago, 1 switches)\n"),
            "{text}"
        );
        assert!(text.contains("  preview: port 8080 → blue\n"), "{text}");
        assert!(text.contains("  draining blue: 4 of 9 open flows left after 2s (timeout 30s, then move)\n"), "{text}");
        assert!(text.contains("    still draining on other nodes: lb1 holds 8\n"), "{text}");
        assert!(text.contains("    blue   open flows      4"), "{text}");
        assert!(text.contains("          198.51.100.2:8080  weight 1  unknown\n"), "{text}");
        assert!(text.contains("  * green"), "{text}");
        assert!(text.contains("(no backends)"), "{text}");
        assert!(!text.contains("tcp:"), "no signals before any SYN: {text}");
        let mut signalled = resp.clone();
        signalled.services[0].colours[1].counters = Counters {
            syns: 10,
            handshakes: 7,
            refused: 2,
            backend_resets: 2,
            syn_latency: [6, 1, 0, 0, 0],
            ..Counters::default()
        };
        let text = render(&signalled);
        assert!(
            text.contains("          tcp: 10 SYNs, 7 handshakes (90% answered in < 1 ms), 2 refused, 1 unanswered or in flight, 2 backend resets, 0 ICMP unreachables, 0 client resets\n"),
            "{text}"
        );
        assert!(text.ends_with("open flows as counted 420 ms ago (a pass over the flow table took 35 ms)\n"), "{text}");
        assert!(!text.contains("flow table:"), "no capacity, no fill: {text}");
        let table = switcher_user::protocol::FlowTable { live: 880, closing: 10, idle: 10, ..Default::default() };
        let t = table.with_capacity(1000);
        let full = Response { flow_table: Some(t), warnings: t.warning().into_iter().collect(), ..resp.clone() };
        let text = render(&full);
        assert!(
            text.contains("flow table: 900 of 1000 entries hold open flows (90%; 880 live, 10 closing, 10 idle)\n"),
            "{text}"
        );
        assert!(text.contains("WARNING: the flow table is 90% full"), "{text}");
        let t = table.with_capacity(10_000);
        assert!(t.warning().is_none());
        let calm = Response { flow_table: Some(t), ..resp };
        let text = render(&calm);
        assert!(text.contains("(9%;") && !text.contains("WARNING"), "{text}");
    }
}
