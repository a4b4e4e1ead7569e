//! `switcher flows`: the open flows, filtered, or their counts per service, colour and backend.

use std::{fmt::Write as _, path::Path};

use switcher_user::{
    flowlist::{BackendMatch, Cidr},
    protocol::{self, FlowListing, FlowQuery, FlowSource, FlowState, FlowStop, Request, flows::FLOWS_DEFAULT_LIMIT},
};

/// List the open flows: client, VIP, service, colour, backend, state and idle time.
///
/// Answers "who is still on the old colour, and on which backend?" during a drain: filter by
/// service, colour, backend, client network or state, or count with --summary (per service,
/// colour and backend). Filters combine: a flow is shown when it matches all of them.
///
/// The daemon walks its flow table in batches on a thread apart from its engine, so a listing
/// never holds up the data path, cut-overs or `status`; it stops at --limit (default 1000
/// flows) and after at most 3 s, and says when the answer is partial. With no daemon running,
/// the pinned flow table is read directly (read-only).
///
/// IDLE is the time since the flow's last packet, to the second: the flow table records when
/// a flow was last seen, not when it began, and keeps no per-flow packet or byte counts
/// (counting them would cost every packet a write to its flow entry): traffic is counted per
/// colour, in `switcher status` and the metrics. Flows that are over (a UDP flow idle past
/// udp_idle_timeout_secs, a TCP flow closed for over 10 s) are not shown.
///
/// Example: switcher flows web --colour blue --summary
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this service's flows.
    service: Option<String>,
    /// Only flows on this colour.
    #[arg(long, value_parser = ["blue", "green"])]
    colour: Option<String>,
    /// Only flows on this backend: ADDR (any port) or ADDR:PORT, e.g. 198.51.100.2:8080 or
    /// [2001:db8::2]:8080.
    #[arg(long, value_name = "ADDR")]
    backend: Option<BackendMatch>,
    /// Only flows from clients in this network (ADDR/LEN, e.g. 192.0.2.0/24), or from one
    /// address.
    #[arg(long, value_name = "CIDR")]
    client: Option<Cidr>,
    /// Only open flows, or only closing ones (TCP flows that saw FIN or RST).
    #[arg(long, value_parser = ["open", "closing"])]
    state: Option<String>,
    /// Stop after N matching flows (default 1000 for a list, at most 20000; --summary
    /// counts every flow unless given one).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Count the matching flows per service, colour and backend instead of listing them.
    #[arg(long)]
    summary: bool,
    /// Machine-readable output: the listing as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, config: &Path, args: Args) -> anyhow::Result<()> {
    let query = FlowQuery {
        service: args.service,
        colour: args.colour.as_deref().map(super::colour).transpose()?,
        backend: args.backend.map(|b| b.to_string()),
        client: args.client.map(|c| c.to_string()),
        state: args.state.as_deref().map(str::parse::<FlowState>).transpose().map_err(|e| anyhow::anyhow!(e))?,
        limit: args.limit,
        summary: args.summary,
    };
    let listing = match protocol::request(socket, &Request::Flows(query.clone())) {
        Ok(resp) if resp.ok => resp.flows.ok_or_else(|| {
            anyhow::anyhow!("the daemon answered without flows: it is older than this client; upgrade it")
        })?,
        Ok(resp) => anyhow::bail!("{}", resp.error.unwrap_or_else(|| "the daemon refused without saying why".into())),
        Err(protocol::ClientError::NotRunning { .. }) => {
            let cfg = switcher_user::config::Config::load(config).map_err(|e| {
                anyhow::anyhow!(
                    "nothing answers on {}, and reading the pinned flow table needs the daemon's config: {e}",
                    socket.display()
                )
            })?;
            switcher_user::flowlist::from_pins(&cfg, &query).map_err(|e| {
                anyhow::anyhow!(
                    "the daemon is not running; reading the pinned flow table: {}",
                    switcher_user::engine::chain(&e)
                )
            })?
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", if query.summary { render_summary(&listing) } else { render(&listing) });
    }
    Ok(())
}

/// `3s`, `2m05s`, `1h02m`.
fn idle(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn render(l: &FlowListing) -> String {
    let mut out = String::new();
    if !l.flows.is_empty() {
        let w = |f: fn(&protocol::FlowEntry) -> usize, min| l.flows.iter().map(f).max().unwrap_or(0).max(min);
        let (wc, wv, ws, wb) =
            (w(|f| f.client.len(), 6), w(|f| f.vip.len() + 4, 3), w(|f| f.service.len(), 7), w(|f| f.backend.len(), 7));
        let _ = writeln!(
            out,
            "{:<wc$}  {:<wv$}  {:<ws$}  COLOUR  {:<wb$}  STATE    IDLE",
            "CLIENT", "VIP", "SERVICE", "BACKEND"
        );
        for f in &l.flows {
            let _ = writeln!(
                out,
                "{:<wc$}  {:<wv$}  {:<ws$}  {:<6}  {:<wb$}  {:<7}  {}",
                f.client,
                format!("{}/{}", f.vip, f.protocol),
                f.service,
                f.colour.as_str(),
                f.backend,
                f.state,
                idle(f.idle_ms)
            );
        }
    }
    let _ = writeln!(out, "{} flows{}", l.matched, footer(l));
    out
}

fn render_summary(l: &FlowListing) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < l.summary.len() {
        let (service, colour) = (&l.summary[i].service, l.summary[i].colour);
        let run: Vec<_> = l.summary[i..].iter().take_while(|g| &g.service == service && g.colour == colour).collect();
        let (open, closing) = run.iter().fold((0, 0), |(o, c), g| (o + g.open, c + g.closing));
        let _ = writeln!(out, "{service}  {:<5}  open {open:>7}  closing {closing:>6}", colour.as_str());
        let wb = run.iter().map(|g| g.backend.len()).max().unwrap_or(0);
        for g in &run {
            let _ = writeln!(out, "    {:<wb$}  open {:>7}  closing {:>6}", g.backend, g.open, g.closing);
        }
        i += run.len();
    }
    let _ = writeln!(out, "{} flows counted{}", l.matched, footer(l));
    out
}

/// What was walked, how long it took, whether the answer is partial, and who read the table.
fn footer(l: &FlowListing) -> String {
    let mut out = format!(" ({} entries of the flow table read in {} ms", l.walked, l.took_ms);
    if let Some(cap) = l.capacity {
        let _ = write!(out, "; it holds at most {cap}");
    }
    out.push(')');
    match l.stopped {
        Some(FlowStop::Limit) if l.summary.is_empty() && l.flows.len() as u64 == l.matched => {
            let limit = if l.matched == FLOWS_DEFAULT_LIMIT { " (the default)" } else { "" };
            let _ = write!(
                out,
                "\nstopped at --limit {}{limit}: more flows may match; raise --limit, narrow the filters, or count them all with --summary",
                l.matched
            );
        }
        Some(FlowStop::Limit) => out.push_str("\nstopped at the limit: more flows may match, not counted here"),
        Some(FlowStop::Deadline) => out.push_str(
            "\nstopped at the walk's deadline: this is part of the table only; narrow the filters, or try again",
        ),
        None => {}
    }
    if l.source == FlowSource::Pins {
        out.push_str("\n(the daemon is not running: read from the pinned flow table)");
    }
    out
}

#[cfg(test)]
mod tests {
    use switcher_user::protocol::{Colour, FlowEntry, FlowGroup, Protocol};

    use super::*;

    #[test]
    fn flows_are_shown_in_columns_with_what_is_partial() {
        let entry = |client: &str, colour, backend: &str, state, idle_ms| FlowEntry {
            client: client.into(),
            vip: "203.0.113.10:80".into(),
            protocol: Protocol::Tcp,
            service: "web".into(),
            backend: backend.into(),
            colour,
            state,
            idle_ms,
        };
        let l = FlowListing {
            flows: vec![
                entry("192.0.2.1:40001", Colour::Blue, "198.51.100.2:8080", FlowState::Open, 3_200),
                entry("[2001:db8::7]:40005", Colour::Green, "198.51.100.4:8080", FlowState::Closing, 125_000),
            ],
            matched: 2,
            walked: 40,
            stopped: Some(FlowStop::Limit),
            took_ms: 1,
            capacity: Some(1024),
            source: FlowSource::Pins,
            ..FlowListing::default()
        };
        let text = render(&l);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLIENT               VIP                  SERVICE  COLOUR  BACKEND"), "{text}");
        assert!(
            lines[1]
                .contains("192.0.2.1:40001      203.0.113.10:80/tcp  web      blue    198.51.100.2:8080  open     3s"),
            "{text}"
        );
        assert!(lines[2].contains("green   198.51.100.4:8080  closing  2m05s"), "{text}");
        assert!(text.contains("2 flows (40 entries of the flow table read in 1 ms; it holds at most 1024)"), "{text}");
        assert!(text.contains("stopped at --limit 2: more flows may match"), "{text}");
        assert!(text.contains("read from the pinned flow table"), "{text}");
        assert_eq!(idle(7_300_000), "2h01m");
    }

    #[test]
    fn the_summary_totals_each_colour_above_its_backends() {
        let g = |service: &str, colour, backend: &str, open, closing| FlowGroup {
            service: service.into(),
            colour,
            backend: backend.into(),
            open,
            closing,
        };
        let l = FlowListing {
            summary: vec![
                g("web", Colour::Blue, "198.51.100.2:8080", 3, 1),
                g("web", Colour::Blue, "198.51.100.3:8080", 2, 0),
                g("web", Colour::Green, "198.51.100.4:8080", 7, 0),
            ],
            matched: 13,
            walked: 20,
            ..FlowListing::default()
        };
        let text = render_summary(&l);
        assert_eq!(
            text,
            "web  blue   open       5  closing      1\n    198.51.100.2:8080  open       3  closing      1\n    198.51.100.3:8080  open       2  closing      0\nweb  green  open       7  closing      0\n    198.51.100.4:8080  open       7  closing      0\n13 flows counted (20 entries of the flow table read in 0 ms)\n"
        );
    }
}
