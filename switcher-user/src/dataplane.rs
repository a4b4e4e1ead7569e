//! The XDP program and its maps, as the daemon sees them.
//!
//! [`Dataplane::load`] loads the embedded object, checks that its maps are the ones this binary
//! was built against, attaches the program to the configured interfaces and keeps the map
//! handles. Dropping the `Dataplane` detaches the program: the links are owned by this process.

use std::{ffi::CString, net::SocketAddrV4, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode},
};
use switcher_common::{
    ABI_VERSION, Backend, ColourCounters, FORWARD_KERNEL, FORWARD_REDIRECT, GLOBAL_FORWARD_MODE, GLOBAL_UDP_IDLE_NS,
    MAP_ACTIVE, MAP_BACKENDS, MAP_COUNTERS, MAP_META, MAP_SERVICES, MAP_STATS, PROG_NAME, Reason, Service, ServiceKey,
    colour_slot, user::Colour,
};

use crate::config::{self, ServiceConfig};

/// The XDP object built by `build.rs` from `switcher-ebpf`.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switcher"));

/// Errors of the data plane, with the object they concern.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this binary was built without its XDP program (AYA_BUILD_SKIP was set); rebuild it with `./x build`")]
    NoProgram,
    #[error("load the XDP program")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {what} {name:?}")]
    Missing { what: &'static str, name: &'static str },
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
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// One service as the data path knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSlot {
    pub id: u32,
    pub config: ServiceConfig,
}

/// Counters of one colour of one service, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub flows: u64,
}

/// Load-time settings of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// A UDP flow idle this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Redirect rewritten packets out of their egress interface (else the kernel routes them).
    pub redirect: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { udp_idle_timeout: Duration::from_nanos(switcher_common::DEFAULT_UDP_IDLE_NS), redirect: true }
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

/// The loaded, attached program and its maps.
pub struct Dataplane {
    // Holds the program and its links: dropping it detaches.
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    active: Array<MapData, u32>,
    counters: PerCpuArray<MapData, ColourCounters>,
    stats: PerCpuArray<MapData, u64>,
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

/// The map key of a service.
#[must_use]
pub fn service_key(s: &ServiceConfig) -> ServiceKey {
    ServiceKey { vip: s.vip.octets(), port: s.port.to_be_bytes(), proto: s.protocol.number(), _pad: 0 }
}

/// The map value of a backend (all zero when the colour has none).
#[must_use]
pub fn backend_value(addr: Option<SocketAddrV4>) -> Backend {
    addr.map_or_else(Backend::default, |a| Backend {
        addr: a.ip().octets(),
        port: a.port().to_be_bytes(),
        _pad: [0; 2],
    })
}

impl Dataplane {
    /// Loads the program, fills the maps with the config's services (their ids are their
    /// positions in the list) and attaches it to the config's interfaces.
    ///
    /// # Errors
    /// Any load, map or attach failure, naming the object.
    pub fn load(config: &config::Config) -> Result<Dataplane> {
        let (redirect, why) = resolve_forwarding(config.forwarding, &config.interfaces);
        tracing::info!(redirect, "forwarding: {why}");
        let options = Options { udp_idle_timeout: config.udp_idle_timeout, redirect };
        let mut dp = Dataplane::open(&config.services, options)?;
        dp.attach(&config.interfaces, config.xdp_mode)?;
        Ok(dp)
    }

    /// Loads the program into the kernel and fills its maps, without attaching it anywhere
    /// (data-path tests run it with `BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// Any load or map failure, naming the object.
    pub fn open(services: &[ServiceConfig], options: Options) -> Result<Dataplane> {
        if PROGRAM.is_empty() {
            return Err(DataplaneError::NoProgram);
        }
        let udp_idle_ns = u64::try_from(options.udp_idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let forward_mode = if options.redirect { FORWARD_REDIRECT } else { FORWARD_KERNEL };
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_UDP_IDLE_NS, &udp_idle_ns, true)
            .override_global(GLOBAL_FORWARD_MODE, &forward_mode, true)
            .load(PROGRAM)
            .map_err(DataplaneError::Load)?;
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
        meta.set(0, &ABI_VERSION, 0).map_err(map_err(MAP_META))?;
        let mut dp = Dataplane {
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            active: take(&mut ebpf, MAP_ACTIVE)?,
            counters: take(&mut ebpf, MAP_COUNTERS)?,
            stats: take(&mut ebpf, MAP_STATS)?,
            _meta: meta,
            _logger: logger,
            ebpf,
        };
        for (id, s) in (0u32..).zip(services) {
            dp.install(id, s)?;
        }
        dp.program()?.load().map_err(DataplaneError::Program)?;
        Ok(dp)
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

    /// Attaches the program to each interface (names resolved in this thread's network
    /// namespace). The links live as long as `self`.
    ///
    /// # Errors
    /// The first interface that cannot be attached, with the mode.
    pub fn attach(&mut self, interfaces: &[String], mode: config::XdpMode) -> Result<()> {
        let aya_mode = match mode {
            config::XdpMode::Native => XdpMode::Driver,
            config::XdpMode::Skb => XdpMode::Skb,
        };
        let prog = self.program()?;
        for iface in interfaces {
            let name = CString::new(iface.as_str()).map_err(|_| DataplaneError::BadName(iface.clone()))?;
            prog.attach(name.as_c_str(), aya_mode).map_err(|source| DataplaneError::Attach {
                iface: iface.clone(),
                mode,
                source,
            })?;
            tracing::info!(interface = %iface, ?mode, "attached XDP program");
        }
        Ok(())
    }

    /// Writes a service's key, backends and active colour. The active colour is written before
    /// the key so that the first packet the service sees already has it.
    fn install(&mut self, id: u32, s: &ServiceConfig) -> Result<()> {
        for colour in Colour::ALL {
            self.backends
                .set(colour_slot(id, colour.as_u32()), &backend_value(s.backend(colour)), 0)
                .map_err(map_err(MAP_BACKENDS))?;
        }
        self.set_active(id, s.active)?;
        self.services.insert(&service_key(s), &Service { id, flags: 0 }, 0).map_err(map_err(MAP_SERVICES))
    }

    /// The cut-over: one 4-byte map write; the next packet of a new flow sees it.
    ///
    /// # Errors
    /// The map update failed.
    pub fn set_active(&mut self, id: u32, colour: Colour) -> Result<()> {
        self.active.set(id, &colour.as_u32(), 0).map_err(map_err(MAP_ACTIVE))
    }

    /// The active colour as the data path sees it.
    ///
    /// # Errors
    /// The map lookup failed.
    pub fn active(&self, id: u32) -> Result<Colour> {
        self.active.get(&id, 0).map(Colour::from_u32).map_err(map_err(MAP_ACTIVE))
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
    /// ring buffer), and its program section is the XDP entry point.
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
        assert!(obj.section_by_name("xdp").is_some(), "an `xdp` program section");
        for global in [switcher_common::GLOBAL_FORWARD_MODE, switcher_common::GLOBAL_UDP_IDLE_NS] {
            assert!(obj.symbols().any(|s| s.name() == Ok(global)), "global {global}");
        }
    }
}
