//! The hostile-packet corpus and a property test of the data path, under BPF_PROG_TEST_RUN.
//! Across both: the program never aborts, the verdict counters add up to the packets run, a
//! passed packet leaves byte-identical, and bad input never inserts a flow.

use std::time::Duration;

use aya::programs::{TestRun as _, TestRunOptions};
use switcher_user::dataplane::{Dataplane, Options};

use crate::{
    corpus::{self, Case, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    net::{Netns, unique_prefix},
    trace::ExceptionCounter,
};

fn open() -> Dataplane {
    Dataplane::open(
        &corpus::services(),
        Options { udp_idle_timeout: Duration::from_secs(30), redirect: false, max_flows: None, ..Options::default() },
    )
    .expect("load the XDP program")
}

fn total(dp: &Dataplane) -> u64 {
    dp.reasons().expect("reasons").iter().map(|(_, n)| n).sum()
}

/// Runs one frame; returns the action and the output frame.
fn run(dp: &mut Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let r = dp
        .program()
        .expect("program")
        .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn load_corpus() -> Vec<Case> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("tests/corpus").flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .map(|p| {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let text = std::fs::read_to_string(p).expect("read case");
            Case::parse(&name, &text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

#[test]
fn the_hostile_packet_corpus() {
    if !crate::have_root("the_hostile_packet_corpus") {
        return;
    }
    let cases = load_corpus();
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let exceptions = ExceptionCounter::open().expect("count xdp:xdp_exception");
    let before_exc = exceptions.count();
    let ns = Netns::new(format!("{}-hostile", unique_prefix()));
    ns.run(move || {
        let mut dp = open();
        let start = total(&dp);
        for case in &cases {
            let before = dp.reasons().expect("reasons");
            let flows = dp.flows().len();
            let (action, out) = run(&mut dp, &case.input);
            let after = dp.reasons().expect("reasons");
            let delta: Vec<(&str, u64)> =
                before.iter().zip(&after).filter(|(b, a)| a.1 != b.1).map(|(b, a)| (a.0, a.1 - b.1)).collect();
            assert_eq!(action, case.action, "{}: {} — action", case.name, case.about);
            assert_eq!(delta, [(case.reason.as_str(), 1)], "{}: {} — reason", case.name, case.about);
            match &case.output {
                None => {
                    assert_eq!(out, case.input, "{}: must leave byte-identical", case.name);
                    assert_eq!(dp.flows().len(), flows, "{}: untranslated input inserted a flow", case.name);
                }
                Some(expected) => assert_eq!(out, *expected, "{}: {} — output", case.name, case.about),
            }
        }
        assert_eq!(total(&dp) - start, cases.len() as u64, "one verdict per packet");
    });
    assert_eq!(exceptions.count() - before_exc, 0, "xdp_exception fired");
}

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutates a frame: flip bytes, set bytes to edge values, truncate, extend, or splice.
fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
    let mut v = frame.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0u8, 0xff, 0x7f, 0x80, 0x01][rng.below(5)];
            }
            2 if v.len() > 14 => v.truncate(14 + rng.below(v.len() - 14)),
            3 => v.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
            4 if v.len() > 20 => {
                let i = 12 + rng.below(v.len() - 12);
                v[i] = rng.next() as u8;
            }
            _ => {
                // An entirely random tail after the Ethernet header.
                v.truncate(14);
                v.extend((0..rng.below(120)).map(|_| rng.next() as u8));
            }
        }
    }
    if v.len() < 14 {
        v.resize(14, 0);
    }
    v
}

/// Whether an IPv4 or IPv6 TCP/UDP frame's checksums are all right.
fn checksums_ok(frame: &[u8]) -> bool {
    match etherparse::SlicedPacket::from_ethernet(frame) {
        Ok(p) => match (&p.net, &p.transport) {
            (Some(etherparse::NetSlice::Ipv4(ip)), Some(t)) => {
                let h = ip.header();
                if switcher_common::csum::checksum(0, h.slice()) != [0, 0] {
                    return false;
                }
                let (src, dst) = (h.source_addr().octets(), h.destination_addr().octets());
                let l4 = ip.payload().payload;
                match t {
                    etherparse::TransportSlice::Tcp(_) => pseudo4(src, dst, 6, l4),
                    etherparse::TransportSlice::Udp(u) => u.checksum() == 0 || pseudo4(src, dst, 17, l4),
                    _ => true,
                }
            }
            (Some(etherparse::NetSlice::Ipv6(ip)), Some(t)) => {
                let h = ip.header();
                let (src, dst) = (h.source_addr().octets(), h.destination_addr().octets());
                let l4 = ip.payload().payload;
                match t {
                    etherparse::TransportSlice::Tcp(_) => pseudo6(src, dst, 6, l4),
                    etherparse::TransportSlice::Udp(_) => pseudo6(src, dst, 17, l4),
                    _ => true,
                }
            }
            _ => true,
        },
        Err(_) => true,
    }
}

fn words(b: &[u8]) -> u32 {
    b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn pseudo4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> bool {
    let init = words(&src) + words(&dst) + u32::from(proto) + l4.len() as u32;
    switcher_common::csum::checksum(init, l4) == [0, 0]
}

fn pseudo6(src: [u8; 16], dst: [u8; 16], proto: u8, l4: &[u8]) -> bool {
    let init = words(&src) + words(&dst) + u32::from(proto) + l4.len() as u32;
    switcher_common::csum::checksum(init, l4) == [0, 0]
}

/// Whether a frame involves a VIP or a backend address (only those may be rewritten).
fn involves_service(frame: &[u8]) -> bool {
    let needles: [&[u8]; 5] = [
        &corpus::VIP.octets(),
        &corpus::BLUE.octets(),
        &[198, 51, 100, 18],
        &corpus::VIP6.octets(),
        &corpus::BLUE6.octets(),
    ];
    needles.iter().any(|n| frame.windows(n.len()).any(|w| w == *n))
}

#[test]
fn a_hundred_thousand_random_and_mutated_packets() {
    if !crate::have_root("a_hundred_thousand_random_and_mutated_packets") {
        return;
    }
    const RUNS: usize = 100_000;
    let seeds: Vec<Vec<u8>> = corpus::generate().into_iter().map(|c| c.input).collect();
    let exceptions = ExceptionCounter::open().expect("count xdp:xdp_exception");
    let before_exc = exceptions.count();
    let ns = Netns::new(format!("{}-prop", unique_prefix()));
    ns.run(move || {
        let mut dp = open();
        let start = total(&dp);
        let seed = 0x5eed_cafe_f00d_u64;
        let mut rng = Rng(seed);
        let (mut rewritten, mut passed_same) = (0u32, 0u32);
        for i in 0..RUNS {
            let base = &seeds[rng.below(seeds.len())];
            let input = if i % 10 == 0 { base.clone() } else { mutate(&mut rng, base) };
            let (action, out) = run(&mut dp, &input);
            assert!(
                matches!(action, XDP_PASS | XDP_TX | XDP_REDIRECT | XDP_DROP),
                "run {i} (seed {seed:#x}): undocumented action {action} for {input:02x?}"
            );
            assert_ne!(action, XDP_DROP, "run {i}: dropped (only DSR drops, and no DSR service is configured)");
            if out == input {
                passed_same += 1;
                continue;
            }
            rewritten += 1;
            assert!(
                involves_service(&input),
                "run {i} (seed {seed:#x}): rewrote a packet of no service: {input:02x?} → {out:02x?}"
            );
            assert_eq!(out.len(), input.len(), "run {i}: a rewrite changed the length");
            if checksums_ok(&input) {
                assert!(
                    checksums_ok(&out),
                    "run {i} (seed {seed:#x}): valid checksums in, invalid out: {input:02x?} → {out:02x?}"
                );
            }
        }
        assert_eq!(total(&dp) - start, RUNS as u64, "one verdict per packet");
        assert!(
            rewritten > 1_000 && passed_same > 10_000,
            "the mix exercised both paths: {rewritten} rewritten, {passed_same} passed"
        );
        eprintln!("{RUNS} packets: {rewritten} rewritten, {passed_same} passed byte-identical");
    });
    assert_eq!(exceptions.count() - before_exc, 0, "xdp_exception fired");
}
