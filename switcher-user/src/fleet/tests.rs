//! The fleet's unit tests, on the engine's maps in memory.

use std::time::Duration;

use switcher_common::user::Colour;

use super::{
    publish::{News, news},
    session::drains_elsewhere,
    *,
};
use crate::{
    config::{BackendConfig, FleetConfig},
    engine::Switchboard,
    protocol::{Scope, SharedBackend},
};

fn desired(active: &str) -> Desired {
    Desired::of(active.parse().expect("a colour"))
}

#[test]
fn desired_states_are_checked_not_trusted() {
    let t = target(&desired("green")).expect("valid");
    assert_eq!((t.active, t.canary_bp, t.previous, t.pools), (Colour::Green, 0, None, None));
    let red = serde_json::from_str::<Desired>(r#"{"active":"red"}"#).expect_err("not a colour");
    assert!(red.to_string().contains("\"red\": unknown colour"), "{red}");
    assert!(target(&Desired { canary_bp: 10_001, ..desired("blue") }).is_err());
    let half =
        Desired { blue: Some(vec![SharedBackend { address: "198.51.100.2:80".into(), weight: 1 }]), ..desired("blue") };
    assert!(target(&half).expect_err("one pool only").contains("both pools"));
    let bad = Desired {
        blue: Some(vec![SharedBackend { address: "nowhere".into(), weight: 1 }]),
        green: Some(vec![]),
        ..desired("blue")
    };
    assert!(target(&bad).is_err());
    let ok = Desired {
        blue: Some(vec![SharedBackend { address: "198.51.100.2:80".into(), weight: 3 }]),
        green: Some(vec![]),
        previous: Some(Colour::Green),
        drain_timeout_secs: Some(5),
        ..desired("blue")
    };
    let t = target(&ok).expect("valid");
    assert_eq!(t.pools.map(|[b, g]| (b.len(), b[0].weight, g.len())), Some((1, 3, 0)));
    assert_eq!((t.previous, t.drain), (Some(Colour::Green), Some(Duration::from_secs(5))));
    // Unknown JSON is an error, never a panic.
    for text in ["", "{", "[]", "{\"active\":1}", "null"] {
        assert!(serde_json::from_str::<Desired>(text).is_err(), "{text}");
    }
}

fn req_cutover(colour: Option<Colour>) -> Request {
    Request::Cutover {
        service: "web".into(),
        colour,
        drain_timeout_secs: Some(30),
        force: false,
        scope: Scope::default(),
    }
}

#[test]
fn changes_are_planned_from_the_desired_state_not_the_local_one() {
    let b = crate::engine::tests::board();
    let blue = desired("blue");
    // A cut-over to the idle colour records where it came from and its drain timeout.
    let next = plan(&b, &req_cutover(None), &blue, false).expect("ok").expect("a change");
    assert_eq!((next.active, next.previous, next.drain_timeout_secs), (Colour::Green, Some(Colour::Blue), Some(30)));
    assert_eq!(next.change, "cutover blue → green");
    // Nothing to do is not a write.
    assert_eq!(plan(&b, &req_cutover(Some(Colour::Blue)), &blue, false), Ok(None));
    // A rollback needs a previous colour in the *desired* state.
    let rollback = Request::Rollback { service: "web".into(), force: false, scope: Scope::default() };
    let e = plan(&b, &rollback, &blue, false).expect_err("nothing to roll back");
    assert!(e.contains("nothing to roll back"), "{e}");
    let back = plan(&b, &rollback, &next, false).expect("ok").expect("a change");
    assert_eq!((back.active, back.previous, back.drain_timeout_secs), (Colour::Blue, Some(Colour::Green), None));
    // Weights: a share for the idle colour is a canary; 100 % of it is a cut-over.
    let weight = |c: Colour, bp| Request::Weight {
        service: "web".into(),
        colour: c,
        basis_points: bp,
        force: false,
        scope: Scope::default(),
    };
    let canary = plan(&b, &weight(Colour::Green, 500), &blue, false).expect("ok").expect("a change");
    assert_eq!((canary.active, canary.canary_bp), (Colour::Blue, 500));
    assert_eq!(canary.change, "weight green 0% → 5%");
    let all = plan(&b, &weight(Colour::Green, 10_000), &blue, false).expect("ok").expect("a change");
    assert_eq!((all.active, all.canary_bp), (Colour::Green, 0));
    assert!(plan(&b, &weight(Colour::Green, 10_001), &blue, false).is_err());
    // A colour without backends is refused; so is an unknown service.
    let solo = Request::Cutover {
        service: "solo".into(),
        colour: None,
        drain_timeout_secs: None,
        force: true,
        scope: Scope::default(),
    };
    assert!(plan(&b, &solo, &blue, false).expect_err("no green").contains("no green backend"));
    let ghost = Request::Rollback { service: "ghost".into(), force: false, scope: Scope::default() };
    assert!(plan(&b, &ghost, &next, false).expect_err("unknown").contains("unknown service"));
}

#[test]
fn shared_pools_are_edited_with_the_local_checks() {
    let b = crate::engine::tests::board();
    let blue = desired("blue");
    let add = Request::BackendAdd {
        service: "web".into(),
        colour: Colour::Green,
        address: "198.51.100.19:8080".into(),
        weight: Some(2),
    };
    // Without shared pools a backend change is not the fleet's business.
    assert!(plan(&b, &add, &blue, false).is_err());
    let next = plan(&b, &add, &blue, true).expect("ok").expect("a change");
    let green = next.green.clone().expect("green pool");
    assert_eq!(green.len(), 2, "seeded from the local pool, then added to: {green:?}");
    assert_eq!(green[1], SharedBackend { address: "198.51.100.19:8080".into(), weight: 2 });
    assert_eq!(next.blue.as_ref().map(Vec::len), Some(1));
    assert_eq!(next.change, "backend add green 198.51.100.19:8080 weight 2");
    // The last backend of the live colour cannot go.
    let remove =
        Request::BackendRemove { service: "web".into(), colour: Colour::Blue, address: "198.51.100.2:8080".into() };
    assert!(plan(&b, &remove, &next, true).expect_err("last live backend").contains("last blue backend"));
    // A wrong family is refused like locally.
    let v6 = Request::BackendAdd {
        service: "web".into(),
        colour: Colour::Green,
        address: "[2001:db8::1]:8080".into(),
        weight: None,
    };
    assert!(plan(&b, &v6, &next, true).is_err());
}

#[test]
fn a_desired_state_is_applied_with_its_pools_and_canary() {
    let mut b = crate::engine::tests::board();
    let pools = [
        vec![BackendConfig { addr: "198.51.100.2:8080".parse().expect("addr"), weight: 1 }],
        vec![
            BackendConfig { addr: "198.51.100.18:8080".parse().expect("addr"), weight: 1 },
            BackendConfig { addr: "198.51.100.19:8080".parse().expect("addr"), weight: 3 },
        ],
    ];
    let change = b.apply_desired("web", Colour::Green, 250, None, Some(pools), false).expect("applied");
    assert!(change.is_some());
    let (active, canary, previous, config) = b.snapshot("web").expect("web");
    assert_eq!((active, canary, previous), (Colour::Green, 250, Some(Colour::Blue)));
    assert_eq!(config.green.len(), 2);
    // The same again changes nothing.
    assert_eq!(b.apply_desired("web", Colour::Green, 250, None, None, false), Ok(None));
    assert!(b.apply_desired("ghost", Colour::Green, 0, None, None, false).is_err());
}

fn fleet() -> Fleet {
    Fleet::new(FleetConfig {
        endpoints: vec![],
        prefix: "/switcher".into(),
        node: "lb1".into(),
        share_backends: false,
        lease_ttl: Duration::from_secs(10),
        compaction_interval: None,
    })
}

#[tokio::test]
async fn an_emergency_local_change_holds_until_the_desired_state_changes() {
    let mut b = crate::engine::tests::board();
    // The emergency path (`--local`) moved web to green while the daemon was down; the
    // restarted daemon adopted green from the pinned maps.
    assert!(b.handle(req_cutover(Some(Colour::Green))).0.ok);
    let engine = Handle::start(b).expect("engine");
    let f = fleet();
    f.note_emergency_override("web");
    let active = async || engine.call(|b| b.snapshot("web").expect("web").0).await.expect("engine");
    // etcd still says blue (revision 5): the first read does not undo the emergency change.
    assert_eq!(f.apply(&engine, "web", desired("blue"), 5).await, None);
    assert_eq!(active().await, Colour::Green);
    assert!(
        f.local_view(&["web".into()]).services[0]
            .local_override
            .as_deref()
            .is_some_and(|w| w.contains("emergency path"))
    );
    assert_eq!(f.apply(&engine, "web", desired("blue"), 5).await, None, "read again after a reconnect");
    assert_eq!(active().await, Colour::Green);
    // The desired state changes: the node follows it again.
    assert!(f.apply(&engine, "web", desired("blue"), 6).await.is_some());
    assert_eq!(active().await, Colour::Blue);
    assert_eq!(f.local_view(&["web".into()]).services[0].local_override, None);
}

#[test]
fn a_rollback_from_the_fleet_is_a_rollback_and_never_arms_the_watch() {
    use crate::engine::tests::{checked, probe};
    let mut b = crate::engine::tests::board();
    checked(&mut b, Some(Duration::from_secs(60)), false);
    probe(&mut b, "198.51.100.2:8080", true);
    probe(&mut b, "198.51.100.18:8080", true);
    let blue = desired("blue");
    let green = plan(&b, &req_cutover(Some(Colour::Green)), &blue, false).expect("ok").expect("a change");
    assert!(!green.rollback);
    let t = target(&green).expect("valid");
    b.apply_desired("web", t.active, t.canary_bp, t.drain, t.pools, t.rollback).expect("applied");
    let watch = |b: &mut Switchboard<_>| b.status(Some("web")).expect("status").services[0].watch_secs_left;
    assert!(watch(&mut b).is_some(), "a cut-over from the fleet arms the watch window");
    let rollback = Request::Rollback { service: "web".into(), force: false, scope: Scope::default() };
    let back = plan(&b, &rollback, &green, false).expect("ok").expect("a change");
    assert!(back.rollback, "the desired state says it was a rollback");
    let t = target(&back).expect("valid");
    let change = b.apply_desired("web", t.active, t.canary_bp, t.drain, t.pools, t.rollback).expect("applied");
    assert_eq!(change.map(|c| c.what), Some("rolled-back".into()));
    assert_eq!(watch(&mut b), None, "a rollback never arms the watch window");
    // Blue, rolled back to, fails: nothing rolls "back" forward to green.
    for _ in 0..3 {
        assert!(probe(&mut b, "198.51.100.2:8080", false).is_empty());
    }
    assert_eq!(b.snapshot("web").expect("web").0, Colour::Blue);
    // The next change is not a rollback any more.
    let again = plan(&b, &req_cutover(Some(Colour::Green)), &back, false).expect("ok").expect("a change");
    assert!(!again.rollback);
}

#[test]
fn nodes_are_in_step_lagging_or_disagreeing() {
    let node = |active: &str, applied: i64, over: Option<&str>| NodeState {
        node: "lb1".into(),
        at_unix: 0,
        services: vec![NodeService {
            applied_revision: applied,
            local_override: over.map(Into::into),
            ..NodeService::of("web", active.parse().expect("a colour"))
        }],
    };
    let want = desired("green");
    assert_eq!(agreement(&node("green", 7, None), "web", &want, 7), Agreement::InStep);
    assert_eq!(agreement(&node("blue", 5, None), "web", &want, 7), Agreement::Lags);
    assert_eq!(agreement(&node("blue", 7, Some("rolled back locally")), "web", &want, 7), Agreement::Disagrees);
    assert_eq!(agreement(&node("blue", 5, Some("etcd down")), "web", &want, 7), Agreement::Disagrees);
    assert_eq!(agreement(&node("green", 7, None), "dns", &want, 7), Agreement::Missing);
}

#[test]
fn a_drain_waits_for_the_other_nodes_that_hold_flows() {
    let node = |name: &str, draining: Option<(&str, u64)>| NodeState {
        node: name.into(),
        at_unix: 1,
        services: vec![NodeService {
            draining: draining.map(|(c, n)| (c.parse().expect("a colour"), n)),
            ..NodeService::of("web", Colour::Green)
        }],
    };
    let nodes = vec![
        node("lb0", Some(("blue", 5))),
        node("lb1", Some(("blue", 8))),
        node("lb2", Some(("blue", 0))),
        node("lb3", None),
    ];
    let none = HashMap::new();
    let d = drains_elsewhere(nodes.clone().into_iter(), "lb0", &none);
    assert_eq!(d.get("web"), Some(&vec![("lb1".to_owned(), 8)]), "not itself, not nodes with none left");
    assert!(drains_elsewhere(nodes.clone().into_iter().skip(2), "lb0", &none).is_empty());
    // Nodes that have not applied this node's revision yet may hold flows they have not
    // reported: they are waited for.
    let applied = HashMap::from([("web".to_owned(), 7)]);
    let d = drains_elsewhere(nodes.into_iter().skip(2), "lb0", &applied);
    assert_eq!(d.get("web"), Some(&vec![("lb2".to_owned(), 0), ("lb3".to_owned(), 0)]));
}

#[test]
fn a_node_publishes_what_changed_not_the_time() {
    let state = |live: u64, draining: Option<u64>, applied: i64| NodeService {
        applied_revision: applied,
        live_flows: live,
        draining: draining.map(|n| (Colour::Blue, n)),
        healthy_blue: true,
        healthy_green: true,
        ..NodeService::of("web", Colour::Green)
    };
    let last = state(100, None, 7);
    assert_eq!(news(&last, &state(100, None, 7)), News::None, "time alone is no news");
    assert_eq!(news(&last, &state(120, None, 7)), News::None, "within a quarter");
    assert_eq!(news(&last, &state(80, None, 7)), News::None, "within a quarter");
    assert_eq!(news(&last, &state(126, None, 7)), News::Counts);
    assert_eq!(news(&last, &state(74, None, 7)), News::Counts);
    assert_eq!(news(&state(0, None, 7), &state(1, None, 7)), News::Counts, "leaving zero");
    assert_eq!(news(&last, &state(0, None, 7)), News::Counts, "reaching zero");
    // What it applied, and a drain beginning or ending, are published at once.
    assert_eq!(news(&last, &state(100, None, 8)), News::State);
    assert_eq!(news(&last, &state(100, Some(5), 7)), News::State);
    assert_eq!(news(&state(100, Some(5), 7), &state(100, None, 7)), News::State);
    // Every change of a drain's count is news: other nodes' drains wait on it.
    assert_eq!(news(&state(100, Some(5), 7), &state(100, Some(4), 7)), News::Counts);
    let mut down = last.clone();
    down.healthy_blue = false;
    assert_eq!(news(&last, &down), News::State);
}

#[test]
fn nodes_are_gathered_from_headers_and_service_keys() {
    let kv = |key: &'static str, value: String| (key, value.into_bytes());
    let header = |node: &str, services: Vec<NodeService>| {
        serde_json::to_string(&NodeState { node: node.into(), at_unix: 1, services }).expect("json")
    };
    let service = |name: &str| NodeService::of(name, Colour::Green);
    let kvs = [
        kv("/p/nodes/lb0", header("lb0", vec![])),
        kv("/p/nodes/lb0/web", serde_json::to_string(&service("web")).expect("json")),
        kv("/p/nodes/lb0/api", serde_json::to_string(&service("api")).expect("json")),
        // An older node: one key with every service.
        kv("/p/nodes/lb1", header("lb1", vec![service("web")])),
        // A service key whose header is gone (its lease is expiring): left out.
        kv("/p/nodes/lb2/web", serde_json::to_string(&service("web")).expect("json")),
        kv("/p/nodes/lb3", "not json".into()),
    ];
    let nodes = super::publish::gather_nodes("/p/nodes/", kvs.iter().map(|(k, v)| (*k, v.as_slice())));
    let names: Vec<(&str, Vec<&str>)> =
        nodes.iter().map(|n| (n.node.as_str(), n.services.iter().map(|s| s.name.as_str()).collect())).collect();
    assert_eq!(names, [("lb0", vec!["api", "web"]), ("lb1", vec!["web"])]);
}

#[test]
fn the_documents_round_trip() {
    let d =
        Desired { canary_bp: 500, previous: Some(Colour::Blue), change: "weight".into(), ..Desired::of(Colour::Green) };
    let text = serde_json::to_string(&d).expect("json");
    assert!(!text.contains("\"blue\":"), "unshared pools are left out: {text}");
    assert_eq!(serde_json::from_str::<Desired>(&text).expect("parse"), d);
    let n = NodeState {
        node: "lb2".into(),
        at_unix: 1,
        services: vec![NodeService { draining: Some((Colour::Blue, 3)), ..NodeService::of("web", Colour::Green) }],
    };
    let text = serde_json::to_string(&n).expect("json");
    assert_eq!(serde_json::from_str::<NodeState>(&text).expect("parse"), n);
}

#[test]
fn the_shadow_share_travels_in_the_desired_state() {
    let b = crate::engine::tests::board();
    let blue = desired("blue");
    let shadow = |bp| Request::Shadow { service: "web".into(), share_bp: bp, ceiling: None, scope: Scope::default() };
    let e = plan(&b, &shadow(1_000), &blue, false).expect_err("web is TCP");
    assert!(e.contains("sequence numbers"), "{e}");
    let off = plan(&b, &shadow(0), &blue, false).expect("ok").expect("a change");
    assert_eq!(off.shadow, Some(crate::protocol::FleetShadow { share_bp: 0, ceiling: 10_000 }));
    assert_eq!(plan(&b, &shadow(0), &off, false), Ok(None), "already so");
    let on = Desired { shadow: Some(crate::protocol::FleetShadow { share_bp: 1_000, ceiling: 500 }), ..blue.clone() };
    assert_eq!(target(&on).expect("valid").shadow, Some((1_000, 500)));
    let bad = Desired { shadow: Some(crate::protocol::FleetShadow { share_bp: 1_000, ceiling: 0 }), ..blue.clone() };
    assert!(target(&bad).is_err(), "a ceiling of 0 is no setting");
    // Nodes that never saw the field read a document without it, and write none.
    let json = serde_json::to_string(&blue).expect("json");
    assert!(!json.contains("shadow"), "{json}");
}
