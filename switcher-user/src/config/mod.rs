//! The daemon's configuration file (`/etc/switcher/switcher.toml` by default).
//!
//! ```toml
//! interfaces = ["eth0"]            # where the XDP program is attached
//! socket = "/run/switcher/switcher.sock"
//! xdp_mode = "native"              # or "skb" (generic) for drivers without native XDP
//! forwarding = "auto"              # "redirect" (XDP fast path), "kernel" (stack routes)
//! udp_idle_timeout_secs = 30       # an idle UDP flow is forgotten after this
//! tcp_idle_timeout_secs = 300      # an idle open TCP flow stops holding a drain up
//!
//! [[service]]
//! name = "web"
//! vip = "203.0.113.10"
//! port = 80
//! protocol = "tcp"                 # or "udp"
//! active = "blue"
//! blue = "198.51.100.2:8080"
//! green = "198.51.100.18:8080"
//! ```
//!
//! Every error names the file, the line and the field. Syntax and type errors come from the
//! TOML parser; the checks across fields and services (duplicate names, a VIP used twice, an
//! active colour without a backend) are done by [`Config::validate`] with the span of the
//! service they concern.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use switcher_common::{DEFAULT_UDP_IDLE_NS, MAX_POOL, MAX_SERVICES, REVERSE_WAYS, user::Colour};

pub use crate::steps::RolloutConfig;
use crate::steps::{HookPoint, Hooks, parse_plan};

/// A service's `[service.rollout]`, checked.
fn rollout_config(r: &RawRollout) -> Result<RolloutConfig, String> {
    let mut out = RolloutConfig::default();
    if let Some(steps) = &r.steps {
        out.steps = parse_plan(steps).map_err(|e| e.to_string())?;
    }
    out.watch = r.watch_secs.filter(|&w| w > 0).map(Duration::from_secs);
    out.min_flows = r.min_flows.unwrap_or(out.min_flows);
    out.min_reply_ratio_pct = r.min_reply_ratio_pct.unwrap_or(out.min_reply_ratio_pct);
    if out.min_reply_ratio_pct > 100 {
        return Err(format!(
            "min_reply_ratio_pct = {}: a share of the old colour's, 0 to 100",
            out.min_reply_ratio_pct
        ));
    }
    out.keep_previous = r.keep_previous_secs.filter(|&k| k > 0).map(Duration::from_secs);
    if let Some(h) = &r.hooks {
        let timeout = h.timeout_secs.unwrap_or(Hooks::TIMEOUT.as_secs());
        if !(1..=3_600).contains(&timeout) {
            return Err(format!("hooks.timeout_secs = {timeout}: from 1 to 3600"));
        }
        out.hooks.timeout = Duration::from_secs(timeout);
        for (point, cmd) in [
            (HookPoint::BeforeFirstStep, &h.before_first_step),
            (HookPoint::BeforeFinal, &h.before_final),
            (HookPoint::AfterFinal, &h.after_final),
            (HookPoint::OnAbort, &h.on_abort),
            (HookPoint::BackupReleased, &h.backup_released),
        ] {
            if cmd.as_ref().is_some_and(|c| c.trim().is_empty()) {
                return Err(format!("hooks.{point} is empty: give a command, or leave it out"));
            }
            out.hooks.set(point, cmd.clone());
        }
    }
    Ok(out)
}

/// Names for a one-line message: all of them when there are few, else the first ten and how
/// many more ("none" for an empty list).
#[must_use]
pub fn short_list<S: AsRef<str>>(names: &[S]) -> String {
    const SHOWN: usize = 10;
    match names.len() {
        0 => "none".to_owned(),
        n if n <= SHOWN + 2 => names.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(", "),
        n => format!(
            "{}, … and {} more",
            names[..SHOWN].iter().map(AsRef::as_ref).collect::<Vec<_>>().join(", "),
            n - SHOWN
        ),
    }
}

/// Default of `tcp_idle_timeout_secs`: an open TCP flow without a packet this long no longer
/// counts as live in drains.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(300);

/// The largest `max_services`: the per-service maps then take ~45 MB (`BACKENDS` most).
pub const MAX_SERVICES_LIMIT: u32 = 16_384;

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/switcher/switcher.sock";
/// Default port of the Prometheus endpoint (on 127.0.0.1).
pub const DEFAULT_METRICS_PORT: u16 = 9477;
/// Largest configuration file read: 4,096 services of 2 × 64 weighted backends take about
/// 24 MiB.
pub const MAX_CONFIG_BYTES: u64 = 32 * 1024 * 1024;
/// Default path of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/switcher/switcher.toml";

/// Errors of loading a configuration; `Display` says where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {kind}, not a regular file: point --config at a file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than {max} bytes ({size}): is it the right file?")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {field}: {message}")]
    Invalid { path: PathBuf, line: usize, field: String, message: String },
    #[error(
        "{path}: {why}; whoever can change the config decides what this node forwards and which hook commands the daemon runs as root: keep it and its directories owned by root and writable by their owner only (e.g. chmod go-w)"
    )]
    Untrusted { path: PathBuf, why: String },
}

/// How the program is attached to the interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// The driver's native XDP hook (fastest; veth, most NICs).
    #[default]
    Native,
    /// Generic XDP in the kernel's stack: works on any interface, slower.
    Skb,
}

/// How rewritten packets leave the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// `redirect` when every interface is a physical one, else `kernel`.
    #[default]
    Auto,
    /// Straight out of the egress interface via `bpf_fib_lookup` + `bpf_redirect` (fastest).
    /// On veth, needs `ethtool -K <peer> gro on tx off` on the peers.
    Redirect,
    /// Passed to the kernel's stack to route: works on any interface.
    Kernel,
}

/// L4 protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => switcher_common::PROTO_TCP,
            Protocol::Udp => switcher_common::PROTO_UDP,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A colour as written in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ColourName {
    Blue,
    Green,
}

impl From<ColourName> for Colour {
    fn from(c: ColourName) -> Colour {
        match c {
            ColourName::Blue => Colour::Blue,
            ColourName::Green => Colour::Green,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    interfaces: Vec<toml::Spanned<String>>,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    xdp_mode: XdpMode,
    #[serde(default)]
    forwarding: Forwarding,
    #[serde(default)]
    udp_idle_timeout_secs: Option<toml::Spanned<u64>>,
    #[serde(default)]
    tcp_idle_timeout_secs: Option<toml::Spanned<u64>>,
    #[serde(default)]
    pin_path: Option<PathBuf>,
    #[serde(default)]
    socket_group: Option<toml::Spanned<String>>,
    #[serde(default)]
    metrics: Option<toml::Spanned<String>>,
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default)]
    max_flows: Option<toml::Spanned<u32>>,
    max_services: Option<toml::Spanned<u32>>,
    #[serde(default)]
    fleet: Option<toml::Spanned<RawFleet>>,
    #[serde(default, rename = "service")]
    services: Vec<toml::Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    endpoints: Vec<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    share_backends: bool,
    #[serde(default)]
    lease_ttl_secs: Option<u64>,
    #[serde(default)]
    compaction_interval_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: toml::Spanned<String>,
    vip: IpAddr,
    port: toml::Spanned<u16>,
    #[serde(default)]
    preview_port: Option<toml::Spanned<u16>>,
    protocol: Protocol,
    #[serde(default)]
    mode: Mode,
    active: toml::Spanned<ColourName>,
    #[serde(default)]
    blue: Option<toml::Spanned<RawPool>>,
    #[serde(default)]
    green: Option<toml::Spanned<RawPool>>,
    #[serde(default)]
    drain_timeout_secs: Option<u64>,
    #[serde(default)]
    on_drain_timeout: DrainAction,
    #[serde(default)]
    health: Option<toml::Spanned<RawHealth>>,
    #[serde(default)]
    watch_secs: Option<u64>,
    #[serde(default)]
    failover: bool,
    #[serde(default)]
    rollout: Option<toml::Spanned<RawRollout>>,
    /// Share of new flows copied to the idle colour (`"10%"`, `"off"`): UDP NAT services only.
    #[serde(default)]
    shadow: Option<toml::Spanned<String>>,
    /// Ceiling on copies per second (default `DEFAULT_SHADOW_CEILING`).
    #[serde(default)]
    shadow_ceiling: Option<toml::Spanned<u32>>,
}

/// `[service.rollout]` (see [`crate::steps`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    #[serde(default)]
    steps: Option<Vec<String>>,
    #[serde(default)]
    watch_secs: Option<u64>,
    #[serde(default)]
    min_flows: Option<u64>,
    #[serde(default)]
    min_reply_ratio_pct: Option<u32>,
    #[serde(default)]
    keep_previous_secs: Option<u64>,
    #[serde(default)]
    hooks: Option<RawHooks>,
}

/// `[service.rollout.hooks]`: a shell command per point, and their timeout.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    #[serde(default)]
    before_first_step: Option<String>,
    #[serde(default)]
    before_final: Option<String>,
    #[serde(default)]
    after_final: Option<String>,
    #[serde(default)]
    on_abort: Option<String>,
    #[serde(default)]
    backup_released: Option<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    check: Option<CheckKind>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    expect_status: Option<u16>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    interval_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    rise: Option<u32>,
    #[serde(default)]
    fall: Option<u32>,
}

/// How a backend's health is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect to the backend (the default for TCP services).
    Tcp,
    /// `GET path` over HTTP/1.0, expecting `expect_status`.
    Http,
    /// No checks: backends always count as healthy (the default for UDP services).
    None,
}

/// A service's health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: CheckKind,
    pub path: String,
    pub expect_status: u16,
    /// Check this port instead of the backend's service port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
}

/// A colour's backends: one address, a list of addresses, or a list of tables with weights.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPool {
    One(SocketAddr),
    Many(Vec<RawBackend>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBackend {
    Addr(SocketAddr),
    Weighted {
        address: SocketAddr,
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

/// How a service's packets reach its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Destination NAT to the backend, replies translated back to the VIP here.
    #[default]
    Nat,
    /// L2 direct server return: only the destination MAC is rewritten; backends hold the VIP
    /// on a loopback and answer clients directly. Backends must be on a connected subnet and
    /// listen on the service port.
    Dsr,
}

impl Mode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Dsr => "dsr",
        }
    }
}

/// What happens to the old colour's remaining flows when a drain times out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainAction {
    /// Re-point them to the new colour's consistent-hash backend: UDP flows carry on there;
    /// TCP connections are refused by the new backend (it never saw them) and clients reconnect.
    #[default]
    Move,
    /// The load balancer answers each one's next client packet with a TCP RST (UDP flows are
    /// forgotten), so clients learn at once that the connection is gone.
    Reset,
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub interfaces: Vec<String>,
    pub socket: PathBuf,
    pub xdp_mode: XdpMode,
    pub forwarding: Forwarding,
    /// A UDP flow idle this long is forgotten: its next datagram is a new flow.
    pub udp_idle_timeout: Duration,
    /// An open TCP flow idle this long no longer holds a drain up (it keeps its backend).
    pub tcp_idle_timeout: Duration,
    /// Root of the pins on bpffs.
    pub pin_path: PathBuf,
    /// Group given the control socket (0660); its members may use every command.
    pub socket_group: Option<String>,
    /// Prometheus endpoint (`None`: off).
    pub metrics: Option<SocketAddr>,
    /// Audit lines also go to this file.
    pub audit_log: Option<PathBuf>,
    /// Size of the flow tables (per direction); default 262,144.
    pub max_flows: Option<u32>,
    /// Services the maps hold (default `MAX_SERVICES`, 4,096): the per-service maps are sized
    /// from it when they are made.
    pub max_services: Option<u32>,
    /// Fleet mode: the desired state lives in etcd (`None`: this node alone).
    pub fleet: Option<FleetConfig>,
    pub services: Vec<ServiceConfig>,
}

/// Default key prefix of a fleet in etcd.
pub const DEFAULT_FLEET_PREFIX: &str = "/switcher";

/// The `[fleet]` section: where the fleet's shared state lives and who this node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// etcd client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// Every key of this fleet starts with it (`/switcher`).
    pub prefix: String,
    /// This node's name in the fleet (default: the host name).
    pub node: String,
    /// Backend pools are part of the shared desired state (`switcher backend` changes them
    /// on every node); otherwise each node keeps the pools of its own config.
    pub share_backends: bool,
    /// This node's published state disappears this long after the node stops renewing it.
    pub lease_ttl: Duration,
    /// How often the fleet compacts etcd's history, keeping one interval of it (`None`: never;
    /// etcd compacts itself, `--auto-compaction-retention`).
    pub compaction_interval: Option<Duration>,
}

/// One backend of a colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// One service: where clients send traffic and where each colour is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// Traffic to `vip:preview_port` goes to the idle colour.
    pub preview_port: Option<u16>,
    pub protocol: Protocol,
    pub mode: Mode,
    pub active: Colour,
    pub blue: Vec<BackendConfig>,
    pub green: Vec<BackendConfig>,
    /// Default drain timeout of a cut-over (none: wait for flows to end by themselves).
    pub drain_timeout: Option<Duration>,
    pub on_drain_timeout: DrainAction,
    pub health: HealthConfig,
    /// After a cut-over, this long a failing new colour is rolled back automatically.
    pub watch: Option<Duration>,
    /// Fail over to the other colour when every backend of the live one is down.
    pub failover: bool,
    /// `switcher rollout`'s plan, analysis, hooks and backup (`[service.rollout]`).
    pub rollout: RolloutConfig,
    /// Shadow traffic to the idle colour (`shadow`, `shadow_ceiling`).
    pub shadow: crate::shadow::ShadowSetting,
}

impl HealthConfig {
    /// The defaults: TCP connect for TCP services, none for UDP; every second, 1 s timeout,
    /// up after 2 successes, down after 3 failures.
    #[must_use]
    pub fn default_for(protocol: Protocol) -> HealthConfig {
        HealthConfig {
            check: if protocol == Protocol::Tcp { CheckKind::Tcp } else { CheckKind::None },
            path: "/".into(),
            expect_status: 200,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

impl ServiceConfig {
    #[must_use]
    pub fn pool(&self, colour: Colour) -> &[BackendConfig] {
        match colour {
            Colour::Blue => &self.blue,
            Colour::Green => &self.green,
        }
    }

    pub fn pool_mut(&mut self, colour: Colour) -> &mut Vec<BackendConfig> {
        match colour {
            Colour::Blue => &mut self.blue,
            Colour::Green => &mut self.green,
        }
    }

    /// Whether a colour has a backend that can take traffic.
    #[must_use]
    pub fn serves(&self, colour: Colour) -> bool {
        self.pool(colour).iter().any(|b| b.weight > 0)
    }

    /// Checks one backend against the service: family, DSR port, not a service address.
    ///
    /// # Errors
    /// What is wrong, for the operator.
    pub fn check_backend(&self, addr: SocketAddr) -> Result<(), String> {
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(format!("{addr} is not a usable backend address"));
        }
        if addr.is_ipv4() != self.vip.is_ipv4() {
            return Err(format!("{addr} is not of the VIP's address family ({})", self.vip));
        }
        if self.mode == Mode::Dsr && addr.port() != self.port {
            return Err(format!(
                "{addr}: with mode = \"dsr\" a backend must listen on the service port {} (only the MAC is rewritten)",
                self.port
            ));
        }
        if addr.ip() == self.vip && (addr.port() == self.port || Some(addr.port()) == self.preview_port) {
            return Err(format!("{addr} is the service's own address"));
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the line and field where there is one.
    /// Only a regular file of at most [`MAX_CONFIG_BYTES`] is read: a FIFO, a device or a
    /// directory is refused without blocking (opened with `O_NONBLOCK`, checked with `fstat`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_bounded(path)?;
        Config::parse(path, &text)
    }

    /// [`Config::load`] for the daemon, which acts on the file as root: first
    /// [`check_trusted`].
    ///
    /// # Errors
    /// As [`Config::load`], and [`ConfigError::Untrusted`].
    pub fn load_trusted(path: &Path) -> Result<Config, ConfigError> {
        check_trusted(path)?;
        Config::load(path)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: parse_message(text, &e) })?;
        let invalid = |span: Range<usize>, field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, span.start),
            field: field.to_owned(),
            message,
        };
        if raw.interfaces.is_empty() {
            return Err(invalid(
                0..0,
                "interfaces",
                "list at least one interface to attach to, e.g. interfaces = [\"eth0\"]".into(),
            ));
        }
        let mut seen_ifaces = HashSet::new();
        for iface in &raw.interfaces {
            let name = iface.get_ref();
            if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
                return Err(invalid(iface.span(), "interfaces", format!("{name:?} is not a valid interface name")));
            }
            if !seen_ifaces.insert(name.clone()) {
                return Err(invalid(iface.span(), "interfaces", format!("{name:?} is listed twice")));
            }
        }
        // A number of seconds in 1..=max, or the default when absent.
        let seconds = |v: &Option<toml::Spanned<u64>>, field: &str, max: u64, default: Duration| match v {
            None => Ok(default),
            Some(v) if (1..=max).contains(v.get_ref()) => Ok(Duration::from_secs(*v.get_ref())),
            Some(v) => {
                Err(invalid(v.span(), field, format!("{} is out of range: use 1 to {max} seconds", v.get_ref())))
            }
        };
        let udp_idle_timeout = seconds(
            &raw.udp_idle_timeout_secs,
            "udp_idle_timeout_secs",
            86_400,
            Duration::from_nanos(DEFAULT_UDP_IDLE_NS),
        )?;
        let tcp_idle_timeout = seconds(&raw.tcp_idle_timeout_secs, "tcp_idle_timeout_secs", 604_800, DEFAULT_TCP_IDLE)?;
        let max_services = match &raw.max_services {
            Some(m) if !(1..=MAX_SERVICES_LIMIT).contains(m.get_ref()) => {
                return Err(invalid(
                    m.span(),
                    "max_services",
                    format!("{} is out of range: 1 to {MAX_SERVICES_LIMIT}", m.get_ref()),
                ));
            }
            m => m.as_ref().map(|m| *m.get_ref()),
        };
        let room = max_services.unwrap_or(MAX_SERVICES);
        if raw.services.len() > room as usize {
            let (span, how) = match &raw.max_services {
                Some(m) => (m.span(), format!("raise max_services (up to {MAX_SERVICES_LIMIT})")),
                None => (0..0, format!("set max_services (up to {MAX_SERVICES_LIMIT})")),
            };
            return Err(invalid(
                span,
                "max_services",
                format!("{} services configured; the maps hold {room}: {how}", raw.services.len()),
            ));
        }
        let mut names = HashSet::new();
        let mut keys: HashMap<(IpAddr, u16, Protocol), String> = HashMap::new();
        let mut services = Vec::with_capacity(raw.services.len());
        for spanned in &raw.services {
            let s = spanned.get_ref();
            let name = s.name.get_ref();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(invalid(s.name.span(), "name", format!("{name:?}: use letters, digits, '-', '_' and '.'")));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(s.name.span(), "name", format!("service {name:?} is defined twice")));
            }
            if *s.port.get_ref() == 0 {
                return Err(invalid(s.port.span(), "port", "port 0 is not a service port".into()));
            }
            if s.vip.is_unspecified() || s.vip.is_multicast() || s.vip == IpAddr::V4(Ipv4Addr::BROADCAST) {
                return Err(invalid(spanned.span(), "vip", format!("{} cannot be a virtual IP", s.vip)));
            }
            let mut ports = vec![(*s.port.get_ref(), s.port.span(), "port")];
            if let Some(p) = &s.preview_port {
                if *p.get_ref() == 0 || p.get_ref() == s.port.get_ref() {
                    return Err(invalid(
                        p.span(),
                        "preview_port",
                        "use a port other than 0 and the service port".into(),
                    ));
                }
                ports.push((*p.get_ref(), p.span(), "preview_port"));
            }
            for (port, span, field) in ports {
                if let Some(other) = keys.insert((s.vip, port, s.protocol), name.clone()) {
                    return Err(invalid(
                        span,
                        field,
                        format!("{}:{port}/{} is already used by service {other:?}", s.vip, s.protocol.as_str()),
                    ));
                }
            }
            let mut service = ServiceConfig {
                name: name.clone(),
                vip: s.vip,
                port: *s.port.get_ref(),
                preview_port: s.preview_port.as_ref().map(|p| *p.get_ref()),
                protocol: s.protocol,
                mode: s.mode,
                active: (*s.active.get_ref()).into(),
                blue: Vec::new(),
                green: Vec::new(),
                drain_timeout: s.drain_timeout_secs.map(Duration::from_secs),
                on_drain_timeout: s.on_drain_timeout,
                health: HealthConfig::default_for(s.protocol),
                watch: s.watch_secs.filter(|&w| w > 0).map(Duration::from_secs),
                failover: s.failover,
                rollout: RolloutConfig::default(),
                shadow: crate::shadow::ShadowSetting::default(),
            };
            if let Some(sh) = &s.shadow {
                let bp = crate::shadow::parse_share(sh.get_ref()).map_err(|m| invalid(sh.span(), "shadow", m))?;
                if bp > 0 && s.protocol == Protocol::Tcp {
                    return Err(invalid(sh.span(), "shadow", crate::shadow::TCP_REFUSAL.into()));
                }
                if bp > 0 && s.mode == Mode::Dsr {
                    return Err(invalid(sh.span(), "shadow", crate::shadow::DSR_REFUSAL.into()));
                }
                service.shadow.share_bp = bp;
            }
            if let Some(c) = &s.shadow_ceiling {
                if *c.get_ref() == 0 {
                    return Err(invalid(
                        c.span(),
                        "shadow_ceiling",
                        "0 copies per second copies nothing: set shadow = \"off\" instead".into(),
                    ));
                }
                service.shadow.ceiling = *c.get_ref();
            }
            if let Some(r) = &s.rollout {
                service.rollout = rollout_config(r.get_ref()).map_err(|m| invalid(r.span(), "rollout", m))?;
            }
            if let Some(h) = &s.health {
                let span = h.span();
                let h = h.get_ref();
                let d = &mut service.health;
                if let Some(c) = h.check {
                    d.check = c;
                }
                if d.check == CheckKind::Http && s.protocol == Protocol::Udp {
                    return Err(invalid(span, "health.check", "an HTTP check needs a TCP service".into()));
                }
                if let Some(p) = &h.path {
                    if !p.starts_with('/') || p.contains(char::is_whitespace) {
                        return Err(invalid(
                            span,
                            "health.path",
                            format!("{p:?}: an absolute URL path without spaces"),
                        ));
                    }
                    d.path.clone_from(p);
                }
                d.expect_status = h.expect_status.unwrap_or(d.expect_status);
                d.port = h.port.or(d.port);
                d.interval = h.interval_ms.map_or(d.interval, Duration::from_millis);
                d.timeout = h.timeout_ms.map_or(d.timeout, Duration::from_millis);
                d.rise = h.rise.unwrap_or(d.rise);
                d.fall = h.fall.unwrap_or(d.fall);
                if d.interval < Duration::from_millis(100)
                    || d.timeout < Duration::from_millis(10)
                    || d.timeout > d.interval * 10
                {
                    return Err(invalid(
                        span,
                        "health",
                        "interval_ms ≥ 100 and 10 ≤ timeout_ms ≤ 10 × interval_ms".into(),
                    ));
                }
                if d.rise == 0 || d.fall == 0 || d.rise > 100 || d.fall > 100 {
                    return Err(invalid(span, "health", "rise and fall are between 1 and 100".into()));
                }
            }
            for (colour, pool) in [(Colour::Blue, &s.blue), (Colour::Green, &s.green)] {
                let Some(pool) = pool else { continue };
                let list: Vec<BackendConfig> = match pool.get_ref() {
                    RawPool::One(addr) => vec![BackendConfig { addr: *addr, weight: 1 }],
                    RawPool::Many(list) => list
                        .iter()
                        .map(|b| match b {
                            RawBackend::Addr(addr) => BackendConfig { addr: *addr, weight: 1 },
                            RawBackend::Weighted { address, weight } => {
                                BackendConfig { addr: *address, weight: *weight }
                            }
                        })
                        .collect(),
                };
                if list.len() > MAX_POOL as usize {
                    return Err(invalid(
                        pool.span(),
                        colour.as_str(),
                        format!("{} backends; at most {MAX_POOL} per colour", list.len()),
                    ));
                }
                let mut seen = HashSet::new();
                for b in &list {
                    service.check_backend(b.addr).map_err(|m| invalid(pool.span(), colour.as_str(), m))?;
                    if b.weight > 1000 {
                        return Err(invalid(
                            pool.span(),
                            colour.as_str(),
                            format!("{}: weight {} is above 1000", b.addr, b.weight),
                        ));
                    }
                    if !seen.insert(b.addr) {
                        return Err(invalid(pool.span(), colour.as_str(), format!("{} is listed twice", b.addr)));
                    }
                }
                *service.pool_mut(colour) = list;
            }
            let active = service.active;
            if !service.serves(active) {
                return Err(invalid(
                    s.active.span(),
                    "active",
                    format!(
                        "service {name:?} is active on {active} but has no {active} backend; add {active} = \"ADDRESS:PORT\""
                    ),
                ));
            }
            services.push(service);
        }
        // A NAT backend's replies are matched to their flow through the (VIP, port) pairs it
        // serves; a few fit per backend address:port.
        // Where a service is in the file, for errors found across services.
        let span_of = |name: &str| {
            raw.services.iter().find(|r| r.get_ref().name.get_ref() == name).map_or(0..0, toml::Spanned::span)
        };
        let mut fronts: HashMap<(SocketAddr, Protocol), HashSet<(IpAddr, u16)>> = HashMap::new();
        for s in services.iter().filter(|s| s.mode == Mode::Nat) {
            for b in s.blue.iter().chain(&s.green) {
                let f = fronts.entry((b.addr, s.protocol)).or_default();
                f.insert((s.vip, s.port));
                f.extend(s.preview_port.map(|p| (s.vip, p)));
                if f.len() > REVERSE_WAYS {
                    let span = span_of(&s.name);
                    return Err(invalid(
                        span,
                        "backend",
                        format!(
                            "{} serves {} VIP:port pairs in NAT mode (preview ports count); at most {REVERSE_WAYS} per backend address and port — give it another port for the others, or use mode = \"dsr\"",
                            b.addr,
                            f.len()
                        ),
                    ));
                }
            }
        }
        // A backend must not be another service's address: packets would loop through the VIP.
        for s in &services {
            for b in s.blue.iter().chain(&s.green) {
                if let Some(owner) = keys.get(&(b.addr.ip(), b.addr.port(), s.protocol)) {
                    let span = span_of(&s.name);
                    return Err(invalid(
                        span,
                        "backend",
                        format!("{} is itself the address of service {owner:?}", b.addr),
                    ));
                }
            }
        }
        let metrics = match &raw.metrics {
            None => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))),
            Some(m) if m.get_ref() == "off" => None,
            Some(m) => Some(m.get_ref().parse().map_err(|_| {
                invalid(m.span(), "metrics", format!("{:?}: expected ADDRESS:PORT, or \"off\"", m.get_ref()))
            })?),
        };
        if let Some(g) = &raw.socket_group
            && group_id(g.get_ref()).is_none()
        {
            return Err(invalid(g.span(), "socket_group", format!("no group {:?} on this system", g.get_ref())));
        }
        Ok(Config {
            interfaces: raw.interfaces.into_iter().map(toml::Spanned::into_inner).collect(),
            socket: raw.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            xdp_mode: raw.xdp_mode,
            forwarding: raw.forwarding,
            udp_idle_timeout,
            tcp_idle_timeout,
            pin_path: raw.pin_path.unwrap_or_else(|| PathBuf::from(crate::pins::DEFAULT_PIN_PATH)),
            socket_group: raw.socket_group.map(toml::Spanned::into_inner),
            metrics,
            audit_log: raw.audit_log,
            max_flows: match raw.max_flows {
                Some(m) if !(16..=16_777_216).contains(m.get_ref()) => {
                    return Err(invalid(
                        m.span(),
                        "max_flows",
                        format!("{} is out of range: 16 to 16777216", m.get_ref()),
                    ));
                }
                m => m.map(toml::Spanned::into_inner),
            },
            max_services,
            fleet: match &raw.fleet {
                None => None,
                Some(f) => Some(fleet_config(f.get_ref()).map_err(|(field, m)| invalid(f.span(), field, m))?),
            },
            services,
        })
    }

    #[must_use]
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Checks the `[fleet]` section; an error names the field.
fn fleet_config(raw: &RawFleet) -> Result<FleetConfig, (&'static str, String)> {
    if raw.endpoints.is_empty() {
        return Err((
            "fleet.endpoints",
            "list the etcd client URLs, e.g. endpoints = [\"http://10.0.0.1:2379\"]".into(),
        ));
    }
    for e in &raw.endpoints {
        let Some(rest) = e.strip_prefix("http://") else {
            return Err((
                "fleet.endpoints",
                format!(
                    "{e:?}: expected http://HOST:PORT (TLS to etcd is not supported; keep etcd on a management network)"
                ),
            ));
        };
        if rest.is_empty() || rest.contains(['/', ' ']) {
            return Err(("fleet.endpoints", format!("{e:?}: expected http://HOST:PORT")));
        }
    }
    let prefix = raw.prefix.clone().unwrap_or_else(|| DEFAULT_FLEET_PREFIX.into());
    if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains(char::is_whitespace) {
        return Err((
            "fleet.prefix",
            format!("{prefix:?}: a key prefix like \"/switcher\" (leading '/', no trailing '/')"),
        ));
    }
    let node = match &raw.node {
        Some(n) => n.clone(),
        None => host_name().ok_or(("fleet.node", "the host name cannot be read; set node = \"NAME\"".to_owned()))?,
    };
    if node.is_empty() || node.len() > 63 || !node.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(("fleet.node", format!("{node:?}: up to 63 letters, digits, '-', '_' and '.'")));
    }
    let lease_ttl = match raw.lease_ttl_secs {
        None => Duration::from_secs(10),
        Some(t) if (2..=300).contains(&t) => Duration::from_secs(t),
        Some(t) => return Err(("fleet.lease_ttl_secs", format!("{t} is out of range: 2 to 300 seconds"))),
    };
    let compaction_interval = match raw.compaction_interval_secs {
        None => Some(Duration::from_secs(300)),
        Some(0) => None,
        Some(t) if (5..=86_400).contains(&t) => Some(Duration::from_secs(t)),
        Some(t) => {
            return Err((
                "fleet.compaction_interval_secs",
                format!(
                    "{t} is out of range: 5 to 86400 seconds, or 0 when etcd compacts its history itself (etcd --auto-compaction-retention)"
                ),
            ));
        }
    };
    Ok(FleetConfig {
        endpoints: raw.endpoints.clone(),
        prefix,
        node,
        share_backends: raw.share_backends,
        lease_ttl,
        compaction_interval,
    })
}

/// This machine's host name.
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its length; gethostname NUL-terminates within it
    // when the name fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&buf[..end]).ok()?;
    Some(name.split('.').next().unwrap_or(name).to_owned())
}

/// Refuses a config that a user other than root and the daemon's own could change: the file
/// (and a symlink naming it) must be owned by one of them and not writable by others (nor by
/// its group unless that is root's), and so must every directory above it, except that a
/// sticky directory (such as /tmp) may be writable by all: there, others cannot rename or
/// remove what they do not own.
///
/// # Errors
/// [`ConfigError::Untrusted`] saying which path and why; [`ConfigError::Read`] if a path
/// cannot be looked at.
pub fn check_trusted(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let read_err = |p: &Path| {
        let p = p.to_owned();
        move |source| ConfigError::Read { path: p, source }
    };
    let untrusted = |p: &Path, m: &std::fs::Metadata, what: &str| {
        let others = m.mode() & 0o002 != 0 || (m.mode() & 0o020 != 0 && m.gid() != 0);
        let owner = m.uid() == 0 || m.uid() == me;
        // A symlink's own mode is always 0777 and means nothing: only its owner can repoint it.
        let exempt = (m.is_dir() && m.mode() & 0o1000 != 0) || m.file_type().is_symlink();
        if !owner {
            Some(format!("{what} {} is owned by uid {}, not by root", p.display(), m.uid()))
        } else if others && !exempt {
            Some(format!("{what} {} can be written by other users (mode {:o})", p.display(), m.mode() & 0o7777))
        } else {
            None
        }
    };
    let fail = |why: String| Err(ConfigError::Untrusted { path: path.to_owned(), why });
    // Every symlink on the way as given (the file's, a directory's): only its owner can
    // repoint it.
    let given = std::path::absolute(path).map_err(read_err(path))?;
    for p in given.ancestors() {
        let Ok(link) = std::fs::symlink_metadata(p) else { continue };
        if link.file_type().is_symlink()
            && let Some(why) = untrusted(p, &link, "the symlink")
        {
            return fail(why);
        }
    }
    let real = std::fs::canonicalize(path).map_err(read_err(path))?;
    let m = std::fs::metadata(&real).map_err(read_err(&real))?;
    if let Some(why) = untrusted(&real, &m, "the file") {
        return fail(why);
    }
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(read_err(dir))?;
        if let Some(why) = untrusted(dir, &m, "the directory") {
            return fail(why);
        }
    }
    Ok(())
}

/// Reads a configuration file: a regular file of at most [`MAX_CONFIG_BYTES`], opened so that
/// a FIFO or a device does not block the open, and read no further than the cap.
fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    use std::{
        io::Read as _,
        os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    };
    let read_err = |source| ConfigError::Read { path: path.to_owned(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let t = meta.file_type();
    let kind = if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    };
    if let Some(kind) = kind {
        return Err(ConfigError::NotAFile { path: path.to_owned(), kind });
    }
    let too_large = |size| ConfigError::TooLarge { path: path.to_owned(), size, max: MAX_CONFIG_BYTES };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // Bounded again: the file may grow after the fstat.
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes)
        .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text: {e}"))))
}

/// The id of a group name (blocking: NSS; from async code, through
/// [`crate::accounts::off_worker`]).
#[must_use]
pub fn group_id(name: &str) -> Option<u32> {
    crate::accounts::group_id(name)
}

/// The parser's message, with "line N" made explicit (toml's own message has it as a snippet).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let mut msg = e.message().trim().to_owned();
    if msg.contains("untagged enum Raw") {
        msg = "expected \"ADDRESS:PORT\" ([v6]:PORT for IPv6), a list of them, or a list of { address = \"ADDRESS:PORT\", weight = N }".into();
    }
    match e.span() {
        Some(span) => format!("line {}: {msg}", line_of(text, span.start)),
        None => msg,
    }
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |t| t.bytes().filter(|&b| b == b'\n').count() + 1)
}

#[cfg(test)]
mod tests;
