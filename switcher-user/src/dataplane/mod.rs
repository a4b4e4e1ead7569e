//! The XDP program and its maps, as the daemon sees them.
//!
//! [`Dataplane::open`] loads the embedded object, fills the maps and loads the program;
//! [`Dataplane::attach`] attaches it. The map handles stay here; dropping the `Dataplane`
//! detaches the program (the links are owned by this process).
//!
//! Pools: each (service, colour) has up to `MAX_POOL` backend slots in `BACKENDS`. A backend
//! keeps its slot while it stays in the pool; a change writes the new backends' slots, builds
//! the Maglev table (sized to the pool) into free elements of the `RING` slab (`slab.rs`), and
//! points `RING_LIVE` at it — the live table is never edited in place. `RING` and `RING_LIVE`
//! are made afresh at each start, sized to the config, and take over from the previous
//! daemon's with the program: they hold nothing the pools do not give again.

use std::{
    collections::HashMap as StdHashMap,
    ffi::CString,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use switcher_common::{
    ABI_VERSION, BP_ALL, Backend, BackendKey, ColourCounters, FAMILY_V4, FAMILY_V6, FLOW_CLOSING, FLOW_RESET,
    FORWARD_KERNEL, FORWARD_REDIRECT, Flow, FlowKey, FlowSet, GLOBAL_FLOW_SET_MASK, GLOBAL_FORWARD_MODE,
    GLOBAL_UDP_IDLE_NS, MAP_BACKENDS, MAP_COUNTERS, MAP_FLOWS, MAP_META, MAP_NAMES, MAP_NOW, MAP_PORTS, MAP_REVERSE,
    MAP_RING, MAP_RING_LIVE, MAP_SERVICES, MAP_STATE, MAP_STATS, MAP_VIPS, MAX_POOL, MAX_SERVICES, PROG_NAME,
    REVERSE_WAYS, Reason, Reverse, RingChunk, SEED_CANARY, SEED_RING, Service, ServiceKey, VipPort, colour_slot,
    flow_hash, new_flow_colour, pinned_map_names, user::Colour,
};

use crate::{
    config::{self, BackendConfig, ServiceConfig},
    pins::{Pins, PinsError},
    slab::{Slab, SlabFull},
};

mod flows;
mod pools;
mod shadow;

use self::shadow::repin_shadow;
pub use self::{flows::DrainEnd, pools::ring_elements};

/// The XDP object built by `build.rs` from `switcher-ebpf`.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switcher"));

/// The benchmarks' XDP object (`switcher-ebpf/src/bench.rs`): the do-nothing baseline, the
/// per-packet harness and the live-frame programs. The daemon never loads it, and a binary
/// that does not name it (the daemon) does not carry it: the linker drops it.
pub static BENCH_PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switcher-bench"));

/// Errors of the data plane, with the object they concern.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this binary was built without its XDP program (AYA_BUILD_SKIP was set); rebuild it with `./x build`")]
    NoProgram,
    #[error("load the XDP program")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {what} {name:?}")]
    Missing { what: &'static str, name: &'static str },
    #[error("walk the flow table")]
    Walk(#[source] std::io::Error),
    #[error(transparent)]
    FlowTable(#[from] crate::flowtable::FlowTableError),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {PROG_NAME}")]
    Program(#[source] ProgramError),
    #[error("attach XDP to {iface} in {mode:?} mode")]
    Attach {
        iface: String,
        mode: config::XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("interface name {0:?} contains a NUL byte")]
    BadName(String),
    #[error("a colour holds at most {MAX_POOL} backends")]
    PoolFull,
    #[error("at most {0} services fit in the maps (max_services)")]
    TooManyServices(u32),
    #[error(transparent)]
    Slab(#[from] SlabFull),
    #[error(
        "the config sets {key} = {configured}, but the pinned maps were made with {pinned}: keep {pinned}, or run `switcher uninstall` (it drops the open flows and counters) and start again"
    )]
    Resized { key: &'static str, configured: u32, pinned: u32 },
    #[error(
        "backend {backend} would answer for {count} VIP:port pairs in NAT mode; at most {REVERSE_WAYS} fit (a preview port counts as one)"
    )]
    TooManyFronts { backend: String, count: usize },
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error("the pinned maps in {} are of ABI {found}, this is ABI {ABI_VERSION}; run `switcher uninstall` with the version that made them", path.display())]
    Incompatible { found: u32, path: PathBuf },
    #[error("replace the pin {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin {} again (it was removed while the daemon ran)", path.display())]
    Repin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin the XDP link at {}", path.display())]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the link pinned for {iface} is not an XDP link")]
    Link {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "XDP on {iface} was attached through netlink (kernel without XDP bpf_link, < 5.9): it cannot be pinned, so it would not survive the daemon; switcher needs Linux 5.9 or later"
    )]
    NetlinkOnly { iface: String },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Counters of one colour of one service, summed over CPUs: the protocol's type.
pub use crate::protocol::Counters;

impl Counters {
    /// Adds `o`, field by field (the latency histogram bucket by bucket), saturating: the
    /// fleet's sums take numbers other nodes published.
    pub fn add(&mut self, o: &Counters) {
        self.packets = self.packets.saturating_add(o.packets);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.reply_packets = self.reply_packets.saturating_add(o.reply_packets);
        self.reply_bytes = self.reply_bytes.saturating_add(o.reply_bytes);
        self.flows = self.flows.saturating_add(o.flows);
        self.rescued = self.rescued.saturating_add(o.rescued);
        self.syns = self.syns.saturating_add(o.syns);
        self.handshakes = self.handshakes.saturating_add(o.handshakes);
        self.refused = self.refused.saturating_add(o.refused);
        self.backend_resets = self.backend_resets.saturating_add(o.backend_resets);
        self.icmp_unreachables = self.icmp_unreachables.saturating_add(o.icmp_unreachables);
        self.syn_retransmits = self.syn_retransmits.saturating_add(o.syn_retransmits);
        self.client_resets = self.client_resets.saturating_add(o.client_resets);
        self.evicted = self.evicted.saturating_add(o.evicted);
        for (t, c) in self.syn_latency.iter_mut().zip(o.syn_latency) {
            *t = t.saturating_add(c);
        }
    }

    /// The sum of `all`, field by field: a service's counters over the nodes of a fleet.
    #[must_use]
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Counters>) -> Counters {
        all.into_iter().fold(Counters::default(), |mut t, c| {
            t.add(c);
            t
        })
    }
}

impl From<&ColourCounters> for Counters {
    /// One CPU's slot of `COUNTERS`.
    fn from(c: &ColourCounters) -> Counters {
        Counters {
            packets: c.packets,
            bytes: c.bytes,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
            flows: c.flows,
            rescued: c.rescued,
            syns: c.syns,
            handshakes: c.handshakes,
            refused: c.refused,
            backend_resets: c.backend_resets,
            icmp_unreachables: c.icmp_unreachables,
            syn_retransmits: c.syn_retransmits,
            client_resets: c.client_resets,
            evicted: c.evicted,
            syn_latency: c.syn_latency,
        }
    }
}

/// A service as the maps hold it after an install or adoption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Installed {
    pub id: u32,
    pub active: Colour,
    pub canary_bp: u32,
    pub previous: Option<Colour>,
}

/// Tracked flows of one colour of one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowCounts {
    /// Open flows: not closing, not expired.
    pub live: u64,
    /// TCP flows that saw FIN or RST, kept a few seconds for the closing handshake.
    pub closing: u64,
    /// Open TCP flows without a packet for longer than `tcp_idle_timeout`: not counted in
    /// `live`, so they do not hold a drain up (they still keep their backend if they return).
    #[serde(default)]
    pub idle: u64,
}

/// Load-time settings of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// A UDP flow idle this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Redirect rewritten packets out of their egress interface (else the kernel routes them).
    pub redirect: bool,
    /// Size of the flow table (default `MAX_FLOWS`).
    pub max_flows: Option<u32>,
    /// An open TCP flow without a packet this long no longer counts as live (drains).
    pub tcp_idle_timeout: Duration,
    /// Services the per-service maps hold (default `MAX_SERVICES`).
    pub max_services: Option<u32>,
    /// Another build of the program's object, of the same ABI, instead of the embedded one
    /// ([`PROGRAM`]): for the benchmarks' side-by-side comparison of two builds.
    pub object: Option<&'static [u8]>,
}

/// Default of [`Options::tcp_idle_timeout`].
pub const DEFAULT_TCP_IDLE: Duration = config::DEFAULT_TCP_IDLE;

impl Default for Options {
    fn default() -> Self {
        Options {
            udp_idle_timeout: Duration::from_nanos(switcher_common::DEFAULT_UDP_IDLE_NS),
            redirect: true,
            max_flows: None,
            tcp_idle_timeout: DEFAULT_TCP_IDLE,
            max_services: None,
            object: None,
        }
    }
}

/// Decides `forwarding = "auto"`: redirect only when every interface is a physical device.
/// Redirecting into a virtual device such as veth silently drops frames unless its peer is
/// prepared for it (GRO on, TX checksum offload off), which cannot be checked from here.
#[must_use]
pub fn resolve_forwarding(mode: config::Forwarding, interfaces: &[String]) -> (bool, String) {
    match mode {
        config::Forwarding::Redirect => (true, "redirect (configured)".into()),
        config::Forwarding::Kernel => (false, "kernel stack (configured)".into()),
        config::Forwarding::Auto => match interfaces.iter().find(|i| !is_physical(i)) {
            None => (true, "redirect (auto: all interfaces are physical)".into()),
            Some(i) => (
                false,
                format!(
                    "kernel stack (auto: {i} is a virtual interface; for the XDP fast path on veth run `ethtool -K <peer> gro on tx off` on the peers and set forwarding = \"redirect\")"
                ),
            ),
        },
    }
}

/// Whether `/sys/class/net/IF` is a physical device (virtual ones live under
/// `/sys/devices/virtual`). Unknown counts as virtual: the kernel path is the safe one.
fn is_physical(iface: &str) -> bool {
    std::fs::canonicalize(format!("/sys/class/net/{iface}"))
        .is_ok_and(|p| !p.to_string_lossy().contains("/devices/virtual/"))
}

/// One colour's pool: which backend sits in which `BACKENDS` slot, and its live table (its
/// slots, and where in `RING` it is: first element and length).
#[derive(Clone, Debug, Default)]
struct Pool {
    slots: Vec<Option<BackendConfig>>,
    table: Vec<u16>,
    live: Option<(u32, u32)>,
    /// `table` differs from the live one (or there is none yet): [`Dataplane::publish_table`]
    /// writes it.
    dirty: bool,
}

/// The loaded, attached program and its maps.
pub struct Dataplane {
    // Holds the program and its links: dropping it detaches.
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    ring: Array<MapData, RingChunk>,
    ring_live: Array<MapData, u32>,
    state: Array<MapData, u32>,
    flows: Array<MapData, FlowSet>,
    /// `FLOWS`, mapped: how the daemon reads and writes flows.
    table: std::sync::Arc<crate::flowtable::FlowTable>,
    reverse: HashMap<MapData, BackendKey, Reverse>,
    now: Array<MapData, u64>,
    counters: PerCpuArray<MapData, ColourCounters>,
    stats: PerCpuArray<MapData, u64>,
    ports: Array<MapData, u8>,
    vips: Array<MapData, u8>,
    pools: StdHashMap<(u32, Colour), Pool>,
    /// Free and used elements of `RING`.
    slab: Slab,
    /// Ports each service listens on (main and preview), by id.
    service_ports: StdHashMap<u32, Vec<u16>>,
    /// What `PORTS` holds, as written by this process.
    ports_written: StdHashMap<u16, u8>,
    /// `VIPS` slot of each service's VIP, by id.
    service_vips: StdHashMap<u32, u32>,
    /// `VIPS` slots set by this process.
    vips_written: std::collections::HashSet<u32>,
    /// The (VIP, port) pairs and protocol of each NAT service, by id: what `REVERSE` maps its
    /// backends to.
    service_fronts: StdHashMap<u32, (Vec<VipPort>, u8)>,
    /// What `REVERSE` holds (as read on adoption, then as written by this process).
    reverse_written: StdHashMap<BackendKey, Reverse>,
    /// When this process started driving the maps (coarse clock): open TCP flows stamped
    /// before it by a stale `NOW` are not judged idle until `tcp_idle_timeout` after it.
    started_ns: u64,
    /// When `REVERSE` was last brought in line with the pools (see [`Dataplane::collect_reverse`]).
    reverse_changed: std::time::Instant,
    /// The readers' end of the flow walker, once there is one ([`Dataplane::flow_walker`]).
    counter: Option<crate::flowcount::FlowCounter>,
    options: Options,
    /// Pinned XDP links (empty when unpinned: the program's own links hold the attachment).
    links: Vec<PinnedLink>,
    /// Each pinned link's interface and kernel id, to pin it again if its pin goes.
    link_ids: Vec<(String, u32)>,
    /// Each pinned map's name and kernel id, likewise.
    map_ids: Vec<(&'static str, u32)>,
    pins: Option<Pins>,
    /// The `flock` on the pin root, held while this daemon drives the data path.
    lock: Option<std::fs::File>,
    // Maps the program uses but nothing reads here: kept so their fds outlive the program.
    _meta: Array<MapData, u32>,
    _logger: Option<Logger>,
    /// The TC program of shadow traffic is attached everywhere (`dataplane/shadow.rs`).
    shadow_ready: bool,
    /// Each pinned TC link's interface and kernel id, to pin it again if its pin goes.
    shadow_link_ids: Vec<(String, u32)>,
    /// The pinned TC links, held open: a removed pin must not release its link.
    shadow_links: Vec<PinnedLink>,
}

type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::Missing { what: "map", name })?;
    T::try_from(map).map_err(map_err(name))
}

/// An address in the maps' 16-byte field, and its family.
#[must_use]
pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The address in a map's 16-byte field.
#[must_use]
pub fn addr_ip(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V6 { IpAddr::from(bytes) } else { IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]) }
}

/// The map key of a service port.
#[must_use]
pub fn service_key(s: &ServiceConfig, port: u16) -> ServiceKey {
    let (vip, family) = addr_bytes(s.vip);
    ServiceKey { vip, port: port.to_be_bytes(), proto: s.protocol.number(), family }
}

/// The map value of a backend.
#[must_use]
pub fn backend_value(addr: SocketAddr) -> Backend {
    let (a, family) = addr_bytes(addr.ip());
    Backend { addr: a, port: addr.port().to_be_bytes(), family, _pad: 0 }
}

/// The `REVERSE` key of a backend of a service with protocol `proto`.
#[must_use]
pub fn backend_key(addr: SocketAddr, proto: u8) -> BackendKey {
    let (a, family) = addr_bytes(addr.ip());
    BackendKey { addr: a, port: addr.port().to_be_bytes(), proto, family }
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock of `bpf_ktime_get_coarse_ns`.
#[must_use]
pub fn now_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl Dataplane {
    /// Starts the data path the daemon way: pinned under the config's `pin_path`, adopting
    /// what a previous daemon left there (maps with their flows, counters and switch states;
    /// links, whose program is replaced atomically), filled with the config's services and
    /// attached to its interfaces. Returns the services as installed, in config order.
    ///
    /// # Errors
    /// Pins of another version, an incompatible pinned map, or any load, map or attach
    /// failure, naming the object.
    pub fn load(config: &config::Config) -> Result<(Dataplane, Vec<Installed>)> {
        let pins = Pins::new(&config.pin_path);
        pins.check_versions()?;
        pins.prepare()?;
        let lock = pins.lock()?;
        let adopt = pins.exists();
        let (redirect, why) = resolve_forwarding(config.forwarding, &config.interfaces);
        tracing::info!(redirect, "forwarding: {why}");
        let options = Options {
            udp_idle_timeout: config.udp_idle_timeout,
            redirect,
            max_flows: config.max_flows,
            tcp_idle_timeout: config.tcp_idle_timeout,
            max_services: config.max_services,
            object: None,
        };
        if adopt {
            check_sizes(&pins, &options)?;
        }
        let mut dp = Dataplane::load_object(options, Some(&pins), adopt, &[], ring_elements(&config.services))?;
        dp.lock = Some(lock);
        let installed = dp.install_all(&config.services, adopt)?;
        dp.program()?.load().map_err(DataplaneError::Program)?;
        dp.shadow_program()?.load().map_err(DataplaneError::Program)?;
        // The new tables take over from the previous daemon's with the program (its program
        // keeps its own `RING` until the links are updated).
        for (name, map) in [(MAP_RING, dp.ring.map()), (MAP_RING_LIVE, dp.ring_live.map())] {
            let path = pins.map(name);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DataplaneError::Pin { path, source: e });
                }
                _ => {}
            }
            map.pin(&path).map_err(|e| DataplaneError::Pin { path, source: std::io::Error::other(e) })?;
        }
        dp.attach_pinned(&config.interfaces, config.xdp_mode, &pins)?;
        dp.attach_shadow(&config.interfaces, &pins);
        dp.map_ids = pinned_map_names()
            .filter_map(|name| aya::maps::MapInfo::from_pin(pins.map(name)).ok().map(|info| (name, info.id())))
            .collect();
        if adopt {
            tracing::info!(pins = %pins.version_dir().display(), "adopted the pinned data path: flows and counters carry on");
        }
        dp.pins = Some(pins);
        Ok((dp, installed))
    }

    /// Loads the program into the kernel and fills its maps, without pins and without
    /// attaching it anywhere (data-path tests run it with `BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// Any load or map failure, naming the object.
    pub fn open(services: &[ServiceConfig], options: Options) -> Result<Dataplane> {
        Dataplane::open_sized(services, options, &[])
    }

    /// Like [`Dataplane::open`], with some maps given other sizes, `(name, max_entries)`: for
    /// the benchmarks (e.g. a `SERVICES` table of 10,000 keys).
    ///
    /// # Errors
    /// As [`Dataplane::open`].
    pub fn open_sized(services: &[ServiceConfig], options: Options, sizes: &[(&str, u32)]) -> Result<Dataplane> {
        let mut dp = Dataplane::load_object(options, None, false, sizes, ring_elements(services))?;
        dp.install_all(services, false)?;
        dp.program()?.load().map_err(DataplaneError::Program)?;
        dp.shadow_program()?.load().map_err(DataplaneError::Program)?;
        Ok(dp)
    }

    /// Loads the object (maps created, or reused from `pins`); the program is not loaded yet.
    fn load_object(
        options: Options,
        pins: Option<&Pins>,
        adopt: bool,
        sizes: &[(&str, u32)],
        ring: u32,
    ) -> Result<Dataplane> {
        let object = options.object.unwrap_or(PROGRAM);
        if object.is_empty() {
            return Err(DataplaneError::NoProgram);
        }
        let udp_idle_ns = u64::try_from(options.udp_idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let forward_mode = if options.redirect { FORWARD_REDIRECT } else { FORWARD_KERNEL };
        let mut loader = EbpfLoader::new();
        loader.override_global(GLOBAL_UDP_IDLE_NS, &udp_idle_ns, true).override_global(
            GLOBAL_FORWARD_MODE,
            &forward_mode,
            true,
        );
        if let Some(pins) = pins {
            // `RING` and `RING_LIVE` are made afresh (see `Dataplane::load`), and pinned then;
            // `SCRATCH` is never pinned.
            for name in pinned_map_names().filter(|n| ![MAP_RING, MAP_RING_LIVE].contains(n)) {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let sets = switcher_common::flow_sets(options.max_flows.unwrap_or(switcher_common::MAX_FLOWS));
        let set_mask = sets - 1;
        loader.map_max_entries(MAP_FLOWS, sets).override_global(GLOBAL_FLOW_SET_MASK, &set_mask, true);
        for (name, n) in service_map_sizes(options.max_services.unwrap_or(MAX_SERVICES)) {
            loader.map_max_entries(name, n);
        }
        let ring = sizes.iter().find(|(n, _)| *n == MAP_RING).map_or(ring, |(_, n)| *n);
        loader.map_max_entries(MAP_RING, ring);
        for &(name, n) in sizes {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader.load(object).map_err(DataplaneError::Load)?;
        // The logger task forwards the program's rare log lines to `log`/`tracing`. Without a
        // runtime the logger is kept unread: its ring buffer must stay open for the program.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => {
                tracing::debug!("no eBPF log forwarding: {e}");
                None
            }
        };
        let mut meta: Array<MapData, u32> = take(&mut ebpf, MAP_META)?;
        let found = meta.get(&0, 0).map_err(map_err(MAP_META))?;
        if adopt && found != ABI_VERSION {
            return Err(DataplaneError::Incompatible { found, path: pins.map(|p| p.maps_dir()).unwrap_or_default() });
        }
        meta.set(0, &ABI_VERSION, 0).map_err(map_err(MAP_META))?;
        let flows: Array<MapData, FlowSet> = take(&mut ebpf, MAP_FLOWS)?;
        let table = std::sync::Arc::new(
            crate::flowtable::FlowTable::open(flows.map().fd()).map_err(DataplaneError::FlowTable)?,
        );
        Ok(Dataplane {
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            ring: take(&mut ebpf, MAP_RING)?,
            ring_live: take(&mut ebpf, MAP_RING_LIVE)?,
            state: take(&mut ebpf, MAP_STATE)?,
            table,
            flows,
            reverse: take(&mut ebpf, MAP_REVERSE)?,
            now: take(&mut ebpf, MAP_NOW)?,
            counters: take(&mut ebpf, MAP_COUNTERS)?,
            stats: take(&mut ebpf, MAP_STATS)?,
            ports: take(&mut ebpf, MAP_PORTS)?,
            vips: take(&mut ebpf, MAP_VIPS)?,
            pools: StdHashMap::new(),
            slab: Slab::new(ring),
            service_ports: StdHashMap::new(),
            ports_written: StdHashMap::new(),
            service_vips: StdHashMap::new(),
            vips_written: std::collections::HashSet::new(),
            service_fronts: StdHashMap::new(),
            reverse_written: StdHashMap::new(),
            started_ns: now_coarse_ns(),
            reverse_changed: std::time::Instant::now(),
            counter: None,
            options,
            links: Vec::new(),
            link_ids: Vec::new(),
            map_ids: Vec::new(),
            pins: None,
            lock: None,
            _meta: meta,
            _logger: logger,
            shadow_ready: false,
            shadow_link_ids: Vec::new(),
            shadow_links: Vec::new(),
            ebpf,
        })
    }

    /// The XDP program (loaded by [`Dataplane::open`]).
    ///
    /// # Errors
    /// The object has no such program.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(PROG_NAME)
            .ok_or(DataplaneError::Missing { what: "program", name: PROG_NAME })?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    /// Writes a flow entry directly (benchmarks fill the table with it).
    ///
    /// # Errors
    /// The map update failed.
    pub fn insert_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        self.table.insert(key, flow);
        Ok(())
    }

    /// Writes a `SERVICES` entry directly (benchmarks fill the table with it).
    ///
    /// # Errors
    /// The map write failed (e.g. the table is full).
    pub fn insert_service_key(&mut self, key: &ServiceKey, service: &Service) -> Result<()> {
        self.services.insert(key, service, 0).map_err(map_err(MAP_SERVICES))
    }

    /// A `SERVICES` entry, as the data path would find it.
    ///
    /// # Errors
    /// The map read failed or there is no such key.
    pub fn service_entry(&self, key: &ServiceKey) -> Result<Service> {
        self.services.get(key, 0).map_err(map_err(MAP_SERVICES))
    }

    /// Locked kernel memory of each map, from `/proc/self/fdinfo` (name, bytes).
    #[must_use]
    pub fn map_memory(&self) -> Vec<(String, u64)> {
        let memlock = |fd: std::os::fd::BorrowedFd<'_>| -> Option<u64> {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            info.lines().find_map(|l| l.strip_prefix("memlock:"))?.trim().parse().ok()
        };
        let mut out: Vec<(String, u64)> = self
            .named_maps()
            .filter_map(|(name, m)| Some((name, memlock(std::os::fd::AsFd::as_fd(m.fd()))?)))
            .collect();
        // The maps the engine does not hold open by type (shadow traffic's), by their ids.
        for name in MAP_NAMES {
            if out.iter().any(|(n, _)| n == name) {
                continue;
            }
            let data = match self.ebpf.map(name) {
                Some(
                    aya::maps::Map::Array(d)
                    | aya::maps::Map::HashMap(d)
                    | aya::maps::Map::LruHashMap(d)
                    | aya::maps::Map::PerCpuArray(d),
                ) => d,
                _ => continue,
            };
            if let Some(bytes) = memlock(std::os::fd::AsFd::as_fd(data.fd())) {
                out.push((name.to_owned(), bytes));
            }
        }
        out
    }

    fn named_maps(&self) -> impl Iterator<Item = (String, &MapData)> {
        use aya::maps::IterableMap as _;
        [
            (MAP_SERVICES, self.services.map()),
            (MAP_BACKENDS, self.backends.map()),
            (MAP_RING, self.ring.map()),
            (MAP_RING_LIVE, self.ring_live.map()),
            (MAP_STATE, self.state.map()),
            (MAP_FLOWS, self.flows.map()),
            (MAP_REVERSE, self.reverse.map()),
            (MAP_NOW, self.now.map()),
            (MAP_COUNTERS, self.counters.map()),
            (MAP_STATS, self.stats.map()),
            (MAP_META, self._meta.map()),
            (MAP_PORTS, self.ports.map()),
            (MAP_VIPS, self.vips.map()),
        ]
        .into_iter()
        .map(|(n, m)| (n.to_owned(), m))
    }

    /// Attaches the program to each interface (names resolved in this thread's network
    /// namespace) through a bpf_link pinned under `links/<ifname>`. Where a link is pinned
    /// already, the program under it is replaced atomically (`bpf_link_update`): traffic never
    /// sees the interface without a program.
    ///
    /// # Errors
    /// The first interface that cannot be attached, with the mode; an attachment that fell back
    /// to netlink (kernel < 5.9), which cannot be pinned.
    fn attach_pinned(&mut self, interfaces: &[String], mode: config::XdpMode, pins: &Pins) -> Result<()> {
        let aya_mode = match mode {
            config::XdpMode::Native => XdpMode::Driver,
            config::XdpMode::Skb => XdpMode::Skb,
        };
        let mut links = Vec::new();
        let mut link_ids = Vec::new();
        for iface in interfaces {
            let path = pins.link(iface);
            let prog = self.program()?;
            let id = match PinnedLink::from_pin(&path) {
                Ok(pinned) => {
                    // Held by our fd while the pin is replaced: the link never drops.
                    let fd_link =
                        pinned.unpin().map_err(|source| DataplaneError::Pin { path: path.clone(), source })?;
                    let link = XdpLink::try_from(fd_link)
                        .map_err(|source| DataplaneError::Link { iface: iface.clone(), source })?;
                    let id = prog.attach_to_link(link).map_err(DataplaneError::Program)?;
                    tracing::info!(interface = %iface, "replaced the program under the pinned link");
                    id
                }
                Err(_) => {
                    let name = CString::new(iface.as_str()).map_err(|_| DataplaneError::BadName(iface.clone()))?;
                    let id = prog.attach(name.as_c_str(), aya_mode).map_err(|source| DataplaneError::Attach {
                        iface: iface.clone(),
                        mode,
                        source,
                    })?;
                    tracing::info!(interface = %iface, ?mode, "attached XDP program");
                    id
                }
            };
            let link = self.program()?.take_link(id).map_err(DataplaneError::Program)?;
            let fd_link = FdLink::try_from(link).map_err(|_| DataplaneError::NetlinkOnly { iface: iface.clone() })?;
            let info = fd_link.info().map_err(|source| DataplaneError::Link { iface: iface.clone(), source })?;
            link_ids.push((iface.clone(), info.id()));
            let pinned = fd_link.pin(&path).map_err(|source| DataplaneError::PinLink { path: path.clone(), source })?;
            links.push(pinned);
        }
        // Interfaces pinned before but no longer configured are detached.
        for iface in pins.linked_interfaces() {
            if !interfaces.contains(&iface) {
                let _ = std::fs::remove_file(pins.link(&iface));
                tracing::info!(interface = %iface, "detached (no longer configured)");
            }
        }
        self.links = links;
        self.link_ids = link_ids;
        Ok(())
    }

    /// Pins again what was removed from under the running daemon (an `rm -rf` of the pin
    /// directory, bpffs unmounted): without its pins the data path would stop when the daemon
    /// exits, by the ids noted when they were pinned; this process's descriptors keep both
    /// alive meanwhile. Returns what was
    /// pinned again (empty: nothing was missing).
    ///
    /// # Errors
    /// The directories, the program's info, or a pin could not be made.
    pub fn repin(&mut self) -> Result<Vec<String>> {
        use std::os::unix::fs::MetadataExt as _;
        let Some(pins) = self.pins.clone() else { return Ok(Vec::new()) };
        let maps: Vec<(&str, u32)> = self.map_ids.iter().copied().filter(|(n, _)| !pins.map(n).exists()).collect();
        let links: Vec<(String, u32)> =
            self.link_ids.iter().filter(|(iface, _)| !pins.link(iface).exists()).cloned().collect();
        let tc_links = self.shadow_links_missing(&pins);
        if maps.is_empty() && links.is_empty() && tc_links.is_empty() {
            return Ok(Vec::new());
        }
        pins.prepare()?;
        let mut done = Vec::new();
        for (name, id) in maps {
            let path = pins.map(name);
            crate::pins::pin_by_id(crate::pins::Object::Map, id, &path)
                .map_err(|source| DataplaneError::Repin { path, source })?;
            done.push(format!("maps/{name}"));
        }
        for (iface, id) in links {
            let path = pins.link(&iface);
            crate::pins::pin_by_id(crate::pins::Object::Link, id, &path)
                .map_err(|source| DataplaneError::Repin { path, source })?;
            done.push(format!("links/{iface}"));
        }
        done.extend(repin_shadow(&pins, tc_links)?);
        // A removed root is a new directory now: the lock must be on it.
        let locked = self.lock.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
        let root = std::fs::metadata(pins.root()).ok().map(|m| (m.dev(), m.ino()));
        if locked != root {
            self.lock = Some(pins.lock()?);
        }
        Ok(done)
    }

    /// Whether every map and link of this daemon is pinned: the data path outlives it.
    #[must_use]
    pub fn pinned(&self) -> bool {
        self.pins.as_ref().is_some_and(|pins| {
            pinned_map_names().all(|n| pins.map(n).exists())
                && self.link_ids.iter().all(|(i, _)| pins.link(i).exists())
                && self.shadow_links_missing(pins).is_empty()
        })
    }

    /// Detaches and removes every pin: the end of `--detach-on-exit` and `uninstall`.
    ///
    /// # Errors
    /// A pin could not be removed.
    pub fn detach(&mut self) -> std::io::Result<()> {
        self.links.clear();
        self.link_ids.clear();
        self.shadow_links.clear();
        self.shadow_link_ids.clear();
        match self.pins.take() {
            Some(pins) => pins.remove(),
            None => Ok(()),
        }
    }

    /// Changes how long an open TCP flow may idle before it stops counting as live (reload).
    pub fn set_tcp_idle_timeout(&mut self, timeout: Duration) {
        self.options.tcp_idle_timeout = timeout;
        if let Some(c) = &self.counter {
            c.set_tcp_idle_timeout(timeout);
        }
    }

    /// Sets or clears a service's drain flag in `STATE` (see `switcher_common::with_draining`),
    /// leaving the rest of its switch state as it is.
    ///
    /// # Errors
    /// A map read or write failed.
    pub fn set_draining(&mut self, id: u32, draining: bool) -> Result<()> {
        let state = self.state.get(&id, 0).map_err(map_err(MAP_STATE))?;
        let new = switcher_common::with_draining(state, draining);
        if new != state {
            self.state.set(id, &new, 0).map_err(map_err(MAP_STATE))?;
        }
        Ok(())
    }

    /// The once-a-second upkeep: writes the daemon's clock into `NOW`, which open TCP flows
    /// are stamped with, and frees the `RING` elements of tables replaced since the last call.
    ///
    /// # Errors
    /// The map write failed.
    pub fn stamp_clock(&mut self) -> Result<()> {
        self.slab.settle();
        self.now.set(0, &now_coarse_ns(), 0).map_err(map_err(MAP_NOW))
    }

    /// The `REVERSE` entries, for tests and diagnostics: backend → (VIP, port) pairs.
    #[must_use]
    pub fn reverse_entries(&self) -> Vec<(SocketAddr, Vec<SocketAddr>)> {
        self.reverse_written
            .iter()
            .map(|(k, r)| {
                let backend = SocketAddr::new(addr_ip(k.addr, k.family), u16::from_be_bytes(k.port));
                let to =
                    r.to.iter()
                        .take(r.count as usize)
                        .map(|v| SocketAddr::new(addr_ip(v.vip, k.family), u16::from_be_bytes(v.port)))
                        .collect();
                (backend, to)
            })
            .collect()
    }

    /// The cut-over, rollback and canary: one 4-byte map write of the service's switch state.
    ///
    /// # Errors
    /// The map update failed.
    pub fn set_state(&mut self, id: u32, active: Colour, canary_bp: u32, previous: Option<Colour>) -> Result<()> {
        let state = switcher_common::with_previous(
            switcher_common::switch_state(active.as_u32(), canary_bp.min(BP_ALL)),
            previous.map(Colour::as_u32),
        );
        // The drain flag is the switchboard's to set (`set_draining`): kept as it is.
        let draining = self.state.get(&id, 0).is_ok_and(|s| s & (1 << 19) != 0);
        let state = switcher_common::with_draining(state, draining);
        self.state.set(id, &state, 0).map_err(map_err(MAP_STATE))
    }

    /// The switch state as the data path sees it: active colour and canary share.
    ///
    /// # Errors
    /// The map lookup failed.
    pub fn state(&self, id: u32) -> Result<(Colour, u32)> {
        let s = self.state.get(&id, 0).map_err(map_err(MAP_STATE))?;
        Ok((Colour::from_u32(switcher_common::state_active(s)), switcher_common::state_canary_bp(s)))
    }

    /// A colour's counters, summed over CPUs.
    ///
    /// # Errors
    /// The map lookup failed.
    pub fn counters(&self, id: u32, colour: Colour) -> Result<Counters> {
        let per_cpu = self.counters.get(&colour_slot(id, colour.as_u32()), 0).map_err(map_err(MAP_COUNTERS))?;
        Ok(per_cpu.iter().fold(Counters::default(), |mut t, c| {
            t.add(&Counters::from(c));
            t
        }))
    }

    /// Packets per data-path verdict reason, summed over CPUs, as `(name, count)`.
    ///
    /// # Errors
    /// The map lookup failed.
    pub fn reasons(&self) -> Result<Vec<(&'static str, u64)>> {
        Reason::NAMES
            .iter()
            .zip(0u32..)
            .map(|(name, i)| {
                let per_cpu = self.stats.get(&i, 0).map_err(map_err(MAP_STATS))?;
                Ok((*name, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Sizes of the maps indexed by service id for `max_services` services.
fn service_map_sizes(max_services: u32) -> [(&'static str, u32); 9] {
    let colours = max_services * switcher_common::COLOURS;
    [
        (MAP_SERVICES, max_services * 2),
        (MAP_STATE, max_services),
        (MAP_RING_LIVE, colours),
        (MAP_COUNTERS, colours),
        (MAP_BACKENDS, colours * MAX_POOL),
        (MAP_REVERSE, colours * MAX_POOL),
        (switcher_common::MAP_SHADOW, max_services),
        (switcher_common::MAP_SHADOW_BUCKET, max_services),
        (switcher_common::MAP_SHADOW_COUNTERS, colours),
    ]
}

/// Refuses to start on pinned maps made with another `max_flows` or `max_services`, saying
/// which key and what to do (instead of the loader's "incompatible pinned map").
fn check_sizes(pins: &Pins, options: &Options) -> Result<()> {
    let pinned = |name: &str| aya::maps::MapInfo::from_pin(pins.map(name)).ok().map(|i| i.max_entries());
    let services = options.max_services.unwrap_or(MAX_SERVICES);
    let checks = [
        ("max_flows", MAP_FLOWS, options.max_flows.unwrap_or(switcher_common::MAX_FLOWS)),
        ("max_services", MAP_STATE, services),
    ];
    for (key, map, configured) in checks {
        // `FLOWS` has `flow_sets(max_flows)` entries; a `max_flows` that rounds to the same
        // table is the same.
        let flows = map == MAP_FLOWS;
        let want = if flows { switcher_common::flow_sets(configured) } else { configured };
        if let Some(found) = pinned(map)
            && found != want
        {
            let pinned = if flows { found.saturating_mul(switcher_common::FLOW_WAYS) / 2 } else { found };
            return Err(DataplaneError::Resized { key, configured, pinned });
        }
    }
    Ok(())
}

/// Forwards the logger's records on the current tokio runtime; hands it back if there is none.
fn spawn_logger(logger: Logger) -> Option<Logger> {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return Some(logger) };
    rt.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, and the AsyncFd owns the logger, so
        // the fd stays open for as long as it is registered.
        let registered =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let Ok(mut fd) = registered else { return };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_forwarding_avoids_redirect_into_virtual_interfaces() {
        let lo = ["lo".to_owned()];
        assert!(!resolve_forwarding(config::Forwarding::Auto, &lo).0, "lo is virtual");
        assert!(!resolve_forwarding(config::Forwarding::Auto, &["no-such-if0".to_owned()]).0);
        assert!(resolve_forwarding(config::Forwarding::Redirect, &lo).0);
        assert!(!resolve_forwarding(config::Forwarding::Kernel, &lo).0);
        assert!(resolve_forwarding(config::Forwarding::Auto, &lo).1.contains("gro on tx off"));
    }
}

#[cfg(test)]
mod object_tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::PROGRAM;

    /// The embedded object's maps are exactly the ones `switcher-common` names (plus aya-log's
    /// ring buffer: nothing of the benchmarks'), and its one program section is the XDP entry
    /// point.
    #[test]
    fn embedded_object_matches_the_abi_names() {
        if PROGRAM.is_empty() {
            eprintln!("skipping embedded_object_matches_the_abi_names: built with AYA_BUILD_SKIP");
            return;
        }
        let obj = object::File::parse(PROGRAM).expect("parse the embedded eBPF object");
        let maps_section =
            obj.section_by_name(".maps").or_else(|| obj.section_by_name("maps")).expect("a maps section");
        let mut maps: Vec<String> = obj
            .symbols()
            .filter(|s| s.section_index() == Some(maps_section.index()))
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect();
        maps.sort();
        let mut expected: Vec<String> = switcher_common::MAP_NAMES.iter().map(|s| (*s).to_owned()).collect();
        expected.push("AYA_LOGS".into());
        expected.sort();
        assert_eq!(maps, expected);
        let xdp = obj.section_by_name("xdp").expect("an `xdp` program section");
        let programs: Vec<&str> = obj
            .symbols()
            .filter(|s| s.section_index() == Some(xdp.index()) && s.kind() == object::SymbolKind::Text)
            .filter_map(|s| s.name().ok())
            .collect();
        assert_eq!(programs, [switcher_common::PROG_NAME], "the daemon's object holds its one program only");
        for global in [switcher_common::GLOBAL_FORWARD_MODE, switcher_common::GLOBAL_UDP_IDLE_NS] {
            assert!(obj.symbols().any(|s| s.name() == Ok(global)), "global {global}");
        }
    }
}
