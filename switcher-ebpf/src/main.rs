//! The switcher XDP program: one entry point, attached to every interface of the load-balancer
//! node that carries client or backend traffic.
//!
//! - A TCP/UDP packet to a service (VIP, port, protocol in `SERVICES`) is given a backend: the
//!   one its flow already has in `FLOWS`, else the active colour's from `BACKENDS`. Its
//!   destination is rewritten to that backend and it is forwarded (see `nat`).
//! - A packet that matches a tracked flow's reply (`REPLIES`) is rewritten to come from the VIP.
//! - Everything else passes untouched.
//!
//! Every exit bumps one `STATS` slot (a `Reason`); there is no per-packet logging.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        Global,
        bindings::xdp_action,
        helpers::bpf_ktime_get_coarse_ns,
        macros::{map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::XdpContext,
    };
    use switcher_common::{
        Backend, COLOURS, ColourCounters, Flow, FlowKey, MAX_FLOWS, MAX_SERVICES, Reason, Reply, Service, ServiceKey,
    };

    use aya_log_ebpf::warn;

    use crate::{nat, parse};

    /// `ServiceKey` (VIP, port, protocol) → `Service`. Written by the daemon.
    #[map(name = "SERVICES")]
    pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

    /// `service * 2 + colour` → `Backend`. Written by the daemon.
    #[map(name = "BACKENDS")]
    pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_SERVICES * COLOURS, 0);

    /// service id → active colour. Written by a cut-over: the one map write that switches.
    #[map(name = "ACTIVE")]
    pub static ACTIVE: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

    /// client → VIP 5-tuple → the backend the flow was given. Written here on a flow's start.
    #[map(name = "FLOWS")]
    pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

    /// backend → client 5-tuple → the VIP to answer from. Written here next to `FLOWS`.
    #[map(name = "REPLIES")]
    pub static REPLIES: LruHashMap<FlowKey, Reply> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

    /// per CPU, `service * 2 + colour` → traffic counters. Written here; read by `status`.
    #[map(name = "COUNTERS")]
    pub static COUNTERS: PerCpuArray<ColourCounters> = PerCpuArray::with_max_entries(MAX_SERVICES * COLOURS, 0);

    /// per CPU, `Reason` → packets. Written here on every exit.
    #[map(name = "STATS")]
    pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

    /// 0 → ABI version of the maps. Written by the daemon; read to refuse a mismatched program.
    #[map(name = "META")]
    pub static META: Array<u32> = Array::with_max_entries(1, 0);

    /// Idle timeout of UDP flows in ns; set at load (`GLOBAL_UDP_IDLE_NS`).
    #[unsafe(no_mangle)]
    static UDP_IDLE_NS: Global<u64> = Global::new(switcher_common::DEFAULT_UDP_IDLE_NS);

    /// How rewritten packets leave (`FORWARD_KERNEL` or `FORWARD_REDIRECT`); set at load.
    #[unsafe(no_mangle)]
    pub static FORWARD_MODE: Global<u32> = Global::new(switcher_common::FORWARD_REDIRECT);

    #[xdp]
    pub fn switcher(ctx: XdpContext) -> u32 {
        let (action, reason) = match try_switch(&ctx) {
            Ok(verdict) => verdict,
            Err(reason) => (xdp_action::XDP_PASS, reason),
        };
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
    fn try_switch(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
        let pkt = parse::parse(ctx)?;
        let key = ServiceKey { vip: pkt.dst(), port: pkt.dport(), proto: pkt.proto, _pad: 0 };
        // SAFETY: values are plain integers; a concurrent update at worst gives a stale copy.
        if let Some(service) = unsafe { SERVICES.get(&key) } {
            let service = *service;
            return to_backend(ctx, &pkt, service);
        }
        let reply_key = pkt.flow_key();
        // SAFETY: as above.
        if let Some(reply) = unsafe { REPLIES.get(&reply_key) } {
            let reply = *reply;
            count(reply.service, reply.colour, &pkt, true, false);
            return Ok(nat::reply(ctx, &pkt, &reply));
        }
        Err(Reason::NO_MATCH)
    }

    /// Picks the flow's backend (tracked, or the active colour's) and forwards to it.
    #[inline(always)]
    fn to_backend(ctx: &XdpContext, pkt: &parse::Packet, service: Service) -> Result<(u32, Reason), Reason> {
        let flow_key = pkt.flow_key();
        let starts = switcher_common::starts_flow(pkt.proto, pkt.tcp_flags);
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let tracked = if starts { None } else { FLOWS.get_ptr_mut(&flow_key) };
        let tracked = tracked.and_then(|p| {
            // SAFETY: a live map value; a racing writer can at worst make the stamp stale.
            let flow = unsafe { &mut *p };
            if switcher_common::flow_expired(pkt.proto, now, flow.last_seen_ns, UDP_IDLE_NS.load()) {
                return None;
            }
            if now.saturating_sub(flow.last_seen_ns) > switcher_common::LAST_SEEN_GRANULARITY_NS {
                flow.last_seen_ns = now;
            }
            Some(*flow)
        });
        let flow = match tracked {
            Some(flow) => {
                count(flow.service, flow.colour, pkt, false, false);
                flow
            }
            None => {
                let colour = *ACTIVE.get(service.id).ok_or(Reason::INTERNAL)? & 1;
                let slot = switcher_common::colour_slot(service.id, colour);
                let backend = *BACKENDS.get(slot).ok_or(Reason::INTERNAL)?;
                if !backend.is_set() {
                    return Err(Reason::NO_BACKEND);
                }
                let flow = Flow { backend, service: service.id, colour, last_seen_ns: now };
                let reply_key = FlowKey {
                    src: backend.addr,
                    dst: flow_key.src,
                    sport: backend.port,
                    dport: flow_key.sport,
                    proto: flow_key.proto,
                    _pad: [0; 3],
                };
                let reply =
                    Reply { vip: flow_key.dst, port: flow_key.dport, _pad: [0; 2], service: service.id, colour };
                // An LRU insert only fails on memory pressure; the packet is still forwarded
                // and the next packet of the flow tries again.
                let _ = FLOWS.insert(&flow_key, &flow, 0);
                let _ = REPLIES.insert(&reply_key, &reply, 0);
                count(service.id, colour, pkt, false, true);
                flow
            }
        };
        Ok(nat::forward(ctx, pkt, &flow.backend))
    }

    #[inline(always)]
    fn count(service: u32, colour: u32, pkt: &parse::Packet, reply: bool, new_flow: bool) {
        let slot = switcher_common::colour_slot(service, colour);
        if let Some(c) = COUNTERS.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            let c = unsafe { &mut *c };
            let bytes = u64::from(pkt.ip_len);
            if reply {
                c.reply_packets += 1;
                c.reply_bytes += bytes;
            } else {
                c.packets += 1;
                c.bytes += bytes;
            }
            if new_flow {
                c.flows += 1;
            }
        }
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
