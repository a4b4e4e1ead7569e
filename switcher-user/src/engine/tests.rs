//! The engine's unit tests, on maps in memory ([`FakeMaps`]), which the fleet's tests use too.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::{
    config::{DrainAction, HealthConfig, Mode, Protocol},
    dataplane::{Counters, DataplaneError, FlowCounts},
    protocol::Canary,
};

/// Maps in memory, for the switchboard's and the fleet's unit tests.
#[derive(Default)]
pub(crate) struct FakeMaps {
    state: HashMap<u32, (Colour, u32)>,
    pools: HashMap<(u32, Colour), Vec<BackendConfig>>,
    flows: HashMap<(u32, Colour), FlowCounts>,
    ended: Vec<(u32, Colour, DrainAction)>,
    pub(crate) writes: usize,
    /// The drain flag of each service, as the data path would hold it.
    draining: HashMap<u32, bool>,
    /// Service ids by name, as installed.
    ids: HashMap<String, u32>,
    /// Counts handed out so far.
    passes: std::cell::Cell<u64>,
    /// A count to hand out instead of a fresh one (the walker has not finished a pass).
    frozen: Option<Arc<FlowSnapshot>>,
    /// Each colour's counters, as the data path would have counted them.
    pub(crate) counters: HashMap<(u32, Colour), Counters>,
}

impl Maps for FakeMaps {
    fn set_state(&mut self, id: u32, active: Colour, canary_bp: u32, _: Option<Colour>) -> Result<(), DataplaneError> {
        self.state.insert(id, (active, canary_bp));
        self.writes += 1;
        Ok(())
    }
    fn set_pool(&mut self, id: u32, colour: Colour, b: &[BackendConfig]) -> Result<(), DataplaneError> {
        self.pools.insert((id, colour), b.to_vec());
        Ok(())
    }
    fn counters(&self, id: u32, colour: Colour) -> Result<Counters, DataplaneError> {
        Ok(self.counters.get(&(id, colour)).copied().unwrap_or_default())
    }
    fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        Ok(vec![("no_match", 3)])
    }
    fn flow_counts(&self) -> Option<Arc<FlowSnapshot>> {
        if let Some(f) = &self.frozen {
            return Some(Arc::clone(f));
        }
        // A count begun now: each call is a new pass.
        let pass = self.passes.get() + 1;
        self.passes.set(pass);
        Some(Arc::new(FlowSnapshot::now(self.flows.clone(), pass)))
    }
    fn set_draining(&mut self, id: u32, draining: bool) -> Result<(), DataplaneError> {
        self.draining.insert(id, draining);
        Ok(())
    }
    fn install(&mut self, services: &[ServiceConfig]) -> Result<Vec<Installed>, DataplaneError> {
        self.ids.retain(|name, _| services.iter().any(|s| &s.name == name));
        let mut out = Vec::new();
        for s in services {
            let id = match self.ids.get(&s.name) {
                Some(id) => *id,
                None => {
                    let id = (0..).find(|i| !self.ids.values().any(|v| v == i)).unwrap_or_default();
                    self.ids.insert(s.name.clone(), id);
                    id
                }
            };
            for c in Colour::ALL {
                self.pools.insert((id, c), s.pool(c).to_vec());
            }
            let (active, canary_bp) = self.state.get(&id).copied().unwrap_or((s.active, 0));
            out.push(Installed { id, active, canary_bp, previous: None });
        }
        Ok(out)
    }
    fn end_drain(
        &mut self,
        _: &ServiceConfig,
        id: u32,
        from: Colour,
        a: DrainAction,
    ) -> Result<Option<u64>, DataplaneError> {
        self.ended.push((id, from, a));
        Ok(Some(1))
    }
}

fn backend(a: &str) -> BackendConfig {
    BackendConfig { addr: a.parse().expect("addr"), weight: 1 }
}

/// `web` (blue 198.51.100.2, green 198.51.100.18; NAT, TCP 80, unchecked) and `solo`
/// (blue only), both active on blue.
pub(crate) fn board() -> Switchboard<FakeMaps> {
    let web = ServiceConfig {
        name: "web".into(),
        vip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
        port: 80,
        preview_port: None,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        active: Colour::Blue,
        blue: vec![backend("198.51.100.2:8080")],
        green: vec![backend("198.51.100.18:8080")],
        drain_timeout: None,
        on_drain_timeout: DrainAction::Move,
        // Unchecked by default here; the health tests turn checks on.
        health: HealthConfig { check: CheckKind::None, ..HealthConfig::default_for(Protocol::Tcp) },
        watch: None,
        failover: false,
        rollout: crate::config::RolloutConfig::default(),
        shadow: crate::shadow::ShadowSetting::default(),
    };
    let solo = ServiceConfig { name: "solo".into(), port: 81, green: vec![], ..web.clone() };
    let installed = |id| Installed { id, active: Colour::Blue, canary_bp: 0, previous: None };
    let maps = FakeMaps { ids: HashMap::from([("web".into(), 0), ("solo".into(), 1)]), ..FakeMaps::default() };
    Switchboard::new(maps, vec![(web, installed(0)), (solo, installed(1))])
}

fn handle(b: &mut Switchboard<FakeMaps>, req: Request) -> Response {
    b.handle(req).0
}

fn cutover(b: &mut Switchboard<FakeMaps>, s: &str, c: Option<&str>) -> Response {
    handle(
        b,
        Request::Cutover {
            service: s.into(),
            colour: c.map(|c| c.parse().expect("a colour")),
            drain_timeout_secs: None,
            force: false,
            scope: Default::default(),
        },
    )
}

#[test]
fn cutover_defaults_to_the_idle_colour_and_writes_the_map_once() {
    let mut b = board();
    let r = cutover(&mut b, "web", None);
    assert!(r.ok, "{r:?}");
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Green, 0)));
    assert_eq!(b.maps.writes, 1);
    assert_eq!(r.services[0].active, Colour::Green);
    assert_eq!(r.services[0].previous, Some(Colour::Blue));
    assert!(r.message.as_deref().is_some_and(|m| m.contains("blue → green")), "{r:?}");
}

#[test]
fn rollback_returns_to_the_previous_colour() {
    let mut b = board();
    let r = handle(&mut b, Request::Rollback { service: "web".into(), force: false, scope: Default::default() });
    assert!(!r.ok);
    assert!(r.error.as_deref().is_some_and(|e| e.contains("nothing to roll back")), "{r:?}");
    // Never switched, but a canary runs: a rollback ends it.
    let weight = Request::Weight {
        service: "web".into(),
        colour: Colour::Green,
        basis_points: 3_000,
        force: false,
        scope: Default::default(),
    };
    assert!(handle(&mut b, weight).ok);
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 3_000)));
    let r = handle(&mut b, Request::Rollback { service: "web".into(), force: false, scope: Default::default() });
    assert!(r.ok, "{r:?}");
    assert!(
        r.message
            .as_deref()
            .is_some_and(|m| m.contains("rolled back: the canary of green ended, every new flow on blue")),
        "{r:?}"
    );
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)), "every new flow back on blue");
    assert!(cutover(&mut b, "web", Some("green")).ok);
    let r = handle(&mut b, Request::Rollback { service: "web".into(), force: false, scope: Default::default() });
    assert!(r.ok, "{r:?}");
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
    assert_eq!(r.services[0].switches, 2, "ending a canary switches no colour");
    let kinds = r.services[0].switch_kinds;
    assert_eq!((kinds.cutover, kinds.rollback, kinds.auto_rollback, kinds.failover), (1, 1, 0, 0));
}

#[test]
fn cutover_to_the_active_colour_changes_nothing() {
    let mut b = board();
    let r = cutover(&mut b, "web", Some("blue"));
    assert!(r.ok);
    assert_eq!(b.maps.writes, 0);
    assert!(r.message.as_deref().is_some_and(|m| m.contains("already on blue")));
}

#[test]
fn errors_say_what_to_do() {
    let mut b = board();
    let r = cutover(&mut b, "api", None);
    assert_eq!(r.error.as_deref(), Some("unknown service \"api\"; configured: web, solo"));
    // A colour is checked where the request is read.
    let e = crate::protocol::parse_request(br#"{"op":"cutover","service":"web","colour":"red"}"#).expect_err("red");
    assert!(e.contains("\"red\": unknown colour"), "{e}");
    let r = cutover(&mut b, "solo", None);
    assert!(r.error.as_deref().is_some_and(|e| e.contains("no green backend configured")), "{r:?}");
    let r = handle(
        &mut b,
        Request::Weight {
            service: "solo".into(),
            colour: Colour::Green,
            basis_points: 100,
            force: false,
            scope: Default::default(),
        },
    );
    assert!(r.error.as_deref().is_some_and(|e| e.contains("no green backend")), "{r:?}");
    assert_eq!(b.maps.writes, 0, "a refused request writes nothing");
}

#[test]
fn weights_set_a_canary_and_100_percent_is_a_cutover() {
    let mut b = board();
    let w = |b: &mut Switchboard<FakeMaps>, c: Colour, bp| {
        handle(
            b,
            Request::Weight {
                service: "web".into(),
                colour: c,
                basis_points: bp,
                force: false,
                scope: Default::default(),
            },
        )
    };
    let r = w(&mut b, Colour::Green, 500);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.message.as_deref(), Some("web: new flows blue 95%, green 5%"));
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 500)));
    assert_eq!(r.services[0].canary, Some(Canary { colour: Colour::Green, basis_points: 500 }));
    assert!(w(&mut b, Colour::Blue, 9_999).ok);
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 1)));
    assert!(w(&mut b, Colour::Green, 0).ok);
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
    let r = w(&mut b, Colour::Green, 10_000);
    assert_eq!(r.services[0].active, Colour::Green, "{r:?}");
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Green, 0)));
    assert!(!w(&mut b, Colour::Green, 10_001).ok);
    assert_eq!(percent(1), "0.01%");
    assert_eq!(percent(1250), "12.5%");
    assert_eq!(percent(10_000), "100%");
}

#[test]
fn the_data_path_drain_flag_follows_the_drain_and_waits_on_other_nodes() {
    let mut b = board();
    b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 2, closing: 0, idle: 0 });
    assert!(cutover(&mut b, "web", Some("green")).ok);
    assert_eq!(b.maps.draining.get(&0), Some(&true), "set by the cut-over itself");
    b.tick();
    assert_eq!(b.maps.draining.get(&0), Some(&true), "still draining");
    // The local flows are gone (or idle), but another node still holds some: wait for it.
    b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 0, closing: 0, idle: 2 });
    b.set_remote_drains(HashMap::from([("web".to_owned(), vec![("lb1".to_owned(), 8)])]));
    b.tick();
    assert!(b.waits_on_fleet());
    let st = b.status(Some("web")).expect("status");
    let drain = st.services[0].drain.clone().expect("draining while lb1 holds flows");
    assert_eq!((drain.live_flows, drain.idle_flows, drain.elsewhere.clone()), (0, 2, vec![("lb1".to_owned(), 8)]));
    assert_eq!(b.maps.draining.get(&0), Some(&true));
    b.set_remote_drains(HashMap::new());
    b.tick();
    assert!(b.services[0].drain.is_none(), "no node holds any: the drain is over");
    assert_eq!(b.maps.draining.get(&0), Some(&false), "and the data path is told");
}

#[test]
fn status_counts_the_flow_table_by_state() {
    let mut b = board();
    let counts = HashMap::from([
        ((0, Colour::Blue), FlowCounts { live: 3, closing: 1, idle: 2 }),
        ((0, Colour::Green), FlowCounts { live: 4, closing: 0, idle: 0 }),
    ]);
    let mut pass = FlowSnapshot::now(counts, 7);
    pass.walked = 15;
    b.maps.frozen = Some(Arc::new(pass));
    let t = b.status(None).expect("status").flow_table.expect("a pass was made");
    assert_eq!((t.live, t.closing, t.idle, t.expired), (7, 1, 2, 5));
}

#[test]
fn only_a_count_begun_after_the_switch_ends_a_drain() {
    let mut b = board();
    // The last pass, from before the cut-over, saw no flow of blue: it proves nothing.
    b.maps.frozen = Some(Arc::new(FlowSnapshot::now(HashMap::new(), 1_000)));
    let r = cutover(&mut b, "web", Some("green"));
    assert!(r.ok, "{r:?}");
    b.tick();
    b.tick();
    assert!(b.services[0].drain.is_some(), "no pass has begun since the drain did");
    assert!(!b.waits_on_fleet(), "nor does it say this node is empty");
    let observed = b.observed();
    assert_eq!(observed[0].draining, Some((Colour::Blue, 1)), "the fleet is not told 0 on an old count");
    let st = b.status(Some("web")).expect("status");
    assert!(st.flows_counted_ms_ago.is_some(), "status says how old its counts are");
    // A pass begun after the switch finds blue empty: the drain is over.
    b.maps.frozen = None;
    b.tick();
    assert!(b.services[0].drain.is_none(), "a new pass ends it");
}

#[test]
fn drains_complete_when_empty_and_end_at_the_timeout() {
    let mut b = board();
    b.maps.flows.insert((0, Colour::Blue), FlowCounts { live: 3, closing: 0, idle: 0 });
    let r = handle(
        &mut b,
        Request::Cutover {
            service: "web".into(),
            colour: None,
            drain_timeout_secs: Some(0),
            force: false,
            scope: Default::default(),
        },
    );
    assert!(
        r.message
            .as_deref()
            .is_some_and(|m| m.contains("3 open flows on blue drain (as counted") && m.contains("; timeout 0s)")),
        "{r:?}"
    );
    let st = b.status(Some("web")).expect("status");
    let drain = st.services[0].drain.clone().expect("draining");
    assert_eq!((drain.colour, drain.live_flows, drain.initial_flows), (Colour::Blue, 3, 3));
    b.tick();
    assert_eq!(b.maps.ended, [(0, Colour::Blue, DrainAction::Move)], "timeout 0: ended at the first tick");
    assert!(b.status(Some("web")).expect("status").services[0].drain.is_none());

    // Without a timeout the drain waits for the flows to end.
    b.maps.flows.insert((0, Colour::Green), FlowCounts { live: 2, closing: 0, idle: 0 });
    assert!(cutover(&mut b, "web", Some("blue")).ok);
    b.tick();
    assert!(b.services[0].drain.is_some());
    b.maps.flows.insert((0, Colour::Green), FlowCounts { live: 0, closing: 2, idle: 0 });
    b.tick();
    assert!(b.services[0].drain.is_none(), "closing flows do not hold a drain");
    assert_eq!(b.maps.ended.len(), 1);
}

#[test]
fn pools_change_at_runtime() {
    let mut b = board();
    let add = |b: &mut Switchboard<FakeMaps>, a: &str, w| {
        handle(b, Request::BackendAdd { service: "web".into(), colour: Colour::Blue, address: a.into(), weight: w })
    };
    assert!(add(&mut b, "198.51.100.3:8080", Some(2)).ok);
    assert_eq!(b.maps.pools[&(0, Colour::Blue)].len(), 2);
    assert!(add(&mut b, "198.51.100.3:8080", Some(5)).ok, "re-adding changes the weight");
    assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 5);
    assert!(add(&mut b, "[2001:db8::1]:80", None).error.is_some_and(|e| e.contains("address family")));
    assert!(add(&mut b, "nonsense", None).error.is_some_and(|e| e.contains("is not ADDRESS:PORT")));
    let rm = |b: &mut Switchboard<FakeMaps>, a: &str| {
        handle(b, Request::BackendRemove { service: "web".into(), colour: Colour::Blue, address: a.into() })
    };
    assert!(rm(&mut b, "198.51.100.2:8080").ok);
    let r = rm(&mut b, "198.51.100.3:8080");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("last blue backend")), "{r:?}");
    assert!(rm(&mut b, "198.51.100.9:8080").error.is_some_and(|e| e.contains("is not a blue backend")));
}

pub(crate) fn checked(b: &mut Switchboard<FakeMaps>, watch: Option<Duration>, failover: bool) {
    let s = &mut b.services[0];
    s.config.health.check = CheckKind::Tcp;
    s.config.watch = watch;
    s.config.failover = failover;
}

/// The rollout settings of `web` (for the tests of the fleet's rollouts, above the engine).
pub(crate) fn web_rollout(b: &mut Switchboard<FakeMaps>) -> &mut crate::steps::RolloutConfig {
    &mut b.services[0].config.rollout
}

/// Sets what the data path has counted for `colour` of `web`.
pub(crate) fn count(b: &mut Switchboard<FakeMaps>, colour: Colour, c: Counters) {
    b.maps.counters.insert((0, colour), c);
}

pub(crate) fn probe(b: &mut Switchboard<FakeMaps>, addr: &str, ok: bool) -> Vec<Change> {
    let r = if ok { Ok(()) } else { Err("connect: connection refused".to_owned()) };
    b.record_health("web", vec![(addr.parse().expect("addr"), r)])
}

#[test]
fn cutover_is_refused_to_an_unhealthy_colour_unless_forced() {
    let mut b = board();
    checked(&mut b, None, false);
    probe(&mut b, "198.51.100.2:8080", true);
    probe(&mut b, "198.51.100.18:8080", false);
    let r = cutover(&mut b, "web", Some("green"));
    let e = r.error.expect("refused");
    assert!(e.contains("refusing to cut over web to green: no healthy green backend (198.51.100.18:8080: down for 0s: connect: connection refused)"), "{e}");
    assert_eq!(b.maps.writes, 0);
    let r = handle(
        &mut b,
        Request::Cutover {
            service: "web".into(),
            colour: None,
            drain_timeout_secs: None,
            force: true,
            scope: Default::default(),
        },
    );
    assert!(r.ok, "{r:?}");
    // Its only backend is down: the table keeps it (panic mode) rather than go empty.
    assert_eq!(b.maps.pools[&(0, Colour::Green)][0].weight, 1);
    // With a healthy sibling, a down backend leaves the table: weight 0 in the pool.
    let add = Request::BackendAdd {
        service: "web".into(),
        colour: Colour::Green,
        address: "198.51.100.19:8080".into(),
        weight: None,
    };
    assert!(handle(&mut b, add).ok);
    probe(&mut b, "198.51.100.19:8080", true);
    assert_eq!(b.maps.pools[&(0, Colour::Green)][0].weight, 0);
    assert_eq!(b.maps.pools[&(0, Colour::Green)][1].weight, 1);
    let s = b.status(Some("web")).expect("status");
    assert_eq!(s.services[0].colours[1].backends[0].health, Health::Down);
    assert!(s.services[0].colours[1].healthy, "one healthy backend makes the colour healthy");
}

#[test]
fn a_failing_new_colour_is_rolled_back_within_the_watch_window() {
    let mut b = board();
    checked(&mut b, Some(Duration::from_secs(60)), false);
    probe(&mut b, "198.51.100.2:8080", true);
    probe(&mut b, "198.51.100.18:8080", true);
    let r = cutover(&mut b, "web", Some("green"));
    assert!(r.message.as_deref().is_some_and(|m| m.contains("watching green for 60s")), "{r:?}");
    assert_eq!(r.services[0].watch_secs_left.map(|s| s > 50), Some(true));
    // Three failures in a row (fall = 3) take green down, and with it the cut-over.
    assert!(probe(&mut b, "198.51.100.18:8080", false).is_empty());
    assert!(probe(&mut b, "198.51.100.18:8080", false).is_empty());
    let changes = probe(&mut b, "198.51.100.18:8080", false);
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].what.as_str(), changes[0].from.as_str(), changes[0].to.as_str()),
        ("auto-rollback", "green", "blue")
    );
    assert_eq!(b.maps.state.get(&0), Some(&(Colour::Blue, 0)));
    let kinds = b.status(Some("web")).expect("status").services[0].switch_kinds;
    assert_eq!((kinds.cutover, kinds.rollback, kinds.auto_rollback, kinds.failover), (1, 0, 1, 0));
}

#[test]
fn a_dead_live_colour_fails_over_only_when_enabled() {
    let mut b = board();
    checked(&mut b, None, false);
    probe(&mut b, "198.51.100.18:8080", true);
    assert!(probe(&mut b, "198.51.100.2:8080", false).is_empty(), "failover is off");
    assert_eq!(b.services[0].active, Colour::Blue);
    let mut b = board();
    checked(&mut b, None, true);
    probe(&mut b, "198.51.100.18:8080", true);
    let changes = probe(&mut b, "198.51.100.2:8080", false);
    assert_eq!(changes.first().map(|c| c.what.as_str()), Some("failover"));
    assert_eq!(b.services[0].active, Colour::Green);
    let kinds = b.status(Some("web")).expect("status").services[0].switch_kinds;
    assert_eq!((kinds.cutover, kinds.rollback, kinds.auto_rollback, kinds.failover), (0, 0, 0, 1));
    // Green dies too: nowhere to go, nothing changes.
    b.services[0].config.health.fall = 1;
    assert!(probe(&mut b, "198.51.100.18:8080", false).is_empty());
}

#[test]
fn a_reload_keeps_health_down_backends_out_and_runtime_pool_changes() {
    let mut b = board();
    // web's blue pool has two backends; the second fails its checks and leaves the table.
    b.services[0].config.blue.push(backend("198.51.100.3:8080"));
    b.services[0].file_pools[0].push(backend("198.51.100.3:8080"));
    checked(&mut b, None, false);
    b.services[0].config.health.fall = 1;
    probe(&mut b, "198.51.100.2:8080", true);
    probe(&mut b, "198.51.100.3:8080", false);
    assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 0, "down: out of the table");
    // An operator adds a green backend at runtime.
    let add = Request::BackendAdd {
        service: "web".into(),
        colour: Colour::Green,
        address: "198.51.100.19:8080".into(),
        weight: None,
    };
    assert!(handle(&mut b, add).ok);
    let file = b.services();
    let mut file: Vec<ServiceConfig> = file
        .into_iter()
        .map(|mut s| {
            s.green.retain(|g| g.addr.to_string() != "198.51.100.19:8080");
            s
        })
        .collect();
    let status = b.status(Some("web")).expect("status");
    assert!(
        status.services[0].colours[1].edited && !status.services[0].colours[0].edited,
        "status says green was changed at runtime"
    );

    // The same file again: the down backend stays out, the runtime backend stays in.
    let done = b.reload(file.clone()).expect("reloaded");
    assert_eq!(done.kept, ["web green"]);
    assert_eq!(b.maps.pools[&(0, Colour::Blue)][1].weight, 0, "a reload brought a down backend back");
    assert_eq!(b.maps.pools[&(0, Colour::Green)].len(), 2, "a reload dropped a backend added at runtime");
    assert_eq!(b.services()[0].green.len(), 2);

    // A file that changes green too would undo the runtime change: refused, nothing written.
    let before = b.maps.pools.clone();
    file[0].green.push(backend("198.51.100.20:8080"));
    let e = b.reload(file.clone()).expect_err("refused");
    assert!(e.contains("web green: 198.51.100.19:8080 added at runtime would be removed"), "{e}");
    assert_eq!(b.maps.pools, before);
    // With the runtime change written into the file, it applies.
    file[0].green.push(backend("198.51.100.19:8080"));
    let done = b.reload(file).expect("reloaded");
    assert!(done.kept.is_empty());
    assert_eq!(b.maps.pools[&(0, Colour::Green)].len(), 3);
    assert!(!b.status(Some("web")).expect("status").services[0].colours[1].edited);
}

#[test]
fn changes_are_reported_for_the_audit_log() {
    let mut b = board();
    let (_, change) = b.handle(Request::Cutover {
        service: "web".into(),
        colour: None,
        drain_timeout_secs: None,
        force: false,
        scope: Default::default(),
    });
    assert_eq!(
        change,
        Some(Change { service: "web".into(), what: "cut-over".into(), from: "blue".into(), to: "green".into() })
    );
    let (_, none) = b.handle(Request::Status { service: None });
    assert_eq!(none, None);
}

#[test]
fn status_lists_services_and_reasons() {
    let mut b = board();
    let r = b.status(None).expect("status");
    assert_eq!(r.services.len(), 2);
    assert_eq!(r.services[0].colours.len(), 2);
    assert!(r.services[1].colours[1].backends.is_empty());
    assert_eq!(r.reasons, [("no_match".to_owned(), 3)]);
    assert!(b.status(Some("nope")).is_err());
}
