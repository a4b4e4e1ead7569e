//! The configuration's unit tests: every key, every check across fields, and the bounded
//! reading of the file.

use super::*;

const GOOD: &str = r#"
interfaces = ["lb-c", "lb-b"]
socket = "/tmp/s.sock"

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
active = "blue"
blue = "198.51.100.2:8080"
green = "198.51.100.18:8080"

[[service]]
name = "dns"
vip = "203.0.113.10"
port = 53
protocol = "udp"
active = "green"
green = "198.51.100.18:5353"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

/// `Config::load` in a thread, so that a load that blocks fails the test instead of
/// hanging the suite.
fn load_within(path: &Path, secs: u64) -> Result<Config, ConfigError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(Config::load(&p));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("Config::load({}) blocked for {secs} s", path.display()))
}

#[test]
fn only_a_config_no_other_user_can_change_is_trusted() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    let dir = std::env::temp_dir().join(format!("switcher-trust-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    mode(&dir, 0o755);
    let file = dir.join("switcher.toml");
    std::fs::write(&file, GOOD).expect("write");
    mode(&file, 0o644);
    assert_eq!(Config::load_trusted(&file).expect("0644 in a 0755 directory").services.len(), 2);
    mode(&file, 0o666);
    let e = Config::load_trusted(&file).expect_err("a world-writable file").to_string();
    assert!(e.contains("can be written by other users (mode 666)") && e.contains("chmod go-w"), "{e}");
    mode(&file, 0o644);
    // A directory anyone may write, where the file could be replaced; sticky (as /tmp) is fine.
    mode(&dir, 0o777);
    let e = Config::load_trusted(&file).expect_err("a world-writable directory").to_string();
    assert!(e.contains(&format!("the directory {} can be written", dir.display())), "{e}");
    mode(&dir, 0o1777);
    Config::load_trusted(&file).expect("a sticky directory");
    mode(&dir, 0o755);
    // A symlink to the good file is followed: its target is what is checked.
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    Config::load_trusted(&link).expect("a symlink to a trusted file");
    mode(&file, 0o664);
    // SAFETY: getegid has no preconditions.
    let group_is_root = unsafe { libc::getegid() } == 0;
    assert_eq!(Config::load_trusted(&link).is_ok(), group_is_root, "group-writable counts unless the group is root's");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_a_regular_file_of_bounded_size_is_read() {
    let dir = std::env::temp_dir().join(format!("switcher-config-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    // A FIFO with no writer: opening it for reading would block for ever.
    let fifo = dir.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let e = load_within(&fifo, 10).expect_err("a FIFO is refused").to_string();
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    // An endless device.
    let e = load_within(Path::new("/dev/zero"), 10).expect_err("/dev/zero is refused").to_string();
    assert!(e.contains("is a character device"), "{e}");
    let e = load_within(&dir, 10).expect_err("a directory is refused").to_string();
    assert!(e.contains("is a directory"), "{e}");
    // A huge file (sparse: no disk used) is refused before it is read.
    let big = dir.join("big.toml");
    std::fs::File::create(&big).and_then(|f| f.set_len(1 << 30)).expect("sparse file");
    let e = load_within(&big, 10).expect_err("1 GiB is refused").to_string();
    assert!(e.contains(&format!("larger than {MAX_CONFIG_BYTES} bytes")), "{e}");
    // A good file is still read.
    let good = dir.join("good.toml");
    std::fs::write(&good, GOOD).expect("write");
    assert_eq!(load_within(&good, 10).expect("a regular file loads").services.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

fn err(text: &str) -> String {
    parse(text).expect_err("config should be rejected").to_string()
}

#[test]
fn a_good_config_parses() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.interfaces, ["lb-c", "lb-b"]);
    assert_eq!(c.socket, Path::new("/tmp/s.sock"));
    assert_eq!(c.xdp_mode, XdpMode::Native);
    assert_eq!(c.services.len(), 2);
    let web = c.service("web").expect("web");
    assert_eq!(web.active, Colour::Blue);
    assert_eq!(web.green, [BackendConfig { addr: "198.51.100.18:8080".parse().expect("addr"), weight: 1 }]);
    assert_eq!(web.mode, Mode::Nat);
    let dns = c.service("dns").expect("dns");
    assert_eq!(dns.protocol, Protocol::Udp);
    assert!(dns.blue.is_empty());
}

#[test]
fn defaults_apply() {
    let c = parse("interfaces = [\"eth0\"]\n").expect("valid");
    assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
    assert_eq!(c.udp_idle_timeout, Duration::from_secs(30));
    assert_eq!(c.forwarding, Forwarding::Auto);
    assert!(c.services.is_empty());
    let c = parse("interfaces = [\"eth0\"]\nudp_idle_timeout_secs = 5\n").expect("valid");
    assert_eq!(c.udp_idle_timeout, Duration::from_secs(5));
    let e = err("interfaces = [\"eth0\"]\nudp_idle_timeout_secs = 0\n");
    assert_eq!(e, "test.toml:2: udp_idle_timeout_secs: 0 is out of range: use 1 to 86400 seconds");
    assert_eq!(parse("interfaces = [\"eth0\"]\n").expect("valid").tcp_idle_timeout, Duration::from_secs(300));
    let c = parse("interfaces = [\"eth0\"]\ntcp_idle_timeout_secs = 5\n").expect("valid");
    assert_eq!(c.tcp_idle_timeout, Duration::from_secs(5));
    let e = err("interfaces = [\"eth0\"]\ntcp_idle_timeout_secs = 604801\n");
    assert_eq!(e, "test.toml:2: tcp_idle_timeout_secs: 604801 is out of range: use 1 to 604800 seconds");
}

#[test]
fn syntax_errors_name_file_and_line() {
    let e = err("interfaces = [\"eth0\"]\n[[service]]\nname = \"web\nport = 80\n");
    assert!(e.starts_with("test.toml: line 3"), "{e}");
}

#[test]
fn bad_values_name_line_and_field() {
    let e = err(&GOOD.replace("vip = \"203.0.113.10\"\nport = 80", "vip = \"203.0.113.300\"\nport = 80"));
    assert!(e.contains("line 7") && e.contains("invalid IP address"), "{e}");
    let e = err(&GOOD.replace("blue = \"198.51.100.2:8080\"", "blue = \"198.51.100.2\""));
    assert!(e.contains("line 11") && e.contains("expected \"ADDRESS:PORT\""), "{e}");
    let e = err(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
    assert!(e.contains("line 9") && e.contains("unknown variant `sctp`"), "{e}");
    let e = err(&GOOD.replace("active = \"blue\"", "active = \"red\""));
    assert!(e.contains("line 10") && e.contains("unknown variant `red`"), "{e}");
    let e = err(&GOOD.replace("port = 80", "port = 70000"));
    assert!(e.contains("line 8"), "{e}");
    let e = err(&GOOD.replace("socket =", "forwarding = \"fast\"\nsocket ="));
    assert!(e.contains("line 3") && e.contains("unknown variant `fast`"), "{e}");
    let e = err(&GOOD.replace("port = 80", "prot = 80"));
    assert!(e.contains("unknown field `prot`"), "{e}");
}

#[test]
fn cross_field_errors_name_line_and_field() {
    let e = err(&GOOD.replace("name = \"dns\"", "name = \"web\""));
    assert_eq!(e, "test.toml:15: name: service \"web\" is defined twice");
    let e = err(&GOOD.replace("port = 53", "port = 80").replace("\"udp\"", "\"tcp\""));
    assert!(e.contains("is already used by service \"web\""), "{e}");
    let e = err(&GOOD.replace("active = \"green\"", "active = \"blue\""));
    assert_eq!(
        e,
        "test.toml:19: active: service \"dns\" is active on blue but has no blue backend; add blue = \"ADDRESS:PORT\""
    );
    let e = err(&GOOD.replace("port = 80", "port = 0"));
    assert_eq!(e, "test.toml:8: port: port 0 is not a service port");
    let e = err(&GOOD.replace("\"lb-b\"", "\"lb-c\""));
    assert!(e.contains("\"lb-c\" is listed twice"), "{e}");
    let e = err("interfaces = []\n");
    assert!(e.contains("interfaces: list at least one"), "{e}");
    let e = err(&GOOD.replace("name = \"web\"", "name = \"we b\""));
    assert!(e.contains("test.toml:6: name"), "{e}");
}

#[test]
fn a_backend_may_not_be_a_service_address() {
    let e = err(&GOOD.replace("198.51.100.18:5353", "203.0.113.10:80").replace("\"udp\"", "\"tcp\""));
    assert!(e.contains("is itself the address of service \"web\""), "{e}");
}

#[test]
fn long_lists_of_names_are_cut_short() {
    assert_eq!(short_list::<&str>(&[]), "none");
    assert_eq!(short_list(&["a", "b"]), "a, b");
    let many: Vec<String> = (0..4_096).map(|i| format!("s{i}")).collect();
    assert_eq!(short_list(&many), "s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, … and 4086 more");
}

#[test]
fn pools_weights_ipv6_preview_and_dsr() {
    let c = parse(
        r#"interfaces = ["eth0"]
[[service]]
name = "api"
vip = "2001:db8::10"
port = 443
preview_port = 8443
protocol = "tcp"
mode = "dsr"
active = "green"
blue = ["[2001:db8:1::2]:443", "[2001:db8:1::3]:443"]
green = [{ address = "[2001:db8:2::2]:443", weight = 3 }, { address = "[2001:db8:2::3]:443" }]
drain_timeout_secs = 30
on_drain_timeout = "reset"
"#,
    )
    .expect("valid");
    let api = &c.services[0];
    assert_eq!((api.mode, api.preview_port, api.active), (Mode::Dsr, Some(8443), Colour::Green));
    assert_eq!(api.blue.len(), 2);
    assert_eq!(api.green.iter().map(|b| b.weight).collect::<Vec<_>>(), [3, 1]);
    assert_eq!(api.drain_timeout, Some(Duration::from_secs(30)));
    assert_eq!(api.on_drain_timeout, DrainAction::Reset);
}

#[test]
fn rollout_plans_hooks_and_backup() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.service("web").expect("web").rollout, RolloutConfig::default(), "the default plan");
    let text = GOOD.replace(
            "green = \"198.51.100.18:8080\"\n",
            "green = \"198.51.100.18:8080\"\n[service.rollout]\nsteps = [\"5%\", \"pause 10s\", \"100%\"]\nwatch_secs = 30\nmin_flows = 5\nkeep_previous_secs = 600\nhooks = { before_first_step = \"app readonly\", on_abort = \"app readwrite\", timeout_secs = 5 }\n",
        );
    let c = parse(&text).expect("valid");
    let r = &c.service("web").expect("web").rollout;
    assert_eq!(
        r.steps,
        vec![
            crate::steps::Step::Share(500),
            crate::steps::Step::Pause(Duration::from_secs(10)),
            crate::steps::Step::Share(10_000)
        ]
    );
    assert_eq!((r.watch, r.min_flows, r.min_reply_ratio_pct), (Some(Duration::from_secs(30)), 5, 50));
    assert_eq!(r.keep_previous, Some(Duration::from_secs(600)));
    assert_eq!(r.hooks.command(HookPoint::BeforeFirstStep), Some("app readonly"));
    assert_eq!(r.hooks.command(HookPoint::BeforeFinal), None);
    assert_eq!(r.hooks.timeout, Duration::from_secs(5));
    assert_eq!(c.service("dns").expect("dns").rollout, RolloutConfig::default(), "the next [[service]] has its own");
    let e = err(&text.replace("\"100%\"", "\"50%\""));
    assert!(e.contains("rollout: the last share is 50%"), "{e}");
    let e = err(&text.replace("\"pause 10s\"", "\"wait 10s\""));
    assert!(e.contains("step 2 \"wait 10s\""), "{e}");
    let e = err(&text.replace("timeout_secs = 5", "timeout_secs = 0"));
    assert!(e.contains("hooks.timeout_secs"), "{e}");
    let e = err(&text.replace("min_flows = 5", "min_flow = 5"));
    assert!(e.contains("min_flow"), "{e}");
}

#[test]
fn health_and_agent_settings() {
    let c = parse("interfaces = [\"eth0\"]\n").expect("valid");
    assert_eq!(c.metrics, Some("127.0.0.1:9477".parse().expect("addr")));
    assert_eq!(c.pin_path, Path::new("/sys/fs/bpf/switcher"));
    let c = parse(&GOOD.replace("socket =", "metrics = \"off\"\nsocket =")).expect("valid");
    assert_eq!(c.metrics, None);
    let web = c.service("web").expect("web");
    assert_eq!((web.health.check, web.health.rise, web.health.fall), (CheckKind::Tcp, 2, 3));
    assert_eq!(c.service("dns").expect("dns").health.check, CheckKind::None, "UDP services are not checked by default");
    let text = GOOD.replace(
            "green = \"198.51.100.18:8080\"",
            "green = \"198.51.100.18:8080\"\nwatch_secs = 30\nfailover = true\nhealth = { check = \"http\", path = \"/healthz\", expect_status = 204, interval_ms = 500, timeout_ms = 200, rise = 1, fall = 2 }",
        );
    let c = parse(&text).expect("valid");
    let web = c.service("web").expect("web");
    assert_eq!(web.watch, Some(Duration::from_secs(30)));
    assert!(web.failover);
    assert_eq!(
        (web.health.check, web.health.path.as_str(), web.health.expect_status),
        (CheckKind::Http, "/healthz", 204)
    );
    assert_eq!((web.health.interval, web.health.timeout), (Duration::from_millis(500), Duration::from_millis(200)));
    let e = err(&text.replace("rise = 1", "rise = 0"));
    assert!(e.contains("test.toml:15: health: rise and fall"), "{e}");
    let e = err(&text.replace("\"/healthz\"", "\"healthz\""));
    assert!(e.contains("health.path"), "{e}");
    let e = err(&GOOD.replace("socket =", "metrics = \"nowhere\"\nsocket ="));
    assert!(e.contains("test.toml:3: metrics"), "{e}");
    let e = err(&GOOD.replace("socket =", "socket_group = \"no-such-group-xyz\"\nsocket ="));
    assert!(e.contains("no group \"no-such-group-xyz\""), "{e}");
}

#[test]
fn backend_checks() {
    let base =
        GOOD.replace("green = \"198.51.100.18:8080\"", "green = [\"198.51.100.18:8080\", \"198.51.100.18:8080\"]");
    assert!(err(&base).contains("198.51.100.18:8080 is listed twice"));
    let v6 = GOOD.replace("green = \"198.51.100.18:8080\"", "green = \"[2001:db8::2]:8080\"");
    assert!(err(&v6).contains("not of the VIP's address family"));
    let dsr = GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nmode = \"dsr\"");
    assert!(err(&dsr).contains("must listen on the service port 80"));
    let preview = GOOD.replace("port = 80", "port = 80\npreview_port = 53").replace("\"udp\"", "\"tcp\"");
    assert!(err(&preview).contains("203.0.113.10:53/tcp is already used by service \"web\""));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let c = Config::parse(Path::new("dist/switcher.toml"), include_str!("../../../dist/switcher.toml")).expect("valid");
    assert_eq!(c.services[0].health.check, CheckKind::Http);
    assert!(c.services[0].failover);
}

#[test]
fn line_numbers_are_one_based() {
    assert_eq!(line_of("a\nb\nc", 0), 1);
    assert_eq!(line_of("a\nb\nc", 2), 2);
    assert_eq!(line_of("a\nb\nc", 4), 3);
    assert_eq!(line_of("a", 99), 1);
}
#[test]
fn the_fleet_section_is_checked() {
    let with = |fleet: &str| Config::parse(Path::new("f.toml"), &format!("{GOOD}\n{fleet}"));
    let fleet_line = format!("f.toml:{}:", GOOD.matches('\n').count() + 2);
    assert_eq!(with("").expect("no fleet").fleet, None);
    let f = with("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nnode = \"lb1\"\n")
        .expect("valid")
        .fleet
        .expect("fleet");
    assert_eq!(
        (f.prefix.as_str(), f.node.as_str(), f.share_backends, f.lease_ttl, f.compaction_interval),
        ("/switcher", "lb1", false, Duration::from_secs(10), Some(Duration::from_secs(300)))
    );
    let off = with("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nnode = \"lb1\"\ncompaction_interval_secs = 0\n");
    assert_eq!(off.expect("valid").fleet.expect("fleet").compaction_interval, None);
    assert!(
        !with("[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\n")
            .expect("host name")
            .fleet
            .expect("fleet")
            .node
            .is_empty()
    );
    for (bad, field) in [
        ("[fleet]\nendpoints = []", "fleet.endpoints"),
        ("[fleet]\nendpoints = [\"https://etcd:2379\"]", "fleet.endpoints"),
        ("[fleet]\nendpoints = [\"http://etcd:2379\"]\nprefix = \"switcher/\"", "fleet.prefix"),
        ("[fleet]\nendpoints = [\"http://etcd:2379\"]\nnode = \"lb 1\"", "fleet.node"),
        ("[fleet]\nendpoints = [\"http://etcd:2379\"]\nlease_ttl_secs = 1", "fleet.lease_ttl_secs"),
        ("[fleet]\nendpoints = [\"http://etcd:2379\"]\ncompaction_interval_secs = 1", "fleet.compaction_interval_secs"),
    ] {
        let e = with(bad).expect_err(bad).to_string();
        assert!(e.contains(field) && e.starts_with(&fleet_line), "{bad}: {e}");
    }
    let e = with("[fleet]\nendpoints = [\"http://etcd:2379\"]\nnodes = \"x\"").expect_err("unknown key").to_string();
    assert!(e.contains("nodes"), "{e}");
}

#[test]
fn shadow_is_for_udp_nat_services() {
    let dns = GOOD.replace(
        "green = \"198.51.100.18:5353\"",
        "green = \"198.51.100.18:5353\"\nshadow = \"12.5%\"\nshadow_ceiling = 500",
    );
    let c = parse(&dns).expect("a UDP service may be shadowed");
    assert_eq!((c.services[1].shadow.share_bp, c.services[1].shadow.ceiling), (1_250, 500));
    assert_eq!(c.services[0].shadow, crate::shadow::ShadowSetting::default(), "off unless asked");
    let web = GOOD.replace("green = \"198.51.100.18:8080\"", "green = \"198.51.100.18:8080\"\nshadow = \"10%\"");
    let e = err(&web);
    assert!(e.contains("shadow: shadow traffic is for UDP services only") && e.contains("sequence numbers"), "{e}");
    assert!(
        parse(&GOOD.replace("green = \"198.51.100.18:8080\"", "green = \"198.51.100.18:8080\"\nshadow = \"off\""))
            .is_ok()
    );
    let e = err(&dns.replace("12.5%", "150%"));
    assert!(e.contains("is not a share"), "{e}");
    let e = err(&dns.replace("shadow_ceiling = 500", "shadow_ceiling = 0"));
    assert!(e.contains("shadow_ceiling"), "{e}");
}
