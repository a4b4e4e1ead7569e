//! Network namespaces, veth, and TCP/UDP servers and clients that live inside namespaces.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The first backend of each colour; `BLUES`/`GREENS` hold all three.
pub const BLUE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const GREEN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 18);
pub const BLUES: [Ipv4Addr; 3] = [BLUE, Ipv4Addr::new(198, 51, 100, 3), Ipv4Addr::new(198, 51, 100, 4)];
pub const GREENS: [Ipv4Addr; 3] = [GREEN, Ipv4Addr::new(198, 51, 100, 19), Ipv4Addr::new(198, 51, 100, 20)];
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
pub const BLUE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const GREEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
/// Port the backends serve TCP on, and UDP on.
pub const BACKEND_TCP: u16 = 8080;
pub const BACKEND_UDP: u16 = 5353;
/// The service ports on the VIP.
pub const VIP_TCP: u16 = 80;
pub const VIP_UDP: u16 = 53;

/// Runs a command, panicking with its output if it fails.
///
/// # Panics
/// When the command cannot run or exits non-zero.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A unique, short prefix for this process's names (interface names have 15 bytes).
#[must_use]
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("sw{}x{n}", std::process::id() % 100_000)
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
    /// Whether drop deletes it (not for a handle to somebody else's namespace).
    owned: bool,
}

impl Netns {
    /// # Panics
    /// When `ip netns add` fails.
    #[must_use]
    pub fn new(name: String) -> Netns {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        // No duplicate address detection: the namespace is ours alone, and tentative link-local
        // addresses would delay IPv6 neighbour discovery for the first second or two.
        for knob in ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"] {
            ns.exec(&["sysctl", "-qw", knob]);
        }
        ns
    }

    /// A handle to an existing namespace that drop leaves alone.
    #[must_use]
    pub fn attach(name: &str) -> Netns {
        Netns { name: name.to_owned(), owned: false }
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates stay in it.
    ///
    /// # Panics
    /// When the namespace cannot be entered, or `f` panics.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Spawns a long-lived thread inside the namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: a valid namespace fd; setns only affects the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// client / lb / blue / green joined by veth, as in the crate docs.
pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub blue: Netns,
    pub green: Netns,
    /// The lb's interfaces, to attach the program to.
    pub lb_ifaces: Vec<String>,
}

impl Topology {
    /// Builds the topology with names starting with a fresh unique prefix, with the veth ends
    /// prepared for XDP redirect (`ethtool -K gro on tx off`).
    ///
    /// # Panics
    /// When any `ip`/`ethtool` command fails.
    #[must_use]
    pub fn new() -> Topology {
        Topology::build(true)
    }

    /// The same topology as a user would make it by hand: veth with default offloads.
    ///
    /// # Panics
    /// When any `ip` command fails.
    #[must_use]
    pub fn plain() -> Topology {
        Topology::build(false)
    }

    fn build(prepare_veth: bool) -> Topology {
        let p = unique_prefix();
        let t = Topology {
            client: Netns::new(format!("{p}-client")),
            lb: Netns::new(format!("{p}-lb")),
            blue: Netns::new(format!("{p}-blue")),
            green: Netns::new(format!("{p}-green")),
            lb_ifaces: vec![format!("{p}c"), format!("{p}b"), format!("{p}g")],
        };
        let pairs = [
            (&t.client, &[CLIENT][..], LB_CLIENT_SIDE, CLIENT6, "2001:db8:c::1", &t.lb_ifaces[0]),
            (&t.blue, &BLUES[..], Ipv4Addr::new(198, 51, 100, 1), BLUE6, "2001:db8:1::1", &t.lb_ifaces[1]),
            (&t.green, &GREENS[..], Ipv4Addr::new(198, 51, 100, 17), GREEN6, "2001:db8:2::1", &t.lb_ifaces[2]),
        ];
        for (ns, addrs, gw, addr6, gw6, lb_if) in pairs {
            let inner = "eth0";
            sh(&[
                "ip", "link", "add", inner, "netns", &ns.name, "type", "veth", "peer", "name", lb_if, "netns",
                &t.lb.name,
            ]);
            for addr in addrs {
                ns.ip(&["addr", "add", &format!("{addr}/28"), "dev", inner]);
            }
            ns.ip(&["addr", "add", &format!("{addr6}/64"), "dev", inner, "nodad"]);
            ns.ip(&["link", "set", inner, "up"]);
            ns.ip(&["route", "add", "default", "via", &gw.to_string()]);
            ns.ip(&["-6", "route", "add", "default", "via", gw6]);
            // XDP_REDIRECT into a veth needs NAPI on the receiving end (GRO), and XDP rewrites
            // break the partial checksums of veth TX offload: see shared/toolchain.md.
            if prepare_veth {
                ns.exec(&["ethtool", "-K", inner, "gro", "on", "tx", "off"]);
            }
            t.lb.ip(&["addr", "add", &format!("{gw}/28"), "dev", lb_if]);
            t.lb.ip(&["addr", "add", &format!("{gw6}/64"), "dev", lb_if, "nodad"]);
            t.lb.ip(&["link", "set", lb_if, "up"]);
        }
        t.lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        t.lb.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        t
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

/// TCP and UDP servers in a namespace that answer every line / datagram with their name.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serves on every address of `ns` this crate gives a backend (`BLUES`, `BLUE6`, …): TCP
    /// `BACKEND_TCP` and UDP `BACKEND_UDP`, answering "NAME ADDRESS" (the local address the
    /// request reached), so a test can tell colours and backends apart.
    ///
    /// # Panics
    /// When the ports cannot be bound.
    #[must_use]
    pub fn start(ns: &Netns, name: &'static str) -> Server {
        let addrs: Vec<IpAddr> = match name {
            "green" => GREENS.iter().map(|a| IpAddr::V4(*a)).chain([IpAddr::V6(GREEN6)]).collect(),
            _ => BLUES.iter().map(|a| IpAddr::V4(*a)).chain([IpAddr::V6(BLUE6)]).collect(),
        };
        Server::on(ns, name, &addrs)
    }

    /// Serves on the given addresses of `ns`.
    ///
    /// # Panics
    /// When the ports cannot be bound.
    #[must_use]
    pub fn on(ns: &Netns, name: &'static str, addrs: &[IpAddr]) -> Server {
        Server::on_ports(ns, name, addrs, BACKEND_TCP, BACKEND_UDP)
    }

    /// Serves on the given addresses of `ns`, on TCP port `tcp` and UDP port `udp`.
    ///
    /// # Panics
    /// When the ports cannot be bound.
    #[must_use]
    pub fn on_ports(ns: &Netns, name: &'static str, addrs: &[IpAddr], tcp: u16, udp: u16) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let addrs = addrs.to_vec();
        let sockets = ns.run(move || {
            addrs
                .iter()
                .map(|a| {
                    let tcp = TcpListener::bind((*a, tcp)).unwrap_or_else(|e| panic!("bind tcp {a}:{tcp}: {e}"));
                    let udp = UdpSocket::bind((*a, udp)).unwrap_or_else(|e| panic!("bind udp {a}:{udp}: {e}"));
                    (*a, tcp, udp)
                })
                .collect::<Vec<_>>()
        });
        let mut threads = Vec::new();
        for (addr, tcp, udp) in sockets {
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            let answer: &'static str = Box::leak(format!("{name} {addr}").into_boxed_str());
            let s = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((conn, _)) => {
                            std::thread::spawn(move || serve_tcp(conn, answer));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            let s = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(answer.as_bytes(), from);
                    }
                }
            }));
        }
        Server { stop, threads }
    }
}

/// The colour in a server's answer ("blue 198.51.100.2" → "blue").
#[must_use]
pub fn colour_of(answer: &str) -> &str {
    answer.split_whitespace().next().unwrap_or("")
}

fn serve_tcp(conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    // HTTP: one response, then close.
    if matches!(r.read_line(&mut line), Ok(n) if n > 0) && line.starts_with("GET ") {
        let mut header = String::new();
        while matches!(r.read_line(&mut header), Ok(n) if n > 2) {
            header.clear();
        }
        let body = format!("{name}\n");
        let _ = w.write_all(
            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
        );
        return;
    }
    // Otherwise one answer per line, until the client closes; bounded by the read timeout.
    while !line.is_empty() {
        if w.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
        line.clear();
        if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            return;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection from the client namespace that sends lines and reads one-line answers.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    /// Connects from `ns` to `to`.
    ///
    /// # Errors
    /// Connect failure or timeout.
    pub fn open(ns: &Netns, to: impl Into<SocketAddr>) -> std::io::Result<Conn> {
        let to = to.into();
        let stream = ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Conn { stream: BufReader::new(stream) })
    }

    /// Connects from `ns` to the IPv4 `to` from source port `port` (`SO_REUSEADDR`, so a port
    /// whose last connection is in TIME_WAIT can be used again, as a busy client's are).
    ///
    /// # Errors
    /// Socket, bind or connect failure, or the connect taking over 5 s.
    pub fn open_from(ns: &Netns, port: u16, to: SocketAddrV4) -> std::io::Result<Conn> {
        use std::os::fd::FromRawFd as _;
        let stream = ns.run(move || -> std::io::Result<TcpStream> {
            // SAFETY: plain socket(2); the descriptor is owned by the TcpStream below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a descriptor just opened and owned by nobody else.
            let stream = unsafe { TcpStream::from_raw_fd(fd) };
            let sockaddr = |a: Ipv4Addr, p: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: p.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
                sin_zero: [0; 8],
            };
            let one: libc::c_int = 1;
            let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
            let (local, remote) = (sockaddr(Ipv4Addr::UNSPECIFIED, port), sockaddr(*to.ip(), to.port()));
            let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: options and addresses are ours and sized as passed.
            let rc = unsafe {
                if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&raw const one).cast(), 4) != 0
                    || libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_SNDTIMEO,
                        (&raw const timeout).cast(),
                        size_of::<libc::timeval>() as u32,
                    ) != 0
                    || libc::bind(fd, (&raw const local).cast(), len) != 0
                {
                    -1
                } else {
                    libc::connect(fd, (&raw const remote).cast(), len)
                }
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(stream)
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Conn { stream: BufReader::new(stream) })
    }

    /// The address the client's kernel believes it talks to.
    ///
    /// # Errors
    /// getpeername failed.
    pub fn peer(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().peer_addr()
    }

    /// The client's own address and port.
    ///
    /// # Errors
    /// getsockname failed.
    pub fn local(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().local_addr()
    }

    /// Sends one line and returns the answer line, trimmed.
    ///
    /// # Errors
    /// I/O error, timeout or a closed connection.
    pub fn ask(&mut self) -> std::io::Result<String> {
        self.stream.get_mut().write_all(b"which colour?\n")?;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(line.trim().to_owned())
    }
}

/// One request on a fresh TCP connection: the answer and the peer address.
///
/// # Errors
/// Any failure of connect, send or receive.
pub fn tcp_request(ns: &Netns, to: impl Into<SocketAddr>) -> std::io::Result<(String, SocketAddr)> {
    let mut c = Conn::open(ns, to)?;
    let answer = c.ask()?;
    Ok((answer, c.peer()?))
}

/// One HTTP/1.0 `GET /` on a fresh connection: the body (trimmed) and the peer address.
///
/// # Errors
/// Any failure of connect, send or receive, or an answer that is not `200 OK`.
pub fn http_request(ns: &Netns, to: impl Into<SocketAddr>) -> std::io::Result<(String, SocketAddr)> {
    let to = to.into();
    let mut stream = ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = stream.peer_addr()?;
    stream.write_all(format!("GET / HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer.as_str(), ""));
    if !(head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200")) {
        return Err(std::io::Error::other(format!("bad answer: {head:?}")));
    }
    Ok((body.trim().to_owned(), peer))
}

/// One UDP datagram from a fresh socket: the answer and the address it came from.
///
/// # Errors
/// Any failure of send or receive (timeout 2 s).
pub fn udp_request(ns: &Netns, to: impl Into<SocketAddr>) -> std::io::Result<(String, SocketAddr)> {
    udp_request_from(ns, 0, to)
}

/// Like [`udp_request`], from source port `port` (0: any).
///
/// # Errors
/// As [`udp_request`].
pub fn udp_request_from(ns: &Netns, port: u16, to: impl Into<SocketAddr>) -> std::io::Result<(String, SocketAddr)> {
    let to = to.into();
    let any: IpAddr = if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let sock = ns.run(move || UdpSocket::bind((any, port)))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(b"which colour?", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = sock.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// Records the IPv4 source address of every frame received in a namespace (AF_PACKET), to
/// prove what a client did or did not see.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    /// # Panics
    /// When the packet socket cannot be opened.
    #[must_use]
    pub fn start(ns: &Netns) -> Sniffer {
        let fd = ns.run(|| {
            let proto = i32::from((libc::ETH_P_IP as u16).to_be());
            // SAFETY: plain socket(2) call.
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) }
        });
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let (s, out) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            // SAFETY: setting a timeval option on our own fd.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
            }
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buffers are ours and sized as passed.
                let n = unsafe {
                    libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut from).cast(), &mut len)
                };
                // Only frames coming in, not our own outgoing ones.
                // SOCK_RAW frames start with the 14-byte Ethernet header.
                if n >= 34 && from.sll_pkttype != libc::PACKET_OUTGOING {
                    let src = Ipv4Addr::new(buf[26], buf[27], buf[28], buf[29]);
                    if let Ok(mut set) = out.lock() {
                        set.insert(src);
                    }
                }
            }
            // SAFETY: closing the fd this thread owns.
            unsafe { libc::close(fd) };
        });
        Sniffer { stop, seen, thread: Some(thread) }
    }

    /// Stops and returns every source address seen.
    #[must_use]
    pub fn stop(mut self) -> BTreeSet<Ipv4Addr> {
        self.halt();
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Pins the calling thread to the CPU it is on, and returns it: every later
/// `BPF_PROG_TEST_RUN` of the thread, and the per-CPU map slots and LRU free list it touches,
/// are then that CPU's (benchmarks, per-CPU budgets).
///
/// # Panics
/// When the affinity cannot be set.
pub fn pin_thread() -> usize {
    // SAFETY: plain libc calls on a cpu_set_t we own.
    unsafe {
        let cpu = usize::try_from(libc::sched_getcpu()).expect("sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
        cpu
    }
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
