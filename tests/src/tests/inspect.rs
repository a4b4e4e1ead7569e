//! T2: `switcher flows` on real TCP connections through the VIP, opened on both colours across
//! a cut-over: it lists exactly them with their colour and backend, its summary counts them,
//! its filters and limit hold, it still answers from the pinned table with the daemon
//! stopped, and `status` and the log warn when the flow table fills.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use switcher_user::{
    pins::Pins,
    protocol::{FlowListing, FlowSource, FlowState, FlowStop},
};

use crate::{
    flows::fill,
    net::{
        BACKEND_TCP, BACKEND_UDP, BLUE, BLUES, CLIENT, Conn, GREEN, Server, Topology, VIP, VIP_TCP, VIP_UDP, wait_for,
    },
    proc::{Daemon, config_header, pin_path},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, VIP_TCP);
/// A second address of the client's namespace, for the green connections (`--client`).
const CLIENT2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// The flow table's size here (`max_flows`, a power of two): small enough to fill.
const MAX_FLOWS: u32 = 4096;

/// `switcher flows ARGS --json`, parsed.
#[track_caller]
fn flows(d: &Daemon, args: &[&str]) -> FlowListing {
    let mut all = vec!["flows"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = d.cli_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("flows --json is not a listing ({e}): {out}"))
}

/// The listing as client → (colour, backend).
fn by_client(l: &FlowListing) -> BTreeMap<String, (String, String)> {
    l.flows.iter().map(|f| (f.client.clone(), (f.colour.as_str().to_owned(), f.backend.clone()))).collect()
}

#[test]
fn flows_lists_exactly_the_open_connections_with_their_colour_and_backend() {
    const NAME: &str = "flows_lists_exactly_the_open_connections_with_their_colour_and_backend";
    if !crate::have_root(NAME) {
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let services = format!(
        r#"
[[service]]
name = "web"
vip = "{VIP}"
port = {VIP_TCP}
protocol = "tcp"
active = "blue"
blue = ["{b0}:{BACKEND_TCP}", "{b1}:{BACKEND_TCP}"]
green = "{GREEN}:{BACKEND_TCP}"

[[service]]
name = "dns"
vip = "{VIP}"
port = {VIP_UDP}
protocol = "udp"
active = "blue"
blue = "{BLUE}:{BACKEND_UDP}"
green = "{GREEN}:{BACKEND_UDP}"
"#,
        b0 = BLUES[0],
        b1 = BLUES[1],
    );
    let mut d = Daemon::start(&t.lb, |s| {
        format!(
            "max_flows = {MAX_FLOWS}\nudp_idle_timeout_secs = 600\n{}{services}",
            config_header(&t.lb_ifaces, "redirect", s)
        )
    });

    // Six connections on blue from CLIENT; a cut-over; four on green from CLIENT2.
    // expected: client → (colour, backend), from what each backend answered.
    let mut expected = BTreeMap::new();
    let open = |conns: &mut Vec<Conn>, expected: &mut BTreeMap<String, (String, String)>, n| {
        for _ in 0..n {
            let mut c = Conn::open(&t.client, WEB).expect("connect to the VIP");
            let answer = c.ask().expect("ask through the VIP");
            let (colour, addr) = answer.split_once(' ').unwrap_or_else(|| panic!("answer {answer:?}"));
            expected.insert(
                c.local().expect("local address").to_string(),
                (colour.to_owned(), format!("{addr}:{BACKEND_TCP}")),
            );
            conns.push(c);
        }
    };
    let mut conns = Vec::new();
    open(&mut conns, &mut expected, 6);
    let out = d.cli_ok(&["cutover", "web", "green"]);
    assert!(out.contains("blue → green"), "{out}");
    t.client.ip(&["addr", "add", &format!("{CLIENT2}/28"), "dev", "eth0"]);
    t.client.ip(&["route", "replace", "default", "via", "192.0.2.1", "src", &CLIENT2.to_string()]);
    open(&mut conns, &mut expected, 4);
    let colours: Vec<&str> = expected.values().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        (colours.iter().filter(|c| **c == "blue").count(), colours.iter().filter(|c| **c == "green").count()),
        (6, 4),
        "connections before the cut-over on blue, after it on green: {expected:?}"
    );
    assert!(
        expected.keys().filter(|k| k.starts_with(&format!("{CLIENT2}:"))).count() == 4,
        "the green connections come from {CLIENT2}: {expected:?}"
    );

    // Exactly these flows, with their colour and backend, through the VIP.
    let all = flows(&d, &["web"]);
    assert_eq!(by_client(&all), expected, "{all:#?}");
    assert!(all.flows.iter().all(|f| f.vip == WEB.to_string() && f.state == FlowState::Open && f.service == "web"));
    assert_eq!(
        (all.matched, all.stopped, all.source, all.capacity),
        (10, None, FlowSource::Daemon, Some(MAX_FLOWS.into()))
    );
    let text = d.cli_ok(&["flows", "web"]);
    assert!(text.starts_with("CLIENT") && text.contains("10 flows ("), "{text}");

    // The summary counts them per colour and backend.
    let summary = flows(&d, &["web", "--summary"]);
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (colour, backend) in expected.values() {
        *want.entry((colour.clone(), backend.clone())).or_default() += 1;
    }
    let got: BTreeMap<(String, String), u64> = summary
        .summary
        .iter()
        .map(|g| ((g.colour.as_str().to_owned(), g.backend.clone()), g.open + g.closing))
        .collect();
    assert_eq!(got, want, "{summary:#?}");
    assert_eq!(summary.matched, 10);
    let text = d.cli_ok(&["flows", "web", "--summary"]);
    assert!(text.contains("web  blue   open       6") && text.contains("web  green  open       4"), "{text}");

    // --limit bounds the answer, and says it stopped.
    let three = flows(&d, &["--limit", "3"]);
    assert_eq!((three.flows.len(), three.stopped), (3, Some(FlowStop::Limit)), "{three:#?}");
    let text = d.cli_ok(&["flows", "--limit", "3"]);
    assert!(text.contains("stopped at --limit 3"), "{text}");

    // Filters: colour, backend (with and without its port), client network.
    let of = |f: &dyn Fn(&(String, String)) -> bool| {
        expected.iter().filter(|(_, v)| f(v)).map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>()
    };
    assert_eq!(by_client(&flows(&d, &["web", "--colour", "blue"])), of(&|(c, _)| c == "blue"));
    assert_eq!(by_client(&flows(&d, &["--colour", "green"])), of(&|(c, _)| c == "green"));
    let b0 = format!("{}:{BACKEND_TCP}", BLUES[0]);
    let on_b0 = of(&|(_, b)| *b == b0);
    assert_eq!(by_client(&flows(&d, &["--backend", &b0])), on_b0);
    assert_eq!(by_client(&flows(&d, &["--backend", &BLUES[0].to_string()])), on_b0);
    assert_eq!(flows(&d, &["--backend", &format!("{}:9", BLUES[0])]).matched, 0, "another port of that backend");
    let from2 = flows(&d, &["--client", &format!("{CLIENT2}/32")]);
    assert_eq!(by_client(&from2), of(&|(c, _)| c == "green"), "the green connections came from {CLIENT2}");
    assert_eq!(by_client(&flows(&d, &["--client", &CLIENT.to_string()])), of(&|(c, _)| c == "blue"));
    assert_eq!(flows(&d, &["--client", "192.0.2.0/24"]).matched, 10);
    assert_eq!(flows(&d, &["--client", "198.51.100.0/24"]).matched, 0);
    let bad = d.cli(&["flows", "--client", "192.0.2.0/40"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("0 to 32"), "{bad:?}");
    let bad = d.cli(&["flows", "mail"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown service \"mail\""), "{bad:?}");

    // A connection closed by the client is closing, the others open.
    let gone = conns.remove(0);
    let gone_client = gone.local().expect("local").to_string();
    drop(gone);
    let closing = wait_for(Duration::from_secs(10), || {
        let l = flows(&d, &["web", "--state", "closing"]);
        (!l.flows.is_empty()).then_some(l)
    })
    .expect("the closed connection's flow is closing");
    assert_eq!(closing.flows.iter().map(|f| f.client.as_str()).collect::<Vec<_>>(), [gone_client.as_str()]);
    let still = flows(&d, &["web", "--state", "open"]);
    assert_eq!(still.matched, 9, "{still:#?}");
    assert!(!by_client(&still).contains_key(&gone_client));

    // status: the fill of the flow table, no warning at this level.
    let status = d.status_counted();
    let table = status.flow_table.expect("status reports the flow table");
    assert_eq!(table.capacity, Some(MAX_FLOWS.into()));
    assert!(table.fill_bp.is_some_and(|bp| bp < 100) && status.warnings.is_empty(), "{table:?} {:?}", status.warnings);
    let text = d.cli_ok(&["status"]);
    assert!(text.contains(&format!(" of {MAX_FLOWS} entries hold open flows")), "{text}");

    // No daemon: the pinned table answers the same question.
    d.stop();
    let pinned = flows(&d, &["web"]);
    assert_eq!(pinned.source, FlowSource::Pins);
    let mut want = expected.clone();
    want.remove(&gone_client);
    let open_now: BTreeMap<_, _> = pinned
        .flows
        .iter()
        .filter(|f| f.state == FlowState::Open)
        .map(|f| (f.client.clone(), (f.colour.as_str().to_owned(), f.backend.clone())))
        .collect();
    assert_eq!(open_now, want, "{pinned:#?}");
    let text = d.cli_ok(&["flows", "web", "--colour", "green", "--summary"]);
    assert!(text.contains("web  green  open       4") && text.contains("read from the pinned flow table"), "{text}");
    let one = flows(&d, &["--limit", "1"]);
    assert_eq!((one.flows.len(), one.stopped), (1, Some(FlowStop::Limit)));
    d.restart();

    // Pressure: thousands of UDP flows through the daemon's own program fill the table past
    // 85 %; status and the log say so.
    let link = Pins::new(pin_path(&d.socket)).link(&t.lb_ifaces[0]);
    let made = MAX_FLOWS * 93 / 100;
    let passed = t.lb.run(move || fill(&link, 0, made));
    assert_eq!(passed, made, "every query was forwarded or passed up");
    let status = d.status_counted();
    let table = status.flow_table.expect("the flow table");
    let warning = status.warnings.first().cloned().unwrap_or_else(|| panic!("no warning at {table:?}"));
    assert!(warning.contains("evicts") && warning.contains(&format!("max_flows = {MAX_FLOWS}")), "{warning}");
    assert!(table.fill_bp.is_some_and(|bp| bp >= 8500), "{table:?}");
    let text = d.cli_ok(&["status"]);
    assert!(text.contains("WARNING: the flow table is"), "{text}");
    let logged = wait_for(Duration::from_secs(20), || d.log().contains("the flow table is").then_some(()));
    assert!(logged.is_some(), "the daemon's log warns of the full table:\n{}", d.log());
    // Many flows: the limit still bounds the list; the summary counts every one.
    let five = flows(&d, &["--limit", "5"]);
    assert_eq!((five.flows.len(), five.stopped), (5, Some(FlowStop::Limit)));
    let dns = flows(&d, &["dns", "--summary"]);
    assert!(dns.matched >= u64::from(made) * 95 / 100 && dns.stopped.is_none(), "{} of {made}", dns.matched);
    drop(conns);
}
