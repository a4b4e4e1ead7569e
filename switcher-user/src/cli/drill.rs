//! `switcher drill`: a DR drill under live traffic, and its status and abort.

use std::path::Path;

use switcher_user::{
    protocol::{Request, RolloutAction},
    steps::{self, Step},
};

/// Rehearse a failover: send new flows to the standby colour for a while, then back.
///
/// `switcher drill SERVICE` sends new flows of SERVICE to its standby (idle) colour for
/// `--for` (30s by default), as a canary share of `--share` (100% by default), then sends them
/// back to the live colour. Open flows stay where they are. The daemon measures what clients
/// saw on the standby from the data path's per-colour counters (its new flows, and its replies
/// per new flow against the live colour's) and reports it: in `switcher drill status`,
/// `switcher status` and the audit log. A standby that stops answering during the drill ends
/// it at once. The drill is refused when the standby is unhealthy, or a rollout, another
/// drill, a canary or a drain is under way. In a fleet it is one drill for every node (its
/// record in etcd, one node drives it, every node applies the share and the switch back,
/// judged from every node's counters), also refused while the fleet keeps the backup of a
/// rollout. This command returns at once.
///
/// `switcher drill status SERVICE` follows it; `switcher drill abort SERVICE` ends it early
/// (new flows back on the live colour).
///
/// Example: switcher drill web --for 2m --share 25%
#[derive(Debug, clap::Args)]
pub struct Args {
    /// SERVICE to drill, or one of status, abort.
    #[arg(value_name = "SERVICE|ACTION")]
    first: String,
    /// With status or abort: the SERVICE.
    #[arg(value_name = "SERVICE")]
    second: Option<String>,
    /// How long new flows go to the standby: "30s", "5m", "1h" (1s to 7 days).
    #[arg(long = "for", value_name = "DURATION", default_value = "30s", value_parser = parse_for)]
    duration: u64,
    /// The share of new flows sent to the standby: "100%", "25%", "0.5%".
    #[arg(long, value_name = "PERCENT", default_value = "100%", value_parser = parse_share)]
    share: u32,
    /// With status: the daemon's answer as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_for(s: &str) -> Result<u64, String> {
    match steps::parse_step(1, &format!("pause {s}")) {
        Ok(Step::Pause(d)) => Ok(d.as_secs()),
        _ => Err(format!("{s:?} is not a duration of 1s to 7 days, e.g. 30s, 5m or 1h")),
    }
}

fn parse_share(s: &str) -> Result<u32, String> {
    match steps::parse_step(1, s) {
        Ok(Step::Share(bp)) => Ok(bp),
        _ => Err(format!("{s:?} is not a share of 0.01% to 100%, e.g. 100% or 12.5%")),
    }
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let req = match (args.first.as_str(), args.second) {
        ("status", Some(service)) => {
            let resp = super::ask(socket, &Request::Status { service: Some(service.clone()) })?;
            let r = resp.services.first().and_then(|s| s.rollout.as_ref()).filter(|r| r.drill);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if let Some(r) = r {
                print!("{service}:\n{}", super::rollout::describe(r));
            } else {
                println!("{service}: no drill since the daemon started (or a rollout came after it)");
            }
            return Ok(());
        }
        ("abort", Some(service)) => Request::RolloutControl { service, action: RolloutAction::AbortDrill },
        (service, None) => Request::Drill { service: service.to_owned(), secs: args.duration, share_bp: args.share },
        (_, Some(extra)) => anyhow::bail!(
            "unexpected {extra:?}: `switcher drill SERVICE` starts a drill; `switcher drill status|abort SERVICE` follows or ends one"
        ),
    };
    let resp = super::ask(socket, &req)?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_shares() {
        assert_eq!(parse_for("2s"), Ok(2));
        assert_eq!(parse_for("5m"), Ok(300));
        assert!(parse_for("0s").is_err());
        assert!(parse_for("soon").expect_err("words").contains("30s"));
        assert_eq!(parse_share("100%"), Ok(10_000));
        assert_eq!(parse_share("12.5%"), Ok(1_250));
        assert!(parse_share("0%").is_err());
        assert!(parse_share("101%").is_err());
    }
}
