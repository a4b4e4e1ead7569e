//! Fleet mode end to end: three lb nodes, each with its own daemon and XDP program, one etcd,
//! a client with an ECMP route to the VIP over all three, and DSR backends.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use switcher_user::protocol::Response;

use crate::{
    fleet::{Etcd, FleetTopology, PORT, Relay},
    net::{Conn, VIP, tcp_request, wait_for},
    proc::Daemon,
};

const NODES: usize = 3;
/// A green backend address added to the shared pool with weight 0 (nothing listens there).
const SPARE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 20);

/// "blue-2 203.0.113.10" → "blue-2".
fn backend_of(answer: &str) -> String {
    answer.split_whitespace().next().unwrap_or("").to_owned()
}

fn colour(backend: &str) -> &str {
    backend.split('-').next().unwrap_or("")
}

/// `switcher fleet status --json` on a node, parsed (also when it reports an error).
fn fleet(d: &Daemon) -> Response {
    let out = d.cli(&["fleet", "status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fleet status --json ({e}): {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// The desired revision of `web`, and whether every node applied it and runs `colour`.
fn converged(d: &Daemon, colour: &str) -> Option<i64> {
    let r = fleet(d);
    let view = r.fleet?;
    let web = view.services.iter().find(|s| s.name == "web")?;
    let all = view.nodes.len() == NODES
        && view.nodes.iter().all(|n| {
            n.services.iter().any(|s| {
                s.name == "web"
                    && s.active.as_str() == colour
                    && s.applied_revision >= web.revision
                    && s.local_override.is_none()
            })
        });
    all.then_some(web.revision)
}

/// `n` requests on fresh connections through the VIP: the backends that answered.
fn requests(t: &FleetTopology, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let (answer, peer) = tcp_request(&t.client, SocketAddrV4::new(VIP, PORT))
            .unwrap_or_else(|e| panic!("request {i} through the VIP: {e}"));
        assert_eq!(peer, SocketAddrV4::new(VIP, PORT).into(), "the client only ever sees the VIP");
        *seen.entry(backend_of(&answer)).or_insert(0) += 1;
    }
    seen
}

fn active_on(d: &Daemon) -> String {
    d.status().services.first().map(|s| s.active.to_string()).unwrap_or_default()
}

#[test]
fn fleet_cutover_ecmp_conflicts_and_etcd_outage() {
    if !crate::have_root("fleet_cutover_ecmp_conflicts_and_etcd_outage") {
        return;
    }
    let mut etcd = Etcd::start();
    let t = FleetTopology::new(NODES);
    let _relays: Vec<Relay> = t.lbs.iter().map(|ns| Relay::start(ns, etcd.client_port)).collect();
    let prefix = format!("/switcher-test-{}", t.client.name);
    let mut nodes: Vec<Daemon> = (0..NODES).map(|i| Daemon::start(&t.lbs[i], |s| t.config(i, &prefix, s))).collect();
    let logs = || nodes.iter().map(Daemon::log).collect::<Vec<_>>().join("\n----\n");

    // 1. The first node seeds the desired state; every node publishes itself and applies it.
    let seeded = wait_for(Duration::from_secs(20), || converged(&nodes[0], "blue"));
    assert!(seeded.is_some(), "the fleet did not come up on blue: {:?}\n{}", fleet(&nodes[0]), logs());

    // 2. ECMP spreads new flows over the nodes; every one of them reaches blue.
    let seen = requests(&t, 40);
    assert!(seen.keys().all(|b| colour(b) == "blue"), "before the cut-over only blue answers: {seen:?}");
    let per_node: Vec<u64> =
        nodes.iter().map(|d| d.status().services[0].colours.iter().map(|c| c.counters.flows).sum()).collect();
    assert!(per_node.iter().filter(|&&f| f > 0).count() >= 2, "ECMP used several nodes: {per_node:?}");

    // 3. A flow that the router moves to another node (a flow-table miss there) keeps its
    //    backend: every node builds the same Maglev table from the same pool.
    // At least 8, and until both backends have some (the hash puts 8 on one in 1 of 128 runs;
    // 32 leave that to about 1 in 2 billion).
    let mut conns: Vec<(Conn, String)> = Vec::new();
    for i in 0..32 {
        let mut c = Conn::open(&t.client, SocketAddrV4::new(VIP, PORT)).unwrap_or_else(|e| panic!("conn {i}: {e}"));
        let b = backend_of(&c.ask().unwrap_or_else(|e| panic!("conn {i}: {e}")));
        conns.push((c, b));
        if conns.len() >= 8 && conns.iter().any(|(_, b)| *b != conns[0].1) {
            break;
        }
    }
    let distinct: BTreeSet<&String> = conns.iter().map(|(_, b)| b).collect();
    assert!(distinct.len() > 1, "the connections spread over both blue backends: {distinct:?}");
    let misses_before: Vec<u64> = nodes.iter().map(|d| d.status().services[0].colours[0].counters.flows).collect();
    for only in 0..NODES {
        t.route_via(&[only]);
        for (i, (c, b)) in conns.iter_mut().enumerate() {
            let now = c.ask().unwrap_or_else(|e| panic!("conn {i} moved to lb{only}: {e}\n{}", logs()));
            assert_eq!(&backend_of(&now), b, "conn {i} moved to lb{only} kept its backend");
        }
    }
    let misses_after: Vec<u64> = nodes.iter().map(|d| d.status().services[0].colours[0].counters.flows).collect();
    assert!(
        misses_after.iter().zip(&misses_before).all(|(a, b)| a > b),
        "every node picked up moved flows it had never seen: {misses_before:?} → {misses_after:?}"
    );
    drop(conns);
    t.route_via(&(0..NODES).collect::<Vec<_>>());

    // 4. One command on one node cuts the whole fleet over; --wait follows every node.
    let started = Instant::now();
    let out = nodes[1].cli(&["cutover", "web", "green", "--drain-timeout", "2", "--wait"]);
    let took = started.elapsed();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fleet cut-over failed: {stdout}{stderr}\n{}", logs());
    assert!(stdout.contains("written to the fleet at revision"), "{stdout}");
    assert!(stderr.contains(&format!("{NODES} nodes applied revision")), "--wait saw every node: {stderr}");
    eprint!("$ switcher cutover web green --drain-timeout 2 --wait\n{stdout}{stderr}");
    // The CLI's own account: "  lb2  applied revision 17 after 3 ms", then the drains.
    let applied: Vec<u64> = stderr
        .lines()
        .filter(|l| l.contains("applied revision") && l.ends_with(" ms"))
        .filter_map(|l| l.trim_end_matches(" ms").rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(applied.len(), NODES, "--wait reported each node once: {stderr}");
    eprintln!(
        "fleet cut-over: applied on all {NODES} nodes ≤ {} ms after the write returned (per node: {applied:?} ms); drained (2 s timeout) and returned after {:.0} ms",
        applied.iter().max().copied().unwrap_or(0),
        took.as_secs_f64() * 1e3
    );
    for (i, d) in nodes.iter().enumerate() {
        assert_eq!(active_on(d), "green", "lb{i} is on green");
    }
    let seen = requests(&t, 30);
    assert!(seen.keys().all(|b| colour(b) == "green"), "after the cut-over only green answers: {seen:?}");
    converged(&nodes[0], "green").unwrap_or_else(|| panic!("converged on green: {:?}", fleet(&nodes[0])));

    // A canary share and a shared pool change, each made on one node, reach every node.
    nodes[2].cli_ok(&["weight", "web", "blue=10%"]);
    nodes[0].cli_ok(&["backend", "add", "web", "green", &format!("{SPARE}:{PORT}"), "--weight", "0"]);
    let everywhere = wait_for(Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|d| {
                let s = &d.status().services[0];
                s.canary.as_ref().is_some_and(|c| c.colour.as_str() == "blue" && c.basis_points == 1000)
                    && s.colours[1].backends.iter().any(|b| b.address == format!("{SPARE}:{PORT}") && b.weight == 0)
            })
            .then_some(())
    });
    assert!(everywhere.is_some(), "canary and pool on every node: {:?}", fleet(&nodes[0]));
    nodes[1].cli_ok(&["cutover", "web", "green"]);
    let revision = wait_for(Duration::from_secs(10), || {
        converged(&nodes[0], "green").filter(|_| nodes.iter().all(|d| d.status().services[0].canary.is_none()))
    })
    .unwrap_or_else(|| panic!("a cut-over ends the canary everywhere: {:?}", fleet(&nodes[0])));

    // 5. Two operators: the second one read revision `revision`, the first one changed it
    //    since; the second write is refused, not silently applied.
    nodes[2].cli_ok(&["rollback", "web"]);
    let out = nodes[0].cli(&["cutover", "web", "green", "--if-revision", &revision.to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stale write must be refused");
    assert!(stderr.contains("conflict") && stderr.contains("nothing was written"), "{stderr}");
    let blue = wait_for(Duration::from_secs(10), || converged(&nodes[0], "blue"));
    assert!(blue.is_some(), "the rollback, not the stale cut-over, is what the fleet runs: {:?}", fleet(&nodes[0]));

    // 6. etcd goes away: traffic flows on the last applied state, status says so, and a local
    //    emergency rollback still works on one node.
    etcd.kill();
    let down = wait_for(Duration::from_secs(20), || {
        nodes.iter().all(|d| d.status().fleet.is_some_and(|f| !f.connected)).then_some(())
    });
    assert!(down.is_some(), "every node noticed etcd is gone:\n{}", logs());
    let status = nodes[0].cli_ok(&["status"]);
    assert!(status.contains("UNREACHABLE"), "{status}");
    eprint!("$ switcher status (lb0, etcd down)\n{status}");
    let seen = requests(&t, 20);
    assert!(seen.keys().all(|b| colour(b) == "blue"), "with etcd down the fleet keeps blue: {seen:?}");
    let out = nodes[0].cli(&["cutover", "web", "green"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "a local change while etcd is down: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("etcd is unreachable") && stdout.contains("lb0 only"), "{stdout}");
    assert_eq!(active_on(&nodes[0]), "green");
    assert_eq!(active_on(&nodes[1]), "blue", "the other nodes were not changed");
    let out = nodes[0].cli(&["fleet", "status"]);
    assert!(!out.status.success(), "fleet status says etcd is unreachable");

    // 7. etcd returns: the nodes reconnect and catch up; lb0 keeps its local change until the
    //    fleet's desired state changes, and fleet status flags it.
    etcd.restart();
    let back = wait_for(Duration::from_secs(30), || {
        nodes.iter().all(|d| d.status().fleet.is_some_and(|f| f.connected)).then_some(())
    });
    assert!(back.is_some(), "every node reconnected:\n{}", logs());
    let text = wait_for(Duration::from_secs(10), || {
        let out = nodes[1].cli(&["fleet", "status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("DISAGREES").then_some(text)
    });
    assert!(
        text.is_some(),
        "lb0's local override is flagged: {}",
        String::from_utf8_lossy(&nodes[1].cli(&["fleet", "status"]).stdout)
    );
    eprintln!("{}", text.unwrap_or_default());
    assert_eq!(active_on(&nodes[0]), "green", "the override holds while the desired state is unchanged");
    let started = Instant::now();
    nodes[2].cli_ok(&["cutover", "web", "green"]);
    let all = wait_for(Duration::from_secs(10), || converged(&nodes[0], "green"));
    assert!(all.is_some(), "a new desired state ends the override on every node: {:?}", fleet(&nodes[0]));
    eprintln!("fleet converged after etcd's return in {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
    let seen = requests(&t, 20);
    assert!(seen.keys().all(|b| colour(b) == "green"), "{seen:?}");

    // 8. A node whose daemon dies misses a change: its pinned data path forwards on with what
    //    it had (new flows through it still reach green), and the restarted daemon catches up.
    nodes[2].kill();
    nodes[0].cli_ok(&["rollback", "web"]);
    assert_eq!(active_on(&nodes[1]), "blue");
    let seen = requests(&t, 30);
    assert_eq!(seen.values().sum::<usize>(), 30, "every request answered while lb2's daemon is down: {seen:?}");
    let started = Instant::now();
    nodes[2].restart();
    let caught_up = wait_for(Duration::from_secs(15), || converged(&nodes[0], "blue"));
    assert!(caught_up.is_some(), "the restarted lb2 caught up: {:?}\n{}", fleet(&nodes[0]), nodes[2].log());
    eprintln!("a restarted node caught up {:.0} ms after its daemon started", started.elapsed().as_secs_f64() * 1e3);
    let seen = requests(&t, 30);
    assert!(seen.keys().all(|b| colour(b) == "blue"), "after lb2 caught up only blue answers: {seen:?}");

    // 9. Connections opened on blue through lb0, a cut-over, then ECMP moves them to lb1,
    //    which never saw them: lb1 is draining blue, so it sends them back to blue (and
    //    records them) instead of resetting them on green. lb0's flows go idle and stop
    //    counting; lb0's drain waits for lb1's, and both end when the connections close.
    let logs = || nodes.iter().map(Daemon::log).collect::<Vec<_>>().join("\n----\n");
    t.route_via(&[0]);
    let mut conns: Vec<(Conn, String)> = (0..8)
        .map(|i| {
            let mut c = Conn::open(&t.client, SocketAddrV4::new(VIP, PORT)).unwrap_or_else(|e| panic!("conn {i}: {e}"));
            let b = backend_of(&c.ask().unwrap_or_else(|e| panic!("conn {i}: {e}")));
            assert_eq!(colour(&b), "blue", "conn {i} opened on blue");
            (c, b)
        })
        .collect();
    nodes[1].cli_ok(&["cutover", "web", "green"]);
    wait_for(Duration::from_secs(10), || converged(&nodes[0], "green"))
        .unwrap_or_else(|| panic!("the fleet cut over: {:?}", fleet(&nodes[0])));
    // Still in use through lb0 after the cut-over (lb0 counts them as open, not idle)…
    for (i, (c, b)) in conns.iter_mut().enumerate() {
        let now = c.ask().unwrap_or_else(|e| panic!("conn {i} after the cut-over: {e}"));
        assert_eq!(&backend_of(&now), b, "conn {i} stays on its blue backend");
    }
    // … then moved to lb1.
    let rescued_before = nodes[1].status().services[0].colours[0].counters.rescued;
    t.route_via(&[1]);
    for (i, (c, b)) in conns.iter_mut().enumerate() {
        let now = c.ask().unwrap_or_else(|e| panic!("conn {i} moved to lb1 after the cut-over: {e}\n{}", logs()));
        assert_eq!(&backend_of(&now), b, "conn {i} moved to lb1 finished on its blue backend");
    }
    let rescued = nodes[1].status().services[0].colours[0].counters.rescued - rescued_before;
    assert_eq!(rescued, 8, "lb1 sent the 8 connections it had never seen back to blue and counted them");
    let seen = requests(&t, 20);
    assert!(seen.keys().all(|b| colour(b) == "green"), "new connections through lb1 go to green: {seen:?}");
    // lb0's copies of the 8 flows see no more packets: idle after 5 s, they stop counting,
    // and lb0 reports that lb1 still holds blue flows. The connections keep talking through
    // lb1 meanwhile (every half second), so that lb1's copies never idle out first.
    let mut last_ask = Instant::now();
    let waiting = wait_for(Duration::from_secs(20), || {
        if last_ask.elapsed() >= Duration::from_millis(500) {
            for (i, (c, b)) in conns.iter_mut().enumerate() {
                let now = c.ask().unwrap_or_else(|e| panic!("conn {i} through lb1: {e}"));
                assert_eq!(&backend_of(&now), b, "conn {i} stays on its blue backend");
            }
            last_ask = Instant::now();
        }
        let st = nodes[0].status();
        let d = st.services[0].drain.clone()?;
        (d.live_flows == 0 && d.elsewhere.iter().any(|(n, f)| n == "lb1" && *f >= 8)).then_some(d)
    });
    let waiting = waiting.unwrap_or_else(|| panic!("lb0 waits on lb1's drain: {:?}\n{}", nodes[0].status(), logs()));
    eprintln!("lb0's drain while lb1 holds the moved connections: {waiting:?}");
    eprint!("$ switcher status (lb0)\n{}", nodes[0].cli_ok(&["status"]));
    drop(conns);
    let ended = wait_for(Duration::from_secs(20), || {
        nodes.iter().all(|d| d.status().services[0].drain.is_none()).then_some(())
    });
    assert!(ended.is_some(), "every node's drain ended once the connections closed:\n{}", logs());
    t.route_via(&(0..NODES).collect::<Vec<_>>());

    // 10. At rest the fleet does not write to etcd: a node publishes when its state changes
    //     (its lease, renewed without a write, says it is alive), and the only revisions are
    //     the compaction marks (one per compaction_interval_secs = 5 for the whole fleet),
    //     which keep etcd's history bounded. The fleet settles first (the last flows go idle
    //     and their counts are published): a window with no node's write must come.
    let nodes_prefix = format!("{prefix}/nodes/");
    let compacted = format!("{prefix}/compacted");
    // One read of the whole prefix: the revision, the nodes' keys and the compaction marks
    // (the version of `compacted`) as of one moment.
    let read = || {
        let (revision, keys) = etcd.keys(&format!("{prefix}/"), 0).unwrap_or_else(|e| panic!("read the fleet: {e}"));
        let marks = keys.iter().find(|(k, _, _)| *k == compacted).map_or(0, |(_, _, v)| *v);
        let nodes: Vec<_> = keys.into_iter().filter(|(k, _, _)| k.starts_with(&nodes_prefix)).collect();
        (revision, etcd.status().1, nodes, marks)
    };
    let window = Duration::from_secs(8);
    let mut rest = None;
    for _ in 0..6 {
        let (rev0, _, nodes0, marks0) = read();
        std::thread::sleep(window);
        let (rev1, db1, nodes1, marks1) = read();
        eprintln!(
            "etcd over {}s: revision {rev0} → {rev1}, compaction marks {marks0} → {marks1}, node writes: {}",
            window.as_secs(),
            nodes0.iter().zip(&nodes1).filter(|(a, b)| a != b).count()
        );
        // Each node: its header and one key per service (`web`).
        let headers = nodes1.iter().filter(|(k, _, _)| !k[nodes_prefix.len()..].contains('/')).count();
        assert_eq!((headers, nodes1.len()), (NODES, 2 * NODES), "every node's state is there: {nodes1:?}");
        if nodes0 == nodes1 {
            rest = Some((rev0, rev1, marks0, marks1, db1));
            break;
        }
    }
    let (rev0, rev1, marks0, marks1, db) =
        rest.unwrap_or_else(|| panic!("the nodes kept writing to etcd at rest:\n{}", logs()));
    assert_eq!(rev1 - rev0, marks1 - marks0, "at rest, the only revisions are compaction marks");
    assert!(marks1 > 0, "the fleet compacts etcd's history");
    // The history before the last compaction is gone: a read at revision 1 is refused.
    let old = etcd.keys(&nodes_prefix, 1);
    assert!(old.as_ref().is_err_and(|e| e.contains("compacted")), "revision 1 was compacted: {old:?}");
    // A node's state that goes from etcd (deleted by hand here) is published again at once,
    // not at its next change.
    let lb2 = format!("{nodes_prefix}lb2");
    let key = serde_json::json!({ "key": crate::fleet::base64(lb2.as_bytes()) });
    let deleted = etcd.call("/v3/kv/deleterange", &key).unwrap_or_else(|e| panic!("delete {lb2}: {e}"));
    assert_eq!(deleted["deleted"].as_str(), Some("1"), "{deleted}");
    let back = wait_for(Duration::from_secs(10), || {
        let (_, keys) = etcd.keys(&lb2, 0).ok()?;
        keys.iter().any(|(k, _, _)| *k == lb2).then_some(())
    });
    assert!(back.is_some(), "lb2 published itself again after its key was deleted:\n{}", nodes[2].log());
    assert!(nodes[2].log().contains("published state was deleted"), "lb2 saw it go:\n{}", nodes[2].log());
    eprintln!(
        "at rest: {} revisions in {}s ({} compaction marks, no node wrote), etcd's database {db} bytes",
        rev1 - rev0,
        window.as_secs(),
        marks1 - marks0
    );
}

/// Services of the large fleet node (`web` and 4,095 generated ones).
const MANY: u16 = 4_096;

#[test]
fn a_fleet_node_with_four_thousand_services_publishes_and_cuts_over() {
    if !crate::have_root("a_fleet_node_with_four_thousand_services_publishes_and_cuts_over") {
        return;
    }
    let etcd = Etcd::start();
    let t = FleetTopology::new(1);
    let _relay = Relay::start(&t.lbs[0], etcd.client_port);
    let prefix = format!("/switcher-test-{}", t.client.name);
    let generated = crate::proc::generated_services(MANY - 1, "health = { check = \"none\" }\n");
    let started = Instant::now();
    let d = Daemon::start(&t.lbs[0], |s| format!("{}{generated}", t.config(0, &prefix, s)));
    let last = format!("s{}", MANY - 2);
    // The node seeds the desired state of every service and publishes what it applied.
    let seeded = wait_for(Duration::from_secs(60), || {
        let view = fleet(&d).fleet?;
        let node = view.nodes.iter().find(|n| n.node == "lb0")?;
        (view.services.len() == usize::from(MANY) && node.services.len() == usize::from(MANY)).then_some(())
    });
    assert!(seeded.is_some(), "the node did not seed and publish {MANY} services: {}", d.log());
    eprintln!("{MANY} services seeded and published in {} ms", started.elapsed().as_millis());
    let (_, keys) = etcd.keys(&format!("{prefix}/"), 0).unwrap_or_else(|e| panic!("read the fleet: {e}"));
    let desired = keys.iter().filter(|(k, _, _)| k.contains("/services/")).count();
    assert_eq!(desired, usize::from(MANY), "one desired state per service: {} keys", keys.len());
    // One key per service under the node's header: a change writes the services it concerns.
    let published = wait_for(Duration::from_secs(10), || {
        let (_, keys) = etcd.keys(&format!("{prefix}/nodes/lb0/"), 0).ok()?;
        (keys.len() == usize::from(MANY)).then_some(keys.len())
    });
    assert_eq!(published, Some(usize::from(MANY)), "a key per service");
    let one = |name: &str| {
        let key = format!("{prefix}/nodes/lb0/{name}");
        let got = etcd
            .call("/v3/kv/range", &serde_json::json!({ "key": crate::fleet::base64(key.as_bytes()) }))
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        got["kvs"][0]["value"].as_str().unwrap_or_default().len() * 3 / 4
    };
    let size = one(&last);
    eprintln!("a service's published state: {size} bytes");
    assert!(size > 0 && size < 1_000, "{size} bytes");
    let (before, _) = etcd.keys(&format!("{prefix}/"), 0).unwrap_or_else(|e| panic!("read the fleet: {e}"));
    let out = d.cli_ok(&["cutover", &last, "green"]);
    assert!(out.contains("blue → green"), "{out}");
    let applied = wait_for(Duration::from_secs(30), || {
        let view = fleet(&d).fleet?;
        let want = view.services.iter().find(|s| s.name == last)?.revision;
        let node = view.nodes.iter().find(|n| n.node == "lb0")?;
        let s = node.services.iter().find(|s| s.name == last)?;
        (s.active.as_str() == "green" && s.applied_revision >= want).then_some(())
    });
    assert!(applied.is_some(), "the node applied and published the cut-over of {last}: {}", d.log());
    let (after, _) = etcd.keys(&format!("{prefix}/"), 0).unwrap_or_else(|e| panic!("read the fleet: {e}"));
    eprintln!("the cut-over of one of {MANY} services took {} etcd revisions", after - before);
    assert!(after - before < 10, "a cut-over writes a few keys, not every service: {before} → {after}");
    let status = d.status();
    let first = status.services.iter().find(|s| s.name == "s0").expect("s0 in status");
    assert_eq!(first.active.as_str(), "blue", "the other services stay");
}
