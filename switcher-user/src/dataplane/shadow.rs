//! Shadow traffic's side of the data plane: the TC program (`shadow`) that copies shadowed
//! datagrams to the idle colour, attached on TC ingress (TCX, a bpf_link pinned under
//! `tc_links/<ifname>`) of every interface the XDP program is on, and the maps it shares with
//! the XDP program (`SHADOW`, `SHADOW_COUNTERS`; see `switcher-ebpf/src/shadow.rs`).

use std::path::Path;

use aya::{
    maps::{Array, PerCpuArray},
    programs::{
        SchedClassifier,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttach, TcAttachType},
    },
};
use switcher_common::{
    BP_ALL, MAP_SHADOW, MAP_SHADOW_COUNTERS, SHADOW_PROG, ShadowConfig, ShadowCounters, colour_slot, user::Colour,
};

use super::{Dataplane, DataplaneError, Result, map_err};
use crate::pins::Pins;

impl Dataplane {
    /// The TC program (loaded with the XDP program).
    ///
    /// # Errors
    /// The object has no such program.
    pub fn shadow_program(&mut self) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(SHADOW_PROG)
            .ok_or(DataplaneError::Missing { what: "program", name: SHADOW_PROG })?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    /// Attaches the TC program on ingress of each interface through a TCX link pinned under
    /// `tc_links/<ifname>`, replacing the program under a pinned link atomically; links of
    /// interfaces no longer configured are detached. A kernel without TCX (< 6.6) cannot have
    /// it: shadow traffic is then unavailable (logged), everything else works.
    pub(super) fn attach_shadow(&mut self, interfaces: &[String], pins: &Pins) {
        let dir = pins.tc_links_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(path = %dir.display(), "shadow traffic unavailable: cannot make the TC link directory: {e}");
            return;
        }
        let mut ready = true;
        let mut ids = Vec::new();
        let mut links = Vec::new();
        for iface in interfaces {
            match self.attach_shadow_to(iface, &pins.tc_link(iface)) {
                Ok((id, link)) => {
                    ids.push((iface.clone(), id));
                    links.push(link);
                }
                Err(e) => {
                    tracing::warn!(interface = %iface, "shadow traffic unavailable: attach the TC program: {e:#}");
                    ready = false;
                }
            }
        }
        self.shadow_link_ids = ids;
        self.shadow_links = links;
        for iface in pins.tc_linked_interfaces() {
            if !interfaces.contains(&iface) {
                let _ = crate::pins::detach_link(&pins.tc_link(&iface));
                let _ = std::fs::remove_file(pins.tc_link(&iface));
            }
        }
        self.shadow_ready = ready && !interfaces.is_empty();
    }

    /// Attaches (or adopts) and pins one interface's TC link; returns the link's kernel id and
    /// the pinned link.
    fn attach_shadow_to(&mut self, iface: &str, path: &Path) -> anyhow::Result<(u32, PinnedLink)> {
        use anyhow::Context as _;
        let prog = self.shadow_program()?;
        let id = match PinnedLink::from_pin(path) {
            Ok(pinned) => {
                let fd_link = pinned.unpin().context("unpin the TC link")?;
                let link = SchedClassifierLink::try_from(fd_link).context("the pinned TC link")?;
                prog.attach_to_link(link).context("replace the program under the pinned TC link")?
            }
            Err(_) => prog
                .attach(
                    std::ffi::CString::new(iface).context("an interface name")?.as_c_str(),
                    TcAttach::Tcx { attach_type: TcAttachType::Ingress, order: LinkOrder::default() },
                )
                .context("TCX attach (Linux 6.6 or later)")?,
        };
        let link = self.shadow_program()?.take_link(id)?;
        let fd_link = FdLink::try_from(link).context("the TC link is not a bpf_link")?;
        let id = fd_link.info().context("the TC link's info")?.id();
        let pinned = fd_link.pin(path).with_context(|| format!("pin {}", path.display()))?;
        Ok((id, pinned))
    }

    /// The TC links whose pins went (removed under the running daemon).
    pub(super) fn shadow_links_missing(&self, pins: &Pins) -> Vec<(String, u32)> {
        self.shadow_link_ids.iter().filter(|(iface, _)| !pins.tc_link(iface).exists()).cloned().collect()
    }

    /// Whether the TC program is attached everywhere: shadow traffic can be copied.
    #[must_use]
    pub fn shadow_ready(&self) -> bool {
        self.shadow_ready
    }

    /// Sets a service's shadow share (basis points, 0: off) and ceiling (copies per second).
    ///
    /// # Errors
    /// The map write failed.
    pub fn set_shadow(&mut self, id: u32, share_bp: u32, ceiling: u32) -> Result<()> {
        let map = self.ebpf.map_mut(MAP_SHADOW).ok_or(DataplaneError::Missing { what: "map", name: MAP_SHADOW })?;
        let mut shadow: Array<_, ShadowConfig> = Array::try_from(map).map_err(map_err(MAP_SHADOW))?;
        shadow.set(id, &ShadowConfig { share_bp: share_bp.min(BP_ALL), ceiling }, 0).map_err(map_err(MAP_SHADOW))
    }

    /// A service's shadow share and ceiling as the data path sees them.
    ///
    /// # Errors
    /// The map lookup failed.
    pub fn shadow(&self, id: u32) -> Result<ShadowConfig> {
        let map = self.ebpf.map(MAP_SHADOW).ok_or(DataplaneError::Missing { what: "map", name: MAP_SHADOW })?;
        let shadow: Array<_, ShadowConfig> = Array::try_from(map).map_err(map_err(MAP_SHADOW))?;
        shadow.get(&id, 0).map_err(map_err(MAP_SHADOW))
    }

    /// A colour's shadow counters, summed over CPUs.
    ///
    /// # Errors
    /// The map lookup failed.
    pub fn shadow_counters(&self, id: u32, colour: Colour) -> Result<ShadowCounters> {
        let name = MAP_SHADOW_COUNTERS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::Missing { what: "map", name })?;
        let counters: PerCpuArray<_, ShadowCounters> = PerCpuArray::try_from(map).map_err(map_err(name))?;
        let per_cpu = counters.get(&colour_slot(id, colour.as_u32()), 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(ShadowCounters::default(), |mut t, c| {
            t.shadowed += c.shadowed;
            t.sent += c.sent;
            t.ceiling += c.ceiling;
            t.failed += c.failed;
            t.replies += c.replies;
            t.latency_ns += c.latency_ns;
            t.latency_count += c.latency_count;
            t
        }))
    }
}

/// Pins the TC links `missing` again by their kernel ids (see `Dataplane::repin`).
pub(super) fn repin_shadow(pins: &Pins, missing: Vec<(String, u32)>) -> Result<Vec<String>> {
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let dir = pins.tc_links_dir();
    std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::Repin { path: dir.clone(), source })?;
    let mut done = Vec::new();
    for (iface, id) in missing {
        let path = pins.tc_link(&iface);
        crate::pins::pin_by_id(crate::pins::Object::Link, id, &path)
            .map_err(|source| DataplaneError::Repin { path, source })?;
        done.push(format!("tc_links/{iface}"));
    }
    Ok(done)
}
