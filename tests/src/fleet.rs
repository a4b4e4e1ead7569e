//! A fleet of load-balancer nodes for the fleet tests: etcd on the root namespace's loopback,
//! a relay that makes it reachable at 127.0.0.1:2379 inside each lb namespace (standing in for
//! a management network), and an ECMP topology with DSR backends on a shared LAN.
//!
//! ```text
//!                 ┌─ 192.0.2.1  [lb0] 198.51.100.240 ─┐
//!  client ─ ECMP ─┼─ 192.0.2.5  [lb1] 198.51.100.241 ─┼─ LAN bridge ─ blue-1 .2, blue-2 .3
//!  192.0.2.100    └─ 192.0.2.9  [lb2] 198.51.100.242 ─┘              green-1 .18, green-2 .19
//!  VIP 203.0.113.10 via lb0, lb1, lb2 (L4 hash); backends hold the VIP on lo (DSR) and
//!  answer through lb0.
//! ```

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::net::{Netns, Server, sh, unique_prefix, wait_for};

/// Where each lb namespace reaches etcd (through its [`Relay`]).
pub const ETCD_IN_NS: &str = "127.0.0.1:2379";
/// The client's own address (on its loopback, so that it is the same over every path).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// The service port; DSR backends listen on it.
pub const PORT: u16 = 8080;
/// The backends: (name, address).
pub const BACKENDS: [(&str, Ipv4Addr); 4] = [
    ("blue-1", Ipv4Addr::new(198, 51, 100, 2)),
    ("blue-2", Ipv4Addr::new(198, 51, 100, 3)),
    ("green-1", Ipv4Addr::new(198, 51, 100, 18)),
    ("green-2", Ipv4Addr::new(198, 51, 100, 19)),
];

/// The lb nodes' LAN address.
#[must_use]
pub fn lb_lan(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 240 + u8::try_from(i).unwrap_or(0))
}

/// The lb node's address on its link to the client.
#[must_use]
pub fn lb_front(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1 + 4 * u8::try_from(i).unwrap_or(0))
}

/// An etcd server of the test's own on 127.0.0.1, killed (by PID) and its data removed on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
}

impl Etcd {
    /// Starts etcd and waits (up to 20 s) until it accepts connections.
    ///
    /// # Panics
    /// When etcd is not installed or does not come up.
    #[must_use]
    pub fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!("switcher-etcd-{}", unique_prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let mut e = Etcd { child: None, dir, client_port: free_port(), peer_port: free_port() };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log")).expect("log");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}"), "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start etcd ({e}): `./x test` installs Debian's etcd-server"));
        self.child = Some(child);
        let port = self.client_port;
        let up = wait_for(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).ok());
        assert!(up.is_some(), "etcd did not listen on {port} in 20 s:\n{}", self.log());
    }

    /// SIGKILL, as a crash or a partition would look to the nodes.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// A call to etcd's JSON gateway (`/v3/...`), its answer parsed (an error is a JSON
    /// object with an `error` field, as etcd sends it).
    ///
    /// # Errors
    /// When etcd does not answer, or not with JSON.
    pub fn call(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.client_port)).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let body = body.to_string();
        // HTTP/1.0: the answer ends when etcd closes, no chunks to undo.
        let req = format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| format!("send: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).map_err(|e| format!("read: {e}"))?;
        let json = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(json).map_err(|e| format!("{e}: {answer}"))
    }

    /// etcd's revision and the size of its database file (bytes), as
    /// `/v3/maintenance/status` reports them.
    ///
    /// # Panics
    /// When etcd does not answer.
    #[must_use]
    pub fn status(&self) -> (i64, u64) {
        let s =
            self.call("/v3/maintenance/status", &serde_json::json!({})).unwrap_or_else(|e| panic!("etcd status: {e}"));
        // int64s are strings in etcd's JSON.
        let num = |v: &serde_json::Value| v.as_str().and_then(|t| t.parse().ok()).or_else(|| v.as_i64());
        let revision = num(&s["header"]["revision"]).unwrap_or_else(|| panic!("no revision: {s}"));
        let size = num(&s["dbSize"]).and_then(|n| u64::try_from(n).ok()).unwrap_or_else(|| panic!("no dbSize: {s}"));
        (revision, size)
    }

    /// The keys under `prefix` with their mod revision and version, read at `revision` (0: now),
    /// and the revision they were read at; or etcd's error (e.g. "required revision has been
    /// compacted").
    ///
    /// # Errors
    /// etcd's refusal, or no answer.
    pub fn keys(&self, prefix: &str, revision: i64) -> Result<(i64, Vec<EtcdKey>), String> {
        use base64_lite::encode;
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = serde_json::json!({
            "key": encode(prefix.as_bytes()),
            "range_end": encode(&end),
            "revision": revision.to_string(),
            "keys_only": true,
        });
        let r = self.call("/v3/kv/range", &body)?;
        if let Some(e) = r.get("error") {
            return Err(e.as_str().unwrap_or_default().to_owned());
        }
        let num = |v: &serde_json::Value| v.as_str().and_then(|t| t.parse().ok()).unwrap_or(0);
        let kvs = r["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let key = base64_lite::decode(kv["key"].as_str().unwrap_or_default());
                        (String::from_utf8_lossy(&key).into_owned(), num(&kv["mod_revision"]), num(&kv["version"]))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((num(&r["header"]["revision"]), kvs))
    }
}

impl Etcd {
    /// The value of `key` now, if it exists (and etcd answers).
    #[must_use]
    pub fn value(&self, key: &str) -> Option<String> {
        let r = self.call("/v3/kv/range", &serde_json::json!({ "key": base64_lite::encode(key.as_bytes()) })).ok()?;
        let v = r["kvs"].as_array()?.first()?["value"].as_str()?;
        Some(String::from_utf8_lossy(&base64_lite::decode(v)).into_owned())
    }
}

/// `bytes` in base64, as etcd's JSON gateway takes keys and values.
#[must_use]
pub fn base64(bytes: &[u8]) -> String {
    base64_lite::encode(bytes)
}

/// The standard base64 alphabet, for etcd's JSON gateway (bytes fields).
mod base64_lite {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut n, mut bits) = (0u32, 0);
        for c in text.bytes().take_while(|&c| c != b'=') {
            let Some(v) = ABC.iter().position(|&a| a == c) else { continue };
            n = n << 6 | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((n >> bits) as u8);
                n &= (1 << bits) - 1;
            }
        }
        out
    }

    #[test]
    fn round_trip() {
        for text in ["", "a", "ab", "abc", "/switcher-test/nodes/", "/switcher-test/nodes0"] {
            assert_eq!(decode(&encode(text.as_bytes())), text.as_bytes(), "{text}");
        }
        assert_eq!(encode(b"/sw"), "L3N3");
        assert_eq!(encode(b"ab"), "YWI=");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A key as etcd lists it: (key, mod revision, version).
pub type EtcdKey = (String, i64, i64);

/// Accepts on 127.0.0.1:2379 inside a namespace and forwards each connection to etcd on the
/// root namespace's loopback.
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// # Panics
    /// When the port cannot be bound in the namespace.
    #[must_use]
    pub fn start(ns: &Netns, etcd_port: u16) -> Relay {
        let listener = ns.run(|| TcpListener::bind(ETCD_IN_NS).expect("bind the etcd relay"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        // This thread lives in the root namespace: its connects reach the real etcd.
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inner, _)) => {
                        let Ok(outer) = TcpStream::connect(("127.0.0.1", etcd_port)) else {
                            let _ = inner.shutdown(Shutdown::Both);
                            continue;
                        };
                        let _ = inner.set_nonblocking(false);
                        // gRPC's small frames must not wait for Nagle and delayed ACKs here.
                        let _ = inner.set_nodelay(true);
                        let _ = outer.set_nodelay(true);
                        pipe(&inner, &outer);
                        pipe(&outer, &inner);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay { stop, thread: Some(thread) }
    }
}

/// Copies `from` → `to` on a thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// client, a LAN, `n` lb nodes and four DSR backends (see the module docs).
pub struct FleetTopology {
    pub client: Netns,
    pub lan: Netns,
    pub lbs: Vec<Netns>,
    /// Each lb's interfaces (front, LAN), to attach the program to.
    pub lb_ifaces: Vec<[String; 2]>,
    /// Each lb's interface on the client's side (in the client namespace).
    pub client_ifaces: Vec<String>,
    pub backends: Vec<Netns>,
    _servers: Vec<Server>,
}

impl FleetTopology {
    /// # Panics
    /// When any `ip`/`ethtool`/`sysctl` command fails.
    #[must_use]
    pub fn new(n: usize) -> FleetTopology {
        let p = unique_prefix();
        let client = Netns::new(format!("{p}-client"));
        let lan = Netns::new(format!("{p}-lan"));
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT}/32"), "dev", "lo"]);
        for knob in ["net.ipv4.fib_multipath_hash_policy=1", "net.ipv4.conf.all.rp_filter=0"] {
            client.exec(&["sysctl", "-qw", knob]);
        }
        let mut lbs = Vec::new();
        let mut lb_ifaces = Vec::new();
        let mut client_ifaces = Vec::new();
        for i in 0..n {
            let lb = Netns::new(format!("{p}-lb{i}"));
            let (front, back, cif, lanif) = (format!("{p}f{i}"), format!("{p}l{i}"), format!("c{i}"), format!("p{i}"));
            sh(&[
                "ip",
                "link",
                "add",
                &cif,
                "netns",
                &client.name,
                "type",
                "veth",
                "peer",
                "name",
                &front,
                "netns",
                &lb.name,
            ]);
            sh(&[
                "ip", "link", "add", &lanif, "netns", &lan.name, "type", "veth", "peer", "name", &back, "netns",
                &lb.name,
            ]);
            let (f, c) = (lb_front(i), Ipv4Addr::from(u32::from(lb_front(i)) + 1));
            client.ip(&["addr", "add", &format!("{c}/30"), "dev", &cif]);
            client.ip(&["link", "set", &cif, "up"]);
            lb.ip(&["addr", "add", &format!("{f}/30"), "dev", &front]);
            lb.ip(&["addr", "add", &format!("{}/24", lb_lan(i)), "dev", &back]);
            lb.ip(&["link", "set", &front, "up"]);
            lb.ip(&["link", "set", &back, "up"]);
            lb.ip(&["route", "add", &format!("{CLIENT}/32"), "via", &c.to_string()]);
            lan.ip(&["link", "set", &lanif, "master", "br0"]);
            lan.ip(&["link", "set", &lanif, "up"]);
            // Frames redirected by XDP into a veth need NAPI (GRO) on the receiving end; the
            // client's side sends full checksums (see shared/toolchain.md).
            lan.exec(&["ethtool", "-K", &lanif, "gro", "on"]);
            client.exec(&["ethtool", "-K", &cif, "gro", "on", "tx", "off"]);
            for knob in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            {
                lb.exec(&["sysctl", "-qw", knob]);
            }
            lbs.push(lb);
            lb_ifaces.push([front, back]);
            client_ifaces.push(cif);
        }
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for (j, (name, addr)) in BACKENDS.iter().enumerate() {
            let ns = Netns::new(format!("{p}-{name}"));
            let lanif = format!("b{j}");
            sh(&[
                "ip", "link", "add", &lanif, "netns", &lan.name, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.name,
            ]);
            lan.ip(&["link", "set", &lanif, "master", "br0"]);
            lan.ip(&["link", "set", &lanif, "up"]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["addr", "add", &format!("{}/32", crate::net::VIP), "dev", "lo"]);
            ns.ip(&["route", "add", "default", "via", &lb_lan(0).to_string()]);
            for knob in ["net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"] {
                ns.exec(&["sysctl", "-qw", knob]);
            }
            ns.exec(&["ethtool", "-K", "eth0", "gro", "on", "tx", "off"]);
            servers.push(Server::on(&ns, name, &[IpAddr::V4(crate::net::VIP), IpAddr::V4(*addr)]));
            backends.push(ns);
        }
        let t = FleetTopology { client, lan, lbs, lb_ifaces, client_ifaces, backends, _servers: servers };
        t.route_via(&(0..n).collect::<Vec<_>>());
        t
    }

    /// Routes the client's traffic to the VIP over these lb nodes (ECMP over several).
    ///
    /// # Panics
    /// When `ip route replace` fails.
    pub fn route_via(&self, lbs: &[usize]) {
        let vip = format!("{}/32", crate::net::VIP);
        let src = CLIENT.to_string();
        let mut args: Vec<String> = ["route", "replace", &vip, "src", &src].iter().map(|s| (*s).to_owned()).collect();
        for &i in lbs {
            if lbs.len() > 1 {
                args.push("nexthop".into());
            }
            args.extend(["via".into(), lb_front(i).to_string(), "dev".into(), self.client_ifaces[i].clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.client.ip(&args);
        self.client.ip(&["route", "flush", "cache"]);
    }

    /// A daemon config for lb node `i`: the DSR service `web` and a `[fleet]` section.
    #[must_use]
    pub fn config(&self, i: usize, prefix: &str, socket: &std::path::Path) -> String {
        let [front, back] = &self.lb_ifaces[i];
        let pool = |c: &str| {
            BACKENDS
                .iter()
                .filter(|(n, _)| n.starts_with(c))
                .map(|(_, a)| format!("\"{a}:{PORT}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            r#"interfaces = ["{front}", "{back}"]
socket = "{socket}"
forwarding = "redirect"
pin_path = "{pins}"
metrics = "off"
tcp_idle_timeout_secs = 5

[fleet]
endpoints = ["http://{ETCD_IN_NS}"]
prefix = "{prefix}"
node = "lb{i}"
lease_ttl_secs = 4
share_backends = true
compaction_interval_secs = 5

[[service]]
name = "web"
vip = "{vip}"
port = {PORT}
protocol = "tcp"
mode = "dsr"
active = "blue"
blue = [{blue}]
green = [{green}]
health = {{ interval_ms = 200, timeout_ms = 200, rise = 1, fall = 2 }}
"#,
            socket = socket.display(),
            pins = crate::proc::pin_path(socket).display(),
            vip = crate::net::VIP,
            blue = pool("blue"),
            green = pool("green"),
        )
    }
}
