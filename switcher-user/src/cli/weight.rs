//! `switcher weight`: a canary split between the colours.

use std::path::Path;

use switcher_user::protocol::{Colour, Request};

/// Send a share of new flows to a colour, the rest to the other one.
///
/// `green=5%` sends 5 % of new flows (by flow hash, in steps of 0.01 %) to green and 95 % to
/// blue; open flows never move. `0%` and `100%` behave exactly like one colour only, and
/// `100%` for the idle colour is a cut-over. `switcher cutover` ends a canary.
///
/// Example: switcher weight web green=5%
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name, as in the config's [[service]] table.
    service: String,
    /// COLOUR=PERCENT, e.g. green=5% or blue=99.5%.
    #[arg(value_parser = parse_share)]
    share: (Colour, u32),
    /// Send a share even to a colour that fails its health checks.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    scope: super::fleet::ScopeArgs,
}

/// `green=12.5%` → ("green", 1250 basis points).
fn parse_share(s: &str) -> Result<(Colour, u32), String> {
    let (colour, pct) = s.split_once('=').ok_or("expected COLOUR=PERCENT, e.g. green=5%")?;
    let colour: Colour = colour.parse().map_err(|_| format!("unknown colour {colour:?} (expected blue or green)"))?;
    let pct = pct.trim_end_matches('%');
    let (int, frac) = pct.split_once('.').unwrap_or((pct, ""));
    if int.is_empty() || frac.len() > 2 || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(format!("{pct:?} is not a percentage with at most two decimals"));
    }
    let int: u32 = int.parse().map_err(|_| format!("{pct:?} is too large"))?;
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| format!("{pct:?} is not a percentage"))?;
    let bp = int.checked_mul(100).and_then(|v| v.checked_add(frac)).filter(|&v| v <= 10_000);
    let bp = bp.ok_or_else(|| format!("{pct}% is more than 100%"))?;
    Ok((colour, bp))
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let (colour, basis_points) = args.share;
    let resp = super::ask(
        socket,
        &Request::Weight { service: args.service, colour, basis_points, force: args.force, scope: args.scope.scope() },
    )?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Colour, parse_share};

    #[test]
    fn shares_parse_in_basis_points() {
        assert_eq!(parse_share("green=5%"), Ok((Colour::Green, 500)));
        assert_eq!(parse_share("blue=99.5%"), Ok((Colour::Blue, 9950)));
        assert_eq!(parse_share("green=0.01%"), Ok((Colour::Green, 1)));
        assert_eq!(parse_share("green=100"), Ok((Colour::Green, 10_000)));
        assert!(parse_share("green=100.01%").is_err());
        assert!(parse_share("green=0.001%").is_err());
        assert!(parse_share("red=5%").is_err());
        assert!(parse_share("green5%").is_err());
        assert!(parse_share("green=-1%").is_err());
    }
}
