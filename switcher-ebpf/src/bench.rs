//! `switcher-bench`: the benchmarks' own XDP object, built next to `switcher` and never loaded
//! by the daemon (it embeds only `switcher`). `tests/src/bin/bench.rs` loads it:
//!
//! - `baseline` does nothing but pass: the trivial program every per-packet figure is a
//!   difference from.
//! - `bench_fixed` and `bench_fresh` are the per-packet benchmark's harness. Run by
//!   `BPF_PROG_TEST_RUN` with `repeat`, each iteration writes the frame in `BENCH_TEMPLATE`
//!   into the packet (the program under test rewrote the previous one) and tail-calls the
//!   program in `BENCH_TARGET` slot 0 — switcher's own program (a different object: a
//!   program array takes any XDP program fd), or `baseline` to measure the harness itself.
//!   `bench_fresh` also gives every iteration a source no earlier iteration had (port and
//!   last address byte from the counter in `BENCH_SEQ`), so each SYN is a new 5-tuple.
//! - `bench_tx` writes the frame in `BENCH_FRAME` and sends it out of the interface it came
//!   in on. Run with `BPF_PROG_TEST_RUN` + `BPF_F_TEST_XDP_LIVE_FRAMES` and the client's
//!   interface as ingress, it is a packet generator that pushes frames into the client's veth
//!   towards the lb.
//! - `bench_forward` is the contender switcher is compared with on the lb: a plain IPv4 XDP
//!   router (FIB lookup, MACs, TTL, `bpf_redirect`), the least an XDP forwarder does.
//! - `bench_drop` counts nothing and drops everything: the sink on the backend's interface
//!   (the interface's own XDP counters tell how many frames arrived).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use core::mem::size_of;

    use aya_ebpf::{
        bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
        helpers::{bpf_fib_lookup, bpf_redirect, generated::bpf_xdp_store_bytes},
        macros::{map, xdp},
        maps::{Array, ProgramArray},
        programs::XdpContext,
    };

    const ETH_LEN: usize = 14;
    const IPV4_LEN: usize = 20;
    const AF_INET: u8 = 2;

    /// Length of the generator's frame (`BENCH_FRAME`).
    const FRAME_LEN: usize = 64;
    /// Length of the harness's frame (`BENCH_TEMPLATE`): every per-packet frame is this long.
    const TEMPLATE_LEN: usize = 128;

    /// 0 → the live-frame generator's 64-byte frame. Written by the bench.
    #[map(name = "BENCH_FRAME")]
    static BENCH_FRAME: Array<[u64; FRAME_LEN / 8]> = Array::with_max_entries(1, 0);

    /// 0 → the harness's 128-byte frame (Ethernet, IPv4 or IPv6 without options or extension
    /// headers, TCP). Written by the bench.
    #[map(name = "BENCH_TEMPLATE")]
    static BENCH_TEMPLATE: Array<[u64; TEMPLATE_LEN / 8]> = Array::with_max_entries(1, 0);

    /// 0 → the program under test (switcher's, or `baseline`). Written by the bench.
    #[map(name = "BENCH_TARGET")]
    static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

    /// 0 → how many sources `bench_fresh` has handed out. Written here; the bench reads it
    /// to check that every iteration ran. The bench runs pinned to one CPU.
    #[map(name = "BENCH_SEQ")]
    static BENCH_SEQ: Array<u64> = Array::with_max_entries(1, 0);

    /// The benchmarks' baseline: does nothing but pass.
    #[xdp]
    pub fn baseline(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// The harness for a fixed 5-tuple: restore the frame, run the target.
    #[xdp]
    pub fn bench_fixed(ctx: XdpContext) -> u32 {
        match restore(&ctx) {
            Some(_) => target(&ctx),
            None => xdp_action::XDP_ABORTED,
        }
    }

    /// The harness for new flows: restore the frame, give it a fresh source, run the target.
    #[xdp]
    pub fn bench_fresh(ctx: XdpContext) -> u32 {
        match restore(&ctx).and_then(freshen) {
            Some(()) => target(&ctx),
            None => xdp_action::XDP_ABORTED,
        }
    }

    /// The live-frame benchmark's generator: every frame back out.
    #[xdp]
    pub fn bench_tx(ctx: XdpContext) -> u32 {
        tx(&ctx)
    }

    /// The live-frame benchmark's contender: a plain XDP IPv4 router.
    #[xdp]
    pub fn bench_forward(ctx: XdpContext) -> u32 {
        forward(&ctx)
    }

    /// The live-frame benchmark's sink.
    #[xdp]
    pub fn bench_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }

    /// Tail-calls the program under test. Only returns if the call failed (an empty slot,
    /// or a program the kernel would not chain): `XDP_ABORTED`, which the bench refuses.
    #[inline(always)]
    fn target(ctx: &XdpContext) -> u32 {
        // SAFETY: control leaves for the target program, nothing here needs to run after it.
        unsafe { BENCH_TARGET.tail_call(ctx, 0) };
        xdp_action::XDP_ABORTED
    }

    /// Writes `BENCH_TEMPLATE` over the packet's first 128 bytes (one helper call, a copy);
    /// the packet's start. Metadata a previous iteration left in front of the frame (a
    /// shadowed datagram's) is dropped first, as a new frame has none.
    #[inline(always)]
    fn restore(ctx: &XdpContext) -> Option<*mut u8> {
        let left = ctx.data().saturating_sub(ctx.metadata());
        if left > 0 {
            // SAFETY: the program's own context; only metadata it may drop is dropped.
            unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx.ctx, left as i32) };
        }
        let start = ctx.data();
        if start + TEMPLATE_LEN > ctx.data_end() {
            return None;
        }
        let frame = BENCH_TEMPLATE.get_ptr_mut(0)?;
        // SAFETY: a map value of TEMPLATE_LEN bytes, read by the helper.
        let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, frame.cast(), TEMPLATE_LEN as u32) };
        (rc == 0).then_some(start as *mut u8)
    }

    /// Sets the source port to `0x8000 | (n & 0x7fff)` and the source address's last byte
    /// to `n >> 15` for the next `n` of `BENCH_SEQ`, with the checksums updated (RFC 1624).
    /// Offsets are those of the template's layout (no IP options, no extension headers).
    #[inline(always)]
    fn freshen(p: *mut u8) -> Option<()> {
        let seq = BENCH_SEQ.get_ptr_mut(0)?;
        // SAFETY: one element, the bench runs on one CPU; the restored frame is 128 bytes and
        // every offset below is inside it.
        unsafe {
            *seq += 1;
            let n = *seq;
            let port = 0x8000 | (n & 0x7fff) as u16;
            let last = (n >> 15) as u8;
            // (last byte of the source address, source port, IP checksum, TCP checksum)
            let (addr, sport, ip_check, l4_check) = match (*p.add(12), *p.add(13)) {
                (0x08, 0x00) => (ETH_LEN + 15, ETH_LEN + 20, Some(ETH_LEN + 10), ETH_LEN + 20 + 16),
                (0x86, 0xdd) => (ETH_LEN + 8 + 15, ETH_LEN + 40, None, ETH_LEN + 40 + 16),
                _ => return None,
            };
            // The 16-bit word that holds the address's last byte, before and after.
            let old_word = u16::from_be_bytes([*p.add(addr - 1), *p.add(addr)]);
            let new_word = (old_word & 0xff00) | u16::from(last);
            let old_port = u16::from_be_bytes([*p.add(sport), *p.add(sport + 1)]);
            *p.add(addr) = last;
            write16(p, sport, port);
            if let Some(at) = ip_check {
                write16(p, at, csum_replace(read16(p, at), old_word, new_word));
            }
            let check = csum_replace(read16(p, l4_check), old_word, new_word);
            write16(p, l4_check, csum_replace(check, old_port, port));
        }
        Some(())
    }

    /// A checksum after one of the 16-bit words it covers went from `old` to `new`.
    #[inline(always)]
    fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
        let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    /// SAFETY (both): `at + 2` is within the bounds-checked frame.
    #[inline(always)]
    unsafe fn read16(p: *mut u8, at: usize) -> u16 {
        unsafe { u16::from_be_bytes([*p.add(at), *p.add(at + 1)]) }
    }

    #[inline(always)]
    unsafe fn write16(p: *mut u8, at: usize, v: u16) {
        let [hi, lo] = v.to_be_bytes();
        unsafe {
            *p.add(at) = hi;
            *p.add(at + 1) = lo;
        }
    }

    /// Writes the frame from `BENCH_FRAME` into the packet and sends it back out. Live-frame
    /// test runs recycle their pages without resetting them, and the frame comes back
    /// rewritten by the lb's program (addresses, MACs, TTL): it has to be restored every run.
    #[inline(always)]
    fn tx(ctx: &XdpContext) -> u32 {
        let start = ctx.data();
        if start + FRAME_LEN > ctx.data_end() {
            return xdp_action::XDP_DROP;
        }
        let Some(frame) = BENCH_FRAME.get(0) else { return xdp_action::XDP_DROP };
        let out = start as *mut u64;
        for (i, word) in frame.iter().enumerate() {
            // SAFETY: FRAME_LEN bytes were bounds-checked above; 8 words of 8 bytes.
            unsafe { out.add(i).write_unaligned(*word) };
        }
        xdp_action::XDP_TX
    }

    /// Routes an IPv4 frame by the FIB and redirects it; anything else passes.
    #[inline(always)]
    fn forward(ctx: &XdpContext) -> u32 {
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
