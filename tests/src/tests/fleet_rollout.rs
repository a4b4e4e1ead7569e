//! T2 for a fleet's rollout: two fleet nodes (each its own daemon and XDP program, one etcd)
//! follow one rollout started on one of them; both apply each share as it comes; the node
//! that drives it is killed mid-plan, and the other takes the driver's key when its lease
//! expires and completes the rollout at the recorded step, none skipped nor repeated. After a
//! rollout both nodes show the kept backup, and a rollback within its window is one write; a
//! drill started on one node moves both to the standby and back, with its report.

use std::{collections::BTreeSet, net::SocketAddrV4, path::Path, time::Duration};

use switcher_user::protocol::{Colour, FleetRollout, ServiceStatus};

use crate::{
    fleet::{Etcd, FleetTopology, PORT, Relay},
    net::{VIP, tcp_request, wait_for},
    proc::Daemon,
};

fn web(d: &Daemon) -> ServiceStatus {
    d.status().services.into_iter().find(|s| s.name == "web").expect("web in status")
}

/// What a node forwards now: (active, share of new flows on green in 0.01 %).
fn share_on(d: &Daemon) -> (Colour, u32) {
    let s = web(d);
    let green = match (s.active, s.canary) {
        (Colour::Green, _) => 10_000,
        (_, Some(c)) if c.colour == Colour::Green => c.basis_points,
        _ => 0,
    };
    (s.active, green)
}

/// The node has applied a desired state of `web` from etcd.
fn follows(d: &Daemon) -> bool {
    d.status().fleet.is_some_and(|f| f.services.iter().any(|s| s.name == "web" && s.applied_revision > 0))
}

/// Two fleet nodes on one etcd, following `web` (fields drop in order: the daemons first).
struct Two {
    nodes: Vec<Daemon>,
    _relays: Vec<Relay>,
    t: FleetTopology,
    etcd: Etcd,
    prefix: String,
}

impl Two {
    fn start() -> Two {
        Two::start_with(|_| String::new())
    }

    /// Two nodes whose `[service.rollout]` has the lines `extra` gives for each node's
    /// socket, too.
    fn start_with(extra: impl Fn(&Path) -> String) -> Two {
        let etcd = Etcd::start();
        let t = FleetTopology::new(2);
        let relays: Vec<Relay> = t.lbs.iter().map(|ns| Relay::start(ns, etcd.client_port)).collect();
        let prefix = format!("/switcher-test-{}", t.client.name);
        // Judged without traffic (min_flows = 0): these tests are about who drives, not the
        // judgement.
        let rollout = |s: &Path| format!("\n[service.rollout]\nmin_flows = 0\n{}", extra(s));
        let nodes: Vec<Daemon> =
            (0..2).map(|i| Daemon::start(&t.lbs[i], |s| t.config(i, &prefix, s) + &rollout(s))).collect();
        let two = Two { nodes, _relays: relays, t, etcd, prefix };
        let up = wait_for(Duration::from_secs(20), || two.nodes.iter().all(follows).then_some(()));
        assert!(up.is_some(), "both nodes follow the fleet's desired state\n{}", two.logs());
        two
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(Daemon::log).collect::<Vec<_>>().join("\n----\n")
    }

    /// The rollout's record in etcd.
    fn record(&self) -> FleetRollout {
        let record = self.etcd.value(&format!("{}/rollouts/web", self.prefix)).expect("the rollout's record in etcd");
        serde_json::from_str(&record).expect("a FleetRollout")
    }

    /// Waits until both nodes forward `share` of new flows to green.
    fn wait_share(&self, share: u32) -> [BTreeSet<u32>; 2] {
        let mut seen: [BTreeSet<u32>; 2] = Default::default();
        let reached = wait_for(Duration::from_secs(30), || {
            for (i, d) in self.nodes.iter().enumerate() {
                seen[i].insert(share_on(d).1);
            }
            seen.iter().all(|s| s.contains(&share)).then_some(())
        });
        assert!(reached.is_some(), "both nodes reached {share} bp: {seen:?}\n{}", self.logs());
        seen
    }
}

#[test]
fn two_fleet_nodes_follow_one_rollout_and_a_dead_driver_is_replaced() {
    if !crate::have_root("two_fleet_nodes_follow_one_rollout_and_a_dead_driver_is_replaced") {
        return;
    }
    let mut two = Two::start();

    // 1. Started on lb1: one rollout for both nodes.
    let out = two.nodes[1].cli_ok(&["rollout", "web", "green", "--steps", "10%,pause 2s,50%,pause 8s,100%"]);
    assert!(out.contains("fleet rollout blue → green started"), "{out}");
    let again = two.nodes[0].cli(&["rollout", "web", "green"]);
    assert!(!again.status.success(), "a second rollout is refused on the other node too");
    assert!(String::from_utf8_lossy(&again.stderr).contains("under way"), "{again:?}");

    // 2. Both nodes apply the shares as they come (10 %, then 50 %), and both show the rollout.
    let seen = two.wait_share(5_000);
    assert!(seen.iter().all(|s| s.contains(&1_000)), "both nodes applied 10 % on the way: {seen:?}");
    let statuses: Vec<_> = two.nodes.iter().map(|d| web(d).rollout.expect("every node shows the rollout")).collect();
    let driver = statuses[0].driver.clone().expect("a node drives the rollout");
    assert_eq!(statuses[1].driver.as_ref(), Some(&driver), "both nodes name the same driver: {statuses:?}");
    assert_eq!((statuses[0].step, statuses[0].steps.len()), (4, 5), "at the second pause: {statuses:?}");
    let text = two.nodes[0].cli_ok(&["rollout", "status", "web"]);
    assert!(text.contains(&format!("driven by {driver}")), "{text}");

    // 3. The driver dies mid-pause; the other node takes over when its lease expires (4 s).
    let dead = if driver == "lb0" { 0 } else { 1 };
    let alive = 1 - dead;
    let successor = format!("lb{alive}");
    two.nodes[dead].kill();
    let mut drivers = BTreeSet::new();
    let done = wait_for(Duration::from_secs(40), || {
        let r = web(&two.nodes[alive]).rollout?;
        drivers.extend(r.driver.clone());
        (r.state != "running" && r.state != "holding").then_some(r)
    });
    let r = done.unwrap_or_else(|| panic!("the rollout did not end after the driver died\n{}", two.nodes[alive].log()));
    assert_eq!(r.state, "complete", "{r:?}\n{}", two.nodes[alive].log());
    assert!(drivers.contains(&successor), "{successor} drove after {driver} died: {drivers:?}");
    assert_eq!(share_on(&two.nodes[alive]), (Colour::Green, 10_000), "the survivor is on green");

    // 4. The record's history: each op once, in order; the dead driver's, then the successor's.
    let record = two.record();
    let steps: Vec<&str> = record.history.iter().filter_map(|h| h.split(' ').next()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "complete"], "no step skipped nor repeated: {:?}", record.history);
    assert!(record.history[2].contains(&format!("by {driver}")), "{:?}", record.history);
    assert!(record.history[3].contains(&format!("by {successor}")), "{:?}", record.history);
    eprintln!("fleet rollout history: {:#?}", record.history);

    // 5. The dead node, restarted, applies the fleet's desired state: both nodes on green, and
    //    new connections through either reach green.
    two.nodes[dead].restart();
    let both = wait_for(Duration::from_secs(20), || {
        two.nodes.iter().all(|d| share_on(d) == (Colour::Green, 10_000)).then_some(())
    });
    assert!(both.is_some(), "both nodes at 100 % green\n{}", two.logs());
    assert_eq!(web(&two.nodes[dead]).rollout.map(|r| r.state), Some("complete".into()), "the restarted node shows it");
    for i in 0..10 {
        let (answer, _) = tcp_request(&two.t.client, SocketAddrV4::new(VIP, PORT))
            .unwrap_or_else(|e| panic!("request {i} through the VIP: {e}"));
        assert!(answer.starts_with("green"), "new connections reach green: {answer}");
    }
}

#[test]
fn any_fleet_node_pauses_and_aborts_the_rollout_even_with_its_driver_dead() {
    if !crate::have_root("any_fleet_node_pauses_and_aborts_the_rollout_even_with_its_driver_dead") {
        return;
    }
    let mut two = Two::start();
    two.nodes[0].cli_ok(&["rollout", "web", "green", "--steps", "10%,pause 2s,50%,pause 60s,100%"]);
    two.wait_share(1_000);
    let driver = wait_for(Duration::from_secs(10), || web(&two.nodes[0]).rollout?.driver).expect("a driver");
    let dead = if driver == "lb0" { 0 } else { 1 };
    let alive = 1 - dead;

    // 1. Paused from the node that does not drive: both nodes show it, and it stays at its
    //    step past the pause's 2 s (the driver obeys the record).
    let out = two.nodes[alive].cli_ok(&["rollout", "pause", "web"]);
    assert!(out.contains("fleet rollout paused"), "{out}");
    let paused = wait_for(Duration::from_secs(10), || {
        two.nodes.iter().all(|d| web(d).rollout.is_some_and(|r| r.state == "paused")).then_some(())
    });
    assert!(paused.is_some(), "both nodes show the pause: {:?}", web(&two.nodes[dead]).rollout);
    std::thread::sleep(Duration::from_secs(4));
    let r = web(&two.nodes[dead]).rollout.expect("rollout");
    assert_eq!((r.step, r.state.as_str(), r.share_bp), (2, "paused", 1_000), "held at the pause: {r:?}");
    assert!(two.nodes.iter().all(|d| share_on(d).1 == 1_000), "no node moved past 10 % while paused");

    // 2. The driver dies; the survivor aborts at once (its key still held by the dead node's
    //    lease): the abort writes the desired state itself, and new flows are back on blue.
    two.nodes[dead].kill();
    let out = two.nodes[alive].cli_ok(&["rollout", "abort", "web"]);
    assert!(out.contains("fleet rollout aborted; new flows go back to blue"), "{out}");
    let back = wait_for(Duration::from_secs(10), || (share_on(&two.nodes[alive]) == (Colour::Blue, 0)).then_some(()));
    assert!(back.is_some(), "the survivor is back on blue: {:?}\n{}", share_on(&two.nodes[alive]), two.logs());
    let record = two.record();
    assert_eq!(record.state, "aborted", "{record:?}");
    let last = record.history.last().cloned().unwrap_or_default();
    assert!(last.starts_with(&format!("aborted by lb{alive}")), "{:?}", record.history);
    let status = web(&two.nodes[alive]).rollout.expect("rollout");
    assert_eq!(status.state, "aborted");
    assert!(status.reason.is_some_and(|w| w.contains("aborted by the operator")));

    // 3. The dead node, restarted, follows the desired state back to blue; nothing resumes.
    two.nodes[dead].restart();
    let both =
        wait_for(Duration::from_secs(20), || two.nodes.iter().all(|d| share_on(d) == (Colour::Blue, 0)).then_some(()));
    assert!(both.is_some(), "both nodes on blue\n{}", two.logs());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(two.record().state, "aborted", "an aborted rollout stays aborted");
}

/// The mod revision and version of the fleet's desired state of `web`.
fn desired_version(two: &Two) -> (i64, i64) {
    let key = format!("{}/services/web", two.prefix);
    let (_, keys) = two.etcd.keys(&key, 0).expect("etcd answers");
    let (_, rev, version) = keys.into_iter().find(|(k, _, _)| *k == key).expect("the desired state");
    (rev, version)
}

#[test]
fn both_fleet_nodes_show_the_kept_backup_and_a_rollback_within_it_is_one_write() {
    if !crate::have_root("both_fleet_nodes_show_the_kept_backup_and_a_rollback_within_it_is_one_write") {
        return;
    }
    let two = Two::start_with(|_| "keep_previous_secs = 600\n".into());
    two.nodes[0].cli_ok(&["rollout", "web", "green", "--steps", "10%,pause 3s,100%"]);

    // 1. Complete: both nodes on green, and both show blue as the backup for (at most) 600 s.
    let kept = wait_for(Duration::from_secs(30), || {
        let b: Vec<_> = two.nodes.iter().filter_map(|d| web(d).backup).collect();
        (b.len() == 2).then_some(b)
    });
    let kept = kept.unwrap_or_else(|| panic!("both nodes show the backup\n{}", two.logs()));
    for b in &kept {
        assert_eq!(b.colour, Colour::Blue, "{kept:?}");
        assert!((1..=600).contains(&b.secs_left), "{kept:?}");
    }
    assert!(two.nodes.iter().all(|d| share_on(d) == (Colour::Green, 10_000)));
    let record = two.record();
    assert_eq!(record.state, "complete", "{record:?}");
    assert!(record.kept_until_unix.is_some() && record.backup_end.is_none(), "{record:?}");
    // The pause was judged from both nodes' counters (each publishes them every second).
    assert_eq!(record.judged_from.as_deref(), Some("2 nodes (lb0, lb1)"), "{record:?}");
    let text = two.nodes[1].cli_ok(&["rollout", "status", "web"]);
    assert!(text.contains("backup: blue for"), "{text}");

    // 2. A rollback within the window, from the node that did not start the rollout: one write
    //    of the desired state, and both nodes back on blue; the backup is over, with no hook.
    let (_, before) = desired_version(&two);
    let out = two.nodes[1].cli_ok(&["rollback", "web"]);
    assert!(!out.is_empty());
    let back =
        wait_for(Duration::from_secs(20), || two.nodes.iter().all(|d| share_on(d) == (Colour::Blue, 0)).then_some(()));
    assert!(back.is_some(), "both nodes back on blue\n{}", two.logs());
    let (_, after) = desired_version(&two);
    assert_eq!(after, before + 1, "the rollback is one write of the desired state");
    let ended = wait_for(Duration::from_secs(10), || two.record().backup_end);
    let ended = ended.unwrap_or_else(|| panic!("the driver ends the backup\n{}", two.logs()));
    assert!(ended.contains("the fleet switched to blue"), "{ended}");
    let none = wait_for(Duration::from_secs(10), || two.nodes.iter().all(|d| web(d).backup.is_none()).then_some(()));
    assert!(none.is_some(), "no node shows a backup any more");
    // The completed rollout's status on every node says it was rolled back, not 100 % green.
    for d in &two.nodes {
        let r = web(d).rollout.unwrap_or_else(|| panic!("the rollout is still shown\n{}", two.logs()));
        assert_eq!((r.state.as_str(), r.share_bp), ("rolled back", 0), "{r:?}");
    }
}

#[test]
fn a_drill_in_a_fleet_moves_both_nodes_to_the_standby_and_back_with_its_report() {
    if !crate::have_root("a_drill_in_a_fleet_moves_both_nodes_to_the_standby_and_back_with_its_report") {
        return;
    }
    let two = Two::start();
    let out = two.nodes[1].cli_ok(&["drill", "web", "--for", "4s"]);
    assert!(out.contains("fleet drill started: 100% of new flows to green for 4s on every node"), "{out}");
    let again = two.nodes[0].cli(&["drill", "web"]);
    assert!(!again.status.success(), "a second drill is refused on the other node");
    assert!(String::from_utf8_lossy(&again.stderr).contains("under way"), "{again:?}");

    // 1. Both nodes follow the share to the standby, and both show the drill.
    two.wait_share(10_000);
    for d in &two.nodes {
        let r = web(d).rollout.expect("every node shows the drill");
        assert!(r.drill, "{r:?}");
    }

    // 2. Both nodes back on blue when it is over, with the report on both.
    let back =
        wait_for(Duration::from_secs(30), || two.nodes.iter().all(|d| share_on(d) == (Colour::Blue, 0)).then_some(()));
    assert!(back.is_some(), "both nodes back on blue\n{}", two.logs());
    let done = wait_for(Duration::from_secs(10), || {
        let all: Vec<_> = two.nodes.iter().filter_map(|d| web(d).rollout.filter(|r| r.state == "complete")).collect();
        (all.len() == 2).then_some(all)
    });
    let done = done.unwrap_or_else(|| panic!("both nodes show the drill complete\n{}", two.logs()));
    for r in &done {
        assert!(r.drill && r.judgement.as_deref().is_some_and(|j| j.starts_with("green took")), "{r:?}");
    }
    let record = two.record();
    let steps: Vec<&str> = record.history.iter().filter_map(|h| h.split(' ').next()).collect();
    assert_eq!(steps, ["1", "2", "3", "complete"], "{:?}", record.history);
    let text = two.nodes[0].cli_ok(&["drill", "status", "web"]);
    assert!(text.contains("report: green took"), "{text}");
    // Every node's audit trail has the switch back with the report.
    for d in &two.nodes {
        let log = d.log();
        assert!(log.contains("drill of web over: green took"), "{log}");
    }
}

#[test]
fn a_fleet_backup_is_released_once_by_the_driver_and_not_again_after_its_death() {
    if !crate::have_root("a_fleet_backup_is_released_once_by_the_driver_and_not_again_after_its_death") {
        return;
    }
    let released = |s: &Path| s.with_file_name("released");
    let mut two = Two::start_with(|s| {
        format!(
            "keep_previous_secs = 2\nhooks = {{ backup_released = \"echo $SWITCHER_FROM >> {}\" }}\n",
            released(s).display()
        )
    });
    two.nodes[1].cli_ok(&["rollout", "web", "green", "--steps", "100%"]);
    let end = wait_for(Duration::from_secs(30), || two.record().backup_end);
    let end = end.unwrap_or_else(|| panic!("the driver releases the backup\n{}", two.logs()));
    assert!(end.ends_with("(hook backup_released succeeded)"), "{end}");
    let lines = |two: &Two| -> Vec<String> {
        two.nodes
            .iter()
            .flat_map(|d| {
                std::fs::read_to_string(released(&d.socket))
                    .unwrap_or_default()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(lines(&two), ["blue"], "the hook ran once, on one node");
    assert!(two.nodes.iter().all(|d| web(d).backup.is_none()), "no node shows a backup any more");

    // The node that released it dies; the other, once its lease is gone, has nothing to run.
    let driver = end.split(' ').nth(2).unwrap_or_default().to_owned();
    let dead = if driver == "lb0" { 0 } else { 1 };
    two.nodes[dead].kill();
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(lines(&two), ["blue"], "not run again after the driver's death");
    assert_eq!(two.record().backup_end.as_deref(), Some(end.as_str()));
}
