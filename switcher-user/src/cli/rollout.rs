//! `switcher rollout`: a release in steps, judged as it goes; and its status and controls.

use std::{fmt::Write as _, path::Path};

use switcher_user::protocol::{Colour, Request, RolloutAction, RolloutStatus, percent};

/// Roll a service out to a colour in steps, each judged before the next.
///
/// `switcher rollout SERVICE COLOUR` runs the service's plan (`[service.rollout]` in the
/// config; by default 1% → pause 60s → 10% → pause 5m → 50% → pause 5m → 100%): each share
/// of new flows goes to COLOUR, each pause is judged from the data path's counters (the new
/// colour's replies per new flow against the old colour's over the same window, and its
/// health). A failing judgement aborts at once: new flows go back to the old colour, as a
/// rollback. Too few new flows to judge holds the step. Hooks configured for the service run
/// before the first step, before and after the final switch, and on abort. The daemon drives
/// the rollout (a restarted daemon resumes it at the same step); this command returns at once.
///
/// `switcher rollout status|pause|resume|promote|abort SERVICE` shows or steers it: promote
/// ends the current pause, hold or watch without waiting for its judgement; abort sends new
/// flows back to the old colour.
///
/// In a fleet (`[fleet]`), the rollout is the fleet's: its plan and progress live in etcd,
/// one node drives it (a dead driver is replaced by another node, which resumes at the same
/// step), every node applies its shares, its pauses are judged from every node's counters,
/// the old colour stays the backup on every node afterwards, and these commands work from
/// any node.
///
/// Example: switcher rollout web green --steps 5%,"pause 30s",50%,"pause 1m",100%
#[derive(Debug, clap::Args)]
pub struct Args {
    /// SERVICE to start a rollout of, or one of status, pause, resume, promote, abort.
    #[arg(value_name = "SERVICE|ACTION")]
    first: String,
    /// The COLOUR to roll out to, or the SERVICE an action is about.
    #[arg(value_name = "COLOUR|SERVICE")]
    second: String,
    /// The plan's steps instead of the config's, comma-separated: shares ("10%") and pauses
    /// ("pause 60s", "pause 5m"), ending with "100%".
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<String>>,
    /// Start even when the colour fails its health checks.
    #[arg(long)]
    force: bool,
    /// With status: the daemon's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// What the words ask for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Start { service: String, colour: Colour },
    Status(String),
    Control(String, RolloutAction),
}

fn asked(first: &str, second: &str) -> anyhow::Result<Asked> {
    let action = match first {
        "status" => return Ok(Asked::Status(second.to_owned())),
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "promote" => RolloutAction::Promote,
        "abort" => RolloutAction::Abort,
        service => {
            let colour = super::colour(second).map_err(|_| {
                anyhow::anyhow!(
                    "{second:?} is not a colour: `switcher rollout {service} green` starts a rollout; `switcher rollout status|pause|resume|promote|abort {service}` steers one"
                )
            })?;
            return Ok(Asked::Start { service: service.to_owned(), colour });
        }
    };
    Ok(Asked::Control(second.to_owned(), action))
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let req = match asked(&args.first, &args.second)? {
        Asked::Start { service, colour } => Request::Rollout { service, colour, steps: args.steps, force: args.force },
        Asked::Control(service, action) => Request::RolloutControl { service, action },
        Asked::Status(service) => {
            let resp = super::ask(socket, &Request::Status { service: Some(service.clone()) })?;
            let s = resp.services.first();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s.and_then(|s| s.rollout.as_ref()))?);
                return Ok(());
            }
            match s.and_then(|s| s.rollout.as_ref()) {
                Some(r) => print!("{service}:\n{}", describe(r)),
                None => println!("{service}: no rollout since the daemon started"),
            }
            if let Some(b) = s.and_then(|s| s.backup.as_ref()) {
                println!("  backup: {} for {}s more", b.colour, b.secs_left);
            }
            return Ok(());
        }
    };
    let resp = super::ask(socket, &req)?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}

/// A rollout in a few lines, for `status` and `rollout status`.
pub(super) fn describe(r: &RolloutStatus) -> String {
    let mut out = String::new();
    let now = r.steps.get(r.step.saturating_sub(1)).map_or("over", String::as_str);
    // An aborted rollout's share is where it stood; new flows are back on the old colour.
    let flows = if r.state == "aborted" {
        format!("stopped at {} of new flows on {}; new flows are back on {}", percent(r.share_bp), r.to, r.from)
    } else {
        format!("{} of new flows on {}", percent(r.share_bp), r.to)
    };
    // Once it ended, `step_secs` counts from the end.
    let ended = ["complete", "aborted", "interrupted", "rolled back", "superseded"].contains(&r.state.as_str());
    let when = if ended { format!("ended {}s ago", r.step_secs) } else { format!("for {}s", r.step_secs) };
    let _ = writeln!(
        out,
        "  {} {} → {}: {}, step {}/{} ({now}) {when}, {flows}",
        if r.drill { "drill" } else { "rollout" },
        r.from,
        r.to,
        r.state,
        r.step.min(r.steps.len()),
        r.steps.len(),
    );
    let _ = writeln!(out, "    plan: {}", r.steps.join(" → "));
    if let Some(j) = &r.judgement {
        let _ = writeln!(out, "    {}: {j}", if r.drill { "report" } else { "last judgement" });
    }
    if let Some(why) = &r.reason {
        // A completed rollout switched since (rolled back, superseded): what holds now.
        let label =
            if ["rolled back", "superseded"].contains(&r.state.as_str()) { "switched since" } else { "why it ended" };
        let _ = writeln!(out, "    {label}: {why}");
    }
    if let Some(from) = &r.judged_from {
        match &r.driver {
            Some(node) => {
                let _ = writeln!(out, "    fleet rollout, driven by {node}; pauses judged from {from}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "    fleet rollout, no node drives it now (the last driver's lease has not expired yet, or etcd is unreachable)"
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_say_start_or_control() {
        assert_eq!(
            asked("web", "green").expect("start"),
            Asked::Start { service: "web".into(), colour: Colour::Green }
        );
        assert_eq!(asked("status", "web").expect("status"), Asked::Status("web".into()));
        assert_eq!(asked("abort", "web").expect("abort"), Asked::Control("web".into(), RolloutAction::Abort));
        let e = asked("web", "teal").expect_err("not a colour").to_string();
        assert!(e.contains("not a colour") && e.contains("rollout status"), "{e}");
    }
}
