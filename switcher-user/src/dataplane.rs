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
    FORWARD_KERNEL, FORWARD_REDIRECT, Flow, FlowKey, GLOBAL_FORWARD_MODE, GLOBAL_UDP_IDLE_NS, MAP_BACKENDS,
    MAP_COUNTERS, MAP_FLOWS, MAP_META, MAP_NAMES, MAP_NOW, MAP_PORTS, MAP_REVERSE, MAP_RING, MAP_RING_LIVE,
    MAP_SERVICES, MAP_STATE, MAP_STATS, MAP_VIPS, MAX_POOL, MAX_SERVICES, PORT_BACKEND, PORT_SERVICE, PROG_NAME,
    REVERSE_WAYS, RING_CHUNK, RING_EMPTY, RING_NONE, RING_SIZES, Reason, Reverse, RingChunk, SEED_CANARY, SEED_RING,
    SERVICE_DSR, SERVICE_PREVIEW, Service, ServiceKey, VipPort, colour_slot, flow_hash, new_flow_colour, pool_slot,
    ring_class, user::Colour,
};

use crate::{
    config::{self, BackendConfig, Mode, ServiceConfig},
    maglev,
    pins::{Pins, PinsError},
    slab::{self, Slab, SlabFull},
};

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

/// The end of a drain, as [`Dataplane::drain_end`] prepared it: runs on its own descriptor
/// of `FLOWS`, batch by batch.
#[derive(Debug)]
pub struct DrainEnd {
    flows: std::os::fd::OwnedFd,
    id: u32,
    from: Colour,
    action: config::DrainAction,
    /// The service's switch state when the drain ended: where a new flow goes.
    state: u32,
    preview: Option<[u8; 2]>,
    /// Blue's and green's live table and backends by slot.
    pools: [(Vec<u16>, Vec<Option<Backend>>); 2],
}

impl DrainEnd {
    /// Moves or resets the drain's flows; returns how many.
    ///
    /// # Errors
    /// A read of the map failed.
    pub fn run(&self) -> std::io::Result<u64> {
        use crate::flowcount::{lookup, update};
        let mut handled = 0;
        crate::flowcount::walk(&self.flows, |keys, values| {
            for (key, flow) in keys.iter().zip(values) {
                if flow.service != self.id
                    || u32::from(flow.colour) != self.from.as_u32()
                    || flow.flags & FLOW_CLOSING != 0
                {
                    continue;
                }
                // The data path may have given the 5-tuple a new flow since the batch was
                // read: only the flow we saw is touched.
                if lookup(&self.flows, key).as_ref() != Some(flow) {
                    continue;
                }
                let new = match self.action {
                    config::DrainAction::Reset => Flow { flags: flow.flags | FLOW_RESET, ..*flow },
                    config::DrainAction::Move => {
                        let colour = Colour::from_u32(new_flow_colour(
                            self.state,
                            self.preview == Some(key.dport),
                            flow_hash(key, SEED_CANARY),
                        ));
                        let Some((idx, backend)) = self.pick(colour, key) else { continue };
                        Flow { backend, colour: colour.as_u32() as u8, backend_idx: idx, ..*flow }
                    }
                };
                if update(&self.flows, key, &new).is_ok() {
                    handled += 1;
                }
            }
        })?;
        Ok(handled)
    }

    /// The backend the live table gives a flow, as the data path would pick it.
    fn pick(&self, colour: Colour, key: &FlowKey) -> Option<(u16, Backend)> {
        let (table, slots) = &self.pools[usize::from(colour == Colour::Green)];
        let size = u32::try_from(table.len()).ok().filter(|n| *n > 0)?;
        let idx = *table.get((flow_hash(key, SEED_RING) % size) as usize)?;
        Some((idx, (*slots.get(usize::from(idx))?)?))
    }
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
    flows: HashMap<MapData, FlowKey, Flow>,
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
        };
        if adopt {
            check_sizes(&pins, &options)?;
        }
        let mut dp = Dataplane::load_object(options, Some(&pins), adopt, &[], ring_elements(&config.services))?;
        dp.lock = Some(lock);
        let installed = dp.install_all(&config.services, adopt)?;
        dp.program()?.load().map_err(DataplaneError::Program)?;
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
        dp.map_ids = MAP_NAMES
            .iter()
            .filter_map(|name| aya::maps::MapInfo::from_pin(pins.map(name)).ok().map(|info| (*name, info.id())))
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
        if PROGRAM.is_empty() {
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
            // `RING` and `RING_LIVE` are made afresh (see `Dataplane::load`).
            for name in MAP_NAMES.into_iter().filter(|n| ![MAP_RING, MAP_RING_LIVE].contains(n)) {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        if let Some(n) = options.max_flows {
            loader.map_max_entries(MAP_FLOWS, n);
        }
        for (name, n) in service_map_sizes(options.max_services.unwrap_or(MAX_SERVICES)) {
            loader.map_max_entries(name, n);
        }
        let ring = sizes.iter().find(|(n, _)| *n == MAP_RING).map_or(ring, |(_, n)| *n);
        loader.map_max_entries(MAP_RING, ring);
        for &(name, n) in sizes {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader.load(PROGRAM).map_err(DataplaneError::Load)?;
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
        Ok(Dataplane {
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            ring: take(&mut ebpf, MAP_RING)?,
            ring_live: take(&mut ebpf, MAP_RING_LIVE)?,
            state: take(&mut ebpf, MAP_STATE)?,
            flows: take(&mut ebpf, MAP_FLOWS)?,
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
        self.flows.insert(key, flow, 0).map_err(map_err(MAP_FLOWS))
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
        self.named_maps()
            .filter_map(|(name, m)| {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(m.fd()));
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                let bytes = info.lines().find_map(|l| l.strip_prefix("memlock:"))?.trim().parse().ok()?;
                Some((name, bytes))
            })
            .collect()
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
        if maps.is_empty() && links.is_empty() {
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
            MAP_NAMES.iter().all(|n| pins.map(n).exists()) && self.link_ids.iter().all(|(i, _)| pins.link(i).exists())
        })
    }

    /// Detaches and removes every pin: the end of `--detach-on-exit` and `uninstall`.
    ///
    /// # Errors
    /// A pin could not be removed.
    pub fn detach(&mut self) -> std::io::Result<()> {
        self.links.clear();
        self.link_ids.clear();
        match self.pins.take() {
            Some(pins) => pins.remove(),
            None => Ok(()),
        }
    }

    /// Installs `services`: with `adopt`, services already in the maps keep their id, switch
    /// state and backend slots, removed ones are deleted; new ones start as configured.
    /// Returns the services as installed, in order.
    ///
    /// In three passes, so that thousands of services cost no more than thousands of map
    /// writes: every pool's `BACKENDS` slots; then `VIPS`, `PORTS` and `REVERSE` once; then
    /// every table and the `SERVICES` keys, which need all of those.
    fn install_all(&mut self, services: &[ServiceConfig], adopt: bool) -> Result<Vec<Installed>> {
        let existing: StdHashMap<ServiceKey, Service> =
            if adopt { self.services.iter().filter_map(std::result::Result::ok).collect() } else { StdHashMap::new() };
        if adopt && self.reverse_written.is_empty() {
            // Backends that left their pool keep their entries while flows may use them.
            self.reverse_written = self.reverse.iter().filter_map(std::result::Result::ok).collect();
        }
        self.stamp_clock()?;
        let room = self.options.max_services.unwrap_or(MAX_SERVICES);
        let ids: Vec<Option<u32>> =
            services.iter().map(|s| existing.get(&service_key(s, s.port)).map(|svc| svc.id)).collect();
        let mut used: std::collections::HashSet<u32> = ids.iter().flatten().copied().collect();
        let mut next_free = 0..room;
        let mut changed: Vec<ServiceKey> = Vec::new();
        let mut placed = Vec::with_capacity(services.len());
        for (s, id) in services.iter().zip(ids) {
            let id = match id {
                Some(id) => {
                    self.seed_pools(id, s)?;
                    id
                }
                None => {
                    let id = next_free.find(|i| !used.contains(i)).ok_or(DataplaneError::TooManyServices(room))?;
                    used.insert(id);
                    self.set_state(id, s.active, 0, None)?;
                    id
                }
            };
            let key = service_key(s, s.port);
            self.service_vips.insert(id, switcher_common::vip_slot(&key.vip, key.family));
            self.service_ports.insert(id, std::iter::once(s.port).chain(s.preview_port).collect());
            if s.mode == Mode::Nat {
                let fronts = std::iter::once(s.port)
                    .chain(s.preview_port)
                    .map(|p| VipPort { vip: key.vip, port: p.to_be_bytes(), _pad: [0; 2] })
                    .collect();
                self.service_fronts.insert(id, (fronts, key.proto));
            } else {
                self.service_fronts.remove(&id);
            }
            placed.push(id);
        }
        // Refused before any pool is written: a backend answering for too many VIP:ports.
        fronts_fit(&self.fronts_of(services.iter().zip(&placed).flat_map(|(s, &id)| {
            Colour::ALL.into_iter().flat_map(move |c| s.pool(c).iter().map(move |b| (id, b.addr)))
        })))?;
        for (s, &id) in services.iter().zip(&placed) {
            for colour in Colour::ALL {
                self.stage_pool(id, colour, s.pool(colour))?;
            }
        }
        // The VIP, port and reply bits go in before the tables and keys that need them.
        self.write_vips()?;
        self.write_ports()?;
        self.write_reverse()?;
        let mut installed = Vec::with_capacity(services.len());
        for (s, &id) in services.iter().zip(&placed) {
            for colour in Colour::ALL {
                self.publish_table(id, colour)?;
            }
            let key = service_key(s, s.port);
            let mut flags = if s.mode == Mode::Dsr { SERVICE_DSR } else { 0 };
            if existing.get(&key).is_some_and(|old| old.flags & SERVICE_DSR != flags) {
                // NAT ↔ DSR: the open flows recorded the old mode (`FLOW_DSR`); they go.
                changed.push(key);
                changed.extend(s.preview_port.map(|p| service_key(s, p)));
            }
            self.services.insert(&key, &Service { id, flags }, 0).map_err(map_err(MAP_SERVICES))?;
            if let Some(preview) = s.preview_port {
                flags |= SERVICE_PREVIEW;
                self.services
                    .insert(&service_key(s, preview), &Service { id, flags }, 0)
                    .map_err(map_err(MAP_SERVICES))?;
            }
            let state = self.state.get(&id, 0).map_err(map_err(MAP_STATE))?;
            installed.push(Installed {
                id,
                active: Colour::from_u32(switcher_common::state_active(state)),
                canary_bp: switcher_common::state_canary_bp(state),
                previous: switcher_common::state_previous(state).map(Colour::from_u32),
            });
        }
        // Keys of services that are gone (or moved to another port) are removed.
        let wanted: std::collections::HashSet<ServiceKey> = services
            .iter()
            .flat_map(|s| std::iter::once(service_key(s, s.port)).chain(s.preview_port.map(|p| service_key(s, p))))
            .collect();
        for key in existing.keys().filter(|k| !wanted.contains(k)) {
            let _ = self.services.remove(key);
            changed.push(*key);
        }
        // The data path forwards a known flow before it looks its service up: the flows of a
        // service that is gone (or changed mode) must go with it.
        if !changed.is_empty() {
            let n = self.purge_flows(&changed);
            if n > 0 {
                tracing::info!(flows = n, "removed the open flows of services that were removed or changed mode");
            }
        }
        let ids: std::collections::HashSet<u32> = placed.iter().copied().collect();
        self.service_ports.retain(|id, _| ids.contains(id));
        self.service_vips.retain(|id, _| ids.contains(id));
        self.service_fronts.retain(|id, _| ids.contains(id));
        let gone: Vec<(u32, Colour)> = self.pools.keys().filter(|(id, _)| !ids.contains(id)).copied().collect();
        for key in gone {
            if let Some((at, len)) = self.pools.remove(&key).and_then(|p| p.live) {
                let _ = self.ring_live.set(colour_slot(key.0, key.1.as_u32()), &RING_NONE, 0);
                self.slab.release(at, len);
            }
        }
        self.write_vips()?;
        self.write_ports()?;
        self.write_reverse()?;
        Ok(installed)
    }

    /// Re-reads an adopted service's pools from the maps, so its backends keep their slots.
    fn seed_pools(&mut self, id: u32, s: &ServiceConfig) -> Result<()> {
        if self.pools.contains_key(&(id, Colour::Blue)) {
            return Ok(());
        }
        for colour in Colour::ALL {
            let mut pool = Pool { slots: vec![None; MAX_POOL as usize], ..Pool::default() };
            for i in 0..MAX_POOL {
                let b = self.backends.get(&pool_slot(id, colour.as_u32(), i), 0).map_err(map_err(MAP_BACKENDS))?;
                if !b.is_set() {
                    continue;
                }
                let addr = SocketAddr::new(addr_ip(b.addr, b.family), u16::from_be_bytes(b.port));
                pool.slots[i as usize] = s.pool(colour).iter().find(|c| c.addr == addr).copied();
            }
            while pool.slots.last().is_some_and(Option::is_none) {
                pool.slots.pop();
            }
            self.pools.insert((id, colour), pool);
        }
        Ok(())
    }

    /// Applies a changed service list (reload): the same as an adopting start.
    ///
    /// # Errors
    /// As [`Dataplane::load`]'s map writes.
    pub fn apply(&mut self, services: &[ServiceConfig]) -> Result<Vec<Installed>> {
        self.install_all(services, true)
    }

    /// Sets a colour's pool: new backends get free slots, kept ones keep theirs, the Maglev
    /// table is rebuilt into free elements of `RING` and then made live with one write.
    ///
    /// # Errors
    /// More than `MAX_POOL` backends, a full slab, or a map write failed.
    pub fn set_pool(&mut self, id: u32, colour: Colour, backends: &[BackendConfig]) -> Result<()> {
        // Only weights changed (health checks take a backend out with weight 0): the ports and
        // `REVERSE`, which depend on addresses alone, stay as they are; only the table changes.
        let same_members = self.pools.get(&(id, colour)).is_some_and(|pool| {
            let mut members = pool.slots.iter().flatten().map(|b| b.addr);
            members.clone().count() == backends.len() && members.all(|a| backends.iter().any(|b| b.addr == a))
        });
        if same_members {
            self.stage_pool(id, colour, backends)?;
            return self.publish_table(id, colour);
        }
        // Refused before anything is written: a backend answering for too many VIP:ports.
        fronts_fit(&self.pool_fronts(Some((id, colour, backends))))?;
        self.stage_pool(id, colour, backends)?;
        // Replies of the new backends are recognised (their port bit and `REVERSE` entry)
        // before any flow can reach them.
        self.write_reverse()?;
        self.write_ports()?;
        self.publish_table(id, colour)
    }

    /// Puts a colour's backends in their `BACKENDS` slots (new ones in free slots, kept ones
    /// in theirs) and builds its next table; nothing routes to it before
    /// [`Dataplane::publish_table`].
    fn stage_pool(&mut self, id: u32, colour: Colour, backends: &[BackendConfig]) -> Result<()> {
        let mut pool = self.pools.remove(&(id, colour)).unwrap_or_default();
        // Slots up to the highest one in use (thousands of services hold small pools).
        pool.slots.truncate(MAX_POOL as usize);
        // Drop the ones that left; keep the others' slots.
        for slot in &mut pool.slots {
            if slot.is_some_and(|b| !backends.iter().any(|n| n.addr == b.addr)) {
                *slot = None;
            }
        }
        let mut result = Ok(());
        for b in backends {
            let i = match pool.slots.iter().position(|s| s.is_some_and(|k| k.addr == b.addr)) {
                Some(i) => i,
                None => match pool.slots.iter().position(Option::is_none) {
                    Some(i) => i,
                    None if pool.slots.len() < MAX_POOL as usize => {
                        pool.slots.push(None);
                        pool.slots.len() - 1
                    }
                    None => {
                        result = Err(DataplaneError::PoolFull);
                        break;
                    }
                },
            };
            pool.slots[i] = Some(*b);
            if let Err(e) = self.backends.set(pool_slot(id, colour.as_u32(), i as u32), &backend_value(b.addr), 0) {
                result = Err(map_err(MAP_BACKENDS)(e));
                break;
            }
        }
        let members: Vec<maglev::Member> = pool
            .slots
            .iter()
            .zip(0u16..)
            .filter_map(|(s, i)| s.map(|b| maglev::Member { name: b.addr.to_string(), weight: b.weight, index: i }))
            .collect();
        let table = if members.is_empty() {
            Vec::new()
        } else {
            maglev::build(&members, RING_SIZES[ring_class(members.len() as u32) as usize])
        };
        // A reload or a health check that gives the same table writes nothing.
        pool.dirty = pool.dirty || table != pool.table;
        pool.table = table;
        self.pools.insert((id, colour), pool);
        result
    }

    /// Writes a colour's staged table into free elements of `RING`, points `RING_LIVE` at it
    /// (one write: the next packet uses it) and lets the old table's elements rest.
    fn publish_table(&mut self, id: u32, colour: Colour) -> Result<()> {
        let Some(pool) = self.pools.get(&(id, colour)) else { return Ok(()) };
        if !pool.dirty {
            return Ok(());
        }
        let len = u32::try_from(pool.table.len().div_ceil(RING_CHUNK as usize)).unwrap_or(u32::MAX);
        let (live, value) = if len == 0 {
            (None, RING_NONE)
        } else {
            let at = self.slab.alloc(len)?;
            let mut written = Ok(());
            for (c, chunk) in (0u32..).zip(pool.table.chunks(RING_CHUNK as usize)) {
                let mut value = RingChunk { slots: [RING_EMPTY; RING_CHUNK as usize] };
                value.slots[..chunk.len()].copy_from_slice(chunk);
                written = self.ring.set(at + c, &value, 0).map_err(map_err(MAP_RING));
                if written.is_err() {
                    break;
                }
            }
            if let Err(e) = written {
                self.slab.release(at, len);
                return Err(e);
            }
            let class = RING_SIZES.iter().position(|&m| m as usize == pool.table.len()).unwrap_or(0);
            (Some((at, len)), switcher_common::ring_live(class as u32, at))
        };
        if let Err(e) = self.ring_live.set(colour_slot(id, colour.as_u32()), &value, 0) {
            if let Some((at, len)) = live {
                self.slab.release(at, len);
            }
            return Err(map_err(MAP_RING_LIVE)(e));
        }
        let old = self.pools.get_mut(&(id, colour)).and_then(|pool| {
            pool.dirty = false;
            std::mem::replace(&mut pool.live, live)
        });
        if let Some((at, len)) = old {
            self.slab.release(at, len);
        }
        Ok(())
    }

    /// Elements of `RING` in use and in all, and the bytes of one.
    #[must_use]
    pub fn ring_usage(&self) -> (u32, u32, u64) {
        (self.slab.used(), self.slab.capacity(), slab::ELEMENT_BYTES)
    }

    /// Brings `PORTS` in line with the services' and backends' ports: bits are set before a
    /// key that needs them is written, and cleared when no service or backend uses the port
    /// (a bit left set only costs a hash lookup that misses).
    fn write_ports(&mut self) -> Result<()> {
        let mut want: StdHashMap<u16, u8> = StdHashMap::new();
        for ports in self.service_ports.values() {
            for p in ports {
                *want.entry(*p).or_default() |= PORT_SERVICE;
            }
        }
        for pool in self.pools.values() {
            for b in pool.slots.iter().flatten() {
                *want.entry(b.addr.port()).or_default() |= PORT_BACKEND;
            }
        }
        // Backends that left their pool but still have flows (and `REVERSE` entries) still
        // send replies from their port.
        for key in self.reverse_written.keys() {
            *want.entry(u16::from_be_bytes(key.port)).or_default() |= PORT_BACKEND;
        }
        let stale: Vec<u16> = self.ports_written.keys().filter(|p| !want.contains_key(p)).copied().collect();
        for (port, bits) in want.iter().map(|(p, b)| (*p, *b)).chain(stale.into_iter().map(|p| (p, 0))) {
            if self.ports_written.get(&port).copied().unwrap_or(0) != bits {
                self.ports.set(u32::from(port), &bits, 0).map_err(map_err(MAP_PORTS))?;
            }
            if bits == 0 {
                self.ports_written.remove(&port);
            } else {
                self.ports_written.insert(port, bits);
            }
        }
        Ok(())
    }

    /// Brings `VIPS` in line with the services' VIPs: new slots are set first, slots no VIP
    /// uses any more are cleared after (a slot left set only costs a hash lookup that misses).
    fn write_vips(&mut self) -> Result<()> {
        let want: std::collections::HashSet<u32> = self.service_vips.values().copied().collect();
        for slot in want.iter().filter(|s| !self.vips_written.contains(s)) {
            self.vips.set(*slot, &1, 0).map_err(map_err(MAP_VIPS))?;
        }
        for slot in self.vips_written.iter().filter(|s| !want.contains(s)) {
            self.vips.set(*slot, &0, 0).map_err(map_err(MAP_VIPS))?;
        }
        self.vips_written = want;
        Ok(())
    }

    /// Brings `REVERSE` in line with the NAT services' pools: every backend lists the (VIP,
    /// port) pairs it serves, its service's own port first. Entries are added or changed before
    /// the tables that send flows to them flip; a backend that left its pool keeps its entry
    /// (its open flows still need their replies) until a count of the flows begun after the change finds no flow
    /// of it; pairs no service serves any more are dropped at once.
    fn write_reverse(&mut self) -> Result<()> {
        let mut fronts_of = self.pool_fronts(None);
        fronts_fit(&fronts_of)?;
        // Pairs still served by some NAT service, with their protocol.
        let served: std::collections::HashSet<([u8; 16], [u8; 2], u8)> = self
            .service_fronts
            .values()
            .flat_map(|(fronts, proto)| fronts.iter().map(move |f| (f.vip, f.port, *proto)))
            .collect();
        for (key, old) in &self.reverse_written {
            let list = fronts_of.entry(*key).or_default();
            for f in old.to.iter().take(old.count as usize) {
                if served.contains(&(f.vip, f.port, key.proto)) && !list.contains(f) && list.len() < REVERSE_WAYS {
                    list.push(*f);
                }
            }
        }
        let want: StdHashMap<BackendKey, Reverse> = fronts_of
            .into_iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(key, list)| {
                let mut r = Reverse { count: list.len() as u32, ..Reverse::default() };
                r.to[..list.len()].copy_from_slice(&list);
                (key, r)
            })
            .collect();
        for (key, r) in &want {
            if self.reverse_written.get(key) != Some(r) {
                self.reverse.insert(key, r, 0).map_err(map_err(MAP_REVERSE))?;
            }
        }
        for key in self.reverse_written.keys().filter(|k| !want.contains_key(k)) {
            let _ = self.reverse.remove(key);
        }
        self.reverse_written = want;
        self.reverse_changed = std::time::Instant::now();
        Ok(())
    }

    /// The (VIP, port) pairs each backend of the NAT services' pools answers for, its own
    /// service's port first; `next`, a colour's pool about to be written, counts as in place.
    fn pool_fronts(&self, next: Option<(u32, Colour, &[BackendConfig])>) -> StdHashMap<BackendKey, Vec<VipPort>> {
        let replaced = next.map(|(id, colour, _)| (id, colour));
        let pooled = self
            .pools
            .iter()
            .filter(|(key, _)| Some(**key) != replaced)
            .flat_map(|(&(id, _), pool)| pool.slots.iter().flatten().map(move |b| (id, b.addr)));
        let upcoming = next.into_iter().flat_map(|(id, _, backends)| backends.iter().map(move |b| (id, b.addr)));
        self.fronts_of(pooled.chain(upcoming))
    }

    /// The (VIP, port) pairs each backend of `members` (service id, backend) answers for.
    fn fronts_of(&self, members: impl Iterator<Item = (u32, SocketAddr)>) -> StdHashMap<BackendKey, Vec<VipPort>> {
        let mut fronts_of: StdHashMap<BackendKey, Vec<VipPort>> = StdHashMap::new();
        for (id, addr) in members {
            let Some((fronts, proto)) = self.service_fronts.get(&id) else { continue };
            let list = fronts_of.entry(backend_key(addr, *proto)).or_default();
            for f in fronts {
                if !list.contains(f) {
                    list.push(*f);
                }
            }
        }
        fronts_of
    }

    /// Drops the `REVERSE` entries of backends that are in no pool and that no flow uses
    /// (`in_use`: the backends of the flows a pass found). None can gain a flow again: only
    /// pools hand backends out.
    fn gc_reverse(&mut self, in_use: &std::collections::HashSet<BackendKey>) {
        let pooled = self.pool_fronts(None);
        let gone: Vec<BackendKey> =
            self.reverse_written.keys().filter(|k| !pooled.contains_key(k) && !in_use.contains(k)).copied().collect();
        if gone.is_empty() {
            return;
        }
        for key in gone {
            if self.reverse.remove(&key).is_ok() {
                self.reverse_written.remove(&key);
            }
        }
        if let Err(e) = self.write_ports() {
            tracing::warn!("clear the ports of backends no flow uses any more: {e}");
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
            t.packets += c.packets;
            t.bytes += c.bytes;
            t.reply_packets += c.reply_packets;
            t.reply_bytes += c.reply_bytes;
            t.flows += c.flows;
            t.rescued += c.rescued;
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

    /// A walker that counts the flows on a descriptor of `FLOWS` of its own, and the
    /// readers' end, which this data plane keeps (see [`crate::flowcount`]): the daemon runs
    /// the walker on a thread of its own, and the switchboard reads its passes through
    /// [`Dataplane::flow_counts`]. Without a call to this, no flows are counted.
    ///
    /// # Errors
    /// The map's descriptor could not be duplicated.
    pub fn flow_walker(&mut self) -> Result<crate::flowcount::FlowWalker> {
        use std::os::fd::AsFd as _;
        let fd = self.flows.map().fd().as_fd().try_clone_to_owned().map_err(DataplaneError::Walk)?;
        let (counter, walker) = crate::flowcount::counter(
            fd,
            self.options.udp_idle_timeout,
            self.options.tcp_idle_timeout,
            self.started_ns,
        );
        self.counter = Some(counter);
        Ok(walker)
    }

    /// A descriptor of `FLOWS` of its own and the table's size, for the walks of
    /// `switcher flows` (see [`crate::flowlist`]), which run apart from the engine.
    ///
    /// # Errors
    /// The map's descriptor could not be duplicated.
    pub fn flow_lister(&self) -> Result<(std::os::fd::OwnedFd, u64)> {
        use std::os::fd::AsFd as _;
        let fd = self.flows.map().fd().as_fd().try_clone_to_owned().map_err(DataplaneError::Walk)?;
        let capacity = self.flows.map().info().map_or_else(
            |_| u64::from(self.options.max_flows.unwrap_or(switcher_common::MAX_FLOWS)),
            |i| u64::from(i.max_entries()),
        );
        Ok((fd, capacity))
    }

    /// Counts the flows now, on this thread (tests and diagnostics; the daemon reads the
    /// walker's passes instead). Expired flows are not counted.
    ///
    /// # Errors
    /// A read of the map failed.
    pub fn count_flows(&self) -> Result<crate::flowcount::FlowSnapshot> {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let (udp, tcp) = (ns(self.options.udp_idle_timeout), ns(self.options.tcp_idle_timeout));
        crate::flowcount::count(self.flows.map().fd(), udp, tcp, self.started_ns, 0).map_err(DataplaneError::Walk)
    }

    /// The last complete count of the flows (see [`Dataplane::flow_walker`]).
    #[must_use]
    pub fn flow_counts(&self) -> Option<std::sync::Arc<crate::flowcount::FlowSnapshot>> {
        self.counter.as_ref().and_then(crate::flowcount::FlowCounter::last)
    }

    /// Asks the walker for a new count as soon as it may.
    pub fn count_flows_soon(&self) {
        if let Some(c) = &self.counter {
            c.ask();
        }
    }

    /// Drops the `REVERSE` entries of backends that are in no pool and that no flow of a pass
    /// begun after the pools last changed uses (a pass begun earlier may have missed the
    /// flows a backend gained before it left its pool).
    pub fn collect_reverse(&mut self, pass: &crate::flowcount::FlowSnapshot) {
        if pass.started > self.reverse_changed {
            self.gc_reverse(&pass.in_use);
        }
    }

    /// Calls `each` with the flows, [`crate::flowcount::BATCH`] at a time (never all of
    /// them at once).
    fn walk_flows(&self, each: impl FnMut(&[FlowKey], &[Flow])) -> Result<()> {
        crate::flowcount::walk(self.flows.map().fd(), each).map_err(DataplaneError::Walk)
    }

    /// Ends the drain of `from`: its open flows of service `id` are re-pointed to where a new
    /// flow would go now (`move`), or marked so the data path answers their next TCP packet
    /// with an RST and forgets them (`reset`). Returns how many flows were handled.
    ///
    /// # Errors
    /// A map read failed.
    pub fn end_drain(
        &mut self,
        service: &ServiceConfig,
        id: u32,
        from: Colour,
        action: config::DrainAction,
    ) -> Result<u64> {
        self.drain_end(service, id, from, action)?.run().map_err(DataplaneError::Walk)
    }

    /// The work of [`Dataplane::end_drain`], to be done anywhere (it walks every flow: the
    /// daemon runs it on a thread of its own, without the board's lock): the switch state
    /// and the pools as they are now, and a descriptor of `FLOWS` of its own.
    ///
    /// # Errors
    /// The state could not be read or the descriptor not duplicated.
    pub fn drain_end(
        &self,
        service: &ServiceConfig,
        id: u32,
        from: Colour,
        action: config::DrainAction,
    ) -> Result<DrainEnd> {
        use std::os::fd::AsFd as _;
        let state = self.state.get(&id, 0).map_err(map_err(MAP_STATE))?;
        let flows = self.flows.map().fd().as_fd().try_clone_to_owned().map_err(DataplaneError::Walk)?;
        let pool = |c: Colour| {
            self.pools.get(&(id, c)).map_or_else(
                || (Vec::new(), Vec::new()),
                |p| (p.table.clone(), p.slots.iter().map(|b| b.as_ref().map(|b| backend_value(b.addr))).collect()),
            )
        };
        Ok(DrainEnd {
            flows,
            id,
            from,
            action,
            state,
            preview: service.preview_port.map(u16::to_be_bytes),
            pools: [pool(Colour::Blue), pool(Colour::Green)],
        })
    }

    /// Removes the flows addressed to any of `keys`; returns how many. A flow the data path
    /// re-created since the walk is left alone.
    fn purge_flows(&mut self, keys: &[ServiceKey]) -> u64 {
        use std::os::fd::AsFd as _;
        let to = |k: &FlowKey| {
            keys.iter().any(|s| s.vip == k.dst && s.port == k.dport && s.proto == k.proto && s.family == k.family)
        };
        let mut n = 0;
        let Ok(flows) = self.flows.map().fd().as_fd().try_clone_to_owned() else { return 0 };
        let walked = crate::flowcount::walk(&flows, |batch, values| {
            for (key, flow) in batch.iter().zip(values).filter(|(k, _)| to(k)) {
                if self.flows.get(key, 0).ok().as_ref() != Some(flow) {
                    continue;
                }
                if self.flows.remove(key).is_ok() {
                    n += 1;
                }
            }
        });
        if let Err(e) = walked {
            tracing::warn!("removing the flows of removed services: {e}");
        }
        n
    }

    /// The tracked flows, for tests and diagnostics: (key, flow) pairs.
    #[must_use]
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        let mut all = Vec::new();
        if let Err(e) = self.walk_flows(|k, v| all.extend(k.iter().copied().zip(v.iter().copied()))) {
            tracing::warn!("{e}");
        }
        all
    }
}

/// Elements of `RING` for `services`: room for their tables and to grow
/// ([`slab::capacity_for`]).
#[must_use]
pub fn ring_elements(services: &[ServiceConfig]) -> u32 {
    let need: u64 =
        services.iter().flat_map(|s| Colour::ALL.map(|c| u64::from(slab::table_elements(s.pool(c).len())))).sum();
    slab::capacity_for(need)
}

/// Sizes of the maps indexed by service id for `max_services` services.
fn service_map_sizes(max_services: u32) -> [(&'static str, u32); 6] {
    let colours = max_services * switcher_common::COLOURS;
    [
        (MAP_SERVICES, max_services * 2),
        (MAP_STATE, max_services),
        (MAP_RING_LIVE, colours),
        (MAP_COUNTERS, colours),
        (MAP_BACKENDS, colours * MAX_POOL),
        (MAP_REVERSE, colours * MAX_POOL),
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
        if let Some(found) = pinned(map)
            && found != configured
        {
            return Err(DataplaneError::Resized { key, configured, pinned: found });
        }
    }
    Ok(())
}

/// Refuses a backend that would answer for more (VIP, port) pairs than `REVERSE` holds.
fn fronts_fit(fronts_of: &StdHashMap<BackendKey, Vec<VipPort>>) -> Result<()> {
    match fronts_of.iter().find(|(_, l)| l.len() > REVERSE_WAYS) {
        Some((key, list)) => {
            let backend = SocketAddr::new(addr_ip(key.addr, key.family), u16::from_be_bytes(key.port));
            Err(DataplaneError::TooManyFronts { backend: backend.to_string(), count: list.len() })
        }
        None => Ok(()),
    }
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
