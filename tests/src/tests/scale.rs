//! Real scale: a daemon with the largest flow table (`max_flows = 16,777,216`) and a million
//! open flows, made by running the daemon's own attached program on a million distinct UDP
//! frames (`BPF_PROG_TEST_RUN` in the load balancer's namespace). It cuts over, reports status
//! and metrics, ends a drain over all of them, and its memory stays small: the flows are
//! counted in batches by a walker thread, never listed. Times are printed, not asserted (the
//! bench has the figures).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use switcher_user::{control::Response, pins::Pins};

use crate::{
    net::{Topology, VIP, VIP_UDP, wait_for},
    proc::{Daemon, config_with, pin_path},
};

/// Open flows the test makes.
const FLOWS: u32 = 1_000_000;
/// The largest flow table the config accepts.
const MAX_FLOWS: u32 = 16_777_216;
/// Client addresses the flows come from (ports 1024 and up of each).
const CLIENTS: u32 = 16;
/// What the daemon may hold in memory with that many flows open.
const RSS_LIMIT_KIB: u64 = 100 * 1024;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: a 128-byte attribute block of ours; the pointers in it are the callers' and
    // outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a descriptor the kernel just gave this process, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

/// A pinned object's descriptor.
fn obj_get(path: &Path) -> OwnedFd {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    owned(bpf(BPF_OBJ_GET, &mut attr).unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", path.display())))
}

/// The program behind a pinned XDP link.
fn program_of_link(link: &Path) -> OwnedFd {
    let fd = obj_get(link);
    // struct bpf_link_info { type, id, prog_id: u32, … }
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = u64::try_from(fd.as_raw_fd()).expect("fd") | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("link info");
    let mut attr = [0u64; 16];
    attr[0] = u64::from(info[2]);
    owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).expect("the link's program"))
}

/// Runs the program once on `frame`; returns its verdict.
fn run(prog: &OwnedFd, frame: &[u8], out: &mut [u8]) -> u32 {
    let mut attr = [0u64; 16];
    attr[0] = u64::try_from(prog.as_raw_fd()).expect("fd");
    attr[1] = frame.len() as u64 | ((out.len() as u64) << 32);
    attr[2] = frame.as_ptr() as u64;
    attr[3] = out.as_mut_ptr() as u64;
    attr[4] = 1; // repeat
    bpf(BPF_PROG_TEST_RUN, &mut attr).expect("BPF_PROG_TEST_RUN");
    (attr[0] >> 32) as u32
}

/// A UDP query to the dns service from `src`, with no UDP checksum (so the port can change
/// in place).
fn query(src: Ipv4Addr) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x0c], [2, 0, 0, 0, 0, 0x1b])
        .ipv4(src.octets(), VIP.octets(), 64)
        .udp(1024, VIP_UDP)
        .write(&mut v, b"query")
        .expect("build udp");
    v[14 + 20 + 6] = 0;
    v[14 + 20 + 7] = 0;
    v
}

/// `FLOWS` distinct flows through the daemon's program, from `CLIENTS` addresses of
/// 192.0.2.0/24; returns how many runs the program did not drop or abort.
fn fill(link: &Path) -> u32 {
    let prog = program_of_link(link);
    let mut out = vec![0u8; 256];
    let mut passed = 0;
    let per_client = FLOWS / CLIENTS;
    for c in 0..CLIENTS {
        let mut frame = query(Ipv4Addr::new(192, 0, 2, 100 + u8::try_from(c).expect("client")));
        for i in 0..per_client {
            let port = u16::try_from(1024 + i).expect("port");
            frame[14 + 20..14 + 20 + 2].copy_from_slice(&port.to_be_bytes());
            let verdict = run(&prog, &frame, &mut out);
            if verdict > 1 {
                passed += 1;
            }
        }
    }
    passed
}

/// The daemon's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS in kB")
}

/// A pinned map's `max_entries` and kernel memory (bytes), from its fdinfo.
fn map_size(path: &Path) -> (u64, u64) {
    let fd = obj_get(path);
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).expect("fdinfo");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {info}"))
    };
    (field("max_entries:"), field("memlock:"))
}

fn scrape(t: &Topology) -> String {
    t.lb.run(|| {
        let mut s = TcpStream::connect(("127.0.0.1", 9477)).expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read metrics");
        body
    })
}

fn dns(r: &Response) -> &switcher_user::control::ServiceStatus {
    r.services.iter().find(|s| s.name == "dns").expect("dns in status")
}

#[test]
fn a_million_open_flows_cut_over_and_report_status_in_bounded_memory() {
    if !crate::have_root("a_million_open_flows_cut_over_and_report_status_in_bounded_memory") {
        return;
    }
    let t = Topology::new();
    let d = Daemon::start(&t.lb, |s| {
        format!(
            "max_flows = {MAX_FLOWS}\nudp_idle_timeout_secs = 900\n{}",
            config_with(&t.lb_ifaces, "redirect", s, "")
        )
    });
    let pins = Pins::new(pin_path(&d.socket));
    let (entries, memlock) = map_size(&pins.map(switcher_common::MAP_FLOWS));
    assert_eq!(entries, u64::from(MAX_FLOWS), "the flow table has the configured size");
    let idle_rss = rss_kib(d.pid());
    let timed = |what: &str, f: &mut dyn FnMut() -> String| {
        let started = Instant::now();
        let out = f();
        eprintln!("{what}: {} ms", started.elapsed().as_millis());
        out
    };
    let empty_cutover = timed("cut-over with no flows open", &mut || d.cli_ok(&["cutover", "dns", "green"]));
    assert!(empty_cutover.contains("blue → green"), "{empty_cutover}");
    let back = d.cli_ok(&["cutover", "dns", "blue"]);
    assert!(back.contains("green → blue"), "{back}");
    let _ = timed("status with no flows open", &mut || d.cli_ok(&["status"]));
    let _ = timed("scrape with no flows open", &mut || scrape(&t));

    let link = pins.link(&t.lb_ifaces[0]);
    let started = Instant::now();
    let passed = t.lb.run(move || fill(&link));
    eprintln!("{FLOWS} flows made in {} ms ({passed} forwarded or passed up)", started.elapsed().as_millis());
    assert_eq!(passed, FLOWS, "every query was forwarded or passed up");

    let status = d.status_counted();
    let blue = dns(&status).colours[0].live_flows;
    assert!(
        (u64::from(FLOWS) * 99 / 100..=u64::from(FLOWS)).contains(&blue),
        "status counts the open flows: {blue} of {FLOWS}"
    );
    let ago = status.flows_counted_ms_ago.expect("the age of the counts");
    let took = status.flows_count_took_ms.expect("how long a pass took");
    eprintln!("a pass over {blue} flows took {took} ms; status showed it {ago} ms later");
    let text = timed("status with a million flows open", &mut || d.cli_ok(&["status"]));
    assert!(text.contains("open flows as counted"), "status says how old its counts are: {text}");
    let metrics = timed("scrape with a million flows open", &mut || scrape(&t));
    assert!(metrics.contains(&format!("switcher_open_flows{{service=\"dns\",colour=\"blue\"}} {blue}\n")), "{metrics}");
    assert!(metrics.contains("switcher_open_flows_age_seconds "), "{metrics}");

    // The cut-over answers from the last count, which saw the million flows.
    let out = timed("cut-over with a million flows open", &mut || d.cli_ok(&["cutover", "dns", "green"]));
    assert!(out.contains("blue → green") && out.contains("open flows on blue drain"), "{out}");
    let status = d.status();
    let drain = dns(&status).drain.clone().expect("a drain of blue");
    assert!(drain.initial_flows >= u64::from(FLOWS) * 99 / 100, "{drain:?}");

    // `--wait` follows the drain to its timeout, which moves every flow of blue (batch by
    // batch) to green.
    let out = timed("rollback and back with --drain-timeout 1 --wait", &mut || {
        let _ = d.cli_ok(&["rollback", "dns"]);
        d.cli_ok(&["cutover", "dns", "green", "--drain-timeout", "1", "--wait"])
    });
    assert!(out.contains("blue → green"), "{out}");
    let status = d.status();
    assert!(dns(&status).drain.is_none(), "the drain ended: {:?}", dns(&status).drain);
    // The flows are moved in the background, off the board's lock.
    let started = Instant::now();
    let moved = wait_for(Duration::from_secs(90), || {
        let s = d.status_counted();
        (dns(&s).colours[0].live_flows == 0).then_some(s)
    })
    .expect("blue's flows moved to green within 90 s");
    eprintln!("the drain's end moved the flows in about {} ms", started.elapsed().as_millis());
    let green = dns(&moved).colours[1].live_flows;
    assert!(green >= u64::from(FLOWS) * 99 / 100, "the drain moved blue's flows to green: {green}");
    assert!(d.log().contains("flows handled"), "{}", d.log());

    let rss = rss_kib(d.pid());
    eprintln!(
        "daemon RSS: {} MiB idle, {} MiB with {FLOWS} flows open; FLOWS ({MAX_FLOWS} entries): {} MiB of kernel memory",
        idle_rss / 1024,
        rss / 1024,
        memlock >> 20
    );
    assert!(rss < RSS_LIMIT_KIB, "the daemon holds no list of the flows: {} MiB resident", rss / 1024);
}
