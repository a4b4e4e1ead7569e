//! The daemon's configuration file (`/etc/switcher/switcher.toml` by default).
//!
//! ```toml
//! interfaces = ["eth0"]            # where the XDP program is attached
//! socket = "/run/switcher/switcher.sock"
//! xdp_mode = "native"              # or "skb" (generic) for drivers without native XDP
//! forwarding = "auto"              # "redirect" (XDP fast path), "kernel" (stack routes)
//! udp_idle_timeout_secs = 30       # an idle UDP flow is forgotten after this
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
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use switcher_common::{DEFAULT_UDP_IDLE_NS, MAX_SERVICES, user::Colour};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/switcher/switcher.sock";
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
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {field}: {message}")]
    Invalid { path: PathBuf, line: usize, field: String, message: String },
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
    #[serde(default, rename = "service")]
    services: Vec<toml::Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: toml::Spanned<String>,
    vip: Ipv4Addr,
    port: toml::Spanned<u16>,
    protocol: Protocol,
    active: toml::Spanned<ColourName>,
    #[serde(default)]
    blue: Option<SocketAddrV4>,
    #[serde(default)]
    green: Option<SocketAddrV4>,
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
    pub services: Vec<ServiceConfig>,
}

/// One service: where clients send traffic and where each colour is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub active: Colour,
    pub blue: Option<SocketAddrV4>,
    pub green: Option<SocketAddrV4>,
}

impl ServiceConfig {
    #[must_use]
    pub fn backend(&self, colour: Colour) -> Option<SocketAddrV4> {
        match colour {
            Colour::Blue => self.blue,
            Colour::Green => self.green,
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the line and field where there is one.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(path, &text)
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
        let udp_idle_timeout = match &raw.udp_idle_timeout_secs {
            None => Duration::from_nanos(DEFAULT_UDP_IDLE_NS),
            Some(v) if (1..=86_400).contains(v.get_ref()) => Duration::from_secs(*v.get_ref()),
            Some(v) => {
                return Err(invalid(
                    v.span(),
                    "udp_idle_timeout_secs",
                    format!("{} is out of range: use 1 to 86400 seconds", v.get_ref()),
                ));
            }
        };
        if raw.services.len() > MAX_SERVICES as usize {
            return Err(invalid(
                0..0,
                "service",
                format!("{} services configured; at most {MAX_SERVICES} fit in the maps", raw.services.len()),
            ));
        }
        let mut names = HashSet::new();
        let mut keys = HashMap::new();
        let mut backends: HashMap<(SocketAddrV4, Protocol), String> = HashMap::new();
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
            if s.vip.is_unspecified() || s.vip.is_broadcast() || s.vip.is_multicast() {
                return Err(invalid(spanned.span(), "vip", format!("{} cannot be a virtual IP", s.vip)));
            }
            if let Some(other) = keys.insert((s.vip, *s.port.get_ref(), s.protocol), name.clone()) {
                return Err(invalid(
                    spanned.span(),
                    "vip",
                    format!("{}:{}/{} is already service {other:?}", s.vip, s.port.get_ref(), s.protocol.as_str()),
                ));
            }
            let active: Colour = (*s.active.get_ref()).into();
            let service = ServiceConfig {
                name: name.clone(),
                vip: s.vip,
                port: *s.port.get_ref(),
                protocol: s.protocol,
                active,
                blue: s.blue,
                green: s.green,
            };
            if service.backend(active).is_none() {
                return Err(invalid(
                    s.active.span(),
                    "active",
                    format!(
                        "service {name:?} is active on {active} but has no {active} backend; add {active} = \"ADDRESS:PORT\""
                    ),
                ));
            }
            for colour in Colour::ALL {
                let Some(addr) = service.backend(colour) else { continue };
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(invalid(
                        spanned.span(),
                        colour.as_str(),
                        format!("{addr} is not a usable backend address"),
                    ));
                }
                // Replies are told apart by backend address; a backend shared between services
                // would make them ambiguous only for the same client port, but a backend that is
                // the VIP of another service would loop.
                if keys.contains_key(&(*addr.ip(), addr.port(), s.protocol)) {
                    return Err(invalid(
                        spanned.span(),
                        colour.as_str(),
                        format!("{addr} is itself a service address"),
                    ));
                }
                backends.insert((addr, s.protocol), name.clone());
            }
            services.push(service);
        }
        // A VIP of a later service may be a backend of an earlier one.
        for s in &services {
            if let Some(owner) = backends.get(&(SocketAddrV4::new(s.vip, s.port), s.protocol)) {
                let span =
                    raw.services.iter().find(|r| r.get_ref().name.get_ref() == owner).map_or(0..0, toml::Spanned::span);
                return Err(invalid(
                    span,
                    "backend",
                    format!("a backend of {owner:?} is the address of service {:?}", s.name),
                ));
            }
        }
        Ok(Config {
            interfaces: raw.interfaces.into_iter().map(toml::Spanned::into_inner).collect(),
            socket: raw.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            xdp_mode: raw.xdp_mode,
            forwarding: raw.forwarding,
            udp_idle_timeout,
            services,
        })
    }

    #[must_use]
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// The parser's message, with "line N" made explicit (toml's own message has it as a snippet).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_owned();
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
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces = ["lb-c", "lb-b"]
socket = "/tmp/s.sock"

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
active = "blue"
blue = "198.51.100.2:8080"
green = "198.51.100.18:8080"

[[service]]
name = "dns"
vip = "203.0.113.10"
port = 53
protocol = "udp"
active = "green"
green = "198.51.100.18:5353"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("config should be rejected").to_string()
    }

    #[test]
    fn a_good_config_parses() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.interfaces, ["lb-c", "lb-b"]);
        assert_eq!(c.socket, Path::new("/tmp/s.sock"));
        assert_eq!(c.xdp_mode, XdpMode::Native);
        assert_eq!(c.services.len(), 2);
        let web = c.service("web").expect("web");
        assert_eq!(web.active, Colour::Blue);
        assert_eq!(web.green, Some("198.51.100.18:8080".parse().expect("addr")));
        let dns = c.service("dns").expect("dns");
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.blue, None);
    }

    #[test]
    fn defaults_apply() {
        let c = parse("interfaces = [\"eth0\"]\n").expect("valid");
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.udp_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.forwarding, Forwarding::Auto);
        assert!(c.services.is_empty());
        let c = parse("interfaces = [\"eth0\"]\nudp_idle_timeout_secs = 5\n").expect("valid");
        assert_eq!(c.udp_idle_timeout, Duration::from_secs(5));
        let e = err("interfaces = [\"eth0\"]\nudp_idle_timeout_secs = 0\n");
        assert_eq!(e, "test.toml:2: udp_idle_timeout_secs: 0 is out of range: use 1 to 86400 seconds");
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let e = err("interfaces = [\"eth0\"]\n[[service]]\nname = \"web\nport = 80\n");
        assert!(e.starts_with("test.toml: line 3"), "{e}");
    }

    #[test]
    fn bad_values_name_line_and_field() {
        let e = err(&GOOD.replace("vip = \"203.0.113.10\"\nport = 80", "vip = \"203.0.113.300\"\nport = 80"));
        assert!(e.contains("line 7") && e.contains("invalid IPv4 address"), "{e}");
        let e = err(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
        assert!(e.contains("line 9") && e.contains("unknown variant `sctp`"), "{e}");
        let e = err(&GOOD.replace("active = \"blue\"", "active = \"red\""));
        assert!(e.contains("line 10") && e.contains("unknown variant `red`"), "{e}");
        let e = err(&GOOD.replace("port = 80", "port = 70000"));
        assert!(e.contains("line 8"), "{e}");
        let e = err(&GOOD.replace("socket =", "forwarding = \"fast\"\nsocket ="));
        assert!(e.contains("line 3") && e.contains("unknown variant `fast`"), "{e}");
        let e = err(&GOOD.replace("port = 80", "prot = 80"));
        assert!(e.contains("unknown field `prot`"), "{e}");
    }

    #[test]
    fn cross_field_errors_name_line_and_field() {
        let e = err(&GOOD.replace("name = \"dns\"", "name = \"web\""));
        assert_eq!(e, "test.toml:15: name: service \"web\" is defined twice");
        let e = err(&GOOD.replace("port = 53", "port = 80").replace("\"udp\"", "\"tcp\""));
        assert!(e.contains("is already service \"web\""), "{e}");
        let e = err(&GOOD.replace("active = \"green\"", "active = \"blue\""));
        assert_eq!(
            e,
            "test.toml:19: active: service \"dns\" is active on blue but has no blue backend; add blue = \"ADDRESS:PORT\""
        );
        let e = err(&GOOD.replace("port = 80", "port = 0"));
        assert_eq!(e, "test.toml:8: port: port 0 is not a service port");
        let e = err(&GOOD.replace("\"lb-b\"", "\"lb-c\""));
        assert!(e.contains("\"lb-c\" is listed twice"), "{e}");
        let e = err("interfaces = []\n");
        assert!(e.contains("interfaces: list at least one"), "{e}");
        let e = err(&GOOD.replace("name = \"web\"", "name = \"we b\""));
        assert!(e.contains("test.toml:6: name"), "{e}");
    }

    #[test]
    fn a_backend_may_not_be_a_service_address() {
        let e = err(&GOOD.replace("198.51.100.18:5353", "203.0.113.10:80").replace("\"udp\"", "\"tcp\""));
        assert!(e.contains("is itself a service address"), "{e}");
    }

    #[test]
    fn line_numbers_are_one_based() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
        assert_eq!(line_of("a", 99), 1);
    }
}
