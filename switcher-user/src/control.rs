//! The control socket's protocol: one JSON object per line each way, one request per
//! connection. Requests are at most [`MAX_REQUEST`] bytes; anything else is answered with an
//! error and the connection is closed.
//!
//! ```text
//! → {"op":"cutover","service":"web","colour":"green","deadline_ms":183204551}
//! ← {"ok":true,"message":"web: blue → green","services":[…]}
//! ```
//!
//! `deadline_ms` (optional) is the `CLOCK_MONOTONIC` time, in milliseconds, at which the client
//! stops waiting: a request the daemon gets to only after it is refused, never applied, so a
//! client that reported a timeout can trust that nothing changed.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::dataplane::Counters;

/// Largest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long either side waits for the other; a client's request must be applied within it.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than [`TIMEOUT`] a client waits for the answer of a request the daemon may
/// still apply just before the deadline.
pub const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// A time on `CLOCK_MONOTONIC` (the same for every process of the machine), in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub u64);

impl Deadline {
    /// `after` from now.
    #[must_use]
    pub fn after(after: Duration) -> Deadline {
        Deadline(monotonic_ms().saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)))
    }

    /// Whether the client has stopped waiting.
    #[must_use]
    pub fn passed(self) -> bool {
        monotonic_ms() >= self.0
    }
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid pointer; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000 + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

/// The answer to a request whose deadline passed before the daemon could apply it.
#[must_use]
pub fn too_late() -> Response {
    Response::error(
        "the request reached its deadline before the daemon could apply it (the client has stopped waiting); nothing was changed: check `switcher status` and try again",
    )
}

/// What a client asks of the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// All services, or one.
    Status {
        #[serde(default)]
        service: Option<String>,
    },
    /// Make `colour` (default: the idle one) the active colour of `service`; the old colour's
    /// flows drain, for at most `drain_timeout_secs` (default: the service's config).
    Cutover {
        service: String,
        #[serde(default)]
        colour: Option<String>,
        #[serde(default)]
        drain_timeout_secs: Option<u64>,
        /// Switch even to a colour whose health checks fail.
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
    /// Go back to the colour that was active before the last switch.
    Rollback {
        service: String,
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
    /// Send `basis_points` (0–10000) of new flows to `colour`, the rest to the other one.
    Weight {
        service: String,
        colour: String,
        basis_points: u32,
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Scope::is_fleet_wide")]
        scope: Scope,
    },
    /// Re-read the configuration file and apply it (like SIGHUP); an invalid file changes
    /// nothing.
    Reload,
    /// Add a backend to a colour's pool (or change its weight).
    #[serde(rename = "backend-add")]
    BackendAdd {
        service: String,
        colour: String,
        address: String,
        #[serde(default)]
        weight: Option<u32>,
    },
    /// Remove a backend from a colour's pool; its open flows stay until they end.
    #[serde(rename = "backend-remove")]
    BackendRemove { service: String, colour: String, address: String },
    /// The fleet: the desired state in etcd and every node's published state.
    Fleet,
    /// The fleet as for [`Request::Fleet`], answered once something under the fleet's prefix
    /// changed after etcd revision `after` (the `revision` of the view the client has), or
    /// after `wait_ms` (at most [`FLEET_WAIT_MAX`]) with nothing new: followers use it instead
    /// of polling.
    #[serde(rename = "fleet-wait")]
    FleetWait { after: i64, wait_ms: u64 },
}

/// The longest a [`Request::FleetWait`] waits: well within the client's answer timeout.
pub const FLEET_WAIT_MAX: Duration = Duration::from_secs(2);

impl Request {
    /// The service a request is about, if it is about one.
    #[must_use]
    pub fn service(&self) -> Option<&str> {
        match self {
            Request::Cutover { service, .. }
            | Request::Rollback { service, .. }
            | Request::Weight { service, .. }
            | Request::BackendAdd { service, .. }
            | Request::BackendRemove { service, .. } => Some(service),
            Request::Status { service } => service.as_deref(),
            Request::Reload | Request::Fleet | Request::FleetWait { .. } => None,
        }
    }

    /// Where a switch applies in a fleet (`None`: not a switch).
    #[must_use]
    pub fn scope(&self) -> Option<&Scope> {
        match self {
            Request::Cutover { scope, .. } | Request::Rollback { scope, .. } | Request::Weight { scope, .. } => {
                Some(scope)
            }
            _ => None,
        }
    }
}

/// Where a change applies when the daemon is part of a fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// This node only, not the fleet's desired state. It holds until the fleet's desired
    /// state of the service changes.
    #[serde(default)]
    pub local: bool,
    /// Write the fleet's desired state only if it is still at this revision (as
    /// `switcher fleet status` showed it): nobody changed it in between.
    #[serde(default)]
    pub if_revision: Option<i64>,
}

impl Scope {
    #[must_use]
    pub fn is_fleet_wide(&self) -> bool {
        *self == Scope::default()
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Data-path verdicts, `(reason, packets)`, on `status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<(String, u64)>,
    /// On `status`: how long ago the open flows shown were counted (they are counted in
    /// passes over the flow table, off the request path), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_counted_ms_ago: Option<u64>,
    /// On `status`: how long that count took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_count_took_ms: Option<u64>,
    /// On `status`: the flow table as the last complete pass over it found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_table: Option<FlowTable>,
    /// The etcd revision a fleet-wide change was written at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// Fleet mode: this node's view (on `status`), and every node's (on `fleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetView>,
}

/// The entries of the flow table (an LRU: when it is full, a new flow evicts the least
/// recently used entry, expired or not), by state, from the last complete pass over it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTable {
    /// Open flows, every service and colour.
    pub live: u64,
    /// TCP flows that saw FIN or RST.
    pub closing: u64,
    /// Open TCP flows idle past `tcp_idle_timeout_secs`.
    pub idle: u64,
    /// Entries of flows that are over, left for the LRU to reuse.
    pub expired: u64,
    /// Entries the table holds at most (`max_flows`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
}

/// The fleet as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// This node's name.
    pub node: String,
    pub endpoints: Vec<String>,
    /// Whether etcd answers now.
    pub connected: bool,
    /// Seconds since it last connected or lost the connection.
    pub since_secs: u64,
    /// Why it is not connected.
    #[serde(default)]
    pub error: Option<String>,
    /// The desired state of each service, as last read, and how this node follows it.
    pub services: Vec<FleetService>,
    /// Every node's published state (on `fleet` only), by name.
    #[serde(default)]
    pub nodes: Vec<crate::fleet::NodeState>,
    /// The etcd revision the nodes were read at (on `fleet` only; 0: not read).
    #[serde(default)]
    pub revision: i64,
}

/// One service's desired state and this node's relation to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetService {
    pub name: String,
    /// As last read from etcd (`None`: not read yet).
    #[serde(default)]
    pub desired: Option<crate::fleet::Desired>,
    /// Its etcd mod revision.
    pub revision: i64,
    /// The revision this node applied last.
    pub applied_revision: i64,
    /// Why this node does not follow the desired state now, if it does not.
    #[serde(default)]
    pub local_override: Option<String>,
}

impl Response {
    #[must_use]
    pub fn error(msg: impl Into<String>) -> Response {
        Response { ok: false, error: Some(msg.into()), ..Response::default() }
    }
}

/// One service's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub port: u16,
    #[serde(default)]
    pub preview_port: Option<u16>,
    pub protocol: String,
    pub mode: String,
    pub active: String,
    /// The share of new flows sent to the idle colour, if any.
    #[serde(default)]
    pub canary: Option<Canary>,
    #[serde(default)]
    pub previous: Option<String>,
    /// Cut-overs and rollbacks since the daemon started.
    #[serde(default)]
    pub switches: u64,
    /// `switches` by kind.
    #[serde(default)]
    pub switch_kinds: SwitchKinds,
    /// Seconds since the last switch, if there was one.
    #[serde(default)]
    pub since_switch_secs: Option<u64>,
    /// Seconds left of the post-cut-over watch window (automatic rollback), if one runs.
    #[serde(default)]
    pub watch_secs_left: Option<u64>,
    /// The old colour's flows finishing after a switch.
    #[serde(default)]
    pub drain: Option<Drain>,
    pub colours: Vec<ColourStatus>,
}

/// Switches of a service since the daemon started, by what made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchKinds {
    /// Cut-overs asked for (`cutover`, `weight` to 100 %, the fleet's desired state).
    pub cutover: u64,
    /// Rollbacks asked for (`rollback`, or the fleet's).
    pub rollback: u64,
    /// Rollbacks the daemon made by itself: the new colour failed within `watch_secs`.
    pub auto_rollback: u64,
    /// Failovers the daemon made by itself: every backend of the live colour was down.
    pub failover: u64,
}

impl SwitchKinds {
    /// The kinds with their metric label values.
    #[must_use]
    pub fn labelled(&self) -> [(&'static str, u64); 4] {
        [
            ("cutover", self.cutover),
            ("rollback", self.rollback),
            ("auto_rollback", self.auto_rollback),
            ("failover", self.failover),
        ]
    }
}

/// A canary split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    pub colour: String,
    /// Share of new flows, in 0.01 % steps.
    pub basis_points: u32,
}

/// A drain in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub colour: String,
    /// Open flows left on the draining colour.
    pub live_flows: u64,
    /// Open flows it had when the drain began.
    pub initial_flows: u64,
    pub elapsed_secs: u64,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// What happens at the timeout: "move" or "reset".
    pub on_timeout: String,
    /// In a fleet: other nodes that still hold open flows of the draining colour, as
    /// `(node, open flows)`. The drain ends when no node holds any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<(String, u64)>,
    /// Open TCP flows of the draining colour idle past `tcp_idle_timeout_secs`: not counted
    /// in `live_flows` (they keep their backend if they come back).
    #[serde(default)]
    pub idle_flows: u64,
}

/// One colour of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColourStatus {
    pub colour: String,
    /// Whether it can take traffic (a backend passed its checks, or checks are off).
    #[serde(default)]
    pub healthy: bool,
    pub backends: Vec<BackendStatus>,
    /// Open flows now on this colour.
    pub live_flows: u64,
    /// TCP flows closing (FIN/RST seen).
    pub closing_flows: u64,
    pub counters: Counters,
    /// The pool was changed at runtime (`switcher backend`, the fleet's shared pools) and
    /// differs from the config file; a reload keeps it unless the file changes it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
}

/// One backend of a colour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// "up", "down" or "unknown" (not checked yet, or checks off).
    #[serde(default)]
    pub health: String,
    /// Since when, and the last failure.
    #[serde(default)]
    pub detail: Option<String>,
}

/// Errors of talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the switcher daemon is not running (nothing listens on {}); start it with `switcher daemon --config FILE`, or pass --socket if it uses another path", socket.display())]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on {}: run as root or as a member of the socket's group", socket.display())]
    Denied {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talk to the daemon on {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent an answer this client does not understand")]
    BadAnswer(#[source] serde_json::Error),
}

/// Sends one request and waits for the answer (blocking; for the CLI).
///
/// # Errors
/// [`ClientError`] saying whether the daemon is down, the socket is not ours, or the answer
/// was unreadable.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io { socket: socket.to_owned(), source };
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { socket: socket.to_owned(), source }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Denied { socket: socket.to_owned(), source },
        _ => ClientError::Io { socket: socket.to_owned(), source },
    })?;
    stream.set_read_timeout(Some(TIMEOUT + ANSWER_GRACE)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = request_line(req, Some(Deadline::after(TIMEOUT))).map_err(ClientError::BadAnswer)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream.take(16 * 1024 * 1024)).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(ClientError::BadAnswer)
}

/// The wire form of a request with its deadline (without the newline).
///
/// # Errors
/// Serialisation failed (it does not, for these types).
pub fn request_line(req: &Request, deadline: Option<Deadline>) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(req)?;
    if let (Some(d), Some(map)) = (deadline, value.as_object_mut()) {
        map.insert(DEADLINE_KEY.into(), d.0.into());
    }
    serde_json::to_vec(&value)
}

const DEADLINE_KEY: &str = "deadline_ms";

/// Parses one request line, or says what is wrong with it.
///
/// # Errors
/// A message for the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    parse_request_line(line).map(|(req, _)| req)
}

/// Parses one request line and its deadline, if it has one.
///
/// # Errors
/// A message for the client.
pub fn parse_request_line(line: &[u8]) -> Result<(Request, Option<Deadline>), String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    let malformed = |e: serde_json::Error| format!("malformed request: {e}");
    let mut value: serde_json::Value = serde_json::from_slice(line).map_err(malformed)?;
    let deadline = match value.as_object_mut().and_then(|m| m.remove(DEADLINE_KEY)) {
        None => None,
        Some(d) => Some(Deadline(d.as_u64().ok_or_else(|| {
            format!("malformed request: {DEADLINE_KEY} must be a CLOCK_MONOTONIC time in milliseconds")
        })?)),
    };
    Ok((serde_json::from_value(value).map_err(malformed)?, deadline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Status { service: None },
            Request::Status { service: Some("web".into()) },
            Request::Cutover {
                service: "web".into(),
                colour: Some("green".into()),
                drain_timeout_secs: Some(5),
                force: true,
                scope: Scope::default(),
            },
            Request::Cutover {
                service: "web".into(),
                colour: None,
                drain_timeout_secs: None,
                force: false,
                scope: Scope::default(),
            },
            Request::Rollback { service: "web".into(), force: false, scope: Scope::default() },
            Request::Weight {
                service: "web".into(),
                colour: "green".into(),
                basis_points: 500,
                force: false,
                scope: Scope::default(),
            },
            Request::Reload,
            Request::BackendAdd {
                service: "web".into(),
                colour: "blue".into(),
                address: "[2001:db8::1]:80".into(),
                weight: Some(2),
            },
            Request::BackendRemove { service: "web".into(), colour: "blue".into(), address: "192.0.2.1:80".into() },
        ] {
            let line = serde_json::to_vec(&req).expect("serialize");
            assert_eq!(parse_request(&line), Ok(req));
        }
    }

    #[test]
    fn the_wire_format_is_stable() {
        assert_eq!(
            parse_request(br#"{"op":"cutover","service":"web","colour":"green"}"#),
            Ok(Request::Cutover {
                service: "web".into(),
                colour: Some("green".into()),
                drain_timeout_secs: None,
                force: false,
                scope: Scope::default()
            })
        );
        assert_eq!(parse_request(br#"{"op":"status"}"#), Ok(Request::Status { service: None }));
        let ok = serde_json::to_string(&Response { ok: true, ..Response::default() }).expect("json");
        assert_eq!(ok, r#"{"ok":true,"services":[]}"#);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"op\":\"explode\"}",
            b"{\"op\":\"rollback\"}",
            b"\xff\xfe",
            b"{\"op\":\"status\",\"x\":1}",
        ] {
            let e = parse_request(bad).expect_err("must be rejected");
            assert!(e.starts_with("malformed request"), "{e}");
        }
        let big = vec![b' '; MAX_REQUEST + 1];
        assert!(parse_request(&big).expect_err("too big").contains("larger than"));
    }

    #[test]
    fn a_request_carries_its_deadline() {
        let req = Request::Rollback { service: "web".into(), force: false, scope: Scope::default() };
        let d = Deadline::after(TIMEOUT);
        let line = request_line(&req, Some(d)).expect("serialize");
        assert!(String::from_utf8_lossy(&line).contains("\"deadline_ms\":"), "{}", String::from_utf8_lossy(&line));
        assert_eq!(parse_request_line(&line), Ok((req.clone(), Some(d))));
        assert!(!d.passed(), "a deadline {TIMEOUT:?} away has not passed");
        assert!(Deadline::after(Duration::ZERO).passed());
        // Without one (a request written by hand), as before.
        assert_eq!(parse_request_line(br#"{"op":"rollback","service":"web"}"#), Ok((req, None)));
        let e = parse_request_line(br#"{"op":"status","deadline_ms":"soon"}"#).expect_err("not a number");
        assert!(e.contains("deadline_ms must be"), "{e}");
        // Other unknown fields are still refused.
        assert!(parse_request_line(br#"{"op":"status","deadline":1}"#).is_err());
    }

    #[test]
    fn a_missing_socket_says_the_daemon_is_not_running() {
        let e = request(Path::new("/nonexistent/switcher.sock"), &Request::Status { service: None })
            .expect_err("no daemon");
        assert!(matches!(e, ClientError::NotRunning { .. }));
        assert!(e.to_string().contains("daemon is not running"), "{e}");
    }
}
