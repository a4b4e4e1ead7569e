//! `switcher shadow`: copy a share of a UDP service's new flows to the idle colour.

use std::{fmt::Write as _, path::Path};

use switcher_user::{
    protocol::{Request, ShadowStatus},
    shadow::{parse_share, share_words},
};

/// Copy a share of a UDP service's new flows to the idle colour (shadow traffic).
///
/// Every datagram of a shadowed flow (chosen by flow hash: a flow is always or never
/// shadowed) still goes to its live backend unchanged, and a copy goes to the backend the idle
/// colour would give that flow. The idle colour's replies are dropped at the load balancer and
/// counted; `switcher status` shows, per colour, the copies sent, held back by the ceiling or
/// failed, the replies dropped, and each colour's reply latency on the same requests. The
/// copies always go to the idle colour: a cut-over flips the target. TCP services are
/// refused: the idle colour's stack would choose its own sequence numbers, so the client's
/// ACKs mean nothing to it (and TLS breaks). Without SHARE, shows the current setting.
///
/// Example: switcher shadow dns 10%   (then `switcher status dns`; `switcher shadow dns off`)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name, as in the config's [[service]] table.
    service: String,
    /// Share of new flows to copy, e.g. 10% or 0.5%, or `off`.
    #[arg(value_parser = parse_share)]
    share: Option<u32>,
    /// At most this many copies per second for the service (default: its `shadow_ceiling`,
    /// 10000): protects the idle colour and the node; copies over it are counted, not made.
    #[arg(long, value_name = "PER_SECOND", value_parser = clap::value_parser!(u32).range(1..))]
    ceiling: Option<u32>,
    #[command(flatten)]
    scope: super::fleet::ScopeArgs,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let Some(share_bp) = args.share else {
        let resp = super::ask(socket, &Request::Status { service: Some(args.service.clone()) })?;
        let s = resp.services.first().ok_or_else(|| anyhow::anyhow!("no status for {}", args.service))?;
        match &s.shadow {
            Some(sh) => print!("{}", describe(sh)),
            None => println!("{}: shadow traffic off", s.name),
        }
        return Ok(());
    };
    let resp = super::ask(
        socket,
        &Request::Shadow { service: args.service, share_bp, ceiling: args.ceiling, scope: args.scope.scope() },
    )?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}

/// The lines `status` prints for a service's shadow traffic.
pub fn describe(sh: &ShadowStatus) -> String {
    let mut out = String::new();
    if sh.share_bp == 0 {
        let _ = writeln!(out, "  shadow: off (its counters so far:)");
    } else {
        let _ = writeln!(
            out,
            "  shadow: {} of new flows copied to {} (at most {}/s); idle replies dropped",
            share_words(sh.share_bp),
            sh.target,
            sh.ceiling
        );
    }
    for c in &sh.colours {
        let latency = c.mean_latency_us().map_or_else(|| "-".to_owned(), |us| format!("{us:.0}µs"));
        let _ = writeln!(
            out,
            "    {:<5}  served {}  copies: sent {}, over ceiling {}, failed {}  replies dropped {}  reply latency {latency} ({} timed)",
            c.colour.as_str(),
            c.shadowed,
            c.sent,
            c.over_ceiling,
            c.failed,
            c.replies_dropped,
            c.latency_count
        );
    }
    out
}
