//! Many open flows made through a running daemon's own program, and what to read of the
//! daemon then (the scale test and the control-plane bench): `BPF_PROG_TEST_RUN` of the
//! program behind a pinned XDP link on distinct UDP queries to the dns service.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use etherparse::PacketBuilder;

use crate::net::{Netns, VIP, VIP_UDP};

/// Client addresses the flows come from (192.0.2.100 and up; ports 1024 and up of each).
const CLIENTS: u32 = 64;
/// Ports per client address.
const PORTS: u32 = 64_000;

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

/// Flows number `from` to `to` (exclusive) through the program behind the pinned XDP `link`,
/// each a UDP query from its own address and port of 192.0.2.0/24; run in the load
/// balancer's namespace. Returns how many runs the program did not drop or abort.
///
/// # Panics
/// Above `CLIENTS * PORTS` flows, or when a syscall fails.
#[must_use]
pub fn fill(link: &Path, from: u32, to: u32) -> u32 {
    assert!(to <= CLIENTS * PORTS, "at most {} flows", CLIENTS * PORTS);
    let prog = program_of_link(link);
    let mut out = vec![0u8; 256];
    let mut passed = 0;
    let mut frame = Vec::new();
    let mut client = u32::MAX;
    for n in from..to {
        if n / PORTS != client {
            client = n / PORTS;
            frame = query(Ipv4Addr::new(192, 0, 2, 100 + u8::try_from(client).expect("client")));
        }
        let port = u16::try_from(1024 + n % PORTS).expect("port");
        frame[14 + 20..14 + 20 + 2].copy_from_slice(&port.to_be_bytes());
        if run(&prog, &frame, &mut out) > 1 {
            passed += 1;
        }
    }
    passed
}

/// A process's own resident memory (anonymous and shared, not the BPF maps it maps), in KiB.
///
/// # Panics
/// When its status cannot be read.
#[must_use]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in status"));
        line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or_else(|| panic!("{name} in kB"))
    };
    // The daemon maps `FLOWS` (the kernel's memory, counted in the map's own figure): its
    // pages show as the process's file-backed RSS, not as memory of its own.
    field("RssAnon:") + field("RssShmem:")
}

/// A pinned map's `max_entries` and kernel memory (bytes), from its fdinfo.
///
/// # Panics
/// When the pin or its fdinfo cannot be read.
#[must_use]
pub fn map_size(path: &Path) -> (u64, u64) {
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

/// `GET /metrics` from the daemon's default endpoint, 127.0.0.1:9477, in `ns`.
///
/// # Panics
/// When the endpoint does not answer.
#[must_use]
pub fn scrape(ns: &Netns) -> String {
    ns.run(|| {
        let mut s = TcpStream::connect(("127.0.0.1", 9477)).expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read metrics");
        body
    })
}
