//! `switcher status`: what is live, and the traffic each colour has had.

use std::{fmt::Write as _, path::Path};

use switcher_user::control::{Request, Response};

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
    if resp.services.is_empty() {
        out.push_str("no services configured\n");
    }
    for s in &resp.services {
        let _ = write!(out, "{}  {}:{}/{}  active: {}", s.name, s.vip, s.port, s.protocol, s.active.to_uppercase());
        if let (Some(prev), Some(ago)) = (&s.previous, s.since_switch_secs) {
            let _ = write!(out, "  (was {prev}, switched {ago}s ago, {} switches)", s.switches);
        }
        out.push('\n');
        for c in &s.colours {
            let mark = if c.colour == s.active { "*" } else { " " };
            let backend = c.backend.as_deref().unwrap_or("-");
            let k = &c.counters;
            let _ = writeln!(
                out,
                "  {mark} {:<5} {:<21} flows {:>8}  packets {:>10}  bytes {:>12}  replies {:>10}",
                c.colour, backend, k.flows, k.packets, k.bytes, k.reply_packets
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use switcher_user::{
        control::{ColourStatus, ServiceStatus},
        dataplane::Counters,
    };

    use super::*;

    #[test]
    fn status_marks_the_active_colour() {
        let colour = |c: &str, b: Option<&str>, flows| ColourStatus {
            colour: c.into(),
            backend: b.map(Into::into),
            counters: Counters { flows, ..Counters::default() },
        };
        let resp = Response {
            ok: true,
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "203.0.113.10".into(),
                port: 80,
                protocol: "tcp".into(),
                active: "green".into(),
                previous: Some("blue".into()),
                switches: 1,
                since_switch_secs: Some(3),
                colours: vec![colour("blue", Some("198.51.100.2:8080"), 7), colour("green", None, 2)],
            }],
            ..Response::default()
        };
        let text = render(&resp);
        assert!(
            text.starts_with("web  203.0.113.10:80/tcp  active: GREEN  (was blue, switched 3s ago, 1 switches)\n"),
            "{text}"
        );
        assert!(text.contains("    blue  198.51.100.2:8080     flows        7"), "{text}");
        assert!(text.contains("  * green -"), "{text}");
    }
}
