//! Shadow traffic's words: a share as written (`"10%"`, `"off"`), the setting a service
//! carries, and why TCP and DSR services cannot have it. Imports nothing of the crate.

use switcher_common::{BP_ALL, DEFAULT_SHADOW_CEILING};

/// Why a TCP service cannot be shadowed, in one line (CLI, socket and config say it alike).
pub const TCP_REFUSAL: &str = "shadow traffic is for UDP services only: a copied TCP packet cannot work, because the idle colour's stack chooses its own sequence numbers (the client's ACKs mean nothing to it) and TLS breaks";

/// Why a DSR service cannot be shadowed.
pub const DSR_REFUSAL: &str =
    "shadow traffic needs mode = \"nat\": with DSR the idle colour would answer the client directly";

/// A service's shadow setting: the share of new flows copied to the idle colour (basis
/// points, 0: off) and the ceiling on copies per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShadowSetting {
    pub share_bp: u32,
    pub ceiling: u32,
}

impl Default for ShadowSetting {
    fn default() -> Self {
        ShadowSetting { share_bp: 0, ceiling: DEFAULT_SHADOW_CEILING }
    }
}

/// Parses a share: `off`, or a percentage with at most two decimals from `0%` to `100%`
/// (`"10%"`, `"12.5%"`; the `%` may be left out). Returns basis points.
///
/// # Errors
/// What is wrong with the text, and what to write instead.
pub fn parse_share(text: &str) -> Result<u32, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let pct = t.strip_suffix('%').unwrap_or(t).trim();
    let (int, frac) = pct.split_once('.').unwrap_or((pct, ""));
    let bad = || format!("{text:?} is not a share: write a percentage from 0% to 100% (at most two decimals), or off");
    if int.is_empty() || frac.len() > 2 || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let int: u32 = int.parse().map_err(|_| bad())?;
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    int.checked_mul(100).and_then(|v| v.checked_add(frac)).filter(|&v| v <= BP_ALL).ok_or_else(bad)
}

/// A share in words: `off`, `10%`, `12.5%`.
#[must_use]
pub fn share_words(bp: u32) -> String {
    match bp {
        0 => "off".to_owned(),
        bp if bp % 100 == 0 => format!("{}%", bp / 100),
        bp => format!("{}%", (f64::from(bp) / 100.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_and_print() {
        assert_eq!(parse_share("off"), Ok(0));
        assert_eq!(parse_share("0%"), Ok(0));
        assert_eq!(parse_share("10%"), Ok(1_000));
        assert_eq!(parse_share("12.5%"), Ok(1_250));
        assert_eq!(parse_share("100"), Ok(10_000));
        assert!(parse_share("101%").is_err());
        assert!(parse_share("-1%").is_err());
        assert!(parse_share("1.234%").is_err());
        assert!(parse_share("ten").is_err());
        assert_eq!(share_words(0), "off");
        assert_eq!(share_words(1_000), "10%");
        assert_eq!(share_words(1_250), "12.5%");
    }
}
