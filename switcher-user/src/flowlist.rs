//! `switcher flows`: the open flows of the flow table, filtered, listed or counted per
//! service, colour and backend — who is still on the old colour during a drain, and where.
//!
//! The table is read in memory ([`crate::flowtable::FlowTable::walk_until`]),
//! [`crate::flowcount::BATCH`] entries at a time, so memory is two batch buffers plus what
//! is kept: at most the limit of flows listed, or one count per (service,
//! colour, backend) for a summary. The walk stops at the limit and at its own deadline (and
//! says so: the answer is then partial). The daemon runs it on a blocking task, never on the
//! engine's owner nor an async worker; with no daemon, the CLI runs it on the pinned map.
//!
//! What a flow shows is what the table records: its 5-tuple, service, colour, backend, state
//! and when its last packet was seen (to the second, `LAST_SEEN_GRANULARITY_NS`). It records
//! neither when a flow began nor its packets or bytes, so neither is shown: those are counted
//! per colour (`status`, the metrics), and counting them per flow would cost every packet a
//! write to its flow entry.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    ops::ControlFlow,
    time::{Duration, Instant},
};

use switcher_common::{
    Backend, FLOW_CLOSING, Flow, FlowKey, MAP_FLOWS, MAP_SERVICES, PROTO_TCP, Service, ServiceKey, flow_expired,
    user::Colour,
};

use crate::{
    config::Config,
    dataplane::{addr_ip, now_coarse_ns, service_key},
    flowtable::{FlowTable, FlowTableError},
    pins::Pins,
    protocol::{
        FlowEntry, FlowGroup, FlowListing, FlowQuery, FlowSource, FlowState, FlowStop, Protocol,
        flows::{FLOWS_DEFAULT_LIMIT, FLOWS_MAX_LIMIT},
    },
};

/// How long a walk may take at most; then it answers with what it found, marked partial.
/// Well within the control socket's timeout, so the answer still reaches the client.
pub const DEADLINE: Duration = Duration::from_secs(3);

/// (service, colour, backend) groups a summary keeps at most (about 100 bytes each on the
/// wire); past it the walk stops, marked partial (narrow it with SERVICE or --colour).
pub const MAX_GROUPS: usize = 20_000;

/// Errors of `switcher flows`, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("--client {given:?}: {why}; expected a network such as 192.0.2.0/24 or 2001:db8::/32, or one address")]
    Client { given: String, why: &'static str },
    #[error(
        "--backend {0:?} is not an address; expected ADDR (any port) or ADDR:PORT, such as 198.51.100.2, 198.51.100.2:8080 or [2001:db8::2]:8080"
    )]
    Backend(String),
    #[error("unknown service {given:?}; the services are: {known}")]
    UnknownService { given: String, known: String },
    #[error(
        "--limit {0}: at most {FLOWS_MAX_LIMIT} flows are listed at once; narrow the list with SERVICE, --colour, --backend or --client, or count them all with --summary"
    )]
    LimitTooLarge(u64),
    #[error("--limit 0 lists nothing; ask for at least one flow")]
    ZeroLimit,
    #[error(transparent)]
    Table(#[from] FlowTableError),
    #[error(
        "no pinned switcher data path under {pins}: the daemon has not run with this config (or it was uninstalled), so there are no flows to show"
    )]
    NotPinned { pins: String },
    #[error("open the pinned map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// A network of client addresses: `ADDR/LEN`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Whether `ip` is in the network (never across families).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = FlowsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| FlowsError::Client { given: s.to_owned(), why };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| err("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                err(if addr.is_ipv4() {
                    "the prefix length of an IPv4 network is 0 to 32"
                } else {
                    "the prefix length of an IPv6 network is 0 to 128"
                })
            })?,
        };
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A backend: an address (any port), or an address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendMatch {
    Addr(IpAddr),
    Socket(SocketAddr),
}

impl BackendMatch {
    fn matches(&self, b: &Backend) -> bool {
        let ip = addr_ip(b.addr, b.family);
        match self {
            BackendMatch::Addr(a) => *a == ip,
            BackendMatch::Socket(s) => s.ip() == ip && s.port() == u16::from_be_bytes(b.port),
        }
    }
}

impl std::str::FromStr for BackendMatch {
    type Err = FlowsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(sock) = t.parse::<SocketAddr>() {
            return Ok(BackendMatch::Socket(sock));
        }
        let bare = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(t);
        bare.parse::<IpAddr>().map(BackendMatch::Addr).map_err(|_| FlowsError::Backend(s.to_owned()))
    }
}

impl std::fmt::Display for BackendMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendMatch::Addr(a) => write!(f, "{a}"),
            BackendMatch::Socket(s) => write!(f, "{s}"),
        }
    }
}

/// The services' names by id, as the reader knows them.
#[derive(Clone, Debug, Default)]
pub struct Names(HashMap<u32, String>);

impl Names {
    #[must_use]
    pub fn new(ids: impl IntoIterator<Item = (u32, String)>) -> Names {
        Names(ids.into_iter().collect())
    }

    /// A service's name, or `#id` for one the reader does not know.
    #[must_use]
    pub fn of(&self, id: u32) -> String {
        self.0.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
    }

    fn id(&self, name: &str) -> Result<u32, FlowsError> {
        self.0.iter().find(|(_, n)| *n == name).map(|(id, _)| *id).ok_or_else(|| {
            let mut known: Vec<&str> = self.0.values().map(String::as_str).collect();
            known.sort_unstable();
            FlowsError::UnknownService {
                given: name.to_owned(),
                known: if known.is_empty() { "none".to_owned() } else { known.join(", ") },
            }
        })
    }
}

/// A checked [`FlowQuery`]: every filter given must match.
#[derive(Clone, Debug)]
pub struct Filter {
    service: Option<u32>,
    colour: Option<Colour>,
    backend: Option<BackendMatch>,
    client: Option<Cidr>,
    state: Option<FlowState>,
    /// Matching flows to stop after.
    limit: Option<u64>,
    summary: bool,
}

impl Filter {
    /// Checks `query` against the services known by `names`.
    ///
    /// # Errors
    /// A filter that is not an address, an unknown service, a limit out of bounds.
    pub fn new(query: &FlowQuery, names: &Names) -> Result<Filter, FlowsError> {
        let limit = match (query.limit, query.summary) {
            (Some(0), _) => return Err(FlowsError::ZeroLimit),
            (Some(n), false) if n > FLOWS_MAX_LIMIT => return Err(FlowsError::LimitTooLarge(n)),
            (None, false) => Some(FLOWS_DEFAULT_LIMIT),
            (limit, _) => limit,
        };
        Ok(Filter {
            service: query.service.as_deref().map(|n| names.id(n)).transpose()?,
            colour: query.colour,
            backend: query.backend.as_deref().map(str::parse).transpose()?,
            client: query.client.as_deref().map(str::parse).transpose()?,
            state: query.state,
            limit,
            summary: query.summary,
        })
    }

    fn matches(&self, key: &FlowKey, flow: &Flow, state: FlowState) -> bool {
        self.service.is_none_or(|id| id == flow.service)
            && self.colour.is_none_or(|c| c == colour_of(flow))
            && self.state.is_none_or(|s| s == state)
            && self.backend.is_none_or(|b| b.matches(&flow.backend))
            && self.client.is_none_or(|c| c.contains(addr_ip(key.src, key.family)))
    }
}

fn colour_of(flow: &Flow) -> Colour {
    Colour::from_u32(u32::from(flow.colour))
}

fn socket(addr: [u8; 16], family: u8, port: [u8; 2]) -> String {
    SocketAddr::new(addr_ip(addr, family), u16::from_be_bytes(port)).to_string()
}

/// The open (or closing) state of a flow that is not over, `None` for an entry the data path
/// treats as absent.
fn state_of(key: &FlowKey, flow: &Flow, now_ns: u64, udp_idle_ns: u64) -> Option<FlowState> {
    if flow_expired(key.proto, flow.flags, now_ns, flow.last_seen_ns, udp_idle_ns) {
        None
    } else if flow.flags & FLOW_CLOSING != 0 {
        Some(FlowState::Closing)
    } else {
        Some(FlowState::Open)
    }
}

/// A summary's group: service, colour, and the backend's address, port and family.
type GroupKey = (u32, Colour, [u8; 16], [u8; 2], u8);

/// What a walk keeps: the matching flows, or their counts, up to the limit.
#[derive(Debug)]
pub struct Collector<'a> {
    filter: &'a Filter,
    names: &'a Names,
    udp_idle_ns: u64,
    flows: Vec<FlowEntry>,
    /// Open and closing flows per group.
    groups: HashMap<GroupKey, (u64, u64)>,
    /// The group of the last flows counted, and their counts, not in `groups` yet.
    current: Option<(GroupKey, u64, u64)>,
    matched: u64,
    walked: u64,
    stopped: Option<FlowStop>,
}

impl<'a> Collector<'a> {
    #[must_use]
    pub fn new(filter: &'a Filter, names: &'a Names, udp_idle: Duration) -> Collector<'a> {
        Collector {
            filter,
            names,
            udp_idle_ns: u64::try_from(udp_idle.as_nanos()).unwrap_or(u64::MAX),
            flows: Vec::new(),
            groups: HashMap::new(),
            current: None,
            matched: 0,
            walked: 0,
            stopped: None,
        }
    }

    /// Takes one entry of the table, read at `now_ns` (coarse clock); `Break` once the limit
    /// is reached.
    pub fn offer(&mut self, key: &FlowKey, flow: &Flow, now_ns: u64) -> ControlFlow<()> {
        self.walked += 1;
        let Some(state) = state_of(key, flow, now_ns, self.udp_idle_ns) else { return ControlFlow::Continue(()) };
        if !self.filter.matches(key, flow, state) {
            return ControlFlow::Continue(());
        }
        if self.filter.summary {
            let b = &flow.backend;
            let group = (flow.service, colour_of(flow), b.addr, b.port, b.family);
            // Most flows in a row share their group: the map is touched only when it changes.
            if self.current.as_ref().is_none_or(|(g, ..)| *g != group) {
                self.flush();
                if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&group) {
                    self.stopped = Some(FlowStop::Limit);
                    return ControlFlow::Break(());
                }
                self.current = Some((group, 0, 0));
            }
            if let Some((_, open, closing)) = &mut self.current {
                match state {
                    FlowState::Open => *open += 1,
                    FlowState::Closing => *closing += 1,
                }
            }
        } else {
            self.flows.push(FlowEntry {
                client: socket(key.src, key.family, key.sport),
                vip: socket(key.dst, key.family, key.dport),
                protocol: if key.proto == PROTO_TCP { Protocol::Tcp } else { Protocol::Udp },
                service: self.names.of(flow.service),
                backend: socket(flow.backend.addr, flow.backend.family, flow.backend.port),
                colour: colour_of(flow),
                state,
                idle_ms: now_ns.saturating_sub(flow.last_seen_ns) / 1_000_000,
            });
        }
        self.matched += 1;
        if self.filter.limit.is_some_and(|l| self.matched >= l) {
            self.stopped = Some(FlowStop::Limit);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// Adds the counts of the current group to the map.
    fn flush(&mut self) {
        if let Some((group, open, closing)) = self.current.take() {
            let (o, c) = self.groups.entry(group).or_default();
            *o += open;
            *c += closing;
        }
    }

    /// The walk ran out of time.
    pub fn timed_out(&mut self) {
        self.stopped = Some(FlowStop::Deadline);
    }

    /// The answer (the summary sorted by service, colour and backend).
    #[must_use]
    pub fn finish(mut self, took: Duration, capacity: Option<u64>, source: FlowSource) -> FlowListing {
        self.flush();
        let mut summary: Vec<FlowGroup> = self
            .groups
            .into_iter()
            .map(|((id, colour, addr, port, family), (open, closing))| FlowGroup {
                service: self.names.of(id),
                colour,
                backend: socket(addr, family, port),
                open,
                closing,
            })
            .collect();
        summary.sort_by(|a, b| (&a.service, a.colour, &a.backend).cmp(&(&b.service, b.colour, &b.backend)));
        FlowListing {
            flows: self.flows,
            summary,
            matched: self.matched,
            walked: self.walked,
            stopped: self.stopped,
            took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            capacity,
            source,
        }
    }
}

/// How a walk runs.
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// A UDP flow idle this long is over (the data path's `udp_idle_timeout`).
    pub udp_idle: Duration,
    /// The table's size, to report with the answer.
    pub capacity: Option<u64>,
    /// When to stop, with what was found.
    pub deadline: Instant,
    pub source: FlowSource,
}

/// Walks the flow table, batch by batch, keeping what `filter` asks for, until the end of
/// the table, the filter's limit or `walk.deadline`.
#[must_use]
pub fn list(table: &FlowTable, filter: &Filter, names: &Names, walk: Walk) -> FlowListing {
    let started = Instant::now();
    let mut c = Collector::new(filter, names, walk.udp_idle);
    let mut late = false;
    table.walk_until(|keys, flows| {
        let now = now_coarse_ns();
        for (key, flow) in keys.iter().zip(flows) {
            c.offer(key, flow, now)?;
        }
        if Instant::now() >= walk.deadline {
            late = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if late && c.stopped.is_none() {
        c.timed_out();
    }
    c.finish(started.elapsed(), walk.capacity, walk.source)
}

/// The no-daemon path: `query` answered from the pinned flow table of `config`'s data path
/// (read only: nothing is locked or written, so it is as safe beside a running daemon as
/// without one). Services are named by the config and the pinned `SERVICES` map.
///
/// # Errors
/// Nothing pinned, a map that cannot be opened, a filter that is wrong, a read that failed.
pub fn from_pins(config: &Config, query: &FlowQuery) -> Result<FlowListing, FlowsError> {
    use aya::maps::{HashMap as BpfHash, Map, MapData};
    let pins = Pins::new(&config.pin_path);
    if !pins.exists() {
        return Err(FlowsError::NotPinned { pins: pins.version_dir().display().to_string() });
    }
    let open =
        |name: &'static str| MapData::from_pin(pins.map(name)).map_err(|source| FlowsError::Map { name, source });
    let services: BpfHash<MapData, ServiceKey, Service> = BpfHash::try_from(Map::HashMap(open(MAP_SERVICES)?))
        .map_err(|source| FlowsError::Map { name: MAP_SERVICES, source })?;
    let names = Names::new(
        config
            .services
            .iter()
            .filter_map(|s| services.get(&service_key(s, s.port), 0).ok().map(|v| (v.id, s.name.clone()))),
    );
    let filter = Filter::new(query, &names)?;
    let table = FlowTable::open(open(MAP_FLOWS)?.fd())?;
    let capacity = Some(table.capacity());
    let walk = Walk {
        udp_idle: config.udp_idle_timeout,
        capacity,
        deadline: Instant::now() + DEADLINE,
        source: FlowSource::Pins,
    };
    Ok(list(&table, &filter, &names, walk))
}

#[cfg(test)]
mod tests {
    use switcher_common::{FAMILY_V4, PROTO_UDP};

    use super::*;
    use crate::dataplane::{addr_bytes, backend_value};

    const NOW: u64 = 1_000_000_000_000;

    fn names() -> Names {
        Names::new([(1, "web".to_owned()), (2, "dns".to_owned())])
    }

    /// A flow from `client` to service `id`'s VIP, on `backend`, `idle_s` idle.
    fn entry(client: &str, id: u32, colour: Colour, backend: &str, flags: u8, idle_s: u64) -> (FlowKey, Flow) {
        let c: SocketAddr = client.parse().expect("client");
        let (src, family) = addr_bytes(c.ip());
        let vip: IpAddr =
            if family == FAMILY_V4 { "203.0.113.10".parse() } else { "2001:db8::10".parse() }.expect("vip");
        let key = FlowKey {
            src,
            dst: addr_bytes(vip).0,
            sport: c.port().to_be_bytes(),
            dport: if id == 2 { 53u16 } else { 80u16 }.to_be_bytes(),
            proto: if id == 2 { PROTO_UDP } else { PROTO_TCP },
            family,
            _pad: [0; 2],
        };
        let flow = Flow {
            backend: backend_value(backend.parse().expect("backend")),
            service: id,
            colour: colour.as_u32() as u8,
            flags,
            backend_idx: 0,
            syn_time: 0,
            last_seen_ns: NOW - idle_s * 1_000_000_000,
        };
        (key, flow)
    }

    fn table() -> Vec<(FlowKey, Flow)> {
        vec![
            entry("192.0.2.1:40001", 1, Colour::Blue, "198.51.100.2:8080", 0, 1),
            entry("192.0.2.2:40002", 1, Colour::Blue, "198.51.100.2:8080", FLOW_CLOSING, 2),
            entry("192.0.2.3:40003", 1, Colour::Blue, "198.51.100.3:8080", 0, 3),
            entry("198.51.100.77:40004", 1, Colour::Green, "198.51.100.4:8080", 0, 4),
            entry("[2001:db8::7]:40005", 1, Colour::Green, "[2001:db8::4]:8080", 0, 5),
            // A UDP flow idle past its timeout is over: never shown.
            entry("192.0.2.9:5300", 2, Colour::Blue, "198.51.100.5:53", 0, 600),
            entry("192.0.2.8:5301", 2, Colour::Green, "198.51.100.5:53", 0, 1),
            // A TCP flow closing for longer than its grace is over too.
            entry("192.0.2.4:40006", 1, Colour::Blue, "198.51.100.2:8080", FLOW_CLOSING, 60),
            // A service the reader does not know.
            entry("192.0.2.5:40007", 9, Colour::Green, "198.51.100.9:8080", 0, 0),
        ]
    }

    fn run(query: &FlowQuery) -> FlowListing {
        let names = names();
        let filter = Filter::new(query, &names).expect("a valid query");
        let mut c = Collector::new(&filter, &names, Duration::from_secs(30));
        for (k, f) in table() {
            if c.offer(&k, &f, NOW).is_break() {
                break;
            }
        }
        c.finish(Duration::ZERO, Some(1024), FlowSource::Daemon)
    }

    fn clients(l: &FlowListing) -> Vec<&str> {
        l.flows.iter().map(|f| f.client.as_str()).collect()
    }

    #[test]
    fn every_open_flow_is_listed_with_what_the_table_records() {
        let all = run(&FlowQuery::default());
        assert_eq!(all.walked, 9);
        assert_eq!(all.matched, 7, "the expired UDP flow and the long-closed TCP flow are over");
        assert_eq!(all.stopped, None);
        let first = &all.flows[0];
        assert_eq!(
            (first.client.as_str(), first.vip.as_str(), first.service.as_str(), first.backend.as_str()),
            ("192.0.2.1:40001", "203.0.113.10:80", "web", "198.51.100.2:8080")
        );
        assert_eq!(
            (first.colour, first.state, first.idle_ms, first.protocol),
            (Colour::Blue, FlowState::Open, 1000, Protocol::Tcp)
        );
        assert_eq!(all.flows[1].state, FlowState::Closing);
        let v6 = &all.flows[4];
        assert_eq!((v6.client.as_str(), v6.vip.as_str()), ("[2001:db8::7]:40005", "[2001:db8::10]:80"));
        assert_eq!(all.flows[5].protocol, Protocol::Udp);
        assert_eq!(all.flows[6].service, "#9", "an unknown service is named by its id");
    }

    #[test]
    fn filters_combine() {
        let q = |f: fn(&mut FlowQuery)| {
            let mut q = FlowQuery::default();
            f(&mut q);
            run(&q)
        };
        let web = q(|q| q.service = Some("web".into()));
        assert_eq!(web.matched, 5);
        let blue = q(|q| q.colour = Some(Colour::Blue));
        assert_eq!(clients(&blue), ["192.0.2.1:40001", "192.0.2.2:40002", "192.0.2.3:40003"]);
        let green_web = q(|q| {
            q.service = Some("web".into());
            q.colour = Some(Colour::Green);
        });
        assert_eq!(clients(&green_web), ["198.51.100.77:40004", "[2001:db8::7]:40005"]);
        let by_addr = q(|q| q.backend = Some("198.51.100.2".into()));
        assert_eq!(clients(&by_addr), ["192.0.2.1:40001", "192.0.2.2:40002"]);
        let by_port = q(|q| q.backend = Some("198.51.100.2:9999".into()));
        assert_eq!(by_port.matched, 0, "a backend with a port matches that port only");
        let v6 = q(|q| q.backend = Some("[2001:db8::4]".into()));
        assert_eq!(clients(&v6), ["[2001:db8::7]:40005"]);
        let net = q(|q| q.client = Some("192.0.2.0/30".into()));
        assert_eq!(clients(&net), ["192.0.2.1:40001", "192.0.2.2:40002", "192.0.2.3:40003"]);
        let one = q(|q| q.client = Some("198.51.100.77".into()));
        assert_eq!(clients(&one), ["198.51.100.77:40004"]);
        let v6net = q(|q| q.client = Some("2001:db8::/32".into()));
        assert_eq!(clients(&v6net), ["[2001:db8::7]:40005"]);
        let closing = q(|q| q.state = Some(FlowState::Closing));
        assert_eq!(clients(&closing), ["192.0.2.2:40002"]);
        let open_blue_web = q(|q| {
            q.state = Some(FlowState::Open);
            q.colour = Some(Colour::Blue);
            q.backend = Some("198.51.100.2:8080".into());
        });
        assert_eq!(clients(&open_blue_web), ["192.0.2.1:40001"]);
    }

    #[test]
    fn the_limit_stops_the_walk_and_says_so() {
        let two = run(&FlowQuery { limit: Some(2), ..FlowQuery::default() });
        assert_eq!((two.flows.len(), two.matched, two.walked), (2, 2, 2), "nothing is read past the limit");
        assert_eq!(two.stopped, Some(FlowStop::Limit));
        let exact = run(&FlowQuery { limit: Some(7), ..FlowQuery::default() });
        assert_eq!(exact.stopped, Some(FlowStop::Limit), "reaching the limit may leave more unread");
        let more = run(&FlowQuery { limit: Some(8), ..FlowQuery::default() });
        assert_eq!((more.matched, more.stopped), (7, None));
        let names = names();
        let deflt = Filter::new(&FlowQuery::default(), &names).expect("ok");
        assert_eq!(deflt.limit, Some(FLOWS_DEFAULT_LIMIT), "a list is bounded even when no limit is asked for");
        let summary = Filter::new(&FlowQuery { summary: true, ..FlowQuery::default() }, &names).expect("ok");
        assert_eq!(summary.limit, None, "a summary counts every flow");
    }

    #[test]
    fn the_summary_counts_per_service_colour_and_backend() {
        let s = run(&FlowQuery { summary: true, ..FlowQuery::default() });
        assert!(s.flows.is_empty());
        assert_eq!(s.matched, 7);
        let rows: Vec<(&str, Colour, &str, u64, u64)> =
            s.summary.iter().map(|g| (g.service.as_str(), g.colour, g.backend.as_str(), g.open, g.closing)).collect();
        assert_eq!(
            rows,
            [
                ("#9", Colour::Green, "198.51.100.9:8080", 1, 0),
                ("dns", Colour::Green, "198.51.100.5:53", 1, 0),
                ("web", Colour::Blue, "198.51.100.2:8080", 1, 1),
                ("web", Colour::Blue, "198.51.100.3:8080", 1, 0),
                ("web", Colour::Green, "198.51.100.4:8080", 1, 0),
                ("web", Colour::Green, "[2001:db8::4]:8080", 1, 0),
            ]
        );
        let blue = run(&FlowQuery { summary: true, colour: Some(Colour::Blue), ..FlowQuery::default() });
        assert_eq!(blue.summary.iter().map(|g| g.open + g.closing).sum::<u64>(), 3, "filters apply to the counts");
        let capped = run(&FlowQuery { summary: true, limit: Some(3), ..FlowQuery::default() });
        assert_eq!((capped.matched, capped.stopped), (3, Some(FlowStop::Limit)));
        assert_eq!(capped.summary.iter().map(|g| g.open + g.closing).sum::<u64>(), 3);
    }

    #[test]
    fn bad_filters_say_what_is_expected() {
        let names = names();
        let bad = |q: FlowQuery| Filter::new(&q, &names).expect_err("refused").to_string();
        let e = bad(FlowQuery { client: Some("192.0.2.0/33".into()), ..FlowQuery::default() });
        assert!(e.contains("0 to 32"), "{e}");
        let e = bad(FlowQuery { client: Some("lb1".into()), ..FlowQuery::default() });
        assert!(e.contains("not an IP address") && e.contains("192.0.2.0/24"), "{e}");
        let e = bad(FlowQuery { backend: Some("198.51.100.2:http".into()), ..FlowQuery::default() });
        assert!(e.contains("ADDR:PORT"), "{e}");
        let e = bad(FlowQuery { service: Some("mail".into()), ..FlowQuery::default() });
        assert!(e.contains("unknown service \"mail\"") && e.contains("dns, web"), "{e}");
        let e = bad(FlowQuery { limit: Some(0), ..FlowQuery::default() });
        assert!(e.contains("at least one"), "{e}");
        let e = bad(FlowQuery { limit: Some(FLOWS_MAX_LIMIT + 1), ..FlowQuery::default() });
        assert!(e.contains("--summary"), "{e}");
        assert!(
            Filter::new(&FlowQuery { limit: Some(FLOWS_MAX_LIMIT + 1), summary: true, ..FlowQuery::default() }, &names)
                .is_ok(),
            "a summary's limit only bounds the counting"
        );
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let n: Cidr = "192.0.2.128/25".parse().expect("cidr");
        assert!(n.contains("192.0.2.200".parse().expect("ip")));
        assert!(!n.contains("192.0.2.1".parse().expect("ip")));
        assert!(!n.contains("2001:db8::1".parse().expect("ip")), "never across families");
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("203.0.113.1".parse().expect("ip")));
        let v6: Cidr = "2001:db8::/128".parse().expect("cidr");
        assert!(v6.contains("2001:db8::".parse().expect("ip")) && !v6.contains("2001:db8::1".parse().expect("ip")));
        assert_eq!(n.to_string(), "192.0.2.128/25");
    }
}
