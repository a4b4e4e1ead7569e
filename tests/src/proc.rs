//! The `switcher` binary: a daemon child process inside a namespace, and CLI calls.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::net::{self, BACKEND_TCP, BACKEND_UDP, BLUE, GREEN, Netns, VIP, VIP_TCP, VIP_UDP};

/// The `switcher` binary under test: `$SWITCHER_BIN`, else next to this test binary's
/// directory (`target/<profile>/switcher`, which `./x test` builds first).
///
/// # Panics
/// When it cannot be found.
#[must_use]
pub fn switcher_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidates = exe.ancestors().skip(1).take(3).map(|d| d.join("switcher"));
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "the switcher binary was not found near {}: build it first (`./x test` does), or set SWITCHER_BIN",
        exe.display()
    );
}

/// A copy of the `switcher` binary that another user can run, in `dir` (which this makes
/// 0755): the build tree may sit where other users cannot reach it — a clone in root's 0700
/// home, or in a `mktemp -d` directory.
///
/// # Panics
/// When the copy cannot be made.
#[must_use]
pub fn switcher_bin_for_others(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 755 the test directory");
    let copy = dir.join("switcher-for-others");
    std::fs::copy(switcher_bin(), &copy).expect("copy the switcher binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod 755 the copy");
    copy
}

/// `cmd.output()`, run again while the kernel answers ETXTBSY (at most 5 s). A binary this
/// process has just written can be "busy": a thread that forked at the same moment holds the
/// writer's descriptor in its child until that child execs, even with close-on-exec.
///
/// # Errors
/// Any other spawn error, or ETXTBSY for longer than 5 s.
pub fn output_of_fresh_binary(cmd: &mut Command) -> std::io::Result<Output> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A config for the test topology: `web` (TCP 80) and `dns` (UDP 53), both active on blue,
/// with `forwarding` (`"auto"`, `"redirect"` or `"kernel"`).
#[must_use]
pub fn demo_config(ifaces: &[String], forwarding: &str, socket: &Path) -> String {
    config_with(ifaces, forwarding, socket, "")
}

/// The top of a test config: interfaces, socket, forwarding and the pins next to the socket.
#[must_use]
pub fn config_header(ifaces: &[String], forwarding: &str, socket: &Path) -> String {
    let ifaces: Vec<String> = ifaces.iter().map(|i| format!("{i:?}")).collect();
    format!(
        "interfaces = [{ifaces}]\nsocket = \"{socket}\"\nforwarding = \"{forwarding}\"\npin_path = \"{pins}\"\n",
        ifaces = ifaces.join(", "),
        socket = socket.display(),
        pins = pin_path(socket).display(),
    )
}

/// [`demo_config`] plus more `[[service]]` tables.
#[must_use]
pub fn config_with(ifaces: &[String], forwarding: &str, socket: &Path, extra: &str) -> String {
    format!(
        r#"{header}
[[service]]
name = "web"
vip = "{VIP}"
port = {VIP_TCP}
protocol = "tcp"
active = "blue"
blue = "{BLUE}:{BACKEND_TCP}"
green = "{GREEN}:{BACKEND_TCP}"

[[service]]
name = "dns"
vip = "{VIP}"
port = {VIP_UDP}
protocol = "udp"
active = "blue"
blue = "{BLUE}:{BACKEND_UDP}"
green = "{GREEN}:{BACKEND_UDP}"
{extra}"#,
        header = config_header(ifaces, forwarding, socket),
    )
}

/// `n` `[[service]]` tables `s0, s1, …`: TCP on the test VIP, ports 10,000 and up, each with a
/// backend port of its own on blue and green, 20,000 and up (in NAT mode one backend
/// address:port answers for at most 4 VIP:ports); `extra` goes into each table.
#[must_use]
pub fn generated_services(n: u16, extra: &str) -> String {
    let mut out = String::new();
    for i in 0..n {
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "\n[[service]]\nname = \"s{i}\"\nvip = \"{VIP}\"\nport = {}\nprotocol = \"tcp\"\nactive = \"blue\"\nblue = \"{BLUE}:{}\"\ngreen = \"{GREEN}:{}\"\n{extra}",
                10_000 + i,
                20_000 + i,
                20_000 + i
            ),
        );
    }
    out
}

/// The pin root of the daemon whose socket is `socket`: `bpf/` next to it, where
/// [`Daemon::start`] mounts a bpffs of the test's own.
#[must_use]
pub fn pin_path(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/tmp")).join("bpf")
}

/// A `switcher daemon` running in a namespace; on drop: SIGTERM (then SIGKILL), `switcher
/// uninstall` of its pins, unmount of its bpffs.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    ns: String,
    log: PathBuf,
}

impl Daemon {
    /// Writes `config` into a fresh directory and starts the daemon in `ns`, waiting up to 20 s
    /// for its socket.
    ///
    /// # Panics
    /// When the daemon exits or its socket does not appear.
    #[must_use]
    pub fn start(ns: &Netns, config: impl FnOnce(&Path) -> String) -> Daemon {
        let dir = std::env::temp_dir().join(format!("switcher-test-{}", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("switcher.sock");
        let cfg = dir.join("switcher.toml");
        std::fs::write(&cfg, config(&socket)).expect("write config");
        // A bpffs of the test's own, in the root mount namespace, so the pins outlive the
        // daemon (`ip netns exec` gives it a private /sys).
        let pins = pin_path(&socket);
        std::fs::create_dir_all(&pins).expect("pin dir");
        net::sh(&["mount", "-t", "bpf", "bpf", &pins.to_string_lossy()]);
        let log = dir.join("daemon.log");
        let child = spawn_daemon(&ns.name, &cfg, &log);
        let mut d = Daemon { child, socket, dir, config: cfg, ns: ns.name.clone(), log };
        d.wait_ready();
        d
    }

    /// Starts the daemon again (after [`Daemon::kill`] or [`Daemon::stop`]) on the same
    /// config and pins.
    ///
    /// # Panics
    /// When it does not come up.
    pub fn restart(&mut self) {
        // A killed daemon leaves its socket file: readiness is the new daemon's own.
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn_daemon(&self.ns, &self.config, &self.log);
        self.wait_ready();
    }

    /// The daemon's PID.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_ready(&mut self) {
        let d = self;
        let ready = net::wait_for(Duration::from_secs(20), || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("switcher daemon exited ({status}) during start-up:\n{}", d.log());
            }
            d.socket.exists().then_some(())
        });
        assert!(ready.is_some(), "switcher daemon did not open its socket in 20 s:\n{}", d.log());
    }

    /// The daemon's stderr so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `switcher --socket <ours> --config <ours> ARGS…` (in the root namespace: the
    /// socket and the pins are files).
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(switcher_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run switcher CLI")
    }

    /// Like [`Daemon::cli`], asserting success; returns stdout.
    ///
    /// # Panics
    /// When the command fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "switcher {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `switcher status --json`, parsed.
    ///
    /// # Panics
    /// When the command fails or prints something else.
    #[must_use]
    pub fn status(&self) -> switcher_user::protocol::Response {
        let out = self.cli_ok(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not a Response ({e}): {out}"))
    }

    /// `switcher status --json` once its open-flow counts come from a pass over the flow
    /// table begun after this call (the daemon counts flows in passes, off the request path).
    ///
    /// # Panics
    /// When no such pass ends within 20 s, or status fails.
    #[must_use]
    pub fn status_counted(&self) -> switcher_user::protocol::Response {
        let asked = std::time::Instant::now();
        net::wait_for(Duration::from_secs(20), || {
            let s = self.status();
            let (ago, took) = (s.flows_counted_ms_ago?, s.flows_count_took_ms?);
            let since = u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX);
            // The pass began `ago + took` ms ago (to the millisecond: one more for rounding).
            (ago + took + 1 < since).then_some(s)
        })
        .unwrap_or_else(|| panic!("no count of the open flows began after the request within 20 s:\n{}", self.log()))
    }

    /// Packets the data path counted for a reason (`fwd_redirect`, `no_match`, …).
    ///
    /// # Panics
    /// When the reason is unknown.
    #[must_use]
    pub fn reason(&self, name: &str) -> u64 {
        let status = self.status();
        status.reasons.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no reason {name}")).1
    }

    /// Stops the daemon with SIGTERM and waits (up to 10 s) for it to exit.
    ///
    /// # Panics
    /// When it does not exit in time (it is then killed).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        let status = net::wait_for(Duration::from_secs(10), || self.child.try_wait().ok().flatten());
        status.unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("switcher daemon ignored SIGTERM for 10 s:\n{}", self.log());
        })
    }
}

fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(pid, sig) };
    }
}

fn spawn_daemon(ns: &str, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(switcher_bin())
        .arg("--config")
        .arg(config)
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .spawn()
        .expect("spawn switcher daemon")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(&self.child, libc::SIGTERM);
            if net::wait_for(Duration::from_secs(5), || self.child.try_wait().ok().flatten()).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // The data path outlives the daemon by design: take it away, then our bpffs.
        let _ = self.cli(&["uninstall"]);
        let pins = pin_path(&self.socket);
        let _ = Command::new("umount").arg(&pins).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
