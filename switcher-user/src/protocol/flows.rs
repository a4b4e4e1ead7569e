//! `switcher flows`: the question (which flows, filtered how, at most how many) and the answer
//! (the flows, or their counts per service, colour and backend), as the control socket carries
//! them. The CLI's no-daemon path answers with the same types from the pinned flow table.
//!
//! ```text
//! → {"op":"flows","service":"web","colour":"blue","limit":100}
//! ← {"ok":true,"services":[],"flows":{"flows":[{"client":"192.0.2.7:40112",…}],…}}
//! ```

use serde::{Deserialize, Serialize};

use super::{Colour, Protocol, wire};

/// What to list: every filter given must match. Addresses are the operator's words (checked
/// by the side that walks the table, which says what is wrong with them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Only this service's flows (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Only flows given this colour.
    #[serde(default, with = "wire::colour_opt", skip_serializing_if = "Option::is_none")]
    pub colour: Option<Colour>,
    /// Only flows on this backend: `ADDR` (any port) or `ADDR:PORT` (`[v6]:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Only flows from clients in this network: `ADDR/LEN` or one address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Only open flows, or only closing ones (TCP, FIN or RST seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<FlowState>,
    /// Stop after this many matching flows (default for a list: [`FLOWS_DEFAULT_LIMIT`]; a
    /// summary counts every flow unless given one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Count the matching flows per service, colour and backend instead of listing them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub summary: bool,
}

/// Flows listed when no limit is asked for.
pub const FLOWS_DEFAULT_LIMIT: u64 = 1000;
/// Flows listed at most in one answer (200–300 bytes each on the wire, well within the 16 MiB
/// the client reads of an answer); a summary is bounded by its groups instead.
pub const FLOWS_MAX_LIMIT: u64 = 20_000;

/// Where a flow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowState {
    /// Carrying traffic (or idle, but not closed).
    Open,
    /// A TCP flow that saw FIN or RST: kept a few seconds for the closing handshake.
    Closing,
}

impl FlowState {
    /// The protocol's word.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            FlowState::Open => "open",
            FlowState::Closing => "closing",
        }
    }
}

impl std::fmt::Display for FlowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for FlowState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(FlowState::Open),
            "closing" => Ok(FlowState::Closing),
            other => Err(format!("{other:?}: unknown flow state (expected \"open\" or \"closing\")")),
        }
    }
}

/// The answer to a [`FlowQuery`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowListing {
    /// The matching flows, in the table's order (empty for a summary).
    #[serde(default)]
    pub flows: Vec<FlowEntry>,
    /// For a summary: the matching flows per service, colour and backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub summary: Vec<FlowGroup>,
    /// Flows that matched (listed or counted).
    pub matched: u64,
    /// Entries of the table read (those of flows that are over included).
    pub walked: u64,
    /// Why the walk ended before the end of the table, if it did: the answer is partial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<FlowStop>,
    /// How long the walk took, in milliseconds.
    pub took_ms: u64,
    /// Entries the table holds at most (`max_flows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Who read the table: the daemon, or the CLI from the pinned maps (no daemon running).
    pub source: FlowSource,
}

/// Why a walk ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowStop {
    /// It found as many flows as the limit.
    Limit,
    /// It ran out of time (its own deadline, or the client's).
    Deadline,
}

/// Who walked the flow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowSource {
    #[default]
    Daemon,
    /// The pinned maps, read by the CLI (no daemon answered).
    Pins,
}

/// One open flow. The flow table records, per flow, its backend, colour, state and when its
/// last packet was seen (to the second); not when it began, nor its packets or bytes (those
/// are counted per colour: `switcher status`, the metrics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    /// The client's address and port (`[v6]:port` for IPv6).
    pub client: String,
    /// The VIP and port it reached.
    pub vip: String,
    pub protocol: Protocol,
    /// The service's name (`#id` for a service the reader does not know).
    pub service: String,
    /// The backend the flow was given.
    pub backend: String,
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    pub state: FlowState,
    /// Since the flow's last packet (to the second), in milliseconds.
    pub idle_ms: u64,
}

/// The matching flows of one backend of one service's colour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowGroup {
    pub service: String,
    #[serde(with = "wire::colour")]
    pub colour: Colour,
    pub backend: String,
    pub open: u64,
    pub closing: u64,
}

/// The flow table is this full (in basis points of its capacity, counting the entries of
/// flows that are not over) or more: new flows then evict live ones. `status` and the daemon's
/// log warn from here.
pub const FLOW_TABLE_WARN_BP: u32 = 8500;

/// `entries` of `capacity`, in basis points (rounded down, at most 10,000).
#[must_use]
pub fn fill_bp(entries: u64, capacity: u64) -> u32 {
    if capacity == 0 {
        return 0;
    }
    u32::try_from((u128::from(entries) * 10_000 / u128::from(capacity)).min(10_000)).unwrap_or(10_000)
}

/// The warning for a flow table holding `entries` of `capacity`, if it is
/// [`FLOW_TABLE_WARN_BP`] full or more.
#[must_use]
pub fn flow_table_warning(entries: u64, capacity: u64) -> Option<String> {
    let bp = fill_bp(entries, capacity);
    (capacity > 0 && bp >= FLOW_TABLE_WARN_BP).then(|| {
        format!(
            "the flow table is {} full ({entries} open flows of max_flows = {capacity}): a new flow whose set of 4 slots is full evicts the set's least recently seen flow, live or not (more often the fuller the table), and an evicted flow may lose its backend; raise max_flows (it takes a `switcher uninstall` and a restart), or spread the load",
            super::percent(bp)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Request, parse_request};

    #[test]
    fn a_flows_request_round_trips_and_keeps_unknown_fields_out() {
        let q = FlowQuery {
            service: Some("web".into()),
            colour: Some(Colour::Blue),
            backend: Some("198.51.100.2".into()),
            client: Some("192.0.2.0/24".into()),
            state: Some(FlowState::Closing),
            limit: Some(10),
            summary: true,
        };
        let line = serde_json::to_vec(&Request::Flows(q.clone())).expect("json");
        let text = String::from_utf8_lossy(&line);
        assert!(text.contains(r#""op":"flows""#) && text.contains(r#""colour":"blue""#), "{text}");
        assert_eq!(parse_request(&line), Ok(Request::Flows(q)));
        assert_eq!(parse_request(br#"{"op":"flows"}"#), Ok(Request::Flows(FlowQuery::default())));
        assert!(parse_request(br#"{"op":"flows","colour":"red"}"#).is_err());
        assert!(parse_request(br#"{"op":"flows","state":"half-open"}"#).is_err());
        assert!(parse_request(br#"{"op":"flows","limt":3}"#).is_err(), "a misspelt field is refused");
    }

    #[test]
    fn the_fill_warning_starts_at_85_percent() {
        assert_eq!(fill_bp(0, 0), 0);
        assert_eq!(fill_bp(1, 3), 3333);
        assert_eq!(fill_bp(9, 3), 10_000);
        assert!(flow_table_warning(849, 1000).is_none());
        let w = flow_table_warning(850, 1000).expect("85 %");
        assert!(w.contains("85% full") && w.contains("850 open flows of max_flows = 1000"), "{w}");
        assert!(flow_table_warning(5, 0).is_none(), "an unknown capacity warns of nothing");
    }
}
