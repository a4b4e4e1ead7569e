//! Real scale: a daemon with the largest flow table (`max_flows = 16,777,216`) and a million
//! open flows, made by running the daemon's own attached program on a million distinct UDP
//! frames (`BPF_PROG_TEST_RUN` in the load balancer's namespace). It cuts over, reports status
//! and metrics, lists and sums them (`switcher flows`) while status still answers, ends a drain
//! over all of them, and its memory stays small: the flows are counted and listed in batches,
//! never held all at once. Times are printed, not asserted (the
//! bench has the figures). And thousands of services on one node: 4,096 of them serve, and the
//! last one cuts over.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use switcher_user::{
    pins::Pins,
    protocol::{FlowListing, FlowStop, Response},
};

use crate::{
    flows::{fill, map_size, rss_kib, scrape},
    net::{BACKEND_UDP, BLUE, GREEN, Server, Topology, VIP, colour_of, tcp_request, wait_for},
    proc::{Daemon, config_with, generated_services, pin_path},
};

/// Open flows the test makes.
const FLOWS: u32 = 1_000_000;
/// The largest flow table the config accepts.
const MAX_FLOWS: u32 = 16_777_216;
/// What the daemon may hold in memory with that many flows open.
const RSS_LIMIT_KIB: u64 = 100 * 1024;

fn dns(r: &Response) -> &switcher_user::protocol::ServiceStatus {
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
    assert_eq!(entries, u64::from(switcher_common::flow_sets(MAX_FLOWS)), "the flow table has the configured size");
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
    let _ = timed("scrape with no flows open", &mut || scrape(&t.lb));

    let link = pins.link(&t.lb_ifaces[0]);
    let started = Instant::now();
    let passed = t.lb.run(move || fill(&link, 0, FLOWS));
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
    let metrics = timed("scrape with a million flows open", &mut || scrape(&t.lb));
    assert!(metrics.contains(&format!("switcher_open_flows{{service=\"dns\",colour=\"blue\"}} {blue}\n")), "{metrics}");
    assert!(metrics.contains("switcher_open_flows_age_seconds "), "{metrics}");

    // `switcher flows` over a million flows: the summary walks the table off the engine (a
    // status asked meanwhile answers), bounded by its deadline; a list stops at its limit.
    let summary = std::thread::scope(|s| {
        let walk = s.spawn(|| {
            timed("flows dns --summary with a million flows open", &mut || {
                d.cli_ok(&["flows", "dns", "--summary", "--json"])
            })
        });
        let during = timed("status during that walk", &mut || d.cli_ok(&["status", "dns"]));
        assert!(during.contains("dns"), "{during}");
        walk.join().expect("the walk")
    });
    let summary: FlowListing = serde_json::from_str(&summary).expect("flows --json");
    eprintln!(
        "flows --summary: {} flows counted of {} entries read in {} ms ({:?})",
        summary.matched, summary.walked, summary.took_ms, summary.stopped
    );
    match summary.stopped {
        None => assert!(summary.matched >= blue * 99 / 100, "the summary counts every flow: {summary:?}"),
        Some(FlowStop::Deadline) => assert!(summary.matched > 0, "a partial summary still counts: {summary:?}"),
        Some(FlowStop::Limit) => panic!("a summary without --limit stopped at a limit: {summary:?}"),
    }
    let ten: FlowListing = serde_json::from_str(&timed("flows --limit 10 with a million flows open", &mut || {
        d.cli_ok(&["flows", "--limit", "10", "--json"])
    }))
    .expect("flows --json");
    assert_eq!((ten.flows.len(), ten.stopped), (10, Some(FlowStop::Limit)));

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

/// Services the many-services test configures (`web` and `dns` among them).
const SERVICES: u16 = 4_096;

#[test]
fn four_thousand_services_serve_and_the_last_cuts_over() {
    if !crate::have_root("four_thousand_services_serve_and_the_last_cuts_over") {
        return;
    }
    let t = Topology::new();
    let generated = SERVICES - 2;
    let last = generated - 1;
    let (first_port, last_port) = (20_000, 20_000 + last);
    let _blue = [first_port, last_port]
        .map(|p| Server::on_ports(&t.blue, "blue", &[IpAddr::V4(BLUE)], p, BACKEND_UDP + 1 + p - first_port));
    let _green = Server::on_ports(&t.green, "green", &[IpAddr::V4(GREEN)], last_port, BACKEND_UDP + 1);
    let started = Instant::now();
    let d = Daemon::start(&t.lb, |s| config_with(&t.lb_ifaces, "redirect", s, &generated_services(generated, "")));
    eprintln!("daemon with {SERVICES} services ready in {} ms", started.elapsed().as_millis());

    let status = d.status();
    assert_eq!(status.services.len(), usize::from(SERVICES), "status lists every service");
    let ask = |port: u16| -> String {
        wait_for(Duration::from_secs(10), || tcp_request(&t.client, (VIP, port)).ok().map(|(a, _)| a))
            .unwrap_or_else(|| panic!("VIP port {port} answers"))
    };
    assert_eq!(colour_of(&ask(10_000)), "blue", "the first generated service serves");
    assert_eq!(colour_of(&ask(10_000 + last)), "blue", "the last service serves");
    // Green's one backend must pass its health checks first (the daemon checks 8,192).
    let name = format!("s{last}");
    let out = wait_for(Duration::from_secs(30), || {
        let o = d.cli(&["cutover", &name, "green"]);
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    })
    .unwrap_or_else(|| panic!("{name} cuts over once green is healthy: {}", d.log()));
    assert!(out.contains("blue → green"), "{out}");
    assert_eq!(colour_of(&ask(10_000 + last)), "green", "the last service cut over");
    assert_eq!(colour_of(&ask(10_000)), "blue", "the first did not move");
    let metrics = scrape(&t.lb);
    assert!(metrics.contains(&format!("service=\"s{last}\"")), "metrics cover the last service");

    // The ring is sized to the pools: one element (251 slots) per colour of a one-backend pool.
    let pins = Pins::new(pin_path(&d.socket));
    let (elements, ring_bytes) = map_size(&pins.map(switcher_common::MAP_RING));
    let (_, backends_bytes) = map_size(&pins.map(switcher_common::MAP_BACKENDS));
    eprintln!(
        "RING: {elements} elements, {} KiB ({} B per service); BACKENDS {} KiB; daemon RSS {} MiB",
        ring_bytes >> 10,
        ring_bytes / u64::from(SERVICES),
        backends_bytes >> 10,
        rss_kib(d.pid()) >> 10
    );
    assert!(elements >= u64::from(SERVICES) * 2, "room for every table: {elements}");
    assert!(ring_bytes < 134_000_000, "no more ring memory than Katran's 512 VIPs: {ring_bytes} B");
}
