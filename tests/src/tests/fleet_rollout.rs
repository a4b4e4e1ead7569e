//! T2 for a fleet's rollout: two fleet nodes (each its own daemon and XDP program, one etcd)
//! follow one rollout started on one of them; both apply each share as it comes; the node
//! that drives it is killed mid-plan, and the other takes the driver's key when its lease
//! expires and completes the rollout at the recorded step, none skipped nor repeated.

use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

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

#[test]
fn two_fleet_nodes_follow_one_rollout_and_a_dead_driver_is_replaced() {
    if !crate::have_root("two_fleet_nodes_follow_one_rollout_and_a_dead_driver_is_replaced") {
        return;
    }
    let etcd = Etcd::start();
    let t = FleetTopology::new(2);
    let _relays: Vec<Relay> = t.lbs.iter().map(|ns| Relay::start(ns, etcd.client_port)).collect();
    let prefix = format!("/switcher-test-{}", t.client.name);
    // Judged without traffic (min_flows = 0): this test is about who drives, not the judgement.
    let rollout = "\n[service.rollout]\nmin_flows = 0\n";
    let mut nodes: Vec<Daemon> =
        (0..2).map(|i| Daemon::start(&t.lbs[i], |s| t.config(i, &prefix, s) + rollout)).collect();
    let logs = |nodes: &[Daemon]| nodes.iter().map(Daemon::log).collect::<Vec<_>>().join("\n----\n");
    let up = wait_for(Duration::from_secs(20), || nodes.iter().all(follows).then_some(()));
    assert!(up.is_some(), "both nodes follow the fleet's desired state\n{}", logs(&nodes));

    // 1. Started on lb1: one rollout for both nodes.
    let out = nodes[1].cli_ok(&["rollout", "web", "green", "--steps", "10%,pause 2s,50%,pause 8s,100%"]);
    assert!(out.contains("fleet rollout blue → green started"), "{out}");
    let again = nodes[0].cli(&["rollout", "web", "green"]);
    assert!(!again.status.success(), "a second rollout is refused on the other node too");
    assert!(String::from_utf8_lossy(&again.stderr).contains("under way"), "{again:?}");

    // 2. Both nodes apply the shares as they come (10 %, then 50 %), and both show the rollout.
    let mut seen: [BTreeSet<u32>; 2] = Default::default();
    let at_half = wait_for(Duration::from_secs(30), || {
        for (i, d) in nodes.iter().enumerate() {
            seen[i].insert(share_on(d).1);
        }
        seen.iter().all(|s| s.contains(&5_000)).then_some(())
    });
    assert!(at_half.is_some(), "both nodes reached 50 %: {seen:?}\n{}", logs(&nodes));
    assert!(seen.iter().all(|s| s.contains(&1_000)), "both nodes applied 10 % on the way: {seen:?}");
    let statuses: Vec<_> = nodes.iter().map(|d| web(d).rollout.expect("every node shows the rollout")).collect();
    let driver = statuses[0].driver.clone().expect("a node drives the rollout");
    assert_eq!(statuses[1].driver.as_ref(), Some(&driver), "both nodes name the same driver: {statuses:?}");
    assert_eq!((statuses[0].step, statuses[0].steps.len()), (4, 5), "at the second pause: {statuses:?}");
    let text = nodes[0].cli_ok(&["rollout", "status", "web"]);
    assert!(text.contains(&format!("driven by {driver}")), "{text}");

    // 3. The driver dies mid-pause; the other node takes over when its lease expires (4 s).
    let dead = if driver == "lb0" { 0 } else { 1 };
    let alive = 1 - dead;
    let successor = format!("lb{alive}");
    nodes[dead].kill();
    let mut drivers = BTreeSet::new();
    let done = wait_for(Duration::from_secs(40), || {
        let r = web(&nodes[alive]).rollout?;
        drivers.extend(r.driver.clone());
        (r.state != "running" && r.state != "holding").then_some(r)
    });
    let r = done.unwrap_or_else(|| panic!("the rollout did not end after the driver died\n{}", nodes[alive].log()));
    assert_eq!(r.state, "complete", "{r:?}\n{}", nodes[alive].log());
    assert!(drivers.contains(&successor), "{successor} drove after {driver} died: {drivers:?}");
    assert_eq!(share_on(&nodes[alive]), (Colour::Green, 10_000), "the survivor is on green");

    // 4. The record's history: each op once, in order; the dead driver's, then the successor's.
    let record = etcd.value(&format!("{prefix}/rollouts/web")).expect("the rollout's record in etcd");
    let record: FleetRollout = serde_json::from_str(&record).expect("a FleetRollout");
    let steps: Vec<&str> = record.history.iter().filter_map(|h| h.split(' ').next()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "complete"], "no step skipped nor repeated: {:?}", record.history);
    assert!(record.history[2].contains(&format!("by {driver}")), "{:?}", record.history);
    assert!(record.history[3].contains(&format!("by {successor}")), "{:?}", record.history);
    eprintln!("fleet rollout history: {:#?}", record.history);

    // 5. The dead node, restarted, applies the fleet's desired state: both nodes on green, and
    //    new connections through either reach green.
    nodes[dead].restart();
    let both = wait_for(Duration::from_secs(20), || {
        nodes.iter().all(|d| share_on(d) == (Colour::Green, 10_000)).then_some(())
    });
    assert!(both.is_some(), "both nodes at 100 % green\n{}", logs(&nodes));
    assert_eq!(web(&nodes[dead]).rollout.map(|r| r.state), Some("complete".into()), "the restarted node shows it");
    for i in 0..10 {
        let (answer, _) = tcp_request(&t.client, SocketAddrV4::new(VIP, PORT))
            .unwrap_or_else(|e| panic!("request {i} through the VIP: {e}"));
        assert!(answer.starts_with("green"), "new connections reach green: {answer}");
    }
}
