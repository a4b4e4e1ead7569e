//! The switcher XDP program: one entry point, attached to every interface of the load-balancer
//! node that carries client or backend traffic.
//!
//! - A TCP/UDP packet to a service (VIP, port, protocol in `SERVICES`) is given a backend (see
//!   `flow`), rewritten and forwarded (see `nat`).
//! - A packet from a backend (`REVERSE` knows its address and port) is rewritten to come from
//!   the VIP only if the flow on its reversed tuple is live and was given that backend (see
//!   `flow::reply`); anything else from a backend — a direct connection — passes untouched.
//! - An ICMP error about a tracked flow is translated for the other side (see `icmp`).
//! - Everything else passes untouched (see `parse` for the policy).
//!
//! Every exit bumps one `STATS` slot (a `Reason`); there is no per-packet logging.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod mem;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod shadow;
#[cfg(target_arch = "bpf")]
mod table;

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        Global,
        bindings::__sk_buff,
        macros::{classifier, map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::{TcContext, XdpContext},
    };
    use aya_log_ebpf::warn;
    use switcher_common::{
        Backend, BackendKey, COLOURS, ColourCounters, FlowKey, FlowSet, MAX_FLOWS, MAX_POOL, MAX_REVERSE, MAX_SERVICES,
        PORT_BACKEND, PORT_SERVICE, PROTO_UDP, Reason, Reverse, RingChunk, SHADOW_MAX_FLOWS, Service, ServiceKey,
        ShadowBucket, ShadowConfig, ShadowCounters, ShadowFlow, VIP_SLOTS, flow_sets,
    };

    use crate::{
        flow, icmp,
        nat::{Scratch, Verdict},
        parse, shadow,
    };

    /// `ServiceKey` (VIP, port, protocol, family) → `Service`. Written by the daemon.
    #[map(name = "SERVICES")]
    pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES * 2, 0);

    /// port → `PORT_SERVICE` | `PORT_BACKEND` bits. Written by the daemon; lets traffic of no
    /// service pass without a hash lookup.
    #[map(name = "PORTS")]
    pub static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

    /// `vip_slot(address)` → 1 if a VIP is in that slot. Written by the daemon; lets traffic to
    /// other addresses on a service port pass without a hash lookup.
    #[map(name = "VIPS")]
    pub static VIPS: Array<u8> = Array::with_max_entries(VIP_SLOTS, 0);

    /// `pool_slot(service, colour, i)` → `Backend`. Written by the daemon.
    #[map(name = "BACKENDS")]
    pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_SERVICES * COLOURS * MAX_POOL, 0);

    /// The Maglev slab: element → 256 Maglev slots. Each colour's table is a run of elements
    /// sized to its pool; the daemon writes a new table into free elements, then points
    /// `RING_LIVE` at it. Sized by the daemon to its config at start.
    #[map(name = "RING")]
    pub static RING: Array<RingChunk> = Array::with_max_entries(1_024, 0);

    /// `colour_slot(service, colour)` → where the colour's live table is (`ring_live`). Daemon.
    #[map(name = "RING_LIVE")]
    pub static RING_LIVE: Array<u32> = Array::with_max_entries(MAX_SERVICES * COLOURS, 0);

    /// service id → switch state (active colour, canary share). Written by a cut-over, a
    /// rollback or a weight change: one 4-byte write.
    #[map(name = "STATE")]
    pub static STATE: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

    /// The flow table (see `table`): client → VIP 5-tuples and the backends they were given,
    /// in sets of `FLOW_WAYS` slots. Written here (the daemon only removes the flows of a
    /// service it removes, and rewrites flows at a drain timeout). Sized by the daemon.
    #[map(name = "FLOWS")]
    pub static FLOWS: Array<FlowSet> = Array::with_max_entries(flow_sets(MAX_FLOWS), BPF_F_MMAPABLE);

    /// backend address, port, protocol → the (VIP, port) pairs it serves. Written by the daemon
    /// with the pools; replies are matched to their flow through it (`flow::reply`).
    #[map(name = "REVERSE")]
    pub static REVERSE: HashMap<BackendKey, Reverse> = HashMap::with_max_entries(MAX_REVERSE, BPF_F_NO_PREALLOC);

    /// 0 → the daemon's coarse monotonic clock (ns), written about once a second. Open TCP
    /// flows are stamped with it: their packets read no clock.
    #[map(name = "NOW")]
    pub static NOW: Array<u64> = Array::with_max_entries(1, 0);

    /// per CPU, `colour_slot(service, colour)` → traffic counters. Written here; read by status.
    #[map(name = "COUNTERS")]
    pub static COUNTERS: PerCpuArray<ColourCounters> = PerCpuArray::with_max_entries(MAX_SERVICES * COLOURS, 0);

    /// per CPU, `Reason` → packets. Written here on every exit.
    #[map(name = "STATS")]
    pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

    /// 0 → ABI version of the maps. Written by the daemon; read to refuse a mismatched program.
    #[map(name = "META")]
    pub static META: Array<u32> = Array::with_max_entries(1, 0);

    /// Per-CPU working space: the flow key, the reply key, a flow, a reply and the FIB query
    /// live here, not on the 512-byte stack. One element, only this CPU's program touches it.
    #[map(name = "SCRATCH")]
    pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

    /// service id → `ShadowConfig`: the share of new flows copied to the idle colour and the
    /// ceiling on copies per second. Written by the daemon (a cut-over does not touch it: the
    /// copies always go to the colour a flow is not on).
    #[map(name = "SHADOW")]
    pub static SHADOW: Array<ShadowConfig> = Array::with_max_entries(MAX_SERVICES, 0);

    /// client → VIP 5-tuple of a shadowed flow → `ShadowFlow` (its idle backend, the last
    /// request times). Written here (`shadow::forward`).
    #[map(name = "SHADOW_FLOWS")]
    pub static SHADOW_FLOWS: LruHashMap<FlowKey, ShadowFlow> = LruHashMap::with_max_entries(SHADOW_MAX_FLOWS, 0);

    /// idle backend → client 5-tuple (a copy's replies) → the shadowed flow's key. Written here
    /// with `SHADOW_FLOWS`; read on the reply path to drop the idle colour's answers.
    #[map(name = "SHADOW_REPLY")]
    pub static SHADOW_REPLY: LruHashMap<FlowKey, FlowKey> = LruHashMap::with_max_entries(SHADOW_MAX_FLOWS, 0);

    /// per CPU, `colour_slot(service, colour)` → `ShadowCounters`. Written here and by the TC
    /// program; read by status and metrics.
    #[map(name = "SHADOW_COUNTERS")]
    pub static SHADOW_COUNTERS: PerCpuArray<ShadowCounters> = PerCpuArray::with_max_entries(MAX_SERVICES * COLOURS, 0);

    /// service id → `ShadowBucket`, the copies' token bucket. Written here.
    #[map(name = "SHADOW_BUCKET")]
    pub static SHADOW_BUCKET: Array<ShadowBucket> = Array::with_max_entries(MAX_SERVICES, 0);

    /// Per-CPU working space of the shadow code (both programs). One element.
    #[map(name = "SHADOW_SCRATCH")]
    pub static SHADOW_SCRATCH: PerCpuArray<shadow::ShadowScratch> = PerCpuArray::with_max_entries(1, 0);

    /// Idle timeout of UDP flows in ns; set at load (`GLOBAL_UDP_IDLE_NS`).
    #[unsafe(no_mangle)]
    pub static UDP_IDLE_NS: Global<u64> = Global::new(switcher_common::DEFAULT_UDP_IDLE_NS);

    /// Sets of `FLOWS` minus one; set at load from the map's size (`GLOBAL_FLOW_SET_MASK`).
    #[unsafe(no_mangle)]
    pub static FLOW_SET_MASK: Global<u32> = Global::new(flow_sets(MAX_FLOWS) - 1);

    /// How rewritten NAT packets leave (`FORWARD_KERNEL` or `FORWARD_REDIRECT`); set at load.
    #[unsafe(no_mangle)]
    pub static FORWARD_MODE: Global<u32> = Global::new(switcher_common::FORWARD_REDIRECT);

    /// `BPF_F_NO_PREALLOC`: `REVERSE` is written by the daemon only, so its entries are
    /// allocated on update and its memory follows the backends configured.
    const BPF_F_NO_PREALLOC: u32 = 1;

    /// `BPF_F_MMAPABLE`: the daemon maps `FLOWS` into its memory, so it reads the flows
    /// without a syscall and writes one slot at a time, in the data path's order.
    const BPF_F_MMAPABLE: u32 = 1 << 10;

    #[xdp]
    pub fn switcher(ctx: XdpContext) -> u32 {
        let verdict = match try_switch(&ctx) {
            Ok(verdict) => verdict,
            Err(reason) => Verdict::pass(reason),
        };
        let (action, reason) = (verdict.action(), verdict.reason());
        if reason == Reason::INTERNAL {
            // Rare by construction (a map slot that must exist did not): worth a log line.
            warn!(&ctx, "switcher: internal map lookup failed; packet passed");
        }
        if let Some(slot) = STATS.get_ptr_mut(reason.0) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *slot += 1 };
        }
        action
    }

    #[inline(always)]
    fn try_switch(ctx: &XdpContext) -> Result<Verdict, Reason> {
        let pkt = parse::parse(ctx)?;
        // SAFETY: this CPU's own element; nothing else runs on it while the program does.
        let scratch = unsafe { &mut *SCRATCH.get_ptr_mut(0).ok_or(Reason::INTERNAL)? };
        if pkt.icmp != 0 {
            return Ok(icmp::translate(&pkt, scratch));
        }
        // Traffic of no service and no backend leaves before any key is built: two array
        // lookups for its ports, and a third for the address of one to a service port.
        // SAFETY: bounds-checked by the parser.
        let (sport, dport) = unsafe { ((*pkt.ports).src, (*pkt.ports).dst) };
        let port_bits = |port: [u8; 2]| PORTS.get(u32::from(u16::from_be_bytes(port))).copied().unwrap_or(0);
        let dport_bits = port_bits(dport);
        let from_backend = port_bits(sport) & PORT_BACKEND != 0;
        // A service port on an address that is no VIP (its `VIPS` slot, read from the
        // header) is no service's either: it leaves unless it may be a backend's reply or a
        // client's datagram straight to a backend.
        let to_service = dport_bits & PORT_SERVICE != 0 && VIPS.get(pkt.ip.dst_vip_slot()).copied().unwrap_or(0) != 0;
        let udp_to_backend = pkt.proto == PROTO_UDP && dport_bits & PORT_BACKEND != 0;
        if !to_service && !from_backend && !udp_to_backend {
            return Err(Reason::NO_MATCH);
        }
        pkt.write_flow_key(&mut scratch.key);
        let key = &scratch.key;
        if to_service {
            let service_key = ServiceKey { vip: key.dst, port: key.dport, proto: key.proto, family: key.family };
            // A packet of a known flow needs no service lookup; a SYN always starts afresh.
            let mut untracked = switcher_common::starts_flow(pkt.proto, pkt.tcp_flags);
            if !untracked {
                let v = flow::established(&pkt, scratch);
                if v.is_shadow() {
                    return Ok(shadow::forward(&pkt, scratch));
                }
                if v.handled() {
                    return Ok(v);
                }
                untracked = v.is_no_flow();
            }
            // SAFETY: values are plain integers; a concurrent update at worst gives a stale copy.
            if let Some(service) = unsafe { SERVICES.get(&service_key) } {
                let service = *service;
                let v = flow::to_backend(&pkt, scratch, service, untracked);
                return Ok(if v.is_shadow() { shadow::forward(&pkt, scratch) } else { v });
            }
        }
        if from_backend {
            return Ok(flow::reply(&pkt, scratch));
        }
        if udp_to_backend {
            // A client's datagram straight to a backend, from a port whose VIP flow to that
            // backend is live: the backend's answers are the direct conversation's now.
            flow::direct(scratch);
        }
        Err(Reason::NO_MATCH)
    }

    /// TC (clsact) ingress on the same interfaces: a datagram the XDP program passed up with
    /// shadow metadata is copied to the idle colour and sent on (see `shadow`); anything else
    /// passes at once.
    #[classifier]
    pub fn shadow(ctx: TcContext) -> i32 {
        use aya_ebpf::EbpfContext;
        shadow::copy(ctx.as_ptr().cast::<__sk_buff>())
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
