//! Shadow traffic: a share of a UDP service's flows is also sent to the idle colour, whose
//! answers are dropped here.
//!
//! XDP cannot clone a packet, so the work is split between the two programs of the object:
//! - XDP ([`forward`], called for every NAT datagram about to be sent to its backend): a
//!   service with no shadow share costs one array lookup (`SHADOW`). A flow in the share (by
//!   its `SEED_SHADOW` hash) gets the idle colour's backend for its 5-tuple (the Maglev choice a
//!   new flow on that colour would get, kept in `SHADOW_FLOWS`); within the service's ceiling
//!   (a token bucket in `SHADOW_BUCKET`) the datagram is rewritten to its live backend exactly
//!   as usual and passed up with a `ShadowMeta` in front of it (`Reason::SHADOW_FWD`). Over the
//!   ceiling, or if anything is missing, the datagram takes the usual path and nothing is
//!   copied.
//! - TC ingress ([`copy`], the `shadow` program): a packet with our metadata is rewritten to
//!   the idle backend, cloned out towards it (`bpf_clone_redirect`), restored byte for byte,
//!   and then sent on to its live backend the way XDP would have (`bpf_fib_lookup` and
//!   `bpf_redirect`, or the kernel's stack when the FIB has no complete answer). A copy that
//!   cannot be made is counted and skipped; the live datagram goes on regardless.
//! - XDP, replies: a backend's datagram that is no live flow's reply but is the reply to a
//!   copy (`SHADOW_REPLY`) is dropped ([`idle_reply`], `Reason::SHADOW_REPLY`); both colours'
//!   reply latency on shadowed flows is summed per colour ([`live_reply`] for the live one).
//!
//! TCP is never shadowed (the daemon refuses it; the data path checks the protocol too): the
//! idle colour's stack would choose its own sequence numbers, so the client's ACKs would mean
//! nothing to it.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_skb_load_bytes, bpf_skb_store_bytes},
};
use switcher_common::{
    Backend, FORWARD_REDIRECT, FlowKey, MAX_POOL, PROTO_UDP, RING_CHUNK, RING_EMPTY, Reason, SEED_RING, SEED_SHADOW,
    SHADOW_META_MAGIC, ShadowCounters, ShadowFlow, ShadowMeta, colour_slot, csum::CsumDelta, flow_hash, pool_slot,
    ring_table, shadow_chosen, shadow_take,
};

use crate::{
    mem,
    nat::{self, Scratch, Side, Verdict},
    parse::{self, Packet},
    prog::{
        BACKENDS, FORWARD_MODE, RING, RING_LIVE, SHADOW, SHADOW_BUCKET, SHADOW_COUNTERS, SHADOW_FLOWS, SHADOW_REPLY,
        SHADOW_SCRATCH, UDP_IDLE_NS,
    },
};

/// The bytes of a datagram that retargeting changes, as they were.
#[repr(C)]
pub struct Saved {
    pub macs: [u8; 12],
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub l4_check: [u8; 2],
    pub ip_check: [u8; 2],
    pub ttl: u8,
    pub _pad: u8,
}

/// Per-CPU working space of both programs (the `SHADOW_SCRATCH` map's value).
#[repr(C)]
pub struct ShadowScratch {
    /// The copy's reply 5-tuple (idle backend → client).
    pub key: FlowKey,
    pub flow: ShadowFlow,
    pub meta: ShadowMeta,
    pub saved: Saved,
    pub fib: FibParams,
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `TC_ACT_REDIRECT`: the verdict `bpf_redirect` returns in a TC program.
const TC_ACT_REDIRECT: i32 = 7;

#[inline(always)]
fn clock() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Adds to a service colour's shadow counters.
#[inline(always)]
fn count(service: u32, colour: u32, f: impl FnOnce(&mut ShadowCounters)) {
    if let Some(c) = SHADOW_COUNTERS.get_ptr_mut(colour_slot(service, colour)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        f(unsafe { &mut *c });
    }
}

/// The backend colour `colour` of `service` gives the flow `key`: the Maglev lookup of a new
/// flow (see `flow::new_flow`).
#[inline(always)]
fn maglev(key: &FlowKey, service: u32, colour: u32) -> Option<&'static Backend> {
    let live = *RING_LIVE.get(colour_slot(service, colour))?;
    let (first, size) = ring_table(live)?;
    let slot = flow_hash(key, SEED_RING) % size;
    let chunk = RING.get(first + slot / RING_CHUNK)?;
    let idx = chunk.slots[(slot % RING_CHUNK) as usize];
    if idx == RING_EMPTY || u32::from(idx) >= MAX_POOL {
        return None;
    }
    let backend = BACKENDS.get(pool_slot(service, colour, u32::from(idx)))?;
    if backend.is_set() { Some(backend) } else { None }
}

/// Two backends compared field by field (no `memcmp` in BPF).
#[inline(always)]
fn same_backend(a: &Backend, b: &Backend) -> bool {
    let mut same = a.port == b.port && a.family == b.family;
    for i in 0..16 {
        same &= a.addr[i] == b.addr[i];
    }
    same
}

/// The shadow entry of the flow `s.key` towards colour `idle`: the one recorded, or a new one
/// (with its reply key) when there is none or it was for another colour. `None`: the idle
/// colour has no backend for it, the same backend as the live one, or the maps are full.
#[inline(always)]
fn entry(s: &Scratch, sh: &mut ShadowScratch, idle: u32, now: u64) -> Option<&'static mut ShadowFlow> {
    if let Some(p) = SHADOW_FLOWS.get_ptr_mut(&s.key) {
        // SAFETY: a live map value; a racing writer can at worst make a stamp stale.
        let e = unsafe { &mut *p };
        if u32::from(e.idle) == idle && e.service == s.flow.service {
            return Some(e);
        }
    }
    let backend = maglev(&s.key, s.flow.service, idle)?;
    if same_backend(backend, &s.flow.backend) {
        return None;
    }
    mem::copy(&mut sh.flow.backend, backend);
    sh.flow.service = s.flow.service;
    sh.flow.live = s.flow.colour;
    sh.flow.idle = idle as u8;
    // Volatile: adjacent zero stores would otherwise be merged into a `memset` call.
    // SAFETY: plain fields of this CPU's scratch.
    unsafe {
        for b in &mut sh.flow._pad {
            core::ptr::write_volatile(b, 0);
        }
        core::ptr::write_volatile(&mut sh.flow.live_sent_ns, 0);
        core::ptr::write_volatile(&mut sh.flow.idle_sent_ns, 0);
    }
    sh.flow.last_ns = now;
    SHADOW_FLOWS.insert(&s.key, &sh.flow, 0).ok()?;
    let k = &mut sh.key;
    mem::copy(&mut k.src, &sh.flow.backend.addr);
    k.sport = sh.flow.backend.port;
    mem::copy(&mut k.dst, &s.key.src);
    k.dport = s.key.sport;
    k.proto = s.key.proto;
    k.family = s.key.family;
    k._pad = [0; 2];
    SHADOW_REPLY.insert(&sh.key, &s.key, 0).ok()?;
    // SAFETY: as above.
    SHADOW_FLOWS.get_ptr_mut(&s.key).map(|p| unsafe { &mut *p })
}

/// XDP, on the way out of the flow code: whether the NAT datagram of `s.flow` is in its
/// service's shadowed share (then the entry point calls [`forward`]). TCP costs nothing (it
/// is tested first: the compiler cannot move a test across the map lookup); a UDP service
/// without a share costs one array lookup.
#[inline(always)]
pub fn wanted(pkt: &Packet, s: &Scratch) -> bool {
    if pkt.proto != PROTO_UDP || pkt.vlan != 0 || pkt.icmp != 0 {
        return false;
    }
    let share = match SHADOW.get(s.flow.service) {
        Some(cfg) => cfg.share_bp,
        None => 0,
    };
    share != 0 && shadow_chosen(flow_hash(&s.key, SEED_SHADOW), share)
}

/// XDP: a NAT datagram of the shadowed flow `s.flow`, counted, to send to its backend. Within
/// the ceiling and with an idle backend it is rewritten to its backend and passed up with the
/// metadata that has the TC program copy it; otherwise it is forwarded as usual. Not inlined,
/// and called from the entry point: the BPF stack is 512 bytes for the whole call chain.
#[inline(never)]
pub fn forward(pkt: &Packet, s: &mut Scratch) -> Verdict {
    let v = mark(pkt, s);
    if v.handled() { v } else { nat::forward(pkt, &s.flow.backend, &mut s.fib) }
}

#[inline(always)]
fn mark(pkt: &Packet, s: &mut Scratch) -> Verdict {
    let service = s.flow.service;
    let Some(cfg) = SHADOW.get(service) else { return Verdict::UNHANDLED };
    let ceiling = cfg.ceiling;
    let Some(sh) = SHADOW_SCRATCH.get_ptr_mut(0) else { return Verdict::UNHANDLED };
    // SAFETY: this CPU's own element; nothing else runs on it while the program does.
    let sh = unsafe { &mut *sh };
    let live = u32::from(s.flow.colour);
    let idle = live ^ 1;
    let now = clock();
    count(service, live, |c| c.shadowed += 1);
    let Some(e) = entry(s, sh, idle, now) else {
        count(service, idle, |c| c.failed += 1);
        return Verdict::UNHANDLED;
    };
    e.live_sent_ns = now;
    e.last_ns = now;
    let Some(bucket) = SHADOW_BUCKET.get_ptr_mut(service) else { return Verdict::UNHANDLED };
    // SAFETY: a live map value shared by the CPUs; a race at worst lets a copy more through.
    if !shadow_take(unsafe { &mut *bucket }, ceiling, now) {
        count(service, idle, |c| c.ceiling += 1);
        return Verdict::UNHANDLED;
    }
    e.idle_sent_ns = now;
    // SAFETY: the context is the program's own.
    let data = unsafe { (*pkt.ctx).data } as usize;
    let m = &mut sh.meta;
    m.magic = SHADOW_META_MAGIC;
    m.service = service as u16;
    m.colour = idle as u8;
    m.v6 = u8::from(pkt.ip.is_v6());
    m.l3 = (pkt.ip.as_ptr() as usize).wrapping_sub(data) as u16;
    m.l4 = (pkt.ports as usize).wrapping_sub(data) as u16;
    mem::copy(&mut m.backend, &e.backend);
    // The live datagram, rewritten to its backend exactly as `nat::forward` does; the TC
    // program routes it after the copy.
    let backend = &s.flow.backend;
    let ip_delta = nat::set_addr(pkt.ip, Side::Dst, &backend.addr);
    let mut l4_delta = ip_delta;
    l4_delta.add(nat::set_port(pkt.ports, Side::Dst, backend.port));
    nat::fix_l4_check(pkt.proto, pkt.check, l4_delta);
    nat::fix_ip_check(pkt.ip, ip_delta);
    if !parse::put_meta(pkt.ctx, &sh.meta) {
        // No room for metadata (a driver without it): the kernel routes the datagram, uncopied.
        e.idle_sent_ns = 0;
        count(service, idle, |c| c.failed += 1);
    }
    Verdict::pass(Reason::SHADOW_FWD)
}

/// XDP: a backend's datagram that is no live flow's reply (`s.miss` is `NOT_LIVE`, `s.key` is
/// its 5-tuple). Dropped if it answers a copy of a shadowed flow still open, else
/// `Verdict::UNHANDLED`. Not inlined: off the common path.
#[inline(never)]
pub fn idle_reply(pkt: &Packet, s: &mut Scratch) -> Verdict {
    if s.miss != Reason::NOT_LIVE.0 || pkt.proto != PROTO_UDP {
        return Verdict::UNHANDLED;
    }
    // SAFETY: values are plain integers; a concurrent update at worst gives a stale copy.
    let Some(flow_key) = (unsafe { SHADOW_REPLY.get(&s.key) }) else { return Verdict::UNHANDLED };
    mem::copy(&mut s.other, flow_key);
    let Some(p) = SHADOW_FLOWS.get_ptr_mut(&s.other) else { return Verdict::UNHANDLED };
    // SAFETY: a live map value.
    let e = unsafe { &mut *p };
    let now = clock();
    let from_backend = e.backend.port == s.key.sport && crate::flow::same_addr(&e.backend.addr, &s.key.src);
    if !from_backend || now.saturating_sub(e.last_ns) > UDP_IDLE_NS.load() {
        return Verdict::UNHANDLED;
    }
    let (service, idle) = (e.service, u32::from(e.idle));
    let sent = e.idle_sent_ns;
    e.idle_sent_ns = 0;
    count(service, idle, |c| {
        c.replies += 1;
        if sent != 0 {
            c.latency_ns += now.saturating_sub(sent);
            c.latency_count += 1;
        }
    });
    Verdict::new(xdp_action::XDP_DROP, Reason::SHADOW_REPLY)
}

/// XDP: a live UDP flow's reply (`key` is the flow's, client → VIP) of `service` (TCP replies
/// do not call it): one array lookup when the service has no shadow share; else the live
/// colour's reply latency is counted for a shadowed flow's first reply to its last request. Not inlined: one call on the reply path.
#[inline(never)]
pub fn live_reply(service: u32, key: &FlowKey) -> u64 {
    let Some(cfg) = SHADOW.get(service) else { return 0 };
    if cfg.share_bp == 0 {
        return 0;
    }
    let Some(p) = SHADOW_FLOWS.get_ptr_mut(key) else { return 0 };
    // SAFETY: a live map value.
    let e = unsafe { &mut *p };
    let sent = e.live_sent_ns;
    if sent == 0 {
        return 0;
    }
    e.live_sent_ns = 0;
    let latency = clock().saturating_sub(sent);
    count(e.service, u32::from(e.live), |c| {
        c.latency_ns += latency;
        c.latency_count += 1;
    });
    1
}

// ---- TC: the copy ----

/// Reads `N` bytes of the packet at `off`.
#[inline(always)]
fn load<const N: usize>(skb: *mut __sk_buff, off: u32) -> Option<[u8; N]> {
    // Not zeroed first: that would be a `memset` call; the helper writes all `N` bytes (or
    // zeroes them on failure).
    let mut out = core::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: the helper checks the offset against the packet and writes `N` bytes.
    let rc = unsafe { bpf_skb_load_bytes(skb.cast(), off, out.as_mut_ptr().cast(), N as u32) };
    // SAFETY: written by the helper.
    if rc == 0 { Some(unsafe { out.assume_init() }) } else { None }
}

/// Writes `N` bytes into the packet at `off`.
#[inline(always)]
fn store<const N: usize>(skb: *mut __sk_buff, off: u32, v: &[u8; N]) -> bool {
    // SAFETY: the helper checks the offset against the packet.
    unsafe { bpf_skb_store_bytes(skb.cast(), off, v.as_ptr().cast(), N as u32, 0) == 0 }
}

/// Offsets of the fields retargeting changes, for the IP version in `m`.
struct Fields {
    addr: u32,
    addr_len: u32,
    ttl: u32,
    ip_check: u32,
    port: u32,
    l4_check: u32,
}

#[inline(always)]
fn fields(m: &ShadowMeta) -> Fields {
    let (l3, l4) = (u32::from(m.l3), u32::from(m.l4));
    if m.v6 != 0 {
        Fields { addr: l3 + 24, addr_len: 16, ttl: l3 + 7, ip_check: 0, port: l4 + 2, l4_check: l4 + 6 }
    } else {
        Fields { addr: l3 + 16, addr_len: 4, ttl: l3 + 8, ip_check: l3 + 10, port: l4 + 2, l4_check: l4 + 6 }
    }
}

/// Saves what retargeting changes.
#[inline(always)]
fn save(skb: *mut __sk_buff, f: &Fields, saved: &mut Saved) -> Option<()> {
    saved.macs = load::<12>(skb, 0)?;
    saved.addr = if f.addr_len == 16 { load::<16>(skb, f.addr)? } else { parse::widen(load::<4>(skb, f.addr)?) };
    saved.port = load::<2>(skb, f.port)?;
    saved.l4_check = load::<2>(skb, f.l4_check)?;
    saved.ttl = load::<1>(skb, f.ttl)?[0];
    saved.ip_check = if f.addr_len == 4 { load::<2>(skb, f.ip_check)? } else { [0; 2] };
    Some(())
}

/// Puts back what [`save`] saved.
#[inline(always)]
fn restore(skb: *mut __sk_buff, f: &Fields, saved: &Saved) -> bool {
    let mut ok = store(skb, 0, &saved.macs);
    if f.addr_len == 16 {
        ok &= store(skb, f.addr, &saved.addr);
    } else {
        let a = &saved.addr;
        ok &= store(skb, f.addr, &[a[0], a[1], a[2], a[3]]);
        ok &= store(skb, f.ip_check, &saved.ip_check);
    }
    ok &= store(skb, f.port, &saved.port);
    ok &= store(skb, f.l4_check, &saved.l4_check);
    ok && store(skb, f.ttl, &[saved.ttl])
}

/// Asks the FIB the way to `dst` for the packet (`saved` holds its current fields; the source
/// is read from the packet). `true` only for a complete answer.
#[inline(always)]
fn route(skb: *mut __sk_buff, m: &ShadowMeta, dst: &[u8; 16], fib: &mut FibParams) -> bool {
    mem::zero(fib);
    let l3 = u32::from(m.l3);
    // SAFETY: the context is the program's own.
    unsafe {
        fib.ifindex = (*skb).ifindex;
        fib.__bindgen_anon_1.tot_len = (*skb).len.saturating_sub(l3) as u16;
    }
    fib.l4_protocol = PROTO_UDP;
    if m.v6 != 0 {
        let Some(src) = load::<16>(skb, l3 + 8) else { return false };
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = nat::words(&src);
        fib.__bindgen_anon_4.ipv6_dst = nat::words(dst);
    } else {
        let Some(src) = load::<4>(skb, l3 + 12) else { return false };
        let Some(tos) = load::<1>(skb, l3 + 1) else { return false };
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = tos[0];
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    }
    // SAFETY: the context is the program's own; `fib` is this CPU's scratch space.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), fib, size_of::<FibParams>() as i32, 0) };
    rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
}

/// Rewrites the packet (whose fields are in `saved`) to go to `addr`/`port` by the FIB's
/// answer: MACs, destination, port, TTL − 1, checksums. `false`: a write failed (the caller
/// restores).
#[inline(always)]
fn retarget(skb: *mut __sk_buff, f: &Fields, saved: &Saved, addr: &[u8; 16], port: [u8; 2], fib: &FibParams) -> bool {
    // SAFETY: the union was filled by the FIB helper.
    let macs = unsafe { &fib.__bindgen_anon_6.__bindgen_anon_2 };
    let mut ok = store(skb, 0, &macs.dmac) && store(skb, 6, &macs.smac);
    let mut ip = CsumDelta::new();
    if f.addr_len == 16 {
        for i in 0..8 {
            ip.replace2([saved.addr[2 * i], saved.addr[2 * i + 1]], [addr[2 * i], addr[2 * i + 1]]);
        }
        ok &= store(skb, f.addr, addr);
    } else {
        let (old, new) = (&saved.addr, [addr[0], addr[1], addr[2], addr[3]]);
        ip.replace4([old[0], old[1], old[2], old[3]], new);
        ok &= store(skb, f.addr, &new);
    }
    let mut l4 = ip;
    l4.replace2(saved.port, port);
    ok &= store(skb, f.port, &port);
    ok &= store(skb, f.l4_check, &l4.apply_udp(saved.l4_check));
    let ttl = saved.ttl.saturating_sub(1);
    ok &= store(skb, f.ttl, &[ttl]);
    if f.addr_len == 4 {
        ip.replace2([saved.ttl, PROTO_UDP], [ttl, PROTO_UDP]);
        ok &= store(skb, f.ip_check, &ip.apply(saved.ip_check));
    }
    ok
}

/// TC ingress (the `shadow` program): a datagram XDP marked is copied to the idle colour's
/// backend, then sent on to its own backend. Anything else passes untouched (`TC_ACT_OK`).
#[inline(always)]
pub fn copy(skb: *mut __sk_buff) -> i32 {
    let Some(sh) = SHADOW_SCRATCH.get_ptr_mut(0) else { return TC_ACT_OK };
    // SAFETY: this CPU's own element; nothing else runs on it while the program does.
    let sh = unsafe { &mut *sh };
    if !parse::take_meta(skb, &mut sh.meta) || sh.meta.magic != SHADOW_META_MAGIC {
        return TC_ACT_OK;
    }
    let (service, idle) = (u32::from(sh.meta.service), u32::from(sh.meta.colour));
    let f = fields(&sh.meta);
    if save(skb, &f, &mut sh.saved).is_none() {
        count(service, idle, |c| c.failed += 1);
        return TC_ACT_OK;
    }
    let sent = sh.saved.ttl > 1
        && route(skb, &sh.meta, &sh.meta.backend.addr, &mut sh.fib)
        && retarget(skb, &f, &sh.saved, &sh.meta.backend.addr, sh.meta.backend.port, &sh.fib)
        // SAFETY: plain helper call on the program's own context.
        && unsafe { aya_ebpf::helpers::bpf_clone_redirect(skb, sh.fib.ifindex, 0) } == 0;
    count(service, idle, |c| if sent { c.sent += 1 } else { c.failed += 1 });
    if !restore(skb, &f, &sh.saved) {
        // The live datagram could not be put back as it was: better lost than misdelivered.
        return aya_ebpf::bindings::TC_ACT_SHOT;
    }
    // The live datagram, sent on as XDP would have sent it.
    if FORWARD_MODE.load() != FORWARD_REDIRECT || sh.saved.ttl <= 1 {
        return TC_ACT_OK;
    }
    let live = sh.saved.addr;
    if !route(skb, &sh.meta, &live, &mut sh.fib) {
        return TC_ACT_OK;
    }
    if !retarget(skb, &f, &sh.saved, &live, sh.saved.port, &sh.fib) {
        return if restore(skb, &f, &sh.saved) { TC_ACT_OK } else { aya_ebpf::bindings::TC_ACT_SHOT };
    }
    // SAFETY: plain helper call.
    let rc = unsafe { bpf_redirect(sh.fib.ifindex, 0) } as i32;
    if rc == TC_ACT_REDIRECT { rc } else { TC_ACT_OK }
}
