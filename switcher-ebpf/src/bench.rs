//! Programs for the live-frame packet-rate benchmark, never attached by the daemon:
//!
//! - `bench_tx` writes the frame in `BENCH_FRAME` and sends it out of the interface it came
//!   in on. Run with
//!   `BPF_PROG_TEST_RUN` + `BPF_F_TEST_XDP_LIVE_FRAMES` and the client's interface as ingress,
//!   it is a packet generator that pushes frames into the client's veth towards the lb.
//! - `bench_forward` is the contender switcher is compared with on the lb: a plain IPv4 XDP
//!   router (FIB lookup, MACs, TTL, `bpf_redirect`), the least an XDP forwarder does.
//! - `bench_drop` counts nothing and drops everything: the sink on the backend's interface
//!   (the interface's own XDP counters tell how many frames arrived).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const AF_INET: u8 = 2;

/// Length of the generator's frame (`BENCH_FRAME`).
pub const FRAME_LEN: usize = 64;

/// Writes the frame from `BENCH_FRAME` into the packet and sends it back out. Live-frame
/// test runs recycle their pages without resetting them, and the frame comes back rewritten
/// by the lb's program (addresses, MACs, TTL): it has to be restored for every run.
#[inline(always)]
pub fn tx(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + FRAME_LEN > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let Some(frame) = crate::prog::BENCH_FRAME.get(0) else { return xdp_action::XDP_DROP };
    let out = start as *mut u64;
    for (i, word) in frame.iter().enumerate() {
        // SAFETY: FRAME_LEN bytes were bounds-checked above; 8 words of 8 bytes.
        unsafe { out.add(i).write_unaligned(*word) };
    }
    xdp_action::XDP_TX
}

#[inline(always)]
pub fn drop(_ctx: &XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Routes an IPv4 frame by the FIB and redirects it; anything else passes.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + ETH_LEN + IPV4_LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut u8;
    // SAFETY: the first 34 bytes were bounds-checked just above.
    unsafe {
        if *eth.add(12) != 0x08 || *eth.add(13) != 0x00 {
            return xdp_action::XDP_PASS;
        }
        let ip = eth.add(ETH_LEN);
        if *ip != 0x45 || *ip.add(8) <= 1 {
            return xdp_action::XDP_PASS;
        }
        let mut fib: FibParams = core::mem::zeroed();
        fib.family = AF_INET;
        fib.l4_protocol = *ip.add(9);
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes([*ip.add(2), *ip.add(3)]);
        fib.__bindgen_anon_2.tos = *ip.add(1);
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([*ip.add(12), *ip.add(13), *ip.add(14), *ip.add(15)]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([*ip.add(16), *ip.add(17), *ip.add(18), *ip.add(19)]);
        fib.ifindex = ctx.ingress_ifindex() as u32;
        let rc = bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0);
        if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
            return xdp_action::XDP_PASS;
        }
        // TTL − 1, and the header checksum by RFC 1624 (as the kernel's ip_decrease_ttl).
        *ip.add(8) -= 1;
        let check = u32::from(u16::from_be_bytes([*ip.add(10), *ip.add(11)])) + 0x0100;
        let check = (check + (check >> 16)) as u16;
        let [hi, lo] = check.to_be_bytes();
        *ip.add(10) = hi;
        *ip.add(11) = lo;
        let macs = fib.__bindgen_anon_6.__bindgen_anon_2;
        for i in 0..6 {
            *eth.add(i) = macs.dmac[i];
            *eth.add(6 + i) = macs.smac[i];
        }
        bpf_redirect(fib.ifindex, 0) as u32
    }
}
